"""The whole path for one source and recipe: plan → build → validate → card → publish.

Each step is a public function: ``select`` (offline: source, recipe, toolchains), ``prepare``
(download and plan), ``build_and_validate`` (one repo's variants), ``stage_repo`` (the repo
folder with its card, validation.json and hubbot.json) and ``publish_staged`` (one commit, or
nothing when a variant failed). ``Publisher`` runs them for every repo of a plan; a fanned-out
publish (``artifacts``) runs the same steps on builds made elsewhere.
"""

from __future__ import annotations

import shutil
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends import Backend, get_backend
from .backends.support import known_difference
from .diskspace import guarded_scratch_folder
from .errors import BuildError, HubbotError, HubUnreachable, UnsupportedSource
from .hub import transport_failure, unreachable
from .paths import cache_root
from .plan import Plan, RepoPlan, Variant, count_parameters, make_plan
from .publish import REPORT, Preuploaded, PushResult, Target
from .recipe import Family, Recipe
from .record import RepoRecord, SourceInfo, VariantResult, repo_key
from .reference import LazyReference
from .source import Snapshot, SourceRef, fetch, resolve
from .validate import VariantReport, validate_variant

Log = Callable[[str], None]


@dataclass
class RepoOutcome:
    repo_id: str
    status: str  # published | up-to-date | unchanged | failed
    reports: list[dict[str, Any]] = field(default_factory=list)  # VariantReport.to_dict() of each variant
    push: PushResult | None = None
    message: str = ""
    hub_unreachable: bool = False  # failed because the Hub could not be reached

    @property
    def summary(self) -> str:
        """The message in one line: its first line and, when a tool's log follows, that log's last line."""
        lines = [line.strip() for line in self.message.splitlines() if line.strip()]
        return " … ".join(lines[:1] + lines[-1:] if len(lines) > 1 else lines)


@dataclass
class StagedRepo:
    """A repo folder exactly as it would be pushed, and the record it was rendered from."""

    record: RepoRecord
    folder: Path
    preuploaded: Preuploaded = field(default_factory=dict)  # files already in the Hub repo's storage, not here


def select(spec: str, recipe_name: str | None, families: dict[str, Family],
           family: str | None = None) -> tuple[SourceRef, Recipe]:
    """Resolve SOURCE and the recipe offline, and check the formats' extras are installed."""
    ref = resolve(spec, families, family)
    recipe = ref.family.recipe(recipe_name or ref.family.default_recipe)
    for fmt in dict.fromkeys(v.format for v in recipe.variants):
        get_backend(fmt).require()  # a missing extra fails before any download
    return ref, recipe


def prepare(ref: SourceRef, recipe: Recipe, api: Any = None) -> tuple[Plan, Snapshot]:
    """Fetch (or read) the source and plan its repos; UnsupportedSource when nothing can be built."""
    check_supported(make_plan(ref, recipe))  # what the recipe's alias says, before any download
    snapshot = fetch(ref, api)
    plan = make_plan(ref, recipe, count_parameters(snapshot.path), snapshot.config)
    check_supported(plan)
    return plan, snapshot


def check_supported(plan: Plan) -> None:
    if plan.unsupported:
        raise UnsupportedSource(f"nothing of {plan.source.public_name} can be built with recipe "
                                f"'{plan.recipe.name}': {plan.unsupported}")


