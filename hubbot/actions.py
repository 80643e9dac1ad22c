"""GitHub Actions integration: log groups, error annotations, step summary and step outputs.

Everything here is a no-op outside Actions (``GITHUB_ACTIONS`` is not ``true``), so commands can
call it unconditionally. Nothing written here may contain the Hub token: callers pass text that
already went through ``redact``, and ``_clean`` redacts again.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .secrets import redact


def active() -> bool:
    return os.environ.get("GITHUB_ACTIONS") == "true"


def _clean(text: str) -> str:

    return redact(str(text))


def _command(line: str) -> None:
    if active():
        sys.stdout.flush()
        print(line, file=sys.stderr, flush=True)


@contextmanager
def group(title: str) -> Iterator[None]:
    """``::group::`` … ``::endgroup::`` around a block of log lines."""
    _command(f"::group::{_clean(title)}")
    try:
        yield
    finally:
        _command("::endgroup::")


def _escape(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def error(message: str, title: str | None = None) -> None:
    """An ``::error::`` annotation (shown on the run's page)."""
    props = f" title={_escape(_clean(title)).replace(',', '%2C').replace(':', '%3A')}" if title else ""
    _command(f"::error{props}::{_escape(_clean(message))}")


def summary_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Append a Markdown table to the job's step summary (``GITHUB_STEP_SUMMARY``)."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not active() or not path:
        return

    def cell(value: Any) -> str:
        return _clean(str(value)).replace("|", "\\|").replace("\n", " ")

    lines = [f"### {_clean(title)}", "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    if not rows:
        lines.append("| " + " | ".join(["—"] * len(columns)) + " |")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n\n")


def set_outputs(**values: Any) -> None:
    """Write step outputs to ``GITHUB_OUTPUT`` (multi-line values use a heredoc delimiter)."""
    path = os.environ.get("GITHUB_OUTPUT")
    if not active() or not path:
        return
    with open(path, "a", encoding="utf-8") as fh:
        for name, value in values.items():
            text = _clean(value if isinstance(value, str) else str(value))
            if "\n" in text:
                delimiter = f"ghadelimiter_{uuid.uuid4().hex}"
                fh.write(f"{name}<<{delimiter}\n{text}\n{delimiter}\n")
            else:
                fh.write(f"{name}={text}\n")
