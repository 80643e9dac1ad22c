"""Files out of a PyPI source distribution, fetched once into hubbot's cache.

llama.cpp's converter lives only in the llama-cpp-python sdist; the test fixtures take GPT-2's
BPE ranks from openai-whisper's. Both come through here: ``pip download`` of the sdist (the
package index is the one network source every machine of the project reaches), the members
that match extracted into a staging folder, and the folder renamed into place atomically, so a
half-extracted copy is never used and two concurrent runs do not clash.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import BuildError

Log = Callable[[str], None]


def fetch_sdist_files(requirement: str, prefix: str, members: tuple[str, ...], target: Path,
                      *, log: Log = lambda _: None) -> Path:
    """Extract the sdist's files under ``prefix`` whose path (after the prefix) starts with one of
    ``members`` into ``target``, once; return ``target``.

    ``requirement`` is pinned (``name==version``); ``prefix`` is the folder inside the archive's
    top-level folder, e.g. ``vendor/llama.cpp/`` ('' for the top level).
    """
    if target.is_dir():
        return target
    log(f"fetching {', '.join(members)} from the {requirement} sdist (once, into {target.parent})")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--no-binary", ":all:", requirement, "-d", tmp]
        run = subprocess.run(cmd, capture_output=True, text=True)
        sdists = [p for p in Path(tmp).iterdir() if p.name.endswith((".tar.gz", ".tgz"))]
        if run.returncode or not sdists:
            raise BuildError(f"could not download the {requirement} sdist from the package index: "
                             f"{run.stderr.strip()[-500:] or 'no source archive'}")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        staging.chmod(0o755)
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                top, _, rest = member.name.partition("/")
                if not rest.startswith(prefix):
                    continue
                rel = rest[len(prefix):]
                if rel.startswith(members) and (member.isfile() or member.isdir()):
                    member.name = rel
                    tar.extract(member, staging, filter="data")
        try:
            staging.rename(target)
        except OSError:  # another run got there first
            shutil.rmtree(staging, ignore_errors=True)
    return target
