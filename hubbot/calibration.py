"""Calibration texts for importance matrices: a file in a Hub dataset repo, or one beside the recipe.

A recipe names one as ``hf://datasets/<owner>/<name>[@<revision>]/<path>`` (downloaded with
huggingface_hub, through its cache, with the user's token) or as a path relative to the recipe
file (``calibration/phi-calibration.txt`` is bundled with hubbot's own recipes).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError

HUB_PREFIX = "hf://"
HUB_DATASET = re.compile(r"^hf://datasets/(?P<repo>[^/@]+/[^/@]+)(?:@(?P<revision>[^/]+))?/(?P<path>.+)$")


@dataclass(frozen=True)
class HubText:
    repo_id: str
    revision: str | None
    path: str


def parse_calibration(spec: str) -> HubText | Path:
    """What a recipe's calibration value names; ValueError saying the accepted forms when it names neither."""
    if not spec.strip():
        raise ValueError("names no calibration text")
    if not spec.startswith(HUB_PREFIX):
        return Path(spec)
    match = HUB_DATASET.match(spec)
    if not match:
        raise ValueError(f"'{spec}' is not hf://datasets/<owner>/<name>[@<revision>]/<path> "
                         "(a file in a Hub dataset repo) nor a local path")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(match["repo"])
    except HFValidationError as e:
        raise ValueError(f"'{spec}': {e}") from None
    return HubText(match["repo"], match["revision"], match["path"])


def calibration_file(spec: str, recipe_dir: Path) -> Path:
    """The calibration text on this machine: downloaded from the Hub, or the local file."""
    where = parse_calibration(spec)
    if isinstance(where, Path):
        path = where if where.is_absolute() else recipe_dir / where
        if not path.is_file():
            raise BuildError(f"calibration text {spec!r} not found (looked for {path})")
        return path
    return _download(where, spec)


def _download(text: HubText, spec: str) -> Path:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .hub import reaching
    from .publish import make_api

    # the endpoint and cache as the environment says now (huggingface_hub read them when it was imported)
    api = make_api(os.environ.get("HF_ENDPOINT"))
    try:
        with reaching(api.endpoint, f"download the calibration text {spec}"):
            return Path(api.hf_hub_download(text.repo_id, text.path, repo_type="dataset", revision=text.revision,
                                            cache_dir=os.environ.get("HF_HUB_CACHE")))
    except RepositoryNotFoundError:
        reason = f"the dataset repo {text.repo_id} does not exist or is private (is HF_TOKEN set?)"
    except RevisionNotFoundError:
        reason = f"the dataset repo {text.repo_id} has no revision {text.revision!r}"
    except EntryNotFoundError:
        reason = f"the dataset repo {text.repo_id} has no file {text.path!r}"
    except HfHubHTTPError as e:
        reason = f"the Hub answered {e.response.status_code if e.response is not None else 'an error'}"
    raise BuildError(f"could not download the calibration text {spec}: {reason}")
