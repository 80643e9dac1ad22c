"""The ONNX backend on the bundled example: onnxruntime-genai's own builder, one folder per variant
laid out like Microsoft's Phi ONNX repos, CPU variants validated in onnxruntime-genai against
transformers, a CUDA variant checked structurally, and one commit to the local Hub server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard

from hubbot.backends import OptionError, get_backend
from hubbot.backends.onnx import inspect_folder
from hubbot.cli import main
from hubbot.errors import BuildError
from tests.conftest import ROOT, USER

INT4 = "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"
FP32 = "cpu_and_mobile/cpu-fp32"
CUDA = "gpu/gpu-fp16"
GPU_INT4 = "gpu/gpu-int4-rtn-block-32"
FOLDERS = {INT4: ("cpu", "int4"), FP32: ("cpu", "fp32"), CUDA: ("cuda", "fp16"), GPU_INT4: ("cuda", "int4")}
VARIANT_FILES = {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json",
                 "tokenizer.model", "chat_template.jinja"}
SOURCE_REPO = "microsoft/Phi-3-tiny-test"


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> Path:
    """recipes/phi.yaml plus an `onnx` recipe: cpu int4 (block 32, acc 4), cpu fp32, cuda fp16, cuda int4."""
    family = yaml.safe_load((ROOT / "recipes" / "phi.yaml").read_text())
    family["recipes"]["onnx"] = {"description": "ONNX Runtime GenAI", "variants": [
        {"format": "onnx", "precision": "int4", "target": "cpu", "options": {"block_size": 32, "accuracy_level": 4}},
        {"format": "onnx", "precision": "fp32", "target": "cpu"},
        {"format": "onnx", "precision": "fp16", "target": "cuda"},
        {"format": "onnx", "precision": "int4", "target": "cuda"},
    ]}
    folder = tmp_path_factory.mktemp("recipes")
    (folder / "phi.yaml").write_text(yaml.safe_dump(family, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def preview(tiny_phi3, recipes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("preview")
    result = CliRunner().invoke(main, ["--recipes-dir", str(recipes), "publish", str(tiny_phi3), "--recipe", "onnx",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out / f"{tiny_phi3.name}-onnx"


def test_one_repo_with_one_folder_per_variant(preview):
    assert {p.name for p in preview.iterdir()} == {"cpu_and_mobile", "gpu", "README.md", "validation.json",
                                                   "hubbot.json", "quality.png"}
    for folder in FOLDERS:
        assert {p.name for p in (preview / folder).iterdir()} == VARIANT_FILES


@pytest.mark.parametrize("folder", FOLDERS)
def test_genai_config_and_graph(preview, folder):
    target, precision = FOLDERS[folder]
    config = json.loads((preview / folder / "genai_config.json").read_text())
    providers = [k for opts in config["model"]["decoder"]["session_options"]["provider_options"] for k in opts]
    assert providers == ([] if target == "cpu" else [target])
    assert config["model"]["type"] == "phi3"
    graph = onnx.load(str(preview / folder / "model.onnx"), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    assert ("MatMulNBits" in ops) == (precision == "int4")
    weights = {onnx.TensorProto.DataType.Name(t.data_type) for t in graph.initializer}
    assert ("FLOAT16" in weights) == (target != "cpu")  # GPU models run in fp16 (int4: fp16 scales)
    head = next(n for n in graph.node if n.name.startswith("/lm_head/MatMul"))
    assert head.input[0].endswith("final_norm_layernorm/output_0")


def test_cpu_variants_executed_and_gpu_only_checked(preview):
    report = json.loads((preview / "validation.json").read_text())
    by_id = {v["variant_id"]: v for v in report["variants"]}
    assert set(by_id) == {"onnx-cpu-int4-rtn-block-32-acc-level-4", "onnx-cpu-fp32", "onnx-gpu-fp16",
                          "onnx-gpu-int4-rtn-block-32"}
    for vid in ("onnx-cpu-int4-rtn-block-32-acc-level-4", "onnx-cpu-fp32"):
        v = by_id[vid]
        assert v["executed"] and v["passed"], v["reasons"]
        assert len(v["prompts"]) == 6 and all(p["tokens_match"] for p in v["prompts"])
        assert v["inspection"]["tokenizer_adds_bos"] is False
    assert by_id["onnx-cpu-fp32"]["agreement"] == 1.0
    assert by_id["onnx-cpu-int4-rtn-block-32-acc-level-4"]["agreement"] >= 0.85
    # onnxruntime-genai's logits over the held text: int4 loses measurably, fp32 next to nothing
    kld = {vid: by_id[vid]["distribution"]["mean_kld"] for vid in ("onnx-cpu-int4-rtn-block-32-acc-level-4",
                                                                    "onnx-cpu-fp32")}
    assert kld["onnx-cpu-int4-rtn-block-32-acc-level-4"] > 0.005 > 1e-6 > kld["onnx-cpu-fp32"]
    gpu = by_id["onnx-gpu-fp16"]
    assert not gpu["executed"] and gpu["passed"] and gpu["agreement"] is None
    assert gpu["inspection"]["provider"] == "cuda" and gpu["inspection"]["logits_dtype"] == "FLOAT16"


def test_card(preview):
    card = ModelCard.load(preview / "README.md")
    assert card.data.library_name == "onnxruntime-genai"
    assert card.data.license == "mit"
    assert {"onnx", "onnxruntime-genai", "phi3", "quantized", "hubbot"} <= set(card.data.tags)
    text = " ".join(card.text.split())
    for folder in FOLDERS:
        assert f"`{folder}/`" in text
    assert "**not run** — checked structurally only: passed" in text
    assert text.count("run in onnxruntime-genai (CPU): passed") == 2
    assert f'huggingface-cli download local/tiny-phi3-onnx --include "{INT4}/*" --local-dir .' in text
    assert "## How the variants were built" in text and "## Validation" in text and "## Provenance" in text
    assert "peak RSS" not in text  # measurements stay in build.json: the card is the same on every rebuild


@pytest.mark.parametrize("target, folder, extra", [
    ("cpu", INT4, ["block_size=32", "accuracy_level=4"]),
    ("cuda", GPU_INT4, ["block_size=32"]),
])
def test_two_step_int4_equals_the_builders_own(preview, tiny_phi3, tmp_path, target, folder, extra):
    """int4 is built as the target's unquantized model (fp32 on CPU, fp16 on CUDA) + MatMulNBitsQuantizer
    to save memory: the same nodes and the same weight bytes as the builder's own int4 pass."""
    from hubbot.backends.onnx import BUILDER

    cmd = [sys.executable, "-c", BUILDER, "-i", str(tiny_phi3), "-o", str(tmp_path / "direct"), "-p", "int4",
           "-e", target, "-c", str(tmp_path / "cache"), "--extra_options", *extra]
    subprocess.run(cmd, check=True, capture_output=True)
    direct = onnx.load(str(tmp_path / "direct" / "model.onnx"))
    two_step = onnx.load(str(preview / folder / "model.onnx"))
    def nodes(model):
        return sorted((n.op_type, n.name) for n in model.graph.node)

    def weights(model):
        return {t.name: t.raw_data for t in model.graph.initializer}

    assert nodes(direct) == nodes(two_step)
    assert weights(direct) == weights(two_step)
    assert json.loads((tmp_path / "direct" / "genai_config.json").read_text()) == \
        json.loads((preview / folder / "genai_config.json").read_text())


