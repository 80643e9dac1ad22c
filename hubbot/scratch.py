"""scratch: the temp folders a run builds in, and the sweep of those whose run was killed.

A run builds each repo in ``<workdir>/hubbot-<pid>-<random>/``, with ``.hubbot-owner`` inside
naming its process (host, pid, start time). Removing the folder on exit covers every ending but
SIGKILL, the out-of-memory killer and a power cut; so each new folder is preceded by a sweep that
removes the folders of runs that are gone: the owner's host is this one and its pid is not running
(or is running a process that started later: the pid was reused). A folder of a live run, of
another host (a shared workdir), or with no pid in its name is never touched.

A format's tool runs in its own session (``toolrun``) and may outlive a killed hubbot by the
rest of its step; its folder goes at the next sweep all the same, and the tool's writes then fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

PREFIX = "hubbot-"
OWNER = ".hubbot-owner"
_NAME = re.compile(rf"{re.escape(PREFIX)}(\d+)-[^/]+")


def process_start(pid: int) -> str | None:
    """When ``pid`` started, in clock ticks since boot (Linux's /proc/<pid>/stat field 22); None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name in (...) may hold spaces
    return None if fields[0] == "Z" else fields[19]


def is_running(pid: int, started: str | None = None) -> bool:
    """Whether ``pid`` is a live process (not a zombie) and, when ``started`` is known, the same one."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: alive
    if Path("/proc/self/stat").is_file():
        now = process_start(pid)
        return now is not None and (started is None or now == started)
    return True


def owner_of_this_process() -> dict[str, object]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": process_start(os.getpid())}


def is_abandoned(folder: Path) -> bool:
    """A scratch folder whose run is gone (see the module's doc for what counts)."""
    m = _NAME.fullmatch(folder.name)
    if not m or not folder.is_dir() or folder.is_symlink():
        return False
    try:
        owner = json.loads((folder / OWNER).read_text())
    except (OSError, ValueError):
        owner = {"host": socket.gethostname(), "pid": int(m.group(1)), "started": None}  # killed before writing it
    if owner.get("host") != socket.gethostname() or owner.get("pid") != int(m.group(1)):
        return False
    return not is_running(int(owner["pid"]), owner.get("started"))


def sweep(parent: Path, log: Callable[[str], None] = lambda _: None) -> list[Path]:
    """Remove the scratch folders in ``parent`` left by runs that were killed; the ones removed."""
    try:
        candidates = sorted(parent.glob(f"{PREFIX}*"))
    except OSError:
        return []
    removed = [f for f in candidates if is_abandoned(f)]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
        log(f"removed {folder}, the temp folder of an earlier run that was killed")
    return removed


@contextlib.contextmanager
def scratch_folder(parent: Path | None = None, log: Callable[[str], None] = lambda _: None) -> Iterator[Path]:
    """A new temp folder in ``parent`` (default: the system's), owned by this process and removed on
    exit; abandoned ones of killed runs are swept first."""
    parent = Path(parent or tempfile.gettempdir())
    sweep(parent, log)
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent))
    try:
        (folder / OWNER).write_text(json.dumps(owner_of_this_process()))
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
