"""The Hub, bounded and honest: hubbot against the local Hub behind a fault-injecting proxy.

Unreachable endpoints (DNS, refused, TLS), calls that stall, commits whose answer is lost (it
landed / it did not / the Hub is gone so nobody can tell), concurrent writers, and a plan where one
repo fails while the others are published. Each test checks the exit code, the one-line message
(no traceback, never the token) and what the Hub really holds afterwards.

The variants are built once per module (``hubbot build``, two cheap GGUF variants into two repos),
so most tests publish prebuilt files (``publish --from-artifacts``) and take a second or two.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub import CommitOperationAdd, HfApi

from hubbot.cli import main
from hubbot.ledger import Ledger
from hubbot.publish import make_api
from tests.conftest import ROOT, SENTINEL_TOKEN, USER, _shared_converter
from tests.faultproxy import FaultProxy

RECIPE = "faults"
F16, Q8 = f"{USER}/tiny-phi3-F16-GGUF", f"{USER}/tiny-phi3-Q8_0-GGUF"
COMMIT = r"/api/models/[^?]+/commit/"
SOURCE_REPO = "microsoft/Phi-3-tiny-test"


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> Path:
    """recipes/phi.yaml with one GGUF repo per type, and recipes of one cheap variant per repo."""
    data = yaml.safe_load((ROOT / "recipes" / "phi.yaml").read_text())
    data["naming"]["gguf"] = {"repo": "{model}-{quant}-GGUF", "path": "{model}-{quant}.gguf"}
    data["recipes"][RECIPE] = {"description": "Two repos of one cheap GGUF variant each.",
                               "variants": [{"format": "gguf", "precision": "fp16"},
                                            {"format": "gguf", "precision": "int8"}]}
    data["recipes"]["faults-mixed"] = {"description": "A GGUF repo and an MLX repo.",
                                       "variants": [{"format": "gguf", "precision": "fp16"},
                                                    {"format": "mlx", "precision": "int8"}]}
    folder = tmp_path_factory.mktemp("recipes")
    (folder / "phi.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def artifacts(recipes, tiny_phi3, tmp_path_factory) -> Path:
    """Both variants of RECIPE built and validated from the bundled example (one reference run)."""
    out = tmp_path_factory.mktemp("artifacts")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HUBBOT_LLAMA_CPP_DIR", str(_shared_converter()))
        mp.setenv("HUBBOT_CACHE", str(out / "cache"))
        run = CliRunner().invoke(main, ["--recipes-dir", str(recipes), "reference", str(tiny_phi3),
                                        "--out", str(out / "reference.json")])
        assert run.exit_code == 0, run.output
        for variant in ("gguf-F16", "gguf-Q8_0"):
            run = CliRunner().invoke(main, ["--recipes-dir", str(recipes), "build", str(tiny_phi3), "--recipe", RECIPE,
                                            "--variant", variant, "--reference", str(out / "reference.json"),
                                            "--out", str(out / "builds" / variant)])
            assert run.exit_code == 0, run.output
    return out / "builds"


@pytest.fixture
def proxy(hub, monkeypatch):
    """The local Hub behind a FaultProxy; hubbot pointed at the proxy, with short timeouts and backoff."""
    with FaultProxy(hub.url) as p:
        monkeypatch.setenv("HF_ENDPOINT", p.url)
        monkeypatch.setenv("HF_TOKEN", SENTINEL_TOKEN)
        monkeypatch.setenv("HUBBOT_RETRY_BACKOFF", "0.05")
        monkeypatch.setenv("HUBBOT_HUB_TIMEOUT", "1.5")
        yield p


def hubbot(recipes: Path, *args: str):
    return CliRunner().invoke(main, ["--recipes-dir", str(recipes), *args])


def publish_artifacts(recipes: Path, artifacts: Path, *args: str):
    return hubbot(recipes, "publish", "--from-artifacts", str(artifacts), *args)


def one_error_line(result, exit_code: int = 1) -> str:
    """The run ended through hubbot's error handling: exit code, one 'Error:' line, no traceback, no token."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not an exception escaping
    assert "Traceback" not in result.output
    assert SENTINEL_TOKEN not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def succeeded(result) -> None:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and SENTINEL_TOKEN not in result.output


