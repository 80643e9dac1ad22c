"""Run one command and measure it: wall time, process-tree memory, extra disk, exit code.

Memory is sampled from /proc every MEM_INTERVAL s with hubbot's own ``tree_memory`` (RssAnon +
RssShmem of the whole tree, which is what the out-of-memory killer counts, and RssFile beside it).
Disk is the allocated size (st_blocks, each inode once: hard links are not counted twice) of the
folders the run writes to, sampled every few seconds; only metadata is read, so it is cheap even
on multi-GB files. A failing or killed command is recorded like any other, with its log's tail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hubbot.toolrun import log_tail, tree_memory  # the same accounting and log reading as hubbot's tool runner

MEM_INTERVAL = 0.5
HEARTBEAT = 30.0


@dataclass
class Measured:
    rc: int
    wall_s: float
    peak_anon_bytes: int
    peak_file_bytes: int
    peak_disk_bytes: int
    ru_maxrss_bytes: int  # the largest single process's peak RSS (kernel's count, for cross-checking)
    log_file: str
    note: str = ""
    tail: str = ""
    steps: list[dict] = field(default_factory=list)


def disk_bytes(paths: Sequence[Path]) -> int:
    """Allocated bytes under ``paths`` (like ``du``), each inode counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [p for p in paths if os.path.lexists(p)]
    while stack:
        p = stack.pop()
        try:
            st = os.lstat(p)
        except OSError:
            continue  # deleted while we looked
        key = (st.st_dev, st.st_ino)
        if key in seen:
            continue
        seen.add(key)
        total += st.st_blocks * 512
        if os.path.isdir(p) and not os.path.islink(p):
            try:
                with os.scandir(p) as it:
                    stack += [e.path for e in it]
            except OSError:
                pass
    return total


def _last_line(path: Path) -> str:
    tail = log_tail(path, lines=3, max_bytes=4096).strip().splitlines()
    return tail[-1][:100] if tail else ""


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def run_measured(cmd: Sequence[str], *, log_file: Path, disk_paths: Sequence[Path], label: str,
                 env: dict[str, str] | None = None, cwd: Path | None = None, baseline: int | None = None,
                 say=print) -> Measured:
    """Run ``cmd`` (output appended to ``log_file``), sampling memory and disk until it exits.

    Disk is counted above ``baseline`` (default: what ``disk_paths`` held when it started).
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    baseline = disk_bytes(disk_paths) if baseline is None else baseline
    peak_anon = peak_file = peak_disk = 0
    started = time.monotonic()
    with log_file.open("ab") as fh:
        fh.write(f"$ {' '.join(map(str, cmd))}\n".encode())
        fh.flush()
        proc = subprocess.Popen(list(map(str, cmd)), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
    say(f"[{label}] started (log: {log_file})")
    next_disk, next_beat = started, started + HEARTBEAT
    disk_every = 1.0
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            now = time.monotonic()
            mem = tree_memory(proc.pid)
            if mem:
                peak_anon, peak_file = max(peak_anon, mem.anon), max(peak_file, mem.file)
            if now >= next_disk:
                t0 = time.monotonic()
                peak_disk = max(peak_disk, disk_bytes(disk_paths) - baseline)
                walk = time.monotonic() - t0
                disk_every = min(5.0, disk_every * 1.5) if now - started > 10 else 1.0
                next_disk = time.monotonic() + max(disk_every, 20 * walk)  # the walk takes <5% of a core
            if now >= next_beat:
                say(f"[{label}] {now - started:6.0f} s  RAM anon {_gib(mem.anon if mem else 0)} "
                    f"(peak {_gib(peak_anon)}), file {_gib(mem.file if mem else 0)}, "
                    f"disk +{_gib(peak_disk)}  | {_last_line(log_file)}")
                next_beat = now + HEARTBEAT
            time.sleep(MEM_INTERVAL)
    except BaseException:  # Ctrl-C, or the benchmark itself dying: take the tool down with it
        _kill_group(proc)
        raise
    wall = time.monotonic() - started
    peak_disk = max(peak_disk, disk_bytes(disk_paths) - baseline)
    rc = os.waitstatus_to_exitcode(status)
    note = ""
    if rc < 0:
        sig = signal.Signals(-rc).name
        note = f"killed by {sig}" + (" (the out-of-memory killer sends SIGKILL)" if rc == -signal.SIGKILL else "")
    elif rc:
        note = f"exit {rc}"
    ru_maxrss = usage.ru_maxrss * 1024  # Linux: KiB
    if not peak_anon:  # it ended before the first sample
        peak_anon = ru_maxrss
    say(f"[{label}] done in {wall:.1f} s, rc {rc}{' (' + note + ')' if note else ''}, peak anon {_gib(peak_anon)}, "
        f"file {_gib(peak_file)}, disk +{_gib(peak_disk)}")
    return Measured(rc, round(wall, 2), peak_anon, peak_file, peak_disk, ru_maxrss, str(log_file), note,
                    log_tail(log_file, lines=25, max_bytes=32768) if rc else "")


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=10)
            return
        except (ProcessLookupError, PermissionError):
            return
        except subprocess.TimeoutExpired:
            continue


def run_steps(steps: Sequence[tuple[str, Sequence[str]]], *, log_file: Path, disk_paths: Sequence[Path], label: str,
              env: dict[str, str] | None = None, say=print) -> Measured:
    """Several commands in sequence as one measurement: wall summed, peaks maxed, stop at the first failure."""
    total: Measured | None = None
    details = []
    baseline = disk_bytes(disk_paths)  # a step's leftovers (e.g. the BF16 GGUF) count in the next one's peak
    for name, cmd in steps:
        m = run_measured(cmd, log_file=log_file, disk_paths=disk_paths, env=env, baseline=baseline, say=say,
                         label=label if len(steps) == 1 else f"{label} {name}")
        details.append({"step": name, "wall_s": m.wall_s, "peak_anon_bytes": m.peak_anon_bytes,
                        "peak_file_bytes": m.peak_file_bytes, "peak_disk_bytes": m.peak_disk_bytes, "rc": m.rc})
        if total is None:
            total = m
        else:
            total = Measured(m.rc, round(total.wall_s + m.wall_s, 2), max(total.peak_anon_bytes, m.peak_anon_bytes),
                             max(total.peak_file_bytes, m.peak_file_bytes),
                             max(total.peak_disk_bytes, m.peak_disk_bytes),
                             max(total.ru_maxrss_bytes, m.ru_maxrss_bytes), m.log_file, m.note, m.tail)
        if m.rc:
            if total.note:
                total.note = f"{name}: {total.note}"
            break
    assert total is not None
    total.steps = details
    return total
