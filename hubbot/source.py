"""SOURCE: a family alias, a Hub repo id (``owner/name[@revision]``) or a local folder.

Resolving is offline (``resolve``); ``fetch`` pins a Hub source to a commit SHA and downloads
only what the backends read (safetensors weights, configs, tokenizer files, the model card).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends.support import canonical_architecture
from .errors import DiskFullError, HubbotError, UsageError
from .recipe import Family

SNAPSHOT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer.model",
                     "*.jinja", "*.txt", "*.py", "README.md", "LICENSE*"]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # what looks like a repo id; validate_repo_id decides
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class SourceRef:
    spec: str  # what the user typed
    family: Family
    model_name: str  # the name variants are named after, e.g. "phi-4"
    repo_id: str | None = None  # Hub sources
    revision: str | None = None
    path: Path | None = None  # local sources
    license: str | None = None  # from the recipe, when the source card has none

    @property
    def is_local(self) -> bool:
        return self.path is not None

    @property
    def display(self) -> str:
        return str(self.path) if self.is_local else f"{self.repo_id}@{self.revision or 'main'}"

    @property
    def public_name(self) -> str:
        """How published files name the source: never a local path."""
        return self.path.name if self.is_local else f"{self.repo_id}@{self.revision or 'main'}"


@dataclass
class Snapshot:
    ref: SourceRef
    path: Path
    commit: str  # Hub commit SHA, or "local:<sha256 of the files>"
    config: dict[str, Any]
    license: str | None
    card_data: dict[str, Any] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.ref.repo_id


def resolve(spec: str, families: dict[str, Family], family: str | None = None) -> SourceRef:
    """Turn SOURCE into a SourceRef without touching the network."""
    if family and family not in families:
        raise UsageError(f"unknown family '{family}'; known: {', '.join(families)}")
    candidates = [families[family]] if family else list(families.values())
    for fam in candidates:
        if spec in fam.models:
            m = fam.models[spec]
            return SourceRef(spec, fam, m.repo.split("/")[1], repo_id=m.repo, license=m.license)
    path = Path(spec).expanduser()
    if path.exists():
        return _local_ref(spec, path, candidates)
    repo_id, _, revision = spec.partition("@")
    if REPO_ID.match(repo_id) and not spec.startswith((".", "/", "~")):
        fam = next((f for f in candidates if f.matches_repo(repo_id)), None)
        if fam is None and len(candidates) == 1:
            fam = candidates[0]
        if fam is None:
            raise UsageError(f"'{repo_id}' matches no family's models or watch patterns; "
                             f"pass --family ({', '.join(families)})")
        check_repo_id(repo_id, "source")
        m = fam.model_for_repo(repo_id)
        return SourceRef(spec, fam, repo_id.split("/")[1], repo_id=repo_id,
                         revision=revision or None, license=m.license if m else None)
    aliases = sorted(a for f in candidates for a in f.models)
    raise UsageError(f"source '{spec}' is not a family alias ({', '.join(aliases)}), "
                     f"a Hub repo id (owner/name[@revision]) or an existing folder")


def _local_ref(spec: str, path: Path, candidates: list[Family]) -> SourceRef:
    if not path.is_dir():
        raise UsageError(f"source '{spec}' is a file; give the model's folder")
    config = read_config(path)
    arch = (config.get("architectures") or [None])[0]
    fam = next((f for f in candidates if canonical_architecture(arch) in f.architectures), None)
    if fam is None:
        known = sorted({a for f in candidates for a in f.architectures})
        raise UsageError(f"{path / 'config.json'}: architecture {arch!r} belongs to no family "
                         f"(known: {', '.join(known)}); pass --family or add it to a recipe")
    return SourceRef(spec, fam, path.resolve().name, path=path.resolve())


def read_config(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UsageError(f"{path}: no config.json; is this a Hugging Face model folder?")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{config_path}: must be a JSON object")
    return config


def config_dtype(config: dict[str, Any]) -> str | None:
    """The dtype config.json declares (transformers 5 writes ``dtype``, older versions ``torch_dtype``)."""
    value = config.get("dtype") or config.get("torch_dtype")
    return str(value) if value else None


@dataclass(frozen=True)
class SafetensorsHeader:
    """A safetensors file's JSON header: what each tensor is and where its bytes lie after the header."""

    path: Path
    header_bytes: int  # the JSON's length, after the 8-byte length prefix
    tensors: dict[str, dict[str, Any]]  # name -> {"dtype", "shape", "data_offsets"}

    @property
    def data_start(self) -> int:
        return 8 + self.header_bytes

    @property
    def data_bytes(self) -> int:
        """How many bytes of tensor data the header describes."""
        return max((t["data_offsets"][1] for t in self.tensors.values()), default=0)


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """Parse one file's header (never its tensor data); UsageError naming the file and what is wrong."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) < 8:
            raise UsageError(f"{path}: not a safetensors file: {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise UsageError(f"{path}: not a safetensors file (or cut off in its header): the header length says "
                             f"{n} bytes, the file has {size - 8} after the length")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise UsageError(f"{path}: safetensors header must be a JSON object, found {type(header).__name__}")
    tensors = {name: _tensor_entry(path, name, meta) for name, meta in header.items() if name != "__metadata__"}
    return SafetensorsHeader(path, n, tensors)


def _tensor_entry(path: Path, name: str, meta: Any) -> dict[str, Any]:
    def is_ints(value: Any, length: int | None = None) -> bool:
        return (isinstance(value, list) and (length is None or len(value) == length)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value))

    if not isinstance(meta, dict) or not isinstance(meta.get("dtype"), str) or not is_ints(meta.get("shape")) \
            or not is_ints(meta.get("data_offsets"), 2) or meta["data_offsets"][0] > meta["data_offsets"][1]:
        raise UsageError(f"{path}: tensor '{name}': header entry must be {{dtype: str, shape: [int, ...], "
                         f"data_offsets: [start, end]}}, found {json.dumps(meta)[:200]}")
    return meta


def safetensors_tensors(folder: Path) -> Iterator[dict[str, Any]]:
    """The header entry (dtype, shape, data_offsets) of every tensor in the folder's *.safetensors files;
    no tensor data is read."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        yield from read_safetensors_header(f).tensors.values()


