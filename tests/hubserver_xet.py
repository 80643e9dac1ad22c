"""A local Xet CAS for the test Hub (tests/hubserver.py), served by the same HTTP server under ``/cas``.

It speaks the CAS API that xet-core documents, as hf_xet 1.8 calls it (checked by driving it):

- ``POST /cas/v1/xorbs/default/{hash}`` (write token): the body is the chunks only (header + LZ4,
  BG4-LZ4 or raw payload each, no footer on the wire); each chunk is decompressed and its size checked.
  Answers ``{"was_inserted": bool}``, 400 on a malformed xorb. The upload carries no chunk hashes, so
  the xorb hash is checked when a shard first describes the xorb (its CAS info): chunk sizes and
  offsets must match and the declared chunk hashes must merkle-hash to the xorb's hash.
- ``POST /cas/v1/shards`` (write token): every file info must carry verification entries and the
  sha256 extension; each term must point into a described xorb, its verification hash and unpacked
  size must match, the file hash must be the merkle hash of its chunks, and the reconstructed bytes
  must hash to the declared sha256 and, recomputed by hf_xet itself (``hash_files``), to the declared
  file hash: that ties the chunk hashes to the data without re-hashing chunks in Python. The files are
  then registered for the repo the token was issued for (``{"result": 1}``, or 0 when nothing was new).
- ``GET /cas/v1/reconstructions/{file}`` (read token of a repo holding the file; ``Range`` honoured,
  416 past the end): terms, and per xorb the merged chunk ranges as ``fetch_info`` with short-lived
  signed URLs ``/cas/fetch/{xorb}?sig=`` that serve only within the signed byte range (``Range``
  required, else 403).
- ``GET /cas/v1/chunks/{default|default-merkledb}/{chunk}`` (global deduplication; hf_xet 1.8 sends
  "default"): a full shard (lookup tables, footer, HMAC key zero) listing every described xorb that
  holds the chunk, across all repos as the spec says; 404 when unknown.
- ``/cas/v2/shards`` and ``/cas/v2/reconstructions/...`` answer 501, and hf_xet 1.8's undocumented
  ``POST /cas/v1/xorb-grants/...`` answers 404: the client falls back to the v1 calls above by design.

Not implemented: HMAC-protected dedup answers, upload grants, the v2 NDJSON shard stream and
multi-range fetches, and token scopes finer than repo + read/write.

Counters (reset by ``FakeHub.reset_counters``): ``xorb_bytes_received`` (bodies of accepted xorb
uploads), ``shard_bytes_received``, ``xorb_bytes_served`` (signed fetches), ``xorbs_received`` and
``files_registered`` (``(repo_key, file hash)`` per newly registered file). ``shards`` keeps the
accepted shard bodies.
"""
from __future__ import annotations

import hashlib
import json
import re
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.hubserver_xetformat import (
    FileRecord,
    FormatError,
    Xorb,
    dedup_shard,
    file_hash,
    hash_hex,
    hash_raw,
    parse_shard,
    parse_xorb,
    verification_hash,
)

TOKEN_TTL_S = 3600
FETCH_TTL_S = 600
DEDUP_SHARD_TTL_S = 7 * 24 * 3600
_HASH = r"(?P<hash>[0-9a-f]{64})"
ROUTES = [(m, re.compile(p), h) for m, p, h in [
    ("POST", r"/cas/v1/xorbs/(?P<prefix>[^/]+)/" + _HASH, "upload_xorb"),
    ("POST", r"/cas/v1/shards", "upload_shard"),
    ("GET", r"/cas/v1/reconstructions/(?P<hash>[^/]+)", "reconstruction"),
    ("GET", r"/cas/v1/chunks/(?P<prefix>[^/]+)/(?P<hash>[^/]+)", "dedup"),
    ("GET", r"/cas/fetch/" + _HASH, "fetch"),
    ("POST", r"/cas/v2/shards", "not_implemented"),
    ("GET", r"/cas/v2/reconstructions/[^/]+", "not_implemented"),
    ("POST", r"/cas/v1/telemetry", "telemetry"),
]]


