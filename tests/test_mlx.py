"""The MLX backend on the bundled example: mlx-lm's converter in a subprocess, config.json and the
safetensors read back, validation in MLX (Linux CPU backend) against transformers, the card,
and one commit per repo on the local Hub."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard

from hubbot.backends.mlx import mlx_config, rope_note
from hubbot.cli import main
from tests.conftest import ROOT, USER

pytest.importorskip("mlx_lm", reason="needs hubbot[mlx]")

RECIPE = "mlx-test"
THRESHOLDS = {"4bit": 0.85, "8bit": 0.98}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja")


def write_recipes(folder: Path, variants: list[dict], **validation) -> Path:
    """recipes/phi.yaml plus a recipe RECIPE with the given variants (and validation settings), in folder."""
    data = yaml.safe_load((ROOT / "recipes" / "phi.yaml").read_text())
    data["recipes"][RECIPE] = {"description": "MLX variants for the tests.", "variants": variants}
    data["validation"].update(validation)
    (folder / "phi.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


def publish(recipes: Path, source: str, *args: str):
    return CliRunner().invoke(main, ["--recipes-dir", str(recipes), "publish", source, "--recipe", RECIPE, *args])


def safetensors_header(path: Path) -> dict:
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n))


@pytest.fixture(scope="module")
def int4_int8(tmp_path_factory) -> Path:
    return write_recipes(tmp_path_factory.mktemp("recipes"), [
        {"format": "mlx", "precision": "int4"}, {"format": "mlx", "precision": "int8"}])


@pytest.fixture(scope="module")
def preview(tiny_phi3, int4_int8, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("preview")
    result = publish(int4_int8, str(tiny_phi3), "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_one_repo_per_variant_named_like_mlx_community(preview, tiny_phi3):
    assert {p.name for p in preview.iterdir()} == {f"{tiny_phi3.name}-4bit", f"{tiny_phi3.name}-8bit"}
    for repo in preview.iterdir():
        files = {p.name for p in repo.iterdir()}
        assert {"config.json", "model.safetensors", "README.md", "validation.json", "hubbot.json"} <= files
        assert set(TOKENIZER_FILES) <= files
        for name in TOKENIZER_FILES:  # the source's own tokenizer files, not mlx-lm's re-save
            assert (repo / name).read_bytes() == (tiny_phi3 / name).read_bytes()
        assert (repo / "README.md").read_text().startswith("---\n")  # hubbot's card, not mlx-lm's


@pytest.mark.parametrize("quant, bits", [("4bit", 4), ("8bit", 8)])
def test_config_and_weights_are_quantized(preview, tiny_phi3, quant, bits):
    repo = preview / f"{tiny_phi3.name}-{quant}"
    config = json.loads((repo / "config.json").read_text())
    assert config["quantization"] == {"bits": bits, "group_size": 64, "mode": "affine"}
    assert config["model_type"] == "phi3"
    assert config["rope_theta"] == 10000.0 and config["partial_rotary_factor"] == 1.0
    header = safetensors_header(repo / "model.safetensors")
    qkv = "model.layers.0.self_attn.qkv_proj"
    assert header[f"{qkv}.weight"]["dtype"] == "U32"  # packed integers
    assert header[f"{qkv}.weight"]["shape"] == [768, 256 * bits // 32]
    assert header[f"{qkv}.scales"]["shape"] == [768, 256 // 64]


def test_every_variant_passed_validation_in_mlx(preview, tiny_phi3):
    for quant, threshold in THRESHOLDS.items():
        report = json.loads((preview / f"{tiny_phi3.name}-{quant}" / "validation.json").read_text())
        [v] = report["variants"]
        assert v["variant_id"] == f"mlx-{quant}"
        assert v["executed"] and v["passed"], v["reasons"]
        assert v["agreement"] >= threshold
        assert len(v["prompts"]) == 6 and all(p["tokens_match"] for p in v["prompts"])
        assert 0 < v["distribution"]["mean_kld"] <= v["max_mean_kld"]
        assert v["inspection"]["quantization"]["bits"] == int(quant[0])
        reference = {p["name"]: p["continuation"] for p in report["reference"]}
        assert reference["count"].lstrip().startswith("6, 7, 8")


def test_card_metadata_and_usage(preview, tiny_phi3):
    repo_id = f"local/{tiny_phi3.name}-4bit"
    card = ModelCard.load(preview / f"{tiny_phi3.name}-4bit" / "README.md")
    assert card.data.library_name == "mlx"
    assert card.data.license == "mit"
    assert {"mlx", "phi3", "quantized", "hubbot"} <= set(card.data.tags)
    assert f"mlx_lm.generate --model {repo_id}" in card.text
    assert f'load("{repo_id}")' in card.text
    assert "Linux CPU backend" in card.text
    assert "| `mlx-4bit` | 4-bit affine | 64 |" in card.text
    assert "## Validation" in card.text and "## Provenance" in card.text
    manifest = json.loads((preview / f"{tiny_phi3.name}-4bit" / "hubbot.json").read_text())
    assert set(manifest["tools"]) == {"mlx", "mlx-lm"}


def test_published_folder_runs_with_mlx_lm_as_the_card_says(preview, tiny_phi3):
    from mlx_lm import generate, load

    model, tokenizer = load(str(preview / f"{tiny_phi3.name}-4bit"))
    text = generate(model, tokenizer, prompt="Count: 1, 2, 3, 4, 5,", max_tokens=6)
    assert text.lstrip().startswith("6, 7")


@pytest.mark.parametrize("quant, chunk_bytes", [("4bit", None), ("8bit", None), ("4bit", 4 * 256 * 100)])
def test_wide_matmuls_compute_what_mlxs_quantized_kernel_does(preview, tiny_phi3, quant, chunk_bytes, monkeypatch):
    """The CPU speed path (MLX's dequantize + a BLAS matmul, for inputs of WIDE_ROWS rows or more)
    gives the quantized kernel's logits within float32 rounding; narrower inputs keep the kernel.
    The batched passes validation uses (top1_all, window_logits) equal one pass per sequence."""
    import mlx.core as mx
    import numpy as np

    from hubbot.backends.mlx import WIDE_ROWS, MLXRuntime

    if chunk_bytes:  # dequantize 100 weight rows at a time: several blocks per layer
        monkeypatch.setattr("hubbot.backends.mlx.WIDE_CHUNK_BYTES", chunk_bytes)
    repo = preview / f"{tiny_phi3.name}-{quant}"
    kernel, wide = MLXRuntime(repo, wide_matmuls=False), MLXRuntime(repo, wide_matmuls=True)
    assert kernel.wide_layers == 0 and wide.wide_layers == 2 + 4 * 2  # embedding, lm_head, 4 per layer × 2
    ids = kernel.tokenize("Count: " + ", ".join(map(str, range(1, 30))))
    assert len(ids) > 2 * WIDE_ROWS
    expected = np.array(kernel.model(mx.array([ids]))[0])  # mlx-lm's own call, the whole model at once
    assert np.allclose(kernel.logits(ids), expected, atol=1e-5 * np.abs(expected).max())  # the head split off
    got = wide.logits(ids)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() == 1.0
    narrow = ids[: WIDE_ROWS - 1]
    assert np.array_equal(wide.logits(narrow), kernel.logits(narrow))

    sequences = [ids, ids[:20], ids[:50]]
    batched = list(wide.window_logits(sequences))
    assert [b.shape for b in batched] == [(len(s), expected.shape[1]) for s in sequences]
    for b, s in zip(batched, sequences):
        assert np.allclose(b, kernel.logits(s), atol=1e-5 * np.abs(expected).max())
    assert wide.top1_all(sequences) == [kernel.top1(s) for s in sequences]
    assert list(wide.window_logits(sequences, tokens_per_pass=1))[2].shape == batched[2].shape
    stop, steps = kernel.stop_ids(), []
    prompts = [kernel.tokenize(t) for t in ("Count: 1, 2, 3,", "The capital of France is", "Hi")]
    assert wide.generate_all(prompts, [12, 3, 8], stop, steps.append) == [
        kernel.generate(p, n, stop) for p, n in zip(prompts, [12, 3, 8])]
    assert steps == list(range(1, 13))  # one step per new token of the longest, as validation's progress counts


def test_validation_process_loads_openblas_before_mlx_or_says_how_to(preview, tiny_phi3):
    """A fresh process, as ``hubbot build`` runs: the backend's import check comes first, then the
    runtime; where the system has OpenBLAS, MLX's CPU matmuls get it, else the log says what to install."""
    import ctypes.util
    import subprocess
    import sys

    code = ("import sys; from hubbot.backends.mlx import MLXBackend, MLXRuntime; MLXBackend().require(); "
            "rt = MLXRuntime(sys.argv[1]); print(rt.blas); print(rt.wide_layers); print(rt.note)")
    out = subprocess.run([sys.executable, "-c", code, str(preview / f"{tiny_phi3.name}-4bit")],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout.splitlines()
    if ctypes.util.find_library("openblas"):
        assert "openblas" in out[0] and out[1] == "10" and "BLAS libopenblas" in out[2]
    else:
        assert out[:2] == ["None", "0"] and "apt-get install libopenblas0-pthread" in out[2]


def test_mixed_predicate_with_group_size_and_dtype_options(tiny_phi3, tmp_path):
    recipes = write_recipes(tmp_path, [{"format": "mlx", "precision": "mixed_3_6",
                                        "options": {"group_size": 32, "dtype": "float16"}}])
    result = publish(recipes, str(tiny_phi3), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    repo = tmp_path / "out" / f"{tiny_phi3.name}-mixed_3_6"  # options are not in the default repo name
    quant = json.loads((repo / "config.json").read_text())["quantization"]
    assert (quant["bits"], quant["group_size"]) == (3, 32)
    assert quant["lm_head"]["bits"] == 6
    assert {q["bits"] for q in quant.values() if isinstance(q, dict)} == {3, 6}
    header = safetensors_header(repo / "model.safetensors")
    assert header["lm_head.scales"]["dtype"] == "F16" and header["lm_head.scales"]["shape"] == [1024, 256 // 32]
    [v] = json.loads((repo / "validation.json").read_text())["variants"]
    assert v["variant_id"] == "mlx-mixed_3_6-dtype-float16-group_size-32"
    assert v["passed"] and v["executed"]


def test_config_fix_for_transformers5_rope_parameters():
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                "original_max_position_embeddings": 4096, "short_factor": [1.0] * 24, "long_factor": [1.5] * 24}
    fixed, added = mlx_config({"model_type": "phi3", "rope_parameters": longrope})
    assert added == ["rope_theta", "partial_rotary_factor", "original_max_position_embeddings", "rope_scaling"]
    assert fixed["rope_scaling"] == {"type": "longrope", "original_max_position_embeddings": 4096,
                                     "short_factor": [1.0] * 24, "long_factor": [1.5] * 24}
    assert "long_factor" in rope_note(fixed)
    same = {"rope_theta": 1.0, "rope_parameters": {"rope_type": "default", "rope_theta": 1.0}}
    assert mlx_config(same) == (same, [])
    assert rope_note(same) == ""


def transformers5_source(tiny_phi3: Path, folder: Path, rope: dict, **config_changes) -> Path:
    """The example as transformers 5 saves it: rope settings only under rope_parameters."""
    shutil.copytree(tiny_phi3, folder)
    config = json.loads((folder / "config.json").read_text())
    for key in ("rope_theta", "partial_rotary_factor"):
        config.pop(key)
    config.update(config_changes, rope_parameters=rope)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def top1_agrees(model_dir: Path, config: dict, reference, ids: list[int]) -> bool:
    from hubbot.backends.mlx import MLXRuntime

    (model_dir / "config.json").write_text(json.dumps(config))
    return MLXRuntime(model_dir).top1(ids) == reference.top1(ids)


def test_rope_parameters_only_source_matches_transformers(tiny_phi3, tmp_path):
    """A theta and partial rotary factor other than mlx-lm's defaults, only under rope_parameters.
    Unfixed, MLX would silently rotate with theta 10000 over the whole head."""
    from hubbot.reference import TransformersRuntime

    rope = {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5}
    source = transformers5_source(tiny_phi3, tmp_path / "tiny-phi3-rope", rope)
    recipes = write_recipes(tmp_path, [{"format": "mlx", "precision": "fp32", "min_agreement": 0.95}])
    result = publish(recipes, str(source), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    repo = tmp_path / "out" / "tiny-phi3-rope-fp32"
    fixed = json.loads((repo / "config.json").read_text())
    assert (fixed["rope_theta"], fixed["partial_rotary_factor"]) == (500000.0, 0.5)
    [v] = json.loads((repo / "validation.json").read_text())["variants"]
    assert v["passed"] and v["agreement"] >= 0.95

    reference = TransformersRuntime(source, "float32")
    ids = reference.tokenize("Count: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14")
    assert top1_agrees(repo, fixed, reference, ids)
    unfixed = {k: v for k, v in fixed.items() if k not in ("rope_theta", "partial_rotary_factor")}
    assert not top1_agrees(repo, unfixed, reference, ids)  # the config as mlx-lm wrote it


def test_longrope_difference_is_reported_and_is_only_the_factor(tiny_phi3, tmp_path):
    """128k-context Phi: mlx-lm rotates with long_factor even on short prompts. The card says so, a
    variant that fails for it names the cause; with long_factor set to short_factor the same weights
    match transformers exactly."""
    from hubbot.reference import TransformersRuntime

    short, long = [1.0] * 32, [1.0 + i / 8 for i in range(32)]
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
            "original_max_position_embeddings": 4096, "short_factor": short, "long_factor": long}
    source = transformers5_source(tiny_phi3, tmp_path / "tiny-phi3-longrope", rope, max_position_embeddings=131072)
    # fp32 with no thresholds is published (to look at: the held-text KLD sees the difference, ~2 nats a
    # token, where fp32 allows 0.0001); fp16 at its usual thresholds fails, saying why
    recipes = write_recipes(tmp_path, [{"format": "mlx", "precision": "fp32", "min_agreement": 0.0},
                                       {"format": "mlx", "precision": "fp16"}], max_mean_kld={"fp32": 10.0})
    result = publish(recipes, str(source), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1, result.output
    failure = " ".join(result.output.split())
    assert "tiny-phi3-longrope-fp16" in failure and "known cause: longrope: mlx-lm always rotates with " \
        "long_factor" in failure, failure
    assert not (tmp_path / "out" / "tiny-phi3-longrope-fp16").exists()
    repo = tmp_path / "out" / "tiny-phi3-longrope-fp32"
    config = json.loads((repo / "config.json").read_text())
    assert config["rope_scaling"]["type"] == "longrope" and config["rope_scaling"]["long_factor"] == long
    card = (repo / "README.md").read_text()
    assert "### Known difference from transformers" in card and "long_factor" in card
    [v] = json.loads((repo / "validation.json").read_text())["variants"]
    assert v["agreement"] < 1.0
    assert v["distribution"]["mean_kld"] > 0.1  # what fails it under the recipe's own fp32 limit

    reference = TransformersRuntime(source, "float32")
    ids = reference.tokenize("Count: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14")
    assert not top1_agrees(repo, config, reference, ids)
    short_only = {**config, "rope_scaling": {**config["rope_scaling"], "long_factor": short}}
    assert top1_agrees(repo, short_only, reference, ids)


def test_publish_to_hub_one_commit_per_repo(hub_env, tiny_phi3, int4_int8):
    source = "microsoft/Phi-3-tiny-test"
    hub_env.seed_repo(source, {p.name: p for p in tiny_phi3.iterdir() if p.is_file()})
    result = publish(int4_int8, source)
    assert result.exit_code == 0, result.output
    for quant in THRESHOLDS:
        repo = f"{USER}/Phi-3-tiny-test-{quant}"
        commits = [c for c in hub_env.commits(repo) if c.title.startswith("hubbot:")]
        assert len(commits) == 1
        files = hub_env.files(repo)
        assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "hubbot.json"} <= set(files)
        card = ModelCard(files["README.md"].decode())
        assert card.data.library_name == "mlx" and card.data.base_model == source
        assert f"mlx_lm.generate --model {repo}" in card.text
        assert json.loads(files["config.json"])["quantization"]["bits"] == int(quant[0])
    result = publish(int4_int8, source)  # nothing changed upstream: nothing rebuilt
    assert result.exit_code == 0, result.output
    assert "up to date" in result.stderr
    result = publish(int4_int8, source, "--force")  # rebuilt: identical files, so no second commit
    assert result.exit_code == 0, result.output
    assert result.stderr.count("nothing changed") == 2
    for quant in THRESHOLDS:
        commits = hub_env.commits(f"{USER}/Phi-3-tiny-test-{quant}")
        assert len([c for c in commits if c.title.startswith("hubbot:")]) == 1


@pytest.mark.parametrize("module, args", [
    ("phi3", {"model_type": "phi3", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "vocab_size": 96}),
    ("phi", {"model_type": "phi", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
             "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 96, "partial_rotary_factor": 0.5}),
    ("phimoe", {"model_type": "phimoe", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
                "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 96, "rms_norm_eps": 1e-5,
                "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 4096,
                "original_max_position_embeddings": 4096,
                "rope_scaling": {"short_factor": [1.0] * 8, "long_factor": [1.0] * 8, "short_mscale": 1.0,
                                 "long_mscale": 1.0}}),
])
def test_held_text_windows_are_the_models_own_logits_for_every_phi_architecture(module, args):
    """Held-text windows run the body in one padded pass and the output head a window at a time;
    for each Phi architecture mlx-lm has (Phi-2's inner model takes no default cache) that must be
    the model's own forward pass of each window alone."""
    import importlib

    import mlx.core as mx
    import numpy as np

    from hubbot.backends.mlx import MLXRuntime, output_head

    models = importlib.import_module(f"mlx_lm.models.{module}")
    mx.random.seed(0)
    model = models.Model(models.ModelArgs.from_dict(args))
    assert output_head(model) is not None  # the body + head path, not the whole-model fallback
    runtime = MLXRuntime.__new__(MLXRuntime)  # the loaded model alone: no converted folder needed
    runtime.model = model
    windows = [[1, 5, 9, 13, 2, 7], [3, 4], [8, 8, 8, 8, 1]]
    for got, w in zip(runtime.window_logits(windows), windows, strict=True):
        alone = np.array(model(mx.array([w]))[0].astype(mx.float32))
        np.testing.assert_allclose(got, alone, atol=1e-4)
