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
