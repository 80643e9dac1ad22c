"""The command lines measured: hubbot's (whatever hubbot is importable) and each tool run by hand.

"By hand" is the tool alone, as a user would run it from its own documentation, with hubbot's
settings for the variant (quantization type, ONNX builder options) but without validation.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

PY = sys.executable
HUBBOT = [PY, "-m", "hubbot.cli"]
# llama.cpp's quantizer as llama-cpp-python exposes it (the wheel has no llama-quantize binary)
QUANTIZE = """
import os, sys, llama_cpp
src, dst, ftype = sys.argv[1:]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, ftype)
params.nthread = os.cpu_count() or 1
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
sys.exit(1 if rc else 0)
"""
GGUF_FLOAT = {"F32": "f32", "F16": "f16", "BF16": "bf16"}


def plan_variants(model: Path, recipe: str, env: dict[str, str]) -> list[dict[str, Any]]:
    """The recipe's variants for MODEL, from `hubbot plan --json`."""
    proc = subprocess.run([*HUBBOT, "plan", str(model), "--recipe", recipe, "--json"], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"hubbot plan failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    plan = json.loads(proc.stdout)
    return [v for repo in plan["repos"] for v in repo["variants"]]


def hubbot_build(model: Path, variant: dict, recipe: str, out: Path, work: Path,
                 reference: Path | None = None) -> list[tuple[str, list[str]]]:
    passed = ["--reference", str(reference)] if reference else []
    return [("build", [*HUBBOT, "build", str(model), "--variant", variant["id"], "--recipe", recipe,
                       "--out", str(out), "--workdir", str(work), *passed])]


def hubbot_reference(model: Path, out: Path) -> list[tuple[str, list[str]]]:
    return [("reference", [*HUBBOT, "reference", str(model), "--out", str(out / "reference.json")])]


def hubbot_publish(model: Path, recipe: str, out: Path, work: Path,
                   extra: tuple[str, ...] = ()) -> list[tuple[str, list[str]]]:
    return [("publish", [*HUBBOT, "publish", str(model), "--recipe", recipe, "--out", str(out),
                         "--workdir", str(work), *extra])]


def source_dtype(model: Path) -> str:
    config = json.loads((model / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def gguf_converter_env(env: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """llama.cpp's converter as hubbot fetched it (from the llama-cpp-python sdist), and its PYTHONPATH."""
    from hubbot.backends.gguf import converter_dir

    conv = converter_dir(print)
    return conv, {**env, "PYTHONPATH": os.pathsep.join([str(conv / "gguf-py"), str(conv)])}


def by_hand(model: Path, variant: dict, out: Path, work: Path, env: dict[str, str]
            ) -> tuple[list[tuple[str, list[str]]], dict[str, str]]:
    """The steps of the variant's tool run by hand, and the environment they need."""
    fmt, native, target, options = variant["format"], variant["native"], variant["target"], variant["options"]
    if fmt == "gguf":
        out.mkdir(parents=True, exist_ok=True)
        conv, env = gguf_converter_env(env)
        convert = [PY, str(conv / "convert_hf_to_gguf.py"), str(model)]
        if native in GGUF_FLOAT:
            return [("convert", [*convert, "--outfile", str(out / f"model-{native}.gguf"),
                                 "--outtype", GGUF_FLOAT[native]])], env
        outtype = "bf16" if source_dtype(model) == "bfloat16" else "f16"
        intermediate = work / f"model-{outtype.upper()}.gguf"
        ftype = "LLAMA_FTYPE_MOSTLY_" + native
        return [("convert", [*convert, "--outfile", str(intermediate), "--outtype", outtype]),
                ("quantize", [PY, "-c", QUANTIZE, str(intermediate), str(out / f"model-{native}.gguf"), ftype])], env
    if fmt == "onnx":
        from hubbot.backends.onnx import builder_options  # exactly the --extra_options hubbot passes

        extra = builder_options(native, target, options)
        cmd = [PY, "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(out), "-p", native,
               "-e", target, "-c", str(work / "cache")]
        return [("builder", cmd + (["--extra_options", *extra] if extra else []))], env
    if fmt == "openvino":
        cli = Path(PY).parent / "optimum-cli"
        cmd = [str(cli)] if cli.is_file() else [PY, "-m", "optimum.commands.optimum_cli"]
        cmd += ["export", "openvino", "-m", str(model), "--task", "text-generation-with-past",
                "--weight-format", native.split("_")[0]]
        if native.endswith("_sym"):
            cmd.append("--sym")
        if options:
            raise SystemExit(f"{variant['id']}: by-hand OpenVINO runs take no recipe options (got {options})")
        return [("export", cmd + [str(out)])], {**env, "TOKENIZERS_PARALLELISM": "false"}
    if fmt == "mlx":
        cmd = [PY, "-m", "mlx_lm", "convert", "--hf-path", str(model), "--mlx-path", str(out / "mlx")]
        bits = re.fullmatch(r"(\d)bit", native)
        if bits:
            cmd += ["-q", "--q-bits", bits.group(1)]
        elif native.startswith("mixed_"):
            cmd += ["-q", "--quant-predicate", native]
        else:
            cmd += ["--dtype", {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[native]]
        if options.get("group_size"):
            cmd += ["--q-group-size", str(options["group_size"])]
        return [("convert", cmd)], env
    raise SystemExit(f"{variant['id']}: no by-hand command for format {fmt!r}")


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("hubbot", "llama-cpp-python", "onnxruntime-genai", "onnxruntime", "optimum-intel", "nncf",
                 "openvino", "mlx", "mlx-lm", "transformers", "torch"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def hubbot_source() -> dict[str, str]:
    """Which hubbot runs: its folder and, in a git checkout, the commit (dirty marked)."""
    import hubbot

    folder = Path(hubbot.__file__).resolve().parent.parent
    info = {"path": str(folder)}
    try:
        head = subprocess.run(["git", "-C", str(folder), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10)
        branch = subprocess.run(["git", "-C", str(folder), "rev-parse", "--abbrev-ref", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if head.returncode == 0:
            info["commit"] = head.stdout.strip()
            info["branch"] = branch.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info
