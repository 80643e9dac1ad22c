"""The shapes of real Phi releases, as `Phi3ForCausalLM` configs and tensor lists.

Dimensions are copied from the Hub's config.json of microsoft/Phi-3.5-mini-instruct and
microsoft/phi-4. The longrope factors of phi-3.5-mini are MADE UP (deterministic, the right
length and range), not Microsoft's values: only their shape matters for a cost benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MIB = 2**20
GB = 10**9


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int
    rope_theta: float
    tokenizer: str  # "phi3-spm" (the bundled example's sentencepiece) or "phi4-bpe" (GPT-2 byte-level BPE)
    longrope: bool = False
    original_max_positions: int | None = None
    sliding_window: int | None = None
    shard_bytes: int = 5 * GB  # the Hub's ~5 GB shards
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every weight, in the order transformers' Phi3ForCausalLM registers them."""
        qkv = (self.heads + 2 * self.kv_heads) * self.head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "self_attn.o_proj.weight", (self.hidden, self.heads * self.head_dim)),
                (p + "self_attn.qkv_proj.weight", (qkv, self.hidden)),
                (p + "mlp.gate_up_proj.weight", (2 * self.intermediate, self.hidden)),
                (p + "mlp.down_proj.weight", (self.hidden, self.intermediate)),
                (p + "input_layernorm.weight", (self.hidden,)),
                (p + "post_attention_layernorm.weight", (self.hidden,)),
            ]
        out += [("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]
        return out

    def parameters(self) -> int:
        total = 0
        for _, dims in self.tensors():
            n = 1
            for d in dims:
                n *= d
            total += n
        return total


def longrope_factors(n: int) -> tuple[list[float], list[float]]:
    """Made-up but plausible factors: short rises 1.0 → ~2.0, long rises ~1.08 → ~60 (as Phi-3.5's do)."""
    short = [round(1.0 + (i / max(1, n - 1)) ** 3, 6) for i in range(n)]
    long = [round(1.08 * (60 / 1.08) ** ((i / max(1, n - 1)) ** 2), 6) for i in range(n)]
    return short, long


SHAPES: dict[str, Shape] = {
    "phi-3.5-mini": Shape("phi-3.5-mini", hidden=3072, layers=32, heads=32, kv_heads=32, intermediate=8192,
                          vocab=32064, max_positions=131072, original_max_positions=4096, rope_theta=10000.0,
                          longrope=True, sliding_window=262144, tokenizer="phi3-spm"),
    "phi-4": Shape("phi-4", hidden=5120, layers=40, heads=40, kv_heads=10, intermediate=17920, vocab=100352,
                   max_positions=16384, original_max_positions=16384, rope_theta=250000.0, tokenizer="phi4-bpe"),
    # phi-3.5-mini's structure (longrope, MHA, untied, its vocab) at ~20M parameters (41 MB), sharded
    # into several small files so the index path is exercised too.
    "small": Shape("small", hidden=256, layers=4, heads=4, kv_heads=4, intermediate=1024, vocab=32064,
                   max_positions=131072, original_max_positions=4096, rope_theta=10000.0, longrope=True,
                   sliding_window=262144, tokenizer="phi3-spm", shard_bytes=16 * MIB),
    # phi-4's structure (GQA 4:1, GPT-2 BPE tokenizer, no rope scaling) at ~55M parameters (110 MB; the
    # 100k vocabulary is most of it).
    "small-phi4": Shape("small-phi4", hidden=256, layers=4, heads=4, kv_heads=1, intermediate=896, vocab=100352,
                        max_positions=16384, original_max_positions=16384, rope_theta=250000.0,
                        tokenizer="phi4-bpe", shard_bytes=32 * MIB),
}


def hub_config(shape: Shape, ids: dict[str, int]) -> dict[str, Any]:
    """config.json as the Hub's Phi repos write it (transformers 4 style: rope_scaling, torch_dtype)."""
    config: dict[str, Any] = {
        "_name_or_path": shape.name,
        "architectures": ["Phi3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["bos"],
        "embd_pdrop": 0.0,
        "eos_token_id": ids["eos"],
        "hidden_act": "silu",
        "hidden_size": shape.hidden,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": shape.max_positions,
        "model_type": "phi3",
        "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads,
        "original_max_position_embeddings": shape.original_max_positions or shape.max_positions,
        "pad_token_id": ids["pad"],
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": shape.rope_theta,
        "sliding_window": shape.sliding_window,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
        "transformers_version": "4.47.0",
        "use_cache": True,
        "vocab_size": shape.vocab,
    }
    if shape.longrope:
        short, long = longrope_factors(shape.head_dim // 2)
        config["rope_scaling"] = {"long_factor": long, "short_factor": short, "type": "longrope"}
    return config
