"""Distribution metrics: how far a variant's next-token distributions are from the source's.

Over a held text (``validation.heldout`` in the recipe: a plain text file under
``recipes/heldout/``, never one of the prompts) the source model and every variant are run
teacher-forced, in windows of ``validation.heldout_window`` tokens that each start with the
tokens the tokenizer adds in front of a text (BOS). At every scored position the metrics are:

- KL divergence KL(source ‖ variant) of the next-token distributions: its mean and 99th percentile;
- top-1 agreement: the variant ranks first the token the source ranks first;
- perplexity of the held text under the source and under the variant, and their ratio.

What the reference stores of the source (``SourceDistribution``): per scored position the top-K
log-probabilities (K = ``validation.heldout_top_k``) with their token ids, and the log-probability
of the text's actual next token. The rest of the vocabulary is one "tail" bucket of mass
1 − Σ top-K, and the variant's distribution is folded the same way (its mass on the source's
top-K ids, and the rest), so the stored KLD is KL over K+1 outcomes. By the log-sum inequality
that is a lower bound of the exact KLD, off by the divergence *inside* the tail, which holds
1 − Σ top-K of the source's mass. Measured on the tiny Phi-3 fixture (vocabulary 1024, 4057
positions) against the exact KLD over the whole vocabulary: K=64 is within 0.02% of it for Q2_K,
Q4_K_M and Q8_0 (mean 0.7085 vs 0.7086, 0.07995 vs 0.07995, 0.001123 vs 0.001123; p99 equal),
K=8 within 0.2% (tests/test_metrics.py ``test_stored_kld_is_close_to_exact`` checks it). A
real 100k vocabulary leaves more mass in the tail than the fixture's 0.3%, so the bound is
looser there; raise ``heldout_top_k`` when a release's tail mass (in validation.json) is large.
At real size (vocabulary 100352, 2k positions) this form is 2k × 64 × 8 bytes ≈ 1 MB
(zlib-compressed inside the reference JSON), where fp32 logits would be 800 MB.

Memory: a variant's logits are reduced to per-position numbers one window at a time (window ×
vocab fp32: 512 × 100352 × 4 = 205 MB at real size) and dropped before the next; a runtime that
batches windows into one pass (``window_logits``) holds at most one pass of them.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

TAIL_NOISE = 1e-5
WindowLogits = Callable[[list[list[int]]], Iterable[np.ndarray]]  # all windows -> each one's logits, in order


def windows(ids: Sequence[int], prefix: Sequence[int], size: int) -> list[list[int]]:
    """The held text's ids (after ``prefix``, what the tokenizer puts in front) cut into windows
    of at most ``size`` tokens, each starting with ``prefix`` again."""
    body = list(ids[len(prefix):]) if list(ids[: len(prefix)]) == list(prefix) else list(ids)
    step = size - len(prefix)
    return [list(prefix) + body[i: i + step] for i in range(0, len(body), step) if body[i: i + step]]


def window_batches(parts: Sequence[Sequence[int]], tokens_per_pass: int,
                   most: int | None = None) -> Iterator[list[list[int]]]:
    """``parts`` in order, in groups of about ``tokens_per_pass`` tokens (and at most ``most`` parts):
    one forward pass each."""
    per_pass = max(1, tokens_per_pass // max(len(w) for w in parts))
    per_pass = min(per_pass, most) if most else per_pass
    for start in range(0, len(parts), per_pass):
        yield [list(w) for w in parts[start: start + per_pass]]


def right_padded(sequences: Sequence[Sequence[int]]) -> list[list[int]]:
    """Each sequence padded to the longest with its own last token: under causal attention the
    padding comes after, so it never reaches the sequence's own positions."""
    width = max(len(seq) for seq in sequences)
    return [list(seq) + [seq[-1]] * (width - len(seq)) for seq in sequences]


def scored_range(window: Sequence[int], prefix: Sequence[int]) -> range:
    """Positions of ``window`` whose next-token prediction is scored (each predicts window[pos + 1])."""
    return range(max(len(prefix) - 1, 0), len(window) - 1)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32 (in place on a float32 copy: one window × vocab array)."""
    out = np.array(logits, dtype=np.float32)
    out -= out.max(axis=-1, keepdims=True)
    out -= np.log(np.exp(out).sum(axis=-1, keepdims=True))
    return out


@dataclass
class SourceDistribution:
    """The source's side of the metrics, as the reference stores it."""

    windows: list[list[int]]
    prefix: list[int]
    top_ids: np.ndarray  # (positions, K) int32, most probable first
    top_logprobs: np.ndarray  # (positions, K) float32
    target_logprobs: np.ndarray  # (positions,) float32: log p(actual next token)

    @property
    def positions(self) -> int:
        return len(self.target_logprobs)

    def perplexity(self) -> float:
        return float(np.exp(-self.target_logprobs.astype(np.float64).mean()))

    def tail_mass(self) -> float:
        return float((1.0 - np.exp(self.top_logprobs.astype(np.float64)).sum(axis=-1)).clip(0, 1).mean())

    def to_json(self) -> dict[str, Any]:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, top_ids=self.top_ids, top_logprobs=self.top_logprobs,
                            target_logprobs=self.target_logprobs)
        return {"windows": self.windows, "prefix": self.prefix,
                "arrays_npz_base64": base64.b64encode(buffer.getvalue()).decode("ascii")}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SourceDistribution:
        arrays = np.load(io.BytesIO(base64.b64decode(data["arrays_npz_base64"])))
        return cls(data["windows"], data["prefix"], arrays["top_ids"], arrays["top_logprobs"],
                   arrays["target_logprobs"])


