"""The support table (hubbot/backends/support.py) against the installed tools, and what plans, builds
and watch passes do with what it says: drop a variant with its reason, refuse a source nothing can
be built of, record an unsupported release once."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from hubbot.backends.support import ARCHITECTURES, variant_unsupported
from hubbot.cli import main
from hubbot.ledger import Ledger
from tests.conftest import ROOT, USER
from tests.test_preflight import phi3_tensors, write_sparse_safetensors

TINY = ROOT / "examples" / "tiny-phi3"
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 4, "vocab_size": 32064}


# ----------------------------------------------------------------------------- the table vs the tools
def _converter_architectures() -> set[str]:
    from hubbot.backends.gguf import converter_dir

    root = converter_dir()
    names: set[str] = set()
    for f in [root / "convert_hf_to_gguf.py", *root.glob("conversion/*.py")]:
        for m in re.finditer(r"register\(([^)]*)\)", f.read_text(encoding="utf-8")):
            names.update(re.findall(r'"([^"]+)"', m.group(1)))
    return names


def _builder_source() -> str:
    pytest.importorskip("onnxruntime_genai")
    import onnxruntime_genai.models.builder as builder

    return Path(builder.__file__).read_text(encoding="utf-8")


def _openvino_tasks(model_type: str) -> list[str]:
    pytest.importorskip("optimum.exporters.openvino")
    import optimum.exporters.openvino.model_configs  # noqa: F401 - registers the OpenVINO export configs
    from optimum.exporters.tasks import TasksManager

    try:
        return list(TasksManager.get_supported_tasks_for_model_type(model_type, exporter="openvino",
                                                                    library_name="transformers"))
    except KeyError:
        return []


def _mlx_has(model_type: str) -> bool:
    pytest.importorskip("mlx_lm")
    import importlib.util

    return importlib.util.find_spec(f"mlx_lm.models.{model_type}") is not None


def test_transformers_loads_natively_exactly_the_architectures_the_table_says():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for arch in ARCHITECTURES.values():
        assert (arch.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) == arch.native_in_transformers, arch.name


def test_gguf_rows_match_llama_cpps_converter():
    registered = _converter_architectures()
    for arch in ARCHITECTURES.values():
        if "gguf" in arch.formats:
            assert arch.formats["gguf"].tool_name in registered, arch.name
        else:
            assert arch.name not in registered, f"the converter now knows {arch.name}: update the table"


def test_onnx_rows_match_the_onnxruntime_genai_builder():
    source = _builder_source()
    for arch in ARCHITECTURES.values():
        named = f'config.architectures[0] == "{arch.name}"' in source
        assert named == ("onnx" in arch.formats), arch.name
    moe = source[source.index('"PhiMoEForCausalLM" and config.max_position_embeddings != '):][:600]
    assert 'execution_provider = "cuda"' in moe and 'set_onnx_dtype("int4"' in moe  # the restriction, upstream


def test_openvino_rows_match_optimum_intels_exporters():
    for arch in ARCHITECTURES.values():
        tasks = _openvino_tasks(arch.model_type)
        if "openvino" in arch.formats:
            assert tasks, arch.name
            assert ("text-generation-with-past" in tasks) == arch.text_only, arch.name
        else:
            assert not tasks, f"optimum-intel now exports {arch.model_type}: update the table"


def test_mlx_rows_match_mlx_lms_models():
    for arch in ARCHITECTURES.values():
        assert _mlx_has(arch.model_type) == ("mlx" in arch.formats), arch.name


def test_restrictions_say_why():
    long_moe = {"max_position_embeddings": 131072, "original_max_position_embeddings": 4096}
    # what the builder claims to build, it fails on with the pinned versions (tests/test_arch_fixtures.py)
    assert "cannot build PhiMoE" in variant_unsupported("PhiMoEForCausalLM", "onnx", "cuda", "int4", long_moe)
    assert "CUDA in int4 only" in variant_unsupported("PhiMoEForCausalLM", "onnx", "cpu", "int4", long_moe)
    assert "CUDA in int4 only" in variant_unsupported("PhiMoEForCausalLM", "onnx", "cuda", "fp16", long_moe)
    short = {"max_position_embeddings": 4096, "original_max_position_embeddings": 4096}
    assert "long-context" in variant_unsupported("PhiMoEForCausalLM", "onnx", "cuda", "int4", short)
    assert "trust_remote_code" in variant_unsupported("Phi4FlashForCausalLM", "gguf", "cpu", "int4")
    assert "multimodal" in variant_unsupported("Phi3VForCausalLM", "onnx", "cpu", "int4")
    assert "not in hubbot's support table" in variant_unsupported("Phi5ForCausalLM", "gguf", "cpu", "int4")
    assert variant_unsupported(None, "onnx", "cpu", "int4") is None  # not known yet: nothing dropped


# ----------------------------------------------------------------------------- plans, builds, publish
def phimoe_tensors(shape: dict[str, int], experts: int) -> dict[str, list[int]]:
    """PhiMoEForCausalLM's tensors as Phi-3.5-MoE stores them (per-expert w1/w2/w3, biases), sorted."""
    h, inter, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = shape["num_key_value_heads"] * h // shape["num_attention_heads"]
    tensors = {"lm_head.weight": [vocab, h], "lm_head.bias": [vocab], "model.embed_tokens.weight": [vocab, h],
               "model.norm.weight": [h], "model.norm.bias": [h]}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors |= {f"{p}{norm}.weight": [h], f"{p}{norm}.bias": [h]}
        for proj, rows in (("q", h), ("k", kv), ("v", kv), ("o", h)):
            tensors |= {f"{p}self_attn.{proj}_proj.weight": [rows, h], f"{p}self_attn.{proj}_proj.bias": [rows]}
        tensors[f"{p}block_sparse_moe.gate.weight"] = [experts, h]
        for j in range(experts):
            e = f"{p}block_sparse_moe.experts.{j}."
            tensors |= {e + "w1.weight": [inter, h], e + "w2.weight": [h, inter], e + "w3.weight": [inter, h]}
    return dict(sorted(tensors.items()))


