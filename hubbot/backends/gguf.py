"""GGUF for llama.cpp: convert once with llama.cpp's own converter, quantize with llama.cpp.

The converter (``convert_hf_to_gguf.py`` with its ``conversion`` and ``gguf-py`` packages) ships
in the llama-cpp-python sdist; it is fetched from the package index into a cache on first use,
for exactly the installed llama-cpp-python version, and run in a subprocess. All variants are
quantized from one F16/BF16 (or F32) intermediate.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import BuildError
from ..paths import cache_root
from ..sdist import fetch_sdist_files
from .base import Backend, Built, Log, Naming, NativeType

# name: (precision class, approximate bits per weight). Types that need an importance matrix
# (IQ1/IQ2/IQ3) are left out until the bot can compute one.
GGUF_TYPES: dict[str, tuple[str, float]] = {
    "F32": ("fp32", 32.0),
    "F16": ("fp16", 16.0),
    "BF16": ("bf16", 16.0),
    "Q8_0": ("int8", 8.5),
    "Q6_K": ("int6", 6.56),
    "Q5_K_M": ("int5", 5.69),
    "Q5_K_S": ("int5", 5.54),
    "Q5_1": ("int5", 6.0),
    "Q5_0": ("int5", 5.5),
    "Q4_K_M": ("int4", 4.89),
    "Q4_K_S": ("int4", 4.58),
    "Q4_1": ("int4", 5.0),
    "Q4_0": ("int4", 4.55),
    "IQ4_XS": ("int4", 4.25),
    "IQ4_NL": ("int4", 4.5),
    "Q3_K_L": ("int3", 4.27),
    "Q3_K_M": ("int3", 3.91),
    "Q3_K_S": ("int3", 3.5),
    "Q2_K": ("int2", 3.35),
}
INTERMEDIATE_OUTTYPE = {"F32": "f32", "BF16": "bf16", "F16": "f16"}
SMALL_MODEL_BYTES = 512 * 2**20
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def llama_cpp_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def converter_dir(log: Log = lambda _: None) -> Path:
    """llama.cpp's converter for the installed llama-cpp-python, fetched once into the cache."""
    override = os.environ.get("HUBBOT_LLAMA_CPP_DIR")
    if override:
        return Path(override)
    ver = llama_cpp_version()
    return fetch_sdist_files(f"llama-cpp-python=={ver}", "vendor/llama.cpp/", CONVERTER_FILES,
                             cache_root() / f"llama.cpp-{ver}", log=log)


class GGUFBackend(Backend):
    name = "gguf"
    extra = "gguf"
    library_name = "gguf"
    tags = ("gguf", "llama.cpp")
    required_modules = ("llama_cpp", "gguf")
    targets = ("any",)
    default_target = "any"
    precisions = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "int8": "Q8_0", "int4": "Q4_K_M"}
    native_types = {name: NativeType(name, cls, bpw) for name, (cls, bpw) in GGUF_TYPES.items()}
    options = {"pure": bool, "leave_output_tensor": bool}
    naming = Naming(repo="{model}-GGUF", path="{model}-{quant}.gguf")
    template = "gguf.md.j2"

    def tool_versions(self) -> dict[str, str]:
        return {"llama-cpp-python": llama_cpp_version(), "llama.cpp converter": f"llama-cpp-python {llama_cpp_version()} sdist"}

    def build(self, snapshot, variants, repo_dir: Path, workdir: Path, log: Log) -> list[Built]:
        self.require()
        natives = {v.native for v in variants}
        outtype = "f32" if "F32" in natives else "bf16" if _source_dtype(snapshot.config) == "bfloat16" else "f16"
        intermediate = workdir / f"{snapshot.ref.model_name}-{outtype.upper()}.gguf"
        started = time.monotonic()
        self._convert(snapshot, intermediate, outtype, workdir, log)
        convert_seconds = time.monotonic() - started
        built = []
        for v in variants:
            out = repo_dir / v.path
            out.parent.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            if v.native.lower() == outtype and not v.options:
                log(f"{v.id}: the {outtype.upper()} conversion itself")
                shutil.copyfile(intermediate, out)
            else:
                log(f"{v.id}: quantizing {outtype.upper()} → {v.native}")
                _quantize(intermediate, out, v.native, v.options)
            built.append(Built(v.id, v.path, [v.path], time.monotonic() - started,
                               {"intermediate": outtype.upper(), "convert_seconds": round(convert_seconds, 2)}))
        return built

    def _convert(self, snapshot, out: Path, outtype: str, workdir: Path, log: Log) -> None:
        conv = converter_dir(log)
        override = workdir / "gguf-metadata.json"
        metadata = {"general.name": snapshot.ref.model_name}
        if snapshot.license and not snapshot.card_data.get("license"):
            metadata["general.license.name"] = snapshot.license  # the converter reads license from the card only
        if snapshot.base_model:
            metadata["general.source.repo_url"] = f"https://huggingface.co/{snapshot.base_model}"
        override.write_text(json.dumps(metadata))
        cmd = [sys.executable, str(conv / "convert_hf_to_gguf.py"), str(snapshot.path), "--outfile", str(out),
               "--outtype", outtype, "--model-name", snapshot.ref.model_name, "--metadata", str(override)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(conv / "gguf-py"), str(conv)])}
        log(f"converting {snapshot.ref.model_name} to {outtype.upper()} GGUF with llama.cpp's converter")
        log_file = workdir / "convert.log"
        with log_file.open("w") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
        if rc or not out.is_file():
            tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-15:])
            raise BuildError(f"llama.cpp's converter failed (exit {rc}); last lines of {log_file}:\n{tail}")

    def inspect(self, snapshot, variant, repo_dir: Path) -> dict[str, Any]:
        return inspect_gguf(repo_dir / variant.path, snapshot, variant.native)

    def load(self, variant, repo_dir: Path):
        return LlamaCppRuntime(repo_dir / variant.path)


