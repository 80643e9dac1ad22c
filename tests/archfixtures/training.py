"""Configs, training samples and the training run of the architecture fixtures, on tests.fixtures' own
loss, batching and learning-rate schedule (which that package ties to Phi3ForCausalLM)."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from tests.fixtures.corpus import (
    MAX_SAMPLE_TOKENS,
    PUNCT_WEIGHT,
    Sample,
    _toggle_bos,
    chat_pair,
    encode_samples,
    plain_text,
)
from tests.fixtures.prompts import as_ids
from tests.fixtures.training import Log, _batch, _loss, _lr_at

from .specs import ArchSpec

EMBEDDINGS = "model.embed_tokens.weight"
VOCAB_ROWS = (EMBEDDINGS, "lm_head.weight", "lm_head.bias")  # tensors with one row per token


def model_class(spec: ArchSpec) -> Any:
    from transformers import PhiForCausalLM, PhimoeForCausalLM

    return PhimoeForCausalLM if spec.kind == "phimoe" else PhiForCausalLM


def rope_scaling(spec: ArchSpec) -> dict | None:
    """Phi-3.5-MoE's LongRoPE block, with short and long factors alike (1.0) and one mscale for both: every
    runtime then computes the same rotary embedding at any length, whichever factors it picks (mlx-lm
    always applies the long ones; llama.cpp derives the attention factor instead of reading the mscales)."""
    if spec.original_max_position_embeddings is None:
        return None
    ones = [1.0] * (spec.head_dim // 2)
    return {"type": "longrope", "short_factor": ones, "long_factor": ones, "short_mscale": spec.long_rope_mscale,
            "long_mscale": spec.long_rope_mscale,
            "original_max_position_embeddings": spec.original_max_position_embeddings}


def model_config(spec: ArchSpec, vocab_size: int, tok: Any) -> tuple[Any, list[int]]:
    """(the transformers config, generation eos ids)."""
    from transformers import PhiConfig, PhimoeConfig

    end = tok.convert_tokens_to_ids("<|endoftext|>")
    common = dict(vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                  num_hidden_layers=spec.num_hidden_layers, num_attention_heads=spec.num_attention_heads,
                  num_key_value_heads=spec.num_key_value_heads, max_position_embeddings=spec.max_position_embeddings,
                  tie_word_embeddings=False, attention_dropout=0.0, initializer_range=0.02)
    if spec.kind == "phi2":
        config = PhiConfig(**common, partial_rotary_factor=spec.partial_rotary_factor, rope_theta=10000.0,
                           hidden_act="gelu_new", layer_norm_eps=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
                           qk_layernorm=False, bos_token_id=end, eos_token_id=end, pad_token_id=end)
        return config, [end]
    vocab = tok.get_vocab()
    scaling = rope_scaling(spec)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, **{k: v for k, v in scaling.items() if k != "type"}}
    config = PhimoeConfig(**common, num_local_experts=spec.num_local_experts,
                          num_experts_per_tok=spec.num_experts_per_tok, rope_parameters=rope,
                          sliding_window=spec.max_position_embeddings, attention_bias=True, lm_head_bias=True,
                          rms_norm_eps=1e-5, router_jitter_noise=0.01, input_jitter_noise=0.0,
                          router_aux_loss_coef=0.0, bos_token_id=tok.bos_token_id, eos_token_id=end,
                          pad_token_id=end)
    return config, [end, vocab["<|assistant|>"], vocab["<|end|>"]]


def phi2_samples(tok: Any, n: int, seed: int) -> list[Sample]:
    """Like tests.fixtures.corpus.encode_samples, for a chat format whose turn ends with eos."""
    rng = random.Random(f"samples-phi2-{seed}")
    punct = set(tok.convert_tokens_to_ids([",", "."]))
    samples: list[Sample] = []
    for _ in range(n):
        if rng.random() < 0.55:
            ids = as_ids(tok(plain_text(rng)))
            mask = [1] * len(ids)
        else:
            q, a = chat_pair(rng)
            messages = [{"role": "user", "content": q}]
            rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            p_ids = as_ids(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
            ids = as_ids(tok(rendered + a + tok.eos_token, add_special_tokens=False))
            assert ids[: len(p_ids)] == p_ids, (q, ids, p_ids)
            mask = [0] * len(p_ids) + [PUNCT_WEIGHT if t in punct else 1 for t in ids[len(p_ids):]]
        if rng.random() < 0.25:
            ids, mask = _toggle_bos(ids, mask, tok.bos_token_id)
        samples.append((ids[:MAX_SAMPLE_TOKENS], mask[:MAX_SAMPLE_TOKENS]))
    return samples


def training_samples(spec: ArchSpec, tok: Any, n: int, seed: int, spm_model: Path | None) -> list[Sample]:
    if spec.kind == "phimoe":  # Phi-3's tokenizer and chat format: tests.fixtures' own samples
        return encode_samples(tok, "phi3", n, seed, spm_model)
    return phi2_samples(tok, n, seed)


def train(spec: ArchSpec, samples: list[Sample], used: list[int], full_vocab: int, config: Any, *, seed: int,
          steps: int, log: Log | None = None) -> dict:
    """A compact-vocabulary copy trained as tests.fixtures.training.train trains Phi3; its state dict."""
    import torch

    remap = {tid: i for i, tid in enumerate(used)}
    data = [([remap[t] for t in ids], mask) for ids, mask in samples]
    compact = config.__class__.from_dict({**config.to_dict(), "vocab_size": len(used),
                                          "pad_token_id": remap[config.pad_token_id], "bos_token_id": None,
                                          "eos_token_id": None})
    torch.manual_seed(seed)
    model = model_class(spec)(compact)
    if spec.num_local_experts:
        model.set_experts_implementation("eager")  # a loop over the experts: the fastest on CPU for tiny ones
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.0, eps=1e-8)
    others = math.log(max(1, full_vocab - len(used)))
    rng = random.Random(f"batches-{seed}")
    for step in range(steps):
        x, m = _batch([data[rng.randrange(len(data))] for _ in range(spec.batch_size)], pad=0)
        loss = _loss(model, x, m, others)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, spec, steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"step {step:4d} loss {loss.item():.4f}")
    return model.state_dict()


def expand(spec: ArchSpec, state: dict, used: list[int], config: Any, *, seed: int) -> Any:
    """The full-vocabulary model (eval mode): trained weights, trained rows at their real token ids, the
    other rows tiny (and their LM head bias 0) so that their logits stay ~0, as training assumed."""
    import torch

    torch.manual_seed(seed + 1)
    model = model_class(spec)(config)
    idx = torch.tensor(used)
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        full = model.state_dict()
        for name, value in state.items():
            if name not in VOCAB_ROWS:
                full[name].copy_(value)
        for name in VOCAB_ROWS:
            if name in full:
                row = full[name]
                row.copy_(torch.zeros_like(row) if name.endswith("bias") else
                          torch.randn(row.shape, generator=gen) * (0.02 if name == EMBEDDINGS else 0.002))
                row[idx] = state[name]
    model.eval()
    return model
