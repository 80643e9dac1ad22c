"""card: the repo's README.md, rendered from jinja2 templates under ``templates/``.

The YAML metadata is produced by huggingface_hub's ``ModelCardData`` (never templated by hand),
the body by the format's template, which includes the shared provenance and validation parts.

A card is a function of the build alone: no date, no clock, no build seconds or memory peaks
(those stay in build.json and the backends' details), so rebuilding the same source with the
same recipe and tools gives the same README.md on any day, and ``--force`` then commits nothing.
The card names the source by its commit (a Hub source) or content hash (a local folder): that,
not a date, says which release it was built from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from huggingface_hub import ModelCard, ModelCardData

from . import __version__
from .chart import CHART_FILE, picks, points
from .paths import bundled

if TYPE_CHECKING:
    from .record import RepoRecord, SourceInfo


def templates_dir() -> Path:
    """HUBBOT_TEMPLATES_DIR, or the templates shipped with hubbot (the repo's ``templates/``)."""
    return Path(os.environ.get("HUBBOT_TEMPLATES_DIR") or bundled("templates"))


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def card_metadata(source: SourceInfo, backend) -> ModelCardData:
    tags = [*backend.tags, *([source.model_type] if source.model_type else []), "quantized", "hubbot"]
    data: dict[str, Any] = {
        "license": source.license or "other",
        "library_name": backend.library_name,
        "pipeline_tag": "text-generation",
        "tags": list(dict.fromkeys(tags)),
    }
    if source.base_model:
        data.update(base_model=source.base_model, base_model_relation="quantized")
    language = source.card_data.get("language")
    if language:
        data["language"] = language
    return ModelCardData(**data)


def recommended(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The smallest variant that passed and agrees with the source on ≥ 95% of tokens."""
    good = [r for r in rows if r["passed"] and (r["agreement"] or 0) >= 0.95]
    return min(good, key=lambda r: r["bytes"]) if good else None


def is_measurement(key: str) -> bool:
    """Build seconds and memory peaks: different on every run, so never on the card."""
    return key.endswith(("seconds", "rss_bytes"))


def card_row(row: dict[str, Any]) -> dict[str, Any]:
    """A variant's row as the templates see it: its measurements left out, so a template that asked
    for one fails (StrictUndefined) instead of making the card change from run to run."""
    details = {k: v for k, v in row["details"].items() if not is_measurement(k)}
    return {**{k: v for k, v in row.items() if not is_measurement(k)}, "details": details}


def shown_dropped(plan: Any, repo_name: str) -> list[Any]:
    """The dropped variants a repo's card lists: its own, and those of repos the release has none of
    (e.g. every ONNX variant of a PhiMoE release), which no card would show otherwise."""
    published = {r.name for r in plan.repos}
    return [d for d in plan.dropped if d.repo == repo_name or d.repo not in published]


def render_card(record: RepoRecord) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(templates_dir()), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["size"] = human_size
    backend, source, plan = record.backend, record.source, record.plan
    metadata = card_metadata(source, backend)
    rows = [card_row(r.row()) for r in record.ordered]
    measured = points(record.release_results())
    body = env.get_template(backend.template).render(
        repo_id=record.repo_id, model_name=source.model_name, base_model=source.base_model,
        source=source.public_name, commit=source.commit, license=metadata.license,
        family=plan.source.family, recipe=plan.recipe, recipe_hash=plan.recipe_hash(record.repo),
        rows=rows, recommended=recommended(rows), reference=record.reference, tools=record.tools,
        hubbot_version=__version__, parameters=plan.parameters, architecture=plan.architecture,
        dropped=shown_dropped(plan, record.repo.name),
        chart=CHART_FILE if measured else None, measured=measured, picks=picks(measured),
        heldout=next((r["distribution"] for r in rows if r.get("distribution")), None),
    )
    content = f"---\n{metadata.to_yaml()}\n---\n\n{body}"
    ModelCard(content)  # parses the metadata back; raises if it is not valid card YAML
    return content
