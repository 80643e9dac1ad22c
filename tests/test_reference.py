"""The validation reference: computed in the source's dtype, cached per source commit, reusable by build jobs."""

from __future__ import annotations

import json
import shutil

from click.testing import CliRunner

from hubbot.cli import main


def _bf16_copy(src, dst):
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst)
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).to(torch.bfloat16).save_pretrained(dst)
    return dst


def test_reference_runs_in_the_source_dtype_and_is_cached(tiny_phi3, tmp_path):
    source = _bf16_copy(tiny_phi3, tmp_path / "tiny-phi3")
    runner = CliRunner()
    first = runner.invoke(main, ["reference", str(source), "--out", str(tmp_path / "ref.json")])
    assert first.exit_code == 0, first.output
    assert "(bfloat16, memory-mapped)" in first.stderr
    data = json.loads((tmp_path / "ref.json").read_text())
    assert data["dtype"] == "bfloat16" and len(data["prompts"]) == 6
    assert all(p["continuation"] for p in data["prompts"])
    second = runner.invoke(main, ["reference", str(source), "--out", str(tmp_path / "again.json")])
    assert second.exit_code == 0, second.output
    assert "using the cached reference" in second.stderr and "running the source model" not in second.stderr
    assert (tmp_path / "again.json").read_text() == (tmp_path / "ref.json").read_text()


def test_build_reuses_a_passed_reference_and_refuses_one_of_another_source(tiny_phi3, tmp_path):
    runner = CliRunner()
    made = runner.invoke(main, ["reference", str(tiny_phi3), "--out", str(tmp_path / "ref.json")])
    assert made.exit_code == 0, made.output
    built = runner.invoke(main, ["build", str(tiny_phi3), "--recipe", "edge-gguf", "--variant", "gguf-Q8_0",
                                 "--out", str(tmp_path / "q8"), "--reference", str(tmp_path / "ref.json")])
    assert built.exit_code == 0, built.output
    assert f"using the reference in {tmp_path / 'ref.json'}" in built.stderr
    assert "running the source model" not in built.stderr
    report = json.loads((tmp_path / "q8" / "build.json").read_text())["result"]["report"]
    assert report["passed"] and report["agreement"] == 1.0

    other = json.loads((tmp_path / "ref.json").read_text())
    other["key"], other["source_commit"] = "0" * 24, "local:someothermodel"
    (tmp_path / "other.json").write_text(json.dumps(other))
    refused = runner.invoke(main, ["build", str(tiny_phi3), "--recipe", "edge-gguf", "--variant", "gguf-Q8_0",
                                   "--out", str(tmp_path / "q8b"), "--reference", str(tmp_path / "other.json")])
    assert refused.exit_code == 2, refused.output
    assert "local:someothermodel" in refused.stderr and "Traceback" not in refused.output
    assert not (tmp_path / "q8b" / "build.json").exists()

    (tmp_path / "junk.json").write_text("{not json")
    junk = runner.invoke(main, ["build", str(tiny_phi3), "--recipe", "edge-gguf", "--variant", "gguf-Q8_0",
                                "--out", str(tmp_path / "q8c"), "--reference", str(tmp_path / "junk.json")])
    assert junk.exit_code == 2 and "not a hubbot reference" in junk.stderr


def test_one_batch_gives_each_prompt_its_own_greedy_answer(tiny_phi3):
    """The reference decodes every prompt in one left-padded batch and reads the margins off the decoding
    steps; each answer and margin must be what the prompt gets alone (greedy, then a teacher-forced pass)."""
    import torch

    from hubbot.recipe import load_families
    from hubbot.reference import TransformersRuntime

    settings = load_families()["phi"].validation
    rt = TransformersRuntime(tiny_phi3, "float32")
    prompts = [rt.tokenize(rt.render(p)) for p in settings.prompts]
    assert len({len(p) for p in prompts}) > 1  # the batch really is padded
    batched = rt.generate_all(prompts, settings.max_new_tokens, rt.stop_ids)
    for ids, (continuation, margin) in zip(prompts, batched):
        alone = rt.model.generate(torch.tensor([ids]), max_new_tokens=settings.max_new_tokens, do_sample=False,
                                  eos_token_id=rt.stop_ids, pad_token_id=rt.stop_ids[0])[0, len(ids):].tolist()
        if alone and alone[-1] in rt.stop_ids:
            assert continuation == alone
        else:
            assert continuation == alone[: len(continuation)] and len(continuation) == settings.max_new_tokens
        scored = rt.logits(ids + continuation)[len(ids) - 1: len(ids) - 1 + len(continuation)].topk(2, -1).values
        assert abs(margin - float((scored[:, 0] - scored[:, 1]).min())) < 1e-3


def test_held_text_windows_in_one_pass_match_each_window_alone(tiny_phi3):
    import numpy as np

    from hubbot.metrics import windows
    from hubbot.recipe import load_families
    from hubbot.reference import TransformersRuntime

    settings = load_families()["phi"].validation
    rt = TransformersRuntime(tiny_phi3, "float32")
    parts = windows(rt.tokenize(settings.heldout_text), rt.tokenize(""), settings.heldout_window)
    assert len(parts) > 2 and len(parts[-1]) < len(parts[0])  # the last one is padded
    together = list(rt.window_logits(parts, tokens_per_pass=2 * settings.heldout_window))
    assert len(together) == len(parts)
    for w, logits in zip(parts, together):
        assert logits.shape == (len(w), rt.model.config.vocab_size)
        np.testing.assert_allclose(logits, rt.numpy_logits(w), atol=2e-4)
