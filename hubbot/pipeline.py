"""The whole path for one source and recipe: plan → build → validate → card → publish."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .backends import get_backend
from .backends.base import Backend, Built
from .card import render_card
from .errors import BuildError
from .paths import cache_root
from .plan import Plan, RepoPlan, count_parameters, make_plan
from .publish import MANIFEST, REPORT, PushResult, file_digest, folder_files
from .recipe import Family, Recipe, stable_hash
from .source import Snapshot, SourceRef, fetch, resolve
from .validate import Reference, VariantReport, validate_variant

Log = Callable[[str], None]


@dataclass
class RepoOutcome:
    repo_id: str
    status: str  # published | up-to-date | unchanged | failed
    reports: list[VariantReport] = field(default_factory=list)
    push: PushResult | None = None
    message: str = ""


def select(spec: str, recipe_name: str | None, families: dict[str, Family],
           family: str | None = None) -> tuple[SourceRef, Recipe]:
    """Resolve SOURCE and the recipe offline, and check the formats' extras are installed."""
    ref = resolve(spec, families, family)
    recipe = ref.family.recipe(recipe_name or ref.family.default_recipe)
    for fmt in dict.fromkeys(v.format for v in recipe.variants):
        get_backend(fmt).require()  # a missing extra fails before any download
    return ref, recipe


def prepare(ref: SourceRef, recipe: Recipe, api: Any = None) -> tuple[Plan, Snapshot]:
    """Fetch (or read) the source and plan its repos."""
    snapshot = fetch(ref, api)
    return make_plan(ref, recipe, count_parameters(snapshot.path)), snapshot


def build_key(plan: Plan, repo: RepoPlan, snapshot: Snapshot, backend: Backend) -> str:
    return stable_hash({"source": snapshot.commit, "repo": plan.repo_key(repo), "tools": backend.tool_versions()})


def _row(variant, built: Built, report: VariantReport, repo_dir: Path) -> dict[str, Any]:
    divergence = ", ".join("—" if p.first_divergence is None else str(p.first_divergence) for p in report.prompts)
    return {
        "id": variant.id, "path": variant.path, "native": variant.native,
        "precision_class": variant.precision_class, "target": variant.target,
        "bytes": sum((repo_dir / f).stat().st_size for f in built.files),
        "agreement": report.agreement, "threshold": report.threshold, "passed": report.passed,
        "executed": report.executed,
        "tokens_match": all(p.tokens_match for p in report.prompts) if report.executed else None,
        "divergence": divergence or "—", "details": built.details, "build_seconds": round(built.seconds, 2),
    }


