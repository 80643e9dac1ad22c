"""hubbot plan: what a publish would build, without building anything."""

from __future__ import annotations

import json

import click

from .. import actions
from ..card import human_size
from ..plan import count_parameters, make_plan
from ..source import resolve
from ._options import family_option, recipe_option
from ._output import echo, handle_errors, table


@click.command()
@click.argument("source")
@recipe_option
@family_option
@click.option("--namespace", default="{namespace}", show_default=True, help="Hub namespace for the repo ids shown.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON on stdout.")
@click.option("--github-matrix", "as_matrix", is_flag=True,
              help="Print a GitHub Actions matrix, one entry per variant ({\"include\": [{\"variant\": …}]}), "
                   "and under Actions also write it to GITHUB_OUTPUT as 'matrix'.")
@click.pass_obj
@handle_errors
def plan(obj, source: str, recipe_name: str | None, family: str | None, namespace: str, as_json: bool,
         as_matrix: bool) -> None:
    """Show the repos and variants SOURCE × RECIPE would produce, with estimated sizes.

    SOURCE is a family alias (phi-4), a Hub repo id (microsoft/phi-4[@revision]) or a local folder.
    Nothing is downloaded: sizes are estimated from a local folder's safetensors headers.
    """
    families = obj.families()
    ref = resolve(source, families, family)
    recipe = ref.family.recipe(recipe_name or ref.family.default_recipe)
    the_plan = make_plan(ref, recipe, count_parameters(ref.path) if ref.is_local else None)
    if as_json:
        echo(the_plan.to_json(namespace))
        return
    if as_matrix:
        matrix = json.dumps({"include": [{"variant": v.id, "repo": r.repo_id(namespace), "format": r.format,
                                          "precision": v.native} for r in the_plan.repos for v in r.variants]},
                            separators=(",", ":"))
        actions.set_outputs(matrix=matrix)
        echo(matrix)
        return
    for repo in the_plan.repos:
        table(f"{repo.repo_id(namespace)}  ({repo.format}, recipe '{recipe.name}', hash {the_plan.recipe_hash(repo)})",
              ["variant", "path in repo", "precision", "target", "min agreement", "est. size"],
              [(v.id, v.path, f"{v.native} ({v.precision_class})", v.target, f"{v.min_agreement:.2f}",
                human_size(the_plan.estimated_bytes(v)) if the_plan.parameters else "?") for v in repo.variants])