MOE = {"num_local_experts": 4, "num_experts_per_tok": 2, "attention_bias": True, "lm_head_bias": True}


def _folder(tmp_path: Path, architecture: str, model_type: str, **config) -> Path:
    """A model folder with a sparse safetensors file of the architecture's shape (PhiMoE's, else Phi3's):
    enough for plans and preflights."""
    folder = tmp_path / f"{model_type}-folder"
    folder.mkdir()
    base = json.loads((TINY / "config.json").read_text())
    base.update(SMALL, architectures=[architecture], model_type=model_type, **config)
    (folder / "config.json").write_text(json.dumps(base))
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"):
        if (TINY / name).is_file():
            shutil.copyfile(TINY / name, folder / name)
    tensors = phimoe_tensors(SMALL, base["num_local_experts"]) if model_type == "phimoe" else phi3_tensors(SMALL)
    write_sparse_safetensors(folder / "model.safetensors", tensors)
    return folder


def test_plan_drops_what_a_tool_cannot_build_and_says_why(tmp_path):
    moe = _folder(tmp_path, "PhiMoEForCausalLM", "phimoe", max_position_embeddings=131072,
                  original_max_position_embeddings=4096, **MOE)
    result = CliRunner().invoke(main, ["plan", str(moe), "--recipe", "edge"])
    assert result.exit_code == 0, result.output
    assert "dropped: not built, and why" in result.output
    assert "onnx-cpu-fp32" in result.output and "CUDA in int4 only" in result.output
    as_json = CliRunner().invoke(main, ["plan", str(moe), "--recipe", "edge", "--json"])
    plan = json.loads(as_json.stdout)
    assert plan["architecture"] == "PhiMoEForCausalLM"
    assert {d["id"] for d in plan["dropped"]} == {"onnx-cpu-int4-rtn-block-32-acc-level-4", "onnx-cpu-fp32",
                                                  "onnx-gpu-int4-rtn-block-32"}
    built = {v["id"] for r in plan["repos"] for v in r["variants"]}
    assert "gguf-Q4_K_M" in built and "mlx-8bit" in built


