"""validate: run every variant in its own runtime and compare it with the source model.

The source's greedy continuations of the recipe's prompts (``hubbot.reference``) are the
reference. Each variant is then
judged on: tokenization parity, teacher-forced top-1 agreement over the reference continuation
(one forward pass), the first position where its own greedy generation diverges, and the text
it generates. A variant passes when tokenization matches on every prompt, it generates, and its
agreement reaches the threshold for its precision.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .backends.base import Runtime
from .progress import step
from .reference import Reference

Log = Callable[[str], None]


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


def first_divergence(generated: Sequence[int], reference: Sequence[int]) -> int | None:
    for i, (a, b) in enumerate(zip(generated, reference)):
        if a != b:
            return i
    return None if len(generated) == len(reference) else min(len(generated), len(reference))


def compare(runtime: Runtime, reference: Reference, log: Log = lambda _: None) -> list[PromptResult]:
    """Score every prompt, one kind of call at a time (all teacher-forced passes, then all greedy
    generations), so a runtime that needs a different engine for each holds one at a time."""
    started, n = time.monotonic(), len(reference.prompts)
    matched = []
    with step("teacher-forced passes", total=n, log=log) as shown:
        for i, p in enumerate(reference.prompts, 1):
            predicted = runtime.top1(p.ids + p.continuation)
            start = len(p.ids) - 1
            matched.append(sum(int(a == b) for a, b in zip(predicted[start: start + len(p.continuation)],
                                                           p.continuation)))
            shown.advance()
            log(f"teacher-forced pass {i}/{n} ({time.monotonic() - started:.0f} s)")
    generated = []
    with step("greedy generations", total=n, log=log) as shown:
        for i, p in enumerate(reference.prompts, 1):
            generated.append(runtime.generate(p.ids, len(p.continuation) or 1, reference.stop_ids))
            shown.advance()
            log(f"greedy generation {i}/{n} ({time.monotonic() - started:.0f} s)")
    return [PromptResult(name=p.name, tokens_match=runtime.tokenize(p.text) == p.ids, matched=m,
                         total=len(p.continuation), first_divergence=first_divergence(g, p.continuation),
                         generated_text=reference.decode(g))
            for p, m, g in zip(reference.prompts, matched, generated)]


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
                     inspection: dict[str, Any], log: Log = lambda _: None) -> VariantReport:
    """Judge one built variant; ``runtime`` None means it can only be checked structurally."""
    started = time.monotonic()
    if runtime is None:
        report = VariantReport(variant.id, variant.native, variant.min_agreement, False, True,
                               reasons=["not executed on this machine; checked structurally"])
    else:
        try:
            results = compare(runtime, reference, lambda m: log(f"{variant.id}: {m}"))
            report = judge(variant.id, variant.native, variant.min_agreement, results)
        finally:
            runtime.close()
    if not report.passed and inspection.get("known_difference"):
        # a runtime's own limit (e.g. mlx-lm's longrope), not the quantization: the failure says so
        report.reasons.append(f"known cause: {inspection['known_difference']}")
    report.inspection = inspection
    report.seconds = round(time.monotonic() - started, 2)
    return report
