"""One record per repo: what a published repo says about itself, rendered every way it is written.

``RepoRecord`` holds the source, the recipe, one ``VariantResult`` per variant (its files, build
details and validation report), the reference answers and the tool versions. validation.json,
hubbot.json and README.md of a repo, and build.json of a one-variant build job, are all rendered
from it, so a repo assembled from fanned-out builds is written exactly like one built on a single
machine.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from . import __version__
from .backends import get_backend
from .plan import Plan, RepoPlan, Variant
from .publish import MANIFEST, REPORT, Blob, Preuploaded, file_digest, folder_files
from .recipe import stable_hash
from .source import Snapshot

BUILD_FILE = "build.json"


@dataclass(frozen=True)
class SourceInfo:
    """What published files say about the source: never a local path."""

    spec: str  # what the user typed
    public_name: str  # e.g. microsoft/phi-4@main, or a local folder's name
    model_name: str
    repo_id: str | None  # the Hub repo (base_model); None for a local folder
    commit: str
    license: str | None
    config: dict[str, Any] = field(default_factory=dict)
    card_data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot) -> SourceInfo:
        ref = snapshot.ref
        return cls(ref.spec if not ref.is_local else ref.public_name, ref.public_name, ref.model_name, ref.repo_id,
                   snapshot.commit, snapshot.license, snapshot.config, snapshot.card_data)

    @property
    def base_model(self) -> str | None:
        return self.repo_id

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")


@dataclass
class VariantResult:
    """One variant after build and validation."""

    variant: Variant
    files: list[str]
    bytes: int
    build_seconds: float
    details: dict[str, Any]
    report: dict[str, Any]  # VariantReport.to_dict()

    @property
    def passed(self) -> bool:
        return bool(self.report["passed"])

    def row(self) -> dict[str, Any]:
        """The card's row for this variant."""
        r = self.report
        prompts = r.get("prompts") or []
        divergence = ", ".join("—" if p["first_divergence"] is None else str(p["first_divergence"]) for p in prompts)
        v = self.variant
        return {
            "id": v.id, "path": v.path, "native": v.native, "precision_class": v.precision_class, "target": v.target,
            "bytes": self.bytes, "agreement": r["agreement"], "threshold": r["threshold"], "passed": r["passed"],
            "executed": r["executed"],
            "tokens_match": all(p["tokens_match"] for p in prompts) if r["executed"] else None,
            "divergence": divergence or "—", "details": self.details, "build_seconds": round(self.build_seconds, 2),
            "distribution": r.get("distribution"), "max_mean_kld": r.get("max_mean_kld"),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "variant": self.variant.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VariantResult:
        return cls(**{**data, "variant": Variant(**data["variant"])})


def repo_key(plan: Plan, repo: RepoPlan, commit: str, tools: dict[str, str]) -> str:
    """What decides whether a published repo is up to date: source commit, recipe, tool versions."""
    return stable_hash({"source": commit, "repo": plan.repo_key(repo), "tools": tools})


@dataclass
class RepoRecord:
    repo_id: str
    plan: Plan
    repo: RepoPlan
    source: SourceInfo
    results: dict[str, VariantResult]  # by variant id
    reference: list[dict[str, Any]]
    tools: dict[str, str]
    # the other repos of the release known when this one is staged, as (repo id, result): with these
    # the chart and the picks compare every format (a fan-out publish knows them all)
    release: list[tuple[str, VariantResult]] = field(default_factory=list)

    @property
    def key(self) -> str:
        return repo_key(self.plan, self.repo, self.source.commit, self.tools)

    @property
    def ordered(self) -> list[VariantResult]:
        return [self.results[v.id] for v in self.repo.variants]

    @property
    def failed(self) -> list[str]:
        return [r.variant.id for r in self.ordered if not r.passed]

    @property
    def commit_message(self) -> str:
        return f"hubbot: {self.plan.recipe.name} variants of {self.source.public_name} ({self.source.commit[:12]})"

    @property
    def commit_description(self) -> str:
        return f"Built and validated by hubbot {__version__}; see {MANIFEST} for provenance."

    def validation_json(self) -> str:
        return json.dumps({"source": self.source.public_name, "commit": self.source.commit,
                           "reference": self.reference, "variants": [r.report for r in self.ordered]},
                          indent=2, default=str)

    def release_results(self) -> list[tuple[str, VariantResult]]:
        """This repo's results and the rest of the release's, each variant once."""
        mine = [(self.repo_id, r) for r in self.ordered]
        return mine + [(repo, r) for repo, r in self.release if repo != self.repo_id]

    def chart_png(self) -> bytes | None:
        """The size-vs-KLD chart of the release, or None when no variant was measured on the held text."""
        from .chart import points, size_vs_kld_png

        found = points(self.release_results())
        return size_vs_kld_png(found, f"{self.source.model_name}: size vs. loss") if found else None

    def card(self) -> str:
        from .card import render_card

        return render_card(self)

    def manifest_json(self, repo_dir: Path, preuploaded: Preuploaded | None = None) -> str:
        """hubbot.json: provenance and every file's digest, those in ``repo_dir`` and those ``preuploaded``
        to the Hub by the build jobs alike (in path order either way: the same bytes as a one-machine build)."""
        here = {f.relative_to(repo_dir).as_posix(): {"sha256": file_digest(f), "size": f.stat().st_size}
                for f in folder_files(repo_dir) if f.name != MANIFEST or f.parent != repo_dir}
        merged = {**here, **{p: b.to_dict() for p, b in (preuploaded or {}).items()}}
        files = {p: merged[p] for p in sorted(merged, key=lambda p: PurePosixPath(p).parts)}
        return json.dumps({
            "hubbot": __version__, "key": self.key,
            "source": {"spec": self.source.public_name, "repo": self.source.base_model, "commit": self.source.commit},
            "recipe": {"family": self.plan.source.family.name, "name": self.plan.recipe.name,
                       "hash": self.plan.recipe_hash(self.repo)},
            "tools": self.tools, "variants": [v.id for v in self.repo.variants], "files": files,
        }, indent=2)

    def write(self, repo_dir: Path, preuploaded: Preuploaded | None = None) -> None:
        """validation.json, README.md and hubbot.json beside the variants' files (the manifest last: it
        lists every other file's digest, and the ``preuploaded`` ones')."""
        from .chart import CHART_FILE

        (repo_dir / REPORT).write_text(self.validation_json())
        chart = self.chart_png()
        if chart:
            (repo_dir / CHART_FILE).write_bytes(chart)
        (repo_dir / "README.md").write_text(self.card())
        (repo_dir / MANIFEST).write_text(self.manifest_json(repo_dir, preuploaded))

    @property
    def backend(self):
        return get_backend(self.repo.format)


def build_json(record: RepoRecord, variant_id: str, preuploaded: Preuploaded | None = None,
               preuploaded_to: str | None = None) -> str:
    """build.json of a one-variant build job: its share of the repo's record, and, when the job pre-uploaded
    its large files to the Hub (``preuploaded_to``, a repo id), each one's path, sha256 and size: those
    files are not in the build folder, the publish job commits them by reference."""
    data = {
        "hubbot": __version__, "family": record.plan.source.family.name, "recipe": record.plan.recipe.name,
        "parameters": record.plan.parameters, "repo": record.repo.name, "source": asdict(record.source),
        "result": record.results[variant_id].to_dict(), "reference": record.reference, "tools": record.tools,
    }
    if preuploaded_to:
        data["preupload"] = {"repo_id": preuploaded_to,
                             "files": {p: b.to_dict() for p, b in sorted((preuploaded or {}).items())}}
    return json.dumps(data, indent=2, default=str)


def preuploaded_files(data: dict[str, Any]) -> dict[str, Blob]:
    """The pre-uploaded files a build.json records (none for a build that carries all its files)."""
    return {p: Blob(f["sha256"], int(f["size"])) for p, f in (data.get("preupload") or {}).get("files", {}).items()}
