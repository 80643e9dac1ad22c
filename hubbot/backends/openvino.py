"""OpenVINO IR for OpenVINO GenAI and optimum-intel: exported with optimum-intel, weights
compressed with NNCF, the tokenizer and detokenizer converted to IR by openvino-tokenizers.

Each variant is one ``optimum-cli export openvino --task text-generation-with-past`` run in its
own subprocess (its time and peak RSS are recorded, its temporary files kept under the workdir),
so one folder holds a complete model that ``openvino_genai.LLMPipeline`` runs on its own. The
default naming puts every precision in its own repo with the files at the root, as the OpenVINO
org does (``{model}-int4-ov``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from ..errors import BuildError
from ..source import chat_template
from ..toolrun import run_tool
from .base import Backend, Built, Details, Log, Naming, NativeType, OptionError, type_table

# native type: (precision class, approximate bits per weight, optimum-cli --weight-format)
OV_TYPES = type_table(
    NativeType("fp32", "fp32", 32.0),
    NativeType("fp16", "fp16", 16.0),
    NativeType("int8_asym", "int8", 8.1),
    NativeType("int8_sym", "int8", 8.05),
    NativeType("int4_asym", "int4", 4.6),  # embeddings and lm_head stay int8 (NNCF's backup mode)
    NativeType("int4_sym", "int4", 4.5),
)
# native type -> optimum-cli --weight-format
WEIGHT_FORMAT = {"fp32": "fp32", "fp16": "fp16", "int8_asym": "int8", "int8_sym": "int8", "int4_asym": "int4",
                 "int4_sym": "int4"}
# the element type NNCF stores each mode's weights in
WEIGHT_TYPE = {"int8_asym": "u8", "int8_sym": "i8", "int4_asym": "u4", "int4_sym": "i4", "fp16": "f16"}
# options -> optimum-cli flag; all of them tune 4-bit compression only
INT4_FLAGS = {"group_size": "--group-size", "ratio": "--ratio", "awq": "--awq",
              "scale_estimation": "--scale-estimation", "gptq": "--gptq", "all_layers": "--all-layers",
              "dataset": "--dataset", "num_samples": "--num-samples", "backup_precision": "--backup-precision"}
DATA_AWARE = ("scale_estimation", "gptq")  # need calibration data: "auto" is built offline from the model
MODEL_FILES = ("openvino_model.xml", "openvino_model.bin")
TOKENIZER_FILES = ("openvino_tokenizer.xml", "openvino_tokenizer.bin",
                   "openvino_detokenizer.xml", "openvino_detokenizer.bin")
# the source's own tokenizer files replace optimum's re-saved ones, so older loaders keep working
SOURCE_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                          "added_tokens.json", "chat_template.jinja")
RT_INFO_KEYS = ("mode", "group_size", "ratio", "awq", "scale_estimation", "gptq", "all_layers", "backup_mode")


@dataclass(frozen=True)
class OpenVINODetails(Details):
    export_seconds: float
    peak_rss_bytes: int
    weight_format: str
    # NNCF's own record of the compression (None for fp16/fp32), see compression_parameters
    mode: str | None = None
    group_size: int | None = None
    ratio: float | None = None
    awq: bool | None = None
    scale_estimation: bool | None = None
    gptq: bool | None = None
    all_layers: bool | None = None
    backup_mode: str | None = None
    dataset: str | None = None


class OpenVINOBackend(Backend):
    name = "openvino"
    extra = "openvino"
    library_name = "openvino"
    tags = ("openvino", "nncf", "optimum-intel", "openvino-genai")
    required_modules = ("optimum.intel", "openvino", "openvino_genai", "openvino_tokenizers", "nncf")
    targets = ("cpu", "gpu", "npu")
    default_target = "cpu"
    precisions = {"fp32": "fp32", "fp16": "fp16", "int8": "int8_asym", "int4": "int4_asym"}
    native_types = OV_TYPES
    options = {"group_size": int, "ratio": float, "awq": bool, "scale_estimation": bool, "gptq": bool,
               "all_layers": bool, "dataset": str, "num_samples": int, "backup_precision": str}
    naming = Naming(repo="{model}-{precision}-ov", path="")
    template = "openvino.md.j2"

    def check_options(self, native: str, target: str, options: Mapping[str, Any]) -> None:
        if options and WEIGHT_FORMAT[native] != "int4":
            raise OptionError(f"options {', '.join(sorted(options))} tune 4-bit compression only, not {native}")

    def tool_versions(self) -> dict[str, str]:
        names = ("optimum-intel", "optimum", "nncf", "openvino", "openvino-tokenizers", "openvino-genai",
                 "transformers", "torch")
        return {n: version(n) for n in names}

    def build(self, snapshot, variants, repo_dir: Path, workdir: Path, log: Log) -> dict[str, Built]:
        return {v.id: self._build_one(snapshot, v, repo_dir, workdir, log) for v in variants}

    def _build_one(self, snapshot, v, repo_dir: Path, workdir: Path, log: Log) -> Built:
        out = workdir / f"export-{v.id}"
        cmd = export_command(snapshot.path, v.native, v.options)
        log(f"{v.id}: exporting with optimum-intel ({' '.join(cmd[3:])})")
        tmp = workdir / "tmp"  # the export stages the whole model in TMPDIR: keep it on --workdir's disk
        tmp.mkdir(exist_ok=True)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TMPDIR": str(tmp)}
        run = run_tool(cmd + [str(out)], workdir / f"export-{v.id}.log", what="optimum-cli export openvino",
                       log=log, env=env, check=(out / MODEL_FILES[0]).is_file)
        log(f"{v.id}: exported in {run.seconds:.1f} s, peak RSS {run.peak_rss_bytes / 2**20:.0f} MiB")
        _tidy(out, snapshot)
        dest = repo_dir / v.path
        dest.mkdir(parents=True, exist_ok=True)
        files = []
        for f in sorted(out.iterdir()):
            shutil.move(str(f), dest / f.name)
            files.append((Path(v.path) / f.name).as_posix())
        compression = compression_parameters(dest / MODEL_FILES[0])
        details = OpenVINODetails(run.seconds, run.peak_rss_bytes, WEIGHT_FORMAT[v.native], **compression,
                                  dataset=_dataset(v.options) if compression.get("mode") else None)
        return Built(files, run.seconds, details)

    def inspect(self, snapshot, variant, repo_dir: Path) -> dict[str, Any]:
        return inspect_ir(repo_dir / variant.path, snapshot, variant.native)

    def load(self, variant, repo_dir: Path):
        import openvino as ov

        device = variant.target.upper()
        if device not in ov.Core().available_devices:
            return None  # e.g. a GPU or NPU variant on a CPU-only runner: checked structurally only
        return OpenVINORuntime(repo_dir / variant.path, device)


def _dataset(options: Mapping[str, Any]) -> str | None:
    if options.get("dataset"):
        return options["dataset"]
    return "auto" if any(options.get(k) for k in DATA_AWARE) else None


def export_command(model_dir: Path, native: str, options: Mapping[str, Any]) -> list[str]:
    """The optimum-cli command line for one variant (options already checked), without the output folder."""
    cmd = [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "openvino", "-m", str(model_dir),
           "--task", "text-generation-with-past", "--weight-format", WEIGHT_FORMAT[native]]
    if native.endswith("_sym"):
        cmd.append("--sym")
    options = {**options, "dataset": _dataset(options)}
    for key, value in options.items():
        if value is True:
            cmd.append(INT4_FLAGS[key])
        elif value not in (False, None):
            cmd += [INT4_FLAGS[key], str(value)]
    return cmd


def _tidy(out: Path, snapshot) -> None:
    """Make the folder independent of this machine: no local paths, the source's tokenizer files."""
    for name in SOURCE_TOKENIZER_FILES:
        if (snapshot.path / name).is_file():
            shutil.copyfile(snapshot.path / name, out / name)
    config = out / "openvino_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        quant = data.get("quantization_config") or {}
        for key, value in quant.items():
            if value == str(snapshot.path):
                quant[key] = snapshot.base_model
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _rt_info(xml: Path) -> ET.Element | None:
    return ET.parse(xml).getroot().find("rt_info")


