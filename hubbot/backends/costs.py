"""What each build and validation step costs in memory and disk: data for ``hubbot.preflight``.

One frozen dataclass per step, keyed by format and step, in the style of gguf-py's
``constants.py``. Every factor is per parameter of the source model (plus a fixed part) and
says where it comes from.

Memory is counted as the out-of-memory killer counts it: **anonymous** memory of the process tree
(RssAnon). Memory-mapped weights (the safetensors source the tools and the reference read, the
GGUF llama.cpp maps) are file-backed pages the kernel can drop; they make a run slower when they
do not fit, not kill it, and are not in these numbers.

Measured with ``benchmarks/scale.py`` (results in benchmarks/results/) on a random-weight
Phi3ForCausalLM of Phi-3.5-mini's exact shape (3.82B parameters, bf16, 7.6 GB), one ``hubbot build
--variant`` per variant on 2 cores with other jobs running, 2026-12-01. Rows marked "not measured"
are guesses that lean high. Not a format: ``hubbot.backends.REGISTRY`` lists the formats.
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
    ram_fixed_bytes: int  # may be negative (a line fitted between two sizes); ram() is never below 0
    disk_bytes_per_param: float = 0.0

    def ram(self, parameters: int) -> int:
        return max(0, int(parameters * self.ram_bytes_per_param + self.ram_fixed_bytes))

    def disk(self, parameters: int) -> int:
        return int(parameters * self.disk_bytes_per_param)


@dataclass(frozen=True)
class RuntimeCost:
    """The built variant loaded in its own runtime for validation, as a multiple of its file size."""

    what: str
    file_factor: float
    fixed_bytes: int
    targets: tuple[str, ...] | None = None  # the targets validation runs (the others are checked structurally)
    native_factors: tuple[tuple[str, float], ...] = ()  # native types held differently (e.g. repacked)

    def ram(self, file_bytes: int, native: str = "") -> int:
        factor = dict(self.native_factors).get(native, self.file_factor)
        return int(file_bytes * factor + self.fixed_bytes)


# --- validation: the source model in transformers, plus the variant in its own runtime ------------
# The dtype the reference loads the source in; None: the source's own, memory-mapped by
# transformers (hubbot.reference): measured 0.37 GB anonymous for the whole process at 3.8B (7.7 GB
# file-backed). "F32" is the old fp32 copy (15.1 GB at 3.8B, 4 B/param), kept for comparison.
REFERENCE_DTYPE: str | None = None
# anonymous memory of a memory-mapped reference beyond the process: activations and logits
REFERENCE_MAPPED_BYTES_PER_PARAM = 0.02
# The hubbot process itself (Python, torch, transformers imported), under every step: the
# reference process peaked at 0.37 GB at 3.8B, tool processes at 0.3-0.5 GB on tiny models.
PROCESS_BYTES = GB // 2

# bytes per element of safetensors dtypes (the names safetensors headers and the Hub use)
DTYPE_BYTES: dict[str, float] = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}


# --- build steps ---------------------------------------------------------------------------------
# Each measured number is the step's own process-tree peak (hubbot.toolrun) at 3.8B; the factor
# adds PROCESS_BYTES on top, so it leans a little high.
STEPS: dict[tuple[str, str], ToolCost] = {
    # llama.cpp's convert_hf_to_gguf.py streams tensors: 1.30 GiB at 3.8B (86-111 s). Disk: the
    # F16/BF16 intermediate, 2 B/param (F32 when an F32 variant is asked for).
    ("gguf", "convert"): ToolCost("llama.cpp's converter to F16/BF16", 0.1, GB, 2.0),
    ("gguf", "convert-f32"): ToolCost("llama.cpp's converter to F32", 0.1, GB, 4.0),
    # llama.cpp's quantizer BF16 -> Q4_K_M: 0.5 GiB at 3.8B (210-346 s).
    ("gguf", "quantize"): ToolCost("llama.cpp's quantizer", 0.02, GB // 10),
    # The builder's fp32 model (step 1 of CPU int4/int8, and the cpu fp32 variant): 2.3 GiB at 3.8B;
    # it writes a 15.3 GB fp32 ONNX file (4.0 B/param).
    ("onnx", "builder-fp32"): ToolCost("the onnxruntime-genai builder's fp32 model", 0.5, 3 * GB // 10, 4.0),
    # ORT's MatMulNBitsQuantizer reading the fp32 weights memory-mapped (step 2): 3.3 GiB at 3.8B
    # for int4 (the largest of the two steps); int8 holds twice the quantized bytes: not measured.
    ("onnx", "quantizer"): ToolCost("ORT's quantizer (fp32 weights memory-mapped)", 0.75, 3 * GB // 10),
    # int4/int8 in one builder pass (dml/webgpu, k_quant, quantized embeddings): not measured in
    # anonymous memory; the old total-RSS slope (2.0 GB at 200M, 5.5 GB at 700M params, 7.3 B/param).
    ("onnx", "builder-quantized"): ToolCost("the onnxruntime-genai builder quantizing in one pass", 7.3, GB // 2),
    # The builder's fp16 model (step 1 of CUDA int4/int8, and cuda fp16): assumed like fp32.
    ("onnx", "builder-fp16"): ToolCost("the onnxruntime-genai builder's fp16 model", 0.5, 3 * GB // 10, 2.0),
    # optimum-cli export openvino int4: 3.07 GB at 3.8B (130 s), 17.53 GB (16.33 GiB) at phi-4's 14.66B
    # (144 s): it grows faster than the parameters, so the factor is a line through both (1.45 B/param
    # less 2.4 GB: 3.6 GB and 19.4 GB with the process, both leaning high). int8: 4.28 GB at 3.8B, 1.4x
    # int4's; at 14.66B not measured, taken as int4's line times that ratio (26.8 GB: over a 24 GiB
    # machine). It stages the model in TMPDIR (~2 B/param), which hubbot points at --workdir.
    ("openvino", "export-int4"): ToolCost("optimum-intel's OpenVINO export (int4)", 1.45, -24 * GB // 10, 2.0),
    ("openvino", "export-int8"): ToolCost("optimum-intel's OpenVINO export (int8)", 2.0, -3 * GB, 2.0),
    # fp16/fp32 exports: not measured; guesses above int8 (the fp32 torch model is traced whole).
    ("openvino", "export-fp16"): ToolCost("optimum-intel's OpenVINO export (fp16)", 2.0, GB // 2, 2.0),
    ("openvino", "export-fp32"): ToolCost("optimum-intel's OpenVINO export (fp32)", 4.0, GB // 2, 2.0),
    # mlx_lm.convert: 2.78 GiB at 3.8B (36 s). It writes only the variant's own folder.
    ("mlx", "convert"): ToolCost("mlx_lm.convert", 0.6, GB // 5),
}

# --- the variant in its runtime during validation, on top of the process and the reference --------
# Fitted at 3.8B on the whole build-and-validate run's anonymous peak minus PROCESS_BYTES (where the
# build step was higher, that bounds the runtime from above).
RUNTIMES: dict[str, RuntimeCost] = {
    # llama.cpp maps the file (Q8_0, 4.1 GB file: the run peaked at 1.34 GiB, its converter's 1.3), but
    # repacks 4-bit types for the CPU in anonymous buffers (Q4_K_M, 2.4 GB file: 2.19 GiB)
    "gguf": RuntimeCost("the variant in llama.cpp", 0.1, GB // 10,
                        native_factors=(("Q4_0", 0.75), ("Q4_K_S", 0.75), ("Q4_K_M", 0.75), ("IQ4_NL", 0.75))),
    # cpu-int4 (2.1 GB file): the run peaked at 3.69 GiB (its build step: 3.3 GiB); cpu-fp32 (15.3 GB file):
    # 14.36 GiB, ORT holds the fp32 weights in anonymous memory (file pages are mapped beside them)
    "onnx": RuntimeCost("the variant in onnxruntime-genai", 1.5, GB // 5, targets=("cpu",),
                        native_factors=(("fp32", 1.0), ("fp16", 1.0))),
    # int4_asym (2.2 GB file): the run peaked at 3.19 GiB (its export: 2.86 GiB); int8_asym (3.9 GB):
    # 4.37 GiB (export 3.99 GiB); one compiled model at a time (GenAI to generate, Core to score)
    "openvino": RuntimeCost("the variant in OpenVINO", 1.2, GB // 4, targets=("cpu",)),
    # mlx-4bit (2.1 GB file): the run peaked at 3.18 GiB, mlx-8bit (4.1 GB file) at 4.74 GiB, validating
    # on MLX's CPU backend. phi-4 (14.66B): mlx-4bit (8.25 GB file) 13.71 GiB, mlx-8bit (15.58 GB) 18.65
    # GiB — fp32 scales for the CPU kernel (+0.9 GB either way, so 4-bit weighs more per file byte) and
    # the dequantize + matmul path's blocks on top (benchmarks/results/README.md)
    "mlx": RuntimeCost("the variant in MLX", 1.3, GB // 10, native_factors=(("4bit", 1.75),)),
}
