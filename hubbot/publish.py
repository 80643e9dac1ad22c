"""publish: put a staged repo folder on the Hub in ONE commit, or into a local preview folder.

Both targets read the ``hubbot.json`` manifest already there, so that a re-run with nothing
changed builds nothing, commits nothing and uploads 0 bytes. The Hub target talks through an
injected ``HfApi`` (never the module-level helpers) and retries transient failures; a commit is
atomic on the Hub, so a failed push leaves the repo exactly as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from .errors import HubbotError, HubUnreachable, PublishError, UsageError
from .hub import cause, fresh_client, install_client, reaching, transport_failure, underlying, unreachable
from .xet_errors import classify_xet_error, describe_xet_error

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
    up_to_date: bool = False  # the repo already held this build when hubbot came to commit (another run's)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@dataclass(frozen=True)
class Blob:
    """A file already in the target repo's LFS/Xet storage (pre-uploaded by a build job), not yet committed."""

    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size}


Preuploaded = Mapping[str, Blob]  # path in the repo -> its pre-uploaded blob


class Target(Protocol):
    """Where staged repos go: the Hub (``HubTarget``) or a local folder (``FolderTarget``)."""

    namespace: str

    def describe(self, repo_id: str) -> str: ...

    def current_manifest(self, repo_id: str) -> dict[str, Any] | None: ...

    def push(self, repo_id: str, folder: Path, message: str, description: str,
             preuploaded: Preuploaded | None = None) -> PushResult: ...


class FolderTarget:
    """``--out DIR``: each repo becomes DIR/<repo name>, exactly as it would be pushed.

    A push copies the repo into ``DIR/.staging-*``, then swaps it in with two renames (the old
    folder to ``DIR/.old-<name>``, the staging folder to ``DIR/<name>``), so the folder is never
    half old, half new. A run killed on the way leaves one of those behind; the next run, before
    it reads or writes anything, removes staging folders and puts a ``.old-`` folder back where
    its repo folder is missing (killed between the renames) or removes it where it is not. All of
    it happens under a lock on DIR (``flock``, released by the kernel when its holder dies), so a
    concurrent run never sees, or cleans up, another's half-done swap.
    """

    STAGING = ".staging-"
    OLD = ".old-"

    def __init__(self, out_dir: Path, namespace: str):
        self.out_dir = Path(out_dir)
        self.namespace = namespace

    def describe(self, repo_id: str) -> str:
        return str(self._dest(repo_id))

    def current_manifest(self, repo_id: str) -> dict[str, Any] | None:
        if self.out_dir.is_dir():
            with self._locked():
                self._recover()
        path = self._dest(repo_id) / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else None

    def push(self, repo_id: str, folder: Path, message: str, description: str,
             preuploaded: Preuploaded | None = None) -> PushResult:
        if preuploaded:
            raise UsageError(f"{repo_id}: {', '.join(sorted(preuploaded))} were pre-uploaded to the Hub by the build "
                             f"jobs and are not here; publish to the Hub (no --out), or build without --preupload")
        dest = self._dest(repo_id)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._recover()
            staging = Path(tempfile.mkdtemp(prefix=self.STAGING, dir=self.out_dir))
            try:
                copy_files(folder, staging)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            old = self.out_dir / f"{self.OLD}{dest.name}"
            if dest.exists():
                dest.rename(old)
            staging.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        files = folder_files(dest)
        return PushResult(repo_id, str(dest), bytes=sum(f.stat().st_size for f in files), files=len(files))

    def _dest(self, repo_id: str) -> Path:
        return self.out_dir / repo_id.split("/")[1]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.out_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _recover(self) -> None:
        """Undo what a killed push left behind (call with the lock held: no live push is half done)."""
        for staging in self.out_dir.glob(f"{self.STAGING}*"):
            shutil.rmtree(staging, ignore_errors=True)
        for old in self.out_dir.glob(f"{self.OLD}*"):
            dest = self.out_dir / old.name.removeprefix(self.OLD)
            if dest.exists():
                shutil.rmtree(old, ignore_errors=True)  # the new folder was in place
            else:
                old.rename(dest)  # killed between the renames: the previous folder comes back


def copy_files(src: Path, dest: Path) -> None:
    """Copy every file of ``src`` into ``dest``; a failed write raises its own OSError (ENOSPC included)."""
    for f in folder_files(src):
        target = dest / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)


CONFLICT_STATUS = {409, 412}  # 412: the branch moved since parent_commit; 409: another write holds the repo


