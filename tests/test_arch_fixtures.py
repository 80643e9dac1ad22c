"""PhiMoE and Phi-2 for real: the tiny fixtures of tests/archfixtures built, planned, published through
the test Hub with every format whose tool can build them validated, and a watch pass over one seeded
release of each row of the support table (issue 13's table) recording published / partial / unsupported
once. Building a fixture takes minutes and publishing one runs every tool: those tests are slow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from hubbot.backends.support import ONNX_PHIMOE_BROKEN, canonical_architecture, named_for_tools
from hubbot.cli import main
from hubbot.ledger import Ledger
from tests.archfixtures import SPECS, cached_arch_model
from tests.conftest import ROOT, SENTINEL_TOKEN, USER
from tests.test_preflight import write_sparse_safetensors
from tests.test_support import MOE, SMALL, _folder, phimoe_tensors

LONG = {"max_position_embeddings": 131072, "original_max_position_embeddings": 4096}
ONNX_DROPPED = {"onnx-cpu-int4-rtn-block-32-acc-level-4", "onnx-cpu-fp32", "onnx-gpu-int4-rtn-block-32"}
# the edge recipe's repos for a release named NAME, per fixture
EDGE_REPOS = {"phimoe": ["GGUF", "int4-ov", "int8-ov", "4bit", "8bit"],
              "phi2": ["GGUF", "onnx", "int4-ov", "int8-ov", "4bit", "8bit"]}
RELEASES = {"phimoe": "microsoft/Phi-3.5-MoE-tiny-test", "phi2": "microsoft/phi-2-tiny-test"}


def phi_tensors(shape: dict[str, int]) -> dict[str, list[int]]:
    """PhiForCausalLM's tensors as phi-2 stores them (biases everywhere, fc1/fc2, final_layernorm)."""
    h, inter, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    tensors = {"lm_head.weight": [vocab, h], "lm_head.bias": [vocab], "model.embed_tokens.weight": [vocab, h],
               "model.final_layernorm.weight": [h], "model.final_layernorm.bias": [h]}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name, dims in {"input_layernorm": [h], "self_attn.q_proj": [h, h], "self_attn.k_proj": [h, h],
                           "self_attn.v_proj": [h, h], "self_attn.dense": [h, h], "mlp.fc1": [inter, h],
                           "mlp.fc2": [h, inter]}.items():
            tensors |= {f"{p}{name}.weight": dims, f"{p}{name}.bias": dims[:1]}
    return dict(sorted(tensors.items()))


def _plan(*args: str):
    return CliRunner().invoke(main, ["plan", *args])


