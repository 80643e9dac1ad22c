"""A small Hugging Face Hub-compatible HTTP server for tests (stdlib, plus hf_xet to check Xet file hashes).

The real ``huggingface_hub`` client talks to it on 127.0.0.1; pass ``endpoint=hub.url`` to ``HfApi``.
It implements the subset of the Hub API in ``shared/hub-protocol.md``: repos, the LFS upload protocol
(preupload -> batch -> PUT -> verify -> NDJSON commit), refs, trees, commits, discussions and pull
requests, ``resolve`` downloads (Range, X-Repo-Commit, ETag/X-Linked-*), model listing with ``Link``
paging, and collections. And Xet, as the Hub speaks it to hf_xet:

- ``GET /api/{type}s/{repo}/xet-write-token/{rev}`` (``rev`` "None" with ``?create_pr=1`` when the client
  opens a pull request) and ``xet-read-token/{rev}``: ``{"accessToken", "exp", "casUrl"}`` in JSON and
  the ``X-Xet-Cas-Url`` / ``X-Xet-Access-Token`` / ``X-Xet-Token-Expiration`` headers; the write token
  follows the upload rules, the read token the read rules (private, gated);
- a CAS (tests/hubserver_xet.py, formats in tests/hubserver_xetformat.py) under ``/cas`` on the same
  server: xorb and shard upload, global deduplication, file reconstruction and signed xorb fetches.
  A shard registers its files for the token's repo; their content then commits as ``lfsFile`` by
  sha256, and the files carry ``xetHash`` in tree/paths-info answers and ``X-Xet-Hash`` + a
  ``Link: <xet-read-token>; rel="xet-auth"`` on ``resolve``, so downloads go through the CAS too.
  The client chooses Xet by itself (hf_xet installed, ``HF_HUB_DISABLE_XET`` unset); the server serves
  both paths at once, as the Hub does. Files given to ``seed_repo`` are plain LFS (like repos from
  before Xet). ``FakeHub(xet=False)`` is a Hub without Xet: its token routes answer 404.

    with FakeHub(users={"alice": "hf_alice"}, orgs={"alice": ["phi-org"]}) as hub:
        api = HfApi(endpoint=hub.url, token="hf_alice")
        hub.inject(method="POST", path=r"/commit/", status=500, times=1)

Closer to the Hub than a plain store: uploaded LFS objects (and Xet files) belong to the repo they
were uploaded to, so another repo's preupload/batch does not see them as present; repo ids are
looked up case-insensitively and keep their casing; ``read_tokens`` gives users read-only tokens,
which get 403 on every write (message ours); a file over ``max_file_size`` (default the Hub's 50 GB)
is refused at preupload (400) and in the LFS batch (per-object error 422), with the Hub's wording
"Maximum individual file size is 50.0GB".

State lives in memory; every handler runs under one lock, and a commit builds its whole new tree
before swapping it in, so a commit lands completely or not at all. An injected fault answers before
the handler runs (so it changes nothing) unless ``after=True``; faults match CAS routes too.

Like the Hub: every new repo starts with an "initial commit" holding ``.gitattributes``;
``model_info`` lists sibling sizes/blob ids only with ``files_metadata=True``; private repos answer
RepoNotFound (401 anonymous, 404 signed in) to outsiders; gated repos answer GatedRepo on resolve.

Counters: ``requests`` holds ``(method, raw target incl. query, status)``, status 0 for a dropped
connection. ``bytes_uploaded`` counts file content received: LFS PUT bodies that passed the sha256
check, xorb bodies the CAS accepted, and the decoded regular-file contents of commits that landed.
``bytes_downloaded`` maps ``repo_id/path`` to the body bytes ``resolve`` GETs sent of it (a ranged
read counts only its range); Xet downloads are counted by ``hub.cas`` (see hubserver_xet).
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import socket
import sys
import threading
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode

from tests.hubserver_xet import LocalCAS

LFS_THRESHOLD = 10 * 1024 * 1024  # regular files must stay below this
LFS_SUFFIXES = (".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gguf", ".gz", ".h5", ".joblib",
                ".mlmodel", ".model", ".msgpack", ".npy", ".npz", ".onnx", ".ot", ".parquet", ".pb",
                ".pickle", ".pkl", ".pt", ".pth", ".rar", ".safetensors", ".tar", ".tflite", ".tgz",
                ".wasm", ".xz", ".zip", ".zst")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
MAX_FILE_SIZE = 50 * 1000 ** 3  # the Hub's hard limit per file
# handlers that change state: a read-only token gets 403 on them (and on xet-write-token)
WRITE_HANDLERS = {"create_repo", "delete_repo", "settings", "preupload", "commit", "lfs_batch", "lfs_verify",
                  "create_branch", "delete_branch", "create_tag", "delete_tag", "create_discussion",
                  "discussion_action", "create_collection", "delete_collection", "add_collection_item"}


def repo_key(repo_type: str, repo_id: str) -> tuple[str, str]:
    """How repos are looked up: the Hub treats repo ids case-insensitively (and keeps their casing)."""
    return repo_type, repo_id.lower()


# ----------------------------------------------------------------------------- helpers
def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_binary(sample: bytes) -> bool:
    if b"\0" in sample:
        return True
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as e:  # a multi-byte char cut at the end of the sample is fine
        return not (e.reason == "unexpected end of data" and e.start >= len(sample) - 3)
    return False


def wants_lfs(path: str, size: int, sample: bytes) -> bool:
    """The Hub's rule (approximated): binary content, >= 10 MiB, or an LFS extension."""
    if size == 0:
        return False
    return size >= LFS_THRESHOLD or _is_binary(sample[:512]) or path.lower().endswith(LFS_SUFFIXES)


def _scalar(v: str):
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        return v[1:-1]
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("null", "~", ""):
        return None
    return int(v) if re.fullmatch(r"-?\d+", v) else v


def parse_front_matter(text: str) -> dict | None:
    """Parse a README's YAML front matter when it is simple (scalars and lists); nested keys are dropped.
    Returns None without front matter; raises ValueError when it is not closed."""
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        raise ValueError("front matter is not closed by '---'") from None
    data: dict = {}
    complex_keys: set[str] = set()
    key = None
    for line in lines[1:end]:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t-":
            item = line.strip()
            if key and item.startswith("- ") and isinstance(data.get(key), list) and ":" not in item:
                data[key].append(_scalar(item[2:]))
            elif key:
                complex_keys.add(key)
            continue
        key, _, value = (s.strip() for s in line.partition(":"))
        if value.startswith("[") and value.endswith("]"):
            data[key] = [_scalar(x) for x in value[1:-1].split(",") if x.strip()]
        else:
            data[key] = [] if value == "" else _scalar(value)
    return {k: v for k, v in data.items() if k not in complex_keys}


