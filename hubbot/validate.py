"""validate: run every variant in its own runtime and compare it with the source model.

The source's greedy continuations of the recipe's prompts (``hubbot.reference``) are the
reference. Each variant is then
judged on: tokenization parity, teacher-forced top-1 agreement over the reference continuation
(one forward pass), the first position where its own greedy generation diverges, and the text
it generates. A variant passes when tokenization matches on every prompt, it generates, its
agreement reaches the threshold for its precision, it passes the tokenizer probes
(``hubbot.probes``: encode parity and the runtime's own detokenizer on strings the prompts lack)
and its own generation config stops at the chat template's end-of-turn token.

Two gates come on top when the recipe sets them (``hubbot.recipe.ValidationSettings``):

- the held text (``validation.heldout``): the variant's mean KL divergence from the source over it
  (``hubbot.metrics``) must not exceed ``validation.max_mean_kld`` for its precision;
- the chat path (``validation.chat_gate_tokens: N``): on a chat prompt the variant's greedy answer
  must not leave the source's within its first N tokens, whatever its average agreement — a user
  reads the first tokens of an answer first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .backends.base import Runtime
from .metrics import DistributionMetrics, compare_distributions
from .probes import run_probes, stop_token_reason
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
    chat: bool = False
    divergence: str | None = None  # at first_divergence: "expected '…', got '…'" (the tokens' text)


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
    tokenizer_probes: dict[str, Any] = field(default_factory=dict)
    max_mean_kld: float | None = None  # None: no KLD gate for this variant's precision
    distribution: dict[str, Any] | None = None  # DistributionMetrics over the held text

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
        for i, (p, predicted) in enumerate(zip(reference.prompts, _top1_each(runtime, reference)), 1):
            start = len(p.ids) - 1
            matched.append(sum(int(a == b) for a, b in zip(predicted[start: start + len(p.continuation)],
                                                           p.continuation)))
            shown.advance()
            log(f"teacher-forced pass {i}/{n} ({time.monotonic() - started:.0f} s)")
    generated = _generate_each(runtime, reference, log, started)
    return [PromptResult(name=p.name, tokens_match=runtime.tokenize(p.text) == p.ids, matched=m,
                         total=len(p.continuation), first_divergence=first_divergence(g, p.continuation),
                         generated_text=reference.decode(g), chat=p.chat,
                         divergence=describe_divergence(reference, g, p.continuation))
            for p, m, g in zip(reference.prompts, matched, generated)]


def _top1_each(runtime: Runtime, reference: Reference) -> Iterator[list[int]]:
    """Each prompt's teacher-forced top-1 predictions: in one batch where the runtime offers it
    (``top1_all``), else one pass per prompt."""
    sequences = [p.ids + p.continuation for p in reference.prompts]
    if hasattr(runtime, "top1_all"):
        yield from runtime.top1_all(sequences)
    else:
        yield from map(runtime.top1, sequences)


def _generate_each(runtime: Runtime, reference: Reference, log: Log, started: float) -> list[list[int]]:
    """Each prompt's greedy generation: all in one batch where the runtime offers it
    (``generate_all``), else one prompt at a time."""
    lengths = [len(p.continuation) or 1 for p in reference.prompts]
    if hasattr(runtime, "generate_all"):
        with step("greedy generations (batched)", total=max(lengths), log=log) as shown:
            def on_step(i: int) -> None:  # one decoding step for every prompt still going
                shown.advance()
                log(f"greedy generation step {i}/{max(lengths)} ({time.monotonic() - started:.0f} s)")
            return runtime.generate_all([p.ids for p in reference.prompts], lengths, reference.stop_ids, on_step)
    generated = []
    with step("greedy generations", total=len(lengths), log=log) as shown:
        for i, (p, length) in enumerate(zip(reference.prompts, lengths), 1):
            generated.append(runtime.generate(p.ids, length, reference.stop_ids))
            shown.advance()
            log(f"greedy generation {i}/{len(lengths)} ({time.monotonic() - started:.0f} s)")
    return generated


def describe_divergence(reference: Reference, generated: Sequence[int], expected: Sequence[int]) -> str | None:
    """What the source says and what the variant says from the first token where they part."""
    at = first_divergence(generated, expected)
    if at is None:
        return None
    return (f"expected {reference.decode(expected[at: at + 3])!r}, "
            f"got {reference.decode(generated[at: at + 3]) if at < len(generated) else '(end)'!r}")


def measure_distribution(runtime: Runtime, reference: Reference, log: Log = lambda _: None) -> DistributionMetrics:
    """KLD, top-1 agreement and perplexity over the held text: several windows to a pass where the
    runtime offers it (``window_logits``), else one window at a time."""
    batched = getattr(runtime, "window_logits", None)
    window_logits = batched or (lambda parts: map(runtime.logits, parts))
    with step("held text", total=len(reference.heldout.windows), log=log) as shown:
        return compare_distributions(window_logits, reference.heldout, lambda i, n: shown.advance())


def chat_gate(results: Sequence[PromptResult], tokens: int) -> list[str]:
    """Reasons for every chat prompt whose greedy answer leaves the source's within ``tokens`` tokens."""
    return [f"chat prompt '{r.name}': the greedy answer leaves the source's at token {r.first_divergence} "
            f"(within the first {tokens}): {r.divergence}"
            for r in results if r.chat and r.first_divergence is not None and r.first_divergence < tokens]


