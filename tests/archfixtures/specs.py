"""The two architecture fixtures: shapes, training settings, and what each writes into config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("phimoe", "phi2")

# Phi-2's chat format ("Instruct: …\nOutput:", from its model card) as a template: phi-2 ships none, and
# the Phi recipe validates with chat prompts.
PHI2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Instruct: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Output:' + message['content'] + eos_token + '\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Output:' }}{% endif %}"
)


@dataclass(frozen=True)
class ArchSpec:
    kind: str
    architecture: str  # config.json architectures[0], as the Hub's releases write it
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int
    steps: int
    original_max_position_embeddings: int | None = None  # LongRoPE configs (Phi-3.5-MoE)
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    partial_rotary_factor: float = 1.0
    vocab_size: int | None = None  # None: the tokenizer's size rounded up to 64
    folder_prefix: str = ""  # the cached folder's name starts so (see cache.py)
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 40

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def long_rope_mscale(self) -> float:
        """LongRoPE's attention factor, sqrt(1 + ln(scale) / ln(original context)): what llama.cpp's converter
        computes, and what the fixture's config gives as both short_mscale and long_mscale."""
        scale = self.max_position_embeddings / self.original_max_position_embeddings
        return math.sqrt(1 + math.log(scale) / math.log(self.original_max_position_embeddings))


SPECS: dict[str, ArchSpec] = {
    # small enough to train in minutes on 2 busy cores (400 steps); hidden 256, as llama.cpp's K-quants need rows
    # of a multiple of 256 (narrower ones fall back to Q5_0/Q8_0)
    # Phi-3.5-MoE's layout in miniature: 4 experts, top-2 (sparsemixer), LayerNorm, attention and LM head
    # biases, a LongRoPE (long-context) config, GQA, Phi-3's sentencepiece tokenizer and chat template
    "phimoe": ArchSpec(
        kind="phimoe", architecture="PhiMoEForCausalLM", hidden_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=256, max_position_embeddings=16384,
        original_max_position_embeddings=4096, num_local_experts=4, num_experts_per_tok=2, steps=400,
        folder_prefix="tiny-phi-3.5-moe",
    ),
    # phi-2's in miniature: partial rotary (0.5 of head_dim 64 = 32 rotary dims, phi-1_5's geometry: phi-2's 0.4
    # of head_dim 80 needs a hidden size of a multiple of 80, which K-quants cannot take), biases everywhere,
    # LayerNorm, gelu_new MLP of 4 x hidden, GPT-2's byte-level BPE, vocab padded to 51200
    "phi2": ArchSpec(
        kind="phi2", architecture="PhiForCausalLM", hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=1024, max_position_embeddings=2048, partial_rotary_factor=0.5,
        vocab_size=51200, steps=400, folder_prefix="tiny-phi-2",
    ),
}  # fmt: skip


def spec_for(kind: str) -> ArchSpec:
    if kind not in SPECS:
        raise ValueError(f"unknown architecture fixture kind {kind!r}; expected one of {KINDS}")
    return SPECS[kind]
