"""ONNX Runtime GenAI: one folder per variant, built by onnxruntime-genai's own model builder.

Every build step runs onnxruntime-genai's builder (or, for CPU int4/int8, ORT's quantizer on the
builder's fp32 model) in its own subprocess, so memory is returned to the system between steps
and the peak of each is measured on its own (``hubbot.toolrun``). Folders are laid out like Microsoft's Phi ONNX repos:
``cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4/``, ``gpu/gpu-int4-rtn-block-32/`` …, each
with ``genai_config.json``, the model and the source's tokenizer files.

CPU variants run in onnxruntime-genai for validation. Its tokenizer never adds BOS; the runtime
prepends it exactly when the model's Hugging Face tokenizer does, as a user of the folder must.
Variants for cuda, dml and webgpu are only checked structurally on a machine without them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BuildError
from ..toolrun import ToolRun, run_tool
from .base import Backend, Built, Details, Log, Naming, NativeType, OptionError, type_table
from .support import named_for_tools

# The builder's precisions (-p) with approximate bits per weight, for size estimates only.
ONNX_TYPES = type_table(NativeType("fp32", "fp32", 32.0), NativeType("fp16", "fp16", 16.0),
                        NativeType("int8", "int8", 8.5), NativeType("int4", "int4", 4.5))
BLOCK_SIZES = (16, 32, 64, 128, 256)
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# recipe target -> (group folder, folder-name prefix, provider named in genai_config.json)
TARGETS: dict[str, tuple[str, str, str | None]] = {
    "cpu": ("cpu_and_mobile", "cpu", None),
    "cuda": ("gpu", "gpu", "cuda"),
    "dml": ("gpu", "dml", "dml"),
    "webgpu": ("gpu", "webgpu", "webgpu"),
}
# The unquantized model int4/int8 variants are quantized from: what the builder's own int4/int8
# pass starts from on that target (fp32 activations on CPU, fp16 on GPU EPs).
# Checked for cpu and cuda (same nodes, same weight bytes); dml and webgpu use the builder's one pass.
BASE_PRECISION = {"cpu": "fp32", "cuda": "fp16"}
# recipe algo -> the builder's algo_config ("default" is the builder's round-to-nearest)
ALGOS = {"rtn": "default", "k_quant": "k_quant"}
# The builder, run with one fix: 0.18 takes *any* Linear whose out_features equals vocab_size for
# the LM head, so a model whose fused gate_up_proj happens to be vocab_size wide (the bundled
# tiny-phi3: 2 x 512 = 1024) gets its logits wired to layer 0's MLP. Here only the model's own
# lm_head is. inspect_folder checks the wiring of every build either way.
BUILDER = """
import runpy, torch
import onnxruntime_genai.models  # puts the builder's folder on sys.path: it imports `builders`
from builders.base import Model
upstream = Model.has_lm_head
def has_lm_head(self, module):
    head = getattr(self.weights, "lm_head", None)
    return module is head if isinstance(head, torch.nn.Module) else upstream(self, module)
Model.has_lm_head = has_lm_head
runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
"""
# int4/int8 in two steps, each in its own process: the builder's unquantized model for the target
# (BASE_PRECISION, which it streams to disk), then ORT's MatMulNBitsQuantizer on that file, exactly
# what the builder's own int4 pass runs (same nodes, same bytes) but without the builder's source
# weights and unquantized graph in memory at the same time. The base graph is loaded without its
# weights: the quantizer reads each MatMul weight through onnx-ir, which memory-maps it from the
# external data file (resolved from the working directory, hence the chdir), so only the quantized
# weights and the few tensors left unquantized (norms, embeddings) are ever held in memory.
QUANTIZER = """
import os, sys, onnx
from onnx.external_data_helper import load_external_data_for_model
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
src, dst, bits, block_size, symmetric, accuracy_level = sys.argv[1:]
dst = os.path.abspath(dst)
os.chdir(src)
model = onnx.load("model.onnx", load_external_data=False)
quantizer = MatMulNBitsQuantizer(model, bits=int(bits), block_size=int(block_size),
                                 is_symmetric=symmetric == "True", accuracy_level=int(accuracy_level))
