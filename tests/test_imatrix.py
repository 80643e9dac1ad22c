"""imatrix GGUF: the recipe option that names a calibration text (checked while the recipe is parsed),
and, slow, llama.cpp's own tools built from the sdist, one importance matrix per source, the IQ and
K-quant ladder quantized with it, validated, and published beside the files through the test Hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from gguf import GGUFReader
from huggingface_hub import ModelCard

from hubbot.cli import main
from hubbot.plan import make_plan
from hubbot.recipe import load_families
from hubbot.source import resolve
from tests.conftest import SENTINEL_TOKEN, USER
from tests.test_bad_inputs import assert_refused

ROOT = Path(__file__).resolve().parent.parent
PHI = ROOT / "recipes" / "phi.yaml"
CALIBRATION = ROOT / "recipes" / "calibration" / "phi-calibration.txt"
SOURCE_REPO = "microsoft/Phi-3-tiny-test"
MODEL = "Phi-3-tiny-test"
LADDER = ["IQ2_M", "IQ3_M", "IQ4_XS", "Q4_K_M", "Q5_K_M", "Q6_K"]  # pc-imatrix's types quantized with the matrix


def write_family(folder: Path, variants: list[dict], naming: dict | None = None) -> Path:
    """phi.yaml with one recipe, ``test``, of ``variants``, in ``folder``."""
    data = yaml.safe_load(PHI.read_text())
    data["recipes"] = {"test": {"variants": variants}}
    data["watch"]["default_recipe"] = "test"
    if naming:
        data["naming"]["gguf"] = naming
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "phi.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


# ------------------------------------------------------------------------------ the recipe option (fast)
def test_pc_imatrix_plans_the_community_ladder_with_one_calibration_text():
    families = load_families(ROOT / "recipes")
    plan = make_plan(resolve("phi-4", families), families["phi"].recipe("pc-imatrix"))
    [repo] = plan.repos
    assert [v.native for v in repo.variants] == [*LADDER, "Q8_0"]
    assert [v.id for v in repo.variants] == [f"gguf-{t}-imatrix" for t in LADDER] + ["gguf-Q8_0"]
    assert [v.path for v in repo.variants] == [f"phi-4-{t}.gguf" for t in [*LADDER, "Q8_0"]]
    calibrations = {v.options.get("imatrix") for v in repo.variants}
    assert calibrations == {"calibration/phi-calibration.txt", None}
    assert (PHI.parent / "calibration/phi-calibration.txt").is_file()  # relative to the recipe, bundled


REFUSED = [
    ({"format": "gguf", "precision": "IQ2_M"}, ["IQ2_M needs an importance matrix", "imatrix"]),
    ({"format": "gguf", "precision": "IQ3_XXS", "options": {"pure": True}}, ["IQ3_XXS needs an importance matrix"]),
    ({"format": "gguf", "precision": "Q8_0", "options": {"imatrix": "calibration/phi-calibration.txt"}},
     ["Q8_0 is not quantized with an importance matrix"]),
    ({"format": "gguf", "precision": "fp16", "options": {"imatrix": "calibration/phi-calibration.txt"}},
     ["F16 is not quantized with an importance matrix"]),
    ({"format": "gguf", "precision": "Q4_K_M", "options": {"imatrix": "hf://models/someone/model/text.txt"}},
     ["hf://models/someone/model/text.txt", "hf://datasets/<owner>/<name>"]),
    ({"format": "gguf", "precision": "Q4_K_M", "options": {"imatrix": "hf://datasets/bad..name/x/text.txt"}},
     ["hf://datasets/bad..name/x/text.txt"]),
    ({"format": "gguf", "precision": "Q4_K_M", "options": {"imatrix": 3}}, ["options.imatrix", "str"]),
]


@pytest.mark.parametrize("variant, expected", REFUSED,
                         ids=[f"{v['precision']}-{i}" for i, (v, _) in enumerate(REFUSED)])
def test_imatrix_types_without_a_calibration_text_are_refused_while_parsing(tmp_path, hub_env, tiny_phi3,
                                                                            variant, expected):
    recipes = write_family(tmp_path / "recipes", [variant])
    result = CliRunner().invoke(main, ["--recipes-dir", str(recipes), "publish", str(tiny_phi3), "--recipe", "test"])
    assert_refused(result, hub_env, 2, [str(recipes / "phi.yaml"), "recipes.test.variants[0].options", *expected])


def test_missing_cmake_says_what_to_install(tmp_path, monkeypatch):
    from hubbot.errors import MissingToolError
    from hubbot.llamacpp_tools import tools_dir

    monkeypatch.delenv("HUBBOT_LLAMA_CPP_TOOLS", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no cmake, no compiler
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(MissingToolError) as refused:
        tools_dir()
    message = str(refused.value)
    assert "cmake" in message and "C/C++ compiler" in message and "apt-get install cmake build-essential" in message
    assert "\n" not in message
    assert not any((tmp_path / "hubbot-cache").glob("llama.cpp-*-tools/*/bin"))  # nothing half-built left


# ------------------------------------------------------------------ tools, build, validate, publish (slow)
@pytest.fixture(scope="session")
def llama_cpp_tools() -> Path:
    """llama.cpp's tools built once per machine into the shared cache (resolved before the per-test cache)."""
    from hubbot.llamacpp_tools import TOOLS, tools_dir

    folder = tools_dir(log=print)
    assert all((folder / t).is_file() for t in TOOLS)
    return folder


@pytest.fixture
def tools_env(llama_cpp_tools, monkeypatch) -> Path:
    monkeypatch.setenv("HUBBOT_LLAMA_CPP_TOOLS", str(llama_cpp_tools))
    return llama_cpp_tools


