"""Scale benchmark: what building each variant costs at the size of a real Phi release.

    # a random-weight checkpoint with the exact shape of a release (or `small`, ~41 MB, for testing)
    python benchmarks/scale.py make-model --shape {phi-3.5-mini,phi-4,small,small-phi4} OUT_DIR
    # per variant: `hubbot build` in its own process, then the same tool run by hand; one JSON line each
    python benchmarks/scale.py run MODEL_DIR --recipe edge [--variants ID,...] [--no-hand | --hand-only]
    # the validation reference alone (kept for `run --reference FILE`, as a fanned-out publish passes it)
    python benchmarks/scale.py reference MODEL_DIR --keep-in DIR
    # one whole `hubbot publish --out`
    python benchmarks/scale.py publish MODEL_DIR --recipe edge [--no-preflight]
    # markdown tables, one per model shape
    python benchmarks/scale.py report benchmarks/results/scale.jsonl [--out FILE.md]

It runs whatever hubbot is importable (PYTHONPATH or the virtualenv's install; every command is
started in a scratch folder, so the current folder never shadows it) with the interpreter that runs
this script. Each measured run gets fresh work/, out/, tmp/ (TMPDIR) and hf/ (HF_HOME) folders
under --scratch, removed afterwards unless --keep; logs stay in SCRATCH/logs. Memory is the whole
process tree's RssAnon (+RssShmem) and RssFile, sampled every 0.5 s; disk is the allocated size of
those folders, sampled every 1-5 s. A failed or killed run is recorded with its exit code and the
tail of its log, and the benchmark moves on. Never part of the test run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from scale_lib.shapes import SHAPES

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "scale.jsonl"


def cmd_make_model(args) -> int:
    from scale_lib.make_model import make_model

    started = time.monotonic()
    shape = SHAPES[args.shape]
    print(f"writing {args.shape}: {shape.parameters():,} parameters, {shape.parameters() * 2 / 1e9:.2f} GB "
          f"of bf16 weights → {args.out_dir}", flush=True)
    info = make_model(args.shape, args.out_dir, seed=args.seed, log=lambda s: print(s, flush=True))
    print(f"made {info['out']}: {info['shards']} shard(s), {info['weight_bytes'] / 1e9:.2f} GB, "
          f"{time.monotonic() - started:.1f} s, peak RSS {info['peak_rss_bytes'] / 2**30:.2f} GiB")
    return 0


def _runner(args):
    from scale_lib.runner import Runner

    if not (args.model_dir / "config.json").is_file():
        sys.exit(f"{args.model_dir}: no config.json")
    return Runner(args.model_dir, args.recipe, args.results, args.scratch, args.keep)


def cmd_run(args) -> int:
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    records = _runner(args).run(wanted, hubbot=not args.hand_only, hand=args.hand or args.hand_only,
                                reference=args.reference)
    print(f"{len(records)} measurement(s) appended to {args.results}")
    return 1 if any(r["rc"] for r in records) else 0


def cmd_reference(args) -> int:
    record = _runner(args).reference(args.keep_in)
    print(f"appended to {args.results}; the reference: {args.keep_in / 'reference.json'}")
    return 1 if record["rc"] else 0


def cmd_publish(args) -> int:
    record = _runner(args).publish(("--no-preflight",) if args.no_preflight else ())
    print(f"appended to {args.results}")
    return 1 if record["rc"] else 0


def cmd_report(args) -> int:
    from scale_lib.report import load, render

    text = render(load(args.results))
    if args.out:
        args.out.write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-model", help="write a random-weight Phi3ForCausalLM of a real release's shape")
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("out_dir", type=Path, help="keep 'phi3'/'phi-3' in its name for Phi-3 shapes (llama.cpp reads it)")
    p.set_defaults(func=cmd_make_model)

    def runner_args(p):
        p.add_argument("model_dir", type=Path)
        p.add_argument("--recipe", default="edge")
        p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help=f"JSON lines (default {DEFAULT_RESULTS})")
        p.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "hubbot-scale",
                       help="where runs write (default: $TMPDIR/hubbot-scale); needs room for the biggest run")
        p.add_argument("--keep", action="store_true", help="keep each run's work and output folders")

    p = sub.add_parser("run", help="measure hubbot build and the tool by hand, per variant")
    runner_args(p)
    p.add_argument("--variants", help="comma-separated ids from `hubbot plan MODEL --recipe R` (default: all)")
    p.add_argument("--hand", action=argparse.BooleanOptionalAction, default=True,
                   help="also run each variant's tool by hand (default: yes)")
    p.add_argument("--hand-only", action="store_true", help="only the by-hand runs, no hubbot build")
    p.add_argument("--reference", type=Path, help="pass this reference file to every `hubbot build` (as a "
                   "fanned-out publish does; made by the `reference` command), so no build row pays for it")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("reference", help="measure `hubbot reference MODEL` (computed, never from a cache)")
    runner_args(p)
    p.add_argument("--keep-in", type=Path, required=True,
                   help="folder to keep reference.json in, for `run --reference`")
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("publish", help="measure one whole `hubbot publish MODEL --recipe R --out DIR`")
    runner_args(p)
    p.add_argument("--no-preflight", action="store_true",
                   help="pass --no-preflight: measure a run the preflight's (high-leaning) disk estimate refuses")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("report", help="markdown tables from a results file")
    p.add_argument("results", type=Path)
    p.add_argument("--out", type=Path)
    p.set_defaults(func=cmd_report)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
