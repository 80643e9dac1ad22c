"""The OpenVINO backend on the bundled example: optimum-intel's export with NNCF weight
compression, the IR read back, and validation in OpenVINO GenAI against transformers — into a
folder and onto the local Hub server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import HfApi, ModelCard

from hubbot.backends import OptionError, get_backend
from hubbot.backends.openvino import compression_parameters, export_command, weight_types
from hubbot.cli import main
from tests.conftest import ROOT, SENTINEL_TOKEN, USER

IR_FILES = {"openvino_model.xml", "openvino_model.bin", "openvino_tokenizer.xml", "openvino_tokenizer.bin",
            "openvino_detokenizer.xml", "openvino_detokenizer.bin"}
REPO_FILES = IR_FILES | {"config.json", "generation_config.json", "README.md", "validation.json", "hubbot.json"}
VARIANTS = {"int4": ("openvino-int4_asym", "u4", 0.85), "int8": ("openvino-int8_asym", "u8", 0.98)}


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> Path:
    """The shipped phi recipes plus `ov` (int4 + int8) and two that the plan must refuse."""
    folder = tmp_path_factory.mktemp("recipes")
    family = yaml.safe_load((ROOT / "recipes" / "phi.yaml").read_text())
    family["recipes"]["ov"] = {"description": "OpenVINO int4 and int8", "variants": [
        {"format": "openvino", "precision": "int4"}, {"format": "openvino", "precision": "int8"}]}
    family["recipes"]["ov-clash"] = {"description": "two int4 modes land in one repo", "variants": [
        {"format": "openvino", "precision": "int4_sym"}, {"format": "openvino", "precision": "int4_asym"}]}
    family["recipes"]["ov-gpu"] = {"description": "a GPU variant", "variants": [
        {"format": "openvino", "precision": "int4_sym", "target": "gpu", "options": {"group_size": 64}}]}
    (folder / "phi.yaml").write_text(yaml.safe_dump(family, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def preview(tiny_phi3, recipes, tmp_path_factory) -> Path:
    """`hubbot publish ./examples/tiny-phi3 --recipe ov --out DIR`."""
    out = tmp_path_factory.mktemp("preview")
    result = CliRunner().invoke(main, ["--recipes-dir", str(recipes), "publish", str(tiny_phi3),
                                       "--recipe", "ov", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


# -- fast: no export ----------------------------------------------------------------------

def test_plan_names_one_repo_per_precision(tiny_phi3, recipes):
    result = CliRunner().invoke(main, ["--recipes-dir", str(recipes), "plan", str(tiny_phi3), "--recipe", "ov",
                                       "--json", "--namespace", "me"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    repos = {r["repo_id"]: r["variants"] for r in plan["repos"]}
    assert set(repos) == {f"me/{tiny_phi3.name}-int4-ov", f"me/{tiny_phi3.name}-int8-ov"}
    [int4] = repos[f"me/{tiny_phi3.name}-int4-ov"]
    assert (int4["id"], int4["path"], int4["native"], int4["target"]) == ("openvino-int4_asym", "", "int4_asym", "cpu")
    [gpu] = json.loads(CliRunner().invoke(main, ["--recipes-dir", str(recipes), "plan", str(tiny_phi3), "--recipe",
                                                 "ov-gpu", "--json"]).stdout)["repos"]
    assert gpu["variants"][0]["id"] == "openvino-int4_sym-gpu-group_size-64"


def test_two_variants_in_one_repo_are_refused(tiny_phi3, recipes):
    result = CliRunner().invoke(main, ["--recipes-dir", str(recipes), "plan", str(tiny_phi3), "--recipe", "ov-clash"])
    assert result.exit_code == 2
    assert "naming.openvino" in result.output


def test_bad_option_type_is_a_recipe_error(tiny_phi3, recipes, tmp_path):
    family = yaml.safe_load((recipes / "phi.yaml").read_text())
    family["recipes"]["ov"]["variants"][0]["options"] = {"group_size": "big"}
    (tmp_path / "phi.yaml").write_text(yaml.safe_dump(family))
    result = CliRunner().invoke(main, ["--recipes-dir", str(tmp_path), "plan", str(tiny_phi3), "--recipe", "ov"])
    assert result.exit_code == 2
    assert "options.group_size" in result.output


def test_export_command_maps_options(tiny_phi3):
    cmd = export_command(tiny_phi3, "int4_sym", {"group_size": 64, "ratio": 0.8, "awq": True,
                                                  "scale_estimation": True, "all_layers": False})
    args = cmd[cmd.index("export"):]
    assert args[:8] == ["export", "openvino", "-m", str(tiny_phi3), "--task", "text-generation-with-past",
                        "--weight-format", "int4"]
    assert {"--sym", "--awq", "--scale-estimation"} <= set(args) and "--all-layers" not in args
    assert args[args.index("--group-size") + 1] == "64" and args[args.index("--ratio") + 1] == "0.8"
    assert args[args.index("--dataset") + 1] == "auto"  # scale estimation needs data: built offline
    assert "--dataset" not in export_command(tiny_phi3, "int4_asym", {"awq": True})  # data-free AWQ
    assert "--sym" not in export_command(tiny_phi3, "int8_asym", {})
    with pytest.raises(OptionError, match="4-bit"):
        get_backend("openvino").check_options("int8_asym", "cpu", {"group_size": 64})


# -- slow: real exports ---------------------------------------------------------------------

@pytest.mark.slow
def test_repos_hold_ir_and_tokenizer(preview, tiny_phi3):
    for precision in VARIANTS:
        repo = preview / f"{tiny_phi3.name}-{precision}-ov"
        files = {p.name for p in repo.iterdir()}
        assert REPO_FILES <= files, REPO_FILES - files
        # the source's own tokenizer files, byte for byte
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
            assert (repo / name).read_bytes() == (tiny_phi3 / name).read_bytes()
        assert str(tiny_phi3) not in (repo / "openvino_config.json").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("precision", VARIANTS)
def test_weights_are_compressed_as_asked(preview, tiny_phi3, precision):
    model_xml = preview / f"{tiny_phi3.name}-{precision}-ov" / "openvino_model.xml"
    _, weight_type, _ = VARIANTS[precision]
    assert weight_type in weight_types(model_xml)
    params = compression_parameters(model_xml)
    assert params["mode"] == f"{precision}_asym"
    if precision == "int4":
        assert (params["group_size"], params["ratio"], params["awq"]) == (128, 1.0, False)


@pytest.mark.slow
def test_every_variant_passed_validation(preview, tiny_phi3):
    for precision, (vid, _, threshold) in VARIANTS.items():
        report = json.loads((preview / f"{tiny_phi3.name}-{precision}-ov" / "validation.json").read_text())
        [v] = report["variants"]
        assert v["variant_id"] == vid
        assert v["passed"] and v["executed"], v["reasons"]
        assert v["agreement"] >= threshold
        assert len(v["prompts"]) == 6 and all(p["tokens_match"] for p in v["prompts"])
        assert 0 < v["distribution"]["mean_kld"] <= v["max_mean_kld"]
        assert v["inspection"]["chat_template_matches_source"]
        count = next(p for p in v["prompts"] if p["name"] == "count")
        assert count["generated_text"].lstrip().startswith("6, 7, 8")


@pytest.mark.slow
def test_card_metadata_and_sections(preview, tiny_phi3):
    repo = preview / f"{tiny_phi3.name}-int4-ov"
    card = ModelCard.load(repo / "README.md")
    assert card.data.library_name == "openvino"
    assert card.data.license == "mit"
    assert card.data.pipeline_tag == "text-generation"
    assert {"openvino", "nncf", "phi3", "quantized", "hubbot"} <= set(card.data.tags)
    for section in ("## Quantization parameters", "## Compatibility", "## Usage", "## Validation", "## Provenance"):
        assert section in card.text
    assert "| `openvino-int4_asym` | int4_asym | 128 | 1.0 |" in card.text
    assert "openvino_genai.LLMPipeline" in card.text and "OVModelForCausalLM" in card.text
    manifest = json.loads((repo / "hubbot.json").read_text())
    assert manifest["recipe"]["hash"] in card.text
    assert set(manifest["files"]) >= IR_FILES


@pytest.mark.slow
def test_rerun_to_same_folder_is_up_to_date(preview, tiny_phi3, recipes):
    repo = preview / f"{tiny_phi3.name}-int8-ov"
    before = {p.name: p.stat().st_mtime_ns for p in repo.iterdir()}
    result = CliRunner().invoke(main, ["--recipes-dir", str(recipes), "publish", str(tiny_phi3), "--recipe", "ov",
                                       "--out", str(preview)])
    assert result.exit_code == 0, result.output
    assert result.stderr.count("up to date") == 2
    assert {p.name: p.stat().st_mtime_ns for p in repo.iterdir()} == before


@pytest.mark.slow
def test_publish_to_hub_one_commit_per_repo_and_genai_runs_it(hub_env, tiny_phi3, recipes, tmp_path):
    hub = hub_env
    source = "microsoft/Phi-3-tiny-test"
    sha = hub.seed_repo(source, {p.name: p for p in tiny_phi3.iterdir() if p.is_file()})
    result = CliRunner().invoke(main, ["--recipes-dir", str(recipes), "publish", source, "--recipe", "ov"])
    assert result.exit_code == 0, result.output
    for precision in VARIANTS:
        repo = f"{USER}/Phi-3-tiny-test-{precision}-ov"
        assert len([c for c in hub.commits(repo) if c.title.startswith("hubbot:")]) == 1
        files = hub.files(repo)
        assert REPO_FILES <= set(files)
        card = ModelCard(files["README.md"].decode())
        assert (card.data.base_model, card.data.base_model_relation) == (source, "quantized")
        assert sha in card.text
        assert json.loads(files["openvino_config.json"])["quantization_config"].get("tokenizer") in (None, source)

    # what a user does: download the repo and run it with OpenVINO GenAI alone
    import openvino_genai

    api = HfApi(endpoint=hub.url, token=SENTINEL_TOKEN)
    folder = api.snapshot_download(f"{USER}/Phi-3-tiny-test-int4-ov", local_dir=tmp_path / "dl")
    pipe = openvino_genai.LLMPipeline(folder, "CPU")
    text = pipe.generate("Count: 1, 2, 3, 4, 5,", max_new_tokens=8, apply_chat_template=False)
    assert text.lstrip().startswith("6, 7, 8")
    chat = pipe.generate("Count from 1 to 10.", max_new_tokens=24, apply_chat_template=True)
    assert chat.startswith("1, 2, 3")
    del pipe
    shutil.rmtree(folder)
