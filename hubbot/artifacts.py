"""Split builds: one variant per job (``hubbot build --variant``), one publish of them all
(``hubbot publish --from-artifacts``).

A build folder holds ``build.json`` (the source, recipe, variant, its card row, its validation
report, the reference and tool versions) and ``files/`` (the variant's files at their paths in
the repo). Publishing re-plans the recipe offline, checks that every variant of a repo is there
and passed, and writes the same card, validation.json and hubbot.json (same ``key``) that a
single-machine ``hubbot publish`` would, then pushes each repo in one commit.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .backends import get_backend
from .errors import UsageError
from .pipeline import Publisher, RepoOutcome, _row, prepare, select, write_metadata
from .plan import Plan, RepoPlan, make_plan
from .recipe import Family, stable_hash
from .source import Snapshot, SourceRef

BUILD_FILE = "build.json"
Log = Callable[[str], None]


@dataclass
class VariantBuild:
    folder: Path
    data: dict[str, Any]

    @property
    def passed(self) -> bool:
        return bool(self.data["report"]["passed"])


def build_variant(spec: str, recipe_name: str | None, variant_id: str, out: Path, families: dict[str, Family],
                  family: str | None = None, api: Any = None, log: Log = print,
                  workdir: Path | None = None) -> VariantBuild:
    """Build and validate ONE variant of SOURCE × RECIPE into ``out``."""
    ref, recipe = select(spec, recipe_name, families, family)
    offline = make_plan(ref, recipe)
    if variant_id not in {v.id for v in offline.variants}:
        raise UsageError(f"recipe '{recipe.name}' has no variant '{variant_id}'; "
                         f"known: {', '.join(v.id for v in offline.variants)}")
    plan, snapshot = prepare(ref, recipe, api)
    repo = next(r for r in plan.repos if variant_id in {v.id for v in r.variants})
    variant = next(v for v in repo.variants if v.id == variant_id)
    backend = get_backend(repo.format)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    (out / "files").mkdir(parents=True)
    publisher = Publisher(None, log=log, workdir=workdir)
    try:
        with tempfile.TemporaryDirectory(prefix="hubbot-", dir=workdir) as tmp:
            work = Path(tmp)
            [built] = backend.build(snapshot, [variant], out / "files", work, log)
            report = publisher._validate(backend, variant, built, snapshot, out / "files")
            row = _row(variant, built, report, out / "files")
            reference = publisher.reference(snapshot).summary() if publisher._reference else []
    finally:
        if publisher._reference:
            publisher._reference.close()
    ref_data = {"spec": ref.spec, "repo_id": ref.repo_id, "public_name": ref.public_name,
                "model_name": ref.model_name, "license": ref.license, "local": ref.is_local}
    data = {"hubbot": __version__, "variant": variant_id, "repo": repo.name, "format": repo.format,
            "family": ref.family.name, "recipe": recipe.name, "parameters": plan.parameters,
            "source": {**ref_data, "commit": snapshot.commit, "config": snapshot.config,
                       "license": snapshot.license, "card_data": snapshot.card_data},
            "files": built.files, "row": row, "report": report.to_dict(), "reference": reference,
            "tools": backend.tool_versions()}
    (out / BUILD_FILE).write_text(json.dumps(data, indent=2, default=str))
    verdict = "passed" if report.passed else "FAILED: " + "; ".join(report.reasons)
    log(f"{variant_id}: built into {out} — {verdict}")
    return VariantBuild(out, data)


def load_builds(folder: Path) -> list[VariantBuild]:
    builds = [VariantBuild(p.parent, json.loads(p.read_text())) for p in sorted(Path(folder).rglob(BUILD_FILE))]
    if not builds:
        raise UsageError(f"no {BUILD_FILE} under {folder}: is it the folder the build artifacts were downloaded to?")
    return builds


def _source_ref(src: dict[str, Any], family: Family) -> SourceRef:
    if src["local"]:
        return SourceRef(src["spec"], family, src["model_name"], path=Path(src["public_name"]),
                         license=src["license"])
    return SourceRef(src["spec"], family, src["model_name"], repo_id=src["repo_id"], revision=src["commit"],
                     license=src["license"])


def publish_builds(builds: list[VariantBuild], families: dict[str, Family], target, log: Log = print,
                   force: bool = False) -> list[RepoOutcome]:
    """Assemble each repo from its variants' builds and push it in one commit."""
    first = builds[0].data
    for b in builds:
        if (b.data["source"]["commit"], b.data["recipe"], b.data["family"]) != \
                (first["source"]["commit"], first["recipe"], first["family"]):
            raise UsageError(f"{b.folder}: built from {b.data['source']['commit'][:12]} with recipe "
                             f"'{b.data['recipe']}', but {builds[0].folder} from "
                             f"{first['source']['commit'][:12]} with '{first['recipe']}'; publish one run at a time")
    if first["family"] not in families:
        raise UsageError(f"the builds are of family '{first['family']}', which no recipe file defines")
    family = families[first["family"]]
    ref = _source_ref(first["source"], family)
    plan = make_plan(ref, family.recipe(first["recipe"]), first["parameters"])
    src = first["source"]
    snapshot = Snapshot(ref, builds[0].folder, src["commit"], src["config"], src["license"], src["card_data"])
    by_variant = {b.data["variant"]: b for b in builds}
    return [_publish_repo(plan, repo, snapshot, by_variant, target, log, force) for repo in plan.repos
            if any(v.id in by_variant for v in repo.variants)]