def squash(text: str) -> str:
    return "".join(text.split())


def table(output: str, title: str = "repos") -> dict[str, list[str]]:
    """The rows of the table titled ``title`` (rich's box drawing), by first cell; each cell's folded lines
    joined and squashed (compare with ``squash``)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines[start + 1:]:
        if line.startswith(("┏", "┃", "┡")):
            continue
        if not line.startswith("│"):
            break
        cells = [squash(c) for c in line.strip().strip("│").split("│")]
        if cells[0]:
            current = rows.setdefault(cells[0], [""] * len(cells))
        for i, cell in enumerate(cells):
            current[i] += cell
    return rows


def hubbot_commits(hub, repo: str) -> list:
    return [c for c in hub.commits(repo) if c.title.startswith("hubbot:")] if hub.repo_exists(repo) else []


def manifest(hub, repo: str) -> dict:
    return json.loads(hub.files(repo)["hubbot.json"])


def built_key(artifacts: Path, recipes: Path, tmp_path: Path) -> str:
    """The key hubbot.json records for the F16 repo, from a local preview of the same publish."""
    out = tmp_path / "preview"
    succeeded(publish_artifacts(recipes, artifacts, "--out", str(out), "--namespace", USER))
    return json.loads((out / F16.split("/")[1] / "hubbot.json").read_text())["key"]


# ------------------------------------------------------------------------------- unreachable Hub
def _endpoint(kind: str, hub, proxy) -> tuple[str, str]:
    """An endpoint that fails in the given way, and the words the message must give as the cause."""
    if kind == "dns":
        return "http://no-such-hub.invalid", "cannot resolve its host name"
    if kind == "refused":
        proxy.refuse()
        return proxy.url, "connection refused"
    return hub.url.replace("http://", "https://"), "TLS handshake failed"  # TLS to a plain-HTTP server


@pytest.mark.parametrize("kind", ["dns", "refused", "tls"])
@pytest.mark.parametrize("args", [
    pytest.param(("publish", SOURCE_REPO, "--recipe", RECIPE), id="publish"),
    pytest.param(("publish", SOURCE_REPO, "--recipe", RECIPE, "--namespace", USER), id="publish-namespace"),
    pytest.param(("publish", SOURCE_REPO, "--recipe", RECIPE, "--namespace", USER, "--no-preflight"),
                 id="publish-no-preflight"),
    pytest.param(("plan", SOURCE_REPO, "--recipe", RECIPE), id="plan"),
    pytest.param(("watch", "--once", "--namespace", USER), id="watch"),
])
def test_an_unreachable_hub_is_one_line_naming_endpoint_and_cause(kind, args, hub, proxy, recipes, tmp_path,
                                                                   monkeypatch):
    endpoint, words = _endpoint(kind, hub, proxy)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HUBBOT_LEDGER", str(tmp_path / "ledger.sqlite"))
    started = time.monotonic()
    line = one_error_line(hubbot(recipes, *args))
    assert f"cannot reach the Hub at {endpoint}" in line and words in line, line
    assert "client has been closed" not in line
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("namespace", [(), ("--namespace", USER)], ids=["whoami", "push"])
def test_publishing_prebuilt_variants_to_a_refusing_hub(namespace, proxy, hub, recipes, artifacts):
    proxy.refuse()
    line = one_error_line(publish_artifacts(recipes, artifacts, *namespace))
    assert f"cannot reach the Hub at {proxy.url}" in line and "connection refused" in line, line
    assert not hub.repo_exists(F16)


def test_the_clients_own_retry_after_a_connect_error_goes_on_with_a_working_client(proxy):
    """huggingface_hub's retry loop closes its shared client after a ConnectError and then tries again with
    it; with hubbot's client that try reaches the Hub once it is back (instead of 'client has been closed')."""
    from huggingface_hub.utils import http_backoff

    make_api(proxy.url)
    proxy.refuse()
    threading.Timer(0.4, proxy.restore).start()
    response = http_backoff("GET", f"{proxy.url}/api/whoami-v2", max_retries=8, base_wait_time=0.2,
                            max_wait_time=0.2, headers={"authorization": f"Bearer {SENTINEL_TOKEN}"})
    assert response.status_code == 200 and response.json()["name"] == USER
    assert [what for _, _, what in proxy.requests] == ["forward"]


