"""`hubbot watch` and `hubbot status` against the local Hub server, through the real client:
new releases, a new revision of a known one, a gated one, one whose build fails, re-runs that
publish nothing, the Actions outputs, and two watchers started at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from hubbot.cli import main
from hubbot.ledger import Ledger
from tests.conftest import ROOT, SENTINEL_TOKEN, USER

NEW = "microsoft/Phi-3-tiny-new"  # appears between two passes
KNOWN = "microsoft/Phi-3-tiny-known"  # published by an earlier pass, then gets a new revision
GATED = "microsoft/Phi-3-tiny-gated"  # gated, and the token has no access
BROKEN = "microsoft/Phi-3-tiny-broken"  # no weights: its build fails
OTHER = ["microsoft/Orca-tiny", "someone/Phi-3-tiny-copy"]  # not the family's: ignored


def gguf_repo(source: str) -> str:
    return f"{USER}/{source.split('/')[1]}-GGUF"


def model_files(tiny: Path, *, weights: bool = True) -> dict[str, Path]:
    return {p.name: p for p in tiny.iterdir() if p.is_file() and (weights or p.suffix != ".safetensors")}


def hubbot_commits(hub, repo: str) -> list:
    return [c for c in hub.commits(repo) if c.title.startswith("hubbot:")] if hub.repo_exists(repo) else []


def watch(ledger: Path, *args: str, env: dict | None = None):
    # the GGUF-only recipe keeps each release to one quick build; a later --recipe wins
    return CliRunner(env=env).invoke(main, ["watch", "--once", "--ledger", str(ledger), "--recipe", "edge-gguf", *args])


@pytest.fixture
def env(hub_env, monkeypatch):
    monkeypatch.setenv("HUBBOT_RETRY_BACKOFF", "0.05")
    for var in ("GITHUB_ACTIONS", "GITHUB_STEP_SUMMARY", "GITHUB_OUTPUT"):
        monkeypatch.delenv(var, raising=False)
    return hub_env


def test_ledger_claim_is_exclusive_across_connections(tmp_path):
    path = tmp_path / "ledger.sqlite"
    won: list[bool] = []
    barrier = threading.Barrier(8)

    def contender():
        with Ledger(path) as ledger:
            barrier.wait()
            won.append(ledger.claim("microsoft/Phi-3-x", "a" * 40, "phi", "edge", None))

    threads = [threading.Thread(target=contender) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == [False] * 7 + [True]
    with Ledger(path) as ledger:
        [release] = ledger.releases()
        assert (release.status, release.attempts) == ("building", 1)
        ledger.finish(release.repo, release.sha, "failed", "boom")
        assert ledger.claim(release.repo, release.sha, "phi", "edge", None, max_attempts=3)  # retried
        ledger.finish(release.repo, release.sha, "failed", "boom")
        assert ledger.claim(release.repo, release.sha, "phi", "edge", None, max_attempts=3)
        ledger.finish(release.repo, release.sha, "failed", "boom")
        assert not ledger.claim(release.repo, release.sha, "phi", "edge", None, max_attempts=3)  # gave up
        assert ledger.claim(release.repo, "b" * 40, "phi", "edge", None, max_attempts=3)  # a new sha is news
        ledger.finish(release.repo, "b" * 40, "published")
        assert ledger.get(release.repo, "a" * 40).status == "superseded"
        assert not ledger.claim(release.repo, "b" * 40, "phi", "edge", None)


def test_watch_publishes_new_releases_updates_revisions_and_skips_what_it_cannot_build(env, tiny_phi3, tmp_path):
    hub, ledger_path = env, tmp_path / "state" / "ledger.sqlite"
    old_sha = hub.seed_repo(KNOWN, model_files(tiny_phi3), created_at="2026-01-01T00:00:00Z")
    first = watch(ledger_path)
    assert first.exit_code == 0, first.output
    assert len(hubbot_commits(hub, gguf_repo(KNOWN))) == 1

    # the seeded releases: a new model, a new revision of the known one, a gated one, a broken one
    readme = tiny_phi3.joinpath("README.md").read_text() + "\nA new upstream revision.\n"
    new_known_sha = hub.seed_repo(KNOWN, {"README.md": readme})
    new_sha = hub.seed_repo(NEW, model_files(tiny_phi3))
    gated_sha = hub.seed_repo(GATED, model_files(tiny_phi3), gated="manual")
    broken_sha = hub.seed_repo(BROKEN, model_files(tiny_phi3, weights=False))
    for repo in OTHER:
        hub.seed_repo(repo, model_files(tiny_phi3))

    second = watch(ledger_path)
    assert second.exit_code == 1, second.output  # the broken release failed
    assert "1 release(s) failed" in second.stderr and BROKEN in second.stderr
    assert len(hubbot_commits(hub, gguf_repo(NEW))) == 1
    assert len(hubbot_commits(hub, gguf_repo(KNOWN))) == 2  # the new revision updated it
    for source, sha in ((NEW, new_sha), (KNOWN, new_known_sha)):
        manifest = json.loads(hub.files(gguf_repo(source))["hubbot.json"])
        assert manifest["source"]["commit"] == sha
    for repo in [GATED, BROKEN, *OTHER]:
        assert not hub.repo_exists(gguf_repo(repo))

    with Ledger(ledger_path) as ledger:
        status = {(r.repo, r.sha): (r.status, r.attempts) for r in ledger.releases()}
        assert status == {
            (KNOWN, old_sha): ("superseded", 1), (KNOWN, new_known_sha): ("published", 1),
            (NEW, new_sha): ("published", 1), (GATED, gated_sha): ("skipped", 0),
            (BROKEN, broken_sha): ("failed", 1),
        }
        assert "gated" in ledger.get(GATED, gated_sha).reason
        # each release has one collection holding its variant repos (the update reused KNOWN's)
        collections = {c["title"]: c for c in hub.collections.values()}
        assert set(collections) == {"Phi-3-tiny-new quantized", "Phi-3-tiny-known quantized"}
        for source in (NEW, KNOWN):
            c = collections[f"{source.split('/')[1]} quantized"]
            assert [i["id"] for i in c["items"]] == [gguf_repo(source)] and c["owner"]["name"] == USER
        assert ledger.get(NEW, new_sha).collection == collections["Phi-3-tiny-new quantized"]["slug"]
        assert "no *.safetensors" in ledger.get(BROKEN, broken_sha).reason
        new_variants = ledger.variants(NEW, new_sha)
        assert {v.variant for v in new_variants} == {"gguf-Q4_K_M", "gguf-Q8_0", "gguf-F16"}
        head = hub.commits(gguf_repo(NEW))[-1].oid
        for v in new_variants:
            assert (v.target_repo, v.status, v.passed, v.commit_sha) == (gguf_repo(NEW), "published", True, head)
            assert v.agreement >= v.threshold

    # a second pass publishes nothing; the failure is retried (and fails again); under Actions it
    # writes the summary table, the outputs and an error annotation
    hub.reset_counters()
    summary, outputs = tmp_path / "summary.md", tmp_path / "outputs.txt"
    third = watch(ledger_path, env={"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary),
                                    "GITHUB_OUTPUT": str(outputs)})
    assert third.exit_code == 1, third.output
    assert not [r for r in hub.requests if r[0] == "POST" and "/commit/" in r[1]]
    assert len(hubbot_commits(hub, gguf_repo(KNOWN))) == 2 and len(hubbot_commits(hub, gguf_repo(NEW))) == 1
    with Ledger(ledger_path) as ledger:
        assert ledger.get(BROKEN, broken_sha).attempts == 2
    assert f"::error title={BROKEN} failed::" in third.stderr
    assert f"::group::{BROKEN}@{broken_sha[:12]}" in third.stderr
    text = summary.read_text()
    assert "### hubbot watch" in text and f"| {BROKEN} | {broken_sha[:12]} | phi | failed |" in text
    assert "published=0\nfailed=1\nskipped=1\n" in outputs.read_text()

    # the Hub manifest is the second guard: a watcher that lost its ledger rebuilds nothing
    fresh = watch(tmp_path / "fresh.sqlite", "--since", "2026-01-01")
    assert fresh.exit_code == 1
    assert not [r for r in hub.requests if r[0] == "POST" and "/commit/" in r[1]]
    with Ledger(tmp_path / "fresh.sqlite") as ledger:
        assert ledger.get(NEW, new_sha).status == "up-to-date"
        assert ledger.get(KNOWN, new_known_sha).status == "up-to-date"
    assert "release(s) listed" in watch(tmp_path / "none.sqlite", "--since", "2100-01-01").stdout

    shown = CliRunner().invoke(main, ["status", "--ledger", str(ledger_path)])
    assert shown.exit_code == 0, shown.output
    flat = " ".join(shown.stdout.split())
    for repo in (NEW, KNOWN, GATED, BROKEN):
        assert repo in flat
    assert "superseded" in flat and "skipped" in flat and "gguf-Q4_K_M" in flat
    for text in (first.output, second.output, third.output, fresh.output, shown.output, summary.read_text(),
                 outputs.read_text()):
        assert SENTINEL_TOKEN not in text
    as_json = json.loads(CliRunner().invoke(main, ["status", "--ledger", str(ledger_path), "--json"]).stdout)
    assert len(as_json["releases"]) == 5 and len(as_json["variants"]) == 9


def test_status_without_a_ledger_says_how_to_get_one(tmp_path):
    result = CliRunner().invoke(main, ["status", "--ledger", str(tmp_path / "missing.sqlite")])
    assert result.exit_code == 2
    assert "hubbot watch" in result.stderr


def test_watch_rejects_an_unknown_family_or_recipe(env, tmp_path):
    assert watch(tmp_path / "l.sqlite", "--family", "nope").exit_code == 2
    result = watch(tmp_path / "l.sqlite", "--recipe", "nope")
    assert result.exit_code == 2 and "no recipe 'nope'" in result.stderr


def test_two_watchers_started_at_once_publish_each_release_exactly_once(env, tiny_phi3, tmp_path):
    hub = env
    releases = ["microsoft/Phi-3-tiny-one", "microsoft/Phi-3-tiny-two"]
    shas = {repo: hub.seed_repo(repo, model_files(tiny_phi3)) for repo in releases}
    ledger_path = tmp_path / "shared-ledger.sqlite"
    child_env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": SENTINEL_TOKEN,
                 "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "hubbot.cli", "watch", "--once", "--ledger", str(ledger_path),
               "--recipe", "edge-gguf"]
    procs = [subprocess.Popen(command, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out + err
        assert SENTINEL_TOKEN not in out + err
    logs = "".join(err for _, err in outputs)
    for repo in releases:
        assert logs.count(f"{repo}@{shas[repo][:12]}: new release") == 1
        assert len(hubbot_commits(hub, gguf_repo(repo))) == 1
    with Ledger(ledger_path) as ledger:
        assert {(r.repo, r.status, r.attempts) for r in ledger.releases()} == \
               {(repo, "published", 1) for repo in releases}