def _publish_repo(plan: Plan, repo: RepoPlan, snapshot: Snapshot, by_variant: dict[str, VariantBuild],
                  target, log: Log, force: bool) -> RepoOutcome:
    repo_id = repo.repo_id(target.namespace)
    missing = [v.id for v in repo.variants if v.id not in by_variant]
    if missing:
        log(f"{repo_id}: NOT published — no build of {', '.join(missing)}")
        return RepoOutcome(repo_id, "failed", message=f"missing builds: {', '.join(missing)}")
    builds = [by_variant[v.id] for v in repo.variants]
    failed = [b.data["variant"] for b in builds if not b.passed]
    if failed:
        log(f"{repo_id}: NOT published — failed validation: {', '.join(failed)}")
        return RepoOutcome(repo_id, "failed", message=f"failed validation: {', '.join(failed)}")
    tools = builds[0].data["tools"]
    if any(b.data["tools"] != tools for b in builds):
        return RepoOutcome(repo_id, "failed", message="the variants were built with different tool versions")
    key = stable_hash({"source": snapshot.commit, "repo": plan.repo_key(repo), "tools": tools})
    current = target.current_manifest(repo_id)
    if not force and current and current.get("key") == key:
        log(f"{repo_id}: up to date (source {snapshot.commit[:12]}, recipe {plan.recipe_hash(repo)})")
        return RepoOutcome(repo_id, "up-to-date")
    backend = get_backend(repo.format)
    with tempfile.TemporaryDirectory(prefix="hubbot-") as tmp:
        repo_dir = Path(tmp)
        for b in builds:
            for rel in b.data["files"]:
                (repo_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(b.folder / "files" / rel, repo_dir / rel)
        write_metadata(plan, repo, repo_id, snapshot, backend, [b.data["row"] for b in builds],
                       [b.data["report"] for b in builds], builds[0].data["reference"], tools, key, repo_dir)
        message = f"hubbot: {plan.recipe.name} variants of {snapshot.ref.public_name} ({snapshot.commit[:12]})"
        description = f"Built and validated by hubbot {__version__}; see hubbot.json for provenance."
        log(f"{repo_id}: all {len(builds)} variants passed; publishing to {target.describe(repo_id)}")
        push = target.push(repo_id, repo_dir, message, description)
    status = "published" if push.changed else "unchanged"
    return RepoOutcome(repo_id, status, push=push)