class CasError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass(frozen=True)
class XetToken:
    repo_key: tuple[str, str]   # (repo type, lower-cased repo id), as FakeHub keys repos
    write: bool
    user: str | None
    expires: int


@dataclass(frozen=True)
class SignedRange:
    xorb: str
    first: int
    last: int
    expires: float


def _text(status: int, message: str, headers: dict | None = None):
    return status, {"Content-Type": "text/plain; charset=utf-8", **(headers or {})}, message.encode()


def _json(obj, status: int = 200):
    return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()


class LocalCAS:
    """Xorbs are global (content-addressed, as in Xet); files are registered per repo. Call with the
    hub's lock held: FakeHub dispatches ``/cas`` requests here from its own handler."""

    def __init__(self, base_url: str, on_file_registered):
        self.url = base_url.rstrip("/") + "/cas"
        self.xorbs: dict[str, Xorb] = {}
        self.files: dict[tuple[str, str], dict[str, FileRecord]] = {}  # repo key -> file hash -> record
        self._chunk_to_xorbs: dict[bytes, set[str]] = {}
        self._tokens: dict[str, XetToken] = {}
        self._signed: dict[str, SignedRange] = {}
        self._on_file_registered = on_file_registered  # (repo_key, record, data) -> None
        self.shards: list[bytes] = []  # bodies of the shards accepted, for tests to inspect or replay
        self.reset_counters()

    def reset_counters(self) -> None:
        self.xorb_bytes_received = 0
        self.shard_bytes_received = 0
        self.xorb_bytes_served = 0
        self.xorbs_received = 0
        self.files_registered: list[tuple[tuple[str, str], str]] = []

    # -- tokens (issued by the hub's xet-read-token / xet-write-token routes)
    def issue_token(self, repo_key: tuple[str, str], write: bool, user: str | None) -> dict:
        token = "xet_" + secrets.token_urlsafe(24)
        expires = int(time.time()) + TOKEN_TTL_S
        self._tokens[token] = XetToken(repo_key, write, user, expires)
        return {"accessToken": token, "exp": expires, "casUrl": self.url}

    def forget_repo(self, repo_key: tuple[str, str]) -> None:
        """A deleted repo's files and tokens go with it; xorbs stay (other repos may use them)."""
        self.files.pop(repo_key, None)
        for token in [t for t, info in self._tokens.items() if info.repo_key == repo_key]:
            del self._tokens[token]

    # -- HTTP
    def dispatch(self, method: str, path: str, query: dict, body: bytes, headers) -> tuple[int, dict, bytes]:
        found = next(((m, name) for route_method, regex, name in ROUTES
                      if route_method == method and (m := regex.fullmatch(path))), None)
        try:
            if found is None:
                raise CasError(404, f"no CAS route for {method} {path}")
            m, name = found
            return getattr(self, "_h_" + name)(m.groupdict(), query, body, headers)
        except CasError as e:
            return _text(e.status, e.message, e.headers)

    def _auth(self, headers, write: bool = False) -> XetToken:
        auth = headers.get("Authorization", "")
        token = self._tokens.get(auth[7:].strip()) if auth.lower().startswith("bearer ") else None
        if token is None or token.expires <= time.time():
            raise CasError(401, "missing, unknown or expired Xet token")
        if write and not token.write:
            raise CasError(403, "this Xet token has read scope; the call needs write")
        return token

    def _h_not_implemented(self, params, query, body, headers):
        self._auth(headers)
        raise CasError(501, "not implemented by this CAS; use the v1 API")

    def _h_telemetry(self, params, query, body, headers):
        return _json({})

    def _h_upload_xorb(self, params, query, body, headers):
        self._auth(headers, write=True)
        if params["prefix"] != "default":
            raise CasError(400, f"unknown xorb prefix {params['prefix']!r}")
        try:
            xorb = parse_xorb(params["hash"], body)
        except FormatError as e:
            raise CasError(400, f"bad xorb: {e}") from None
        inserted = xorb.hash not in self.xorbs
        if inserted:
            self.xorbs[xorb.hash] = xorb
        self.xorb_bytes_received += len(body)
        self.xorbs_received += 1
        return _json({"was_inserted": inserted})

    def _h_upload_shard(self, params, query, body, headers):
        token = self._auth(headers, write=True)
        try:
            files, xorb_infos = parse_shard(body)
        except FormatError as e:
            raise CasError(400, f"bad shard: {e}") from None
        for info in xorb_infos:
            stored = self.xorbs.get(info.hash)
            if stored is None:
                raise CasError(400, f"shard lists xorb {info.hash}, which was not uploaded")
            if stored.chunk_hashes is None:
                try:
                    stored.attest(info)
                except FormatError as e:
                    raise CasError(400, str(e)) from None
                for h in stored.chunk_hashes:
                    self._chunk_to_xorbs.setdefault(h, set()).add(stored.hash)
            elif info.chunk_hashes != stored.chunk_hashes:
                raise CasError(400, f"shard's chunk hashes for xorb {info.hash} differ from those known")
        checked = [(record, self._verify_file(record)) for record in files]
        self.shard_bytes_received += len(body)
        self.shards.append(body)
        registered = self.files.setdefault(token.repo_key, {})
        new = 0
        for record, data in checked:
            if record.hash not in registered:
                new += 1
                self.files_registered.append((token.repo_key, record.hash))
            registered[record.hash] = record
            self._on_file_registered(token.repo_key, record, data)
        return _json({"result": 1 if new else 0})

    def _verify_file(self, record: FileRecord) -> bytes:
        """Check one file info of an uploaded shard; return the file's bytes."""
        if record.sha256 is None or len(record.verification) != len(record.terms):
            raise CasError(400, f"file {record.hash}: uploaded file infos need verification entries and sha256")
        parts, chunks = [], []
        for term, proof in zip(record.terms, record.verification):
            xorb = self.xorbs.get(term.xorb)
            if xorb is None or xorb.chunk_hashes is None:
                raise CasError(400, f"file {record.hash} uses xorb {term.xorb}, which was not uploaded "
                                    "and described by a shard")
            if not 0 <= term.start < term.end <= len(xorb.chunk_hashes):
                raise CasError(400, f"file {record.hash}: chunks {term.start}-{term.end} not in xorb {term.xorb}")
            if verification_hash(xorb.chunk_hashes[term.start:term.end]) != proof:
                raise CasError(400, f"file {record.hash}: verification hash of a term does not match")
            if sum(xorb.chunk_sizes[term.start:term.end]) != term.unpacked_bytes:
                raise CasError(400, f"file {record.hash}: a term's unpacked size does not match its chunks")
            parts.append(xorb.chunk_bytes(term.start, term.end))
            chunks += zip(xorb.chunk_hashes[term.start:term.end], xorb.chunk_sizes[term.start:term.end])
        if hash_hex(file_hash(chunks)) != record.hash:
            raise CasError(400, f"file {record.hash}: not the merkle hash of its chunks")
        data = b"".join(parts)
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise CasError(400, f"file {record.hash}: the reconstructed bytes do not match the declared sha256")
        if _xet_file_hash(data) != record.hash:
            raise CasError(400, f"file {record.hash}: hf_xet hashes the reconstructed bytes differently")
        return data

    def _h_reconstruction(self, params, query, body, headers):
        token = self._auth(headers)
        record = self.files.get(token.repo_key, {}).get(params["hash"])
        if record is None:
            raise CasError(404, f"file {params['hash']} not found")
        first, last = 0, record.size - 1
        rng = re.fullmatch(r"bytes=(\d+)-(\d*)", headers.get("Range") or "")
        if rng:
            first, last = int(rng[1]), min(int(rng[2] or last), last)
            if first > last:
                raise CasError(416, "range start past the end of the file")
        terms, offset, pos = [], None, 0
        for term in record.terms:
            xorb = self.xorbs[term.xorb]
            start = end = None
            for k in range(term.start, term.end):
                size = xorb.chunk_sizes[k]
                if pos + size > first and pos <= last:  # chunk k overlaps the requested bytes
                    if offset is None:
                        offset = first - pos
                    start, end = k if start is None else start, k + 1
                pos += size
            if start is not None:
                terms.append({"hash": term.xorb, "range": {"start": start, "end": end},
                              "unpacked_length": sum(xorb.chunk_sizes[start:end])})
        fetch = {h: [self._fetch_info(self.xorbs[h], a, b) for a, b in ranges]
                 for h, ranges in _merged_ranges(terms).items()}
        return _json({"offset_into_first_range": offset or 0, "terms": terms, "fetch_info": fetch})

    def _fetch_info(self, xorb: Xorb, start: int, end: int) -> dict:
        first, last = xorb.packed_range(start, end)
        sig = secrets.token_urlsafe(16)
        self._signed[sig] = SignedRange(xorb.hash, first, last, time.time() + FETCH_TTL_S)
        return {"range": {"start": start, "end": end}, "url": f"{self.url}/fetch/{xorb.hash}?sig={sig}",
                "url_range": {"start": first, "end": last}}

    def _h_fetch(self, params, query, body, headers):
        signed = self._signed.get((query.get("sig") or [""])[0])
        if signed is None or signed.xorb != params["hash"] or signed.expires <= time.time():
            raise CasError(403, "unsigned or expired fetch URL")
        rng = re.fullmatch(r"bytes=(\d+)-(\d+)", headers.get("Range") or "")
        if not rng or not signed.first <= int(rng[1]) <= int(rng[2]) <= signed.last:
            raise CasError(403, "the Range header must lie within the signed byte range")
        first, last = int(rng[1]), int(rng[2])
        data = self.xorbs[signed.xorb].data[first:last + 1]
        self.xorb_bytes_served += len(data)
        total = len(self.xorbs[signed.xorb].data)
        return 206, {"Content-Type": "application/octet-stream", "Content-Range": f"bytes {first}-{last}/{total}"}, data

    def _h_dedup(self, params, query, body, headers):
        self._auth(headers)
        if params["prefix"] not in ("default", "default-merkledb"):  # hf_xet 1.8 sends "default"
            raise CasError(400, f"unknown dedup prefix {params['prefix']!r}")
        try:
            chunk = hash_raw(params["hash"])
        except ValueError:
            raise CasError(400, "malformed chunk hash") from None
        found = sorted(self._chunk_to_xorbs.get(chunk, ()))
        if not found:
            raise CasError(404, "chunk not tracked by global deduplication")
        now = int(time.time())
        shard = dedup_shard([self.xorbs[h] for h in found], now, now + DEDUP_SHARD_TTL_S)
        return 200, {"Content-Type": "application/octet-stream"}, shard


def _merged_ranges(terms: list[dict]) -> dict[str, list[tuple[int, int]]]:
    """Per xorb, the chunk ranges of ``terms`` merged where they overlap or touch: each term then
    lies inside exactly one fetch range, as the client expects (a file may use a chunk many times)."""
    by_xorb: dict[str, list[tuple[int, int]]] = {}
    for t in terms:
        by_xorb.setdefault(t["hash"], []).append((t["range"]["start"], t["range"]["end"]))
    merged = {}
    for xorb, ranges in by_xorb.items():
        out: list[tuple[int, int]] = []
        for start, end in sorted(ranges):
            if out and start <= out[-1][1]:
                out[-1] = (out[-1][0], max(out[-1][1], end))
            else:
                out.append((start, end))
        merged[xorb] = out
    return merged


def _xet_file_hash(data: bytes) -> str:
    """The Xet file hash of ``data`` as hf_xet (the reference implementation) computes it."""
    import hf_xet

    with tempfile.TemporaryDirectory(prefix="fakehub-cas-") as tmp:
        path = Path(tmp) / "file"
        path.write_bytes(data)
        return hf_xet.hash_files([str(path)])[0].hash