def compression_parameters(model_xml: Path) -> dict[str, Any]:
    """NNCF's own record of how the weights were compressed (empty for fp16/fp32)."""
    rt = _rt_info(model_xml)
    wc = rt.find("nncf/weight_compression") if rt is not None else None
    if wc is None:
        return {}
    params: dict[str, Any] = {}
    for key in RT_INFO_KEYS:
        node = wc.find(key)
        if node is not None:
            value = node.get("value")
            params[key] = {"True": True, "False": False}.get(value, value)
    for key, kind in (("group_size", int), ("ratio", float)):
        if key in params:
            params[key] = kind(params[key])
    return params


def weight_types(model_xml: Path) -> dict[str, int]:
    """How many weight constants (rank >= 2) are stored in each element type."""
    counts: dict[str, int] = {}
    for layer in ET.parse(model_xml).getroot().iter("layer"):
        data = layer.find("data")
        if layer.get("type") == "Const" and data is not None and data.get("shape", "").count(",") >= 1:
            counts[data.get("element_type")] = counts.get(data.get("element_type"), 0) + 1
    return counts


def inspect_ir(folder: Path, snapshot, native: str) -> dict[str, Any]:
    """Read the IR back and check what OpenVINO GenAI and optimum-intel rely on."""
    problems = [f"{name} is missing" for name in (*MODEL_FILES, *TOKENIZER_FILES, "config.json")
                if not (folder / name).is_file()]
    if problems:
        raise BuildError(f"{folder.name}: " + "; ".join(problems))
    model_xml = folder / MODEL_FILES[0]
    types = weight_types(model_xml)
    params = compression_parameters(model_xml)
    tokenizer_rt = _rt_info(folder / "openvino_tokenizer.xml")
    tok = {child.tag: child.get("value") for child in tokenizer_rt} if tokenizer_rt is not None else {}
    info = {
        "weight_types": types,
        "compression": params,
        "inputs": sorted({layer.get("name") for layer in ET.parse(model_xml).getroot().iter("layer")
                          if layer.get("type") == "Parameter"}),
        "tokenizer_eos_token_id": tok.get("eos_token_id"),
        "tokenizer_has_chat_template": bool(tok.get("chat_template")),
        # openvino-tokenizers may rewrite a template its engine cannot run: recorded, not fatal
        "chat_template_matches_source": tok.get("chat_template") == chat_template(snapshot.path),
        "bytes": sum(f.stat().st_size for f in folder.iterdir() if f.is_file()),
    }
    expected = WEIGHT_TYPE.get(native)
    if expected and expected not in types:
        problems.append(f"no weight is stored as {expected}: {types}")
    if native in ("fp32", "fp16") and {"u4", "i4", "u8", "i8"} & set(types):
        problems.append(f"{native} variant has integer weights: {types}")
    if native == "fp32" and "f16" in types:
        problems.append(f"fp32 variant has f16 weights: {types}")
    if native.startswith("int") and params.get("mode") != native:
        problems.append(f"NNCF recorded mode {params.get('mode')!r}, expected {native!r}")
    if not {"input_ids", "attention_mask", "beam_idx"} <= set(info["inputs"]):
        problems.append(f"not a stateful text-generation-with-past model (inputs {info['inputs']})")
    if snapshot.config.get("eos_token_id") is not None and tok.get("eos_token_id") is None:
        problems.append("the tokenizer IR records no eos_token_id")
    if chat_template(snapshot.path) and not tok.get("chat_template"):
        problems.append("the tokenizer IR has no chat template; the source has one")
    if problems:
        raise BuildError(f"{folder.name}: " + "; ".join(problems))
    return info


