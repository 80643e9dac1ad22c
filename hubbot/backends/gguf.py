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
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BuildError
from ..paths import cache_root
from ..sdist import fetch_sdist_files
from ..source import chat_template, config_dtype
from ..toolrun import run_tool
from .base import Backend, Built, Details, Log, Naming, NativeType, type_table

# GGUF's file types hubbot makes, with approximate bits per weight (llama.cpp's quantize table).
# Types that need an importance matrix (IQ1/IQ2/IQ3) are left out until the bot can compute one.
GGUF_TYPES = type_table(
    NativeType("F32", "fp32", 32.0),
    NativeType("F16", "fp16", 16.0),
    NativeType("BF16", "bf16", 16.0),
    NativeType("Q8_0", "int8", 8.5),
    NativeType("Q6_K", "int6", 6.56),
    NativeType("Q5_K_M", "int5", 5.69),
    NativeType("Q5_K_S", "int5", 5.54),
    NativeType("Q5_1", "int5", 6.0),
    NativeType("Q5_0", "int5", 5.5),
    NativeType("Q4_K_M", "int4", 4.89),
    NativeType("Q4_K_S", "int4", 4.58),
    NativeType("Q4_1", "int4", 5.0),
    NativeType("Q4_0", "int4", 4.55),
    NativeType("IQ4_XS", "int4", 4.25),
    NativeType("IQ4_NL", "int4", 4.5),
    NativeType("Q3_K_L", "int3", 4.27),
    NativeType("Q3_K_M", "int3", 3.91),
    NativeType("Q3_K_S", "int3", 3.5),
    NativeType("Q2_K", "int2", 3.35),
)
# transformers architecture -> general.architecture llama.cpp's converter writes for it
GGUF_ARCHITECTURES: dict[str, str] = {"Phi3ForCausalLM": "phi3"}
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


@dataclass(frozen=True)
class GGUFDetails(Details):
    intermediate: str  # the F16/BF16/F32 conversion every variant was quantized from
    convert_seconds: float
    convert_peak_rss_bytes: int
    peak_rss_bytes: int  # of this variant's own step (quantize, or the conversion itself)


# llama.cpp's quantizer in its own process: its per-tensor log ("[ 12/ 195] …") shows progress,
# an interrupt kills it, and its memory is measured like every other tool's.
QUANTIZE = """
import sys, llama_cpp
from llama_cpp._logger import set_verbose
set_verbose(True)
src, dst, ftype, nthread, pure, quantize_output = sys.argv[1:]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.nthread = int(ftype), int(nthread)
params.pure, params.quantize_output_tensor = pure == "1", quantize_output == "1"
sys.exit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params))
"""


class GGUFBackend(Backend):
    name = "gguf"
    extra = "gguf"
    library_name = "gguf"
    tags = ("gguf", "llama.cpp")
    required_modules = ("llama_cpp", "gguf")
    targets = ("any",)
    default_target = "any"
    precisions = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "int8": "Q8_0", "int4": "Q4_K_M"}
    native_types = GGUF_TYPES
    options = {"pure": bool, "leave_output_tensor": bool}
    naming = Naming(repo="{model}-GGUF", path="{model}-{quant}.gguf")
    template = "gguf.md.j2"

    def tool_versions(self) -> dict[str, str]:
        version = llama_cpp_version()
        return {"llama-cpp-python": version, "llama.cpp converter": f"llama-cpp-python {version} sdist"}

    def build(self, snapshot, variants, repo_dir: Path, workdir: Path, log: Log) -> dict[str, Built]:
        natives = {v.native for v in variants}
        outtype = "f32" if "F32" in natives else "bf16" if config_dtype(snapshot.config) == "bfloat16" else "f16"
        intermediate = workdir / f"{snapshot.ref.model_name}-{outtype.upper()}.gguf"
        converted = self._convert(snapshot, intermediate, outtype, workdir, log)
        built = {}
        for v in variants:
            out = repo_dir / v.path
            out.parent.mkdir(parents=True, exist_ok=True)
            if v.native.lower() == outtype and not v.options:
                log(f"{v.id}: the {outtype.upper()} conversion itself")
                shutil.copyfile(intermediate, out)
                seconds, peak = 0.0, converted.peak_rss_bytes
            else:
                run = _quantize(intermediate, out, v, workdir, log)
                seconds, peak = run.seconds, run.peak_rss_bytes
            built[v.id] = Built([v.path], seconds, GGUFDetails(outtype.upper(), converted.seconds,
                                                             converted.peak_rss_bytes, peak))
        return built

    def _convert(self, snapshot, out: Path, outtype: str, workdir: Path, log: Log):
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
        return run_tool(cmd, workdir / "convert.log", what="llama.cpp's converter", log=log, env=env,
                        check=out.is_file)

    def inspect(self, snapshot, variant, repo_dir: Path) -> dict[str, Any]:
        return inspect_gguf(repo_dir / variant.path, snapshot, variant.native)

    def load(self, variant, repo_dir: Path):
        return LlamaCppRuntime(repo_dir / variant.path)


def _quantize(src: Path, dst: Path, variant, workdir: Path, log: Log):
    log(f"{variant.id}: quantizing {src.name} → {variant.native}")
    options = variant.options
    cmd = [sys.executable, "-c", QUANTIZE, str(src), str(dst), str(_ftype(variant.native)), str(os.cpu_count() or 1),
           "1" if options.get("pure") else "0", "0" if options.get("leave_output_tensor") else "1"]
    return run_tool(cmd, workdir / f"quantize-{variant.native}.log", what=f"llama.cpp quantize to {variant.native}",
                    log=log, check=dst.is_file)


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
    source_arch = (snapshot.config.get("architectures") or ["?"])[0]
    expected_arch = GGUF_ARCHITECTURES.get(source_arch)
    if arch != expected_arch:
        problems.append(f"general.architecture is {arch!r}, expected {expected_arch!r} for {source_arch}")
    source_template = chat_template(snapshot.path)
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

    def logits(self, ids: Sequence[int]):
        import numpy as np

        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

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
