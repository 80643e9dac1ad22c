"""plan: which repos and variants a source × recipe produces, before anything is built."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .backends import get_backend
from .backends.support import architecture_unsupported, canonical_architecture, variant_unsupported
from .errors import RecipeError, UsageError
from .recipe import Family, Recipe, VariantSpec, stable_hash
from .source import SourceRef, check_repo_id, safetensors_tensors

HUB_FILE_LIMIT = 50 * 10**9  # the Hub refuses any single file over 50 GB
# the file that holds a variant's weights, inside the variant's path ("": the path is the file); formats
# absent here shard their weights (mlx-lm: 5 GiB files)
WEIGHTS_FILE = {"gguf": "", "onnx": "model.onnx.data", "openvino": "openvino_model.bin"}


@dataclass(frozen=True)
class Variant:
    id: str  # unique within a plan, e.g. "gguf-Q4_K_M"
    format: str
    precision: str  # as written in the recipe
    native: str  # the format's own name, e.g. Q4_K_M
    precision_class: str  # int4, int8, fp16 …
    target: str
    options: dict[str, Any]
    path: str  # file or folder inside the repo
    min_agreement: float
    bits_per_weight: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def file_bytes(self, parameters: int) -> int:
        """The estimated size of this variant's files for a source of ``parameters`` parameters."""
        return int(parameters * self.bits_per_weight / 8)


@dataclass(frozen=True)
class Dropped:
    """A variant of the recipe that the source's architecture cannot be built as, and why."""

    id: str
    format: str
    repo: str  # the repo name it would have gone to
    reason: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class RepoPlan:
    name: str  # repo name without namespace
    format: str
    variants: list[Variant] = field(default_factory=list)

    def repo_id(self, namespace: str) -> str:
        return f"{namespace}/{self.name}"


@dataclass
class Plan:
    source: SourceRef
    recipe: Recipe
    repos: list[RepoPlan]
    parameters: int | None = None  # for size estimates
    architecture: str | None = None  # config.json's architectures[0], when known
    dropped: list[Dropped] = field(default_factory=list)

    @property
    def unsupported(self) -> str | None:
        """Why nothing of the recipe can be built for this source, or None."""
        if self.repos:
            return None
        whole = architecture_unsupported(self.architecture)
        return whole or "; ".join(f"{d.id}: {d.reason}" for d in self.dropped) or None

    @property
    def variants(self) -> list[Variant]:
        return [v for r in self.repos for v in r.variants]

    def repo_key(self, repo: RepoPlan) -> dict[str, Any]:
        """What a repo's content depends on, besides the source commit and tool versions."""
        fam = self.source.family
        return {
            "hubbot": __version__,
            "family": fam.name,
            "recipe": self.recipe.name,
            "variants": [v.to_dict() for v in repo.variants],
            "validation": stable_hash(asdict(fam.validation)),
        }

    def recipe_hash(self, repo: RepoPlan) -> str:
        return stable_hash(self.repo_key(repo))[:16]

    def estimated_bytes(self, variant: Variant) -> int | None:
        if not self.parameters:
            return None
        return variant.file_bytes(self.parameters)

    def to_json(self, namespace: str, estimates: dict[str, dict[str, Any]] | None = None, **extra: Any) -> str:
        """``estimates``: more fields per variant id (the preflight's); ``extra``: more top-level fields."""
        estimates = estimates or {}
        return json.dumps({
            "source": self.source.display,
            "family": self.source.family.name,
            "recipe": self.recipe.name,
            "repos": [{
                "repo_id": r.repo_id(namespace), "format": r.format, "recipe_hash": self.recipe_hash(r),
                "variants": [{**v.to_dict(), "estimated_bytes": self.estimated_bytes(v), **estimates.get(v.id, {})}
                             for v in r.variants],
            } for r in self.repos],
            "architecture": self.architecture,
            "dropped": [d.to_dict() for d in self.dropped],
            **extra,
        }, indent=2)


def _naming(family: Family, fmt: str) -> dict[str, str]:
    default = get_backend(fmt).naming
    return {"repo": default.repo, "path": default.path, **family.naming.get(fmt, {})}


