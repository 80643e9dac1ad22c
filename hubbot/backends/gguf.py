"""GGUF for llama.cpp: convert once with llama.cpp's own converter, quantize with llama.cpp.

The converter (``convert_hf_to_gguf.py`` with its ``conversion`` and ``gguf-py`` packages) ships
in the llama-cpp-python sdist; it is fetched from the package index into a cache on first use,
for exactly the installed llama-cpp-python version, and run in a subprocess. All variants are
quantized from one F16/BF16 (or F32) intermediate.

A variant with the ``imatrix`` option (a calibration text: ``hf://datasets/…`` or a path relative
to the recipe) is quantized with an importance matrix: llama.cpp's own ``llama-imatrix`` and
``llama-quantize``, built once from the same sdist (``hubbot.llamacpp_tools``), compute one
matrix per calibration text on the intermediate and quantize with it; the matrix is published
beside the GGUF files as ``<model>.imatrix`` (llama.cpp's GGUF imatrix format; not named
``.gguf``, so apps that list a repo's models do not offer it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..calibration import calibration_file, parse_calibration
from ..errors import BuildError
from ..metrics import window_batches
from ..paths import cache_root
from ..sdist import fetch_sdist_files
from ..source import chat_template, config_dtype
from ..toolrun import run_tool
from .base import Backend, Built, Details, Log, Naming, NativeType, OptionError, type_table
from .support import canonical_architecture, named_for_tools

# GGUF's file types hubbot makes, with approximate bits per weight (llama.cpp's quantize table).
# IQ1_S/IQ1_M are left out: below 2 bits no threshold class fits them.
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
    NativeType("IQ3_M", "int3", 3.66),
    NativeType("IQ3_S", "int3", 3.44),
    NativeType("IQ3_XS", "int3", 3.3),
    NativeType("IQ3_XXS", "int3", 3.06),
    NativeType("IQ2_M", "int2", 2.7),
    NativeType("IQ2_S", "int2", 2.5),
    NativeType("IQ2_XS", "int2", 2.31),
    NativeType("IQ2_XXS", "int2", 2.06),
)
# what llama.cpp's quantizer refuses to make without an importance matrix (llama-quant.cpp)
NEEDS_IMATRIX = frozenset({"IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ3_XXS"})
# types whose quantization takes no importance matrix (it would change nothing)
IGNORES_IMATRIX = frozenset({"F32", "F16", "BF16", "Q8_0"})
# the tensor type most weights of a file type are stored as, where its name does not say
MAIN_TENSOR_TYPE = {"IQ2_M": "IQ2_S", "IQ2_S": "IQ2_XS", "IQ3_M": "IQ3_S", "IQ3_XS": "IQ3_S"}
IMATRIX_CONTEXT = 512  # tokens per chunk: llama-imatrix's default
# support-table architecture -> general.architecture llama.cpp's converter writes for it (gguf-py's MODEL_ARCH_NAMES)
GGUF_ARCHITECTURES: dict[str, str] = {"Phi3ForCausalLM": "phi3", "PhiMoEForCausalLM": "phimoe",
                                      "PhiForCausalLM": "phi2"}
INTERMEDIATE_OUTTYPE = {"F32": "f32", "BF16": "bf16", "F16": "f16"}
SMALL_MODEL_BYTES = 512 * 2**20
# tokens of several sequences to one forward pass: all the prompts, or one held-text window. Four
# windows to a pass would save three reads of an out-of-core model, whose held text is bound by
# compute anyway, for ~2 GiB more at phi-4 (2048 tokens of 100k-vocabulary logits and attention)
TOKENS_PER_PASS = 512
MAX_SEQUENCES = 64  # per llama.cpp context (its own limit, LLAMA_MAX_SEQ, is 256)
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
    imatrix: str | None = None  # the importance matrix it was quantized with (a file of the repo)
    calibration: str | None = None  # the text that matrix was computed on, as the recipe names it
    imatrix_seconds: float | None = None


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


def intermediate_type(natives: set[str], source_dtype: str | None) -> str:
    """The converter's --outtype every variant is quantized from: F32 when a variant needs it, the
    variants' own type when they all are one unquantized type (the conversion is then the variant
    and no intermediate is kept), else the source's bf16, else f16."""
    if "F32" in natives:
        return "f32"
    if len(natives) == 1 and (only := next(iter(natives))) in INTERMEDIATE_OUTTYPE:
        return INTERMEDIATE_OUTTYPE[only]
    return "bf16" if source_dtype == "bfloat16" else "f16"