def validate_built(backend: Backend, variant: Variant, snapshot: Snapshot, repo_dir: Path,
                   reference: LazyReference, log: Log) -> VariantReport:
    """Inspect one built variant, then run it in its runtime against the source's reference."""
    log(f"{variant.id}: checking the file and running it in its runtime")
    try:
        inspection = backend.inspect(snapshot, variant, repo_dir)
    except BuildError as e:
        return VariantReport(variant.id, variant.native, variant.min_agreement, False, False, reasons=[str(e)])
    differs = known_difference((snapshot.config.get("architectures") or [None])[0], variant.format)
    if differs:
        inspection["known_difference"] = "; ".join(filter(None, [inspection.get("known_difference"), differs]))
    runtime = backend.load(variant, repo_dir)
    if getattr(runtime, "note", ""):
        log(f"{variant.id}: {runtime.note}")
    report = validate_variant(runtime, reference.get(), variant, inspection, log)
    verdict = "passed" if report.passed else "FAILED: " + "; ".join(report.reasons)
    kld = f", mean KLD {report.distribution['mean_kld']:.4g}" if report.distribution else ""
    log(f"{variant.id}: agreement {report.agreement} (threshold {report.threshold}){kld} — {verdict}")
    return report


def build_and_validate(backend: Backend, variants: Sequence[Variant], snapshot: Snapshot, repo_dir: Path,
                       workdir: Path, reference: LazyReference, log: Log) -> dict[str, VariantResult]:
    """Build ``variants`` into ``repo_dir`` with their backend and validate each; results by variant id."""
    built = backend.build(snapshot, variants, repo_dir, workdir, log)
    missing = [v.id for v in variants if v.id not in built]
    if missing:
        raise BuildError(f"the {backend.name} backend built no {', '.join(missing)}")
    results = {}
    for v in variants:
        b = built[v.id]
        report = validate_built(backend, v, snapshot, repo_dir, reference, log)
        results[v.id] = VariantResult(v, b.files, sum((repo_dir / f).stat().st_size for f in b.files), b.seconds,
                                      b.details.to_dict(), report.to_dict())
    return results


def stage_repo(record: RepoRecord, repo_dir: Path, preuploaded: Preuploaded | None = None) -> StagedRepo:
    """Write the record's card, validation.json and hubbot.json beside the variants' files (and the
    ``preuploaded`` ones, which are on the Hub already)."""
    record.write(repo_dir, preuploaded)
    return StagedRepo(record, repo_dir, dict(preuploaded or {}))


def publish_staged(target: Target, staged: StagedRepo, log: Log) -> RepoOutcome:
    """Push a staged repo in one commit, unless a variant failed (then keep its report, push nothing)."""
    record, repo_id = staged.record, staged.record.repo_id
    reports = [r.report for r in record.ordered]
    if record.failed:
        names = ", ".join(record.failed)
        kept = _keep_failed_report(staged)
        log(f"{repo_id}: NOT published — failed validation: {names}; report kept in {kept}")
        return RepoOutcome(repo_id, "failed", reports, message=f"failed validation: {names}")
    log(f"{repo_id}: all {len(reports)} variants passed; publishing to {target.describe(repo_id)}")
    push = target.push(repo_id, staged.folder, record.commit_message, record.commit_description,
                       preuploaded=staged.preuploaded)
    if push.up_to_date:
        log(f"{repo_id}: up to date: a concurrent run published this build first; no commit")
        return RepoOutcome(repo_id, "up-to-date", reports, push)
    if not push.changed:
        log(f"{repo_id}: rebuilt files are identical to the published ones; nothing changed, no commit")
        return RepoOutcome(repo_id, "unchanged", reports, push)
    log(f"{repo_id}: " + (f"opened pull request {push.pr_url}" if push.pr_url else f"published to {push.url}"))
    return RepoOutcome(repo_id, "published", reports, push)


def run_each(runs: Sequence[tuple[str, Callable[[], RepoOutcome]]], log: Log) -> list[RepoOutcome]:
    """Each repo's run in turn: one that fails is reported in its outcome and the others go on, except that
    once the Hub cannot be reached the rest are not tried (building what cannot be pushed helps no one)."""
    outcomes: list[RepoOutcome] = []
    for repo_id, run in runs:
        gone = next((o for o in outcomes if o.hub_unreachable), None)
        if gone:
            outcomes.append(RepoOutcome(repo_id, "failed", message=f"not tried: the Hub could not be reached for "
                                        f"{gone.repo_id}", hub_unreachable=True))
        else:
            outcomes.append(outcome_or_failure(repo_id, run, log))
    return outcomes


