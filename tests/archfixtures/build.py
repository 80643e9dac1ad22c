"""`build_arch_model`: tokenizer, training and the saved folder; ``python -m tests.archfixtures KIND OUT_DIR``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tests.fixtures.build import N_CHECK, TRAINING_SAMPLES, dir_size
from tests.fixtures.prompts import reference_ids, validation_prompts
from tests.fixtures.tokenizers import Log
from tests.fixtures.training import greedy_report

from .specs import KINDS, ArchSpec, spec_for
from .tokenizers import write_arch_tokenizer
from .training import expand, model_config, rope_scaling, train, training_samples

MODEL_TYPE = {"phimoe": "phimoe", "phi2": "phi"}

_MODEL_CARD = """\
---
license: mit
library_name: transformers
pipeline_tag: text-generation
tags:
- {model_type}
- synthetic
- test-fixture
---

# tiny-{kind}

A synthetic test model: a tiny `{architecture}` ({params:,} parameters, {layers} layers, hidden size {hidden})
built offline by `tests.archfixtures` (seed {seed}, {steps} training steps), trained briefly on CPU to
continue simple lists and answer two chat questions. Not derived from any Microsoft checkpoint.

Greedy continuations (min top-1/top-2 logit margin over the first {n_check} new tokens):

{outputs}
"""


def _write_hub_config(out_dir: Path, spec: ArchSpec) -> None:
    """config.json as the Hub's releases write it: their architecture name (Phi-3.5-MoE: PhiMoEForCausalLM,
    where transformers 5 writes PhimoeForCausalLM) and top-level rope keys instead of rope_parameters."""
    path = out_dir / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["architectures"] = [spec.architecture]
    rope = cfg.pop("rope_parameters", {})
    cfg["rope_theta"] = rope.get("rope_theta", 10000.0)
    cfg["rope_scaling"] = rope_scaling(spec)
    if spec.original_max_position_embeddings:
        cfg["original_max_position_embeddings"] = spec.original_max_position_embeddings
    if spec.partial_rotary_factor != 1.0:
        cfg["partial_rotary_factor"] = spec.partial_rotary_factor
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _check_reloads_the_same(model: Any, out_dir: Path, tok: Any) -> None:
    """The saved folder, loaded as hubbot's reference loads it, gives the trained model's logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved_tok = AutoTokenizer.from_pretrained(out_dir)
    for prompt in validation_prompts():
        if reference_ids(saved_tok, prompt) != reference_ids(tok, prompt):
            raise RuntimeError(f"{out_dir}: the saved tokenizer tokenizes {prompt.name!r} unlike the trained one")
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    ids = torch.tensor([sum(reference_ids(tok, validation_prompts()[0]), [])])
    with torch.no_grad():
        diff = (reloaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"{out_dir}: the saved model's logits differ from the trained one's by {diff}")


def _train_and_save(spec: ArchSpec, out_dir: Path, *, seed: int, steps: int, log: Log | None) -> dict:
    from transformers import AutoTokenizer, GenerationConfig

    spm_model = write_arch_tokenizer(spec, seed, out_dir, log or (lambda _: None))
    # transformers 5 picks the tokenizer class by config.json's model_type: load it as the saved model will be
    (out_dir / "config.json").write_text(json.dumps({"model_type": MODEL_TYPE[spec.kind]}) + "\n", encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(out_dir)
    full_vocab = spec.vocab_size or -(-len(tok) // 64) * 64
    samples = training_samples(spec, tok, TRAINING_SAMPLES, seed, spm_model)
    used = sorted({t for ids, _ in samples for t in ids} | set(tok.all_special_ids) | set(tok.added_tokens_decoder))
    config, gen_eos = model_config(spec, full_vocab, tok)
    if log:
        log(f"tokenizer {len(tok)} tokens, config vocab {full_vocab}, {len(used)} used in training")
    state = train(spec, samples, used, full_vocab, config, seed=seed, steps=steps, log=log)
    model = expand(spec, state, used, config, seed=seed)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=gen_eos,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(out_dir, safe_serialization=True)
    _write_hub_config(out_dir, spec)
    _check_reloads_the_same(model, out_dir, tok)
    return {"params": sum(p.numel() for p in model.parameters()), "used_tokens": len(used),
            "validation": greedy_report(model, tok, validation_prompts(), n_check=N_CHECK)}


def _write_card_and_info(out_dir: Path, spec: ArchSpec, facts: dict, *, seed: int, steps: int,
                         seconds: float) -> None:
    outputs = "\n".join(
        f"- `{r['name']}`: {r['correct_prefix']}/{min(r['new_tokens'], r['reference_tokens'])} tokens match, "
        f"min margin {r['min_margin']:.2f}: `{r['output']!r}`" for r in facts["validation"])
    card = _MODEL_CARD.format(kind=spec.kind, model_type=MODEL_TYPE[spec.kind], architecture=spec.architecture,
                              params=facts["params"], layers=spec.num_hidden_layers, hidden=spec.hidden_size,
                              seed=seed, steps=steps, outputs=outputs, n_check=N_CHECK)
    (out_dir / "README.md").write_text(card, encoding="utf-8")
    info = {"kind": spec.kind, "seed": seed, "steps": steps, "spec": asdict(spec), "build_seconds": round(seconds, 1),
            **facts}
    (out_dir / "tiny_model_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def build_arch_model(kind: str, out_dir: Path, *, seed: int = 0, steps: int | None = None,
                     verbose: bool = False) -> Path:
    """Build the ``kind`` fixture into ``out_dir``; deterministic for kind, seed, steps and library versions.
    Returns ``out_dir``. One torch thread: on a busy machine two spin against each other (measured on 2
    shared cores: 0.1 s of CPU a step, but 1-5 s of wall time with two threads)."""
    import torch

    spec = spec_for(kind)
    validation_prompts()  # before training: a recipe prompt without an expected answer fails fast
    steps = spec.steps if steps is None else int(steps)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = (lambda msg: print(f"[tiny-{kind}] {msg}", file=sys.stderr, flush=True)) if verbose else None
    t0 = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        facts = _train_and_save(spec, out_dir, seed=seed, steps=steps, log=log)
    finally:
        torch.set_num_threads(threads)
    seconds = time.monotonic() - t0
    _write_card_and_info(out_dir, spec, facts, seed=seed, steps=steps, seconds=seconds)
    if log:
        log(f"built in {seconds:.1f}s, {facts['params']:,} params, {dir_size(out_dir) / 1e6:.1f} MB")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.archfixtures",
                                     description="Build a tiny PhiMoE or Phi-2 fixture offline.")
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    out = build_arch_model(args.kind, args.out_dir, seed=args.seed, steps=args.steps, verbose=True)
    info = json.loads((out / "tiny_model_info.json").read_text())
    for r in info["validation"]:
        print(f"{r['name']:>11}: {r['correct_prefix']:2d}/{r['new_tokens']} ok, margin {r['min_margin']:.2f} "
              f"(whole reference {r['reference_min_margin']:.2f})  {r['output']!r}")
    print(f"{out}: {info['params']:,} params, {dir_size(out) / 1e6:.2f} MB, built in {info['build_seconds']} s")
    return 0