def make_variant(spec: VariantSpec, family: Family, model_name: str) -> tuple[str, Variant]:
    backend = get_backend(spec.format)
    native = backend.native_type(spec.precision)
    slug = backend.slug(native.name, spec.target, spec.options)
    fields = {"model": model_name, "quant": native.name, "precision": native.precision_class,
              "target": spec.target, "format": spec.format, "variant": slug, "group": backend.group(spec.target)}
    naming = _naming(family, spec.format)
    threshold = spec.min_agreement
    if threshold is None:
        threshold = family.validation.threshold(native.name, native.precision_class)
    variant = Variant(
        id=f"{spec.format}-{slug}", format=spec.format, precision=spec.precision, native=native.name,
        precision_class=native.precision_class, target=spec.target, options=dict(spec.options),
        path=naming["path"].format(**fields), min_agreement=float(threshold),
        bits_per_weight=native.bits_per_weight,
    )
    return naming["repo"].format(**fields), variant


def source_architecture(source: SourceRef, config: dict[str, Any] | None = None) -> str | None:
    """config.json's ``architectures[0]`` as the support table names it; before the config is read, what the
    recipe's alias says."""
    if config is not None:
        return canonical_architecture((config.get("architectures") or [None])[0])
    model = source.family.models.get(source.spec) or (source.repo_id and source.family.model_for_repo(source.repo_id))
    return model.architecture if model else None


def make_plan(source: SourceRef, recipe: Recipe, parameters: int | None = None,
              config: dict[str, Any] | None = None) -> Plan:
    """The repos and variants of ``recipe`` for ``source``; variants its architecture's tools cannot
    build (``hubbot.backends.support``), and, once ``parameters`` is known, variants whose weights
    file the Hub would refuse, are dropped with the reason."""
    architecture = source_architecture(source, config)
    repos: dict[str, RepoPlan] = {}
    dropped: list[Dropped] = []
    seen: set[str] = set()
    for spec in recipe.variants:
        repo_name, variant = make_variant(spec, source.family, source.model_name)
        if repo_name not in repos:
            _check_repo_name(repo_name, source.family, spec.format, source.model_name)
        if variant.id in seen:
            continue  # the same variant named twice (e.g. int4 and Q4_K_M) is built once
        seen.add(variant.id)
        reason = (variant_unsupported(architecture, variant.format, variant.target, variant.precision_class, config)
                  or over_hub_file_limit(variant, parameters))
        if reason:
            dropped.append(Dropped(variant.id, variant.format, repo_name, reason))
            continue
        repo = repos.setdefault(repo_name, RepoPlan(repo_name, spec.format))
        clash = next((v for v in repo.variants if v.path == variant.path or repo.format != spec.format), None)
        if clash:
            raise RecipeError(source.family.path, f"naming.{spec.format}",
                              f"variants {variant.id} and {clash.id} both land at "
                              f"{repo_name}/{variant.path}; make the templates tell them apart")
        repo.variants.append(variant)
    return Plan(source, recipe, list(repos.values()), parameters, architecture, dropped)


def _check_repo_name(name: str, family: Family, fmt: str, model_name: str) -> None:
    template = _naming(family, fmt)["repo"]
    try:
        check_repo_id(name, "repo name")
    except UsageError as e:
        raise UsageError(f"{e} (naming.{fmt}.repo '{template}' of {family.path}, model name '{model_name}')") from None


def over_hub_file_limit(variant: Variant, parameters: int | None) -> str | None:
    """Why the Hub would refuse this variant's weights file (GGUF, ONNX and OpenVINO keep a variant's
    weights in one file of about the whole variant's size), or None."""
    from .card import human_size

    if variant.format not in WEIGHTS_FILE or not parameters:
        return None
    size = variant.file_bytes(parameters)
    if size <= HUB_FILE_LIMIT:
        return None
    path = "/".join(p for p in (variant.path, WEIGHTS_FILE[variant.format]) if p)
    return (f"its weights would be one ~{human_size(size)} file ({path}), over the Hub's "
            f"{human_size(HUB_FILE_LIMIT)} per-file limit")


def count_parameters(model_dir: Path) -> int | None:
    """Parameter count from safetensors headers (no tensor data is read)."""
    return sum(parameters_by_dtype(model_dir).values()) or None


def parameters_by_dtype(model_dir: Path) -> dict[str, int]:
    """Parameters per safetensors dtype ("BF16": 14_659_507_200, …) from the headers only."""
    counts: dict[str, int] = {}
    for meta in safetensors_tensors(model_dir):
        counts[meta["dtype"]] = counts.get(meta["dtype"], 0) + math.prod(meta["shape"])
    return counts
