"""Fan-out that carries real sizes (issue #14, part 2): build jobs pre-upload their large files to the
target repo's storage (no commit) and hand the publish job a small build.json; the publish job makes
the ONE commit referencing those blobs and uploads no model bytes itself.

Run job by job as publish.yml runs them (plan → reference → N builds → publish) against the test Hub,
through the real huggingface_hub client; the Hub's own counters say what each job uploaded.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess

import pytest
from click.testing import CliRunner

from hubbot.cli import main
from hubbot.record import BUILD_FILE
from tests.conftest import SENTINEL_TOKEN, USER
from tests.hubserver import repo_key
from tests.test_interrupted import KillingProxy, child_env, hubbot

SOURCE = "microsoft/Phi-3-tiny-fanout"
REPO = f"{USER}/Phi-3-tiny-fanout-GGUF"
VARIANTS = ["gguf-Q4_K_M", "gguf-Q8_0", "gguf-F16"]
WEIGHTS = {f"Phi-3-tiny-fanout-{q}.gguf" for q in ("Q4_K_M", "Q8_0", "F16")}


def hubbot_commits(hub) -> list:
    return [c for c in hub.commits(REPO) if c.title.startswith("hubbot:")] if hub.repo_exists(REPO) else []


def upload_requests(hub) -> list[str]:
    """Requests that carry file content to the Hub: LFS PUTs and Xet xorbs/shards."""
    return [target for method, target, _ in hub.requests
            if (method == "PUT" and "/lfs-upload/" in target) or (method == "POST" and "/cas/" in target)]


@pytest.fixture
def jobs(hub_env, tiny_phi3, tmp_path):
    """The plan and reference jobs done; ``build(variant)`` runs one build job into ``built/``."""
    hub = hub_env
    hub.seed_repo(SOURCE, {p.name: p for p in tiny_phi3.iterdir() if p.is_file()})
    runner = CliRunner()
    planned = runner.invoke(main, ["plan", SOURCE, "--recipe", "edge-gguf", "--github-matrix"])
    assert planned.exit_code == 0, planned.output
    assert [e["variant"] for e in json.loads(planned.stdout)["include"]] == VARIANTS
    reference = tmp_path / "reference.json"
    result = runner.invoke(main, ["reference", SOURCE, "--out", str(reference)])
    assert result.exit_code == 0, result.output
    built = tmp_path / "built"

    def build(variant: str, *extra: str):
        result = runner.invoke(main, ["build", SOURCE, "--recipe", "edge-gguf", "--variant", variant, "--out",
                                      str(built / variant), "--reference", str(reference), *extra])
        assert SENTINEL_TOKEN not in result.output
        return result

    return hub, runner, built, build, reference


@pytest.mark.parametrize("transfer", ["lfs", pytest.param("xet", marks=pytest.mark.slow)], indirect=True)
def test_preuploaded_builds_publish_in_one_commit_with_no_model_bytes_and_equal_a_one_machine_publish(
        jobs, transfer, tmp_path):
    """~50 s with LFS (three builds, then the same on one machine): the acceptance test of the fan-out."""
    hub, runner, built, build, _ = jobs
    for variant in VARIANTS:
        result = build(variant, "--preupload")
        assert result.exit_code == 0, result.output
        data = json.loads((built / variant / BUILD_FILE).read_text())
        [weights] = data["result"]["files"]
        assert data["preupload"]["repo_id"] == REPO and set(data["preupload"]["files"]) == {weights}
        assert data["preupload"]["files"][weights]["size"] == data["result"]["bytes"]
        assert not (built / variant / "files" / weights).exists()  # the artifact carries no model bytes
    assert hubbot_commits(hub) == []  # pre-uploading commits nothing
    assert set(hub.files(REPO)) == {".gitattributes"}

    hub.reset_counters()  # the publish job, on its own
    published = runner.invoke(main, ["publish", "--from-artifacts", str(built)])
    assert published.exit_code == 0, published.output
    files = hub.files(REPO)
    assert WEIGHTS | {"README.md", "validation.json", "hubbot.json", "quality.png"} == set(files) - {".gitattributes"}
    # all it sent as content is the card, validation.json and hubbot.json inline in the commit, and the
    # chart (a PNG: binary, so LFS/Xet): no model bytes
    chart = files["quality.png"]
    lfs_puts = [t for t in upload_requests(hub) if "/lfs-upload/" in t]
    assert len(lfs_puts) <= 1 and all(hashlib.sha256(chart).hexdigest() in t for t in lfs_puts)
    assert hub.cas.xorb_bytes_received <= 2 * len(chart)  # Xet: at most the chart's chunks, no model bytes
    inline = sum(len(files[p]) for p in ("README.md", "validation.json", "hubbot.json"))
    assert inline < hub.bytes_uploaded <= inline + 2 * len(chart)
    assert len(hubbot_commits(hub)) == 1
    if transfer == "xet":
        # the weights committed by reference to what the builds sent through Xet; the chart sent by this job
        assert set(hub.xet_files(REPO)) == WEIGHTS | {"quality.png"}

    one_machine = tmp_path / "one-machine"  # the same source and recipe, built and published on one machine
    result = runner.invoke(main, ["publish", SOURCE, "--recipe", "edge-gguf", "--out", str(one_machine),
                                  "--namespace", USER])
    assert result.exit_code == 0, result.output
    local = {p.relative_to(one_machine / "Phi-3-tiny-fanout-GGUF").as_posix(): p.read_bytes()
             for p in (one_machine / "Phi-3-tiny-fanout-GGUF").rglob("*") if p.is_file()}
    assert local == {p: b for p, b in files.items() if p != ".gitattributes"}  # README, validation, hubbot.json too

    again = runner.invoke(main, ["publish", SOURCE, "--recipe", "edge-gguf"])
    assert again.exit_code == 0 and "up to date" in again.stderr, again.output
    assert len(hubbot_commits(hub)) == 1
    forced = runner.invoke(main, ["publish", "--from-artifacts", str(built), "--force"])  # the same blobs again
    assert forced.exit_code == 0 and "nothing changed" in forced.stderr, forced.output
    assert len(hubbot_commits(hub)) == 1


@pytest.mark.slow
def test_a_build_killed_before_its_preupload_and_a_blob_missing_on_the_hub_each_publish_nothing(jobs, tmp_path):
    hub, runner, built, build, reference = jobs
    for variant in VARIANTS[:2]:
        assert build(variant, "--preupload").exit_code == 0

    # the F16 job is killed (SIGKILL) as its pre-upload starts: before any byte of it reached the Hub
    args = hubbot("build", SOURCE, "--recipe", "edge-gguf", "--variant", "gguf-F16", "--out", built / "gguf-F16",
                  "--reference", reference, "--preupload")
    with KillingProxy(hub.url) as proxy:
        proxy.kill_on = ("POST", r"/preupload/")
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=child_env(HF_ENDPOINT=proxy.url))
        proxy.victim = proc.pid
        assert proc.wait(timeout=600) == -signal.SIGKILL
        assert [method for method, _ in proxy.killed] == ["POST"]  # its preupload request, never forwarded
    assert (built / "gguf-F16" / "files" / "Phi-3-tiny-fanout-F16.gguf").is_file()  # built, never handed over
    assert not (built / "gguf-F16" / BUILD_FILE).exists()

    hub.reset_counters()
    result = runner.invoke(main, ["publish", "--from-artifacts", str(built)])
    assert result.exit_code == 1, result.output
    assert f"{REPO}: NOT published — no build of gguf-F16" in result.stderr
    assert hubbot_commits(hub) == [] and set(hub.files(REPO)) == {".gitattributes"}
    assert hub.bytes_uploaded == 0

    # F16 rebuilt and pre-uploaded, but Q8_0's blob is not in the repo's storage (lost, or never sent):
    # the Hub refuses the one commit whole
    assert build("gguf-F16", "--preupload").exit_code == 0
    result = runner.invoke(main, ["publish", "--from-artifacts", str(built), "--namespace", "someone-else"])
    assert result.exit_code == 1 and "pre-uploaded to another repo" in result.stderr, result.output
    assert not hub.repo_exists("someone-else/Phi-3-tiny-fanout-GGUF")
    q8 = json.loads((built / "gguf-Q8_0" / BUILD_FILE).read_text())["preupload"]["files"]
    del hub.lfs[repo_key("model", REPO)][q8["Phi-3-tiny-fanout-Q8_0.gguf"]["sha256"]]
    hub.reset_counters()
    result = runner.invoke(main, ["publish", "--from-artifacts", str(built)])
    assert result.exit_code == 1, result.output
    [line] = [ln for ln in result.stderr.splitlines() if "NOT published" in ln]
    assert "HTTP 422" in line and "Phi-3-tiny-fanout-Q8_0.gguf" in line, result.stderr
    assert hubbot_commits(hub) == [] and set(hub.files(REPO)) == {".gitattributes"}
    # what went up before the refused commit is at most the chart, never a model file
    blobs = [f for p in built.glob(f"*/{BUILD_FILE}") for f in json.loads(p.read_text())["preupload"]["files"].values()]
    assert not [t for t in upload_requests(hub) if any(b["sha256"] in t for b in blobs)]
    assert hub.cas.xorb_bytes_received < min(b["size"] for b in blobs)
    assert SENTINEL_TOKEN not in result.output


def test_preuploaded_builds_cannot_be_published_to_a_folder(jobs, tmp_path):
    hub, runner, built, build, _ = jobs
    assert build("gguf-Q4_K_M", "--preupload").exit_code == 0
    result = runner.invoke(main, ["publish", "--from-artifacts", str(built), "--out", str(tmp_path / "preview")])
    assert result.exit_code == 2, result.output
    assert "built with --preupload" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "preview" / "Phi-3-tiny-fanout-GGUF").exists()


def test_build_namespace_needs_preupload(jobs):
    _, _, _, build, _ = jobs
    result = build("gguf-Q4_K_M", "--namespace", "someone")
    assert result.exit_code == 2 and "--namespace is for --preupload" in result.stderr


def test_publish_workflow_preuploads_from_the_build_jobs_except_in_a_dry_run():
    from tests.test_workflows import load

    jobs = load("publish.yml")["jobs"]
    build_run = next(s["run"] for s in jobs["build"]["steps"] if "hubbot build" in s.get("run", ""))
    assert jobs["build"]["env"]["DRY_RUN"] == "${{ inputs.dry_run }}"
    assert 'if [ "${DRY_RUN}" != "true" ]; then' in build_run and "args+=(--preupload)" in build_run
    publish_run = next(s["run"] for s in jobs["publish"]["steps"] if "hubbot publish" in s.get("run", ""))
    assert "--from-artifacts" in publish_run and "--preupload" not in publish_run


def test_a_variant_that_failed_validation_is_never_preuploaded(hub_env, tiny_phi3, tmp_path):
    """The renamed tiny model fails GGUF validation (see test_validate): its build job pre-uploads nothing,
    creates no repo, and keeps its files and report in the build folder."""
    import shutil

    renamed = tmp_path / "renamed-model"
    shutil.copytree(tiny_phi3, renamed)
    out = tmp_path / "built" / "gguf-Q4_K_M"
    result = CliRunner().invoke(main, ["build", str(renamed), "--recipe", "edge-gguf", "--variant", "gguf-Q4_K_M",
                                       "--out", str(out), "--preupload"])
    assert result.exit_code == 1, result.output
    data = json.loads((out / BUILD_FILE).read_text())
    assert data["result"]["report"]["passed"] is False and "preupload" not in data
    assert all((out / "files" / f).is_file() for f in data["result"]["files"])
    assert not hub_env.repo_exists(f"{USER}/renamed-model-GGUF")
    assert not [r for r in hub_env.requests if "/preupload/" in r[1] or "/lfs-upload/" in r[1]]
