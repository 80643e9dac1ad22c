"""hubbot reference: compute the source's validation reference once, for fanned-out build jobs."""

from __future__ import annotations

from pathlib import Path

import click

from ..plan import count_parameters
from ..publish import make_api
from ..reference import obtain_reference
from ..source import fetch, resolve
from ._options import endpoint_option, family_option
from ._output import handle_errors, progress, report


@click.command()
@click.argument("source")
@family_option
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the reference (JSON), for `hubbot build --reference FILE`.")
@endpoint_option
@click.pass_obj
@handle_errors
def reference(obj, source: str, family: str | None, out_file: Path, endpoint: str | None) -> None:
    """Run SOURCE in transformers (in its own dtype) on its family's validation prompts and write the
    greedy answers every variant is judged against.

    The same reference is cached under HUBBOT_CACHE (~/.cache/hubbot/references) per source commit
    and validation settings; pass the file to `hubbot build --reference` so that build jobs on other
    machines reuse it instead of each running the source model.
    """
    ref = resolve(source, obj.families(), family)
    snapshot = fetch(ref, make_api(endpoint))
    progress(f"source {snapshot.ref.display} at {snapshot.commit} ({count_parameters(snapshot.path) or '?'} "
             f"parameters)")
    result = obtain_reference(snapshot.path, snapshot.commit, ref.family.validation, snapshot.config, progress)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(result.to_json())
    report(f"reference {result.key} ({result.dtype}) → {out_file}", ["prompt", "tokens", "continuation", "margin"],
           [(p["name"], p["prompt_tokens"], p["continuation"], p["min_logit_margin"]) for p in result.summary()],
           summary_title="hubbot reference")
