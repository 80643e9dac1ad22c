"""What each build and validation step costs in memory and disk: data for ``hubbot.preflight``.

One frozen dataclass per step, keyed by format and step, in the style of gguf-py's
``constants.py``. Every factor is per parameter of the source model (plus a fixed part) and
says where it comes from. Unless noted, the numbers are the real-size measurements in
shared/toolchain-notes.md: a random-weight Phi3ForCausalLM of Phi-3.5-mini's shape (3.82B
parameters, bf16, 7.6 GB), one ``hubbot build --variant`` per variant on 2 cores, peak RSS of the
process tree; "small models" are the 200M/700M-parameter runs in the same notes. A benchmark
will refine them: until then they lean high, so a refusal means "probably", a pass "likely".

Not a format: ``hubbot.backends.REGISTRY`` lists the formats.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 10**9


@dataclass(frozen=True)
class ToolCost:
    """One build step (one tool process): its peak RAM, and the intermediate files it leaves behind
    until the repo is done (the variant's own files are counted from its size estimate)."""

    what: str  # how the preflight message names the step
    ram_bytes_per_param: float
    ram_fixed_bytes: int
    disk_bytes_per_param: float = 0.0

    def ram(self, parameters: int) -> int:
        return int(parameters * self.ram_bytes_per_param + self.ram_fixed_bytes)

    def disk(self, parameters: int) -> int:
        return int(parameters * self.disk_bytes_per_param)


@dataclass(frozen=True)
class RuntimeCost:
    """The built variant loaded in its own runtime for validation, as a multiple of its file size."""

    what: str
    file_factor: float
    fixed_bytes: int
    targets: tuple[str, ...] | None = None  # the targets validation runs (the others are checked structurally)

    def ram(self, file_bytes: int) -> int:
        return int(file_bytes * self.file_factor + self.fixed_bytes)


# --- validation: the source model in transformers, plus the variant in its own runtime ------------
# The dtype the reference loads the source in; None: the source's own (hubbot.reference since
# b445f1a: memory-mapped, 2 B/param for bf16, file-backed pages that must stay resident to run it).
# "F32" is what the real-size runs measured: the fp32 reference settled at 15.1 GB at 3.8B (4 B/param).
REFERENCE_DTYPE: str | None = None
# The hubbot process itself (Python, torch, transformers imported), under every step. Not
# measured on its own; a typical torch + transformers import.
PROCESS_BYTES = GB // 2

# bytes per element of safetensors dtypes (the names safetensors headers and the Hub use)
DTYPE_BYTES: dict[str, float] = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}


