"""hubbot recipes: what families and recipes exist."""

from __future__ import annotations

import click

from ..backends import formats, get_backend
from ..backends.support import ARCHITECTURES, CONDITIONS, architecture_unsupported
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
              ["alias", "Hub repo", "architecture"], [(m.alias, m.repo, m.architecture or "?")
                                                      for m in fam.models.values()])
        table(f"recipes of '{fam.name}'", ["recipe", "variants", "description"],
              [(r.name, ", ".join(_variant(v) for v in r.variants), r.description) for r in fam.recipes.values()])


@recipes.command("support")
@handle_errors
def support() -> None:
    """What each format's tool can build of each architecture (hubbot/backends/support.py).

    `hubbot plan` drops the variants a tool cannot build, with these reasons."""
    fmts = formats()
    rows = []
    for arch in ARCHITECTURES.values():
        whole = architecture_unsupported(arch.name)
        rows.append((arch.name, arch.model_type,
                     *(_cell(arch, f, whole) for f in fmts), whole or ""))
    table("architecture × format", ["architecture", "model_type", *fmts, "note"], rows)


def _cell(arch, fmt: str, whole: str | None) -> str:
    s = arch.formats.get(fmt)
    if s is None:
        return "no: " + arch.why_not.get(fmt, "")
    if whole:
        return "the tool only (see note)"
    limits = [", ".join(s.targets) if s.targets else "", ", ".join(s.precision_classes) if s.precision_classes else "",
              CONDITIONS[s.requires][1] if s.requires else ""]
    return "yes" + (f" ({'; '.join(x for x in limits if x)})" if any(limits) else "")


def _variant(v) -> str:
    """format:precision, with @target where it is not the format's default."""
    default = get_backend(v.format).default_target
    return f"{v.format}:{v.precision}" + (f"@{v.target}" if v.target != default else "")