@dataclass(frozen=True)
class Blob:
    """One file in a tree. ``oid`` is the git blob id (of the pointer file for LFS files); ``xet_hash``
    is set for LFS files whose content was uploaded through Xet (the CAS can reconstruct them)."""
    data: bytes
    lfs: bool
    oid: str
    sha256: str | None
    xet_hash: str | None = field(default=None, compare=False)

    @classmethod
    def make(cls, data: bytes, lfs: bool, xet_hash: str | None = None) -> Blob:
        sha = hashlib.sha256(data).hexdigest() if lfs else None
        return cls(data, lfs, _git_oid(cls.pointer(sha, len(data)) if lfs else data), sha, xet_hash if lfs else None)

    @staticmethod
    def pointer(sha: str, size: int) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {size}\n".encode()

    @property
    def size(self) -> int:
        return len(self.data)

    def entry(self, path: str) -> dict:
        e = {"type": "file", "oid": self.oid, "size": self.size, "path": path}
        if self.lfs:
            e["lfs"] = {"oid": self.sha256, "size": self.size,
                        "pointerSize": len(self.pointer(self.sha256, self.size))}
        if self.xet_hash:
            e["xetHash"] = self.xet_hash
        return e


@dataclass
class Commit:
    oid: str
    title: str
    description: str
    tree: dict[str, Blob]
    parent: str | None
    date: datetime
    author: str

    @property
    def files(self) -> dict[str, bytes]:
        return {p: b.data for p, b in self.tree.items()}


@dataclass
class Discussion:
    num: int
    title: str
    author: str
    is_pr: bool
    created_at: datetime
    status: str = "open"
    events: list = field(default_factory=list)
    head: str | None = None        # PR only: commit at refs/pr/N
    base_branch: str = "main"
    base_oid: str | None = None    # PR only: base branch head when the PR was opened
    merge_oid: str | None = None

    @property
    def ref(self) -> str | None:
        return f"refs/pr/{self.num}" if self.is_pr else None


@dataclass
class PullRequest:
    """Snapshot returned by FakeHub.pull_requests()."""
    num: int
    title: str
    ref: str
    status: str
    author: str
    files: dict[str, bytes]


@dataclass
class Repo:
    type: str
    id: str
    private: bool = False
    gated: bool | str = False
    license: str | None = None
    tags: list = field(default_factory=list)
    created_at: datetime = field(default_factory=_now)
    last_modified: datetime = field(default_factory=_now)
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tag_refs: dict[str, str] = field(default_factory=dict)
    discussions: dict[int, Discussion] = field(default_factory=dict)
    access: set = field(default_factory=set)  # users granted access to a gated repo
    downloads: int = 0
    likes: int = 0

    @property
    def namespace(self) -> str:
        return self.id.split("/")[0]

    @property
    def prefix(self) -> str:
        return PREFIXES[self.type]

    def chain(self, oid: str | None):
        while oid is not None:
            yield self.commits[oid]
            oid = self.commits[oid].parent


@dataclass
class Fault:
    method: str | None
    path: re.Pattern
    status: int | None = None
    retry_after: int | None = None
    drop: bool = False
    times: int = 1
    skip: int = 0
    after: bool = False  # let the handler run (state changes), then fault the response
    seen: int = 0
    fired: int = 0


def take_fault(faults: list, method: str, target: str):
    """The first fault matching ``method`` and ``target`` that is due (past its ``skip``, within its
    ``times``), counted as fired; None when none is. Shared with tests/faultproxy.py."""
    for f in faults:
        if f.method in (None, method) and f.path.search(target):
            f.seen += 1
            if f.seen > f.skip and f.fired < f.times:
                f.fired += 1
                return f
    return None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.extra = status, message, code, headers or {}, extra

    def response(self):
        headers = {"X-Error-Message": self.message.encode("ascii", "replace").decode(), **self.headers}
        if self.code:
            headers["X-Error-Code"] = self.code
        return _json({"error": self.message, **self.extra}, self.status, headers)


def _json(obj, status: int = 200, headers: dict | None = None, content_type: str = "application/json"):
    return status, {"Content-Type": f"{content_type}; charset=utf-8", **(headers or {})}, json.dumps(obj).encode()


@dataclass
class Req:
    method: str
    path: str                 # raw path, no query
    params: dict[str, str]    # route groups, unquoted
    query: dict[str, list[str]]
    body: bytes
    user: str | None
    headers: dict = field(default_factory=dict)
    may_write: bool = False   # the token's role is "write"

    def q(self, key: str, default=None):
        return self.query.get(key, [default])[0]

    def flag(self, key: str) -> bool:
        return str(self.q(key, "")).lower() in ("1", "true", "yes")

    def json(self) -> dict:
        return json.loads(self.body) if self.body.strip() else {}