def source_distribution(window_logits: WindowLogits, ids: Sequence[int], prefix: Sequence[int], window: int,
                        top_k: int, on_window: Callable[[int, int], None] = lambda i, n: None) -> SourceDistribution:
    """Run the source over the held text's windows and keep what ``SourceDistribution`` keeps."""
    parts = windows(ids, prefix, window)
    top_ids, top_lp, target = [], [], []
    for i, (w, logits) in enumerate(zip(parts, window_logits(parts), strict=True), 1):
        pos = scored_range(w, prefix)
        lp = log_softmax(logits[pos.start: pos.stop])
        del logits
        k = min(top_k, lp.shape[1])
        idx = np.argpartition(-lp, k - 1, axis=-1)[:, :k]
        vals = np.take_along_axis(lp, idx, axis=-1)
        order = np.argsort(-vals, axis=-1, kind="stable")
        top_ids.append(np.take_along_axis(idx, order, axis=-1).astype(np.int32))
        top_lp.append(np.take_along_axis(vals, order, axis=-1))
        target.append(lp[np.arange(len(pos)), np.array(w[pos.start + 1: pos.stop + 1])])
        del lp
        on_window(i, len(parts))
    return SourceDistribution(parts, list(prefix), np.concatenate(top_ids), np.concatenate(top_lp),
                              np.concatenate(target).astype(np.float32))


@dataclass
class DistributionMetrics:
    """One variant against the source over the held text (what validation.json and the card show)."""

    positions: int
    mean_kld: float
    p99_kld: float
    top1_agreement: float
    source_perplexity: float
    variant_perplexity: float
    perplexity_ratio: float  # variant / source
    source_tail_mass: float  # mean source probability outside the stored top-K (what the KLD bound misses)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def folded_kld(top_logprobs: np.ndarray, variant_top_logprobs: np.ndarray) -> np.ndarray:
    """Per-position KL(source ‖ variant) over the source's top-K ids plus one tail bucket."""
    p_lp = top_logprobs.astype(np.float64)
    q_lp = variant_top_logprobs.astype(np.float64)
    p = np.exp(p_lp)
    kld = (p * (p_lp - q_lp)).sum(axis=-1)
    # the tails are 1 − a sum of float32 probabilities: below TAIL_NOISE they are rounding, not mass
    p_tail = np.clip(1.0 - p.sum(axis=-1), 0.0, 1.0)
    q_tail = np.clip(1.0 - np.exp(q_lp).sum(axis=-1), TAIL_NOISE, 1.0)
    tail = np.where(p_tail > TAIL_NOISE, p_tail * (np.log(np.maximum(p_tail, TAIL_NOISE)) - np.log(q_tail)), 0.0)
    return np.maximum(kld + tail, 0.0)


def exact_kld(source_logits: np.ndarray, variant_logits: np.ndarray) -> np.ndarray:
    """Per-position KL(source ‖ variant) over the whole vocabulary (tests measure the stored form by it)."""
    p_lp, q_lp = log_softmax(source_logits).astype(np.float64), log_softmax(variant_logits).astype(np.float64)
    return (np.exp(p_lp) * (p_lp - q_lp)).sum(axis=-1)


def compare_distributions(window_logits: WindowLogits, source: SourceDistribution,
                          on_window: Callable[[int, int], None] = lambda i, n: None) -> DistributionMetrics:
    """Run a variant (``window_logits``: its runtime's, all windows in, each one's logits out, in
    order) over the source's windows and compare."""
    klds, agree, nll = [], [], []
    start = 0
    for i, (w, logits) in enumerate(zip(source.windows, window_logits(source.windows)), 1):
        pos = scored_range(w, source.prefix)
        top_ids = source.top_ids[start: start + len(pos)]
        lq = log_softmax(logits[pos.start: pos.stop])
        del logits
        if top_ids.size and int(top_ids.max()) >= lq.shape[1]:
            raise ValueError(f"the variant's vocabulary has {lq.shape[1]} entries, the source ranks id "
                             f"{int(top_ids.max())}")
        klds.append(folded_kld(source.top_logprobs[start: start + len(pos)], np.take_along_axis(lq, top_ids, -1)))
        agree.append(lq.argmax(axis=-1) == top_ids[:, 0])
        nll.append(-lq[np.arange(len(pos)), np.array(w[pos.start + 1: pos.stop + 1])].astype(np.float64))
        start += len(pos)
        del lq
        on_window(i, len(source.windows))
    kld, nll_all = np.concatenate(klds), np.concatenate(nll)
    source_ppl, variant_ppl = source.perplexity(), float(np.exp(nll_all.mean()))
    return DistributionMetrics(
        positions=int(len(kld)), mean_kld=_round(kld.mean()), p99_kld=_round(np.percentile(kld, 99)),
        top1_agreement=round(float(np.concatenate(agree).mean()), 4), source_perplexity=round(source_ppl, 4),
        variant_perplexity=round(variant_ppl, 4), perplexity_ratio=round(variant_ppl / source_ppl, 4),
        source_tail_mass=_round(source.tail_mass()))


def _round(x: float) -> float:
    """Four significant digits: KLDs range from 1e-6 (fp16) to 1 (broken), and the card and
    validation.json should not change with the last bits of a float sum."""
    return float(f"{float(x):.4g}")
