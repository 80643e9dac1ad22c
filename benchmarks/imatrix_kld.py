"""What an importance matrix buys: KL divergence of Q4_K_M with and without one, against the F16.

    python benchmarks/imatrix_kld.py [--source examples/tiny-phi3] [--quant Q4_K_M] [--text FILE ...]

Builds llama.cpp's tools (or finds them in the cache) and prints how long their build took and
the machine's load when it started; publishes F16, QUANT and QUANT with an importance matrix (on
the bundled calibration text) into a temporary folder with hubbot itself; then runs the built
``llama-perplexity --kl-divergence-base`` on the F16 and ``--kl-divergence`` on both quants over
each text: the bundled calibration text (what the matrix was computed on, so in-sample) and, by
default, this repo's README.md (held out). Never part of the test run.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CALIBRATION = ROOT / "recipes" / "calibration" / "phi-calibration.txt"
METRICS = {  # llama-perplexity's summary lines
    "mean_kld": r"Mean\s+KLD:\s+([-\d.]+)",
    "p99_kld": r"99\.0%\s+KLD:\s+([-\d.]+)",
    "max_kld": r"Maximum KLD:\s+([-\d.]+)",
    "ppl_ratio": r"Mean PPL\(Q\)/PPL\(base\)\s+:\s+([-\d.]+)",
    "same_top_p_percent": r"Same top p:\s+([-\d.]+)",
}


def publish(source: Path, quant: str, out: Path) -> Path:
    """F16, QUANT and QUANT with the bundled matrix, built and validated by `hubbot publish --out`."""
    from click.testing import CliRunner

    from hubbot.cli import main

    data = yaml.safe_load((ROOT / "recipes" / "phi.yaml").read_text())
    data["recipes"] = {"bench": {"variants": [
        {"format": "gguf", "precision": "F16"},
        {"format": "gguf", "precision": quant},
        {"format": "gguf", "precision": quant, "options": {"imatrix": f"calibration/{CALIBRATION.name}"}},
    ]}}
    data["watch"]["default_recipe"] = "bench"
    data["naming"]["gguf"] = {"repo": "{model}-GGUF", "path": "{model}-{variant}.gguf"}
    recipes = out / "recipes"
    recipes.mkdir()
    (recipes / "phi.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    shutil.copytree(CALIBRATION.parent, recipes / "calibration")
    result = CliRunner().invoke(main, ["--recipes-dir", str(recipes), "publish", str(source), "--recipe", "bench",
                                       "--out", str(out / "repos")])
    if result.exit_code:
        sys.exit(f"publish failed:\n{result.output}")
    return out / "repos" / f"{source.name}-GGUF"


def perplexity(tools: Path, model: Path, text: Path, base: Path, ctx: int, first: bool) -> dict[str, float]:
    mode = ["--kl-divergence-base", str(base)] if first else ["--kl-divergence-base", str(base), "--kl-divergence"]
    cmd = [str(tools / "llama-perplexity"), "-m", str(model), "-f", str(text), "--ctx-size", str(ctx),
           "--threads", "1", *mode]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{run.stderr[-2000:]}")
    found = {name: re.search(pattern, run.stdout + run.stderr) for name, pattern in METRICS.items()}
    chunks = re.search(r"(?:calculating perplexity|computing) over (\d+) chunks", run.stderr + run.stdout)
    return {"chunks": int(chunks.group(1)) if chunks else None,
            **{name: float(m.group(1)) for name, m in found.items() if m}}


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--source", type=Path, default=ROOT / "examples" / "tiny-phi3")
    args.add_argument("--quant", default="Q4_K_M")
    args.add_argument("--text", type=Path, action="append", help="texts to measure on (default: calibration, README)")
    args.add_argument("--ctx", type=int, default=512, help="llama-perplexity's context (each text needs 2x this)")
    opts = args.parse_args()
    from hubbot.llamacpp_tools import build_record, tools_dir

    started = time.monotonic()
    tools = tools_dir(log=lambda line: print(f"  {line}", file=sys.stderr))
    print(json.dumps({"tools": str(tools), "found_or_built_in_seconds": round(time.monotonic() - started, 1),
                      "build": build_record()}, indent=2))
    texts = opts.text or [CALIBRATION, ROOT / "README.md"]
    with tempfile.TemporaryDirectory() as tmp:
        repo = publish(opts.source, opts.quant, Path(tmp))
        name = opts.source.name
        f16, plain, weighted = (repo / f"{name}-{s}.gguf" for s in ("F16", opts.quant, f"{opts.quant}-imatrix"))
        results = []
        for text in texts:
            base = Path(tmp) / f"{text.stem}.kld"
            perplexity(tools, f16, text, base, opts.ctx, first=True)
            for label, model in (("without imatrix", plain), ("with imatrix", weighted)):
                row = perplexity(tools, model, text, base, opts.ctx, first=False)
                results.append({"text": text.name, "quant": opts.quant, "imatrix": label, **row})
                print(json.dumps(results[-1]))
        validation = json.loads((repo / "validation.json").read_text())
        print(json.dumps({v["variant_id"]: v["agreement"] for v in validation["variants"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
