"""Which architecture each format's tool can build, as data (like gguf-py's constants.py).

One ``Architecture`` per ``config.json`` ``architectures[0]`` a family meets on the Hub, with what
each format's tool knows it as (llama.cpp's converter registration, the onnxruntime-genai builder's
architecture string, optimum-intel's model type, mlx-lm's model module) and its restrictions.
The table mirrors the pinned tools' sources (onnxruntime-genai 0.18 ``builder.py``, the llama.cpp
converter of llama-cpp-python 0.3.36, optimum-intel 2.2, mlx-lm 0.31); ``tests/test_support.py``
checks every row against the installed tools, so a tool upgrade that changes support fails there.

hubbot validates every variant against the source run in transformers and never runs remote code:
an architecture transformers cannot load natively cannot be validated, so nothing of it is built.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LONG_CONTEXT = "long_context"  # max_position_embeddings != original_max_position_embeddings (the 128k configs)


@dataclass(frozen=True)
class FormatSupport:
    tool_name: str  # what the tool calls it (see each format's check in tests/test_support.py)
    targets: tuple[str, ...] | None = None  # None: every target of the format
    precision_classes: tuple[str, ...] | None = None  # None: every precision
    requires: str | None = None  # a config condition, e.g. LONG_CONTEXT
    restriction: str = ""  # the restriction in words, for plans and cards
    broken: str = ""  # why the pinned tool fails on what it claims to build (tests/test_arch_fixtures.py checks it)
    # why the tool's runtime computes something other than transformers' model: it builds, and validation
    # measures how far it is; a variant that fails names this as the cause
    differs: str = ""


@dataclass(frozen=True)
class Architecture:
    name: str  # config.json architectures[0], as Hub repos write it
    model_type: str  # config.json model_type
    native_in_transformers: bool  # transformers loads it without remote code (the reference needs it)
    formats: Mapping[str, FormatSupport] = field(default_factory=dict)
    why_not: Mapping[str, str] = field(default_factory=dict)  # format -> why its tool cannot build it
    text_only: bool = True  # False: a multimodal model (hubbot builds text models only)
    aliases: tuple[str, ...] = ()  # other spellings of ``name`` in config.json (transformers' own class name)


ONNX_PHIMOE_BROKEN = ("onnxruntime-genai 0.18's builder cannot build PhiMoE: its Phi3MoELongRoPEModel has no "
                      "LongRoPE rope setup (NotImplementedError: longrope) and reads the experts as transformers 4 "
                      "held them (one module per expert under layer.block_sparse_moe), which transformers 5 fuses into "
                      "layer.mlp.experts")
PHIMOE_ROUTING = ("llama.cpp's and mlx-lm's PhiMoE weight the two chosen experts by a softmax normalised over "
                  "them, where transformers (Microsoft's sparsemixer routing, the reference) weights each by a "
                  "softmax over the experts near it, about 1 apiece; on the tiny PhiMoE fixture even the F16 "
                  "file is ~1.2 nats a token of mean KL divergence from the source")
ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture(
        "Phi3ForCausalLM", "phi3", True,
        formats={"gguf": FormatSupport("Phi3ForCausalLM"), "onnx": FormatSupport("Phi3ForCausalLM"),
                 "openvino": FormatSupport("phi3"), "mlx": FormatSupport("phi3")},
    ),
    # the Hub's Phi-3.5-MoE, llama.cpp and onnxruntime-genai write PhiMoEForCausalLM; transformers 5 names the
    # class PhimoeForCausalLM and writes that when it saves a model (a fine-tune's config.json)
    Architecture(
        "PhiMoEForCausalLM", "phimoe", True, aliases=("PhimoeForCausalLM",),
        formats={
            "gguf": FormatSupport("PhiMoEForCausalLM", differs=PHIMOE_ROUTING),
            "onnx": FormatSupport("PhiMoEForCausalLM", targets=("cuda",), precision_classes=("int4",),
                                  requires=LONG_CONTEXT,
                                  restriction="onnxruntime-genai builds PhiMoE for CUDA in int4 only, and only from "
                                              "long-context (LongRoPE) configs: MoE runs on CUDA only in ONNX Runtime",
                                  broken=ONNX_PHIMOE_BROKEN),
            "openvino": FormatSupport("phimoe"), "mlx": FormatSupport("phimoe", differs=PHIMOE_ROUTING),
        },
    ),
    Architecture(
        "PhiForCausalLM", "phi", True,
        formats={"gguf": FormatSupport("PhiForCausalLM"), "onnx": FormatSupport("PhiForCausalLM"),
                 "openvino": FormatSupport("phi"), "mlx": FormatSupport("phi")},
    ),
    # the tools' own support is kept for the record (and checked): hubbot still builds none of these
    Architecture(
        "Phi3SmallForCausalLM", "phi3small", False,
        formats={"onnx": FormatSupport("Phi3SmallForCausalLM"), "mlx": FormatSupport("phi3small")},
        why_not={"gguf": "llama.cpp's converter has no Phi3SmallForCausalLM",
                 "openvino": "optimum-intel has no phi3small export"},
    ),
    Architecture(
        "Phi3VForCausalLM", "phi3_v", False, text_only=False,
        formats={"onnx": FormatSupport("Phi3VForCausalLM", restriction="the text part only"),
                 "openvino": FormatSupport("phi3_v", restriction="as image-text-to-text")},
        why_not={"gguf": "llama.cpp's converter has no Phi3VForCausalLM", "mlx": "mlx-lm has no phi3_v (mlx-vlm has)"},
    ),
    Architecture(
        "Phi4MMForCausalLM", "phi4mm", False, text_only=False,
        formats={"onnx": FormatSupport("Phi4MMForCausalLM", restriction="the text part only"),
                 "openvino": FormatSupport("phi4mm", restriction="as image-text-to-text")},
        why_not={"gguf": "llama.cpp's converter has no Phi4MMForCausalLM", "mlx": "mlx-lm has no phi4mm (mlx-vlm has)"},
    ),
    Architecture(
        "Phi4FlashForCausalLM", "phi4flash", False,
        why_not={"gguf": "llama.cpp's converter has no Phi4FlashForCausalLM",
                 "onnx": "onnxruntime-genai's builder has no Phi4FlashForCausalLM",
                 "openvino": "optimum-intel has no phi4flash export", "mlx": "mlx-lm has no phi4flash"},
    ),
)}


ALIASES: dict[str, str] = {alias: a.name for a in ARCHITECTURES.values() for alias in a.aliases}


def canonical_architecture(architecture: str | None) -> str | None:
    """The table's name for a config.json architecture (``PhimoeForCausalLM`` -> ``PhiMoEForCausalLM``)."""
    return ALIASES.get(architecture, architecture) if architecture is not None else None