def test_runtime_prepends_bos_exactly_when_the_hf_tokenizer_adds_it(preview, tmp_path):
    """onnxruntime-genai's tokenizer ignores a BOS post-processor; the runtime adds it, as a user must."""
    from transformers import AutoTokenizer

    from hubbot.backends.onnx import OrtGenAIRuntime

    folder = shutil.copytree(preview / FP32, tmp_path / "cpu-fp32-bos")
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["post_processor"] = {
        "type": "TemplateProcessing", "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}]}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    hf_ids = AutoTokenizer.from_pretrained(folder)("Count: 1, 2, 3").input_ids
    assert hf_ids[0] == 1
    runtime = OrtGenAIRuntime(folder)
    try:
        assert [int(i) for i in runtime.tokenizer.encode("Count: 1, 2, 3")] == hf_ids[1:]
        assert runtime.tokenize("Count: 1, 2, 3") == hf_ids
    finally:
        runtime.close()


def test_inspect_catches_a_miswired_lm_head(preview, tmp_path):
    """onnxruntime-genai 0.18 wires the LM head to the first vocab-wide Linear; inspect must notice."""
    folder = shutil.copytree(preview / FP32, tmp_path / "cpu-fp32")
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    head = next(n for n in model.graph.node if n.name == "/lm_head/MatMul")
    head.input[0] = "/model/layers.0/post_attention_layernorm/output_0"
    onnx.save(model, str(folder / "model.onnx"))
    with pytest.raises(BuildError, match="LM head reads /model/layers.0"):
        inspect_folder(folder, "fp32", "cpu")


def test_folder_names_follow_microsoft():
    backend = get_backend("onnx")
    assert backend.slug("int4", "cpu", {}) == "cpu-int4-rtn-block-32-acc-level-4"
    assert backend.slug("int4", "cuda", {}) == "gpu-int4-rtn-block-32"
    assert backend.slug("int4", "dml", {"block_size": 128, "algo": "k_quant"}) == "dml-int4-kquant-block-128"
    assert backend.slug("int4", "cpu", {"is_symmetric": False, "quantize_embeddings": True}) == \
        "cpu-int4-rtn-block-32-acc-level-4-asym-qemb"
    assert backend.group("webgpu") == "gpu"
    assert backend.group("cpu") == "cpu_and_mobile"
    with pytest.raises(OptionError, match="algo"):
        backend.check_options("int4", "cpu", {"algo": "awq"})


@pytest.mark.slow  # a second full build: 30-80 s on 2 busy cores
def test_publish_to_hub_in_one_commit(hub_env, tiny_phi3, recipes):
    hub_env.seed_repo(SOURCE_REPO, {p.name: p for p in tiny_phi3.iterdir() if p.is_file()})
    result = CliRunner().invoke(main, ["--recipes-dir", str(recipes), "publish", SOURCE_REPO, "--recipe", "onnx"])
    assert result.exit_code == 0, result.output
    repo = f"{USER}/Phi-3-tiny-test-onnx"
    [commit] = [c for c in hub_env.commits(repo) if c.title.startswith("hubbot:")]
    assert commit.title.startswith(f"hubbot: onnx variants of {SOURCE_REPO}")
    files = hub_env.files(repo)
    expected = {f"{folder}/{name}" for folder in FOLDERS for name in VARIANT_FILES}
    assert expected | {"README.md", "validation.json", "hubbot.json"} <= set(files)
    manifest = json.loads(files["hubbot.json"])
    assert set(manifest["files"]) == set(files) - {".gitattributes", "hubbot.json"}
    card = ModelCard(files["README.md"].decode())
    assert card.data.base_model == SOURCE_REPO and card.data.library_name == "onnxruntime-genai"