# --- build steps ---------------------------------------------------------------------------------
STEPS: dict[tuple[str, str], ToolCost] = {
    # llama.cpp's convert_hf_to_gguf.py streams tensors: ~1 GB at 3.8B (111 s), ~260 MB on tiny
    # models; 0.1 B/param on top gives the notes' 2-4 GB extrapolation for phi-4 (largest tensor in
    # fp32). Disk: the F16/BF16 intermediate, 2 B/param (F32 when an F32 variant is asked for).
    ("gguf", "convert"): ToolCost("llama.cpp's converter to F16/BF16", 0.1, GB, 2.0),
    ("gguf", "convert-f32"): ToolCost("llama.cpp's converter to F32", 0.1, GB, 4.0),
    # llama_model_quantize BF16 -> Q4_K_M: 576 s at ~1 GB; -> Q8_0: 34 s at ~1 GB.
    ("gguf", "quantize"): ToolCost("llama.cpp's quantizer", 0.1, GB),
    # CPU int4/int8, step 1: the builder's fp32 model, 10.4 GB at 3.8B (2.7 B/param), written to
    # disk as a 15.3 GB fp32 ONNX file (4.0 B/param); also the cpu fp32 variant itself.
    ("onnx", "builder-fp32"): ToolCost("the onnxruntime-genai builder's fp32 model", 2.6, GB // 2, 4.0),
    # CPU int4/int8, step 2: ORT's MatMulNBitsQuantizer. Measured loading the fp32 file whole: 17.7 GB
    # at 3.8B (4.6 B/param). Since 9a8bdd7 it reads the weights memory-mapped, one MatMul at a time:
    # not measured; it holds the quantized weights (int4 ~0.56, int8 ~1.06 B/param), roughly twice
    # while saving, plus the fp32 tensors it leaves (embeddings: ~0.14 B/param at Phi's shapes).
    ("onnx", "quantizer"): ToolCost("ORT's quantizer (fp32 weights memory-mapped)", 2.5, GB // 2),
    # int4/int8 in one builder pass (cuda/dml/webgpu, k_quant, quantized embeddings): small models
    # peaked 2.0 GB at 200M and 5.5 GB at 700M params, ~7 B/param (the notes extrapolate 28 GB at
    # 3.8B); onnx.py's notes put the one-pass peak at about 7.3 B/param.
    ("onnx", "builder-quantized"): ToolCost("the onnxruntime-genai builder quantizing in one pass", 7.3, GB // 2),
    # fp16 in the builder: not measured; assumed like its fp32 model.
    ("onnx", "builder-fp16"): ToolCost("the onnxruntime-genai builder's fp16 model", 2.6, GB // 2),
    # optimum-cli export openvino: int4 9.9 GB at 3.8B (2.6 B/param; small models 1.1 GB at 200M and
    # 2.4 GB at 700M, the same slope), int8 12.2 GB (3.2 B/param). The export writes ~7.3 GB to
    # TMPDIR at 3.8B (~2 B/param), not to --workdir.
    ("openvino", "export-int4"): ToolCost("optimum-intel's OpenVINO export (int4)", 2.6, GB // 2, 2.0),
    ("openvino", "export-int8"): ToolCost("optimum-intel's OpenVINO export (int8)", 3.2, GB // 2, 2.0),
    # fp16/fp32 exports: not measured; guesses above int8 (the fp32 torch model is traced whole).
    ("openvino", "export-fp16"): ToolCost("optimum-intel's OpenVINO export (fp16)", 4.0, GB // 2, 2.0),
    ("openvino", "export-fp32"): ToolCost("optimum-intel's OpenVINO export (fp32)", 6.0, GB // 2, 2.0),
    # mlx_lm.convert: 43 s at 3.1 GB at 3.8B (0.8 B/param; the notes extrapolate ~11 GB for phi-4).
    # It writes only the variant's own folder.
    ("mlx", "convert"): ToolCost("mlx_lm.convert", 0.8, GB // 5),
}

# --- the variant in its runtime during validation, on top of the reference ------------------------
# The measured validation peaks grow with the variant's file (Q4_K_M 19.5 GB < Q8_0 21.6 GB) even
# though validate.py frees the reference's weights before the variant loads, so the two are added:
# validation = process + reference + runtime (whether the freed memory stays with the process is
# for the benchmark to tell). Fitted at 3.8B on top of 15.3 GB (fp32 reference) + 0.5 GB (process).
RUNTIMES: dict[str, RuntimeCost] = {
    # llama.cpp maps the file: Q4_K_M (2.3 GB file) peaked at 19.5 GB, Q8_0 (4.1 GB) at 21.6 GB
    "gguf": RuntimeCost("the variant in llama.cpp", 1.25, 9 * GB // 10),
    # cpu-int4 (2.1 GB file) peaked at 20.8 GB
    "onnx": RuntimeCost("the variant in onnxruntime-genai", 2.0, GB, targets=("cpu",)),
    # int4_asym (2.2 GB file) 22.9 GB, int8_asym (3.9 GB) 22.6 GB; the notes: it loads the model twice
    # (GenAI and Core). 2x leaves int8 3.7 GB high at 3.8B; since b445f1a validation holds one compiled
# model at a time, not measured yet: 2x stays until the benchmark says otherwise
    "openvino": RuntimeCost("the variant in OpenVINO", 2.0, 28 * GB // 10,
                            targets=("cpu",)),
    # mlx-4bit (2.1 GB file) reached 20.7 GB before it was stopped unfinished
    "mlx": RuntimeCost("the variant in MLX", 2.0, GB),
}
