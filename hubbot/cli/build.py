"""hubbot build: build and validate ONE variant into a folder (one job of a fanned-out publish)."""

from __future__ import annotations

from pathlib import Path

import click

from .. import actions, preflight
from ..artifacts import build_variant
from ..errors import UsageError, ValidationFailed
from ..pipeline import select
from ..publish import HubTarget, make_api, resolve_namespace
from ._options import (
    endpoint_option,
    family_option,
    namespace_option,
    no_preflight_option,
    recipe_option,
    workdir_option,
)
from ._output import handle_errors, progress, report
from .publish import verdict

COLUMNS = ["variant", "agreement", "threshold", "result"]


@click.command()
@click.argument("source")
@click.option("--variant", "variant_id", required=True, help="Variant id from `hubbot plan` (e.g. gguf-Q4_K_M).")
@recipe_option
@family_option
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the build (build.json and files/); replaced if it exists.")
@endpoint_option
@workdir_option
@click.option("--reference", "reference_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A reference from `hubbot reference` (same source commit): validation reuses it instead of "
                   "running the source model.")
@click.option("--preupload", is_flag=True,
              help="When the variant passed, upload its large (LFS/Xet) files to its repo on the Hub without "
                   "committing, and keep only their sha256 and size in OUT: `hubbot publish --from-artifacts` "
                   "then commits them by reference, uploading no model bytes.")
@namespace_option("the token's user; with --preupload, the namespace the publish job will use")
@no_preflight_option
@click.pass_obj
@handle_errors
def build(obj, source: str, variant_id: str, recipe_name: str | None, family: str | None, out_dir: Path,
          endpoint: str | None, workdir: Path | None, reference_file: Path | None, preupload: bool,
          namespace: str | None, skip_preflight: bool) -> None:
    """Build and validate one variant of SOURCE × RECIPE into OUT, for `hubbot publish --from-artifacts`.

    With --preupload, build.json is written only once the pre-upload is done: a job stopped before has no
    build.json, and the publish job publishes nothing of that repo.

    Exit codes: 0 built and passed, 1 it failed validation (the folder still records why) or its
    pre-upload failed, 2 bad input or too big for this machine (checked before anything is downloaded;
    --no-preflight skips it), 3 a format's extra is not installed.
    """
    api = make_api(endpoint)
    if namespace and not preupload:
        raise UsageError("--namespace is for --preupload (the repo the large files go to)")
    hub = HubTarget(api, resolve_namespace(api, namespace), log=progress) if preupload else None
    with actions.group(f"build {variant_id}"):
        ref, recipe = select(source, recipe_name, obj.families(), family)
        size = preflight.check_dropped(ref, recipe, api, variant_ids=[variant_id], log=progress)
        if not skip_preflight:
            preflight.check_source(ref, recipe, api, variant_ids=[variant_id], workdir=workdir, out_dir=out_dir,
                                   staged=False, reference=reference_file is None, log=progress, size=size)
        result = build_variant(source, recipe_name, variant_id, out_dir, obj.families(), family,
                               api, progress, workdir, reference_file, preupload=hub)
    r = result.data["result"]["report"]
    rows = [(variant_id, "—" if r["agreement"] is None else f"{r['agreement']:.3f}", f"{r['threshold']:.2f}",
             verdict(r))]
    report(f"build of {source} → {out_dir}", COLUMNS, rows, summary_title=f"hubbot build {variant_id}")
    actions.set_outputs(variant=variant_id, passed=str(r["passed"]).lower())
    if not r["passed"]:
        actions.error("; ".join(r["reasons"]), title=f"{variant_id} failed validation")
        raise ValidationFailed(f"{variant_id} failed validation")