def test_plan_of_a_hub_repo_without_an_alias_drops_by_its_config(hub_env, tmp_path):
    """No alias names its architecture: the plan reads config.json from the Hub (never the weights)."""
    moe = _folder(tmp_path, "PhiMoEForCausalLM", "phimoe", max_position_embeddings=131072,
                  original_max_position_embeddings=4096, **MOE)
    repo = "community/phimoe-clone"
    hub_env.seed_repo(repo, {p.name: p for p in moe.iterdir()})
    hub_env.reset_counters()
    result = CliRunner().invoke(main, ["plan", repo, "--family", "phi", "--recipe", "edge", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["architecture"] == "PhiMoEForCausalLM"
    assert {d["id"] for d in plan["dropped"]} == {"onnx-cpu-int4-rtn-block-32-acc-level-4", "onnx-cpu-fp32",
                                                  "onnx-gpu-int4-rtn-block-32"}
    weights = (moe / "model.safetensors").stat().st_size
    assert hub_env.bytes_downloaded.get(f"{repo}/model.safetensors", 0) < weights / 2


@pytest.mark.parametrize("command", ["plan", "publish", "build"])
def test_a_source_nothing_can_be_built_of_is_refused_with_the_reason(tmp_path, command):
    small = _folder(tmp_path, "Phi3SmallForCausalLM", "phi3small")
    args = {"plan": ["plan", str(small)],
            "publish": ["publish", str(small), "--out", str(tmp_path / "out"), "--no-preflight"],
            "build": ["build", str(small), "--variant", "gguf-Q4_K_M", "--out", str(tmp_path / "b"),
                      "--no-preflight"]}[command]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "needs trust_remote_code" in result.output and "never runs" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "b").exists()


def test_build_of_a_dropped_variant_says_why(tmp_path):
    moe = _folder(tmp_path, "PhiMoEForCausalLM", "phimoe", max_position_embeddings=131072,
                  original_max_position_embeddings=4096, **MOE)
    result = CliRunner().invoke(main, ["build", str(moe), "--variant", "onnx-cpu-fp32", "--out", str(tmp_path / "b"),
                                       "--no-preflight"])
    assert result.exit_code == 2, result.output
    assert "onnx-cpu-fp32 cannot be built" in result.output and "CUDA in int4 only" in result.output


def test_every_text_release_has_an_alias_with_a_supported_architecture():
    result = CliRunner().invoke(main, ["recipes", "list"])
    assert result.exit_code == 0, result.output
    for repo in ("microsoft/Phi-3-medium-128k-instruct", "microsoft/Phi-4-reasoning-plus",
                 "microsoft/Phi-3.5-MoE-instruct", "microsoft/Phi-tiny-MoE-instruct", "microsoft/phi-2",
                 "microsoft/phi-1_5", "microsoft/phi-1"):
        assert repo in result.output
    support = CliRunner().invoke(main, ["recipes", "support"])
    assert support.exit_code == 0 and "Phi4FlashForCausalLM" in support.output


# ----------------------------------------------------------------------------- watch
@pytest.mark.parametrize("gated", [False, "auto"])
def test_watch_records_an_unsupported_release_once_without_downloading_it(hub_env, tmp_path, monkeypatch, gated):
    """Public, or gated with the token let in: its config.json is read once (which also tells that the
    token may read it), nothing else."""
    hub = hub_env
    monkeypatch.setenv("HUBBOT_RETRY_BACKOFF", "0.05")
    for var in ("GITHUB_ACTIONS", "GITHUB_STEP_SUMMARY", "GITHUB_OUTPUT"):
        monkeypatch.delenv(var, raising=False)
    small = _folder(tmp_path, "Phi3SmallForCausalLM", "phi3small")
    repo = "microsoft/Phi-3-small-8k-instruct"
    sha = hub.seed_repo(repo, {p.name: p for p in small.iterdir()}, gated=gated)
    if gated:
        hub.grant_access(repo, USER)
    ledger = tmp_path / "ledger.sqlite"
    hub.reset_counters()
    first = CliRunner().invoke(main, ["watch", "--once", "--ledger", str(ledger), "--recipe", "edge-gguf"])
    assert first.exit_code == 0, first.output
    assert "unsupported" in first.output and "needs trust_remote_code" in first.output
    assert not any(path.endswith(".safetensors") for path in hub.bytes_downloaded)  # only config.json was read
    assert [t for m, t, _ in hub.requests if m == "GET" and t.endswith("/config.json")] == \
        [f"/{repo}/resolve/{sha}/config.json"]
    with Ledger(ledger) as led:
        entry = led.get(repo, sha)
    assert entry.status == "unsupported" and "Phi3SmallForCausalLM" in entry.reason
    hub.reset_counters()
    second = CliRunner().invoke(main, ["watch", "--once", "--ledger", str(ledger), "--recipe", "edge-gguf"])
    assert second.exit_code == 0, second.output
    assert "unsupported —" not in second.output  # recorded once, not retried
    assert not any(repo in path for path in hub.bytes_downloaded)
    assert not hub.repo_exists(f"{USER}/Phi-3-small-8k-instruct-GGUF")
