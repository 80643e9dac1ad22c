"""hubbot status: what the watch ledger has seen, built and published."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click

from ..errors import UsageError
from ..ledger import Ledger, default_path
from ._output import echo, handle_errors, table


def _when(stamp: str) -> str:
    return stamp.replace("T", " ")[:16]


def _agreement(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def _result(v) -> str:
    if v.status == "dropped":
        return f"dropped: {v.reason}"
    return v.status if v.passed is None else f"{v.status} ({'passed' if v.passed else 'FAILED'})"


@click.command()
@click.option("--ledger", "ledger_path", type=click.Path(dir_okay=False, path_type=Path), envvar="HUBBOT_LEDGER",
              help=f"The watch ledger. Default: HUBBOT_LEDGER or {default_path()}")
@click.option("--variants/--no-variants", default=True, show_default=True, help="Also list every variant built.")
@click.option("--json", "as_json", is_flag=True, help="Print the ledger as JSON on stdout.")
@handle_errors
def status(ledger_path: Path | None, variants: bool, as_json: bool) -> None:
    """Print the watch ledger: every release seen (repo, upstream sha, status, why) and every variant
    built (target repo, validation result, agreement, the commit that published it)."""
    path = ledger_path or default_path()
    if not path.is_file():
        raise UsageError(f"no ledger at {path}; run `hubbot watch` first or pass --ledger")
    with Ledger(path) as ledger:
        releases, built = ledger.releases(), ledger.variants()
    if as_json:
        echo(json.dumps({"releases": [asdict(r) for r in releases], "variants": [asdict(v) for v in built]},
                        indent=2))
        return
    table(f"releases ({path})", ["release", "sha", "recipe", "status", "tries", "first seen", "updated", "reason"],
          [(r.repo, r.sha[:12], f"{r.family}/{r.recipe or '—'}", r.status, r.attempts, _when(r.first_seen),
            _when(r.updated), r.reason or "") for r in releases])
    if variants:
        table("variants", ["release", "sha", "variant", "target repo", "result", "agreement", "threshold",
                           "commit"],
              [(v.repo, v.sha[:12], v.variant, v.target_repo,
                _result(v),
                _agreement(v.agreement), _agreement(v.threshold), (v.commit_sha or "—")[:12]) for v in built])
