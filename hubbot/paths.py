"""Where hubbot keeps things between runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """HUBBOT_CACHE, or ~/.cache/hubbot: the llama.cpp converter, tiny test models, failed reports."""
    return Path(os.environ.get("HUBBOT_CACHE", Path.home() / ".cache" / "hubbot"))