class Publisher:
    """Runs the pipeline for every repo of a plan against one target (Hub or folder)."""

    def __init__(self, target, *, log: Log = print, force: bool = False, workdir: Path | None = None):
        self.target = target
        self.log = log
        self.force = force
        self.workdir = Path(workdir) if workdir else None
        self._reference: Reference | None = None

    def run(self, plan: Plan, snapshot: Snapshot) -> list[RepoOutcome]:
        try:
            return [self.run_repo(plan, repo, snapshot) for repo in plan.repos]
        finally:
            if self._reference:
                self._reference.close()

    def reference(self, snapshot: Snapshot) -> Reference:
        if self._reference is None:
            self.log(f"running the source model in transformers on {len(snapshot.ref.family.validation.prompts)} prompts")
            self._reference = Reference(snapshot.path, snapshot.ref.family.validation)
        return self._reference

    def run_repo(self, plan: Plan, repo: RepoPlan, snapshot: Snapshot) -> RepoOutcome:
        backend = get_backend(repo.format)
        repo_id = repo.repo_id(self.target.namespace)
        key = build_key(plan, repo, snapshot, backend)
        current = self.target.current_manifest(repo_id)
        if not self.force and current and current.get("key") == key:
            self.log(f"{repo_id}: up to date (source {snapshot.commit[:12]}, recipe {plan.recipe_hash(repo)})")
            return RepoOutcome(repo_id, "up-to-date")
        with tempfile.TemporaryDirectory(prefix="hubbot-", dir=self.workdir) as tmp:
            repo_dir, work = Path(tmp) / "repo", Path(tmp) / "work"
            repo_dir.mkdir()
            work.mkdir()
            built = backend.build(snapshot, repo.variants, repo_dir, work, self.log)
            reports = [self._validate(backend, v, b, snapshot, repo_dir) for v, b in zip(repo.variants, built, strict=True)]
            rows = [_row(v, b, r, repo_dir) for v, b, r in zip(repo.variants, built, reports, strict=True)]
            self._write_metadata(plan, repo, repo_id, snapshot, backend, rows, reports, key, repo_dir)
            failed = [r for r in reports if not r.passed]
            if failed:
                names = ", ".join(r.variant_id for r in failed)
                kept = cache_root() / "failed" / repo.name
                shutil.rmtree(kept, ignore_errors=True)
                kept.mkdir(parents=True)
                for name in (REPORT, "README.md"):
                    shutil.copyfile(repo_dir / name, kept / name)
                self.log(f"{repo_id}: NOT published — failed validation: {names}; report kept in {kept}")
                return RepoOutcome(repo_id, "failed", reports, message=f"failed validation: {names}")
            self.log(f"{repo_id}: all {len(reports)} variants passed; publishing to {self.target.describe(repo_id)}")
            message = f"hubbot: {plan.recipe.name} variants of {snapshot.ref.public_name} ({snapshot.commit[:12]})"
            description = f"Built and validated by hubbot {__version__}; see hubbot.json for provenance."
            push = self.target.push(repo_id, repo_dir, message, description)
            if not push.changed:
                self.log(f"{repo_id}: rebuilt files are identical to the published ones; nothing changed, no commit")
                return RepoOutcome(repo_id, "unchanged", reports, push)
            self.log(f"{repo_id}: " + (f"opened pull request {push.pr_url}" if push.pr_url else f"published to {push.url}"))
            return RepoOutcome(repo_id, "published", reports, push)

    def _validate(self, backend: Backend, variant, built: Built, snapshot: Snapshot, repo_dir: Path) -> VariantReport:
        self.log(f"{variant.id}: checking the file and running it in its runtime")
        try:
            inspection = backend.inspect(snapshot, variant, repo_dir)
        except BuildError as e:
            return VariantReport(variant.id, variant.native, variant.min_agreement, False, False, reasons=[str(e)])
        reference = self.reference(snapshot)
        report = validate_variant(backend.load(variant, repo_dir), reference, variant, inspection)
        verdict = "passed" if report.passed else "FAILED: " + "; ".join(report.reasons)
        self.log(f"{variant.id}: agreement {report.agreement} (threshold {report.threshold}) — {verdict}")
        return report

    def _write_metadata(self, plan, repo, repo_id, snapshot, backend, rows, reports, key, repo_dir: Path) -> None:
        reference = self.reference(snapshot).summary() if self._reference else []
        write_metadata(plan, repo, repo_id, snapshot, backend, rows, [r.to_dict() for r in reports], reference,
                       backend.tool_versions(), key, repo_dir)


def write_metadata(plan, repo, repo_id, snapshot, backend, rows, reports: list[dict[str, Any]],
                   reference: list[dict[str, Any]], tools: dict[str, str], key: str, repo_dir: Path) -> None:
    """validation.json, the README.md card and the hubbot.json manifest of a staged repo folder."""
    (repo_dir / REPORT).write_text(json.dumps({
        "source": snapshot.ref.public_name, "commit": snapshot.commit,
        "reference": reference, "variants": reports,
    }, indent=2, default=str))
    (repo_dir / "README.md").write_text(render_card(
        repo_id=repo_id, plan=plan, repo=repo, snapshot=snapshot, backend=backend, rows=rows,
        reference=reference, tool_versions=tools, hubbot_version=__version__))
    files = {f.relative_to(repo_dir).as_posix(): {"sha256": file_digest(f), "size": f.stat().st_size}
             for f in folder_files(repo_dir)}
    (repo_dir / MANIFEST).write_text(json.dumps({
        "hubbot": __version__, "key": key,
        "source": {"spec": snapshot.ref.public_name, "repo": snapshot.base_model, "commit": snapshot.commit},
        "recipe": {"family": plan.source.family.name, "name": plan.recipe.name, "hash": plan.recipe_hash(repo)},
        "tools": tools, "variants": [v.id for v in repo.variants], "files": files,
    }, indent=2))
