"""Bytes each job of a fanned-out publish moves (publish.yml: plan → reference → N builds → publish),
run job by job against the local test Hub (tests/hubserver.py) with the real huggingface_hub client.

    python benchmarks/fanout_bytes.py [--source examples/tiny-phi3] [--recipe edge-gguf] [--xet]

Prints, per job: bytes the Hub received (uploads), bytes it sent (source downloads), the size of
the job's Actions artifact, and the hubbot commits made. Never part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOKEN = "hf_benchmark-token-0123456789"
USER = "bench"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--source", type=Path, default=ROOT / "examples" / "tiny-phi3")
    args.add_argument("--recipe", default="edge-gguf")
    args.add_argument("--xet", action="store_true", help="upload through Xet (default: LFS)")
    opts = args.parse_args()
    from tests.hubserver import FakeHub

    repo = "microsoft/Phi-3-fanout-bench"
    with FakeHub(users={USER: TOKEN}) as hub, tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hub.seed_repo(repo, {p.name: p for p in opts.source.iterdir() if p.is_file()})
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(tmp / "hf"),
               "HUBBOT_CACHE": str(tmp / "cache"), "HF_HUB_DISABLE_PROGRESS_BARS": "1",
               "HUBBOT_LLAMA_CPP_DIR": os.environ.get("HUBBOT_LLAMA_CPP_DIR", "")}
        env.pop("GITHUB_ACTIONS", None)
        if not env["HUBBOT_LLAMA_CPP_DIR"]:
            env.pop("HUBBOT_LLAMA_CPP_DIR")
        if opts.xet:
            env.pop("HF_HUB_DISABLE_XET", None)
        else:
            env["HF_HUB_DISABLE_XET"] = "1"

        def job(name: str, *argv: str, artifact: Path | None = None) -> str:
            hub.reset_counters()
            env["HF_HOME"] = str(tmp / f"hf-{name}")  # each job on a fresh runner: its own cache
            done = subprocess.run([sys.executable, "-m", "hubbot.cli", *argv], env=env, capture_output=True,
                                  text=True, cwd=tmp)
            if done.returncode:
                sys.exit(f"{name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
            received = hub.bytes_uploaded
            sent = sum(hub.bytes_downloaded.values())
            commits = [c for r in hub.repos.values() for c in r.commits.values() if c.title.startswith("hubbot:")]
            print(f"| {name} | {received:,} | {sent:,} | {folder_bytes(artifact) if artifact else 0:,} | "
                  f"{len(commits)} |", flush=True)
            return done.stdout

        print(f"fan-out of {opts.source.name}, recipe {opts.recipe}, {'Xet' if opts.xet else 'LFS'}\n")
        print("| job | bytes the Hub received | bytes the Hub sent | artifact | hubbot commits so far |")
        print("|---|---|---|---|---|")
        matrix = json.loads(job("plan", "plan", repo, "--recipe", opts.recipe, "--github-matrix"))
        reference = tmp / "reference" / "reference.json"
        job("reference", "reference", repo, "--out", str(reference), artifact=reference.parent)
        built = tmp / "built"
        for entry in matrix["include"]:
            v = entry["variant"]
            job(f"build {v}", "build", repo, "--recipe", opts.recipe, "--variant", v, "--out", str(built / v),
                "--reference", str(reference), "--preupload", artifact=built / v)
        job("publish", "publish", "--from-artifacts", str(built), artifact=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
