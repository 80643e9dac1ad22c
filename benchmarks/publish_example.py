"""Measure the example publish: wall time, peak memory, bytes uploaded.

    .venv/bin/python benchmarks/publish_example.py [--source DIR] [--recipe edge] [--hub]

Without --hub it runs `hubbot publish SOURCE --recipe R --out TMP`. With --hub it starts the test
Hub server on 127.0.0.1, publishes there twice, and reports the bytes each run uploaded (the
second run should upload 0). Peak memory is the largest resident set among hubbot and the tools
it ran (llama.cpp's converter runs in a child process).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_publish(args: list[str], env: dict[str, str]) -> tuple[float, int]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "hubbot.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.monotonic() - started
    if proc.returncode:
        sys.exit(f"publish failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, peak_kib * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(ROOT / "examples" / "tiny-phi3"))
    parser.add_argument("--recipe", default="edge")
    parser.add_argument("--hub", action="store_true", help="publish to a local test Hub and count bytes")
    opts = parser.parse_args()
    env = {**os.environ, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        if not opts.hub:
            wall, peak = run_publish(["publish", opts.source, "--recipe", opts.recipe, "--out", tmp], env)
            files = [p for p in Path(tmp).rglob("*") if p.is_file()]
            print(f"publish --out: wall {wall:.1f} s, peak RSS {peak / 2**20:.0f} MiB, "
                  f"{len(files)} files, {sum(p.stat().st_size for p in files) / 1e6:.1f} MB written")
            return
        sys.path.insert(0, str(ROOT))
        from tests.hubserver import FakeHub

        token = "hf_benchmark_token_000000000000"
        with FakeHub(users={"bench": token}) as hub:
            env.update(HF_ENDPOINT=hub.url, HF_TOKEN=token, HF_HOME=str(Path(tmp) / "hf"))
            for attempt in ("first", "second"):
                hub.reset_counters()
                wall, peak = run_publish(["publish", opts.source, "--recipe", opts.recipe], env)
                print(f"publish to hub ({attempt} run): wall {wall:.1f} s, peak RSS {peak / 2**20:.0f} MiB, "
                      f"uploaded {hub.bytes_uploaded} bytes in {len(hub.requests)} requests")


if __name__ == "__main__":
    main()