@pytest.fixture
def seeded(hub_env, tiny_phi3, tools_env, monkeypatch):
    monkeypatch.setenv("HUBBOT_RETRY_BACKOFF", "0.05")
    hub_env.seed_repo(SOURCE_REPO, {p.name: p for p in tiny_phi3.iterdir() if p.is_file()})
    return hub_env


def _fields(path_or_bytes, tmp_path: Path) -> dict:
    if isinstance(path_or_bytes, bytes):
        tmp_path.mkdir(parents=True, exist_ok=True)
        file = tmp_path / "read.gguf"
        file.write_bytes(path_or_bytes)
        path_or_bytes = file
    reader = GGUFReader(str(path_or_bytes))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")} | {
        "_types": {t.tensor_type.name for t in reader.tensors}}


@pytest.mark.slow
def test_pc_imatrix_builds_validates_and_publishes_with_its_matrix(seeded, tmp_path):
    hub = seeded
    result = CliRunner().invoke(main, ["publish", SOURCE_REPO, "--recipe", "pc-imatrix"])
    assert result.exit_code == 0, result.output
    assert SENTINEL_TOKEN not in result.output
    repo = f"{USER}/{MODEL}-GGUF"
    [commit] = [c for c in hub.commits(repo) if c.title.startswith("hubbot:")]  # one commit with everything
    files = hub.files(repo)
    matrix = f"{MODEL}.imatrix"
    ggufs = {f"{MODEL}-{t}.gguf" for t in [*LADDER, "Q8_0"]}
    assert ggufs | {matrix, "README.md", "validation.json", "hubbot.json"} <= set(files)

    # the published matrix is llama.cpp's GGUF imatrix, computed on the bundled text, naming no local path
    imatrix = _fields(files[matrix], tmp_path / "m")
    assert imatrix["general.type"] == "imatrix"
    assert imatrix["imatrix.datasets"] == [CALIBRATION.name]
    assert imatrix["imatrix.chunk_count"] >= 2
    for quant in LADDER:
        meta = _fields(files[f"{MODEL}-{quant}.gguf"], tmp_path / quant)
        assert meta["quantize.imatrix.file"] == matrix, quant  # quantized with it, by its repo name
        assert meta["quantize.imatrix.dataset"] == CALIBRATION.name
        assert meta["quantize.imatrix.chunks_count"] == imatrix["imatrix.chunk_count"]
    assert {"IQ2_S"} <= _fields(files[f"{MODEL}-IQ2_M.gguf"], tmp_path / "iq2")["_types"]
    assert {"IQ3_S"} <= _fields(files[f"{MODEL}-IQ3_M.gguf"], tmp_path / "iq3")["_types"]
    assert "quantize.imatrix.file" not in _fields(files[f"{MODEL}-Q8_0.gguf"], tmp_path / "q8")

    report = json.loads(files["validation.json"])
    by_id = {v["variant_id"]: v for v in report["variants"]}
    assert set(by_id) == {f"gguf-{t}-imatrix" for t in LADDER} | {"gguf-Q8_0"}
    for vid, v in by_id.items():
        assert v["passed"] and v["executed"], (vid, v["reasons"])
    manifest = json.loads(files["hubbot.json"])
    assert matrix in manifest["files"]

    card = ModelCard(files["README.md"].decode()).text
    section = card.split("## Importance matrix", 1)[1].split("\n## ", 1)[0]
    assert matrix in section and "calibration/phi-calibration.txt" in section
    for quant in LADDER:
        assert f"`{MODEL}-{quant}.gguf`" in section
    assert f"without an importance matrix: `{MODEL}-Q8_0.gguf`" in section


@pytest.mark.slow
def test_calibration_text_from_a_hub_dataset_changes_the_quantization(seeded, tmp_path):
    """Q4_K_M with and without an importance matrix side by side; the text comes from a dataset repo."""
    hub = seeded
    hub.seed_repo(f"{USER}/calibration", {"texts/phi.txt": CALIBRATION}, repo_type="dataset")
    spec = f"hf://datasets/{USER}/calibration/texts/phi.txt"
    recipes = write_family(tmp_path / "recipes", [
        {"format": "gguf", "precision": "Q4_K_M"},
        {"format": "gguf", "precision": "Q4_K_M", "options": {"imatrix": spec}},
    ], naming={"repo": "{model}-GGUF", "path": "{model}-{variant}.gguf"})
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["--recipes-dir", str(recipes), "publish", SOURCE_REPO, "--recipe", "test",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    folder = out / f"{MODEL}-GGUF"
    plain, weighted = folder / f"{MODEL}-Q4_K_M.gguf", folder / f"{MODEL}-Q4_K_M-imatrix.gguf"
    assert plain.read_bytes() != weighted.read_bytes()
    assert "quantize.imatrix.file" not in _fields(plain, tmp_path)
    assert _fields(weighted, tmp_path)["quantize.imatrix.dataset"] == "phi.txt"
    assert (folder / f"{MODEL}.imatrix").is_file()
    report = json.loads((folder / "validation.json").read_text())
    assert all(v["passed"] for v in report["variants"]), report
    card = (folder / "README.md").read_text()
    assert spec in card


def test_missing_calibration_text_fails_before_any_build(tmp_path, tiny_phi3, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nor is a tool built or looked for first
    recipes = write_family(tmp_path / "recipes", [
        {"format": "gguf", "precision": "IQ4_XS", "options": {"imatrix": "calibration/not-there.txt"}}])
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["--recipes-dir", str(recipes), "publish", str(tiny_phi3), "--recipe", "test",
                                       "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert f"calibration text 'calibration/not-there.txt' not found (looked for {recipes}/calibration" in \
        " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not list(out.rglob("*.gguf"))
