"""Progress of long steps: a live bar in a terminal, a heartbeat line elsewhere.

A step (a tool run, the reference, a validation phase, hashing a source) is opened with
``with step("what", total=N, log=log) as s: ... s.update(completed=k, info="2.1 GiB")``. What the user
sees depends on the sink the command line installed:

- ``HeartbeatSink`` (the default, and always under CI / GitHub Actions or when stderr is not a
  terminal): every ``HUBBOT_HEARTBEAT`` seconds (default 30) one plain line per open step through the
  step's ``log`` — ``reference: 120 s elapsed, 3/6, token 7/16`` — so a log file never goes silent;
- ``RichSink``: a rich progress bar per open step (spinner, bar when the total is known, elapsed
  time, the latest info), redrawn in place and removed when the step ends.

Library code only reports; it never decides how progress is shown.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

Log = Callable[[str], None]


def heartbeat_seconds() -> float:
    return float(os.environ.get("HUBBOT_HEARTBEAT", "30"))


@dataclass
class Step:
    what: str
    total: float | None = None
    completed: float = 0
    info: str = ""
    log: Log = lambda _: None
    started: float = field(default_factory=time.monotonic)
    _sink: Sink | None = None

    def update(self, completed: float | None = None, *, total: float | None = None, info: str | None = None) -> None:
        if completed is not None:
            self.completed = completed
        if total is not None:
            self.total = total
        if info is not None:
            self.info = info
        if self._sink:
            self._sink.update(self)

    def advance(self, amount: float = 1) -> None:
        self.update(self.completed + amount)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def describe(self) -> str:
        """``what: 120 s elapsed, 3/6, info`` — the heartbeat line."""
        parts = [f"{self.elapsed:.0f} s elapsed"]
        if self.total:
            parts.append(f"{self.completed:.0f}/{self.total:.0f}")
        if self.info:
            parts.append(self.info)
        return f"{self.what}: " + ", ".join(parts)


class Sink(Protocol):
    def start(self, step: Step) -> None: ...

    def update(self, step: Step) -> None: ...

    def finish(self, step: Step) -> None: ...


class HeartbeatSink:
    """One line per open step every ``interval`` seconds, from a daemon thread, so steps that block
    (a forward pass in torch, a tool that prints nothing) still show they are alive."""

    def __init__(self, interval: float | None = None):
        self.interval = interval
        self._steps: dict[int, tuple[Step, float]] = {}  # id -> (step, when its next line is due)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _every(self) -> float:
        return heartbeat_seconds() if self.interval is None else self.interval

    def start(self, step: Step) -> None:
        with self._lock:
            self._steps[id(step)] = (step, step.started + self._every())
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._beat, name="hubbot-heartbeat", daemon=True)
                self._thread.start()

    def update(self, step: Step) -> None:
        pass  # the next beat shows the latest state

    def finish(self, step: Step) -> None:
        with self._lock:
            self._steps.pop(id(step), None)

    def _beat(self) -> None:
        while True:
            with self._lock:
                if not self._steps:
                    self._thread = None
                    return
                now = time.monotonic()
                due = [s for s, when in self._steps.values() if when <= now]
                for s in due:
                    self._steps[id(s)] = (s, now + self._every())
            for s in due:
                s.log(s.describe())
            time.sleep(min(1.0, max(0.05, self._every() / 4)))


class RichSink:
    """rich progress bars on the given console (stderr), one task per open step."""

    def __init__(self, console):
        from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                  TextColumn("{task.fields[where]}"), TimeElapsedColumn(),
                                  TextColumn("{task.fields[info]}"), console=console, transient=True)
        self._tasks: dict[int, int] = {}
        self._lock = threading.Lock()

    def start(self, step: Step) -> None:
        with self._lock:
            if not self._tasks:
                self._progress.start()
            self._tasks[id(step)] = self._progress.add_task(step.what, total=step.total, where="", info=step.info)

    def update(self, step: Step) -> None:
        task = self._tasks.get(id(step))
        if task is not None:
            where = f"{step.completed:.0f}/{step.total:.0f}" if step.total else ""
            self._progress.update(task, completed=step.completed, total=step.total, where=where, info=step.info)

    def finish(self, step: Step) -> None:
        with self._lock:
            task = self._tasks.pop(id(step), None)
            if task is not None:
                self._progress.remove_task(task)
            if not self._tasks:
                self._progress.stop()


_sink: Sink = HeartbeatSink()


def set_sink(sink: Sink) -> Sink:
    """Install how progress is shown (the command line does, once); returns the previous sink."""
    global _sink
    previous, _sink = _sink, sink
    return previous


def wants_live_display(stream) -> bool:
    """A live bar only for a person at a terminal: never under CI, GitHub Actions or a pipe."""
    if os.environ.get("CI") or os.environ.get("GITHUB_ACTIONS") or os.environ.get("HUBBOT_PLAIN_PROGRESS"):
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


@contextmanager
def step(what: str, total: float | None = None, *, log: Log = lambda _: None, info: str = "") -> Iterator[Step]:
    """A long step, shown by the installed sink until the block ends."""
    s = Step(what, total, info=info, log=log, _sink=_sink)
    sink = _sink
    sink.start(s)
    try:
        yield s
    finally:
        sink.finish(s)