BACKEND = GGUFBackend


def _source_dtype(config: dict) -> str:
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def _quantize(src: Path, dst: Path, native: str, options: dict[str, Any]) -> None:
    import llama_cpp
    from llama_cpp._logger import set_verbose

    set_verbose(False)  # llama.cpp's per-tensor log; hubbot prints its own progress

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _ftype(native)
    params.nthread = os.cpu_count() or 1
    params.pure = bool(options.get("pure", False))
    params.quantize_output_tensor = not options.get("leave_output_tensor", False)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0 or not dst.is_file():
        raise BuildError(f"llama.cpp failed to quantize {src.name} to {native} (code {rc})")


def _ftype(native: str) -> int:
    import llama_cpp

    return llama_cpp.LLAMA_FTYPE_ALL_F32 if native == "F32" else getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{native}")


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def inspect_gguf(path: Path, snapshot, native: str) -> dict[str, Any]:
    """Read the file back with the gguf package and check what llama.cpp will rely on."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    template = _field(reader, "tokenizer.chat_template")
    tensor_types: dict[str, int] = {}
    for t in reader.tensors:
        tensor_types[t.tensor_type.name] = tensor_types.get(t.tensor_type.name, 0) + 1
    info = {
        "architecture": arch,
        "name": _field(reader, "general.name"),
        "license": _field(reader, "general.license") or _field(reader, "general.license.name"),
        "file_type": _field(reader, "general.file_type"),
        "tensor_types": tensor_types,
        "tensors": len(reader.tensors),
        "has_chat_template": bool(template),
        "bytes": path.stat().st_size,
    }
    problems = []
    if arch != "phi3":
        problems.append(f"general.architecture is {arch!r}, expected 'phi3'")
    source_template = _source_chat_template(snapshot.path)
    if source_template and template != source_template:
        problems.append("tokenizer.chat_template differs from the source's chat template")
    if snapshot.license and info["license"] != snapshot.license:
        problems.append(f"license metadata is {info['license']!r}, expected {snapshot.license!r}")
    expected_ftype = _ftype(native)
    if info["file_type"] != expected_ftype:
        problems.append(f"general.file_type is {info['file_type']}, expected {expected_ftype} ({native})")
    main_type = re.sub(r"_[SML]$", "", native)
    if main_type not in tensor_types:
        problems.append(f"no tensor is stored as {main_type}: {tensor_types}")
    if problems:
        raise BuildError(f"{path.name}: " + "; ".join(problems))
    return info


def _source_chat_template(model_dir: Path) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cfg = model_dir / "tokenizer_config.json"
    if cfg.is_file():
        template = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None


class LlamaCppRuntime:
    """A GGUF file loaded in llama-cpp-python, driven token by token."""

    def __init__(self, path: Path, n_ctx: int = 1024):
        from llama_cpp import Llama

        # llama.cpp's worker threads spin while they wait: on a small model, or a busy machine,
        # more threads are far slower than one (measured: 0.4 ms vs 245 ms a token on 2 cores).
        threads = 1 if path.stat().st_size < SMALL_MODEL_BYTES else os.cpu_count() or 1
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                         n_threads=threads, n_threads_batch=threads, seed=0)

    def tokenize(self, text: str) -> list[int]:
        # add_bos=True means "add the model's special tokens": llama.cpp adds BOS only when
        # the GGUF's tokenizer.ggml.add_bos_token says so, as the HF tokenizer does.
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def top1(self, ids: Sequence[int]) -> list[int]:
        import numpy as np

        self.llm.reset()
        self.llm.eval(list(ids))
        return [int(i) for i in np.argmax(self.llm.scores[: len(ids)], axis=-1)]

    def generate(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        import numpy as np

        self.llm.reset()
        self.llm.eval(list(ids))
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(token)
            if token in stop_ids:
                break
            self.llm.eval([token])
        return out

    def close(self) -> None:
        self.llm.close()
