"""publish: put a staged repo folder on the Hub in ONE commit, or into a local preview folder.

Both targets read the ``hubbot.json`` manifest already there, so that a re-run with nothing
changed builds nothing, commits nothing and uploads 0 bytes. The Hub target talks through an
injected ``HfApi`` (never the module-level helpers) and retries transient failures; a commit is
atomic on the Hub, so a failed push leaves the repo exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import PublishError, UsageError

MANIFEST = "hubbot.json"
REPORT = "validation.json"
TRANSIENT_STATUS = {429, 500, 502, 503, 504}


@dataclass
class PushResult:
    repo_id: str
    url: str
    commit: str | None = None
    pr_url: str | None = None
    bytes: int = 0
    files: int = 0
    changed: bool = True  # False: the files were identical to the repo's, no commit was made


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


class Target(Protocol):
    """Where staged repos go: the Hub (``HubTarget``) or a local folder (``FolderTarget``)."""

    namespace: str

    def describe(self, repo_id: str) -> str: ...

    def current_manifest(self, repo_id: str) -> dict[str, Any] | None: ...

    def push(self, repo_id: str, folder: Path, message: str, description: str) -> PushResult: ...


class FolderTarget:
    """``--out DIR``: each repo becomes DIR/<repo name>, exactly as it would be pushed."""

    def __init__(self, out_dir: Path, namespace: str):
        self.out_dir = Path(out_dir)
        self.namespace = namespace

    def describe(self, repo_id: str) -> str:
        return str(self.out_dir / repo_id.split("/")[1])

    def current_manifest(self, repo_id: str) -> dict[str, Any] | None:
        path = self.out_dir / repo_id.split("/")[1] / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else None

    def push(self, repo_id: str, folder: Path, message: str, description: str) -> PushResult:
        dest = self.out_dir / repo_id.split("/")[1]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.out_dir))
        shutil.copytree(folder, staging, dirs_exist_ok=True)
        old = dest.with_name(f".old-{dest.name}")
        if dest.exists():
            dest.rename(old)
        staging.rename(dest)  # the folder is swapped whole: never half old, half new
        shutil.rmtree(old, ignore_errors=True)
        files = folder_files(dest)
        return PushResult(repo_id, str(dest), bytes=sum(f.stat().st_size for f in files), files=len(files))


class HubTarget:
    """A Hub (huggingface.co or any compatible endpoint) through an injected HfApi."""

    def __init__(self, api, namespace: str, *, create_pr: bool = False, retries: int = 4,
                 log: Callable[[str], None] = lambda _: None, sleep: Callable[[float], None] = time.sleep):
        self.api = api
        self.namespace = namespace
        self.create_pr = create_pr
        self.retries = retries
        self.log = log
        self.sleep = sleep

    def describe(self, repo_id: str) -> str:
        return f"{self.api.endpoint}/{repo_id}"

    def current_manifest(self, repo_id: str) -> dict[str, Any] | None:
        from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = self._with_retries(lambda: self.api.hf_hub_download(repo_id, MANIFEST, local_dir=tmp),
                                          f"read {repo_id}/{MANIFEST}")
                return json.loads(Path(path).read_text())
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError):
            return None

    def push(self, repo_id: str, folder: Path, message: str, description: str) -> PushResult:
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        previous = self.current_manifest(repo_id)
        existed = self.api.repo_exists(repo_id)
        if not existed:
            self._with_retries(lambda: self.api.create_repo(repo_id, exist_ok=True), f"create {repo_id}")
        parent = self._with_retries(lambda: self.api.model_info(repo_id).sha, f"read {repo_id}")
        files = folder_files(folder)
        new_paths = {f.relative_to(folder).as_posix() for f in files}
        operations: list[Any] = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p))
                                 for p in sorted(new_paths)]
        stale = set((previous or {}).get("files", {})) - new_paths  # only files hubbot put there
        operations += [CommitOperationDelete(path_in_repo=p) for p in sorted(stale)]
        use_pr = self.create_pr and existed
        self.log(f"committing {len(new_paths)} files to {repo_id}" + (" as a pull request" if use_pr else ""))
        from huggingface_hub.errors import HfHubHTTPError

        try:
            info = self._with_retries(lambda: self.api.create_commit(
                repo_id, operations, commit_message=message, commit_description=description,
                create_pr=use_pr, parent_commit=None if use_pr else parent), f"commit to {repo_id}")
        except (PublishError, HfHubHTTPError):
            # A commit whose answer was lost landed anyway, and its retry then conflicts with the
            # new head (412): the manifest on the Hub tells.
            if use_pr or not self._landed(repo_id, folder):
                raise
            self.log(f"{repo_id}: the commit had landed although its answer was lost")
            info = None
        if info is not None and info.oid == parent and not info.pr_url:
            return PushResult(repo_id, f"{self.api.endpoint}/{repo_id}", commit=parent, changed=False)
        return PushResult(repo_id, f"{self.api.endpoint}/{repo_id}", commit=info.oid if info else None,
                          pr_url=info.pr_url if info else None,
                          bytes=sum(f.stat().st_size for f in files), files=len(files))

    def _landed(self, repo_id: str, folder: Path) -> bool:
        ours = json.loads((folder / MANIFEST).read_text()).get("key")
        try:
            theirs = self.current_manifest(repo_id)
        except Exception:  # noqa: BLE001 - cannot tell: report the original failure
            return False
        return bool(theirs) and theirs.get("key") == ours

    @staticmethod
    def _backoff(attempt: int) -> float:
        base = float(os.environ.get("HUBBOT_RETRY_BACKOFF", "2"))
        return min(base * 2 ** (attempt - 1), 60.0)

    def _with_retries(self, call: Callable[[], Any], what: str) -> Any:
        import httpx
        from huggingface_hub.errors import HfHubHTTPError

        for attempt in range(1, self.retries + 1):
            try:
                return call()
            except HfHubHTTPError as e:
                status = e.response.status_code if e.response is not None else None
                if status in (401, 403):
                    raise PublishError(f"{what}: the Hub refused the token (HTTP {status}); check HF_TOKEN "
                                       f"or `hf auth login`, and that it may write to '{self.namespace}'") from None
                if status not in TRANSIENT_STATUS or attempt == self.retries:
                    if status is not None and status < 500 and status != 429:
                        raise
                    raise PublishError(f"{what} failed after {attempt} attempt(s): HTTP {status}; "
                                       f"nothing was committed") from None
                delay = _retry_after(e.response) or self._backoff(attempt)
            except httpx.TransportError as e:
                if attempt == self.retries:
                    raise PublishError(f"{what} failed after {attempt} attempt(s): {type(e).__name__}; "
                                       f"nothing was committed") from None
                delay = self._backoff(attempt)
            except (OSError, RuntimeError, ValueError) as e:  # hf_xet's failures (Xet storage)
                from .xet_errors import classify_xet_error, describe_xet_error

                kind = classify_xet_error(e)
                if kind == "not-xet":
                    raise
                if kind == "permanent" or attempt == self.retries:
                    raise PublishError(f"{what} failed after {attempt} attempt(s): {describe_xet_error(e)}; "
                                       f"nothing was committed") from None
                delay = self._backoff(attempt)
            self.log(f"{what}: transient failure, retry {attempt}/{self.retries - 1} in {delay:.1f}s")
            self.sleep(delay)
        raise AssertionError("unreachable")


def _retry_after(response) -> float | None:
    try:
        return float(response.headers.get("Retry-After"))
    except (TypeError, ValueError, AttributeError):
        return None


def make_api(endpoint: str | None):
    """An HfApi for ``endpoint`` with the token from HF_TOKEN or the huggingface_hub login."""
    from huggingface_hub import HfApi, get_token

    from . import __version__

    return HfApi(endpoint=endpoint, token=get_token(), library_name="hubbot", library_version=__version__)


def resolve_namespace(api, namespace: str | None) -> str:
    if namespace:
        return namespace
    if not api.token:
        raise UsageError("no Hub token: set HF_TOKEN or run `hf auth login`, or use --out DIR to write locally")
    try:
        return api.whoami()["name"]
    except Exception as e:  # noqa: BLE001 - any failure here means the token is unusable
        raise UsageError(f"cannot tell who the token belongs to ({type(e).__name__}); "
                         f"pass --namespace or check HF_TOKEN") from None
