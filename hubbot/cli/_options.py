"""Options several commands share, declared once (as huggingface_hub's CLI does in _cli_utils.py)."""

from __future__ import annotations

from pathlib import Path

import click

from ..hub import TIMEOUTS_HELP
from ..publish import FolderTarget, HubTarget, Target, make_api, resolve_namespace
from ._output import progress


def _make_dir(ctx, param, value: Path | None) -> Path | None:
    if value is not None:
        value.mkdir(parents=True, exist_ok=True)
    return value


recipe_option = click.option("--recipe", "-r", "recipe_name",
                             help="Named recipe; default: the family's default recipe (`hubbot recipes list`).")
family_option = click.option("--family", help="Family to use when SOURCE does not tell (e.g. a Hub id outside "
                                              "its watch patterns).")
endpoint_option = click.option("--endpoint", envvar="HF_ENDPOINT",
                               help="Hub endpoint. Default: HF_ENDPOINT or https://huggingface.co. " + TIMEOUTS_HELP)
workdir_option = click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), callback=_make_dir,
                              help="Where intermediate files go (default: the system temp folder); needs room "
                                   "for the largest intermediate of a format (e.g. one F16 GGUF).")
out_option = click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
                          help="Write each repo as a folder DIR/<repo name> instead of pushing (no Hub, no token).")
no_preflight_option = click.option(
    "--no-preflight", "skip_preflight", is_flag=True,
    help="Skip the check, made from the source's safetensors headers before anything is downloaded, that this "
         "machine has the memory and disk the run needs (`hubbot plan` shows the estimates).")
create_pr_option = click.option("--pr", "create_pr", is_flag=True,
                                help="Open a pull request instead of pushing to main when the repo exists.")


def valid_namespace(ctx, param, value: str | None) -> str | None:
    """``--namespace`` must be a name the Hub accepts (its own validator), checked before anything runs."""
    if value is None or value == param.default:
        return value
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if "/" in value:
            raise HFValidationError("a user or org name has no '/'")
        validate_repo_id(value)
    except HFValidationError as e:
        raise click.BadParameter(f"'{value}' is not a valid Hub user or org name: {e}") from None
    return value


def namespace_option(default: str = "the token's user"):
    return click.option("--namespace", callback=valid_namespace,
                        help=f"Hub user or org to publish under. Default: {default}.")


def make_target(out_dir: Path | None, namespace: str | None, endpoint: str | None, create_pr: bool = False) -> Target:
    """``--out DIR`` (a local folder) or the Hub at ``--endpoint`` under ``--namespace``."""
    if out_dir:
        return FolderTarget(out_dir, namespace or "local")
    api = make_api(endpoint)
    return HubTarget(api, resolve_namespace(api, namespace), create_pr=create_pr, log=progress)
