"""Interrupted runs, with real processes and a real ``kill -9``: during a build, while an ``--out``
folder is written, and while a push reaches the (local) Hub; and a disk that fills up, on a real
small tmpfs (mounted in a user and mount namespace, so no root is needed where those are allowed).

After each kill, the next run completes with the bytes an uninterrupted run makes, and leaves no
temp folder, ``.staging-*`` or ``.old-*`` behind; a concurrent live run's folder is never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from hubbot.publish import FolderTarget
from hubbot.scratch import OWNER, PREFIX, process_start, sweep
from tests.conftest import ROOT, USER

SOURCE_REPO = "microsoft/Phi-3-tiny-test"
REPO = f"{USER}/Phi-3-tiny-test-GGUF"
RECIPE = "one-gguf"


# ----------------------------------------------------------------------------- helpers
def child_env(**extra: str) -> dict[str, str]:
    """The test's environment (local Hub, isolated caches) for a hubbot child process run from this checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    return env


def hubbot(*args: object) -> list[str]:
    return [sys.executable, "-m", "hubbot.cli", *map(str, args)]


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hubbot_commits(hub, repo: str = REPO):
    return [c for c in hub.commits(repo) if c.title.startswith("hubbot:")] if hub.repo_exists(repo) else []


@pytest.fixture
def recipes(tmp_path) -> Path:
    """recipes/phi.yaml plus a one-variant recipe (GGUF Q8_0): the cheapest full build."""
    data = yaml.safe_load((ROOT / "recipes" / "phi.yaml").read_text())
    data["recipes"][RECIPE] = {"description": "one GGUF", "variants": [{"format": "gguf", "precision": "int8"}]}
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "phi.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return folder


class LiveRun:
    """Another hubbot process holding its scratch folder, as a concurrent run does while it builds."""

    SCRIPT = ("import sys\nfrom hubbot.scratch import scratch_folder\n"
              "with scratch_folder(sys.argv[1]) as f:\n    print(f, flush=True)\n    sys.stdin.read()\n")

    def __init__(self, parent: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT, str(parent)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=child_env())
        self.folder = Path(self.proc.stdout.readline().strip())

    def stop(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# ----------------------------------------------------------------------------- scratch folders
def test_sweep_removes_only_the_folders_of_dead_runs(tmp_path):
    live = LiveRun(tmp_path)
    killed = LiveRun(tmp_path)
    os.kill(killed.proc.pid, signal.SIGKILL)
    killed.proc.wait()
    assert killed.folder.is_dir()  # SIGKILL ran no cleanup
    reused = tmp_path / f"{PREFIX}{os.getpid()}-reused"  # our pid, but a process that started earlier
    reused.mkdir()
    (reused / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                            "started": str(int(process_start(os.getpid())) - 1)}))
    elsewhere = tmp_path / f"{PREFIX}{killed.proc.pid}-elsewhere"  # a shared workdir: another host's run
    elsewhere.mkdir()
    (elsewhere / OWNER).write_text(json.dumps({"host": "another-host", "pid": killed.proc.pid, "started": "1"}))
    unrelated = tmp_path / f"{PREFIX}cache"
    unrelated.mkdir()
    try:
        removed = sweep(tmp_path)
        assert sorted(removed) == sorted([killed.folder, reused])
        assert {p.name for p in tmp_path.iterdir()} == {live.folder.name, elsewhere.name, unrelated.name}
    finally:
        live.stop()
    assert not live.folder.exists()  # a run that ends removes its own folder


# ----------------------------------------------------------------------------- --out folders
PUSH = """
import os, shutil, signal, sys
from pathlib import Path
from hubbot.publish import FolderTarget

point, out, folder = sys.argv[1:]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if point == "copying":  # after the first file of the new version is in .staging-*
    copy2, copied = shutil.copy2, []
    def shutil_copy2(*args, **kwargs):
        if copied:
            die()
        copied.append(copy2(*args, **kwargs))
    shutil.copy2 = shutil_copy2
else:  # right after the first rename (old folder aside) or the second (new folder in place)
    rename, renames = Path.rename, []
    def path_rename(self, target):
        renames.append(rename(self, target))
        if len(renames) == {"between-renames": 1, "before-cleanup": 2}[point]:
            die()
        return renames[-1]
    Path.rename = path_rename
FolderTarget(Path(out), "local").push("local/tiny", Path(folder), "message", "description")
"""


def make_version(folder: Path, tag: str) -> Path:
    (folder / "variant").mkdir(parents=True)
    (folder / "README.md").write_text(f"# tiny, {tag}\n")
    (folder / "variant" / "model.bin").write_bytes(tag.encode() * 100_000)
    (folder / "hubbot.json").write_text(json.dumps({"key": tag}))
    return folder


