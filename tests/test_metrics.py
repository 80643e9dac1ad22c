"""Distribution metrics (hubbot.metrics): the math on known distributions, the stored form against
the exact KLD on the real fixture, and the recipe keys that turn them on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from hubbot.errors import RecipeError
from hubbot.metrics import (
    compare_distributions,
    exact_kld,
    folded_kld,
    log_softmax,
    scored_range,
    source_distribution,
    window_batches,
    windows,
)
from hubbot.recipe import load_family
from tests.conftest import ROOT


def test_windows_restart_with_the_prefix_and_cover_the_text_once():
    ids = [1, *range(10, 30)]  # BOS, then 20 tokens
    parts = windows(ids, [1], 8)
    assert all(w[0] == 1 and len(w) <= 8 for w in parts)
    assert [t for w in parts for t in w[1:]] == list(range(10, 30))
    # with a BOS prefix every token of the text is predicted once, from position 0 of its window on
    assert sum(len(scored_range(w, [1])) for w in parts) == 20
    assert sum(len(scored_range(w, [])) for w in windows(list(range(10, 30)), [], 8)) == 20 - 3


def _random_logits(rng, n, vocab, scale=3.0):
    return (rng.standard_normal((n, vocab)) * scale).astype(np.float32)


def test_folded_kld_is_exact_with_the_whole_vocabulary_and_a_lower_bound_with_top_k():
    rng = np.random.default_rng(0)
    p_logits = _random_logits(rng, 50, 200)
    q_logits = p_logits + _random_logits(rng, 50, 200, 0.5)
    exact = exact_kld(p_logits, q_logits)
    p_lp, q_lp = log_softmax(p_logits), log_softmax(q_logits)
    order = np.argsort(-p_lp, axis=-1)
    full = folded_kld(np.take_along_axis(p_lp, order, -1), np.take_along_axis(q_lp, order, -1))
    assert np.allclose(full, exact, rtol=1e-4, atol=1e-7)
    top = order[:, :16]
    folded = folded_kld(np.take_along_axis(p_lp, top, -1), np.take_along_axis(q_lp, top, -1))
    assert np.all(folded <= exact + 1e-6) and folded.mean() > 0.5 * exact.mean()
    same = folded_kld(np.take_along_axis(p_lp, top, -1), np.take_along_axis(p_lp, top, -1))
    assert np.allclose(same, 0, atol=1e-6)


def test_compare_distributions_against_a_known_variant():
    """A variant that is the source itself scores KLD 0, agreement 1, PPL ratio 1; a perturbed one does not."""
    rng = np.random.default_rng(1)
    vocab, ids = 64, [1, *rng.integers(2, 64, 300).tolist()]
    table = _random_logits(rng, vocab, vocab)  # logits depend on the current token only

    def source(seq):
        return table[np.array(seq)]

    def noisy(seq):
        return table[np.array(seq)] + np.sin(np.arange(vocab, dtype=np.float32))

    dist = source_distribution(lambda parts: map(source, parts), ids, [1], 64, 8)
    assert dist.positions == 300 and dist.top_ids.shape == (300, 8)
    same = compare_distributions(lambda parts: map(source, parts), dist)
    assert same.mean_kld < 1e-6 and same.top1_agreement == 1.0 and same.perplexity_ratio == 1.0
    other = compare_distributions(lambda parts: map(noisy, parts), dist)
    assert other.mean_kld > 0.01 and other.p99_kld >= other.mean_kld and other.perplexity_ratio != 1.0
    assert other.top1_agreement < 1.0
    again = type(dist).from_json(json.loads(json.dumps(dist.to_json())))
    assert compare_distributions(lambda parts: map(noisy, parts), again) == other


def _family_text(validation: str) -> str:
    return ("family: t\nvalidation:\n  prompts: [{name: a, text: 'Count: 1, 2,'}]\n"
            + textwrap.indent(validation, "  ") + "\n"
            + "recipes:\n  r: {variants: [{format: gguf, precision: Q8_0}]}\n")


def _write_family(tmp_path: Path, validation: str, held: str | None = "word " * 300) -> Path:
    if held is not None:
        (tmp_path / "heldout").mkdir(exist_ok=True)
        (tmp_path / "heldout" / "prose.txt").write_text(held)
    path = tmp_path / "t.yaml"
    path.write_text(_family_text(validation))
    return path


def test_recipe_metrics_keys(tmp_path):
    settings = load_family(_write_family(tmp_path, "heldout: prose\nmax_mean_kld: {int8: 0.01, Q4_K_M: 0.1}\n"
                                                   "chat_gate_tokens: 4")).validation
    assert settings.heldout == "prose" and settings.heldout_text.startswith("word word")
    assert settings.max_kld("Q8_0", "int8") == 0.01 and settings.max_kld("Q4_K_M", "int4") == 0.1
    assert settings.max_kld("Q4_0", "int4") is None and settings.chat_gate_tokens == 4
    shipped = load_family(ROOT / "recipes" / "phi.yaml").validation
    assert shipped.heldout and len(shipped.heldout_text.split()) > 1000
    assert shipped.max_kld("Q4_K_M", "int4") is not None


@pytest.mark.parametrize("validation, held, message", [
    ("heldout: missing", None, "cannot read"),
    ("heldout: prose", "too short", "needs at least 200"),
    ("max_mean_kld: {int8: 0.01}", None, "needs validation.heldout"),
    ("heldout: prose\nmax_mean_kld: {int9: 0.01}", "w " * 300, "unknown key"),
    ("heldout: prose\nmax_mean_kld: {int8: -1}", "w " * 300, "must be 0 or more"),
    ("chat_gate_tokens: -1", None, "must be from 0"),
])
def test_recipe_metrics_mistakes_name_the_key(tmp_path, validation, held, message):
    with pytest.raises(RecipeError) as e:
        load_family(_write_family(tmp_path, validation, held))
    assert message in str(e.value) and "validation" in str(e.value)


def test_chart_is_byte_reproducible(tmp_path):
    """The same measurements make the same PNG bytes in a fresh process; other measurements do not."""
    script = textwrap.dedent("""
        import sys
        from hubbot.chart import Point, size_vs_kld_png
        kld = float(sys.argv[1])
        pts = [Point("u/m-GGUF", "m-Q4_K_M.gguf", "gguf", "Q4_K_M", "cpu", 2_400_000, kld, 1.01, 0.93, True),
               Point("u/m-onnx", "cpu/int4", "onnx", "int4", "cpu", 2_900_000, 0.06, 1.0, 0.95, True),
               Point("u/m-GGUF", "m-F16.gguf", "gguf", "F16", "cpu", 8_000_000, 0.0, 1.0, 1.0, True)]
        sys.stdout.buffer.write(size_vs_kld_png(pts, "m: size vs. loss"))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TZ": "Asia/Kolkata", "SOURCE_DATE_EPOCH": "1"}

    def render(kld: str) -> bytes:
        return subprocess.run([sys.executable, "-c", script, kld], env=env, check=True, capture_output=True).stdout

    from hubbot.chart import Point, size_vs_kld_png

    first, second = render("0.08"), render("0.08")
    other = size_vs_kld_png([Point("u/m-GGUF", "m-Q4_K_M.gguf", "gguf", "Q4_K_M", "cpu", 2_400_000, 0.09, 1.01,
                                   0.93, True)], "m: size vs. loss")
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and first == second and first != other
    assert b"Software" not in first and b"Matplotlib" not in first


