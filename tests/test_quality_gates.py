"""The held-text KLD gate and the chat-path gate fail real quantization loss, and pass what is close.

Both run real llama.cpp quantizations of the tiny Phi-3 and publish to a folder: the KLD gate on the
example itself (Q3_K_M loses ~0.27 nats a token on the held text, Q8_0 ~0.001), the chat gate on a
copy with noisy weights (tests/lossy) whose small margins let Q2_K's greedy chat answer change.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from hubbot.cli import main
from tests.conftest import ROOT
from tests.lossy import noisy_copy

pytestmark = pytest.mark.slow  # each converts, quantizes and validates twice (~30-60 s)


def _recipes(folder: Path, variants: list[dict], **validation) -> Path:
    """recipes/phi.yaml plus a recipe `gate` of ``variants``, its validation settings updated."""
    data = yaml.safe_load((ROOT / "recipes" / "phi.yaml").read_text())
    data["recipes"]["gate"] = {"variants": variants}
    data["validation"].update(validation)
    folder.mkdir()
    (folder / "phi.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


def _publish(recipes: Path, source: Path, out: Path):
    return CliRunner().invoke(main, ["--recipes-dir", str(recipes), "publish", str(source), "--recipe", "gate",
                                     "--out", str(out)])


def _kept_report(repo: str) -> dict[str, dict]:
    kept = Path(os.environ["HUBBOT_CACHE"]) / "failed" / repo / "validation.json"
    return {v["variant_id"]: v for v in json.loads(kept.read_text())["variants"]}


def test_kld_gate_fails_a_lossy_variant_and_passes_a_close_one(tiny_phi3, tmp_path):
    """A limit between what Q8_0 and Q3_K_M really lose: Q3_K_M fails on KLD alone (its top-1 agreement on
    the prompts is 1.000), Q8_0 passes, and the repo is not published."""
    recipes = _recipes(tmp_path / "recipes", [{"format": "gguf", "precision": "Q8_0"},
                                              {"format": "gguf", "precision": "Q3_K_M"}],
                       max_mean_kld={"int8": 0.05, "int3": 0.05})
    result = _publish(recipes, tiny_phi3, tmp_path / "out")
    assert result.exit_code == 1, result.output
    assert not (tmp_path / "out" / f"{tiny_phi3.name}-GGUF").exists()
    by_id = _kept_report(f"{tiny_phi3.name}-GGUF")
    q8, q3 = by_id["gguf-Q8_0"], by_id["gguf-Q3_K_M"]
    assert q8["passed"] and q8["distribution"]["mean_kld"] < 0.05
    assert not q3["passed"] and q3["agreement"] >= q3["threshold"]
    [reason] = q3["reasons"]
    assert "mean KL divergence from the source over the held text" in reason and "above 0.05" in reason
    assert q3["distribution"]["mean_kld"] > 0.05 and q3["distribution"]["perplexity_ratio"] != 1.0


def test_chat_gate_fails_an_early_chat_divergence_whatever_the_agreement(tiny_phi3, tmp_path):
    """On the noisy copy Q2_K's agreement (~0.68) clears the int2 threshold (0.4) and its KLD the recipe's
    int2 limit, but its greedy answer to a chat prompt leaves the source's at once: it fails, naming the
    prompt, the position and both texts; Q8_0 passes."""
    source = noisy_copy(tiny_phi3, tmp_path / "src" / "tiny-phi3")  # the name keeps llama.cpp's phi3 rules
    recipes = _recipes(tmp_path / "recipes", [{"format": "gguf", "precision": "Q8_0"},
                                              {"format": "gguf", "precision": "Q2_K"}], chat_gate_tokens=4)
    result = _publish(recipes, source, tmp_path / "out")
    assert result.exit_code == 1, result.output
    by_id = _kept_report("tiny-phi3-GGUF")
    q8, q2 = by_id["gguf-Q8_0"], by_id["gguf-Q2_K"]
    assert q8["passed"], q8["reasons"]
    assert not q2["passed"] and q2["agreement"] >= q2["threshold"]
    assert q2["distribution"]["mean_kld"] <= q2["max_mean_kld"]
    assert q2["reasons"] and all(r.startswith("chat prompt '") for r in q2["reasons"])
    chat = [p for p in q2["prompts"] if p["chat"] and p["first_divergence"] is not None and p["first_divergence"] < 4]
    assert chat, q2["prompts"]
    for p in chat:
        assert any(f"'{p['name']}'" in r and f"at token {p['first_divergence']}" in r and p["divergence"] in r
                   for r in q2["reasons"])
        assert p["divergence"].startswith("expected '") and ", got '" in p["divergence"]