@pytest.mark.parametrize("point, left_behind", [
    ("copying", {"tiny", ".staging-*"}),
    ("between-renames", {".old-tiny", ".staging-*"}),  # the repo folder itself is missing here
    ("before-cleanup", {"tiny", ".old-tiny"}),
])
def test_killed_out_write_leaves_a_complete_folder(tmp_path, point, left_behind):
    out = tmp_path / "out"
    v1, v2 = make_version(tmp_path / "v1", "v1"), make_version(tmp_path / "v2", "v2")
    FolderTarget(out, "local").push("local/tiny", v1, "m", "d")

    killed = subprocess.run([sys.executable, "-c", PUSH, point, str(out), str(v2)], env=child_env(), timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert {re.sub(r"^\.staging-.*", ".staging-*", p.name) for p in out.iterdir()} == left_behind

    # the next run sees a complete repo folder before it writes anything: the old one, or the new one
    # when the kill came after the swap
    manifest = FolderTarget(out, "local").current_manifest("local/tiny")
    assert manifest == {"key": "v2" if point == "before-cleanup" else "v1"}
    assert [p.name for p in out.iterdir()] == ["tiny"]
    assert tree_bytes(out / "tiny") == tree_bytes(v2 if point == "before-cleanup" else v1)

    FolderTarget(out, "local").push("local/tiny", v2, "m", "d")
    assert [p.name for p in out.iterdir()] == ["tiny"]
    assert tree_bytes(out / "tiny") == tree_bytes(v2)


def test_concurrent_pushes_to_one_out_folder_never_mix(tmp_path):
    out = tmp_path / "out"
    versions = [make_version(tmp_path / f"v{i}", f"v{i}") for i in range(4)]
    script = ("import sys\nfrom pathlib import Path\nfrom hubbot.publish import FolderTarget\n"
              "for _ in range(5):\n"
              "    FolderTarget(Path(sys.argv[1]), 'local').push('local/tiny', Path(sys.argv[2]), 'm', 'd')\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(out), str(v)], env=child_env()) for v in versions]
    assert [p.wait(timeout=120) for p in procs] == [0] * len(procs)
    assert [p.name for p in out.iterdir()] == ["tiny"]
    assert tree_bytes(out / "tiny") in [tree_bytes(v) for v in versions]


# ----------------------------------------------------------------------------- a build
@pytest.mark.slow
def test_killed_build_is_swept_and_the_next_run_makes_the_same_bytes(tiny_phi3, recipes, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    args = ("--recipes-dir", recipes, "publish", tiny_phi3, "--recipe", RECIPE, "--out", out, "--workdir", work)
    live = LiveRun(work)
    try:
        with (tmp_path / "killed.log").open("wb") as log:
            proc = subprocess.Popen(hubbot(*args), stdout=log, stderr=subprocess.STDOUT, env=child_env())
        folder = wait_for(lambda: next(work.glob(f"{PREFIX}{proc.pid}-*"), None), 300, "the run's scratch folder")
        tools = wait_for(lambda: [c for c in children(proc.pid) if str(folder) in cmdline(c)], 300,
                         "a format's tool running in the scratch folder")
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        # the tool runs in its own session and outlives hubbot; end it as a supervisor would, so
        # that it cannot write into the folder while the next run sweeps it
        for tool in tools:
            with contextlib.suppress(ProcessLookupError):  # it may have ended on its own meanwhile
                os.killpg(tool, signal.SIGKILL)
        assert folder.is_dir() and not (out / "tiny-phi3-GGUF").exists()

        again = subprocess.run(hubbot(*args), capture_output=True, text=True, env=child_env(), timeout=900)
        assert again.returncode == 0, again.stderr
        assert f"removed {folder}, the temp folder of an earlier run that was killed" in again.stderr
        assert [p.name for p in work.iterdir()] == [live.folder.name]  # the live run's folder stays
        assert [p.name for p in out.iterdir()] == ["tiny-phi3-GGUF"]
    finally:
        live.stop()
    assert list(work.iterdir()) == []

    uninterrupted = tmp_path / "uninterrupted"
    clean = subprocess.run(hubbot("--recipes-dir", recipes, "publish", tiny_phi3, "--recipe", RECIPE, "--out",
                                  uninterrupted), capture_output=True, text=True, env=child_env(), timeout=900)
    assert clean.returncode == 0, clean.stderr
    assert tree_bytes(out) == tree_bytes(uninterrupted)


# ----------------------------------------------------------------------------- a push to the Hub
class KillingProxy:
    """A forwarding proxy in front of the local Hub that kills ``victim`` (SIGKILL) as soon as it has
    received a request matching ``kill_on`` (method, regex), and never forwards that request.

    URLs of the Hub in answers (the LFS upload actions, Location and Link headers) are rewritten to
    the proxy's, so uploads come through it too."""

    HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "proxy-connection"}

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.victim: int | None = None
        self.kill_on: tuple[str, str] | None = None
        self.killed: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _any(self):
                proxy.forward(self)

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> KillingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def read_body(h: BaseHTTPRequestHandler) -> bytes:
        if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while (size := int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(h.rfile.read(size))
                h.rfile.readline()
            while h.rfile.readline().strip():
                pass
            return b"".join(chunks)
        n = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(n) if n else b""

    def forward(self, h: BaseHTTPRequestHandler) -> None:
        body = self.read_body(h)
        if self.kill_on and self.victim and h.command == self.kill_on[0] and re.search(self.kill_on[1], h.path):
            os.kill(self.victim, signal.SIGKILL)
            self.killed.append((h.command, h.path))
            self.kill_on = None
            h.close_connection = True
            return
        conn = HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in self.HOP}
        conn.request(h.command, h.path, body=body, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        up, me = f"{self.upstream.scheme}://{self.upstream.netloc}", self.url
        if "json" in (resp.getheader("Content-Type") or ""):
            payload = payload.replace(up.encode(), me.encode())
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in self.HOP:
                h.send_header(k, v.replace(up, me))
        length = resp.getheader("Content-Length") if h.command == "HEAD" else str(len(payload))
        h.send_header("Content-Length", length or "0")
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(payload)
        conn.close()


@pytest.mark.slow
def test_killed_push_leaves_the_hub_repo_untouched_and_the_next_run_publishes(hub_env, tiny_phi3, recipes,
                                                                                 tmp_path):
    hub = hub_env
    hub.seed_repo(SOURCE_REPO, {p.name: p for p in tiny_phi3.iterdir() if p.is_file()})
    work = tmp_path / "work"
    work.mkdir()
    args = hubbot("--recipes-dir", recipes, "publish", SOURCE_REPO, "--recipe", RECIPE, "--workdir", work)
    with KillingProxy(hub.url) as proxy:
        env = child_env(HF_ENDPOINT=proxy.url)
        for kill_on in (("PUT", r"/lfs-upload/"), ("POST", r"/api/models/.+/commit/")):
            proxy.kill_on = kill_on
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            proxy.victim = proc.pid
            assert proc.wait(timeout=900) == -signal.SIGKILL
            assert proxy.killed[-1][0] == kill_on[0]
            assert hubbot_commits(hub) == []
            assert set(hub.files(REPO)) <= {".gitattributes"}  # created, never written
            # left behind by this run only: each run sweeps the folder of the one killed before it
            [left] = work.iterdir()
            assert left.name.startswith(f"{PREFIX}{proc.pid}-")
        assert len(proxy.killed) == 2

        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
        assert done.returncode == 0, done.stderr
        assert f"removed {left}, the temp folder of an earlier run that was killed" in done.stderr
        assert list(work.iterdir()) == []
        [commit] = hubbot_commits(hub)
        files = hub.files(REPO)
        manifest = json.loads(files["hubbot.json"])
        assert set(files) - {".gitattributes"} == {*manifest["files"], "hubbot.json"}

        # an uninterrupted rebuild makes the very same files: the Hub gets no new commit
        again = subprocess.run([*args, "--force"], capture_output=True, text=True, env=env, timeout=900)
        assert again.returncode == 0, again.stderr
        assert "nothing changed, no commit" in again.stderr
        assert hubbot_commits(hub) == [commit]


# ----------------------------------------------------------------------------- a full disk
SMALL_DISK = """
mount -t tmpfs -o size="$1" tmpfs "$2" || exit 97
disk=$2; listing=$3; shift 3
"$@"; rc=$?
ls -A "$disk" > "$listing"
exit $rc
"""


def on_small_disk(size: str, disk: Path, command: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, list]:
    """Run ``command`` with a ``size`` tmpfs mounted on ``disk`` (in its own user and mount namespace:
    the mount is gone when it exits); also what it left on that disk."""
    disk.mkdir(exist_ok=True)
    listing = disk.with_name(disk.name + ".listing")
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", SMALL_DISK, "sh",
                             size, str(disk), str(listing), *command], capture_output=True, text=True, **kwargs)
    if result.returncode == 97:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    return result, listing.read_text().split()


@pytest.fixture(scope="module")
def namespaces():
    if not shutil.which("unshare"):
        pytest.skip("no unshare(1): a small tmpfs cannot be mounted without root")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"user and mount namespaces are not allowed here: {probe.stderr.strip()}")