quantizer.process()
load_external_data_for_model(quantizer.model.model, ".")  # what stays unquantized comes along
os.chdir(dst)  # onnx.save looks for an existing data file relative to the working directory
onnx.save(quantizer.model.model, "model.onnx", save_as_external_data=True,
          all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
"""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")


def quant_settings(target: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe's int4/int8 options with defaults filled in (Microsoft's: rtn, block 32, acc 4 on CPU)."""
    return {"algo": "rtn", "block_size": 32, "accuracy_level": 4 if target == "cpu" else 0,
            "is_symmetric": True, "quantize_embeddings": False, **options}


def builder_options(native: str, target: str, options: Mapping[str, Any]) -> list[str]:
    """``--extra_options`` for the builder. It ignores keys it does not know, so only these are passed."""
    if native not in ("int4", "int8"):
        return []
    s = quant_settings(target, options)
    extra = [f"is_symmetric={s['is_symmetric']}", f"block_size={s['block_size']}", f"algo_config={ALGOS[s['algo']]}"]
    if s["accuracy_level"]:
        extra.append(f"accuracy_level={s['accuracy_level']}")
    if s["quantize_embeddings"]:
        extra.append("op_types_to_quantize=MatMul,Gather")
    return extra


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the repo and work folders share a temporary folder: no second copy of the weights
    except OSError:
        shutil.copyfile(src, dst)


@dataclass(frozen=True)
class OnnxDetails(Details):
    provider: str  # the execution provider genai_config.json names ("cpu" for none)
    builder: str  # how it was built, e.g. "-p int4 -e cuda"
    extra_options: list[str]
    peak_rss_bytes: int
    adds_bos: bool  # the source's HF tokenizer adds BOS (ORT GenAI's never does)
    bos_token_id: int | None
    fp32_seconds: float | None = None  # two-step builds: the base (fp32/fp16) step, then the quantizer
    fp32_peak_rss_bytes: int | None = None
    quantize_seconds: float | None = None
    quantize_peak_rss_bytes: int | None = None


@dataclass
class _BaseBuild:
    """A target's unquantized model of one ``build`` call, made once and shared by its variants."""

    target: str
    folder: Path
    run: ToolRun | None = None

    @property
    def precision(self) -> str:
        return BASE_PRECISION[self.target]


class OnnxBackend(Backend):
    name = "onnx"
    extra = "onnx"
    library_name = "onnxruntime-genai"
    tags = ("onnx", "onnxruntime-genai")
    required_modules = ("onnxruntime_genai", "onnx")
    targets = tuple(TARGETS)
    default_target = "cpu"
    precisions = {t.name: t.name for t in ONNX_TYPES.values()}
    native_types = ONNX_TYPES
    options = {"block_size": int, "accuracy_level": int, "is_symmetric": bool, "algo": str,
               "quantize_embeddings": bool}
    naming = Naming(repo="{model}-onnx", path="{group}/{variant}")
    template = "onnx.md.j2"

    def check_options(self, native: str, target: str, options: Mapping[str, Any]) -> None:
        if native not in ("int4", "int8"):
            if options:
                raise OptionError(f"onnx {native} takes no options (got {', '.join(options)}); "
                                  f"they apply to int4 and int8")
            return
        s = quant_settings(target, options)
        if s["algo"] not in ALGOS:
            raise OptionError(f"onnx option algo: '{s['algo']}' is not one of {', '.join(ALGOS)}")
        if s["block_size"] not in BLOCK_SIZES:
            raise OptionError(f"onnx option block_size: {s['block_size']} is not one of "
                              f"{', '.join(map(str, BLOCK_SIZES))}")
        if s["accuracy_level"] not in ACCURACY_LEVELS:
            raise OptionError(f"onnx option accuracy_level: {s['accuracy_level']} is not from 0 (unset) to 4")

    def slug(self, native: str, target: str, options: Mapping[str, Any]) -> str:
        _, prefix, _ = TARGETS[target]
        name = f"{prefix}-{native}"
        if native in ("int4", "int8"):
            s = quant_settings(target, options)
            name += f"-{s['algo'].replace('_', '')}-block-{s['block_size']}"
            name += f"-acc-level-{s['accuracy_level']}" if s["accuracy_level"] else ""
            name += "" if s["is_symmetric"] else "-asym"
            name += "-qemb" if s["quantize_embeddings"] else ""
        return name

    def group(self, target: str) -> str:
        return TARGETS[target][0]

    def tool_versions(self) -> dict[str, str]:
        from importlib.metadata import version

        return {pkg: version(pkg) for pkg in ("onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir")}

    def build(self, snapshot, variants, repo_dir: Path, workdir: Path, log: Log) -> dict[str, Built]:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        bos = {"adds_bos": hf_tokenizer_adds_bos(snapshot.path), "bos_token_id": snapshot.config.get("bos_token_id")}
        bases: dict[str, _BaseBuild] = {}
        # one target's base build on disk at a time; its quantized variants before the one that takes the base
        # build's files as hard links (onnx refuses to read external data through a file with several links)
        order = sorted(variants, key=lambda v: (list(TARGETS).index(v.target), not self.two_step(v)))
        built = {}
        for i, v in enumerate(order):
            out = repo_dir / v.path
            out.mkdir(parents=True, exist_ok=True)
            base = bases.setdefault(v.target, _BaseBuild(v.target, workdir / f"{v.target}-base"))
            if self.two_step(v):
                details = self._quantize_base(snapshot, v, out, base, workdir, env, log)
            elif v.native == BASE_PRECISION.get(v.target) and not v.options:
                run = self._base(snapshot, base, workdir, env, log)
                for f in base.folder.iterdir():
                    _link_or_copy(f, out / f.name)
                details = {"builder": f"-p {base.precision} -e {v.target}", "extra_options": [], "seconds": run.seconds,
                           "peak_rss_bytes": run.peak_rss_bytes}
            else:
                extra = builder_options(v.native, v.target, v.options)
                run = self._run_builder(snapshot, v.id, v.native, v.target, extra, out, workdir, env, log)
                details = {"builder": f"-p {v.native} -e {v.target}", "extra_options": extra, "seconds": run.seconds,
                           "peak_rss_bytes": run.peak_rss_bytes}
            if base.run and all(later.target != v.target for later in order[i + 1:]):
                shutil.rmtree(base.folder, ignore_errors=True)  # the variants' own copies are hard links
            for name in TOKENIZER_FILES:  # the source's own files: older loaders read them, the builder re-saves
                if (snapshot.path / name).is_file():
                    (out / name).unlink(missing_ok=True)  # may be a link to the shared base build
                    shutil.copyfile(snapshot.path / name, out / name)
            files = sorted(f.relative_to(repo_dir).as_posix() for f in out.rglob("*") if f.is_file())
            seconds = details.pop("seconds")
            log(f"{v.id}: built in {seconds:.1f} s, peak RSS {details['peak_rss_bytes'] / 2**20:.0f} MiB")
            built[v.id] = Built(files, seconds, OnnxDetails(provider=TARGETS[v.target][2] or "cpu", **details, **bos))
        return built

    @staticmethod
    def two_step(v) -> bool:
        """int4/int8 with the builder's default quantizer: the target's base model first, then quantized."""
        s = quant_settings(v.target, v.options) if v.native in ("int4", "int8") else {}
        return bool(s) and v.target in BASE_PRECISION and s["algo"] == "rtn" and not s["quantize_embeddings"]

    def _run_builder(self, snapshot, vid: str, native: str, target: str, extra: list[str], out: Path, workdir: Path,
                     env: dict[str, str], log: Log) -> ToolRun:
        source = named_for_tools(snapshot.path, workdir)
        cmd = [sys.executable, "-c", BUILDER, "-i", str(source), "-o", str(out), "-p", native, "-e", target,
               "-c", str(workdir / "cache")]
        cmd += ["--extra_options", *extra] if extra else []
        log(f"{vid}: onnxruntime-genai builder -p {native} -e {target} {' '.join(extra)}")
        return run_tool(cmd, workdir / f"{vid}.log", what=f"the onnxruntime-genai builder for {vid}", log=log, env=env,
                        check=(out / "genai_config.json").is_file)

    def _base(self, snapshot, base: _BaseBuild, workdir: Path, env: dict[str, str], log: Log) -> ToolRun:
        if base.run is None:
            base.run = self._run_builder(snapshot, base.folder.name, base.precision, base.target, [], base.folder,
                                         workdir, env, log)
        return base.run

    def _quantize_base(self, snapshot, v, out: Path, base: _BaseBuild, workdir: Path, env: dict[str, str],
                       log: Log) -> dict[str, Any]:
        first = self._base(snapshot, base, workdir, env, log)
        s = quant_settings(v.target, v.options)
        bits = 4 if v.native == "int4" else 8
        log(f"{v.id}: MatMulNBitsQuantizer on the {base.precision} model: {bits} bits, block {s['block_size']}, "
            f"accuracy level {s['accuracy_level']}, {'symmetric' if s['is_symmetric'] else 'asymmetric'}")
        cmd = [sys.executable, "-c", QUANTIZER, str(base.folder), str(out), str(bits), str(s["block_size"]),
               str(s["is_symmetric"]), str(s["accuracy_level"])]
        run = run_tool(cmd, workdir / f"{v.id}.log", what=f"quantizing {v.id}", log=log, env=env,
                       check=(out / "model.onnx").is_file)
        for f in base.folder.iterdir():  # genai_config.json (the same as the builder's int4 one), tokenizer files
            if not f.name.startswith("model.onnx"):
                shutil.copyfile(f, out / f.name)
        return {"seconds": round(run.seconds + first.seconds, 2),
                "peak_rss_bytes": max(run.peak_rss_bytes, first.peak_rss_bytes),
                "builder": f"-p {base.precision} -e {v.target}, then onnxruntime's MatMulNBitsQuantizer",
                "extra_options": builder_options(v.native, v.target, v.options),
                "fp32_seconds": first.seconds, "fp32_peak_rss_bytes": first.peak_rss_bytes,
                "quantize_seconds": run.seconds, "quantize_peak_rss_bytes": run.peak_rss_bytes}

    def inspect(self, snapshot, variant, repo_dir: Path) -> dict[str, Any]:
        return inspect_folder(repo_dir / variant.path, variant.native, variant.target)

    def load(self, variant, repo_dir: Path):
        if variant.target != "cpu":
            return None  # cuda, dml and webgpu variants are checked structurally on this machine
        return OrtGenAIRuntime(repo_dir / variant.path)



def inspect_folder(folder: Path, native: str, target: str) -> dict[str, Any]:
    """The graph loads in onnx, genai_config.json names the target's provider, the ops fit the precision."""
    import onnx

    problems = [f"missing {name}" for name in ("genai_config.json", "tokenizer.json") if not (folder / name).is_file()]
    config = json.loads((folder / "genai_config.json").read_text()) if (folder / "genai_config.json").is_file() else {}
    decoder = config.get("model", {}).get("decoder", {})
    model_file = folder / decoder.get("filename", "model.onnx")
    if not model_file.is_file():
        raise BuildError(f"{folder.name}: no model file {model_file.name}; " + "; ".join(problems))
    graph = onnx.load(str(model_file), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    for init in graph.initializer:  # every external tensor must point at a file that is there
        for entry in init.external_data:
            if entry.key == "location" and not (folder / entry.value).is_file():
                problems.append(f"initializer {init.name} points at missing {entry.value}")
                break
    providers = sorted({k for opts in decoder.get("session_options", {}).get("provider_options", []) for k in opts})
    expected_provider = TARGETS[target][2]
    if providers != ([expected_provider] if expected_provider else []):
        problems.append(f"genai_config.json names providers {providers}, expected {expected_provider or 'none (cpu)'}")
    quantized = native in ("int4", "int8")
    if quantized and not ops["MatMulNBits"]:
        problems.append(f"no MatMulNBits node in a {native} model")
    if not quantized and ops["MatMulNBits"]:
        problems.append(f"{ops['MatMulNBits']} MatMulNBits nodes in a {native} model")
    if not any(ops[op] for op in ("GroupQueryAttention", "MultiHeadAttention", "Attention")):
        problems.append("no attention node (GroupQueryAttention, MultiHeadAttention or Attention)")
    producers = {out: n for n in graph.node for out in n.output}
    head = producers.get("logits")
    while head is not None and not head.name.startswith("/lm_head/MatMul"):  # past Cast/Add/… to the MatMul
        head = producers.get(head.input[0])
    norm = producers.get(head.input[0]) if head is not None else None
    if norm is None or "final_norm" not in norm.name:
        problems.append(f"the LM head reads {head.input[0] if head is not None else '?'}, not the final norm's output")
    logits = next((o for o in graph.output if o.name == "logits"), None)
    logits_type = onnx.TensorProto.DataType.Name(logits.type.tensor_type.elem_type) if logits else None
    if logits_type is None:
        problems.append("the graph has no logits output")
    if problems:
        raise BuildError(f"{folder.name}: " + "; ".join(problems))
    return {"provider": expected_provider or "cpu", "model_file": model_file.name, "nodes": len(graph.node),
            "ops": dict(sorted(ops.items())), "logits_dtype": logits_type, "model_type": config["model"].get("type"),
            "bytes": sum(f.stat().st_size for f in folder.iterdir() if f.is_file()),
            "tokenizer_adds_bos": hf_tokenizer_adds_bos(folder)}


def hf_tokenizer_adds_bos(folder: Path) -> bool:
    """Whether the Hugging Face tokenizer in ``folder`` starts every encoding with BOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok.bos_token_id is not None and tok("a").input_ids[:1] == [tok.bos_token_id]


class OrtGenAIRuntime:
    """A CPU variant in onnxruntime-genai. Its tokenizer never adds BOS: prepended here exactly
    when the model's Hugging Face tokenizer adds it (``tokenizer_adds_bos`` in the inspection)."""

    def __init__(self, folder: Path):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(folder))
        self.tokenizer = og.Tokenizer(self.model)
        self.config = json.loads((folder / "genai_config.json").read_text())["model"]
        bos = self.config.get("bos_token_id")
        self.prefix = [int(bos)] if bos is not None and hf_tokenizer_adds_bos(folder) else []

    def tokenize(self, text: str) -> list[int]:
        return self.prefix + [int(i) for i in self.tokenizer.encode(text)]

    def detokenize(self, ids: Sequence[int]) -> str:
        # token by token through a tokenizer stream, as onnxruntime-genai's own examples print answers
        # (``Tokenizer.decode`` of one special token alone returns U+FFFD; the stream shows nothing)
        stream = self.tokenizer.create_stream()
        return "".join(stream.decode(int(i)) for i in ids)

    def stop_ids(self) -> set[int]:
        eos = self.config.get("eos_token_id")  # the generator is done at any of these
        return {int(i) for i in (eos if isinstance(eos, list) else [eos] if eos is not None else [])}

    def _generator(self, ids: Sequence[int], max_length: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens([list(ids)])
        return generator

    def top1(self, ids: Sequence[int]) -> list[int]:
        return [int(i) for i in self.logits(ids).argmax(-1)]

    def logits(self, ids: Sequence[int]):
        import numpy as np

        logits = self._generator(ids, len(ids) + 1).get_output("logits")
        if logits.shape[1] != len(ids):
            raise BuildError(f"the model returned logits for {logits.shape[1]} of {len(ids)} positions")
        return np.asarray(logits[0], dtype=np.float32)

    def generate(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        generator = self._generator(ids, len(ids) + max_new_tokens)
        out: list[int] = []
        while len(out) < max_new_tokens and not generator.is_done():
            generator.generate_next_token()
            out.append(int(generator.get_next_tokens()[0]))
            if out[-1] in stop_ids:
                break
        return out

    def close(self) -> None:
        del self.tokenizer, self.model