# ----------------------------------------------------------------------------- routes (as data)
_R = r"/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
_P = r"/(?:(?P<prefix>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)"
ROUTES = [(m, re.compile(p), h) for m, p, h in [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("DELETE", r"/api/repos/delete", "delete_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", r"/api/(?P<type>models|datasets|spaces)", "list_repos"),
    ("POST", r"/api/collections", "create_collection"),
    ("GET", r"/api/collections/(?P<slug>[^/]+/[^/]+)", "get_collection"),
    ("DELETE", r"/api/collections/(?P<slug>[^/]+/[^/]+)", "delete_collection"),
    ("POST", r"/api/collections/(?P<slug>[^/]+/[^/]+)/items", "add_collection_item"),
    ("PUT", _R + r"/settings", "settings"),
    ("GET", _R + r"(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("POST", _R + r"/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", _R + r"/commit/(?P<rev>[^/]+)", "commit"),
    ("GET", _R + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
    ("POST", _R + r"/paths-info/(?P<rev>[^/]+)", "paths_info"),
    ("GET", _R + r"/refs", "refs"),
    ("GET", _R + r"/commits/(?P<rev>[^/]+)", "list_commits"),
    ("POST", _R + r"/branch/(?P<branch>[^/]+)", "create_branch"),
    ("DELETE", _R + r"/branch/(?P<branch>[^/]+)", "delete_branch"),
    ("POST", _R + r"/tag/(?P<rev>[^/]+)", "create_tag"),
    ("DELETE", _R + r"/tag/(?P<tag>[^/]+)", "delete_tag"),
    ("GET", _R + r"/discussions", "list_discussions"),
    ("POST", _R + r"/discussions", "create_discussion"),
    ("GET", _R + r"/discussions/(?P<num>\d+)", "get_discussion"),
    ("POST", _R + r"/discussions/(?P<num>\d+)/(?P<action>comment|status|merge)", "discussion_action"),
    ("POST", _P + r"\.git/info/lfs/objects/batch", "lfs_batch"),
    ("POST", _P + r"\.git/info/lfs/objects/verify", "lfs_verify"),
    ("PUT", r"/lfs-upload/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)/(?P<oid>[0-9a-f]{64})", "lfs_put"),
    ("GET", _R + r"/xet-(?P<scope>read|write)-token/(?P<rev>[^/]+)", "xet_token"),
    ("GET", _P + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("HEAD", _P + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, hub):
        self.hub, self.conns = hub, set()
        super().__init__(addr, _Handler)

    def process_request(self, request, client_address):
        self.conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        self.conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)  # clients hanging up are not errors

    def close_connections(self):
        for conn in list(self.conns):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60
    disable_nagle_algorithm = True  # headers and body go out in separate writes

    def do_GET(self):
        self.server.hub._handle(self)

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    def log_message(self, *args):
        pass


def _read_body(h: BaseHTTPRequestHandler) -> bytes:
    if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
        chunks = []
        while (size := int(h.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
            chunks.append(h.rfile.read(size))
            h.rfile.readline()
        while h.rfile.readline().strip():  # trailers
            pass
        return b"".join(chunks)
    n = int(h.headers.get("Content-Length") or 0)
    return h.rfile.read(n) if n else b""


# ----------------------------------------------------------------------------- the hub
class FakeHub:
    def __init__(self, users: dict[str, str] | None = None, orgs: dict[str, list[str]] | None = None,
                 *, read_tokens: dict[str, str] | None = None, max_file_size: int = MAX_FILE_SIZE,
                 xet: bool = True, page_size: int = 1000, host: str = "127.0.0.1", port: int = 0):
        self.users = dict(users or {})                                  # name -> write token
        self.orgs = {u: list(o) for u, o in (orgs or {}).items()}      # user -> [org, ...]
        self._tokens = {tok: (name, True) for name, tok in self.users.items()}  # token -> (user, may write)
        self._tokens.update({tok: (name, False) for name, tok in (read_tokens or {}).items()})
        self.max_file_size = max_file_size
        self.xet = xet                                                  # False: a Hub without Xet storage
        self.page_size = page_size
        self.repos: dict[tuple[str, str], Repo] = {}                    # repo_key() -> repo
        self.lfs: dict[tuple[str, str], dict[str, bytes]] = {}          # per repo: LFS objects, sha256 -> content
        self.xet_hashes: dict[tuple[str, str], dict[str, str]] = {}     # per repo: sha256 -> Xet file hash
        self.collections: dict[str, dict] = {}
        self.requests: list[tuple[str, str, int]] = []                  # status 0 = connection dropped
        self._content_bytes = 0                                         # LFS PUTs + regular files committed
        self.bytes_downloaded: dict[str, int] = {}                      # "repo_id/path" -> bytes sent
        self._faults: list[Fault] = []
        self._lock = threading.RLock()
        self._counter = 0
        self._server = _Server((host, port), self)
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self.cas = LocalCAS(self.url, self._xet_file_registered)
        self._thread: threading.Thread | None = None

    @property
    def bytes_uploaded(self) -> int:
        """File content received: LFS PUT bodies that passed the sha256 check, xorb bodies the CAS
        accepted, and the regular-file contents of commits that landed (not shard metadata)."""
        return self._content_bytes + self.cas.xorb_bytes_received

    # -- lifecycle
    def start(self) -> FakeHub:
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="FakeHub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- seeding and inspection (no HTTP)
    def seed_repo(self, repo_id: str, files: dict[str, bytes | str | Path], *, private: bool | None = None,
                  gated: bool | str | None = None, license: str | None = None, tags: list | None = None,
                  created_at: datetime | str | None = None, repo_type: str = "model",
                  message: str = "Upload files", author: str | None = None,
                  delete: list[str] = ()) -> str:
        """Create the repo if needed, then commit ``files`` on top of main (added or replaced; paths in
        ``delete`` removed). Settings left as None keep their current value. Returns the commit oid."""
        with self._lock:
            repo = self.repos.get(repo_key(repo_type, repo_id))
            if repo is None:
                when = datetime.fromisoformat(created_at.replace("Z", "+00:00")) if isinstance(created_at, str) \
                    else created_at or _now()
                repo = self._create(repo_type, repo_id, author or repo_id.split("/")[0], created_at=when)
            for attr, value in (("private", private), ("gated", gated), ("license", license), ("tags", tags)):
                if value is not None:
                    setattr(repo, attr, "auto" if attr == "gated" and value is True else value)
            tree = dict(repo.commits[repo.branches["main"]].tree)
            for path, content in files.items():
                data = Path(content).read_bytes() if isinstance(content, Path) else \
                    content.encode() if isinstance(content, str) else bytes(content)
                tree[path] = Blob.make(data, wants_lfs(path, len(data), data[:512]))
                if tree[path].lfs:  # as if pushed through LFS: the repo's store holds it
                    self.lfs.setdefault(repo_key(repo.type, repo.id), {})[tree[path].sha256] = data
            for path in delete:
                tree.pop(path, None)
            return self._new_commit(repo, "main", tree, message, "", author or repo.namespace).oid

    def grant_access(self, repo_id: str, user: str, repo_type: str = "model") -> None:
        with self._lock:
            self.repos[repo_key(repo_type, repo_id)].access.add(user)

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        return repo_key(repo_type, repo_id) in self.repos

    def repo_id(self, repo_id: str, repo_type: str = "model") -> str:
        """The repo's id with the casing it was created with."""
        return self.repos[repo_key(repo_type, repo_id)].id

    def xet_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, str]:
        """Path -> Xet file hash, for the files at ``revision`` whose content came through Xet."""
        with self._lock:
            repo = self.repos[repo_key(repo_type, repo_id)]
            tree = repo.commits[self._resolve_rev(repo, revision)].tree
            return {p: b.xet_hash for p, b in tree.items() if b.xet_hash}

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[Commit]:
        with self._lock:
            repo = self.repos[repo_key(repo_type, repo_id)]
            return list(reversed(list(repo.chain(self._resolve_rev(repo, revision)))))

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        with self._lock:
            repo = self.repos[repo_key(repo_type, repo_id)]
            return repo.commits[self._resolve_rev(repo, revision)].files

    def pull_requests(self, repo_id: str, repo_type: str = "model") -> list[PullRequest]:
        with self._lock:
            repo = self.repos[repo_key(repo_type, repo_id)]
            return [PullRequest(d.num, d.title, d.ref, d.status, d.author, repo.commits[d.head].files)
                    for d in repo.discussions.values() if d.is_pr]

    def reset_counters(self) -> None:
        with self._lock:
            self.requests.clear()
            self._content_bytes = 0
            self.bytes_downloaded.clear()
            self.cas.reset_counters()

    # -- faults
    def inject(self, method: str | None = None, path: str = ".*", status: int | None = None, *,
               retry_after: int | None = None, drop: bool = False, times: int = 1, skip: int = 0,
               after: bool = False) -> Fault:
        """Fault the next ``times`` requests whose method matches and whose raw target (path?query)
        matches the regex ``path`` (re.search), after letting ``skip`` matching requests through.
        ``status``: answer it (429 with retry_after also sends Retry-After and RateLimit headers);
        ``drop``: close the connection without answering; ``after``: run the handler first."""
        if status is None and not drop:
            raise ValueError("inject() needs a status or drop=True")
        fault = Fault(method and method.upper(), re.compile(path), status, retry_after, drop, times, skip, after)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str, target: str) -> Fault | None:
        with self._lock:
            return take_fault(self._faults, method, target)

    # -- HTTP plumbing
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        method, target = h.command, h.path
        body = _read_body(h)
        fault = self._take_fault(method, target)
        if fault is None or fault.after:
            try:
                resp = self._dispatch(method, target, body, h.headers)
            except HubError as e:
                resp = e.response()
            except Exception:  # a bug in the fake: answer 500 with the traceback, keep serving
                resp = _json({"error": traceback.format_exc()}, 500)
        if fault is not None:
            if fault.drop:
                with self._lock:
                    self.requests.append((method, target, 0))
                h.close_connection = True
                return
            headers = {"X-Error-Message": "Injected fault"}
            if fault.retry_after is not None:
                headers["Retry-After"] = str(fault.retry_after)
                if fault.status == 429:
                    headers["RateLimit"] = f'"api";r=0;t={fault.retry_after}'
                    headers["RateLimit-Policy"] = '"fixed window";"api";q=500;w=300'
            resp = _json({"error": f"Injected fault ({fault.status})"}, fault.status, headers)
        status, headers, payload = resp
        with self._lock:
            self.requests.append((method, target, status))
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", headers.get("Content-Length", str(len(payload))))
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(payload)

    def _dispatch(self, method: str, target: str, body: bytes, headers):
        path, _, qs = target.partition("?")
        if path.startswith("/cas/"):  # the Xet CAS: its own tokens, its own error bodies
            with self._lock:
                return self.cas.dispatch(method, path, parse_qs(qs), body, headers)
        found = next(((m, name) for route_method, regex, name in ROUTES
                      if route_method == method and (m := regex.fullmatch(path))), None)
        if found is None:
            raise HubError(404, f"Sorry, we can't find the page you are looking for: {method} {path}")
        m, name = found
        user, may_write, auth = None, False, headers.get("Authorization", "")
        if auth.lower().startswith("bearer ") and name != "lfs_put":
            user, may_write = self._tokens.get(auth[7:].strip(), (None, False))
            if user is None:
                raise HubError(401, "Invalid credentials in Authorization header")
        if user is not None and not may_write and (name in WRITE_HANDLERS or m.groupdict().get("scope") == "write"):
            raise HubError(403, "Forbidden: this is a read-only token; you must use a token with the write role "
                                "to do this")
        params = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
        req = Req(method, path, params, parse_qs(qs, keep_blank_values=True), body, user, headers, may_write)
        with self._lock:
            return getattr(self, "_h_" + name)(req)

    # -- store internals (call with the lock held)
    def _member(self, user: str | None, namespace: str) -> bool:
        return user is not None and (user == namespace or namespace in self.orgs.get(user, []))

    def _create(self, repo_type: str, repo_id: str, author: str, **kw) -> Repo:
        repo = self.repos[repo_key(repo_type, repo_id)] = Repo(repo_type, repo_id, **kw)
        tree = {".gitattributes": Blob.make(GITATTRIBUTES, False)}
        self._new_commit(repo, "main", tree, "initial commit", "", author, date=repo.created_at)
        return repo

    def _new_commit(self, repo: Repo, branch: str | None, tree: dict, title: str, description: str,
                    author: str, parent: str | None = None, date: datetime | None = None) -> Commit:
        parent = repo.branches.get(branch) if branch else parent
        self._counter += 1
        date = date or _now()
        seed = f"{repo.id}\n{parent}\n{title}\n{description}\n{author}\n{_iso(date)}\n{self._counter}\n"
        seed += "".join(f"{p} {b.oid}\n" for p, b in sorted(tree.items()))
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), title, description, tree, parent, date, author)
        repo.commits[commit.oid] = commit
        if branch:
            repo.branches[branch] = commit.oid
        repo.last_modified = date
        return commit

    def _repo(self, req: Req, write: bool = False) -> Repo:
        rtype = req.params["type"][:-1] if "type" in req.params else (req.params.get("prefix") or "models")[:-1]
        repo = self.repos.get(repo_key(rtype, req.params["repo"]))
        if repo is None or (repo.private and not self._member(req.user, repo.namespace)):
            raise HubError(401 if req.user is None else 404, "Repository not found", "RepoNotFound")
        if write:
            self._require_user(req)
            if not self._member(req.user, repo.namespace):
                raise HubError(403, f"You don't have the rights to write to {repo.type}s/{repo.id}")
        return repo

    def _uploadable(self, req: Req, rev: str | None, create_pr: bool) -> Repo:
        """The repo, if the caller may upload to ``rev``: owners always; any signed-in user may open a
        pull request (``create_pr``, or an LFS batch without ``ref``) and push to their own ``refs/pr/N``."""
        repo, user = self._repo(req), self._require_user(req)
        m = re.fullmatch(r"refs/pr/(\d+)", rev or "")
        own_pr = m and getattr(repo.discussions.get(int(m[1])), "author", None) == user
        if not (self._member(user, repo.namespace) or create_pr or rev is None or own_pr):
            raise HubError(403, f"You don't have the rights to write to {repo.type}s/{repo.id} at {rev}")
        return repo

    def _require_user(self, req: Req) -> str:
        if req.user is None:
            raise HubError(401, "You must be authenticated to do this")
        return req.user

    def _resolve_rev(self, repo: Repo, rev: str) -> str:
        name = rev.removeprefix("refs/heads/")
        if name in repo.branches:
            return repo.branches[name]
        if rev.removeprefix("refs/tags/") in repo.tag_refs:
            return repo.tag_refs[rev.removeprefix("refs/tags/")]
        m = re.fullmatch(r"refs/pr/(\d+)", rev)
        if m and int(m[1]) in repo.discussions and repo.discussions[int(m[1])].is_pr:
            return repo.discussions[int(m[1])].head
        if re.fullmatch(r"[0-9a-f]{7,40}", rev):
            found = [oid for oid in repo.commits if oid.startswith(rev)]
            if len(found) == 1:
                return found[0]
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _tree(self, repo: Repo, rev: str) -> tuple[str, dict[str, Blob]]:
        oid = self._resolve_rev(repo, rev)
        return oid, repo.commits[oid].tree

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{repo.prefix}{repo.id}"

    def _card(self, repo: Repo, tree: dict[str, Blob]) -> dict | None:
        card = None
        if "README.md" in tree:
            try:
                card = parse_front_matter(tree["README.md"].data.decode("utf-8", "replace"))
            except ValueError:
                card = None
        if repo.license and not (card or {}).get("license"):
            card = {**(card or {}), "license": repo.license}
        return card

    def _info(self, repo: Repo, oid: str, blobs: bool = False, full: bool = True) -> dict:
        tree = repo.commits[oid].tree
        card = self._card(repo, tree) or {}
        library = card.get("library_name") or ("transformers" if "config.json" in tree else None)
        tags = list(repo.tags) + [t for t in (card.get("tags") or []) if isinstance(t, str)]
        tags += [ext for ext in ("safetensors", "gguf", "onnx") if any(p.endswith("." + ext) for p in tree)]
        tags += [library] if library else []
        tags += [f"license:{card['license']}"] if isinstance(card.get("license"), str) else []
        info = {"_id": hashlib.sha1(repo.id.encode()).hexdigest()[:24], "id": repo.id, "modelId": repo.id,
                "author": repo.namespace, "sha": oid, "lastModified": _iso(repo.commits[oid].date),
                "createdAt": _iso(repo.created_at), "private": repo.private, "gated": repo.gated,
                "disabled": False, "downloads": repo.downloads, "likes": repo.likes,
                "library_name": library, "pipeline_tag": card.get("pipeline_tag"),
                "tags": list(dict.fromkeys(tags + ["region:us"])), "spaces": []}
        if card:
            info["cardData"] = card
        if full:
            info["siblings"] = [{"rfilename": p, **({"size": b.size, "blobId": b.oid} if blobs else {}),
                                 **({"lfs": {"size": b.size, "sha256": b.sha256,
                                             "pointerSize": b.entry(p)["lfs"]["pointerSize"]}}
                                    if blobs and b.lfs else {})}
                                for p, b in sorted(tree.items())]
            info["usedStorage"] = sum(b.size for b in tree.values())
        return info

    def _page(self, req: Req, items: list):
        start = int(req.q("cursor") or 0)
        size = min(int(req.q("limit") or self.page_size), self.page_size)
        headers = {}
        if start + size < len(items):
            query = {**req.query, "cursor": [str(start + size)]}
            headers["Link"] = f'<{self.url}{req.path}?{urlencode(query, doseq=True)}>; rel="next"'
        return _json(items[start:start + size], headers=headers)

    def _last_commit(self, repo: Repo, head: str, path: str) -> dict:
        """The commit that last changed ``path`` (a file, or any file under a folder) before ``head``."""
        def state(c: Commit):
            return tuple(sorted((p, b.oid) for p, b in c.tree.items() if p == path or p.startswith(path + "/")))
        chain = list(repo.chain(head))
        found = chain[-1]
        for commit, older in zip(chain, chain[1:]):
            if state(commit) != state(older):
                found = commit
                break
        return {"id": found.oid, "title": found.title, "date": _iso(found.date)}

    def _entries(self, repo: Repo, head: str, tree: dict[str, Blob], paths: list[str], expand: bool) -> list:
        out = []
        for path in paths:
            if path in tree:
                entry = tree[path].entry(path)
            else:
                below = sorted((p, b.oid) for p, b in tree.items() if p.startswith(path + "/"))
                if not below:
                    continue
                entry = {"type": "directory", "path": path, "size": 0,
                         "oid": hashlib.sha1(repr(below).encode()).hexdigest()}
            if expand:
                entry["lastCommit"] = self._last_commit(repo, head, path)
            out.append(entry)
        return out

    # -- handlers: account and repos
    def _h_whoami(self, req: Req):
        user = self._require_user(req)
        orgs = [{"type": "org", "name": o, "fullname": o, "roleInOrg": "write"} for o in self.orgs.get(user, [])]
        return _json({"type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user,
                      "fullname": user, "email": f"{user}@example.com", "emailVerified": True, "isPro": False,
                      "canPay": False, "orgs": orgs,
                      "auth": {"type": "access_token",
                               "accessToken": {"displayName": "test", "role": "write" if req.may_write else "read"}}})

    def _h_create_repo(self, req: Req):
        user, body = self._require_user(req), req.json()
        rtype, name = body.get("type") or "model", body.get("name", "")
        namespace = body.get("organization") or user
        if rtype not in PREFIXES or not re.fullmatch(r"[\w][\w.-]{0,95}", name) or ".." in name or "--" in name:
            raise HubError(400, f"Invalid repo name or type: {rtype} {name!r}")
        if not self._member(user, namespace):
            raise HubError(403, f"You don't have the rights to create a {rtype} under the namespace \"{namespace}\"")
        repo_id = f"{namespace}/{name}"
        url = f"{self.url}/{PREFIXES[rtype]}{repo_id}"
        if repo_key(rtype, repo_id) in self.repos:
            url = f"{self.url}/{PREFIXES[rtype]}{self.repos[repo_key(rtype, repo_id)].id}"
            raise HubError(409, f"You already created this {rtype} repo", url=url)
        private = body.get("visibility", "public") == "private" if "visibility" in body else bool(body.get("private"))
        self._create(rtype, repo_id, user, private=private)
        return _json({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _h_delete_repo(self, req: Req):
        body = req.json()
        namespace = body.get("organization") or self._require_user(req)
        req.params.update(type=(body.get("type") or "model") + "s", repo=f"{namespace}/{body.get('name')}")
        repo = self._repo(req, write=True)
        key = repo_key(repo.type, repo.id)
        del self.repos[key]
        self.lfs.pop(key, None)
        self.xet_hashes.pop(key, None)
        self.cas.forget_repo(key)
        return _json({})

    def _h_settings(self, req: Req):
        repo, body = self._repo(req, write=True), req.json()
        if "gated" in body:
            if body["gated"] not in (False, "auto", "manual"):
                raise HubError(400, f"Invalid gated value {body['gated']!r}")
            repo.gated = body["gated"]
        if "visibility" in body or "private" in body:
            repo.private = body.get("visibility") == "private" if "visibility" in body else bool(body["private"])
        return _json({})

    def _h_validate_yaml(self, req: Req):
        try:
            parse_front_matter(req.json().get("content", ""))
        except ValueError as e:
            return _json({"errors": [{"message": str(e)}], "warnings": []}, 400)
        return _json({"errors": [], "warnings": []})

    def _h_repo_info(self, req: Req):
        repo = self._repo(req)
        info = self._info(repo, self._resolve_rev(repo, req.params.get("rev", "main")), blobs=req.flag("blobs"))
        expand = req.query.get("expand") or req.query.get("expand[]")
        if expand:
            info = {k: v for k, v in info.items() if k in ("_id", "id", *expand)}
        return _json(info)

    def _h_list_repos(self, req: Req):
        rtype = req.params["type"][:-1]
        author, search = req.q("author"), [s.lower() for s in req.query.get("search", [])]
        filters = req.query.get("filter", [])
        full, expand = req.flag("full"), req.query.get("expand") or req.query.get("expand[]")
        items = []
        for repo in self.repos.values():
            if repo.type != rtype or (repo.private and not self._member(req.user, repo.namespace)):
                continue
            if (author and repo.namespace != author) or any(s not in repo.id.lower() for s in search):
                continue
            info = self._info(repo, repo.branches["main"], full=full)
            if any(f not in info["tags"] and f != repo.id for f in filters):
                continue
            if req.q("gated") is not None and bool(repo.gated) != (req.q("gated").lower() == "true"):
                continue
            short = ["modelId", "likes", "downloads", "private", "tags", "pipeline_tag", "library_name", "createdAt"]
            keep = expand or (None if full else short + (["cardData"] if req.flag("cardData") else []))
            if keep:  # like the Hub: a short record unless full=True or expand=[...]
                info = {k: v for k, v in info.items() if k in ("_id", "id", *keep)}
            items.append((repo, info))
        sort = {"trendingScore": "likes"}.get(req.q("sort"), req.q("sort") or "createdAt")
        keys = {"createdAt": lambda r: r.created_at, "lastModified": lambda r: r.last_modified,
                "downloads": lambda r: r.downloads, "likes": lambda r: r.likes, "id": lambda r: r.id}
        items.sort(key=lambda ri: (keys.get(sort, keys["createdAt"])(ri[0]), ri[0].id),
                   reverse=str(req.q("direction", "-1")) != "1")
        return self._page(req, [info for _, info in items])

    # -- handlers: upload protocol
    def _too_large(self, size) -> str | None:
        if isinstance(size, int) and size > self.max_file_size:
            limit = self.max_file_size  # tests use small limits: bytes then, the Hub's GB otherwise
            shown = f"{limit / 1000 ** 3:.1f}GB" if limit >= 10 ** 8 else f"{limit} bytes"
            return f"Maximum individual file size is {shown}"
        return None

    def _h_preupload(self, req: Req):
        repo = self._uploadable(req, req.params["rev"], req.flag("create_pr"))
        _, tree = self._tree(repo, req.params["rev"])
        out = []
        for f in req.json().get("files", []):
            if error := self._too_large(f.get("size")):
                raise HubError(400, f"{f['path']}: {error}")
            sample = base64.b64decode(f.get("sample", ""))
            mode = "lfs" if wants_lfs(f["path"], int(f.get("size", 0)), sample) else "regular"
            remote = tree.get(f["path"])
            oid = None if remote is None else (remote.sha256 if remote.lfs else _git_oid(remote.data))
            out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return _json({"files": out, "commitOid": self._resolve_rev(repo, req.params["rev"])})

    def _h_lfs_batch(self, req: Req):
        body = req.json()
        ref = (body.get("ref") or {}).get("name")
        repo = self._uploadable(req, ref, create_pr=False)
        if body.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported")
        verify = f"{self.url}/{repo.prefix}{repo.id}.git/info/lfs/objects/verify"
        stored = self.lfs.get(repo_key(repo.type, repo.id), {})
        objects = []
        for o in body.get("objects", []):
            oid, size = o.get("oid", ""), o.get("size")
            if not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int) or size < 0:
                objects.append({"oid": str(oid), "size": size if isinstance(size, int) else 0,
                                "error": {"code": 422, "message": "Invalid object"}})
            elif error := self._too_large(size):
                objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": error}})
            elif oid in stored and len(stored[oid]) == size:
                objects.append({"oid": oid, "size": size})
            else:
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                    "upload": {"href": f"{self.url}/lfs-upload/{repo.type}s/{repo.id}/{oid}", "expires_in": 3600},
                    "verify": {"href": verify, "header": {}}}})
        return _json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                     content_type="application/vnd.git-lfs+json")

    def _h_lfs_put(self, req: Req):
        oid, key = req.params["oid"], repo_key(req.params["type"][:-1], req.params["repo"])
        if key not in self.repos:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if hashlib.sha256(req.body).hexdigest() != oid:
            raise HubError(400, "Uploaded content does not match its sha256")
        self.lfs.setdefault(key, {}).setdefault(oid, req.body)
        self._content_bytes += len(req.body)
        return 200, {"ETag": f'"{hashlib.md5(req.body).hexdigest()}"'}, b""

    def _h_lfs_verify(self, req: Req):
        repo = self._repo(req)
        self._require_user(req)
        body = req.json()
        stored = self.lfs.get(repo_key(repo.type, repo.id), {})
        if body.get("oid") not in stored or len(stored[body["oid"]]) != body.get("size"):
            raise HubError(404, f"Object {body.get('oid')} not found")
        return _json({"success": True})

    def _h_xet_token(self, req: Req):
        """A Xet CAS token for this repo, as JSON and in the X-Xet-* headers huggingface_hub reads. Write
        tokens follow the upload rules (``rev`` is "None" when opening a pull request)."""
        if not self.xet:
            raise HubError(404, f"Sorry, we can't find the page you are looking for: {req.method} {req.path}")
        write, rev = req.params["scope"] == "write", req.params["rev"]
        create_pr = req.flag("create_pr") or (write and rev == "None")
        repo = self._uploadable(req, None if rev == "None" else rev, create_pr) if write else self._readable(req)
        if rev != "None":
            self._resolve_rev(repo, rev)
        info = self.cas.issue_token(repo_key(repo.type, repo.id), write, req.user)
        return _json(info, headers={"X-Xet-Cas-Url": info["casUrl"], "X-Xet-Access-Token": info["accessToken"],
                                    "X-Xet-Token-Expiration": str(info["exp"])})

    def _xet_file_registered(self, key: tuple[str, str], record, data: bytes) -> None:
        """The CAS accepted a shard for this repo: its files are now stored in the repo, by sha256."""
        self.lfs.setdefault(key, {})[record.sha256] = data
        self.xet_hashes.setdefault(key, {})[record.sha256] = record.hash

    def _h_commit(self, req: Req):
        create_pr, rev = req.flag("create_pr"), req.params["rev"]
        repo, user, pr = self._uploadable(req, rev, create_pr), req.user, None
        if rev.startswith("refs/pr/"):
            self._resolve_rev(repo, rev)
            pr = repo.discussions[int(rev.rsplit("/", 1)[1])]
            if pr.status not in ("open", "draft"):
                raise HubError(403, f"Pull request #{pr.num} is {pr.status}")
            branch, head = None, pr.head
        else:
            branch = rev.removeprefix("refs/heads/")
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            head = repo.branches[branch]
        lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header = lines[0]["value"]
        if header.get("parentCommit") and header["parentCommit"] != head:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        tree, regular_bytes = dict(repo.commits[head].tree), 0
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if key == "file":
                data = base64.b64decode(value["content"]) if value.get("encoding") == "base64" \
                    else value["content"].encode()
                if error := self._too_large(len(data)):
                    raise HubError(400, f"{path}: {error}")
                if len(data) >= LFS_THRESHOLD or _is_binary(data[:512]):  # the sample preupload saw
                    raise HubError(400, f"Your push was rejected because it contains binary or large files "
                                        f"({path}). Please use LFS.")
                tree[path], regular_bytes = Blob.make(data, False), regular_bytes + len(data)
            elif key == "lfsFile":
                data = self.lfs.get(repo_key(repo.type, repo.id), {}).get(value.get("oid"))
                if data is None or value.get("size", len(data)) != len(data):
                    raise HubError(422, f"LFS object {value.get('oid')} for {path} was not uploaded to {repo.id}")
                if error := self._too_large(len(data)):
                    raise HubError(400, f"{path}: {error}")
                xet_hash = self.xet_hashes.get(repo_key(repo.type, repo.id), {}).get(value.get("oid"))
                tree[path] = Blob.make(data, True, xet_hash)
            elif key == "deletedFile":
                if tree.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                folder = path.rstrip("/") + "/"
                gone = [p for p in tree if p.startswith(folder)]
                if not gone:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in gone:
                    del tree[p]
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        title, description = header.get("summary") or "Update", header.get("description") or ""
        if create_pr:
            num = max(repo.discussions, default=0) + 1
            commit = self._new_commit(repo, None, tree, title, description, user, parent=head)
            pr = repo.discussions[num] = Discussion(num, title, user, True, _now(), "draft", head=commit.oid,
                                                    base_branch=branch, base_oid=head)
            pr.events.append(self._event(user, "comment", description or title))
        elif pr is not None:
            commit = self._new_commit(repo, None, tree, title, description, user, parent=head)
            pr.head = commit.oid
        else:
            commit = self._new_commit(repo, branch, tree, title, description, user)
        if pr is not None:
            pr.events.append(self._event(user, "commit", {"subject": title, "oid": commit.oid}))
        self._content_bytes += regular_bytes
        resp = {"success": True, "commitOid": commit.oid, "commitUrl": f"{self._repo_url(repo)}/commit/{commit.oid}"}
        if create_pr:
            resp["pullRequestUrl"] = f"{self._repo_url(repo)}/discussions/{pr.num}"
        return _json(resp)

    # -- handlers: browsing
    def _h_tree(self, req: Req):
        repo = self._repo(req)
        head, tree = self._tree(repo, req.params["rev"])
        base = req.params.get("path", "").strip("/")
        prefix = base + "/" if base else ""
        if base and base in tree:
            raise HubError(400, f"{base} is a file, not a folder")
        below = [p for p in tree if p.startswith(prefix)]
        if base and not below:
            raise HubError(404, f"Entry not found: {base}", "EntryNotFound")
        names = set()
        for p in below:
            parts = p[len(prefix):].split("/")
            depth = len(parts) if req.flag("recursive") else 1
            names.update(prefix + "/".join(parts[:i]) for i in range(1, depth + 1))
        paths = sorted(names, key=lambda p: (p in tree, p))  # folders first, like the Hub
        return self._page(req, self._entries(repo, head, tree, paths, req.flag("expand")))

    def _h_paths_info(self, req: Req):
        repo = self._repo(req)
        head, tree = self._tree(repo, req.params["rev"])
        form = parse_qs(req.body.decode(), keep_blank_values=True)
        if not form and req.body.strip().startswith(b"{"):
            form = {k: v if isinstance(v, list) else [v] for k, v in req.json().items()}
        paths = [p.strip("/") for p in form.get("paths", [])]
        expand = str(form.get("expand", ["false"])[0]).lower() in ("1", "true")
        return _json(self._entries(repo, head, tree, paths, expand))

    def _h_refs(self, req: Req):
        repo = self._repo(req)
        refs = {"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o}
                             for b, o in repo.branches.items()],
                "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": o} for t, o in repo.tag_refs.items()],
                "converts": []}
        if req.flag("include_prs"):
            refs["pullRequests"] = [{"name": d.ref, "ref": d.ref, "targetCommit": d.head}
                                    for d in repo.discussions.values() if d.is_pr]
        return _json(refs)

    def _h_list_commits(self, req: Req):
        repo = self._repo(req)
        items = [{"id": c.oid, "title": c.title, "message": c.title + (f"\n\n{c.description}" if c.description else ""),
                  "date": _iso(c.date), "authors": [{"user": c.author, "avatar": None}]}
                 for c in repo.chain(self._resolve_rev(repo, req.params["rev"]))]
        return self._page(req, items)

    def _h_create_branch(self, req: Req):
        repo, branch = self._repo(req, write=True), req.params["branch"]
        if branch.startswith("refs/") or not re.fullmatch(r"[\w./-]+", branch):
            raise HubError(400, f"Invalid branch name: {branch}")
        if branch in repo.branches:
            raise HubError(409, f"Branch {branch} already exists")
        repo.branches[branch] = self._resolve_rev(repo, req.json().get("startingPoint") or "main")
        return _json({})

    def _h_delete_branch(self, req: Req):
        repo, branch = self._repo(req, write=True), req.params["branch"]
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        if branch == "main":
            raise HubError(403, "Cannot delete the default branch")
        del repo.branches[branch]
        return _json({})

    def _h_create_tag(self, req: Req):
        repo, tag = self._repo(req, write=True), req.json().get("tag", "")
        oid = self._resolve_rev(repo, req.params["rev"])
        if tag in repo.tag_refs:
            raise HubError(409, f"Tag {tag} already exists")
        repo.tag_refs[tag] = oid
        return _json({})

    def _h_delete_tag(self, req: Req):
        repo = self._repo(req, write=True)
        if repo.tag_refs.pop(req.params["tag"], None) is None:
            raise HubError(404, f"Invalid rev id: {req.params['tag']}", "RevisionNotFound")
        return _json({})

    def _readable(self, req: Req) -> Repo:
        """The repo, if the caller may read its files (gated repos need access)."""
        repo = self._repo(req)
        if repo.gated and not (self._member(req.user, repo.namespace) or req.user in repo.access):
            raise HubError(401 if req.user is None else 403,
                           f"Access to {repo.type} {repo.id} is restricted. You must have access to it and be "
                           "authenticated to access it. Please log in.", "GatedRepo")
        return repo

    def _h_resolve(self, req: Req):
        repo = self._readable(req)
        oid, tree = self._tree(repo, req.params["rev"])
        blob = tree.get(req.params["path"])
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": oid})
        etag = f'"{blob.sha256 if blob.lfs else blob.oid}"'
        headers = {"X-Repo-Commit": oid, "ETag": etag, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(blob.size)})
        if blob.xet_hash:  # as the Hub: the file hash, and where to get a read token for the CAS
            token_url = f"{self.url}/api/{repo.type}s/{repo.id}/xet-read-token/{oid}"
            headers.update({"X-Xet-Hash": blob.xet_hash, "Link": f'<{token_url}>; rel="xet-auth"'})
        status, data = 200, blob.data
        if req.method == "GET" and req.params["path"] == "config.json":
            repo.downloads += 1
        rng = re.fullmatch(r"bytes=(\d*)-(\d*)", req.headers.get("Range") or "")
        if rng and (rng[1] or rng[2]):
            if rng[1]:
                start, end = int(rng[1]), min(int(rng[2] or blob.size - 1), blob.size - 1)
            else:  # suffix range: the last N bytes
                start, end = max(blob.size - int(rng[2]), 0), blob.size - 1
            if start > end:
                raise HubError(416, "Requested range not satisfiable",
                               headers={"Content-Range": f"bytes */{blob.size}"})
            status, data = 206, data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{blob.size}"
        if req.method == "GET":
            key = f"{repo.id}/{req.params['path']}"
            self.bytes_downloaded[key] = self.bytes_downloaded.get(key, 0) + len(data)
        return status, headers, data

    # -- handlers: discussions and pull requests
    def _event(self, user: str, kind: str, data) -> dict:
        when = _iso(_now())
        if kind == "comment":
            data = {"edited": False, "hidden": False, "numEdits": 0, "editors": [user], "history": [],
                    "latest": {"raw": data, "html": f"<p>{data}</p>", "updatedAt": when, "author": {"name": user}}}
        return {"id": secrets.token_hex(12), "type": kind, "createdAt": when, "author": {"name": user}, "data": data}

    def _discussion_json(self, repo: Repo, d: Discussion, diff: bool = False) -> dict:
        out = {"num": d.num, "title": d.title, "status": d.status, "createdAt": _iso(d.created_at),
               "author": {"name": d.author}, "repo": {"name": repo.id, "type": repo.type},
               "isPullRequest": d.is_pr, "pinned": False, "locked": False, "events": d.events,
               "changes": {}, "filesWithConflicts": []}
        if d.is_pr:
            out["changes"] = {"base": f"refs/heads/{d.base_branch}",
                              **({"mergeCommitId": d.merge_oid} if d.merge_oid else {})}
            out["filesWithConflicts"] = self._merge(repo, d)[1]
            if diff:
                old, new = repo.commits[d.base_oid].tree, repo.commits[d.head].tree
                out["diff"] = "".join(f"diff --git a/{p} b/{p}\n" for p in sorted(set(old) | set(new))
                                      if old.get(p) != new.get(p))
        return out

    def _merge(self, repo: Repo, d: Discussion) -> tuple[dict, list[str]]:
        """Three-way merge of the PR into its base branch: (merged tree, conflicting paths)."""
        base, ours = repo.commits[d.base_oid].tree, repo.commits[repo.branches.get(d.base_branch, d.base_oid)].tree
        theirs, merged, conflicts = repo.commits[d.head].tree, dict(ours), []
        for p in set(base) | set(theirs):
            if theirs.get(p) == base.get(p):
                continue
            if ours.get(p) not in (base.get(p), theirs.get(p)):
                conflicts.append(p)
            elif p in theirs:
                merged[p] = theirs[p]
            else:
                merged.pop(p, None)
        return merged, sorted(conflicts)

    def _discussion(self, req: Req, repo: Repo) -> Discussion:
        d = repo.discussions.get(int(req.params["num"]))
        if d is None:
            raise HubError(404, f"Discussion #{req.params['num']} not found")
        return d

    def _h_list_discussions(self, req: Req):
        repo = self._repo(req)
        found = [d for d in sorted(repo.discussions.values(), key=lambda d: -d.num)
                 if req.q("type", "all") in ("all", "pull_request" if d.is_pr else "discussion")
                 and req.q("status", "all") in ("all", d.status) and req.q("author") in (None, d.author)]
        start = int(req.q("p") or 0) * 50
        return _json({"discussions": [self._discussion_json(repo, d) for d in found[start:start + 50]],
                      "count": len(found), "start": start, "numClosedDiscussions": 0})

    def _h_create_discussion(self, req: Req):
        repo, user, body = self._repo(req), self._require_user(req), req.json()
        num = max(repo.discussions, default=0) + 1
        is_pr = bool(body.get("pullRequest"))
        head = repo.branches["main"]
        d = repo.discussions[num] = Discussion(num, body.get("title", "").strip(), user, is_pr, _now(),
                                               "draft" if is_pr else "open",
                                               head=head if is_pr else None, base_oid=head if is_pr else None)
        d.events.append(self._event(user, "comment", body.get("description") or ""))
        return _json({"num": num, "url": f"{self._repo_url(repo)}/discussions/{num}"})

    def _h_get_discussion(self, req: Req):
        repo = self._repo(req)
        return _json(self._discussion_json(repo, self._discussion(req, repo), diff=req.flag("diff")))

    def _h_discussion_action(self, req: Req):
        repo, user, body = self._repo(req), self._require_user(req), req.json() if req.body else {}
        d, action = self._discussion(req, repo), req.params["action"]
        if action == "comment":
            event = self._event(user, "comment", body.get("comment", ""))
            d.events.append(event)
            return _json({"newMessage": event})
        if d.author != user and not self._member(user, repo.namespace):
            raise HubError(403, "Only the author or the repo's owners can do this")
        if action == "status":
            if body.get("status") not in ("open", "closed") or d.status == "merged":
                raise HubError(400, f"Cannot change status {d.status!r} to {body.get('status')!r}")
            if body.get("comment"):
                d.events.append(self._event(user, "comment", body["comment"]))
            d.status = body["status"]
            event = self._event(user, "status-change", {"status": d.status})
            d.events.append(event)
            return _json({"newStatus": event})
        # merge
        self._repo(req, write=True)
        if not d.is_pr or d.status not in ("open", "draft"):
            raise HubError(400, f"Discussion #{d.num} is not an open pull request")
        tree, conflicts = self._merge(repo, d)
        if conflicts:
            raise HubError(409, f"Pull request #{d.num} has conflicts: {', '.join(conflicts)}")
        commit = self._new_commit(repo, d.base_branch, tree, f"{d.title} (#{d.num})",
                                  repo.commits[d.head].description, d.author)
        d.merge_oid, d.status = commit.oid, "merged"
        if body.get("comment"):
            d.events.append(self._event(user, "comment", body["comment"]))
        d.events.append(self._event(user, "status-change", {"status": "merged"}))
        return _json({"mergeCommitId": commit.oid})

    # -- handlers: collections
    def _collection(self, req: Req) -> dict:
        c = self.collections.get(req.params["slug"])
        if c is None or (c["private"] and not self._member(req.user, c["owner"]["name"])):
            raise HubError(404, "Collection not found")
        return c

    def _h_create_collection(self, req: Req):
        user, body = self._require_user(req), req.json()
        namespace, title = body.get("namespace") or user, body.get("title", "").strip()
        if not self._member(user, namespace):
            raise HubError(403, f"You can't create a collection in {namespace}")
        for c in self.collections.values():
            if c["owner"]["name"] == namespace and c["title"] == title:
                raise HubError(409, "Collection already exists", slug=c["slug"])
        slug = f"{namespace}/{re.sub(r'[^a-z0-9]+', '-', title.lower()).strip('-')}-{secrets.token_hex(12)}"
        owner_type = "user" if namespace in self.users else "org"
        c = self.collections[slug] = {
            "slug": slug, "title": title, "description": body.get("description"), "private": bool(body.get("private")),
            "owner": {"name": namespace, "type": owner_type}, "items": [], "lastUpdated": _iso(_now()),
            "position": len(self.collections), "theme": "default", "upvotes": 0, "isUpvotedByUser": False}
        return _json(c)

    def _h_get_collection(self, req: Req):
        return _json(self._collection(req))

    def _h_delete_collection(self, req: Req):
        c = self._collection(req)
        if not self._member(self._require_user(req), c["owner"]["name"]):
            raise HubError(403, "You can't delete this collection")
        del self.collections[c["slug"]]
        return _json({})

    def _h_add_collection_item(self, req: Req):
        c, body = self._collection(req), req.json()
        if not self._member(self._require_user(req), c["owner"]["name"]):
            raise HubError(403, "You can't edit this collection")
        item_id, item_type = body.get("item", {}).get("id"), body.get("item", {}).get("type")
        if item_type in PREFIXES:
            repo = self.repos.get(repo_key(item_type, item_id or ""))
            if repo is None or (repo.private and not self._member(req.user, repo.namespace)):
                raise HubError(404, f"{item_type} {item_id} not found", "RepoNotFound")
            item_id = repo.id  # as the repo spells itself
        if any(i["id"] == item_id and i["type"] == item_type for i in c["items"]):
            raise HubError(409, "Item already in the collection")
        item = {"_id": secrets.token_hex(12), "id": item_id, "type": item_type, "position": len(c["items"])}
        if body.get("note"):
            item["note"] = {"text": body["note"], "html": body["note"]}
        c["items"].append(item)
        c["lastUpdated"] = _iso(_now())
        return _json(c)
