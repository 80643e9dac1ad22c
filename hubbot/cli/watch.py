"""hubbot watch: publish every new release of the watched families, unattended."""

from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import click

from .. import actions
from ..errors import UsageError, ValidationFailed
from ..ledger import Ledger, default_path
from ..watch import ReleaseResult, Watcher
from ._options import endpoint_option, make_target, namespace_option, workdir_option
from ._output import handle_errors, progress, report

COLUMNS = ["release", "sha", "family", "result", "repos / reason"]


def _rows(results: list[ReleaseResult]) -> list[tuple]:
    return [(r.release.repo, r.release.sha[:12], r.release.family, r.status, r.where) for r in results]


@click.command()
@click.option("--family", "family_names", multiple=True,
              help="Watch only this family (repeatable). Default: every family in recipes/*.yaml.")
@click.option("--once", is_flag=True, help="One pass, then exit (what the scheduled workflow runs).")
@click.option("--since", type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ"]),
              help="Only releases changed on or after this date (UTC), e.g. 2026-01-31.")
@click.option("--ledger", "ledger_path", type=click.Path(dir_okay=False, path_type=Path), envvar="HUBBOT_LEDGER",
              help=f"SQLite ledger of releases seen and variants built. Default: HUBBOT_LEDGER or {default_path()}")
@click.option("--recipe", "-r", "recipe_name", help="Recipe to build. Default: each family's watch.default_recipe.")
@namespace_option()
@endpoint_option
@click.option("--interval", type=click.IntRange(min=1), default=3600, show_default=True,
              help="Seconds between passes without --once.")
@click.option("--max-attempts", type=click.IntRange(min=0), default=3, show_default=True,
              help="Stop retrying a failing release (same sha) after this many attempts; 0: retry forever.")
@workdir_option
@click.option("--collections/--no-collections", default=True, show_default=True,
              help="Give each release a Hub collection holding all its variant repos.")
@click.pass_obj
@handle_errors
def watch(obj, family_names: tuple[str, ...], once: bool, since: datetime | None, ledger_path: Path | None,
          recipe_name: str | None, namespace: str | None, endpoint: str | None, interval: int,
          max_attempts: int, workdir: Path | None, collections: bool) -> None:
    """Find new releases of each family on the Hub and publish them with the family's default recipe.

    A release is a model of the family's watch authors whose name matches its watch patterns (or
    one of its models), at its current upstream commit. Each new release, and each new commit of a
    known one, is built, validated and published exactly as `hubbot publish` would; gated, private
    or disabled repos the token cannot read are skipped and the reason recorded. The ledger keeps
    what was seen and built, so a re-run publishes nothing twice and a failure is retried on the
    next pass (up to --max-attempts). `hubbot status` prints it.

    Exit codes: 0 every release published, up to date or skipped; 1 a release failed (it is retried
    next pass); 2 bad input.
    """
    families = obj.families()
    if family_names:
        unknown = [f for f in family_names if f not in families]
        if unknown:
            raise UsageError(f"unknown family {', '.join(unknown)}; known: {', '.join(families)}")
        families = {name: families[name] for name in family_names}
    target = make_target(None, namespace, endpoint)
    api = target.api
    with Ledger(ledger_path) as ledger:
        progress(f"ledger {ledger.path}; publishing under '{target.namespace}' on {api.endpoint}")
        watcher = Watcher(api, families, ledger, target, recipe=recipe_name, log=progress,
                          max_attempts=max_attempts, workdir=workdir, on_release=_group,
                          collections=collections)
        watcher.check_recipe()
        while True:
            try:
                results = watcher.once(since)
            except Exception as e:  # noqa: BLE001 - a long-running watcher outlives a bad pass
                if once:
                    raise
                progress(f"pass failed: {type(e).__name__}: {e}")
                results = []
            _report(results)
            failed = [r for r in results if r.status == "failed"]
            if once:
                break
            progress(f"next pass in {interval}s")
            time.sleep(interval)
    if failed:
        raise ValidationFailed(f"{len(failed)} release(s) failed: {', '.join(r.release.repo for r in failed)}; "
                               f"they are retried on the next pass")


@contextmanager
def _group(release):
    with actions.group(f"{release.repo}@{release.sha[:12]}"):
        yield


def _report(results: list[ReleaseResult]) -> None:
    acted = [r for r in results if r.status not in ("known",)]
    report(f"watch: {len(results)} release(s) listed, {len(acted)} new or changed", COLUMNS, _rows(acted),
           summary_title="hubbot watch")
    counts = {s: sum(r.status == s for r in results)
              for s in ("published", "partial", "up-to-date", "failed", "skipped", "unsupported", "known",
                        "claimed-elsewhere")}
    progress(", ".join(f"{n} {s}" for s, n in counts.items()))
    for r in results:
        if r.status == "failed":
            actions.error(r.reason, title=f"{r.release.repo} failed")
    actions.set_outputs(published=counts["published"] + counts["partial"], failed=counts["failed"],
                        skipped=counts["skipped"] + counts["unsupported"],
                        releases=" ".join(f"{r.release.repo}@{r.release.sha}" for r in acted
                                          if r.status in ("published", "partial")))
