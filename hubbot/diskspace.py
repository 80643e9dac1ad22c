"""diskspace: a disk that fills up during a build ends the run with one line, not a traceback.

``guarded_scratch_folder`` is the scratch folder of one repo's build and write. A write in it
that fails with ENOSPC, in hubbot itself (an ``OSError``) or in a format's tool (its
``BuildError``, when the tool's log says "No space left on device" or the disk it wrote to has
under 1 MiB left), becomes a ``DiskFullError`` (exit 1) naming what was being written, on which
disk, how much this run needs there by the preflight's estimate, and how much that disk had free
when the repo's build started. The scratch folder is removed on the way out, as on any failure.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import preflight
from .card import human_size
from .errors import BuildError, DiskFullError
from .plan import Plan, parameters_by_dtype
from .scratch import scratch_folder
from .source import Snapshot

NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device", as every tool prints it
NEARLY_FULL = 1 << 20
Log = Callable[[str], None]


@dataclass(frozen=True)
class Watched:
    """One folder the run writes to, what goes there, and what the preflight expects it to need."""

    what: str
    path: Path
    option: str | None  # the option that moves it elsewhere
    needed: int | None  # bytes on its disk, all the run's needs on that disk together
    free_at_start: int


def free_bytes(path: Path) -> int:
    """What the disk really has (``HUBBOT_FREE_DISK`` tells the preflight otherwise, not this)."""
    return shutil.disk_usage(preflight.existing_parent(path)).free


def watched_folders(plan: Plan, snapshot: Snapshot, workdir: Path | None, out_dir: Path | None) -> list[Watched]:
    """The folders a repo's build writes to (the working files first), with the preflight's disk
    estimate for each disk (None where the source's size cannot be read)."""
    folders = [("the working files", Path(workdir or tempfile.gettempdir()), "--workdir")]
    if out_dir is not None:
        folders.append(("the output folder", Path(out_dir), "--out"))
    size = preflight.SourceSize.from_counts(parameters_by_dtype(snapshot.path))
    needs = preflight.estimate_run(plan, size.parameters, size.dtype, workdir=workdir, out_dir=out_dir).disk \
        if size else []
    watched = []
    for what, path, option in folders:
        on_disk = [n.bytes for n in needs if preflight.same_disk(n.path, path)]
        watched.append(Watched(what, path, option, sum(on_disk) if on_disk else None, free_bytes(path)))
    return watched


def no_space(error: BaseException, folders: list[Watched]) -> Watched | None:
    """The folder whose disk ran out when ``error`` is a full disk, else None."""
    work = folders[0]
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        written = error.filename2 or error.filename  # copyfile names the destination second
        if written:
            path = Path(os.fsdecode(written))
            return next((f for f in folders if preflight.same_disk(path, f.path)),
                        Watched(f"{path.name}", path.parent, None, None, free_bytes(path.parent)))
        return next((f for f in folders if free_bytes(f.path) < NEARLY_FULL), work)
    if isinstance(error, BuildError):  # the tools write into the working files only
        return work if NO_SPACE in str(error) or free_bytes(work.path) < NEARLY_FULL else None
    return None


def message(folder: Watched, label: str) -> str:
    needed = f"~{human_size(folder.needed)}" if folder.needed is not None else "an unknown amount"
    return (f"no space left on the disk of {folder.path} while writing {folder.what} of {label}: this run "
            f"needs {needed} there (the preflight's estimate) and it had {human_size(folder.free_at_start)} "
            f"free when {label} started; make room there"
            + (f", or point {folder.option} at a bigger disk" if folder.option else ""))


@contextlib.contextmanager
def guarded_scratch_folder(plan: Plan, snapshot: Snapshot, label: str, *, workdir: Path | None = None,
                           out_dir: Path | None = None, log: Log = lambda _: None) -> Iterator[Path]:
    """A scratch folder for building ``label`` (a repo), in which a full disk becomes one
    ``DiskFullError`` line. A tool's failure is judged before the folder is removed, while the
    disk is still as full as the tool found it."""
    folders = watched_folders(plan, snapshot, workdir, out_dir)
    try:
        with scratch_folder(workdir, log) as tmp:
            try:
                yield tmp
            except (OSError, BuildError) as e:
                full = no_space(e, folders)
                if full is None:
                    raise
                raise DiskFullError(message(full, label)) from None
    except OSError as e:  # the scratch folder itself could not be made
        if e.errno != errno.ENOSPC:
            raise
        raise DiskFullError(message(folders[0], label)) from None
