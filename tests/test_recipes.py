"""Recipes and sources: the shipped recipe file is valid, and every malformed input gives one
clear error (file, key path, what is allowed), exit code 2, and nothing on the Hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from hubbot.cli import main
from hubbot.plan import make_plan
from hubbot.recipe import load_families, load_family
from hubbot.source import resolve
from tests.test_bad_inputs import assert_refused

ROOT = Path(__file__).resolve().parent.parent
PHI = ROOT / "recipes" / "phi.yaml"


def test_shipped_recipes_load_and_plan():
    families = load_families(ROOT / "recipes")
    phi = families["phi"]
    assert {"phi-3-mini-4k", "phi-3-mini-128k", "phi-3.5-mini", "phi-4", "phi-4-mini",
            "phi-4-mini-reasoning"} <= set(phi.models)
    assert {"edge", "pc", "server", "all"} <= set(phi.recipes)
    plan = make_plan(resolve("phi-4", families), phi.recipe("edge"))
    assert [r.repo_id("me") for r in plan.repos] == [
        "me/phi-4-GGUF", "me/phi-4-onnx", "me/phi-4-int4-ov", "me/phi-4-int8-ov", "me/phi-4-4bit", "me/phi-4-8bit"]
    repo = plan.repos[0]
    assert [v.path for v in repo.variants] == ["phi-4-Q4_K_M.gguf", "phi-4-Q8_0.gguf", "phi-4-F16.gguf"]
    assert [v.min_agreement for v in repo.variants] == [0.85, 0.98, 0.99]


def test_sources_resolve_offline(tiny_phi3):
    families = load_families(ROOT / "recipes")
    hub = resolve("microsoft/Phi-4-mini-instruct@abc123", families)
    assert (hub.repo_id, hub.revision, hub.model_name, hub.license) == (
        "microsoft/Phi-4-mini-instruct", "abc123", "Phi-4-mini-instruct", "mit")
    local = resolve(str(tiny_phi3), families)
    assert local.is_local and local.family.name == "phi" and local.model_name == tiny_phi3.name


def test_plan_cli_json(tiny_phi3):
    result = CliRunner().invoke(main, ["plan", str(tiny_phi3), "--recipe", "pc", "--json", "--namespace", "me"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["format"] for r in data["repos"]] == ["gguf", "onnx", "openvino", "openvino", "openvino"]
    repo = data["repos"][0]
    assert repo["repo_id"] == f"me/{tiny_phi3.name}-GGUF"
    assert [v["native"] for v in repo["variants"]] == ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16"]
    assert all(v["estimated_bytes"] > 0 for v in repo["variants"])  # from the safetensors headers


def _edit(data: dict, path: str, value) -> dict:
    """Set (or with value=DELETE remove) a dotted key path like recipes.edge.variants.0.precision."""
    keys = path.split(".")
    node = data
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    last = int(keys[-1]) if isinstance(node, list) else keys[-1]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


DELETE = object()
BAD_RECIPES = [
    # (edit, expected pieces of the message)
    ("recipies", {"edge": {}}, ["recipies", "unknown key"]),
    ("recipes.edge.variants.0.precison", "int4", ["recipes.edge.variants[0].precison", "unknown key", "precision"]),
    ("recipes.edge.variants.0.precision", "Q4_K_X", ["recipes.edge.variants[0].precision", "Q4_K_X", "Q4_K_M"]),
    ("recipes.edge.variants.0.format", "tflite", ["recipes.edge.variants[0].format", "tflite", "gguf"]),
    ("recipes.edge.variants.0.target", "cuda", ["recipes.edge.variants[0].target", "cuda", "any"]),
    ("recipes.edge.variants.0.options", {"pure": "yes"}, ["recipes.edge.variants[0].options.pure", "bool"]),
    ("recipes.edge.variants.0.min_agreement", 1.5, ["recipes.edge.variants[0].min_agreement", "from 0 to 1"]),
    ("recipes.edge.variants", [], ["recipes.edge.variants", "at least one"]),
    ("naming.gguf.repo", "{modle}-GGUF", ["naming.gguf.repo", "{modle}", "{model}"]),
    ("naming.gguf.path", "{model-{quant}.gguf", ["naming.gguf.path", "bad template"]),
    ("naming.gguf.repo", "someone/{model}", ["naming.gguf.repo", "without namespace"]),
    ("validation.thresholds.int4", 2, ["validation.thresholds.int4", "from 0 to 1"]),
    ("validation.thresholds.int44", 0.5, ["validation.thresholds.int44", "unknown key"]),
    ("validation.prompts.0.chat", "hello", ["validation.prompts[0]", "exactly one of 'text'"]),
    ("models.phi-4.repo", "phi-4", ["models.phi-4.repo", "owner/name"]),
    ("watch.default_recipe", "laptop", ["watch.default_recipe", "laptop", "edge"]),
    ("family", DELETE, ["(top level)", "missing required key 'family'"]),
    # option values are checked by the format's backend while the recipe is parsed, not at build time
    ("recipes.edge.variants.3.options.algo", "awq", ["recipes.edge.variants[3].options", "algo", "'awq'", "rtn"]),
    ("recipes.edge.variants.3.options.block_size", 48, ["recipes.edge.variants[3].options", "block_size", "48"]),
    ("recipes.edge.variants.4.options", {"block_size": 32}, ["recipes.edge.variants[4].options", "fp32 takes no"]),
    ("recipes.edge.variants.7.options", {"group_size": 64}, ["recipes.edge.variants[7].options", "4-bit"]),
    ("recipes.edge.variants.8.options", {"group_size": 48}, ["recipes.edge.variants[8].options", "32, 64, 128"]),
    ("recipes.edge.variants.9.options", {"dtype": "float8"}, ["recipes.edge.variants[9].options", "'float8'"]),
]


@pytest.mark.parametrize("key, value, expected", BAD_RECIPES, ids=[b[0] for b in BAD_RECIPES])
def test_malformed_recipe_exits_2_and_pushes_nothing(tmp_path, hub_env, tiny_phi3, key, value, expected):
    data = yaml.safe_load(PHI.read_text())
    bad_dir = tmp_path / "recipes"
    bad_dir.mkdir()
    if key == "recipies":
        data["recipies"] = value
    else:
        _edit(data, key, value)
    (bad_dir / "phi.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    result = CliRunner().invoke(main, ["--recipes-dir", str(bad_dir), "publish", str(tiny_phi3), "--recipe", "edge"])
    assert_refused(result, hub_env, 2, [str(bad_dir / "phi.yaml"), *expected])  # and nothing but GETs on the Hub


def test_invalid_yaml_names_the_line(tmp_path):
    bad = tmp_path / "phi.yaml"
    bad.write_text(PHI.read_text().replace("recipes:\n", "recipes:\n  edge: [unclosed\n", 1))
    with pytest.raises(Exception) as err:
        load_family(bad)
    assert str(bad) in str(err.value) and "line" in str(err.value) and "not valid YAML" in str(err.value)


def _folder(tmp_path: Path, tiny_phi3: Path, drop: str | None = None, config: dict | None = None) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_phi3, folder)
    if drop:
        for f in folder.glob(drop):
            f.unlink()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


BAD_SOURCES = [
    ("unknown-alias", lambda tmp, tiny: "phi-9000", ["phi-9000", "not a family alias", "phi-4"]),
    ("missing-folder", lambda tmp, tiny: str(tmp / "nope" / "model"), ["not a family alias", "existing folder"]),
    ("no-config", lambda tmp, tiny: str(_folder(tmp, tiny, drop="config.json")), ["no config.json"]),
    ("no-weights", lambda tmp, tiny: str(_folder(tmp, tiny, drop="*.safetensors")), ["no *.safetensors"]),
    ("unknown-arch", lambda tmp, tiny: str(_folder(tmp, tiny, config={"architectures": ["LlamaForCausalLM"]})),
     ["LlamaForCausalLM", "belongs to no family"]),
    ("hub-id-no-family", lambda tmp, tiny: "someone/llama-7b", ["someone/llama-7b", "--family"]),
]


@pytest.mark.parametrize("name, make, expected", BAD_SOURCES, ids=[b[0] for b in BAD_SOURCES])
def test_bad_source_exits_2_and_pushes_nothing(tmp_path, hub_env, tiny_phi3, name, make, expected):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    data = yaml.safe_load(PHI.read_text())
    (recipes / "phi.yaml").write_text(yaml.safe_dump(data))
    (recipes / "other.yaml").write_text(yaml.safe_dump({**data, "family": "other", "models": {}, "architectures": []}))
    result = CliRunner().invoke(main, ["--recipes-dir", str(recipes), "publish", make(tmp_path, tiny_phi3)])
    assert_refused(result, hub_env, 2, expected)


def test_unknown_recipe_name(tiny_phi3):
    result = CliRunner().invoke(main, ["publish", str(tiny_phi3), "--recipe", "laptop", "--out", "unused"])
    assert_refused(result, None, 2, ["no recipe 'laptop'", "known: edge"])


@pytest.mark.parametrize("command", [["plan", "phi-4"], ["publish", "phi-4", "--out", "unused"],
                                     ["build", "phi-4", "--variant", "gguf-Q4_K_M", "--out", "unused"]])
def test_unknown_family_lists_the_known_ones(command, hub_env):
    result = CliRunner().invoke(main, [*command, "--family", "nope"])
    assert_refused(result, hub_env, 2, ["unknown family 'nope'; known: phi"])
    assert not hub_env.requests


def test_missing_toolchain_names_the_extra_to_install(tiny_phi3, monkeypatch, tmp_path):
    """A format whose toolchain is not importable fails before any work, naming the pip extra."""
    from hubbot.backends.mlx import MLXBackend

    monkeypatch.setattr(MLXBackend, "required_modules", ("mlx_lm_not_installed_here",))
    result = CliRunner().invoke(main, ["publish", str(tiny_phi3), "--recipe", "edge", "--out", str(tmp_path)])
    assert_refused(result, None, 3, ["mlx_lm_not_installed_here", "pip install 'hubbot[mlx]'"])
    assert not any(tmp_path.iterdir())  # nothing was built