# ----------------------------------------------------------------------------- fast: tables and spellings
def test_phimoe_as_transformers_spells_it_is_the_tables_phimoe(tmp_path):
    moe = _folder(tmp_path, "PhimoeForCausalLM", "phimoe", **LONG, **MOE)
    result = _plan(str(moe), "--recipe", "edge", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["architecture"] == "PhiMoEForCausalLM" == canonical_architecture("PhimoeForCausalLM")
    assert {d["id"] for d in plan["dropped"]} == ONNX_DROPPED
    # the converter and the builder dispatch on config.json's name: they get a linked copy with the table's
    staged = named_for_tools(moe, tmp_path / "work")
    assert staged != moe and json.loads((staged / "config.json").read_text())["architectures"] == ["PhiMoEForCausalLM"]
    assert (staged / "model.safetensors").resolve() == (moe / "model.safetensors").resolve()
    assert json.loads((moe / "config.json").read_text())["architectures"] == ["PhimoeForCausalLM"]  # untouched
    (tmp_path / "hub").mkdir()
    hub_spelled = _folder(tmp_path / "hub", "PhiMoEForCausalLM", "phimoe", **LONG, **MOE)
    assert named_for_tools(hub_spelled, tmp_path / "work") == hub_spelled


def test_source_check_knows_phimoe_experts_and_biases(tmp_path):
    moe = _folder(tmp_path, "PhiMoEForCausalLM", "phimoe", **LONG, **MOE)
    config = json.loads((moe / "config.json").read_text())
    (moe / "config.json").write_text(json.dumps({**config, "num_local_experts": 8}))
    result = _plan(str(moe))
    assert result.exit_code == 2
    assert "block_sparse_moe.gate.weight' has shape [4, 64]" in result.stderr and "num_local_experts" in result.stderr
    tensors = phimoe_tensors(SMALL, 4)
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    write_sparse_safetensors(moe / "model.safetensors", tensors)
    (moe / "config.json").write_text(json.dumps(config))
    result = _plan(str(moe))
    assert result.exit_code == 2 and "no tensor 'model.layers.1.self_attn.k_proj.bias'" in result.stderr
    (moe / "config.json").write_text(json.dumps({**config, "attention_bias": False}))  # then it is not needed
    assert _plan(str(moe)).exit_code == 0


def test_source_check_knows_phi2s_layout(tmp_path):
    folder = tmp_path / "phi-2-like"
    folder.mkdir()
    config = {**SMALL, "architectures": ["PhiForCausalLM"], "model_type": "phi", "partial_rotary_factor": 0.4,
              "qk_layernorm": False, "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (ROOT / "examples" / "tiny-phi3" / name).is_file():
            (folder / name).write_bytes((ROOT / "examples" / "tiny-phi3" / name).read_bytes())
    write_sparse_safetensors(folder / "model.safetensors", phi_tensors(SMALL))
    assert _plan(str(folder), "--recipe", "edge-gguf").exit_code == 0
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    result = _plan(str(folder))
    assert result.exit_code == 2
    assert "mlp.fc1.weight' has shape [128, 64]" in result.stderr and "intermediate_size is 256" in result.stderr
    (folder / "config.json").write_text(json.dumps({**config, "qk_layernorm": True}))
    result = _plan(str(folder))
    assert result.exit_code == 2 and "self_attn.q_layernorm.weight" in result.stderr


# ----------------------------------------------------------------------------- slow: the fixtures
@pytest.fixture(scope="module", params=[pytest.param(k, marks=pytest.mark.slow) for k in ("phimoe", "phi2")])
def fixture(request) -> tuple[str, Path]:
    return request.param, cached_arch_model(request.param)


def test_fixture_is_the_architecture_as_the_hub_ships_it_and_continues_every_prompt(fixture):
    kind, folder = fixture
    from transformers import AutoConfig

    from hubbot.recipe import load_family
    from hubbot.source_check import check_folder

    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [SPECS[kind].architecture] and "rope_parameters" not in config
    if kind == "phimoe":
        assert config["rope_scaling"]["type"] == "longrope" and config["original_max_position_embeddings"] == 4096
        assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
        assert config["attention_bias"] and config["lm_head_bias"]
    else:
        assert config["partial_rotary_factor"] == 0.5 and config["vocab_size"] == 51200
        assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "CodeGenTokenizer"
    assert AutoConfig.from_pretrained(folder).model_type == {"phimoe": "phimoe", "phi2": "phi"}[kind]
    check_folder(folder, load_family(ROOT / "recipes" / "phi.yaml"))  # hubbot's source checks, shapes included
    info = json.loads((folder / "tiny_model_info.json").read_text())
    for r in info["validation"]:
        assert r["correct_prefix"] >= min(12, r["reference_tokens"]), r
        assert r["min_margin"] >= 2.0, r


def test_plan_prints_what_is_built_and_what_is_dropped_with_why(fixture):
    kind, folder = fixture
    result = _plan(str(folder), "--recipe", "edge")
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    for vid in ("gguf-Q4_K_M", "gguf-Q8_0", "gguf-F16", "openvino-int4_asym", "openvino-int8_asym", "mlx-4bit",
                "mlx-8bit"):
        assert vid in flat
    if kind == "phimoe":
        assert "dropped: not built, and why" in flat
        assert all(vid in flat for vid in ONNX_DROPPED)
        assert "CUDA in int4 only" in flat and "cannot build PhiMoE" in flat and "NotImplementedError" in flat
    else:
        assert "dropped" not in flat and all(vid in flat for vid in ONNX_DROPPED)


@pytest.mark.slow
def test_onnxruntime_genai_builder_still_fails_on_phimoe_as_the_table_says(tmp_path):
    """The table's `broken` reason, against the pinned builder: once it can build PhiMoE, this fails."""
    folder = cached_arch_model("phimoe")
    patch_rope = ("import onnxruntime_genai.models\nfrom builders.phi import Phi3MoELongRoPEModel as M, "
                  "Phi3MiniLongRoPEModel as L\nM.make_rope_init = L.make_rope_init\n")
    outputs = []
    for prelude in ("", patch_rope):
        code = prelude + "import runpy; runpy.run_module('onnxruntime_genai.models.builder', run_name='__main__')"
        run = subprocess.run([sys.executable, "-c", code, "-i", str(folder), "-o", str(tmp_path / "out"), "-p",
                              "int4", "-e", "cuda", "-c", str(tmp_path / "cache")],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode != 0
        outputs.append(run.stdout + run.stderr)
    assert "The longrope RoPE style is not currently supported" in outputs[0]
    assert "has no attribute 'block_sparse_moe'" in outputs[1]  # past the rope: transformers 5's fused experts
    assert "NotImplementedError: longrope" in ONNX_PHIMOE_BROKEN


def _validation(hub, repo: str) -> list[dict]:
    return json.loads(hub.files(repo)["validation.json"])["variants"]


# PhiMoE's repos whose runtime routes experts unlike transformers (support.PHIMOE_ROUTING): validation fails them
DIFFERS = {"phimoe": ["GGUF", "4bit", "8bit"], "phi2": []}


def test_publishes_through_the_test_hub_with_every_buildable_format_validated(fixture, hub_env, monkeypatch):
    """Every variant a tool builds is validated; PhiMoE's GGUF and MLX files are measured and fail
    (their runtimes' expert routing is not transformers'), saying why; the rest is published."""
    kind, folder = fixture
    hub = hub_env
    monkeypatch.setenv("HUBBOT_RETRY_BACKOFF", "0.05")
    release = RELEASES[kind]
    hub.seed_repo(release, {p.name: p for p in folder.iterdir() if p.is_file()})
    result = CliRunner().invoke(main, ["publish", release, "--recipe", "edge"])
    assert result.exit_code == (1 if DIFFERS[kind] else 0), result.output
    assert SENTINEL_TOKEN not in result.output
    name = release.split("/")[1]
    failing = [f"{USER}/{name}-{suffix}" for suffix in DIFFERS[kind]]
    repos = [f"{USER}/{name}-{suffix}" for suffix in EDGE_REPOS[kind] if suffix not in DIFFERS[kind]]
    assert all(hub.repo_exists(r) for r in repos)
    assert not any(hub.repo_exists(r) and "README.md" in hub.files(r) for r in failing)
    assert not hub.repo_exists(f"{USER}/{name}-onnx") or kind == "phi2"
    flat = " ".join(result.output.split())
    for repo in failing:
        assert f"{repo}: failed validation" in flat
    if failing:
        assert flat.count("known cause: llama.cpp's and mlx-lm's PhiMoE weight the two chosen experts") >= 5
    ran = {}
    for repo in repos:
        for v in _validation(hub, repo):
            assert v["passed"], (repo, v["variant_id"], v["reasons"])
            ran[v["variant_id"]] = v["executed"]
    expected = {"openvino-int4_asym", "openvino-int8_asym"} | (
        {"gguf-Q4_K_M", "gguf-Q8_0", "gguf-F16", "mlx-4bit", "mlx-8bit"} | ONNX_DROPPED if kind == "phi2" else set())
    assert set(ran) == expected
    # every variant ran in its runtime, except ONNX's CUDA one, which is checked structurally on this machine
    assert {v for v, executed in ran.items() if not executed} == ({"onnx-gpu-int4-rtn-block-32"} if kind == "phi2"
                                                                   else set())
    card = hub.files(f"{USER}/{name}-int4-ov")["README.md"].decode()
    if kind == "phimoe":  # the ONNX repo is not made at all: every card says which variants and why
        assert "Not built, although the recipe asks for them (source architecture `PhiMoEForCausalLM`)" in card
        for vid in ONNX_DROPPED:
            assert f"| `{vid}` |" in card
        assert "CUDA in int4 only" in card and "cannot build PhiMoE" in card
    else:
        assert "Not built" not in card


# ----------------------------------------------------------------------------- slow: one watch pass per row
@pytest.mark.slow
def test_watch_records_each_row_of_the_support_table_once(hub_env, tiny_phi3, tmp_path, monkeypatch):
    hub = hub_env
    monkeypatch.setenv("HUBBOT_RETRY_BACKOFF", "0.05")
    for var in ("GITHUB_ACTIONS", "GITHUB_STEP_SUMMARY", "GITHUB_OUTPUT"):
        monkeypatch.delenv(var, raising=False)
    # one OpenVINO and one CPU ONNX variant: what every row's outcome turns on, at two builds a release
    # (OpenVINO, not GGUF: llama.cpp's PhiMoE routing differs from transformers', so its GGUF fails validation)
    family = yaml.safe_load((ROOT / "recipes" / "phi.yaml").read_text())
    family["recipes"]["rows"] = {"description": "OpenVINO and CPU ONNX", "variants": [
        {"format": "openvino", "precision": "int4"}, {"format": "onnx", "precision": "int4", "target": "cpu"}]}
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "phi.yaml").write_text(yaml.safe_dump(family, sort_keys=False))

    def files(folder: Path) -> dict[str, Path]:
        return {p.name: p for p in folder.iterdir() if p.is_file()}

    rows = {  # release -> (what the table says, the ledger status)
        "microsoft/Phi-3-mini-tiny-test": (files(tiny_phi3), "published"),
        RELEASES["phimoe"]: (files(cached_arch_model("phimoe")), "partial"),
        RELEASES["phi2"]: (files(cached_arch_model("phi2")), "published"),
        "microsoft/Phi-3-small-8k-tiny-test": (files(_folder(tmp_path, "Phi3SmallForCausalLM", "phi3small")),
                                               "unsupported"),
        "microsoft/Phi-3.5-vision-tiny-test": (files(_folder(tmp_path, "Phi3VForCausalLM", "phi3_v")), "unsupported"),
        "microsoft/Phi-4-mini-flash-tiny-test": (files(_folder(tmp_path, "Phi4FlashForCausalLM", "phi4flash")),
                                                 "unsupported"),
    }
    shas = {repo: hub.seed_repo(repo, seeded) for repo, (seeded, _) in rows.items()}
    ledger_path = tmp_path / "ledger.sqlite"

    def watch():
        return CliRunner().invoke(main, ["--recipes-dir", str(recipes), "watch", "--once", "--ledger",
                                         str(ledger_path), "--recipe", "rows"])

    first = watch()
    assert first.exit_code == 0, first.output
    with Ledger(ledger_path) as ledger:
        entries = {r.repo: r for r in ledger.releases()}
        assert {repo: (e.sha, e.status) for repo, e in entries.items()} == \
               {repo: (shas[repo], status) for repo, (_, status) in rows.items()}
        assert "onnx-cpu-int4-rtn-block-32-acc-level-4 (onnxruntime-genai builds PhiMoE for CUDA in int4 only" \
            in entries[RELEASES["phimoe"]].reason
        assert "needs trust_remote_code" in entries["microsoft/Phi-3-small-8k-tiny-test"].reason
        assert "multimodal" in entries["microsoft/Phi-3.5-vision-tiny-test"].reason
        assert "Phi4FlashForCausalLM" in entries["microsoft/Phi-4-mini-flash-tiny-test"].reason
        moe = {v.variant: v.status for v in ledger.variants(RELEASES["phimoe"], shas[RELEASES["phimoe"]])}
        assert moe == {"openvino-int4_asym": "published", "onnx-cpu-int4-rtn-block-32-acc-level-4": "dropped"}
        attempts = {repo: e.attempts for repo, e in entries.items()}
    for repo, (_, status) in rows.items():
        name = repo.split("/")[1]
        assert hub.repo_exists(f"{USER}/{name}-int4-ov") == (status != "unsupported")
        assert hub.repo_exists(f"{USER}/{name}-onnx") == (status == "published")

    hub.reset_counters()
    second = watch()  # nothing is news: no build, no download of weights, no commit, the same ledger
    assert second.exit_code == 0, second.output
    assert not [r for r in hub.requests if r[0] == "POST" and "/commit/" in r[1]]
    assert not any(path.endswith(".safetensors") for path in hub.bytes_downloaded)
    with Ledger(ledger_path) as ledger:
        again = {r.repo: (r.status, r.attempts) for r in ledger.releases()}
    assert again == {repo: (status, attempts[repo]) for repo, (_, status) in rows.items()}
    for text in (first.output, second.output):
        assert SENTINEL_TOKEN not in text