def chat_template(model_dir: Path) -> str | None:
    """The model's chat template: chat_template.jinja (transformers 5), else tokenizer_config.json's."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{config}: not valid JSON ({e})") from None
    template = template.get("chat_template") if isinstance(template, dict) else None
    return template if isinstance(template, str) else None


def check_repo_id(repo_id: str, what: str) -> None:
    """UsageError unless the Hub accepts ``repo_id`` (huggingface_hub's own validator)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UsageError(f"{what} '{repo_id}' is not a valid Hub repo id: {e}") from None


def _folder_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def download_disk_guard(repo_id: str, commit: str, cache_dir: str | Path | None) -> Iterator[None]:
    """A full disk while the source downloads becomes one DiskFullError line (exit 1), not a traceback.

    huggingface_hub keeps what it had written as ``*.incomplete`` blobs and resumes them next time,
    so nothing is removed; the message says where they are."""
    from huggingface_hub.constants import HF_HUB_CACHE

    from .preflight import existing_parent

    cache = Path(cache_dir or HF_HUB_CACHE)
    free = shutil.disk_usage(existing_parent(cache)).free  # the real figure, not HUBBOT_FREE_DISK's
    try:
        yield
    except Exception as e:
        if not _no_space(e):
            raise
        from .card import human_size

        raise DiskFullError(f"no space left on the disk of {cache} while downloading the source "
                            f"{repo_id}@{commit[:12]}: it had {human_size(free)} free when the download "
                            f"started; the partial files stay in that cache for the next run to resume. Make "
                            f"room there, or point HF_HUB_CACHE at a bigger disk") from None


def _no_space(error: BaseException) -> bool:
    """ENOSPC from a write of huggingface_hub's, or hf_xet's (a Rust error carrying the OS message)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or os.strerror(errno.ENOSPC) in str(error):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


@dataclass(frozen=True)
class HubSource:
    """A Hub source as checked before its weights are downloaded."""

    commit: str
    config: dict[str, Any]
    parameter_count: dict[str, int]  # per dtype, from the safetensors headers


def check_hub_source(ref: SourceRef, api: Any, cache_dir: str | Path | None = None) -> HubSource:
    """Pin a Hub source to its commit and check it before any weights are downloaded (config.json,
    the index and the safetensors headers, by ranged reads)."""
    from . import source_check

    with reading_hub_source(ref, api, "read the source"):
        info = api.model_info(ref.repo_id, revision=ref.revision)
        config, counts = source_check.check_hub_weights(api, ref.repo_id, info.sha,
                                                        (f.rfilename for f in info.siblings or []),
                                                        f"{ref.repo_id}@{info.sha[:12]}", cache_dir)
    return HubSource(info.sha, config, counts)


@contextlib.contextmanager
def reading_hub_source(ref: SourceRef, api: Any, doing: str) -> Iterator[None]:
    """The Hub's answers about a source as one line each: not found, no such revision, a server
    error to retry later, or (through ``hub.reaching``) no connection at all."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .hub import reaching, transport_failure, underlying

    with reaching(api.endpoint, f"{doing} {ref.repo_id}"):
        try:
            yield
        except RepositoryNotFoundError:
            raise UsageError(f"source repo '{ref.repo_id}' not found on {api.endpoint} "
                             f"(or it is private/gated and the token cannot read it)") from None
        except RevisionNotFoundError:
            raise UsageError(f"source '{ref.repo_id}' has no revision '{ref.revision}'") from None
        except (HfHubHTTPError, LocalEntryNotFoundError) as e:
            error = underlying(e)
            if transport_failure(e) is not None:
                raise  # a connection failure: ``reaching`` says so
            status = error.response.status_code if isinstance(error, HfHubHTTPError) and \
                error.response is not None else None
            if status is not None and (status >= 500 or status == 429):
                raise HubbotError(f"cannot read source '{ref.repo_id}' from {api.endpoint}: the Hub answered "
                                  f"HTTP {status}; try again later") from None
            raise UsageError(f"cannot read source '{ref.repo_id}': {error}") from None


def _card_data(path: Path) -> dict[str, Any]:
    readme = path / "README.md"
    if not readme.is_file():
        return {}
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(readme).data.to_dict()
    except Exception:  # a source card with broken YAML still converts; it just has no metadata
        return {}


def fetch(ref: SourceRef, api: Any = None, cache_dir: Path | None = None) -> Snapshot:
    """Pin and download a Hub source, or read a local one; either is checked (``hubbot.source_check``)
    before anything is built, a Hub source's headers and config also before its weights are downloaded."""
    from . import source_check

    if ref.is_local:
        source_check.check_folder(ref.path, ref.family)  # before hashing every byte of it
        path, commit = ref.path, "local:" + _folder_digest(ref.path)[:16]
    else:
        # HF_HUB_CACHE is read when huggingface_hub is imported; honour a later change too
        cache_dir = cache_dir or os.environ.get("HF_HUB_CACHE")
        commit = check_hub_source(ref, api, cache_dir).commit
        with reading_hub_source(ref, api, "download the source"), download_disk_guard(ref.repo_id, commit, cache_dir):
            path = Path(api.snapshot_download(ref.repo_id, revision=commit, allow_patterns=SNAPSHOT_PATTERNS,
                                              cache_dir=cache_dir))
        source_check.check_folder(path, ref.family)
    card = _card_data(path)
    license_ = card.get("license") or ref.license
    return Snapshot(ref, path, commit, read_config(path), license_, card)
