"""validate: run every variant in its own runtime and compare it with the source model.

The source runs in transformers (fp32, CPU) on the recipe's prompts — plain text and
chat-templated — and its greedy continuation becomes the reference. Each variant is then
judged on: tokenization parity, teacher-forced top-1 agreement over the reference continuation
(one forward pass), the first position where its own greedy generation diverges, and the text
it generates. A variant passes when tokenization matches on every prompt, it generates, and its
agreement reaches the threshold for its precision.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .backends.base import Runtime
from .recipe import Prompt, ValidationSettings


@dataclass
class PreparedPrompt:
    name: str
    chat: bool
    text: str  # exactly what is tokenized (chat prompts already rendered)
    ids: list[int]
    continuation: list[int]  # the source model's greedy continuation
    continuation_text: str
    min_margin: float  # smallest top-1 minus top-2 logit along the continuation


@dataclass
class PromptResult:
    name: str
    tokens_match: bool
    matched: int
    total: int
    first_divergence: int | None  # None: greedy output equals the reference
    generated_text: str


@dataclass
class VariantReport:
    variant_id: str
    precision: str
    threshold: float
    executed: bool  # False: this machine cannot run the variant's target; only checked structurally
    passed: bool
    agreement: float | None = None
    reasons: list[str] = field(default_factory=list)
    prompts: list[PromptResult] = field(default_factory=list)
    seconds: float = 0.0
    inspection: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """For validation.json: everything but the timing, so identical builds give identical files."""
        data = asdict(self)
        data.pop("seconds")
        return data


class TransformersRuntime:
    """The source model in transformers: the reference every variant is compared with."""

    def __init__(self, model_dir: Path):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = sorted({eos} if isinstance(eos, int) else set(eos or []))

    def render(self, prompt: Prompt) -> str:
        if not prompt.chat:
            return prompt.text
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}],
                                                  tokenize=False, add_generation_prompt=True)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def logits(self, ids: Sequence[int]):
        with self.torch.no_grad():
            return self.model(self.torch.tensor([list(ids)])).logits[0]

    def top1(self, ids: Sequence[int]) -> list[int]:
        return self.logits(ids).argmax(-1).tolist()

    def generate(self, ids: Sequence[int], max_new_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        inputs = self.torch.tensor([list(ids)])
        with self.torch.no_grad():
            out = self.model.generate(inputs, attention_mask=self.torch.ones_like(inputs),
                                      max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=list(stop_ids) or None,
                                      pad_token_id=self.tokenizer.pad_token_id or (list(stop_ids) or [0])[0])
        return out[0, len(ids):].tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def close(self) -> None:
        self.model = None
        gc.collect()


class Reference:
    """The source model's answers to the recipe's prompts, computed once per source."""

    def __init__(self, model_dir: Path, settings: ValidationSettings):
        self.runtime = TransformersRuntime(model_dir)
        self.settings = settings
        self.prompts = [self._prepare(p) for p in settings.prompts]
        # only the tokenizer is needed from here on: free the fp32 weights before the variants
        # load (at 3.8B parameters they would hold ~15 GB for nothing)
        self.runtime.close()

    @property
    def stop_ids(self) -> list[int]:
        return self.runtime.stop_ids

    def _prepare(self, prompt: Prompt) -> PreparedPrompt:
        rt = self.runtime
        text = rt.render(prompt)
        ids = rt.tokenize(text)
        continuation = rt.generate(ids, self.settings.max_new_tokens, rt.stop_ids)
        logits = rt.logits(ids + continuation)[len(ids) - 1: len(ids) - 1 + len(continuation)]
        top2 = logits.topk(2, dim=-1).values
        margin = float((top2[:, 0] - top2[:, 1]).min()) if len(continuation) else 0.0
        return PreparedPrompt(prompt.name, prompt.chat, text, ids, continuation, rt.decode(continuation),
                              round(margin, 3))

    def summary(self) -> list[dict[str, Any]]:
        return [{"name": p.name, "chat": p.chat, "prompt_tokens": len(p.ids),
                 "continuation": p.continuation_text, "min_logit_margin": p.min_margin} for p in self.prompts]

    def close(self) -> None:
        self.runtime.close()


class LazyReference:
    """The source's reference, computed the first time a variant needs it (never, when every repo is
    up to date or no variant can run here)."""

    def __init__(self, model_dir: Path, settings: ValidationSettings, log: Callable[[str], None] = lambda _: None):
        self.model_dir = model_dir
        self.settings = settings
        self.log = log
        self._reference: Reference | None = None

    def get(self) -> Reference:
        if self._reference is None:
            self.log(f"running the source model in transformers on {len(self.settings.prompts)} prompts")
            self._reference = Reference(self.model_dir, self.settings)
        return self._reference

    def summary(self) -> list[dict[str, Any]]:
        return self._reference.summary() if self._reference else []

    def close(self) -> None:
        if self._reference:
            self._reference.close()


def first_divergence(generated: Sequence[int], reference: Sequence[int]) -> int | None:
    for i, (a, b) in enumerate(zip(generated, reference)):
        if a != b:
            return i
    return None if len(generated) == len(reference) else min(len(generated), len(reference))


def compare(runtime: Runtime, reference: Reference) -> list[PromptResult]:
    results = []
    for p in reference.prompts:
        predicted = runtime.top1(p.ids + p.continuation)
        start = len(p.ids) - 1
        matched = sum(int(a == b) for a, b in zip(predicted[start: start + len(p.continuation)], p.continuation))
        generated = runtime.generate(p.ids, len(p.continuation) or 1, reference.stop_ids)
        results.append(PromptResult(
            name=p.name,
            tokens_match=runtime.tokenize(p.text) == p.ids,
            matched=matched,
            total=len(p.continuation),
            first_divergence=first_divergence(generated, p.continuation),
            generated_text=reference.runtime.decode(generated),
        ))
    return results


def judge(variant_id: str, precision: str, threshold: float, results: list[PromptResult]) -> VariantReport:
    total = sum(r.total for r in results)
    agreement = sum(r.matched for r in results) / total if total else 0.0
    reasons = [f"prompt '{r.name}': tokenization differs from the source tokenizer"
               for r in results if not r.tokens_match]
    reasons += [f"prompt '{r.name}': generated nothing" for r in results if not r.generated_text]
    if agreement < threshold:
        reasons.append(f"teacher-forced top-1 agreement {agreement:.3f} is below {threshold:.3f}")
    return VariantReport(variant_id, precision, threshold, True, not reasons, round(agreement, 4), reasons, results)


def validate_variant(runtime: Runtime | None, reference: Reference, variant: Any,
                     inspection: dict[str, Any]) -> VariantReport:
    """Judge one built variant; ``runtime`` None means it can only be checked structurally."""
    started = time.monotonic()
    if runtime is None:
        report = VariantReport(variant.id, variant.native, variant.min_agreement, False, True,
                               reasons=["not executed on this machine; checked structurally"])
    else:
        try:
            report = judge(variant.id, variant.native, variant.min_agreement, compare(runtime, reference))
        finally:
            runtime.close()
    report.inspection = inspection
    report.seconds = round(time.monotonic() - started, 2)
    return report