def named_for_tools(folder: Path, workdir: Path) -> Path:
    """``folder`` as the tools that dispatch on config.json's architecture name (llama.cpp's converter, the
    onnxruntime-genai builder) know it: ``folder`` itself, or, when its config.json spells the architecture
    by an alias (transformers 5's ``PhimoeForCausalLM``), a folder in ``workdir`` that links every file
    but config.json, written with the table's name."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    written = (config.get("architectures") or [None])[0]
    if canonical_architecture(written) == written:
        return folder
    staged = workdir / f"{folder.name}-as-{canonical_architecture(written)}"
    staged.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.name != "config.json" and not (staged / f.name).exists():
            (staged / f.name).symlink_to(f.resolve())
    config["architectures"] = [canonical_architecture(written), *config["architectures"][1:]]
    (staged / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return staged


def _long_context(config: Mapping[str, Any]) -> bool:
    original = config.get("original_max_position_embeddings")
    return original is not None and config.get("max_position_embeddings") != original


CONDITIONS = {LONG_CONTEXT: (_long_context, "a long-context (LongRoPE) config")}


def architecture_unsupported(architecture: str | None) -> str | None:
    """Why nothing of ``architecture`` can be built, or None."""
    if architecture is None:
        return None
    arch = ARCHITECTURES.get(canonical_architecture(architecture))
    if arch is None:
        return f"{architecture} is not in hubbot's support table (hubbot/backends/support.py)"
    if not arch.native_in_transformers:
        multimodal = " is a multimodal model (hubbot builds text models only) and" if not arch.text_only else ""
        return (f"{architecture}{multimodal} needs trust_remote_code in transformers, which hubbot never runs "
                f"(the validation reference cannot be computed)")
    return None


def variant_unsupported(architecture: str | None, fmt: str, target: str, precision_class: str,
                        config: Mapping[str, Any] | None = None) -> str | None:
    """Why ``fmt``'s tool cannot build this variant of ``architecture``, or None when it can (or the
    architecture is not known yet, e.g. a Hub source before its config is read)."""
    whole = architecture_unsupported(architecture)
    if whole or architecture is None:
        return whole
    arch = ARCHITECTURES[canonical_architecture(architecture)]
    support = arch.formats.get(fmt)
    if support is None:
        return arch.why_not.get(fmt, f"the {fmt} tool has no {architecture}")
    if support.targets is not None and target not in support.targets:
        return support.restriction or f"{fmt} builds {architecture} only for {', '.join(support.targets)}"
    if support.precision_classes is not None and precision_class not in support.precision_classes:
        return support.restriction or f"{fmt} builds {architecture} only in {', '.join(support.precision_classes)}"
    if support.requires and config is not None:
        holds, words = CONDITIONS[support.requires]
        if not holds(config):
            return support.restriction or f"{fmt} builds {architecture} only from {words}"
    return support.broken or None


def known_difference(architecture: str | None, fmt: str) -> str:
    """Why ``fmt``'s runtime cannot match transformers on ``architecture`` ('' when it can)."""
    arch = ARCHITECTURES.get(canonical_architecture(architecture) or "")
    support = arch.formats.get(fmt) if arch else None
    return support.differs if support else ""