def test_full_out_disk_raises_enospc_and_leaves_no_staging_folder(namespaces, tmp_path):
    big = make_version(tmp_path / "big", "x" * 30)  # 3 MB of model.bin, for a 1 MB disk
    script = ("import sys\nfrom pathlib import Path\nfrom hubbot.publish import FolderTarget\n"
              "try:\n    FolderTarget(Path(sys.argv[1]), 'local').push('local/tiny', Path(sys.argv[2]), 'm', 'd')\n"
              "except OSError as e:\n    print(e.errno, e.filename2 or e.filename)\n    sys.exit(1)\n")
    out = tmp_path / "out"
    result, left = on_small_disk("1m", out, [sys.executable, "-c", script, str(out), str(big)], env=child_env(),
                                 timeout=60)
    assert result.returncode == 1, result.stderr
    errno_, written = result.stdout.split()
    assert int(errno_) == 28  # ENOSPC, from a real write
    staging, *path = Path(written).relative_to(out).parts
    assert staging.startswith(".staging-") and path == ["variant", "model.bin"]
    assert left == []


@pytest.mark.slow
@pytest.mark.parametrize("full", ["workdir", "out"])
def test_full_disk_ends_the_run_with_one_line(namespaces, tiny_phi3, recipes, tmp_path, full):
    """The working files on a 2 MB disk (the F16 conversion alone is 4.5 MB: llama.cpp's converter
    fails) or the output folder on a 1 MB one (the Q8_0 file is 2.4 MB: hubbot's own copy fails)."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    disk, size = (work, "2m") if full == "workdir" else (out, "1m")
    # --no-preflight: the preflight would refuse both runs up front (it leans high on purpose); here
    # the disk fills up during the run, as when something else takes the space meanwhile
    command = hubbot("--recipes-dir", recipes, "publish", tiny_phi3, "--recipe", RECIPE, "--out", out,
                     "--workdir", work, "--no-preflight")
    result, left = on_small_disk(size, disk, command, env=child_env(), timeout=900)
    assert result.returncode == 1, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    what = "the working files" if full == "workdir" else "the output folder"
    option = "--workdir" if full == "workdir" else "--out"
    # one repo's failure is reported in the run's last line, with the others' (here there is one repo)
    m = re.fullmatch(rf"Error: 1 of 1 repo\(s\) not published — local/tiny-phi3-GGUF: no space left on the disk "
                     rf"of {re.escape(str(disk))} while writing {what} of "
                     rf"local/tiny-phi3-GGUF: this run needs ~([\d.]+ [KMG]?B) there \(the preflight's estimate\) "
                     rf"and it had ([\d.]+ [KMG]?B) free when local/tiny-phi3-GGUF started; make room there, or "
                     rf"point {option} at a bigger disk", line)
    assert m, line
    assert m.group(2) == ("2.1 MB" if full == "workdir" else "1.0 MB")  # the tmpfs' size
    assert "Traceback" not in result.stderr
    assert left == []  # no scratch folder, no .staging-* left on the full disk
    assert list(work.iterdir()) == [] and not (out / "tiny-phi3-GGUF").exists()


@pytest.mark.parametrize("transfer", ["xet", "lfs"], indirect=True)
def test_full_disk_during_the_source_download_is_one_line(namespaces, hub_env, transfer, tiny_phi3, recipes,
                                                          tmp_path):
    """HF_HUB_CACHE on a 2 MB disk, a source of 9 MB: the download fails with ENOSPC part way."""
    hub_env.seed_repo(SOURCE_REPO, {p.name: p for p in tiny_phi3.iterdir() if p.is_file()})
    cache = tmp_path / "hf-cache"
    # --no-preflight: the preflight would refuse up front; here the disk fills up during the download
    command = hubbot("--recipes-dir", recipes, "publish", SOURCE_REPO, "--recipe", RECIPE,
                     "--out", tmp_path / "out", "--workdir", tmp_path, "--no-preflight")
    result, _ = on_small_disk("2m", cache, command, env=child_env(HF_HUB_CACHE=str(cache)), timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert re.fullmatch(rf"Error: no space left on the disk of {re.escape(str(cache))} while downloading the "
                        rf"source {SOURCE_REPO}@[0-9a-f]{{12}}: it had ([\d.]+ [KM]?B) free when the download "
                        r"started; the partial files stay in that cache for the next run to resume\. Make room "
                        r"there, or point HF_HUB_CACHE at a bigger disk", line), line
    assert not (tmp_path / "out").exists()