def kld_gate(metrics: DistributionMetrics, max_mean_kld: float | None) -> list[str]:
    if max_mean_kld is None or metrics.mean_kld <= max_mean_kld:
        return []
    return [f"mean KL divergence from the source over the held text {metrics.mean_kld:.4g} is above "
            f"{max_mean_kld:.4g} (p99 {metrics.p99_kld:.4g}, perplexity ratio {metrics.perplexity_ratio:.3f})"]


def judge(variant_id: str, precision: str, threshold: float, results: list[PromptResult]) -> VariantReport:
    total = sum(r.total for r in results)
    agreement = sum(r.matched for r in results) / total if total else 0.0
    reasons = [f"prompt '{r.name}': tokenization differs from the source tokenizer"
               for r in results if not r.tokens_match]
    reasons += [f"prompt '{r.name}': generated nothing" for r in results if not r.generated_text]
    if agreement < threshold:
        reasons.append(f"teacher-forced top-1 agreement {agreement:.3f} is below {threshold:.3f}")
    return VariantReport(variant_id, precision, threshold, True, not reasons, round(agreement, 4), reasons, results)


def check_tokenizer(runtime: Runtime, reference: Reference, report: VariantReport, log: Log = lambda _: None) -> None:
    """The tokenizer probes and the stop token, added to ``report`` (a failure fails the variant)."""
    if reference.tokenizer_dir is None:
        return
    probes = run_probes(runtime, reference.tokenizer_dir)
    log(f"tokenizer probes: {probes.strings} strings in {probes.seconds:.2f} s, {probes.encode_failures} encode "
        f"and {probes.decode_failures} decode failures")
    report.tokenizer_probes = probes.summary()
    reasons = probes.reasons + [r for r in [stop_token_reason(runtime, reference.tokenizer_dir)] if r]
    report.reasons += reasons
    report.passed = report.passed and not reasons


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
            apply_gates(report, runtime, reference, variant, log)
            check_tokenizer(runtime, reference, report, lambda m: log(f"{variant.id}: {m}"))
        finally:
            runtime.close()
    if not report.passed and inspection.get("known_difference"):
        # a runtime's own limit (e.g. mlx-lm's longrope), not the quantization: the failure says so
        report.reasons.append(f"known cause: {inspection['known_difference']}")
    report.inspection = inspection
    report.seconds = round(time.monotonic() - started, 2)
    return report


def apply_gates(report: VariantReport, runtime: Runtime, reference: Reference, variant: Any, log: Log) -> None:
    """The recipe's held-text and chat-path gates, added to ``report`` (its reasons decide ``passed``)."""
    settings = reference.settings
    if settings is None:
        return
    report.reasons += chat_gate(report.prompts, settings.chat_gate_tokens)
    if reference.heldout is not None:
        metrics = measure_distribution(runtime, reference, lambda m: log(f"{variant.id}: {m}"))
        report.distribution = metrics.to_dict()
        report.max_mean_kld = settings.max_kld(variant.native, variant.precision_class)
        report.reasons += kld_gate(metrics, report.max_mean_kld)
    report.passed = not report.reasons
