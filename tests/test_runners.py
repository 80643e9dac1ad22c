"""Runner routing: `plan --github-matrix` puts each build job on the smallest runner class of the
recipe that holds its estimate, and refuses a variant no class can hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from hubbot.cli import main
from hubbot.recipe import load_families
from hubbot.runners import parse_size
from tests.test_preflight import phi4_shaped  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parent.parent


def _matrix(*args: str, env: dict | None = None) -> tuple[int, str, dict | None]:
    result = CliRunner(env=env).invoke(main, [*args, "--github-matrix"])
    try:
        return result.exit_code, result.output, json.loads(result.stdout)
    except ValueError:
        return result.exit_code, result.output, None


def _recipes_with_runners(tmp_path: Path, runners_yaml: str) -> Path:
    """recipes/phi.yaml with its `runners:` section replaced."""
    text = (ROOT / "recipes" / "phi.yaml").read_text()
    start = text.index("runners:\n")
    end = text.index("\n\n", start)
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "phi.yaml").write_text(text[:start] + runners_yaml.rstrip() + text[end:])
    return folder


def test_phi4_variants_go_to_the_smallest_class_that_holds_them(phi4_shaped):  # noqa: F811
    code, output, matrix = _matrix("plan", str(phi4_shaped), "--recipe", "edge")
    assert code == 0, output
    classes = sorted(load_families()["phi"].runners, key=lambda c: (c.memory_bytes, c.disk_bytes))
    by_name = {c.name: c for c in classes}
    entries = {e["variant"]: e for e in matrix["include"]}
    assert len(entries) == 9  # onnx-cpu-fp32 is dropped: its ~58.6 GB file is over the Hub's limit
    for e in entries.values():
        chosen = by_name[e["runner"]]
        ram, disk = e["estimated_peak_ram_bytes"], e["estimated_disk_bytes"]
        assert chosen.fits(ram, disk), e
        assert not any(c.fits(ram, disk) for c in classes[:classes.index(chosen)]), e  # none smaller would do
        assert e["runs_on"] == chosen.labels() and e["free_disk"] == chosen.free_disk
    assert entries["mlx-4bit"]["runs_on"] == "ubuntu-latest"  # 8 GB of files, ~11 GB RAM: a hosted runner
    assert entries["mlx-8bit"]["runner"] == "large"  # ~21 GB RAM
    assert entries["gguf-Q4_K_M"]["runner"] == "hosted-freed"  # ~38 GB of disk: the freed hosted runner


def test_no_class_big_enough_is_refused_with_the_numbers(phi4_shaped, tmp_path):  # noqa: F811
    recipes = _recipes_with_runners(tmp_path, "runners:\n  hosted: {runs-on: ubuntu-latest, memory: 16GB, disk: 14GB}")
    code, output, _ = _matrix("--recipes-dir", str(recipes), "plan", str(phi4_shaped), "--recipe", "edge")
    assert code == 2, output
    assert "no runner class can build" in output and "mlx-8bit needs ~20.8 GB RAM" in output
    assert "'hosted', has 16.0 GB RAM and 14.0 GB disk" in output and "Traceback" not in output


def test_a_tiny_model_stays_on_the_hosted_runner():
    code, output, matrix = _matrix("plan", str(ROOT / "examples" / "tiny-phi3"), "--recipe", "edge-gguf")
    assert code == 0, output
    assert {e["runs_on"] for e in matrix["include"]} == {"ubuntu-latest"}
    assert {e["free_disk"] for e in matrix["include"]} == {False}


@pytest.mark.parametrize("runners, key, message", [
    ("runners:\n  big: {runs-on: ubuntu-latest, memory: lots, disk: 14GB}", "runners.big.memory", "is not a size"),
    ("runners:\n  big: {runs-on: ubuntu-latest, memory: 16GB}", "runners.big", "disk"),
    ("runners:\n  big: {runs-on: 3, memory: 16GB, disk: 1TB}", "runners.big.runs-on", "a runner label"),
    ("runners:\n  big: {runs-on: x, memory: 16GB, disk: 1TB, gpu: true}", "runners.big.gpu", "unknown key"),
])
def test_a_bad_runners_section_names_the_key(tmp_path, runners, key, message):
    recipes = _recipes_with_runners(tmp_path, runners)
    result = CliRunner().invoke(main, ["--recipes-dir", str(recipes), "recipes", "list"])
    assert result.exit_code == 2, result.output
    assert key in result.output and message in result.output and "Traceback" not in result.output


def test_sizes_read_as_people_write_them():
    assert parse_size("16GB") == 16 * 10**9 and parse_size("64GiB") == 64 * 2**30 and parse_size("1TB") == 10**12
    with pytest.raises(ValueError):
        parse_size("big")


def test_the_publish_workflow_routes_builds_and_computes_the_reference_once():
    import yaml

    wf = yaml.safe_load((ROOT / ".github" / "workflows" / "publish.yml").read_text())
    jobs = wf["jobs"]
    assert jobs["build"]["runs-on"] == "${{ matrix.runs_on }}"
    assert jobs["reference"]["runs-on"] == "${{ fromJSON(needs.plan.outputs.reference_runs_on) }}"
    assert set(jobs["build"]["needs"]) == {"plan", "reference"}
    build_runs = "\n".join(s.get("run", "") for s in jobs["build"]["steps"])
    assert "--reference reference/reference.json" in build_runs
    free = next(s for s in jobs["build"]["steps"] if s.get("if") == "matrix.free_disk")
    assert "rm -rf" in free["run"]
    assert "hubbot reference" in "\n".join(s.get("run", "") for s in jobs["reference"]["steps"])
