"""Built fixtures kept between runs, next to tests.fixtures' own, under a fingerprint of this package."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from tests.fixtures.cache import builder_fingerprint as phi3_builder_fingerprint
from tests.fixtures.cache import default_cache_dir

from .build import build_arch_model
from .specs import SPECS, spec_for

PACKAGE_DIR = Path(__file__).resolve().parent


def arch_fingerprint(kind: str) -> str:
    """12 hex digits over this package's modules, the kind's spec and everything tests.fixtures' own
    fingerprint covers (its modules, the validation prompts, the library versions), whose helpers build these."""
    h = hashlib.sha256()
    for source in sorted(PACKAGE_DIR.glob("*.py")):
        h.update(source.name.encode() + b"\0" + source.read_bytes())
    h.update(json.dumps(asdict(SPECS[kind]), sort_keys=True).encode())
    h.update(phi3_builder_fingerprint("phi3").encode())
    return h.hexdigest()[:12]


def cached_arch_model(kind: str, cache_dir: Path | None = None) -> Path:
    """Path to the ``kind`` fixture (seed 0), built once into ``cache_dir`` (default: tests.fixtures'
    cache, $HUBBOT_TINY_MODEL_CACHE), in ``tiny-phi-3.5-moe-<fingerprint>`` or ``tiny-phi-2-<fingerprint>``.
    The name matters: hubbot names a local model after its folder, llama.cpp's converter writes that as
    general.name, and llama.cpp gives Phi-3's special tokens their rstrip only when the name has "phi-3"
    or "phi3" in it (as Phi-3.5-MoE-instruct's has)."""
    spec = spec_for(kind)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"{spec.folder_prefix}-{arch_fingerprint(kind)}"
    if (target / "tiny_model_info.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{kind}-", dir=root))
    try:
        build_arch_model(kind, tmp / target.name)
        try:
            os.replace(tmp / target.name, target)
        except OSError:
            if not (target / "tiny_model_info.json").is_file():  # not a concurrent build that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