def is_the_conversion(variants: Sequence[Any]) -> bool:
    """Whether building these GGUF variants is the converter's output alone, moved into place (one
    unquantized type, no options): no intermediate beside the output on disk."""
    natives = {v.native for v in variants}
    return (len(natives) == 1 and next(iter(natives)) in INTERMEDIATE_OUTTYPE
            and not any(v.options for v in variants))


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
    options = {"pure": bool, "leave_output_tensor": bool, "imatrix": str}
    naming = Naming(repo="{model}-GGUF", path="{model}-{quant}.gguf")
    template = "gguf.md.j2"

    def tool_versions(self) -> dict[str, str]:
        version = llama_cpp_version()
        return {"llama-cpp-python": version, "llama.cpp converter": f"llama-cpp-python {version} sdist"}

    def check_options(self, native: str, target: str, options: Mapping[str, Any]) -> None:
        calibration = options.get("imatrix")
        if calibration is None:
            if native in NEEDS_IMATRIX:
                raise OptionError(f"{native} needs an importance matrix: add options: {{imatrix: <calibration text>}} "
                                  "(hf://datasets/<owner>/<name>/<file>, or a path relative to the recipe)")
            return
        if native in IGNORES_IMATRIX:
            raise OptionError(f"gguf option imatrix: {native} is not quantized with an importance matrix; "
                              "drop the option")
        try:
            parse_calibration(calibration)
        except ValueError as e:
            raise OptionError(f"gguf option imatrix: {e}") from None

    def slug(self, native: str, target: str, options: Mapping[str, Any]) -> str:
        # the calibration text is recorded in the variant, not spelled into its id
        others = {k: v for k, v in options.items() if k != "imatrix"}
        slug = super().slug(native, target, others)
        return f"{slug}-imatrix" if "imatrix" in options else slug

    def build(self, snapshot, variants, repo_dir: Path, workdir: Path, log: Log) -> dict[str, Built]:
        outtype = intermediate_type({v.native for v in variants}, config_dtype(snapshot.config))
        calibrations = _calibrations(variants, snapshot, log)  # before the conversion: a missing text fails fast
        intermediate = workdir / f"{snapshot.ref.model_name}-{outtype.upper()}.gguf"
        converted = self._convert(snapshot, intermediate, outtype, workdir, log)
        matrices = {spec: _imatrix(intermediate, text, repo_dir / _imatrix_path(snapshot, spec, calibrations),
                                   workdir, log)
                    for spec, text in calibrations.items()}
        built = {}
        # the conversion's own variants last, and the last of them takes the file itself: a job that
        # builds only F16 never holds two 2-byte-per-parameter copies (phi-4: 29 GB, not 58)
        itself = [v for v in variants if v.native.lower() == outtype and not v.options]
        for v in [v for v in variants if v not in itself] + itself:
            out = repo_dir / v.path
            out.parent.mkdir(parents=True, exist_ok=True)
            spec = v.options.get("imatrix")
            matrix = matrices.get(spec)
            if v in itself:
                log(f"{v.id}: the {outtype.upper()} conversion itself")
                (shutil.move if v is itself[-1] else shutil.copyfile)(intermediate, out)
                seconds, peak = 0.0, converted.peak_rss_bytes
            elif matrix:
                run = _quantize_with_imatrix(intermediate, out, v, matrix.path, workdir, log)
                seconds, peak = run.seconds, run.peak_rss_bytes
            else:
                run = _quantize(intermediate, out, v, workdir, log)
                seconds, peak = run.seconds, run.peak_rss_bytes
            imatrix = {"imatrix": matrix.path.relative_to(repo_dir).as_posix(), "calibration": spec,
                       "imatrix_seconds": matrix.seconds} if matrix else {}
            # the matrix is one of the files of each variant made with it, so a fanned-out build carries it too
            files = [v.path, imatrix["imatrix"]] if matrix else [v.path]
            built[v.id] = Built(files, seconds, GGUFDetails(outtype.upper(), converted.seconds,
                                                          converted.peak_rss_bytes, peak, **imatrix))
        return {v.id: built[v.id] for v in variants}

    def _convert(self, snapshot, out: Path, outtype: str, workdir: Path, log: Log):
        conv = converter_dir(log)
        override = workdir / "gguf-metadata.json"
        metadata = {"general.name": snapshot.ref.model_name}
        if snapshot.license and not snapshot.card_data.get("license"):
            metadata["general.license.name"] = snapshot.license  # the converter reads license from the card only
        if snapshot.base_model:
            metadata["general.source.repo_url"] = f"https://huggingface.co/{snapshot.base_model}"
        override.write_text(json.dumps(metadata))
        source = named_for_tools(snapshot.path, workdir)
        cmd = [sys.executable, str(conv / "convert_hf_to_gguf.py"), str(source), "--outfile", str(out),
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


@dataclass(frozen=True)
class ImportanceMatrix:
    path: Path
    seconds: float


def _calibrations(variants, snapshot, log: Log) -> dict[str, Path]:
    """Each calibration text the variants name, on this machine; llama.cpp's tools built when one is named."""
    specs = list(dict.fromkeys(v.options["imatrix"] for v in variants if "imatrix" in v.options))
    if not specs:
        return {}
    from ..llamacpp_tools import tools_dir

    recipe_dir = snapshot.ref.family.path.parent
    texts = {spec: calibration_file(spec, recipe_dir) for spec in specs}
    tools_dir(log)  # built (or found) now, before the source is converted
    return texts


def _imatrix_path(snapshot, spec: str, calibrations: dict[str, Path]) -> str:
    """``<model>.imatrix``; with several calibration texts, each matrix named after its text too."""
    name = snapshot.ref.model_name
    if len(calibrations) == 1:
        return f"{name}.imatrix"
    return f"{name}-{calibrations[spec].stem}.imatrix"


def _imatrix(intermediate: Path, text: Path, out: Path, workdir: Path, log: Log) -> ImportanceMatrix:
    """llama-imatrix over ``text`` with the intermediate: one importance matrix for every variant that names it."""
    from ..llamacpp_tools import tool

    log(f"computing the importance matrix of {intermediate.name} on {text.name}")
    # the matrix records the text's name as given: run beside it, so that is not a path of this machine
    cmd = [str(tool("llama-imatrix")), "-m", str(intermediate), "-f", text.name, "-o", str(out),
           "--output-format", "gguf", "--ctx-size", str(IMATRIX_CONTEXT), "--parse-special", "--no-ppl",
           "--threads", str(_threads(intermediate))]
    run = run_tool(cmd, workdir / f"imatrix-{out.stem}.log", what="llama.cpp's llama-imatrix", log=log,
                   progress=None, check=out.is_file, cwd=text.parent)
    return ImportanceMatrix(out, run.seconds)


def _quantize_with_imatrix(src: Path, dst: Path, variant, matrix: Path, workdir: Path, log: Log):
    from ..llamacpp_tools import tool

    log(f"{variant.id}: quantizing {src.name} → {variant.native} with the importance matrix {matrix.name}")
    flags = ["--pure"] * bool(variant.options.get("pure"))
    flags += ["--leave-output-tensor"] * bool(variant.options.get("leave_output_tensor"))
    # the GGUF records the matrix's name as given (quantize.imatrix.file): run beside it, for no local path
    cmd = [str(tool("llama-quantize")), *flags, "--imatrix", matrix.name, str(src), str(dst), variant.native,
           str(os.cpu_count() or 1)]
    return run_tool(cmd, workdir / f"quantize-{variant.native}-imatrix.log",
                    what=f"llama-quantize to {variant.native} with an importance matrix", log=log, check=dst.is_file,
                    cwd=matrix.parent)


def _threads(model: Path) -> int:
    # on a small model llama.cpp's spinning worker threads are slower than one (measured: 0.4 ms vs
    # 245 ms a token on 2 cores)
    return 1 if model.stat().st_size < SMALL_MODEL_BYTES else os.cpu_count() or 1


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
    expected_arch = GGUF_ARCHITECTURES.get(canonical_architecture(source_arch))
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
    main_type = MAIN_TENSOR_TYPE.get(native) or re.sub(r"_[SML]$", "", native)
    if main_type not in tensor_types:
        problems.append(f"no tensor is stored as {main_type}: {tensor_types}")
    if problems:
        raise BuildError(f"{path.name}: " + "; ".join(problems))
    return info


class LlamaCppRuntime:
    """A GGUF file loaded in llama-cpp-python. Forward passes run in llama.cpp contexts of their own,
    several sequences to one pass (``top1_all``, ``window_logits``, ``generate_all``): a model too big
    for the page cache (phi-4's 29 GB F16 on a 24 GB machine) is read from disk once per pass, so a
    pass per prompt and per generated token would cost hours, where one per decoding step of all the
    prompts together costs minutes."""

    def __init__(self, path: Path, tokens_per_pass: int = TOKENS_PER_PASS):
        from llama_cpp import Llama

        self.threads = _threads(path)
        self.tokens_per_pass = tokens_per_pass
        # the Llama object tokenizes and holds the (mmap'd) weights; its own context runs nothing
        self.llm = Llama(model_path=str(path), n_ctx=256, n_batch=1, n_ubatch=1, verbose=False,
                         n_threads=1, n_threads_batch=1, seed=0)

    def tokenize(self, text: str) -> list[int]:
        # add_bos=True means "add the model's special tokens": llama.cpp adds BOS only when
        # the GGUF's tokenizer.ggml.add_bos_token says so, as the HF tokenizer does.
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.llm.detokenize(list(ids), special=True).decode("utf-8", errors="replace")

    def stop_ids(self) -> set[int]:
        import llama_cpp

        # llama.cpp ends generation at every end-of-generation token: eos, eot and the ones it
        # recognises by name from the GGUF's vocabulary (<|end|>, <|im_end|> …)
        vocab = self.llm._model.vocab
        return {i for i in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, i)}

    def top1(self, ids: Sequence[int]) -> list[int]:
        return self.top1_all([ids])[0]

    def top1_all(self, sequences: Sequence[Sequence[int]]) -> list[list[int]]:
        """``top1`` of every sequence, several sequences to a forward pass."""
        return [[int(i) for i in logits.argmax(-1)] for logits in self.window_logits(sequences)]

    def logits(self, ids: Sequence[int]):
        [logits] = self.window_logits([ids])
        return logits

    def window_logits(self, parts: Sequence[Sequence[int]]) -> Iterator[Any]:
        """Each part's logits at every position (float32 numpy), about ``tokens_per_pass`` tokens of
        parts to one forward pass; one part × vocabulary is copied out at a time."""
        import numpy as np

        for group in window_batches(parts, self.tokens_per_pass, most=MAX_SEQUENCES):
            n = sum(len(p) for p in group)
            with _Context(self.llm, n, len(group), self.threads) as ctx:
                ctx.decode([(t, pos, seq, True) for seq, p in enumerate(group) for pos, t in enumerate(p)])
                start = 0
                for p in group:
                    yield np.array(ctx.logits(start, len(p)))
                    start += len(p)

    def generate(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        return self.generate_all([ids], [max_new_tokens], stop_ids)[0]

    def generate_all(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
                     stop_ids: Sequence[int] = (), on_step: Callable[[int], None] = lambda n: None
                     ) -> list[list[int]]:
        """Greedy ``generate`` of every prompt (``max_new_tokens`` each), in one context: one pass
        prefills every prompt, then each pass decodes the next token of every prompt still going.
        ``on_step(n)`` follows the n-th token."""
        if len(prompts) > MAX_SEQUENCES:
            return [g for i in range(0, len(prompts), MAX_SEQUENCES)
                    for g in self.generate_all(prompts[i: i + MAX_SEQUENCES], max_new_tokens[i: i + MAX_SEQUENCES],
                                               stop_ids, on_step)]
        out: list[list[int]] = [[] for _ in prompts]
        limits = [max(1, n) for n in max_new_tokens]
        capacity = sum(len(p) + n for p, n in zip(prompts, limits))
        with _Context(self.llm, capacity, len(prompts), self.threads,
                      batch=max(sum(map(len, prompts)), len(prompts))) as ctx:
            ctx.decode([(t, pos, seq, pos == len(p) - 1) for seq, p in enumerate(prompts) for pos, t in enumerate(p)])
            going = list(range(len(prompts)))
            step = 0
            while going:
                logits = ctx.logits(0, len(going))
                for row, seq in enumerate(going):
                    out[seq].append(int(logits[row].argmax()))
                step += 1
                on_step(step)
                going = [s for s in going if out[s][-1] not in stop_ids and len(out[s]) < limits[s]]
                if going:
                    ctx.decode([(out[s][-1], len(prompts[s]) + len(out[s]) - 1, s, True) for s in going])
        return out

    def close(self) -> None:
        self.llm.close()


class _Context:
    """A llama.cpp context of its own on a loaded model: ``sequences`` sequences (own KV cells each,
    in one unified cache of ``tokens`` cells), and up to ``batch`` tokens (default: all) decoded in
    one physical batch, so one ``decode`` reads the weights once."""

    def __init__(self, llm, tokens: int, sequences: int, threads: int, batch: int | None = None):
        import llama_cpp
        from llama_cpp._internals import LlamaContext

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = tokens
        params.n_batch = params.n_ubatch = batch or tokens
        params.n_seq_max = sequences
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        # as llama-cpp-python's Llama runs by default: flash attention rounds q to f16 on the CPU
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._api, self._n_vocab = llama_cpp, llm.n_vocab()
        # llama-cpp-python's own wrapper frees the context once, and before its model, even when a
        # generator holding it is collected after the runtime was closed
        self._owner = LlamaContext(model=llm._model, params=params, verbose=False)
        self.ctx = self._owner.ctx

    def __enter__(self) -> _Context:
        return self

    def __exit__(self, *exc) -> None:
        self._owner.close()

    def decode(self, rows: Sequence[tuple[int, int, int, bool]]) -> None:
        """One forward pass over (token, position, sequence, wants logits) rows."""
        api = self._api
        batch = api.llama_batch_init(len(rows), 0, 1)
        try:
            for i, (token, pos, seq, wanted) in enumerate(rows):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, wanted
                batch.seq_id[i][0] = seq
            batch.n_tokens = len(rows)
            if (rc := api.llama_decode(self.ctx, batch)) != 0:
                raise RuntimeError(f"llama_decode failed ({rc}) on a batch of {len(rows)} tokens")
        finally:
            api.llama_batch_free(batch)

    def logits(self, start: int, count: int):
        """The last decode's logits for its outputs ``start`` … ``start + count - 1``, in batch order
        (a view into llama.cpp's buffer, valid until the next decode)."""
        import numpy as np

        rows = self._api.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(rows, shape=(start + count, self._n_vocab))[start:]
