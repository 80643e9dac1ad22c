"""Run a format's tool in a subprocess: measured, logged, interruptible, never silent.

Every backend runs its tool (llama.cpp's converter and quantizer, the onnxruntime-genai builder,
optimum-cli, mlx_lm.convert) through ``run_tool``. It

- sends the tool's output to a log file and, on failure, raises BuildError with its last lines;
- measures the peak memory of the whole process tree the way an out-of-memory killer counts it
  (anonymous memory, ``RssAnon``) and, beside it, the file-backed part (``RssFile``: mmap'd
  weights the kernel can drop), by sampling ``/proc``; where there is no ``/proc`` it falls back
  to the child's ``ru_maxrss`` (bytes on macOS, KiB on Linux);
- shows the run as a progress step (``hubbot.progress``: a live bar in a terminal, a heartbeat line
  elsewhere) with the elapsed time, memory and, where the tool's log shows it, how far it is, so no
  long step is silent;
- kills the tool's whole process group when hubbot is interrupted.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError
from .progress import step

Log = Callable[[str], None]
Fraction = tuple[float, float]  # (done, total): llama.cpp's tensor 12 of 195, or a tqdm bar's 45 of 100
Progress = Callable[[str], "Fraction | None"]  # the log's tail -> how far the tool is, or None
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass(frozen=True)
class ToolRun:
    seconds: float
    peak_rss_bytes: int  # anonymous memory of the process tree at its peak
    peak_file_rss_bytes: int  # file-backed resident memory (mmap'd weights) at its own peak
    log_file: Path


@dataclass(frozen=True)
class TreeMemory:
    anon: int
    file: int


def _children(pid: int) -> list[int]:
    kids = []
    task = Path(f"/proc/{pid}/task")
    try:
        for t in task.iterdir():
            kids += [int(c) for c in (t / "children").read_text().split()]
    except OSError:
        pass
    return kids


def _status_kib(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    found = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in keys:
                found[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return found


def tree_memory(pid: int) -> TreeMemory | None:
    """Anonymous and file-backed resident memory of ``pid`` and all its descendants (Linux)."""
    if not Path("/proc/self/status").is_file():
        return None
    anon = file = 0
    stack, seen = [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        s = _status_kib(p, ("RssAnon", "RssFile", "RssShmem"))
        anon += s.get("RssAnon", 0) + s.get("RssShmem", 0)
        file += s.get("RssFile", 0)
        stack += _children(p)
    return TreeMemory(anon, file)


def maxrss_bytes(ru_maxrss: int) -> int:
    """``ru_maxrss`` in bytes: macOS reports bytes, Linux KiB."""
    return ru_maxrss if sys.platform == "darwin" else ru_maxrss * 1024


def log_tail(log_file: Path, lines: int = 15, max_bytes: int = 16384) -> str:
    try:
        with log_file.open("rb") as fh:
            fh.seek(max(0, log_file.stat().st_size - max_bytes))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    # tqdm bars rewrite one line with \r: keep what the last redraw showed
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])


def fraction_progress(tail: str) -> Fraction | None:
    """The last 'n/m' or 'NN%' a tool printed, e.g. llama.cpp's '[ 12/ 195]' or a tqdm bar."""
    last = None
    for m in re.finditer(r"(\d+)\s*/\s*(\d+)\]|(\d{1,3})%\|", tail):
        last = m
    if last is None:
        return None
    return (float(last.group(1)), float(last.group(2))) if last.group(1) else (float(last.group(3)), 100.0)


def _kill_tree(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def run_tool(cmd: Sequence[str], log_file: Path, *, what: str, log: Log = lambda _: None,
             env: dict[str, str] | None = None, progress: Progress | None = fraction_progress,
             check: Callable[[], bool] = lambda: True, cwd: Path | None = None) -> ToolRun:
    """Run ``cmd`` with its output in ``log_file``; raise BuildError naming ``what`` on failure.

    ``check`` is called after a zero exit: False (e.g. the expected output is missing) is a failure too.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    peak = TreeMemory(0, 0)
    with log_file.open("wb") as fh, step(what, log=log) as shown:
        proc = subprocess.Popen(list(cmd), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                mem = tree_memory(proc.pid)
                if mem:
                    peak = TreeMemory(max(peak.anon, mem.anon), max(peak.file, mem.file))
                done, total = (progress(log_tail(log_file, lines=3)) if progress else None) or (None, None)
                shown.update(done, total=total, info=f"{mem.anon / 2**30:.1f} GiB" if mem else None)
                time.sleep(0.25 if time.monotonic() - started < 5 else 1.0)
        except BaseException:
            _kill_tree(proc)
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - started
    anon = peak.anon or maxrss_bytes(usage.ru_maxrss)
    run = ToolRun(round(seconds, 2), anon, peak.file, log_file)
    if proc.returncode or not check():
        reason = f"exit {proc.returncode}" if proc.returncode else "it exited 0 but its output is missing"
        if proc.returncode and proc.returncode < 0:
            reason = f"killed by signal {-proc.returncode}" + (" (out of memory?)" if -proc.returncode == 9 else "")
        raise BuildError(f"{what} failed ({reason}); last lines of {log_file}:\n{log_tail(log_file)}")
    return run