class OpenVINORuntime:
    """An IR folder run the way its users run it: OpenVINO GenAI tokenizes and generates.

    ``LLMPipeline`` returns tokens only (it cuts the LM head down to the last position), so the
    teacher-forced ``top1`` sends the same ``openvino_model.xml`` through a plain OpenVINO Core
    infer request, which returns logits at every position in one pass: no second toolchain
    (optimum-intel's OVModelForCausalLM would add transformers' model code) between the file and
    the numbers. Both run with f32 inference and KV-cache precision on CPU: the CPU plugin's
    default is bf16 (u8 KV cache) on CPUs with bf16 units, which would make a variant's result
    depend on the runner's CPU rather than on its file.
    """

    def __init__(self, folder: Path, device: str = "CPU"):
        import openvino as ov
        import openvino_genai as og

        self.ov, self.og = ov, og
        self.folder, self.device = folder, device
        self.config = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"} if device == "CPU" else {}
        self.tokenizer = og.Tokenizer(str(folder))
        self._pipe = self._request = None  # each holds a compiled copy of the weights: only one at a time
        self.inputs: set[str] = set()

    @property
    def request(self):
        if self._request is None:
            self._pipe = None
            model = self.ov.Core().read_model(self.folder / MODEL_FILES[0])
            self.inputs = {i.get_any_name() for i in model.inputs}
            self._request = self.ov.Core().compile_model(model, self.device, self.config).create_infer_request()
        return self._request

    @property
    def pipe(self):
        if self._pipe is None:
            self._request = None
            self._pipe = self.og.LLMPipeline(str(self.folder), self.device, **self.config)
        return self._pipe

    def tokenize(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=True).input_ids.data[0]]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def stop_ids(self) -> set[int]:
        config = self.pipe.get_generation_config()  # generation_config.json, completed from the tokenizer IR
        return {int(i) for i in config.stop_token_ids} | ({config.eos_token_id} if config.eos_token_id >= 0 else set())

    def top1(self, ids: Sequence[int]) -> list[int]:
        return [int(i) for i in self.logits(ids).argmax(-1)]

    def logits(self, ids: Sequence[int]):
        import numpy as np

        n = len(ids)
        feed = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, n), dtype=np.int64),
                "position_ids": np.arange(n, dtype=np.int64)[None], "beam_idx": np.zeros(1, dtype=np.int32)}
        self.request.reset_state()  # the KV cache lives in the request's state
        return np.array(self.request.infer({k: v for k, v in feed.items() if k in self.inputs})["logits"][0],
                        dtype=np.float32)

    def generate(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        import numpy as np

        config = self.og.GenerationConfig()
        config.max_new_tokens = max_new_tokens  # the default is 2**64 - 1
        config.do_sample = False
        config.apply_chat_template = False  # ids are already rendered and tokenized
        config.stop_token_ids = set(stop_ids)
        config.ignore_eos = not stop_ids  # otherwise the pipeline falls back to the model's eos ids
        tensor = np.array([ids], dtype=np.int64)
        inputs = self.og.TokenizedInputs(self.ov.Tensor(tensor), self.ov.Tensor(np.ones_like(tensor)))
        return [int(t) for t in self.pipe.generate(inputs, config).tokens[0]]

    def close(self) -> None:
        self._pipe = self._request = None
        del self.tokenizer