def test_a_call_that_never_answers_times_out(proxy, recipes, artifacts):
    proxy.fault("stall", path=r"/api/whoami", times=10)
    started = time.monotonic()
    line = one_error_line(publish_artifacts(recipes, artifacts))
    assert "no answer within 1.5s" in line and proxy.url in line, line
    assert time.monotonic() - started < 30


def test_a_bad_timeout_setting_is_bad_input(proxy, recipes, artifacts, monkeypatch):
    monkeypatch.setenv("HUBBOT_HUB_TIMEOUT", "soon")
    line = one_error_line(publish_artifacts(recipes, artifacts), exit_code=2)
    assert "HUBBOT_HUB_TIMEOUT='soon'" in line


# ----------------------------------------------------------------------- a commit whose answer is lost
def test_commit_landed_but_the_connection_dropped(proxy, hub, recipes, artifacts):
    """The tester's case: the commit lands, the connection drops before the answer. hubbot checks, says it
    landed, and does not commit it again."""
    proxy.fault("drop_after", method="POST", path=COMMIT)
    result = publish_artifacts(recipes, artifacts)
    succeeded(result)
    assert "had landed although its answer was lost (the connection dropped before the Hub answered)" in result.stderr
    assert "nothing was committed" not in result.output
    assert len(hubbot_commits(hub, F16)) == 1 and len(hubbot_commits(hub, Q8)) == 1
    assert "tiny-phi3-F16.gguf" in hub.files(F16)

    again = publish_artifacts(recipes, artifacts)
    succeeded(again)
    assert "up to date" in again.stderr
    assert len(hubbot_commits(hub, F16)) == 1


def test_commit_landed_but_the_hub_never_answered(proxy, hub, recipes, artifacts):
    """The Hub keeps the connection open and never answers: the read times out, the check finds the commit."""
    proxy.fault("stall_after", method="POST", path=COMMIT)
    started = time.monotonic()
    result = publish_artifacts(recipes, artifacts)
    succeeded(result)
    assert "had landed although its answer was lost (no answer within 1.5s)" in result.stderr
    assert len(hubbot_commits(hub, F16)) == 1
    assert time.monotonic() - started < 60


def test_commit_that_did_not_land_is_checked_then_retried(proxy, hub, recipes, artifacts):
    proxy.fault("stall", method="POST", path=COMMIT)  # read by the "Hub", never forwarded, never answered
    result = publish_artifacts(recipes, artifacts)
    succeeded(result)
    assert "checked, it did not land" in result.stderr
    assert len(hubbot_commits(hub, F16)) == 1
    assert manifest(hub, F16)["files"].keys() >= {"tiny-phi3-F16.gguf"}


def test_commit_that_never_lands_says_nothing_was_committed_only_after_checking(proxy, hub, recipes, artifacts):
    proxy.fault("drop", method="POST", path=rf"{F16}/commit/", times=100)
    result = publish_artifacts(recipes, artifacts)
    line = one_error_line(result)
    head = hub.commits(F16)[-1].oid
    assert f"1 of 2 repo(s) not published — {F16}: commit to {F16} failed after 4 attempt(s)" in line
    assert f"checked afterwards: nothing was committed ({F16} is still at {head[:12]})" in line
    assert hubbot_commits(hub, F16) == [] and set(hub.files(F16)) == {".gitattributes"}
    assert len(hubbot_commits(hub, Q8)) == 1  # the other repo went on
    commits_tried = [r for r in proxy.requests if r[0] == "POST" and "/commit/" in r[1] and F16 in r[1]]
    assert len(commits_tried) == 4  # bounded retries, each checked first


