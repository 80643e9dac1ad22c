"""The GGUF backend on the bundled example: llama.cpp's converter and quantizer, the metadata
read back with the gguf package, and validation in llama-cpp-python against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf import GGUFReader
from huggingface_hub import ModelCard

from hubbot.cli import main

THRESHOLDS = {"Q4_K_M": 0.85, "Q8_0": 0.98, "F16": 0.99}


@pytest.fixture(scope="module")
def preview(tiny_phi3, tmp_path_factory) -> Path:
    """The GGUF part of the README's main job: `hubbot publish ./examples/tiny-phi3 --recipe edge-gguf --out DIR`."""
    out = tmp_path_factory.mktemp("preview")
    result = CliRunner().invoke(main, ["publish", str(tiny_phi3), "--recipe", "edge-gguf", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out / f"{tiny_phi3.name}-GGUF"


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def test_repo_folder_has_every_file(preview, tiny_phi3):
    name = tiny_phi3.name
    assert {p.name for p in preview.iterdir()} == {
        f"{name}-Q4_K_M.gguf", f"{name}-Q8_0.gguf", f"{name}-F16.gguf", "README.md", "validation.json", "hubbot.json",
        "quality.png"}


@pytest.mark.parametrize("quant, main_type", [("Q4_K_M", "Q4_K"), ("Q8_0", "Q8_0"), ("F16", "F16")])
def test_gguf_metadata(preview, tiny_phi3, quant, main_type):
    reader = GGUFReader(str(preview / f"{tiny_phi3.name}-{quant}.gguf"))
    assert _field(reader, "general.architecture") == "phi3"
    assert _field(reader, "general.name") == tiny_phi3.name
    assert _field(reader, "general.license") == "mit"
    assert _field(reader, "tokenizer.chat_template") == (tiny_phi3 / "chat_template.jinja").read_text()
    types = {t.tensor_type.name for t in reader.tensors}
    assert main_type in types
    if quant != "F16":
        assert "F16" not in types  # really quantized, not a renamed F16 file


def test_every_variant_passed_validation(preview):
    report = json.loads((preview / "validation.json").read_text())
    by_id = {v["variant_id"]: v for v in report["variants"]}
    assert set(by_id) == {"gguf-Q4_K_M", "gguf-Q8_0", "gguf-F16"}
    for vid, v in by_id.items():
        quant = vid.removeprefix("gguf-")
        assert v["passed"] and v["executed"], v["reasons"]
        assert v["agreement"] >= THRESHOLDS[quant]
        assert all(p["tokens_match"] for p in v["prompts"])
        assert len(v["prompts"]) == 6
    assert by_id["gguf-F16"]["agreement"] == 1.0
    # over the held text quantization loses measurably, in the order of the bits, within the recipe's limits
    kld = {vid: v["distribution"]["mean_kld"] for vid, v in by_id.items()}
    assert kld["gguf-Q4_K_M"] > 10 * kld["gguf-Q8_0"] > 10 * kld["gguf-F16"] > 0
    assert all(v["distribution"]["mean_kld"] <= v["max_mean_kld"] for v in by_id.values())
    assert all(v["distribution"]["positions"] > 2000 for v in by_id.values())
    # the reference is meaningful: the source model answers the prompts correctly
    reference = {p["name"]: p["continuation"] for p in report["reference"]}
    assert reference["count"].lstrip().startswith("6, 7, 8")
    assert reference["days"].lstrip().startswith("Thursday, Friday")


def test_card_metadata_and_tables(preview, tiny_phi3):
    card = ModelCard.load(preview / "README.md")
    assert card.data.library_name == "gguf"
    assert card.data.license == "mit"
    assert card.data.pipeline_tag == "text-generation"
    assert {"gguf", "phi3", "quantized", "hubbot"} <= set(card.data.tags)
    manifest = json.loads((preview / "hubbot.json").read_text())
    for quant in THRESHOLDS:
        assert f"`{tiny_phi3.name}-{quant}.gguf`" in card.text
    assert manifest["recipe"]["hash"] in card.text
    assert "llama-cli --hf-repo local/" in card.text
    assert "## Validation" in card.text and "## Provenance" in card.text


def test_rerun_to_same_folder_is_up_to_date(preview, tiny_phi3):
    before = {p.name: p.stat().st_mtime_ns for p in preview.iterdir()}
    result = CliRunner().invoke(main, ["publish", str(tiny_phi3), "--recipe", "edge-gguf",
                                       "--out", str(preview.parent)])
    assert result.exit_code == 0, result.output
    assert "up to date" in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in preview.iterdir()} == before


def _bf16_copy(source: Path, folder: Path) -> Path:
    """The example as a bf16 release ships (Phi's dtype): the weights rounded to bf16."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    weights = load_file(source / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_f16_alone_is_the_converters_own_output(tiny_phi3, tmp_path):
    """A fan-out job that builds only F16 from a bf16 source: the converter writes F16 directly and
    the file is moved into place, with no BF16 intermediate beside it (phi-4: 29 GB of disk, not 58);
    the plan's disk estimate says the same."""
    source = _bf16_copy(tiny_phi3, tmp_path / "tiny-phi3-bf16")
    out = tmp_path / "built"
    run = CliRunner().invoke(main, ["build", str(source), "--recipe", "edge-gguf", "--variant", "gguf-F16",
                                    "--out", str(out), "--workdir", str(tmp_path / "work")])
    assert run.exit_code == 0, run.output
    assert "to F16 GGUF" in run.stderr and "gguf-F16: the F16 conversion itself" in run.stderr
    [gguf] = out.rglob("*.gguf")
    reader = GGUFReader(gguf)
    assert {t.tensor_type.name for t in reader.tensors} <= {"F16", "F32"}
    result = json.loads((out / "build.json").read_text())["result"]
    assert result["report"]["passed"] and result["report"]["agreement"] >= THRESHOLDS["F16"]
    assert result["details"]["intermediate"] == "F16"

    plan = CliRunner().invoke(main, ["plan", str(source), "--recipe", "edge-gguf", "--json"])
    variants = {v["id"]: v for r in json.loads(plan.stdout)["repos"] for v in r["variants"]}
    assert variants["gguf-F16"]["estimated_disk_bytes"] == variants["gguf-F16"]["estimated_bytes"]
    assert variants["gguf-Q8_0"]["estimated_disk_bytes"] > variants["gguf-Q8_0"]["estimated_bytes"]


def test_batched_passes_equal_llama_cpp_python_one_sequence_at_a_time(preview, tiny_phi3):
    """The runtime runs several sequences to a forward pass in a llama.cpp context of its own (an
    out-of-core model is read once per pass); each sequence must get exactly what llama-cpp-python's
    own Llama gives it alone: the logits at every position, and its greedy continuation."""
    import gc

    import numpy as np
    from llama_cpp import Llama

    from hubbot.backends.gguf import LlamaCppRuntime

    path = preview / f"{tiny_phi3.name}-Q4_K_M.gguf"
    texts = ["Count: 1, 2, 3, 4, 5,", "The capital of France is", "def add(a, b):\n    return", "Hi"]
    alone = Llama(model_path=str(path), n_ctx=1024, logits_all=True, verbose=False, n_threads=1, seed=0)

    def logits_alone(ids):
        alone.reset()
        alone.eval(list(ids))
        return np.array(alone.scores[: len(ids)], dtype=np.float32)

    def greedy_alone(ids, n, stop):
        out = []
        logits = logits_alone(ids)[-1]
        while len(out) < n and (not out or out[-1] not in stop):
            out.append(int(logits.argmax()))
            logits = logits_alone(list(ids) + out)[-1]
        return out

    for tokens_per_pass in (512, 8):  # all in one pass (the default); one sequence to a pass
        runtime = LlamaCppRuntime(path, tokens_per_pass=tokens_per_pass)
        sequences = [runtime.tokenize(t) for t in texts]
        batched = list(runtime.window_logits(sequences))
        assert [b.shape[0] for b in batched] == [len(s) for s in sequences]
        for got, ids in zip(batched, sequences):
            np.testing.assert_allclose(got, logits_alone(ids), atol=1e-4)
        assert runtime.top1_all(sequences) == [logits_alone(s).argmax(-1).tolist() for s in sequences]
        stop, lengths = runtime.stop_ids(), [16, 5, 16, 1]
        steps = []
        generated = runtime.generate_all(sequences, lengths, stop, steps.append)
        assert generated == [greedy_alone(s, n, stop) for s, n in zip(sequences, lengths)]
        assert steps == list(range(1, max(map(len, generated)) + 1))
        assert runtime.generate(sequences[0], 16, stop) == generated[0]
        unfinished = runtime.window_logits(sequences)
        next(unfinished)  # a pass left open (an error mid-way) when the runtime is closed
        runtime.close()
        del unfinished  # its context is freed once, before the model was: no crash
        gc.collect()
    alone.close()