@dataclass(frozen=True)
class _Landed:
    """A commit (or pull request) that is on the Hub, whether its answer came back or was checked after."""

    oid: str
    pr_url: str | None = None


class _Conflict(Exception):
    """Someone else committed after hubbot read the repo: re-read it and decide again."""


class HubTarget:
    """A Hub (huggingface.co or any compatible endpoint) through an injected HfApi.

    Every commit carries the commit it was planned on (``parent_commit``): a concurrent commit makes the
    Hub refuse it (412), and hubbot re-reads the repo and decides again instead of overwriting. A commit
    whose answer was lost (a timeout, a dropped connection, a 5xx) is checked on the Hub before anything
    is said or retried: committed, not committed, or unknown when the Hub cannot be reached to check.
    """

    def __init__(self, api, namespace: str, *, create_pr: bool = False, retries: int = 4, conflicts: int = 3,
                 log: Callable[[str], None] = lambda _: None, sleep: Callable[[float], None] = time.sleep):
        self.api = api
        self.namespace = namespace
        self.create_pr = create_pr
        self.retries = retries
        self.conflicts = conflicts
        self.log = log
        self.sleep = sleep

    def describe(self, repo_id: str) -> str:
        return f"{self.api.endpoint}/{repo_id}"

    def current_manifest(self, repo_id: str, revision: str | None = None) -> dict[str, Any] | None:
        """The repo's hubbot.json (at ``revision``, default main), or None when the repo, the revision or
        the file does not exist. A Hub that cannot be reached raises, never reads as "no manifest"."""
        from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            # the head first, with hubbot's retries: a Hub that is down fails here in seconds, where
            # hf_hub_download would retry for half a minute each time
            revision = revision or self._head(repo_id)
            with tempfile.TemporaryDirectory() as tmp:
                path = self._with_retries(
                    lambda: self.api.hf_hub_download(repo_id, MANIFEST, revision=revision, local_dir=tmp),
                    f"read {repo_id}/{MANIFEST}", attempts=1)  # it retries failed connections and 5xx itself
                return json.loads(Path(path).read_text())
        except (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError):
            return None

    def push(self, repo_id: str, folder: Path, message: str, description: str,
             preuploaded: Preuploaded | None = None) -> PushResult:
        """Commit every file of ``folder``, and the ``preuploaded`` blobs at their paths, in ONE commit."""
        preuploaded = dict(preuploaded or {})
        existed = self._ensure_repo(repo_id)
        use_pr = self.create_pr and existed
        ours = json.loads((folder / MANIFEST).read_text()).get("key")
        files = folder_files(folder)
        url = f"{self.api.endpoint}/{repo_id}"
        for conflict in range(self.conflicts + 1):
            parent = self._head(repo_id)
            previous = self.current_manifest(repo_id, revision=parent)  # planned on exactly this commit
            if conflict and previous and previous.get("key") == ours:
                self.log(f"{repo_id}: the commit now on main ({parent[:12]}) holds this very build; nothing to do")
                return PushResult(repo_id, url, commit=parent, changed=False, up_to_date=True)
            operations = _operations(folder, files, previous, preuploaded, self._remote_sha256(repo_id, preuploaded,
                                                                                               parent))
            where = " as a pull request" if use_pr else f" on {parent[:12]}"
            self.log(f"committing {len(files) + len(preuploaded)} files to {repo_id}{where}")
            try:
                landed = self._commit(repo_id, operations, message, description, parent, use_pr, ours)
            except _Conflict as e:
                if conflict == self.conflicts:
                    break
                self.log(f"{repo_id}: {e}; re-reading the repo and deciding again ({conflict + 1}/{self.conflicts})")
                continue
            if landed.oid == parent and not landed.pr_url:
                return PushResult(repo_id, url, commit=parent, changed=False)
            return PushResult(repo_id, url, commit=landed.oid, pr_url=landed.pr_url,
                              bytes=sum(f.stat().st_size for f in files) + sum(b.size for b in preuploaded.values()),
                              files=len(files) + len(preuploaded))
        raise PublishError(f"commit to {repo_id}: other commits kept landing on main while hubbot committed "
                           f"({self.conflicts + 1} tries, each refused by the Hub as planned on an old commit); "
                           f"nothing of this build was committed; run again")

    def _remote_sha256(self, repo_id: str, preuploaded: Preuploaded, revision: str) -> dict[str, str]:
        """The sha256 of the files at ``revision`` where pre-uploaded blobs go, so that huggingface_hub
        leaves an unchanged one out of the commit as it does for the files it uploads itself (it
        compares ``_remote_oid`` with the local one; only its own pre-upload call sets that)."""
        if not preuploaded:
            return {}
        infos = self._with_retries(lambda: self.api.get_paths_info(repo_id, sorted(preuploaded), revision=revision),
                                   f"read the files of {repo_id} at {revision[:12]}")
        return {f.path: f.lfs.sha256 for f in infos if getattr(f, "lfs", None)}

    def _ensure_repo(self, repo_id: str) -> bool:
        """Create the repo when it is missing; whether it existed."""
        existed = self._with_retries(lambda: self.api.repo_exists(repo_id), f"read {repo_id}")
        if not existed:
            self._with_retries(lambda: self.api.create_repo(repo_id, exist_ok=True), f"create {repo_id}")
        return existed

    def preupload(self, repo_id: str, folder: Path, paths: list[str]) -> dict[str, Blob]:
        """Upload the LFS/Xet files among ``paths`` (relative to ``folder``) to the repo's storage WITHOUT
        committing (huggingface_hub's ``preupload_lfs_files``); a later ``push(..., preuploaded=)`` commits
        them. The Hub decides which files are LFS; the small ones it would take inline are left out of the
        answer (they must travel with the commit itself)."""
        from huggingface_hub import CommitOperationAdd

        self._ensure_repo(repo_id)

        def upload() -> list[CommitOperationAdd]:
            additions = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p)) for p in paths]
            self.api.preupload_lfs_files(repo_id, additions=additions)
            return additions

        additions = self._with_retries(upload, f"pre-upload to {repo_id}")
        return {a.path_in_repo: Blob(a.upload_info.sha256.hex(), a.upload_info.size) for a in additions
                if a._upload_mode == "lfs" and a._is_uploaded and not a._should_ignore}

    def _head(self, repo_id: str) -> str:
        return self._with_retries(lambda: self.api.model_info(repo_id).sha, f"read {repo_id}")

    def _commit(self, repo_id: str, operations: list, message: str, description: str, parent: str, use_pr: bool,
                ours: str | None) -> _Landed:
        """One commit on ``parent``, retried while it is known not to have landed."""
        from huggingface_hub.errors import HfHubHTTPError

        what = f"commit to {repo_id}"
        for attempt in range(1, self.retries + 1):
            try:
                info = self.api.create_commit(repo_id, operations, commit_message=message,
                                              commit_description=description, create_pr=use_pr,
                                              parent_commit=None if use_pr else parent)
                return _Landed(info.oid, info.pr_url)
            except Exception as e:  # noqa: BLE001 - sorted below; anything unknown is re-raised
                if classify_xet_error(e) != "not-xet":  # the files' upload, which comes before the commit
                    self._xet_failure(what, e, attempt, self.retries)
                    continue
                error = underlying(e)
                status = _status(error) if isinstance(error, HfHubHTTPError) else None
                if status is None and transport_failure(e) is None:
                    raise
                if status in CONFLICT_STATUS and not use_pr:
                    raise _Conflict(f"another commit landed on main after {parent[:12]} (HTTP {status})") from None
                if status is not None and status not in TRANSIENT_STATUS:
                    raise self._refused(what, error, status) from None
            reason = f"HTTP {status}" if status else cause(error)
            if _may_have_landed(error, status):
                landed = self._check(repo_id, parent, ours, use_pr, message, what, reason)
                if landed:
                    return landed
                known = f"checked afterwards: nothing was committed ({repo_id} is still at {parent[:12]})"
            elif _phase(error) != "commit":
                known = f"it failed at the {_phase(error)} step, before the commit was sent: nothing was committed"
            else:
                known = "the commit never reached the Hub: nothing was committed"
            if attempt == self.retries:
                if isinstance(error, NOT_SENT):
                    raise HubUnreachable(f"{what}: cannot reach the Hub at {self.api.endpoint} ({attempt} "
                                         f"attempt(s)): {reason}; {known}")
                raise PublishError(f"{what} failed after {attempt} attempt(s): {reason}; {known}")
            delay = _retry_after(error.response) if status == 429 else None
            self._pause(what, attempt, reason, delay, fresh=status is None)
        raise AssertionError("unreachable")

    def _check(self, repo_id: str, parent: str, ours: str | None, use_pr: bool, message: str, what: str,
               reason: str) -> _Landed | None:
        """After a commit whose answer was lost: did it land? _Landed, None (it did not), or raises
        _Conflict (someone else's commit is there) or PublishError (the Hub cannot tell us)."""
        self.log(f"{what}: {reason}; checking whether it landed")
        try:
            if use_pr:
                landed = self._find_pr(repo_id, message, ours)
            else:
                head = self._head(repo_id)
                if head == parent:
                    landed = None
                else:
                    theirs = self.current_manifest(repo_id, revision=head)
                    if not theirs or theirs.get("key") != ours:
                        raise _Conflict(f"main moved from {parent[:12]} to {head[:12]}, and not by this commit")
                    landed = _Landed(head)
        except HubbotError as e:
            where = "pull request was opened" if use_pr else "commit landed"
            raise PublishError(f"{what}: {reason}; whether the {where} is unknown, as checking failed: {e}. "
                               f"See {self.api.endpoint}/{repo_id}/commits/main, or run again: hubbot re-reads "
                               f"the repo first") from None
        if landed is None:
            self.log(f"{what}: checked, it did not land ({repo_id} is still at {parent[:12]})")
        else:
            self.log(f"{repo_id}: the commit had landed although its answer was lost ({reason}); the Hub holds "
                     f"this build at " + (landed.pr_url or landed.oid[:12]))
        return landed

    def _find_pr(self, repo_id: str, message: str, ours: str | None) -> _Landed | None:
        """An open pull request titled ``message`` whose hubbot.json records this build."""
        listed = self._with_retries(
            lambda: list(self.api.get_repo_discussions(repo_id, discussion_type="pull_request")),
            f"list {repo_id}'s pull requests")
        prs = [d for d in listed if d.status in ("open", "draft") and d.title == message]
        for pr in sorted(prs, key=lambda d: d.num, reverse=True):
            ref = pr.git_reference
            theirs = self.current_manifest(repo_id, revision=ref)
            if theirs and theirs.get("key") == ours:
                head = self._with_retries(lambda ref=ref: self.api.model_info(repo_id, revision=ref).sha,
                                          f"read {repo_id}@{ref}")
                return _Landed(head, f"{self.api.endpoint}/{repo_id}/discussions/{pr.num}")
        return None

    def _refused(self, what: str, error, status: int) -> HubbotError:
        if status in (401, 403):
            return PublishError(f"{what}: the Hub refused the token (HTTP {status}); check HF_TOKEN or "
                                f"`hf auth login`, and that it may write to '{self.namespace}'")
        detail = (getattr(error, "server_message", None) or "").strip().splitlines()
        return PublishError(f"{what}: the Hub refused it (HTTP {status}" + (f": {detail[0]})" if detail else ")"))

    def _pause(self, what: str, attempt: int, reason: str, delay: float | None, fresh: bool) -> None:
        delay = self._backoff(attempt) if delay is None else delay
        if fresh:
            fresh_client()  # a broken connection or TLS session is not reused
        self.log(f"{what}: {reason}; retry {attempt}/{self.retries - 1} in {delay:.1f}s")
        self.sleep(delay)

    def _xet_failure(self, what: str, error: BaseException, attempt: int, attempts: int) -> None:
        """hf_xet failed uploading (or reading) files through Xet storage: pause before the next
        attempt when a retry may help, else raise PublishError. The upload comes before the commit
        request, so nothing was committed."""
        reason = describe_xet_error(error)
        if classify_xet_error(error) == "permanent" or attempt == attempts:
            raise PublishError(f"{what} failed after {attempt} attempt(s): {reason}; nothing was committed") from None
        self._pause(what, attempt, reason, None, fresh=False)

    @staticmethod
    def _backoff(attempt: int) -> float:
        base = float(os.environ.get("HUBBOT_RETRY_BACKOFF", "2"))
        return min(base * 2 ** (attempt - 1), 60.0)

    def _with_retries(self, call: Callable[[], Any], what: str, attempts: int | None = None) -> Any:
        """``call`` (a read, or an idempotent write), tried up to ``attempts`` (default: ``retries``) times
        on rate limits, 5xx and connection failures. Answers the caller must see (not found, conflicts) are
        re-raised as they are."""
        from huggingface_hub.errors import (
            HfHubHTTPError,
            RemoteEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        attempts = attempts or self.retries

        for attempt in range(1, attempts + 1):
            try:
                return call()
            except Exception as e:  # noqa: BLE001 - sorted below; anything unknown is re-raised
                error = underlying(e)
                if isinstance(error, HfHubHTTPError):
                    status = _status(error)
                    if isinstance(error, (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError)) \
                            or status in CONFLICT_STATUS:
                        raise error from None
                    if status not in TRANSIENT_STATUS:
                        raise self._refused(what, error, status) from None
                    if attempt == attempts:
                        raise PublishError(f"{what} failed after {attempt} attempt(s): HTTP {status}") from None
                    self._pause(what, attempt, f"HTTP {status}", _retry_after(error.response), fresh=False)
                elif transport_failure(e) is not None:
                    if attempt == attempts:
                        raise unreachable(e, self.api.endpoint, f"{what} ({attempt} attempt(s))") from None
                    self._pause(what, attempt, cause(transport_failure(e)), None, fresh=True)
                elif classify_xet_error(e) != "not-xet":
                    self._xet_failure(what, e, attempt, attempts)
                else:
                    raise
        raise AssertionError("unreachable")


def _operations(folder: Path, files: list[Path], previous: dict[str, Any] | None,
                preuploaded: Preuploaded | None = None, remote_sha256: Mapping[str, str] | None = None) -> list:
    """Add every staged file and every pre-uploaded blob; delete the files the previous hubbot.json lists
    that this build no longer has (only files hubbot put there). ``remote_sha256``: what the repo holds
    at the pre-uploaded paths."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    staged = {f.relative_to(folder).as_posix() for f in files}
    preuploaded = preuploaded or {}
    new_paths = staged | set(preuploaded)
    operations: list[Any] = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p))
                             if p in staged else _preuploaded_addition(p, preuploaded[p], (remote_sha256 or {}).get(p))
                             for p in sorted(new_paths)]
    stale = set((previous or {}).get("files", {})) - new_paths
    return operations + [CommitOperationDelete(path_in_repo=p) for p in sorted(stale)]


def _preuploaded_addition(path: str, blob: Blob, remote_sha256: str | None = None):
    """A CommitOperationAdd for a blob already in the repo's storage, marked the way huggingface_hub's
    ``preupload_lfs_files`` leaves its operations (uploaded, LFS, content freed): create_commit then sends
    only its ``lfsFile`` line (path, sha256, size), and the Hub refuses the commit (422) when the blob is
    not in that repo's storage."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.lfs import UploadInfo

    addition = CommitOperationAdd(path_in_repo=path, path_or_fileobj=b"")
    addition.upload_info = UploadInfo(size=blob.size, sample=b"", sha256=bytes.fromhex(blob.sha256))
    addition._upload_mode = "lfs"
    addition._is_uploaded = True
    addition._remote_oid = remote_sha256  # equal to the blob's: huggingface_hub drops it as unchanged
    return addition


def _status(error) -> int | None:
    return error.response.status_code if getattr(error, "response", None) is not None else None


NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)  # no connection: no byte went out


