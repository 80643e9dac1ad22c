"""Split builds: one variant per job (``hubbot build --variant``), one publish of them all
(``hubbot publish --from-artifacts``).

A build folder holds ``build.json`` (the variant's share of its repo's ``RepoRecord``: source,
recipe, its result and validation report, the reference and tool versions) and ``files/`` (the
variant's files at their paths in the repo). Publishing re-plans the recipe offline, checks that
every variant of a repo is there and passed, and stages and pushes each repo exactly as a
single-machine ``hubbot publish`` does (same record, so the same card, validation.json and
hubbot.json).

With ``--preupload`` a build job that passed uploads its LFS/Xet files to the target repo's storage
without committing, records their paths, sha256 and sizes in build.json and drops them from
``files/`` (only the small files the Hub takes inline travel in the artifact). build.json is written
after the pre-upload: a job killed before it leaves no build.json, so its repo is not published. The
publish job then commits those blobs by reference, in the same one commit, uploading no model bytes;
a blob missing from the repo's storage makes the Hub refuse that commit whole.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends import get_backend
from .diskspace import guarded_scratch_folder
from .errors import UsageError
from .pipeline import (
    RepoOutcome,
    build_and_validate,
    prepare,
    publish_staged,
    run_each,
    select,
    stage_repo,
    up_to_date,
)
from .plan import Plan, RepoPlan, make_plan
from .publish import HubTarget, Target
from .recipe import Family
from .record import BUILD_FILE, RepoRecord, SourceInfo, VariantResult, build_json, preuploaded_files
from .reference import LazyReference
from .source import SourceRef

Log = Callable[[str], None]


@dataclass
class VariantBuild:
    folder: Path
    data: dict[str, Any]

    @property
    def result(self) -> VariantResult:
        return VariantResult.from_dict(self.data["result"])

    @property
    def variant_id(self) -> str:
        return self.data["result"]["variant"]["id"]

    @property
    def passed(self) -> bool:
        return bool(self.data["result"]["report"]["passed"])

    @property
    def preupload_repo(self) -> str | None:
        """The Hub repo this build pre-uploaded its large files to (None: all its files are here)."""
        return (self.data.get("preupload") or {}).get("repo_id")


def build_variant(spec: str, recipe_name: str | None, variant_id: str, out: Path, families: dict[str, Family],
                  family: str | None = None, api: Any = None, log: Log = print,
                  workdir: Path | None = None, reference_file: Path | None = None,
                  preupload: HubTarget | None = None) -> VariantBuild:
    """Build and validate ONE variant of SOURCE × RECIPE into ``out``; with ``preupload`` (the Hub the
    publish job will commit to), a variant that passed has its large files uploaded to its repo there."""
    ref, recipe = select(spec, recipe_name, families, family)
    offline = make_plan(ref, recipe)
    _check_buildable(offline, variant_id)
    plan, snapshot = prepare(ref, recipe, api)
    _check_buildable(plan, variant_id)  # the source's own config may drop it
    repo = next(r for r in plan.repos if variant_id in {v.id for v in r.variants})
    variant = next(v for v in repo.variants if v.id == variant_id)
    backend = get_backend(repo.format)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    (out / "files").mkdir(parents=True)
    reference = LazyReference(snapshot, log, reference_file)
    if reference_file:
        reference.get()  # a reference of another source is refused before anything is built
    with guarded_scratch_folder(plan, snapshot, variant_id, workdir=workdir, out_dir=out, log=log) as tmp:
        results = build_and_validate(backend, [variant], snapshot, out / "files", tmp, reference, log)
    record = RepoRecord(repo.name, plan, repo, SourceInfo.from_snapshot(snapshot), results, reference.summary(),
                        backend.tool_versions())
    report = results[variant_id].report
    verdict = "passed" if report["passed"] else "FAILED: " + "; ".join(report["reasons"])
    log(f"{variant_id}: built into {out} — {verdict}")
    repo_id = repo.repo_id(preupload.namespace) if preupload and report["passed"] else None
    blobs = _preupload(preupload, repo_id, out / "files", results[variant_id].files, log) if repo_id else None
    text = build_json(record, variant_id, blobs, repo_id)
    (out / BUILD_FILE).write_text(text)
    for rel in blobs or {}:  # on the Hub now: the artifact carries only the small files
        (out / "files" / rel).unlink()
    return VariantBuild(out, json.loads(text))


def _preupload(hub: HubTarget, repo_id: str, files: Path, paths: list[str], log: Log) -> dict:
    log(f"pre-uploading {len(paths)} file(s) to {hub.describe(repo_id)} (no commit)")
    blobs = hub.preupload(repo_id, files, paths)
    log(f"pre-uploaded {len(blobs)} file(s), {sum(b.size for b in blobs.values())} bytes, to {repo_id}; "
        f"{len(paths) - len(blobs)} small file(s) stay in the build folder")
    return blobs


def _check_buildable(plan: Plan, variant_id: str) -> None:
    dropped = next((d for d in plan.dropped if d.id == variant_id), None)
    if dropped:
        raise UsageError(f"{variant_id} cannot be built for {plan.source.public_name}: {dropped.reason}")
    if variant_id not in {v.id for v in plan.variants}:
        raise UsageError(f"recipe '{plan.recipe.name}' has no variant '{variant_id}'; "
                         f"known: {', '.join(v.id for v in plan.variants)}")


def load_builds(folder: Path) -> list[VariantBuild]:
    builds = [VariantBuild(p.parent, json.loads(p.read_text())) for p in sorted(Path(folder).rglob(BUILD_FILE))]
    if not builds:
        raise UsageError(f"no {BUILD_FILE} under {folder}: is it the folder the build artifacts were downloaded to?")
    return builds


def _source_ref(source: SourceInfo, family: Family) -> SourceRef:
    """The source as the plan needs it (family and model name); its files are not needed here."""
    return SourceRef(source.spec, family, source.model_name, repo_id=source.repo_id,
                     path=None if source.repo_id else Path(source.public_name), license=source.license)


def _check_same_run(builds: list[VariantBuild]) -> None:
    first = builds[0].data
    for b in builds:
        if (b.data["source"]["commit"], b.data["recipe"], b.data["family"]) != \
                (first["source"]["commit"], first["recipe"], first["family"]):
            raise UsageError(f"{b.folder}: built from {b.data['source']['commit'][:12]} with recipe "
                             f"'{b.data['recipe']}', but {builds[0].folder} from "
                             f"{first['source']['commit'][:12]} with '{first['recipe']}'; publish one run at a time")


def publish_builds(builds: list[VariantBuild], families: dict[str, Family], target: Target, log: Log = print,
                   force: bool = False) -> list[RepoOutcome]:
    """Assemble each repo from its variants' builds and push it in one commit."""
    _check_same_run(builds)
    first = builds[0].data
    if first["family"] not in families:
        raise UsageError(f"the builds are of family '{first['family']}', which no recipe file defines")
    family = families[first["family"]]
    source = SourceInfo(**first["source"])
    # the source's own config, so the plan drops exactly what the build jobs' plans dropped
    plan = make_plan(_source_ref(source, family), family.recipe(first["recipe"]), first["parameters"],
                     source.config or None)
    by_variant = {b.variant_id: b for b in builds}
    return run_each([(repo.repo_id(target.namespace),
                      lambda repo=repo: _publish_repo(plan, repo, source, by_variant, target, log, force))
                     for repo in plan.repos if any(v.id in by_variant for v in repo.variants)], log)


