"""Validation: the scoring rules, and that a variant which fails is never published."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from click.testing import CliRunner

from hubbot.cli import main
from hubbot.validate import PromptResult, first_divergence, judge

ROOT = Path(__file__).resolve().parent.parent


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 9, 3], [1, 2, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # stopped early
    assert first_divergence([1, 2, 3, 4], [1, 2, 3]) == 3  # ran past the reference's end


def _result(name, matched, total, tokens_match=True, text="x"):
    return PromptResult(name, tokens_match, matched, total, None, text)


def test_judge_pools_agreement_over_prompts_and_applies_threshold():
    report = judge("v", "Q4_K_M", 0.85, [_result("a", 9, 10), _result("b", 8, 10)])
    assert report.agreement == 0.85 and report.passed
    report = judge("v", "Q4_K_M", 0.9, [_result("a", 9, 10), _result("b", 8, 10)])
    assert not report.passed and "below 0.900" in report.reasons[0]


def test_judge_fails_on_tokenizer_mismatch_or_empty_generation():
    report = judge("v", "F16", 0.5, [_result("a", 10, 10, tokens_match=False), _result("b", 10, 10, text="")])
    assert not report.passed
    assert any("tokenization differs" in r for r in report.reasons)
    assert any("generated nothing" in r for r in report.reasons)


def test_failing_variant_is_not_published(tmp_path, hub_env, tiny_phi3):
    """llama.cpp applies Phi-3's special-token whitespace rules only when the model's name says
    phi3: renamed, the same model tokenizes chat prompts differently from transformers, fails
    validation, and its repo stays off the Hub."""
    renamed = tmp_path / "renamed-model"
    shutil.copytree(tiny_phi3, renamed)
    result = CliRunner().invoke(main, ["publish", str(renamed), "--recipe", "edge-gguf"])
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())
    assert "FAILED" in out and "tokenization differs" in out and "count-chat" in out
    assert "not published" in result.stderr
    assert not hub_env.repo_exists("hubbot-tester/renamed-model-GGUF")
    assert not [r for r in hub_env.requests if "/commit/" in r[1] or "/preupload/" in r[1]]
    failed = Path(os.environ["HUBBOT_CACHE"]) / "failed" / "renamed-model-GGUF"
    kept = json.loads((failed / "validation.json").read_text())
    assert not any(v["passed"] for v in kept["variants"])


def test_chat_gate_fails_an_early_chat_divergence_whatever_the_agreement():
    from hubbot.validate import chat_gate

    early = PromptResult("hi-chat", True, 15, 16, 1, "x", chat=True, divergence="expected ' 2', got ' 3'")
    late = PromptResult("late-chat", True, 15, 16, 9, "x", chat=True, divergence="expected 'a', got 'b'")
    plain = PromptResult("plain", True, 15, 16, 0, "x", chat=False, divergence="expected 'a', got 'b'")
    reasons = chat_gate([early, late, plain], 4)
    assert reasons == ["chat prompt 'hi-chat': the greedy answer leaves the source's at token 1 (within the "
                       "first 4): expected ' 2', got ' 3'"]
    assert chat_gate([early], 0) == [] and chat_gate([early], 1) == []


def test_kld_gate_names_the_measurements():
    from hubbot.metrics import DistributionMetrics
    from hubbot.validate import kld_gate

    m = DistributionMetrics(2000, 0.27, 3.9, 0.86, 10.0, 10.5, 1.05, 0.003)
    assert kld_gate(m, None) == [] and kld_gate(m, 0.3) == []
    (reason,) = kld_gate(m, 0.05)
    assert "0.27 is above 0.05" in reason and "p99 3.9" in reason and "ratio 1.050" in reason
