"""The `hubbot` command: one module per command group, shared helpers in _output."""

from __future__ import annotations

from pathlib import Path

import click

from .. import __version__
from ..recipe import load_families, recipes_dir
from . import build, plan, publish, recipes, reference, status, watch
from ._output import install_progress


class Context:
    def __init__(self, recipes_path: Path | None):
        self.recipes_path = recipes_path

    def families(self):
        return load_families(self.recipes_path)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="hubbot")
@click.option("--recipes-dir", type=click.Path(file_okay=False, path_type=Path), envvar="HUBBOT_RECIPES_DIR",
              default=None, help=f"Folder of family recipe files (*.yaml). Default: {recipes_dir()}")
@click.pass_context
def main(ctx: click.Context, recipes_dir: Path | None) -> None:
    """Turn releases of a model family into validated, quantized variants on the Hugging Face Hub.

    \b
    Typical use:
      hubbot recipes list
      hubbot plan phi-4 --recipe edge
      hubbot publish ./examples/tiny-phi3 --recipe edge --out ./hub-preview
      hubbot publish phi-4 --recipe edge          # needs HF_TOKEN or `hf auth login`
      hubbot watch --once                         # publish every new release, then `hubbot status`
    """
    install_progress()
    ctx.obj = Context(recipes_dir)


main.add_command(recipes.recipes)
main.add_command(plan.plan)
main.add_command(build.build)
main.add_command(reference.reference)
main.add_command(publish.publish)
main.add_command(watch.watch)
main.add_command(status.status)
