"""Format backends: one module per format behind ``base.Backend``, listed in ``REGISTRY``.

Adding a format: write ``hubbot/backends/<format>.py`` with a ``Backend`` subclass, add its card
template ``templates/<format>.md.j2``, its pip extra in pyproject.toml, and one line here.
"""

from __future__ import annotations

import importlib
from functools import cache

from .base import Backend, Built, Details, Naming, NativeType, OptionError, Runtime

# recipe format name -> "module:class"; modules are imported only when the format is used
REGISTRY: dict[str, str] = {
    "gguf": "hubbot.backends.gguf:GGUFBackend",
    "onnx": "hubbot.backends.onnx:OnnxBackend",
    "openvino": "hubbot.backends.openvino:OpenVINOBackend",
    "mlx": "hubbot.backends.mlx:MLXBackend",
}


def formats() -> list[str]:
    return list(REGISTRY)


@cache
def get_backend(fmt: str) -> Backend:
    if fmt not in REGISTRY:
        raise KeyError(fmt)
    module, _, cls = REGISTRY[fmt].partition(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["REGISTRY", "Backend", "Built", "Details", "NativeType", "Naming", "OptionError", "Runtime", "formats",
           "get_backend"]
