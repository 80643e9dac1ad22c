"""Where hubbot keeps things: its bundled recipes and templates, and its cache between runs."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def bundled(name: str) -> Path:
    """A data folder shipped with hubbot: ``recipes`` or ``templates``.

    An installed wheel holds it inside the package (pyproject.toml maps the repo's top-level folder
    there); a source checkout, editable install or PYTHONPATH run reads the repo's own folder.
    """
    installed = PACKAGE / name
    return installed if installed.is_dir() else PACKAGE.parent / name


def cache_root() -> Path:
    """HUBBOT_CACHE, or ~/.cache/hubbot: the llama.cpp converter, tiny test models, failed reports."""
    return Path(os.environ.get("HUBBOT_CACHE", Path.home() / ".cache" / "hubbot"))