def _may_have_landed(error, status: int | None) -> bool:
    """Whether a failed create_commit may have changed the repo: only its commit request can, and only
    when it was sent and not turned away (429)."""
    return _phase(error) == "commit" and status != 429 and not isinstance(error, NOT_SENT)


def _phase(error) -> str:
    """Which step of create_commit a failed request belongs to (only "commit" may have changed the repo)."""
    try:
        request = error.response.request if getattr(error, "response", None) is not None else error.request
        path = request.url.path
    except (AttributeError, RuntimeError):
        return "commit"  # cannot tell: assume the worst
    for marker, phase in (("/commit/", "commit"), ("/preupload/", "preupload"), ("/info/lfs/", "LFS upload"),
                          ("/validate-yaml", "card check"), ("xet", "Xet upload")):
        if marker in path:
            return phase
    return "upload"


def _retry_after(response) -> float | None:
    try:
        return float(response.headers.get("Retry-After"))
    except (TypeError, ValueError, AttributeError):
        return None


def make_api(endpoint: str | None):
    """An HfApi for ``endpoint`` with the token from HF_TOKEN or the huggingface_hub login, whose every call
    has a timeout (``hubbot.hub``)."""
    from huggingface_hub import HfApi, get_token

    from . import __version__

    install_client()
    return HfApi(endpoint=endpoint, token=get_token(), library_name="hubbot", library_version=__version__)


def resolve_namespace(api, namespace: str | None) -> str:
    if namespace:
        return namespace
    if not api.token:
        raise UsageError("no Hub token: set HF_TOKEN or run `hf auth login`, or use --out DIR to write locally")
    try:
        with reaching(api.endpoint, "who is the token's owner"):
            return api.whoami()["name"]
    except HubUnreachable:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here means the token is unusable
        raise UsageError(f"cannot tell who the token belongs to ({type(e).__name__}); "
                         f"pass --namespace or check HF_TOKEN") from None