def test_pull_request_opened_but_its_answer_lost_is_found_not_opened_twice(proxy, hub, recipes, artifacts):
    old = json.dumps({"key": "an-older-build", "files": {"tiny-phi3-F16.gguf": {"size": 4}}})
    hub.seed_repo(F16, {"hubbot.json": old, "tiny-phi3-F16.gguf": b"GGUF"}, author=USER)
    proxy.fault("drop_after", method="POST", path=rf"{F16}/commit/")
    result = publish_artifacts(recipes, artifacts, "--pr")
    succeeded(result)
    [pr] = hub.pull_requests(F16)
    assert "had landed although its answer was lost" in result.stderr
    assert f"/{F16}/discussions/{pr.num}" in squash(result.stdout)
    assert json.loads(pr.files["hubbot.json"])["key"] != "an-older-build"
    assert json.loads(hub.files(F16)["hubbot.json"])["key"] == "an-older-build"  # main untouched


def test_commit_whose_fate_cannot_be_checked_is_reported_unknown(proxy, hub, recipes, artifacts):
    """The commit lands, the answer is lost and the Hub goes away: hubbot cannot tell and says so."""
    proxy.fault("drop_after", method="POST", path=COMMIT, then_refuse=True)
    result = publish_artifacts(recipes, artifacts, "--namespace", USER)
    one_error_line(result)
    text = " ".join(result.output.split())
    assert "whether the commit landed is unknown, as checking failed" in text
    assert f"cannot reach the Hub at {proxy.url}" in text and "connection refused" in text
    assert "nothing was committed" not in text and "had landed" not in text
    assert len(hubbot_commits(hub, F16)) == 1  # it had landed: hubbot did not claim otherwise

    proxy.restore()
    again = publish_artifacts(recipes, artifacts, "--namespace", USER)
    succeeded(again)
    assert len(hubbot_commits(hub, F16)) == 1 and len(hubbot_commits(hub, Q8)) == 1


# --------------------------------------------------------------------------------- concurrent writers
def _other_writer(hub, repo: str, files: dict[str, bytes], message: str = "another writer"):
    """Another client committing to ``repo`` straight on the Hub (not through the proxy)."""
    api = HfApi(endpoint=hub.url, token=SENTINEL_TOKEN)

    def commit():
        api.create_commit(repo, [CommitOperationAdd(p, data) for p, data in files.items()], commit_message=message)
    return commit


def test_a_concurrent_commit_is_re_read_and_built_upon_never_overwritten(proxy, hub, recipes, artifacts):
    leftover = json.dumps({"key": "another-build", "files": {"leftover.gguf": {"size": 4}}}).encode()
    other = _other_writer(hub, F16, {"NOTES.md": b"kept\n", "hubbot.json": leftover, "leftover.gguf": b"GGUF"})
    proxy.fault("forward", method="POST", path=rf"{F16}/commit/", before=other)
    result = publish_artifacts(recipes, artifacts)
    succeeded(result)
    assert "another commit landed on main" in result.stderr and "deciding again" in result.stderr
    assert [status for method, target, status in hub.requests
            if method == "POST" and F16 in target and "/commit/" in target] == [200, 412, 200]  # theirs, ours, ours
    initial, theirs, ours = hub.commits(F16)
    assert theirs.title == "another writer" and ours.parent == theirs.oid
    files = hub.files(F16)
    assert files["NOTES.md"] == b"kept\n"  # someone else's file: untouched
    assert "leftover.gguf" not in files  # listed in the hubbot.json hubbot re-read: a stale hubbot file
    assert manifest(hub, F16)["key"] != "another-build"


def test_a_concurrent_run_publishing_the_same_build_leaves_nothing_to_do(proxy, hub, recipes, artifacts, tmp_path):
    key = built_key(artifacts, recipes, tmp_path)
    staged = tmp_path / "preview" / F16.split("/")[1]
    same = _other_writer(hub, F16, {p.name: p.read_bytes() for p in staged.iterdir()}, "hubbot: another run")
    proxy.fault("forward", method="POST", path=rf"{F16}/commit/", before=same)
    result = publish_artifacts(recipes, artifacts)
    succeeded(result)
    assert "holds this very build" in result.stderr
    assert table(result.stdout)[F16][1] == "up-to-date"
    assert [c.title for c in hubbot_commits(hub, F16)] == ["hubbot: another run"]
    assert manifest(hub, F16)["key"] == key


