"""hubbot recipes: what families and recipes exist."""

from __future__ import annotations

import click

from ..backends import get_backend
from ._output import handle_errors, table


@click.group()
def recipes() -> None:
    """Families and their named recipes, from recipes/*.yaml."""


@recipes.command("list")
@click.pass_obj
@handle_errors
def list_(obj) -> None:
    """List every family, its models and its recipes (validates every file)."""
    families = obj.families()
    for fam in families.values():
        table(f"{fam.title} — family '{fam.name}' ({fam.path.name}), default recipe '{fam.default_recipe}'",
              ["alias", "Hub repo"], [(m.alias, m.repo) for m in fam.models.values()])
        table(f"recipes of '{fam.name}'", ["recipe", "variants", "description"],
              [(r.name, ", ".join(_variant(v) for v in r.variants), r.description) for r in fam.recipes.values()])


def _variant(v) -> str:
    """format:precision, with @target where it is not the format's default."""
    default = get_backend(v.format).default_target
    return f"{v.format}:{v.precision}" + (f"@{v.target}" if v.target != default else "")