def _publish_repo(plan: Plan, repo: RepoPlan, source: SourceInfo, by_variant: dict[str, VariantBuild],
                  target: Target, log: Log, force: bool) -> RepoOutcome:
    repo_id = repo.repo_id(target.namespace)
    missing = [v.id for v in repo.variants if v.id not in by_variant]
    if missing:
        log(f"{repo_id}: NOT published — no build of {', '.join(missing)}")
        return RepoOutcome(repo_id, "failed", message=f"missing builds: {', '.join(missing)}")
    builds = [by_variant[v.id] for v in repo.variants]
    tools = builds[0].data["tools"]
    if any(b.data["tools"] != tools for b in builds):
        return RepoOutcome(repo_id, "failed", message="the variants were built with different tool versions")
    elsewhere = [f"{b.variant_id} to {b.preupload_repo}" for b in builds if b.preupload_repo not in (None, repo_id)]
    if elsewhere:
        return RepoOutcome(repo_id, "failed", message=f"pre-uploaded to another repo: {', '.join(elsewhere)}; "
                                                      f"publish under the namespace the builds used")
    release = [(r.repo_id(target.namespace), by_variant[v.id].result) for r in plan.repos for v in r.variants
               if v.id in by_variant]  # every format's measurements, for the chart and the picks
    record = RepoRecord(repo_id, plan, repo, source, {b.variant_id: b.result for b in builds},
                        builds[0].data["reference"], tools, release)
    if not record.failed and up_to_date(target, repo_id, record.key, plan=plan, repo=repo, commit=source.commit,
                                        force=force, log=log):
        return RepoOutcome(repo_id, "up-to-date")
    preuploaded = {p: blob for b in builds for p, blob in preuploaded_files(b.data).items()}
    with tempfile.TemporaryDirectory(prefix="hubbot-") as tmp:
        repo_dir = Path(tmp)
        for b in builds:
            for rel in b.data["result"]["files"]:
                if rel not in preuploaded:
                    (repo_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(b.folder / "files" / rel, repo_dir / rel)
        return publish_staged(target, stage_repo(record, repo_dir, preuploaded), log)


def preuploaded_builds(builds: list[VariantBuild]) -> list[VariantBuild]:
    """The builds whose large files are on the Hub, not in their folder."""
    return [b for b in builds if b.preupload_repo]
