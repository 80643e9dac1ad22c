"""MLX for Apple silicon: convert with mlx-lm, one subprocess per variant, validate in MLX.

MLX runs on Apple silicon (Metal); the bot builds and checks the variants on MLX's Linux CPU
backend (``mlx[cpu]``), which runs the same weights. Two things make that backend slow, and
``MLXRuntime`` works around both (measured at phi-4's 5120 × 17920, 2 cores):

- the ``mlx-cpu`` wheel bundles netlib's reference BLAS: a 128-row fp32 matmul runs at 2.5
  GFLOP/s, against 94 with OpenBLAS. When the system has OpenBLAS (Debian/Ubuntu:
  ``libopenblas0``) it is loaded first, globally, so MLX's ``cblas_sgemm`` resolves to it — as an
  MLX built from source against OpenBLAS would (``fast_blas``);
- its quantized matmul is a single-threaded loop (~2 GFLOP/s whatever the BLAS). With a fast
  BLAS, a quantized layer fed ``WIDE_ROWS`` rows or more (a teacher-forced pass, a batch of
  held-text windows) is run as MLX's own ``mx.dequantize`` followed by a BLAS matmul, a block of
  rows at a time (``wide_matmul``): the same weights, 4× faster at 128 rows and more so beyond.
  Decoding (a row per prompt) keeps the quantized kernel.
  Teacher-forced passes, held-text windows and greedy generations are batched (``top1_all``,
  ``window_logits``, ``generate_all``), so a 14B model is dequantized three times per
  validation, not once per prompt and window.

Two things differ from the source as transformers runs it, and are handled or reported here:

- transformers 5 writes rope settings only under ``rope_parameters``, while mlx-lm's ``phi3``
  reads top-level ``rope_theta`` / ``partial_rotary_factor`` / ``rope_scaling`` and silently
  falls back to defaults. The converted config gets the top-level keys back (``mlx_config``).
- longrope (128k-context Phi): mlx-lm always rotates with ``long_factor``; transformers uses
  ``short_factor`` until the sequence exceeds ``original_max_position_embeddings``. On short
  prompts such a model cannot match transformers exactly; the card says so (``rope_note``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from ..errors import BuildError
from ..metrics import right_padded, window_batches
from ..source import config_dtype, safetensors_tensors
from ..toolrun import run_tool
from .base import Backend, Built, Details, Log, Naming, NativeType, OptionError, type_table

# mlx-lm's types with approximate bits per weight (16-bit scales and biases, group 64). Mixed
# predicates keep v_proj/down_proj of some layers and lm_head at the high bit width
# (mlx-lm's mixed_quant_predicate_builder).
MLX_TYPES = type_table(
    NativeType("fp32", "fp32", 32.0),
    NativeType("bf16", "bf16", 16.0),
    NativeType("fp16", "fp16", 16.0),
    NativeType("8bit", "int8", 8.5),
    NativeType("6bit", "int6", 6.5),
    NativeType("5bit", "int5", 5.5),
    NativeType("4bit", "int4", 4.5),
    NativeType("3bit", "int3", 3.5),
    NativeType("mixed_4_6", "int4", 5.0),
    NativeType("mixed_3_6", "int3", 4.0),
    NativeType("mixed_3_4", "int3", 3.8),
    NativeType("mixed_2_6", "int2", 3.2),
)
# how mlx_lm.convert makes each type
CONVERT_SETTINGS: dict[str, dict[str, Any]] = {
    "fp32": {"dtype": "float32"}, "bf16": {"dtype": "bfloat16"}, "fp16": {"dtype": "float16"},
    "8bit": {"bits": 8}, "6bit": {"bits": 6}, "5bit": {"bits": 5}, "4bit": {"bits": 4}, "3bit": {"bits": 3},
    "mixed_4_6": {"bits": 4, "high_bits": 6}, "mixed_3_6": {"bits": 3, "high_bits": 6},
    "mixed_3_4": {"bits": 3, "high_bits": 4}, "mixed_2_6": {"bits": 2, "high_bits": 6},
}
GROUP_SIZES = (32, 64, 128)  # what MLX's affine quantization accepts
DEFAULT_GROUP_SIZE = 64
DTYPES = ("float16", "bfloat16", "float32")
# The source's tokenizer files are copied over mlx-lm's re-saved ones (older loaders read them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
SKIPPED_OUTPUTS = ("README.md",)  # hubbot writes the card


def mlx_config(config: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The config with the top-level rope keys mlx-lm reads; also the keys that were added."""
    config = dict(config)
    rope = config.get("rope_parameters") or {}
    added = []
    for key in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings"):
        if key in rope and key not in config:
            config[key] = rope[key]
            added.append(key)
    rope_type = rope.get("rope_type") or rope.get("type")
    if rope_type not in (None, "default") and not config.get("rope_scaling"):
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor", "rope_type")}
        config["rope_scaling"] = {**scaling, "type": rope_type}
        added.append("rope_scaling")
    return config, added


