"""The card's pictures and picks: file size against mean KL divergence for every variant of a release.

Every variant of the release that was run over the held text (``hubbot.metrics``) is one point,
all formats on one plot, so a reader sees which file of which format is closest to the source for
its size. The PNG is byte-reproducible, as the card is (``hubbot.card``): matplotlib's Agg
backend, its bundled DejaVu font, no ``Software`` or date metadata, fixed size and dpi —
identical measurements give identical bytes on any machine with the same matplotlib.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

CHART_FILE = "quality.png"
MARKERS = {"gguf": "o", "onnx": "s", "openvino": "^", "mlx": "D"}
KLD_FLOOR = 1e-7  # a log axis cannot show 0; fp32 copies sit near 1e-7


@dataclass(frozen=True)
class Point:
    """One measured variant of the release."""

    repo: str
    path: str
    format: str
    native: str
    target: str
    bytes: int
    mean_kld: float
    perplexity_ratio: float
    top1_agreement: float
    passed: bool

    @property
    def label(self) -> str:
        return self.native if self.target in ("", "cpu", "any") else f"{self.native} ({self.target})"


def points(results: Sequence[tuple[str, Any]]) -> list[Point]:
    """The measured variants among ``results`` ((repo id, ``record.VariantResult``) pairs), smallest first."""
    found = []
    for repo, r in results:
        metrics = r.report.get("distribution")
        if metrics:
            v = r.variant
            found.append(Point(repo, v.path, v.format, v.native, v.target, r.bytes, metrics["mean_kld"],
                               metrics["perplexity_ratio"], metrics["top1_agreement"], r.passed))
    return sorted(found, key=lambda p: (p.bytes, p.mean_kld, p.repo, p.path))


def size_vs_kld_png(found: Sequence[Point], title: str) -> bytes:
    """The chart as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    with matplotlib.rc_context({"font.family": "DejaVu Sans", "font.size": 9, "svg.hashsalt": "hubbot",
                                "path.simplify": False}):
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
        try:
            for fmt in sorted({p.format for p in found}):
                mine = [p for p in found if p.format == fmt]
                ax.scatter([p.bytes / 1e6 for p in mine], [max(p.mean_kld, KLD_FLOOR) for p in mine],
                           marker=MARKERS.get(fmt, "x"), label=fmt, s=36)
                for p in mine:
                    ax.annotate(p.label, (p.bytes / 1e6, max(p.mean_kld, KLD_FLOOR)), textcoords="offset points",
                                xytext=(4, 3), fontsize=7)
            ax.set_yscale("log")
            ax.set_xlabel("file size (MB)")
            ax.set_ylabel("mean KL divergence from the source (nats, log scale)")
            ax.set_title(title)
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(loc="upper right")
            fig.tight_layout()
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", metadata={"Software": None})
            return buffer.getvalue()
        finally:
            plt.close(fig)


def picks(found: Sequence[Point]) -> list[dict[str, Any]]:
    """"Which file should I pick": per use, the smallest passing file that is close enough (or the closest)."""
    passed = [p for p in found if p.passed]
    rows = []
    for use, limit in (("smallest file that is near-lossless (mean KLD ≤ 0.01)", 0.01),
                       ("smallest file with little loss (mean KLD ≤ 0.05)", 0.05),
                       ("smallest file that passed validation", None)):
        ok = [p for p in passed if limit is None or p.mean_kld <= limit]
        if ok:
            rows.append({"use": use, "point": min(ok, key=lambda p: (p.bytes, p.mean_kld))})
    if passed:
        rows.append({"use": "closest to the source", "point": min(passed, key=lambda p: (p.mean_kld, p.bytes))})
    return rows