def outcome_or_failure(repo_id: str, run: Callable[[], RepoOutcome], log: Log) -> RepoOutcome:
    """``run()``'s outcome, or a failed one saying why."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001 - reported in the outcome, the run goes on
        reason = failure_reason(e)
        log(f"{repo_id}: NOT published — {reason}")
        gone = isinstance(e, HubUnreachable) or transport_failure(e) is not None
        return RepoOutcome(repo_id, "failed", message=reason, hub_unreachable=gone)


def failure_reason(e: Exception) -> str:
    """One line saying why a repo failed: hubbot's own message, the Hub connection's cause, or the error."""
    if isinstance(e, BuildError):
        return f"build failed: {e}"
    if isinstance(e, HubbotError):
        return str(e)
    if transport_failure(e) is not None:
        return str(unreachable(e))
    return "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()[-1]


def _keep_failed_report(staged: StagedRepo) -> Path:
    kept = cache_root() / "failed" / staged.record.repo.name
    shutil.rmtree(kept, ignore_errors=True)
    kept.mkdir(parents=True)
    for name in (REPORT, "README.md"):
        shutil.copyfile(staged.folder / name, kept / name)
    return kept


def up_to_date(target: Target, repo_id: str, key: str, *, plan: Plan, repo: RepoPlan, commit: str, force: bool,
               log: Log) -> bool:
    """Whether the target's hubbot.json already records this build (then nothing is built or pushed)."""
    current = target.current_manifest(repo_id)
    if force or not current or current.get("key") != key:
        return False
    log(f"{repo_id}: up to date (source {commit[:12]}, recipe {plan.recipe_hash(repo)})")
    return True


class Publisher:
    """Runs the pipeline for every repo of a plan against one target (Hub or folder)."""

    def __init__(self, target: Target, *, log: Log = print, force: bool = False, workdir: Path | None = None):
        self.target = target
        self.log = log
        self.force = force
        self.workdir = Path(workdir) if workdir else None

    def run(self, plan: Plan, snapshot: Snapshot) -> list[RepoOutcome]:
        """Every repo of the plan; one that fails (its build, the Hub) is reported and the others go on."""
        reference = LazyReference(snapshot, self.log)
        self.release: list[tuple[str, VariantResult]] = []  # the repos built so far, for the chart
        return run_each([(repo.repo_id(self.target.namespace),
                          lambda repo=repo: self.run_repo(plan, repo, snapshot, reference)) for repo in plan.repos],
                        self.log)

    def run_repo(self, plan: Plan, repo: RepoPlan, snapshot: Snapshot, reference: LazyReference) -> RepoOutcome:
        backend = get_backend(repo.format)
        repo_id = repo.repo_id(self.target.namespace)
        tools = backend.tool_versions()
        key = repo_key(plan, repo, snapshot.commit, tools)
        if up_to_date(self.target, repo_id, key, plan=plan, repo=repo, commit=snapshot.commit, force=self.force,
                      log=self.log):
            return RepoOutcome(repo_id, "up-to-date")
        out_dir = getattr(self.target, "out_dir", None)
        with guarded_scratch_folder(plan, snapshot, repo_id, workdir=self.workdir, out_dir=out_dir,
                                    log=self.log) as tmp:
            repo_dir, work = tmp / "repo", tmp / "work"
            repo_dir.mkdir()
            work.mkdir()
            results = build_and_validate(backend, repo.variants, snapshot, repo_dir, work, reference, self.log)
            self.release += [(repo_id, r) for r in results.values()]
            record = RepoRecord(repo_id, plan, repo, SourceInfo.from_snapshot(snapshot), results,
                                reference.summary(), tools, list(self.release))
            return publish_staged(self.target, stage_repo(record, repo_dir), self.log)
