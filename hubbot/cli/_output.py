"""Output helpers shared by every command: progress on stderr, tables (terminal and Actions summary),
errors; everything shown goes through ``hubbot.secrets.redact``."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import actions
from ..errors import HubbotError
from ..hub import transport_failure, unreachable
from ..progress import RichSink, set_sink, wants_live_display
from ..secrets import redact

# Logs and CI capture are no terminal: give tables room instead of rich's default 80 columns.
_WIDTH = None if sys.stdout.isatty() else 160
err_console = Console(stderr=True, highlight=False, soft_wrap=True, width=_WIDTH)
out_console = Console(highlight=False, soft_wrap=True, width=_WIDTH)
_started = time.monotonic()


def progress(message: str) -> None:
    """One timestamped progress line on stderr (stdout stays clean for --json)."""
    err_console.print(f"{time.monotonic() - _started:7.1f}s {redact(message)}", markup=False)


def install_progress() -> None:
    """Long steps as live bars for a person at a terminal; as heartbeat lines in logs and CI."""
    if wants_live_display(sys.stderr):
        set_sink(RichSink(err_console))


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], console: Console = out_console) -> None:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")
    for row in rows:
        t.add_row(*(redact(str(c)) for c in row))
    console.print(t)


def report(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], summary_title: str | None = None) -> None:
    """The same rows as a terminal table and, under GitHub Actions, as a step-summary table."""
    table(title, columns, rows)
    actions.summary_table(summary_title or title, columns, rows)


def handle_errors(fn: Callable) -> Callable:
    """Turn HubbotError into one red line and its exit code; never a traceback with secrets."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HubbotError as e:
            _fail(e)
        except Exception as e:
            if transport_failure(e) is None:
                raise
            _fail(unreachable(e))  # a Hub call no command wrapped: still one line, never a traceback

    return wrapper


def _fail(e: HubbotError) -> None:
    err_console.print(f"[bold red]Error:[/bold red] {escape(redact(str(e)))}", markup=True, highlight=False)
    sys.exit(e.exit_code)


def echo(text: str) -> None:
    click.echo(redact(text))