def test_stored_kld_is_close_to_exact(tiny_phi3):
    """The reference's stored form (top-64 + tail) against the exact KLD over the whole vocabulary, on the
    fixture and the shipped held text: the source in fp32 against its own weights rounded to bf16."""
    from hubbot.reference import TransformersRuntime

    settings = load_family(ROOT / "recipes" / "phi.yaml").validation
    source, variant = TransformersRuntime(tiny_phi3, "float32"), TransformersRuntime(tiny_phi3, "bfloat16")
    ids, prefix = source.tokenize(settings.heldout_text)[:1024], source.tokenize("")  # 2 windows: enough here
    exact = []
    for w in windows(ids, prefix, settings.heldout_window):
        r = scored_range(w, prefix)
        exact.append(exact_kld(source.numpy_logits(w)[r.start: r.stop], variant.numpy_logits(w)[r.start: r.stop]))
    exact = np.concatenate(exact)
    stored = compare_distributions(lambda parts: map(variant.numpy_logits, parts), source_distribution(
        source.window_logits, ids, prefix, settings.heldout_window, settings.heldout_top_k))
    assert stored.positions == len(exact) > 1000
    assert 0 < stored.mean_kld <= exact.mean() * 1.001  # a lower bound (rounded to 4 digits) …
    assert stored.mean_kld >= exact.mean() * 0.99  # … within 1%
    assert abs(stored.p99_kld - np.percentile(exact, 99)) <= 0.01 * np.percentile(exact, 99)


def test_window_batches_keep_order_and_bound_tokens_and_parts():
    parts = [[1] * 100, [2] * 30, [3] * 100, [4] * 5, [5] * 100]
    assert [len(g) for g in window_batches(parts, 512)] == [5]
    assert [len(g) for g in window_batches(parts, 200)] == [2, 2, 1]  # 200 tokens // the longest part
    assert [len(g) for g in window_batches(parts, 512, most=2)] == [2, 2, 1]  # a runtime's sequence limit
    assert [p for g in window_batches(parts, 512, most=2) for p in g] == parts
