"""hubbot build: build and validate ONE variant into a folder (one job of a fanned-out publish)."""

from __future__ import annotations

from pathlib import Path

import click

from .. import actions
from ..artifacts import build_variant
from ..errors import ValidationFailed
from ..publish import make_api
from ._output import handle_errors, progress, table


@click.command()
@click.argument("source")
@click.option("--variant", "variant_id", required=True, help="Variant id from `hubbot plan` (e.g. gguf-Q4_K_M).")
@click.option("--recipe", "-r", "recipe_name", help="Named recipe; default: the family's default recipe.")
@click.option("--family", help="Family to use when SOURCE does not tell.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the build (build.json and files/); replaced if it exists.")
@click.option("--endpoint", envvar="HF_ENDPOINT", help="Hub endpoint. Default: HF_ENDPOINT or https://huggingface.co.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Where intermediate files go (default: the system temp folder).")
@click.pass_obj
@handle_errors
def build(obj, source: str, variant_id: str, recipe_name: str | None, family: str | None, out_dir: Path,
          endpoint: str | None, workdir: Path | None) -> None:
    """Build and validate one variant of SOURCE × RECIPE into OUT, for `hubbot publish --from-artifacts`.

    Exit codes: 0 built and passed, 1 it failed validation (the folder still records why),
    2 bad input, 3 a format's extra is not installed.
    """
    if workdir:
        workdir.mkdir(parents=True, exist_ok=True)
    with actions.group(f"build {variant_id}"):
        result = build_variant(source, recipe_name, variant_id, out_dir, obj.families(), family,
                               make_api(endpoint), progress, workdir)
    report = result.data["report"]
    rows = [(result.data["variant"], "—" if report["agreement"] is None else f"{report['agreement']:.3f}",
             f"{report['threshold']:.2f}", "passed" if report["passed"] else "FAILED: " + "; ".join(report["reasons"]))]
    table(f"build of {source} → {out_dir}", ["variant", "agreement", "threshold", "result"], rows)
    actions.summary_table(f"hubbot build {variant_id}", ["variant", "agreement", "threshold", "result"], rows)
    actions.set_outputs(variant=variant_id, passed=str(report["passed"]).lower())
    if not report["passed"]:
        actions.error("; ".join(report["reasons"]), title=f"{variant_id} failed validation")
        raise ValidationFailed(f"{variant_id} failed validation")