def rope_note(config: dict[str, Any]) -> str:
    """Why MLX cannot match transformers exactly for this config ('' when it can)."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = scaling.get("type") or scaling.get("rope_type")
    if kind in ("longrope", "su") and scaling.get("long_factor") != scaling.get("short_factor"):
        return ("longrope: mlx-lm always rotates with long_factor, while transformers uses short_factor up to "
                f"{config.get('original_max_position_embeddings', '?')} tokens, so on short prompts this model's "
                "logits differ from the source's in transformers (a limit of mlx-lm, not of the quantization)")
    return ""


def _source_dtype(config: dict) -> str | None:
    dtype = config_dtype(config)
    return dtype if dtype in DTYPES else None


@dataclass(frozen=True)
class MLXDetails(Details):
    bits: int | None
    high_bits: int | None
    group_size: int | None
    mode: str | None
    dtype: str | None  # of the unquantized parts; None: as the source
    convert_seconds: float
    peak_rss_bytes: int
    bits_per_weight: float | None  # as mlx_lm.convert reported it
    rope_fixed: list[str]  # rope keys repeated at the top level of config.json for mlx-lm
    rope_note: str  # why MLX cannot match transformers exactly ('' when it can)


class MLXBackend(Backend):
    name = "mlx"
    extra = "mlx"
    library_name = "mlx"
    tags = ("mlx",)
    required_modules = ("mlx", "mlx_lm")
    targets = ("apple",)  # built and validated on MLX's Linux CPU backend
    default_target = "apple"
    precisions = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "int8": "8bit", "int4": "4bit"}
    native_types = MLX_TYPES
    # group_size: 32, 64 or 128; dtype: float16 | bfloat16 | float32 for the unquantized parts
    # of a quantized variant (default: the source's dtype, as mlx-lm does)
    options = {"group_size": int, "dtype": str}
    naming = Naming(repo="{model}-{quant}", path="")  # mlx-community style, files at the repo root
    template = "mlx.md.j2"

    def tool_versions(self) -> dict[str, str]:
        return {"mlx": version("mlx"), "mlx-lm": version("mlx-lm")}

    def require(self) -> None:
        fast_blas()  # before the import check loads mlx.core with its bundled BLAS
        super().require()

    def check_options(self, native: str, target: str, options: Mapping[str, Any]) -> None:
        if "group_size" in options and options["group_size"] not in GROUP_SIZES:
            raise OptionError(f"mlx group_size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                              f"got {options['group_size']}")
        if "dtype" in options and options["dtype"] not in DTYPES:
            raise OptionError(f"mlx dtype must be one of {', '.join(DTYPES)}, got {options['dtype']!r}")

    def _settings(self, native: str, options: Mapping[str, Any], config: dict) -> dict[str, Any]:
        spec = CONVERT_SETTINGS[native]
        group_size = options.get("group_size", DEFAULT_GROUP_SIZE)
        dtype = spec.get("dtype") or options.get("dtype") or _source_dtype(config)
        if "bits" not in spec:
            return {"bits": None, "high_bits": None, "group_size": None, "mode": None, "dtype": dtype}
        return {"bits": spec["bits"], "high_bits": spec.get("high_bits"), "group_size": group_size,
                "mode": "affine", "dtype": dtype}

    def build(self, snapshot, variants, repo_dir: Path, workdir: Path, log: Log) -> dict[str, Built]:
        return {v.id: self._build_one(snapshot, v, repo_dir, workdir, log) for v in variants}

    def _build_one(self, snapshot, v, repo_dir: Path, workdir: Path, log: Log) -> Built:
        settings = self._settings(v.native, v.options, snapshot.config)
        tmp_out = workdir / f"mlx-{v.id}"  # mlx_lm.convert refuses an existing folder
        shutil.rmtree(tmp_out, ignore_errors=True)
        cmd = [sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(snapshot.path), "--mlx-path", str(tmp_out)]
        if settings["bits"]:
            cmd += ["-q", "--q-bits", str(settings["bits"]), "--q-group-size", str(settings["group_size"])]
            if settings["high_bits"]:
                cmd += ["--quant-predicate", v.native]
        if settings["dtype"]:
            cmd += ["--dtype", settings["dtype"]]
        log(f"{v.id}: mlx_lm.convert {' '.join(cmd[8:])}")
        log_file = workdir / f"mlx-{v.id}.log"
        run = run_tool(cmd, log_file, what=f"mlx_lm.convert for {v.id}", log=log,
                       check=(tmp_out / "config.json").is_file)
        output = log_file.read_text(errors="replace")

        config, rope_fixed = mlx_config(json.loads((tmp_out / "config.json").read_text()))
        (tmp_out / "config.json").write_text(json.dumps(config, indent=4, sort_keys=True) + "\n")
        for name in TOKENIZER_FILES:
            if (snapshot.path / name).is_file():
                shutil.copyfile(snapshot.path / name, tmp_out / name)
        dest = repo_dir / v.path
        dest.mkdir(parents=True, exist_ok=True)
        files = []
        for f in sorted(tmp_out.iterdir()):
            if f.is_file() and f.name not in SKIPPED_OUTPUTS:
                shutil.move(f, dest / f.name)
                files.append((Path(v.path) / f.name).as_posix())
        shutil.rmtree(tmp_out, ignore_errors=True)
        bpw = re.search(r"Quantized model with ([\d.]+) bits per weight", output)
        bpw = float(bpw.group(1)) if bpw else None
        # time and memory go to the log, not the card: a rebuild must give identical files
        log(f"{v.id}: converted in {run.seconds:.1f} s, peak RSS {run.peak_rss_bytes / 2**20:.0f} MiB"
            + (f", {bpw} bits per weight" if bpw else ""))
        return Built(files, run.seconds, MLXDetails(**settings, convert_seconds=run.seconds,
                                                   peak_rss_bytes=run.peak_rss_bytes, bits_per_weight=bpw,
                                                   rope_fixed=rope_fixed, rope_note=rope_note(config)))

    def inspect(self, snapshot, variant, repo_dir: Path) -> dict[str, Any]:
        folder = repo_dir / variant.path
        settings = self._settings(variant.native, variant.options, snapshot.config)
        config = json.loads((folder / "config.json").read_text())
        quant = config.get("quantization")
        dtypes = _tensor_dtypes(folder)
        problems = []
        if not dtypes:
            problems.append("no .safetensors weights")
        if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()):
            problems.append("no tokenizer.json or tokenizer.model")
        model_type = snapshot.config.get("model_type")
        if config.get("model_type") != model_type:
            problems.append(f"model_type is {config.get('model_type')!r}, expected {model_type!r}")
        if mlx_config(config)[1]:
            problems.append(f"rope settings only under rope_parameters: {mlx_config(config)[1]}")
        layers = {k: q for k, q in (quant or {}).items() if isinstance(q, dict)}
        if settings["bits"]:
            expected = {"bits": settings["bits"], "group_size": settings["group_size"], "mode": "affine"}
            found = {k: (quant or {}).get(k) for k in expected}
            if found != expected:
                problems.append(f"config.json quantization is {found}, expected {expected}")
            high = {q.get("bits") for q in layers.values()} - {settings["bits"]}
            if settings["high_bits"] and high != {settings["high_bits"]}:
                problems.append(f"mixed {variant.native}: no layer at {settings['high_bits']} bits ({high or 'none'})")
            if "U32" not in dtypes:
                problems.append(f"no packed (U32) quantized weights: {dtypes}")
        else:
            if quant:
                problems.append(f"{variant.native} should not be quantized, config.json says {quant}")
            expected_dtype = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}[settings["dtype"]]
            if set(dtypes) - {expected_dtype}:
                problems.append(f"tensors are {dtypes}, expected only {expected_dtype}")
        if problems:
            raise BuildError(f"{variant.id}: " + "; ".join(problems))
        return {"quantization": {k: v for k, v in (quant or {}).items() if not isinstance(v, dict)} or None,
                "per_layer_overrides": len(layers), "tensor_dtypes": dtypes,
                "bytes": sum(f.stat().st_size for f in folder.glob("*.safetensors")),
                "rope_theta": config.get("rope_theta"), "partial_rotary_factor": config.get("partial_rotary_factor"),
                **({"known_difference": note} if (note := rope_note(config)) else {})}

    def load(self, variant, repo_dir: Path):
        return MLXRuntime(repo_dir / variant.path)


def _tensor_dtypes(folder: Path) -> dict[str, int]:
    """Tensor count per dtype, from the safetensors headers (no tensor data is read)."""
    counts: dict[str, int] = {}
    for meta in safetensors_tensors(folder):
        counts[meta["dtype"]] = counts.get(meta["dtype"], 0) + 1
    return counts


WIDE_ROWS = 32  # from here on, dequantize + BLAS beats MLX's quantized CPU kernel (~1.5 s vs ~0.08 s a row)
TOKENS_PER_PASS = 4096  # held-text windows batched into one forward pass, as the reference does


@functools.cache
def fast_blas() -> str | None:
    """Load the system's OpenBLAS globally so MLX's CPU matmuls use it; its file name, or None.
    Decided once per process, at the first call.

    Only works before ``mlx.core`` is first imported (the bundled reference BLAS is bound then):
    a process that imported MLX earlier keeps that one (None)."""
    name = ctypes.util.find_library("openblas")
    if name is None or "mlx.core" in sys.modules or sys.platform != "linux":
        return None
    try:
        ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    return name


WIDE_CHUNK_BYTES = 256 * 2**20  # fp32 weight rows dequantized at a time (phi-4's lm_head alone is 2 GB)


def wide_matmul(layer, x):
    """``x`` times a quantized layer's weight as MLX's dequantize + a BLAS matmul, a block of output
    rows at a time; None when ``x`` has fewer than WIDE_ROWS rows (the quantized kernel is faster)."""
    import mlx.core as mx

    if x.size // x.shape[-1] < WIDE_ROWS:
        return None
    weight, scales, biases = layer["weight"], layer["scales"], layer.get("biases")
    step = max(1, WIDE_CHUNK_BYTES // (4 * x.shape[-1]))
    parts = []
    for i in range(0, weight.shape[0], step):
        block = mx.dequantize(weight[i: i + step], scales[i: i + step], None if biases is None else biases[i: i + step],
                              group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
        parts.append(x @ block.T)
        # evaluated block by block: a lazy graph may dequantize every block before the first matmul
        # (phi-4's lm_head: 8 × 256 MB at once, measured as a 2 GiB spike)
        mx.eval(parts[-1])
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


@functools.cache
def _wide_classes() -> dict[type, type]:
    import mlx.nn as nn

    class WideQuantizedLinear(nn.QuantizedLinear):
        def __call__(self, x):
            y = wide_matmul(self, x)
            if y is None:
                return super().__call__(x)
            return y + self["bias"] if "bias" in self else y

    class WideQuantizedEmbedding(nn.QuantizedEmbedding):  # tied output heads (Phi-4-mini) call as_linear
        def as_linear(self, x):
            y = wide_matmul(self, x)
            return super().as_linear(x) if y is None else y

    return {nn.QuantizedLinear: WideQuantizedLinear, nn.QuantizedEmbedding: WideQuantizedEmbedding}


def dequantize_wide_matmuls(model) -> int:
    """Switch every quantized linear layer (and quantized embedding, for a tied head) of ``model``
    to the dequantize + matmul path for wide inputs (``wide_matmul``); the number switched."""
    wide, count = _wide_classes(), 0
    for _, module in model.named_modules():
        if type(module) in wide:
            module.__class__ = wide[type(module)]
            count += 1
    return count


def output_head(model):
    """The output projection of an mlx-lm model whose logits are ``head(model.model(inputs))`` (the
    Phi family's ``Model.__call__`` in mlx-lm 0.31); None for any other model."""
    kind = getattr(getattr(model, "args", None), "model_type", None)
    if kind == "phi3":
        return model.model.embed_tokens.as_linear if model.args.tie_word_embeddings else model.lm_head
    if kind in ("phi", "phimoe"):
        return model.lm_head
    return None


class MLXRuntime:
    """A converted folder loaded with mlx_lm.load (on this machine: MLX's CPU backend)."""

    def __init__(self, path: Path, wide_matmuls: bool | None = None):
        """``wide_matmuls``: run wide quantized matmuls as dequantize + matmul (None: when the CPU
        backend got a fast BLAS, see ``fast_blas``)."""
        self.blas = fast_blas()
        import mlx.core as mx
        from mlx_lm import load

        self.model, self.tokenizer = load(str(path))
        self.wide_layers = 0
        on_cpu = mx.default_device() == mx.cpu
        if on_cpu:
            # MLX's CPU backend runs quantized matmuls with bf16 scales ~13x slower than with fp32
            # ones (907 vs 69 ms per layer and token at 3.8B): validate with every float tensor
            # (scales, biases, norms, embeddings) in fp32. bf16 values are exact in fp32, so the
            # dequantized weights are the file's; only activations are computed more precisely.
            self.model.set_dtype(mx.float32)
            if self.blas is not None if wide_matmuls is None else wide_matmuls:
                self.wide_layers = dequantize_wide_matmuls(self.model)
        self.note = self._how_it_runs(on_cpu)

    def _how_it_runs(self, on_cpu: bool) -> str:
        if not on_cpu:
            return ""
        if self.blas is None:
            return ("MLX's CPU backend has only its wheel's reference BLAS (~2 GFLOP/s): validating a 3.8B+ model "
                    "takes hours; install OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread)")
        return (f"MLX's CPU backend: BLAS {self.blas}; {self.wide_layers} quantized layers dequantize for "
                f"inputs of {WIDE_ROWS}+ rows")

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))  # the HF tokenizer mlx-lm loads, special tokens added

    def detokenize(self, ids: Sequence[int]) -> str:
        # the streaming detokenizer mlx_lm.generate prints with, not the HF tokenizer under it; made
        # once (each ``TokenizerWrapper.detokenizer`` builds a new one, a pass over the whole vocabulary)
        if not hasattr(self, "_detokenizer"):
            self._detokenizer = self.tokenizer.detokenizer
        detokenizer = self._detokenizer
        detokenizer.reset()
        for i in ids:
            detokenizer.add_token(int(i))
        detokenizer.finalize()
        return detokenizer.text

    def stop_ids(self) -> set[int]:
        return set(self.tokenizer.eos_token_ids)  # what mlx_lm.generate stops at

    def top1(self, ids: Sequence[int]) -> list[int]:
        return self.top1_all([ids])[0]

    def top1_all(self, sequences: Sequence[Sequence[int]]) -> list[list[int]]:
        """``top1`` of every sequence, all in one right-padded forward pass (causal attention keeps
        the padding out of each sequence's own positions)."""
        import mlx.core as mx

        predicted = mx.argmax(self.model(mx.array(right_padded(sequences))), axis=-1).tolist()
        return [row[: len(seq)] for row, seq in zip(predicted, sequences)]

    def window_logits(self, parts: Sequence[Sequence[int]], tokens_per_pass: int = TOKENS_PER_PASS
                      ) -> Iterator[Any]:
        """Each window's logits (float32 numpy), several windows to a right-padded forward pass; where
        the output head is known (``output_head``) it runs one window at a time, so one window ×
        vocab of logits is in memory, not the pass's."""
        import mlx.core as mx
        import numpy as np

        head = output_head(self.model)
        body, head = (self.model, lambda h: h) if head is None else (self.model.model, head)
        for group in window_batches(parts, tokens_per_pass):
            hidden = body(mx.array(right_padded(group)), cache=None)  # phi's inner model has no default
            mx.eval(hidden)
            for row, w in zip(hidden, group):
                yield np.array(head(row[None, : len(w)])[0].astype(mx.float32))
            del hidden

    def logits(self, ids: Sequence[int]):
        return next(self.window_logits([ids]))

    def generate(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        logits = self.model(mx.array([list(ids)]), cache=cache)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(mx.argmax(logits[0, -1]).item())
            out.append(token)
            if token in stop_ids:
                break
            logits = self.model(mx.array([[token]]), cache=cache)
        return out

    def generate_all(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
                     stop_ids: Sequence[int] = (), on_step: Callable[[int], None] = lambda n: None
                     ) -> list[list[int]]:
        """``generate`` of every prompt (``max_new_tokens`` each), batched by mlx-lm's own
        BatchGenerator: one prefill pass for all prompts (wide: dequantized once), then one decoding
        step per token for all. ``on_step(n)`` follows the n-th step."""
        from mlx_lm.generate import BatchGenerator

        generator = BatchGenerator(self.model, stop_tokens=[[t] for t in stop_ids],
                                   prefill_batch_size=len(prompts), completion_batch_size=len(prompts))
        try:
            uids = generator.insert([list(p) for p in prompts], list(max_new_tokens))
            out: dict[int, list[int]] = {uid: [] for uid in uids}
            steps = 0
            while responses := generator.next_generated():
                for r in responses:
                    out[r.uid].append(int(r.token))  # a stop token too, as ``generate`` keeps it
                steps += 1
                on_step(steps)
        finally:
            generator.close()
        return [out[uid] for uid in uids]

    def close(self) -> None:
        import mlx.core as mx

        del self.model
        mx.clear_cache()
