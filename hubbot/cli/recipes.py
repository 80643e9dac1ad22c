"""hubbot recipes: what families and recipes exist."""

from __future__ import annotations

import click

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
              [(r.name, ", ".join(f"{v.format}:{v.precision}" + (f"@{v.target}" if v.target != "any" else "")
                                  for v in r.variants), r.description) for r in fam.recipes.values()])
