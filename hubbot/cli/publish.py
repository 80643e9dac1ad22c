"""hubbot publish: build, validate and publish one source with one recipe."""

from __future__ import annotations

from pathlib import Path

import click

from .. import actions, preflight
from ..errors import HubbotError, UsageError
from ..pipeline import Publisher, RepoOutcome, prepare, select
from ..publish import FolderTarget, make_api
from ._options import (
    create_pr_option,
    endpoint_option,
    family_option,
    make_target,
    namespace_option,
    no_preflight_option,
    out_option,
    recipe_option,
    workdir_option,
)
from ._output import handle_errors, progress, report, table

REPO_COLUMNS = ["repo", "status", "where", "files", "bytes"]


@click.command()
@click.argument("source", required=False)
@recipe_option
@family_option
@out_option
@namespace_option("the token's user ('local' with --out)")
@endpoint_option
@create_pr_option
@click.option("--force", is_flag=True,
              help="Rebuild and publish even when the repo's hubbot.json says it is up to date.")
@workdir_option
@no_preflight_option
@click.option("--from-artifacts", "artifacts", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Publish the variants `hubbot build --variant` built into this folder (no SOURCE; builds nothing).")
@click.pass_obj
@handle_errors
def publish(obj, source: str | None, recipe_name: str | None, family: str | None, out_dir: Path | None,
            namespace: str | None, endpoint: str | None, create_pr: bool, force: bool, workdir: Path | None,
            artifacts: Path | None, skip_preflight: bool) -> None:
    """Build every variant of SOURCE's RECIPE, validate it against the source, and publish.

    SOURCE is a family alias (phi-4), a Hub repo id (microsoft/phi-4[@revision]) or a local folder.
    Each target repo gets ONE commit holding every file, its README.md card, validation.json and
    hubbot.json; a repo with a failing variant is not published at all. The Hub token comes from
    HF_TOKEN or `hf auth login` and is never printed.

    Before anything is downloaded, a preflight checks that each variant fits in the memory available
    and the run in the free disk (`hubbot plan` shows the estimates); it refuses with exit 2.

    A repo whose build, validation or push fails is reported in the table and the other repos go
    on. Each commit is made on the commit hubbot read: when another commit lands first, hubbot
    re-reads the repo and decides again. When a commit's answer is lost, hubbot checks the Hub and
    says whether it landed.

    Exit codes: 0 published or up to date, 1 a repo's build, validation or push failed (or the Hub
    cannot be reached), 2 bad input or too big for this machine, 3 a format's extra is not installed.
    """
    if artifacts:
        if source:
            raise UsageError("give SOURCE or --from-artifacts, not both")
        return _from_artifacts(obj, artifacts, make_target(out_dir, namespace, endpoint, create_pr), force)
    if not source:
        raise UsageError("missing SOURCE (a family alias, a Hub repo id or a local folder), or --from-artifacts DIR")
    ref, recipe = select(source, recipe_name, obj.families(), family)
    api = make_api(endpoint)
    size = preflight.check_dropped(ref, recipe, api, log=progress)
    if not skip_preflight:
        preflight.check_source(ref, recipe, api, workdir=workdir, out_dir=out_dir, log=progress, size=size)
    target = make_target(out_dir, namespace, endpoint, create_pr)
    the_plan, snapshot = prepare(ref, recipe, api)
    progress(f"source {snapshot.ref.display} at {snapshot.commit}; recipe '{the_plan.recipe.name}': "
             f"{len(the_plan.variants)} variants in {len(the_plan.repos)} repo(s)")
    outcomes = Publisher(target, log=progress, force=force, workdir=workdir).run(the_plan, snapshot)
    table("validation", ["repo", "variant", "agreement", "threshold", "result"],
          [(o.repo_id, r["variant_id"], "—" if r["agreement"] is None else f"{r['agreement']:.3f}",
            f"{r['threshold']:.2f}", verdict(r)) for o in outcomes for r in o.reports])
    if the_plan.dropped:
        report("dropped: not built, and why", ["variant", "repo", "reason"],
               [(d.id, d.repo, d.reason) for d in the_plan.dropped], summary_title="hubbot publish: dropped")
    _finish(outcomes)


def _from_artifacts(obj, folder: Path, target, force: bool) -> None:
    from ..artifacts import load_builds, preuploaded_builds, publish_builds

    builds = load_builds(folder)
    progress(f"{len(builds)} variant build(s) in {folder}")
    remote = preuploaded_builds(builds)
    if remote and isinstance(target, FolderTarget):
        raise UsageError(f"{', '.join(b.variant_id for b in remote)}: built with --preupload, so the large files "
                         f"are on the Hub ({remote[0].preupload_repo}), not in {folder}; publish to the Hub "
                         f"(without --out), or build without --preupload for a local preview")
    _finish(publish_builds(builds, obj.families(), target, log=progress, force=force))


def _finish(outcomes: list[RepoOutcome]) -> None:
    rows = [(o.repo_id, o.status, (o.push.pr_url or o.push.url) if o.push else o.summary,
             o.push.files if o.push else "", o.push.bytes if o.push else "") for o in outcomes]
    report("repos", REPO_COLUMNS, rows, summary_title="hubbot publish")
    actions.set_outputs(published=" ".join(o.repo_id for o in outcomes if o.status == "published"))
    failed = [o for o in outcomes if o.status == "failed"]
    for o in failed:
        actions.error(o.message, title=f"{o.repo_id} not published")
    if failed:
        reasons = "; ".join(f"{o.repo_id}: {o.summary}" for o in failed)
        raise HubbotError(f"{len(failed)} of {len(outcomes)} repo(s) not published — {reasons}")


def verdict(report: dict) -> str:
    if not report["passed"]:
        return "FAILED: " + "; ".join(report["reasons"])
    return "passed" if report["executed"] else "passed structural checks (not run on this machine)"