def test_writers_that_keep_committing_stop_hubbot_after_a_bounded_number_of_tries(proxy, hub, recipes, artifacts):
    counter = iter(range(100))
    proxy.fault("forward", method="POST", path=rf"{F16}/commit/", times=100,
                before=lambda: _other_writer(hub, F16, {"NOTES.md": f"{next(counter)}\n".encode()})())
    result = publish_artifacts(recipes, artifacts)
    one_error_line(result)
    assert "other commits kept landing on main while hubbot committed (4 tries" in " ".join(result.output.split())
    assert hubbot_commits(hub, F16) == []
    assert [c.title for c in hub.commits(F16)][1:] == ["another writer"] * 4
    assert len(hubbot_commits(hub, Q8)) == 1


# --------------------------------------------------------------------- one failure does not hide the rest
def test_a_repo_the_hub_refuses_is_reported_and_the_others_are_published(proxy, hub, recipes, artifacts):
    hub.inject(method="POST", path=rf"{F16}/commit/", status=422, times=1)
    result = publish_artifacts(recipes, artifacts)
    line = one_error_line(result)
    assert f"1 of 2 repo(s) not published — {F16}: commit to {F16}: the Hub refused it (HTTP 422" in line
    rows = table(result.stdout)
    assert rows[F16][1] == "failed" and squash("the Hub refused it (HTTP 422") in rows[F16][2]
    assert rows[Q8][1] == "published"
    assert hubbot_commits(hub, F16) == [] and len(hubbot_commits(hub, Q8)) == 1


@pytest.fixture
def broken_converter(tmp_path, monkeypatch) -> Path:
    """llama.cpp's converter missing from its folder: the GGUF build fails for real, in the tool's run."""
    empty = tmp_path / "no-converter"
    empty.mkdir()
    monkeypatch.setenv("HUBBOT_LLAMA_CPP_DIR", str(empty))
    return empty


@pytest.mark.slow  # builds, validates and publishes an MLX variant: 20-40 s
def test_a_build_that_fails_is_reported_and_the_other_repo_is_published(proxy, hub, recipes, tiny_phi3,
                                                                        broken_converter):
    pytest.importorskip("mlx_lm", reason="needs hubbot[mlx]")
    result = hubbot(recipes, "publish", str(tiny_phi3), "--recipe", "faults-mixed")
    line = one_error_line(result)
    assert f"1 of 2 repo(s) not published — {F16}: build failed: llama.cpp's converter failed" in line
    rows = table(result.stdout)
    assert rows[F16][1] == "failed" and squash("build failed: llama.cpp's converter failed (exit 2)") in rows[F16][2]
    assert squash("can't open file") in rows[F16][2]  # the tool's own last words, not only "see the log"
    assert rows[f"{USER}/tiny-phi3-8bit"][1] == "published"
    assert not hub.repo_exists(F16) or hubbot_commits(hub, F16) == []
    assert len(hubbot_commits(hub, f"{USER}/tiny-phi3-8bit")) == 1


@pytest.mark.slow  # the same through `watch`: a Hub release, built and published
def test_watch_reports_the_failed_repo_and_publishes_the_other(proxy, hub, recipes, tiny_phi3, broken_converter,
                                                                tmp_path, monkeypatch):
    pytest.importorskip("mlx_lm", reason="needs hubbot[mlx]")
    sha = hub.seed_repo(SOURCE_REPO, {p.name: p for p in tiny_phi3.iterdir() if p.is_file()})
    ledger = tmp_path / "ledger.sqlite"
    result = hubbot(recipes, "watch", "--once", "--ledger", str(ledger), "--recipe", "faults-mixed",
                    "--no-collections")
    one_error_line(result)
    [row] = table(result.stdout, "watch:").values()
    assert row[3] == "failed"
    assert squash(f"{USER}/Phi-3-tiny-test-F16-GGUF (failed: build failed: llama.cpp's converter failed") in row[4]
    assert squash(f"{USER}/Phi-3-tiny-test-8bit (published)") in row[4]
    assert len(hubbot_commits(hub, f"{USER}/Phi-3-tiny-test-8bit")) == 1
    with Ledger(ledger) as led:
        assert led.get(SOURCE_REPO, sha).status == "failed"
