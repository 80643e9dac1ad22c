"""hubbot plan: what a publish would build, without building anything."""

from __future__ import annotations

import json

import click

from .. import actions, preflight, runners
from ..card import human_size
from ..errors import UnsupportedSource
from ..plan import make_plan
from ..publish import make_api
from ..source import check_hub_source, read_config, resolve
from ._options import endpoint_option, family_option, recipe_option, valid_namespace
from ._output import echo, handle_errors, progress, table


@click.command()
@click.argument("source")
@recipe_option
@family_option
@click.option("--namespace", default="{namespace}", show_default=True, callback=valid_namespace,
              help="Hub namespace for the repo ids shown.")
@endpoint_option
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON on stdout.")
@click.option("--github-matrix", "as_matrix", is_flag=True,
              help="Print a GitHub Actions matrix, one entry per variant ({\"include\": [{\"variant\": …, "
                   "\"runs_on\": …}]}), each routed to the smallest of the recipe's `runners:` classes that holds "
                   "its estimated RAM and disk (exit 2 when none does); under Actions also write it to "
                   "GITHUB_OUTPUT as 'matrix', with the reference job's runner as 'reference_runs_on'.")
@click.pass_obj
@handle_errors
def plan(obj, source: str, recipe_name: str | None, family: str | None, namespace: str, endpoint: str | None,
         as_json: bool, as_matrix: bool) -> None:
    """Show the repos and variants SOURCE × RECIPE would produce, with estimated sizes, peak RAM and disk.

    SOURCE is a family alias (phi-4), a Hub repo id (microsoft/phi-4[@revision]) or a local folder.
    No weights are downloaded: the source is checked as a build would check it (config.json, the
    index, the safetensors headers against the config: a Hub repo's read with ranged requests),
    sizes come from those headers, RAM and disk from hubbot's cost table.
    """
    families = obj.families()
    ref = resolve(source, families, family)
    recipe = ref.family.recipe(recipe_name or ref.family.default_recipe)
    if ref.is_local:
        config, size = read_config(ref.path), _local_size(ref)
    else:  # one read of the Hub's headers serves the checks and the sizes
        hub_source = check_hub_source(ref, make_api(endpoint))
        config, size = hub_source.config, preflight.SourceSize.from_counts(hub_source.parameter_count)
        if size is None:
            progress(f"sizes unknown: {ref.display} has no parameters in its safetensors headers")
    the_plan = make_plan(ref, recipe, size.parameters if size else None, config)
    estimates = preflight.estimate(the_plan, size.parameters, size.dtype) if size else {}
    if as_json:
        echo(_plan_json(the_plan, namespace, size, estimates))
        return
    if as_matrix:
        matrix, reference_runner = _github_matrix(the_plan, ref.family.runners, namespace, size)
        actions.set_outputs(matrix=matrix, reference_runs_on=json.dumps(reference_runner.labels()))
        echo(matrix)
        return
    for repo in the_plan.repos:
        table(f"{repo.repo_id(namespace)}  ({repo.format}, recipe '{recipe.name}', hash {the_plan.recipe_hash(repo)})",
              ["variant", "path in repo", "precision", "target", "min agreement", "est. size", "peak RAM", "disk"],
              [(v.id, v.path, f"{v.native} ({v.precision_class})", v.target, f"{v.min_agreement:.2f}",
                human_size(the_plan.estimated_bytes(v)),
                *((human_size(estimates[v.id].peak_ram_bytes), human_size(estimates[v.id].disk_bytes))
                  if estimates else ("?", "?"))) for v in repo.variants])
    if the_plan.dropped:
        table("dropped: not built, and why", ["variant", "repo", "reason"],
              [(d.id, d.repo, d.reason) for d in the_plan.dropped])
    if size:
        echo(_machine_line(size, estimates))
    if the_plan.unsupported:
        raise UnsupportedSource(f"nothing of {ref.public_name} can be built with recipe '{recipe.name}': "
                                f"{the_plan.unsupported}")


def _github_matrix(the_plan, classes, namespace: str, size: preflight.SourceSize | None):
    """The build jobs' matrix, each routed by its estimate (build jobs get the reference passed in,
    so they never load the source model), and the runner class of the job computing that reference."""
    needs = {v.id: None for v in the_plan.variants}
    reference_need = None
    if size:
        for v in the_plan.variants:
            e = preflight.estimate_variant(the_plan, v, size.parameters, size.dtype, reference=False)
            needs[v.id] = (e.peak_ram_bytes, e.disk_bytes)
        reference_need = preflight.reference_job(the_plan, size.parameters, size.dtype)
    routed = {r.variant_id: r for r in runners.route(needs, classes)}
    entries = [runners.matrix_entry(routed[v.id], {"variant": v.id, "repo": r.repo_id(namespace), "format": r.format,
                                                   "precision": v.native})
               for r in the_plan.repos for v in r.variants]
    reference_runner = runners.route({"reference": reference_need}, classes)[0].runner
    return json.dumps({"include": entries}, separators=(",", ":")), reference_runner


def _local_size(ref) -> preflight.SourceSize | None:
    try:
        return preflight.source_size(ref)
    except preflight.SizeUnknown as e:
        progress(f"sizes unknown: {e}")
        return None


def _plan_json(the_plan, namespace: str, size: preflight.SourceSize | None,
               estimates: dict[str, preflight.Estimate]) -> str:
    per_variant = {v.id: {"estimated_peak_ram_bytes": estimates[v.id].peak_ram_bytes if size else None,
                          "estimated_disk_bytes": estimates[v.id].disk_bytes if size else None}
                   for v in the_plan.variants}
    run = preflight.estimate_run(the_plan, size.parameters, size.dtype) if size else None
    return the_plan.to_json(namespace, per_variant, parameters=size.parameters if size else None,
                            dtype=size.dtype if size else None,
                            run={"peak_ram_bytes": run.peak_ram_bytes, "disk_bytes": run.disk_bytes} if run else None,
                            machine=preflight.machine())


def _machine_line(size: preflight.SourceSize, estimates: dict[str, preflight.Estimate]) -> str:
    memory = preflight.available_memory()
    line = (f"{preflight.human_count(size.parameters)} parameters ({size.dtype}); this machine has "
            f"{human_size(memory)} of memory available")
    too_big = [e.variant_id for e in estimates.values() if memory is not None and e.peak_ram_bytes > memory]
    return line + (f"; too big for it: {', '.join(too_big)}" if too_big else "; every variant fits")
