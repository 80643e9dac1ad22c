"""`report`: the results file as markdown, one table per model shape (the latest run of each cell)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any


def load(results: Path) -> list[dict[str, Any]]:
    records = []
    for n, line in enumerate(results.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"{results}:{n}: not JSON ({e})") from None
    return records


def mem(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def size(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def seconds(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 100:
        return f"{s:.1f} s"
    m, sec = divmod(round(s), 60)
    return f"{m} min {sec:02d} s"


def complete(r: dict[str, Any] | None) -> bool:
    """It ran to the end: exit 0, or hubbot's exit 1 for a variant that failed validation."""
    return bool(r) and r.get("outcome") != "exit 0 but wrote no output" and (
        r["rc"] == 0 or r.get("outcome") == "failed validation")


def refused(r: dict[str, Any] | None) -> bool:
    """hubbot's exit 2 before any build: the preflight said the variant does not fit this machine."""
    return bool(r) and r["rc"] == 2 and "Error: preflight:" in (r.get("log_tail") or "")


def wall(r: dict[str, Any] | None) -> str:
    if r is None:
        return "not run"
    text = seconds(r["wall_s"])
    if r["rc"] == 0 and complete(r):
        return text
    if complete(r):
        return text + " †"
    if refused(r):
        return f"refused by the preflight after {text}"
    return f"**FAILED** ({r.get('outcome') or r.get('note') or 'rc ' + str(r['rc'])}) after {text}"


def failure_note(r: dict[str, Any]) -> str:
    lines = (r.get("log_tail") or "").strip().splitlines()
    if refused(r):
        said = ("Error: preflight:", "preflight:", f"{r['variant']}:", "To proceed:")  # what and why, not the rest
        return f"- {r['variant']} ({r['mode']}) refused: " + " ".join(
            line.strip() for line in lines if line.strip().startswith(said))[:800]
    why = r.get("outcome") or r.get("note")
    return f"- {r['variant']} ({r['mode']}) failed: {why}; log tail: `{' / '.join(lines[-3:])[:300]}`"


def ratio(a: dict | None, b: dict | None, key: str) -> str:
    if not complete(a) or not complete(b) or not b[key]:
        return "—"
    return f"{a[key] / b[key]:.1f}×"


def machine_line(rows: list[dict[str, Any]]) -> str:
    m = rows[-1]["machine"]
    loads = [x for r in rows for x in (r["load_start"][0], r["load_end"][0])]
    dates = sorted(r["started_at"][:10] for r in rows)
    days = dates[0] if dates[0] == dates[-1] else f"{dates[0]} – {dates[-1]}"
    hub = rows[-1].get("hubbot", {})
    return (f"Machine: {m.get('nproc')} cores ({m.get('cpu') or '?'}), {m.get('MemTotal', 0) / 2**30:.1f} GiB RAM, "
            f"1-min load {min(loads):.1f}–{max(loads):.1f} during the runs; {days}; "
            f"hubbot {hub.get('commit', '?')} ({hub.get('branch', '?')}).")


def latest_runs(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The run shown for each (variant, mode) cell: later lines win."""
    return {(r["variant"], r["mode"]): r for r in rows}


def table(shape: str, rows: list[dict[str, Any]]) -> str:
    latest = latest_runs(rows)
    order = list(dict.fromkeys(r["variant"] for r in rows))
    first = rows[-1]
    lines = [f"### {shape}: {first['model']} ({size(first.get('model_bytes'))} of weights, recipe {first['recipe']})",
             "", machine_line(rows), "",
             "| variant | hubbot wall | hubbot peak anon | file RSS | peak disk | output | by-hand wall "
             "| by-hand peak anon | by-hand disk | ratio time | ratio RAM |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for variant in order:
        h = latest.get((variant, "hubbot")) or latest.get((variant, "publish")) or latest.get((variant, "reference"))
        b = latest.get((variant, "hand"))
        main = h or b
        lines.append("| " + " | ".join([
            variant, wall(h), mem(h and h["peak_anon_bytes"]), mem(h and h["peak_file_bytes"]),
            size(h and h["peak_disk_bytes"]), size(main and main["output_bytes"]),
            "—" if variant in ("publish", "reference") else wall(b), mem(b and b["peak_anon_bytes"]),
            size(b and b["peak_disk_bytes"]),
            ratio(h, b, "wall_s"), ratio(h, b, "peak_anon_bytes"),
        ]) + " |")
    return "\n".join(lines)


def render(records: list[dict[str, Any]]) -> str:
    by_shape: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_shape[r["shape"]].append(r)
    out = ["# Scale benchmark", "",
           "hubbot = `hubbot build --variant` (tool + validation in transformers and the variant's runtime); "
           "by hand = the tool alone (no validation). Peak anon = RssAnon+RssShmem of the whole process tree "
           "(what the out-of-memory killer counts), sampled every 0.5 s; file RSS = its mmap'd part (RssFile); "
           "peak disk = the most the run's work, output, TMPDIR and HF_HOME folders held at once; output = "
           "hubbot's out folder (the by-hand run's when hubbot did not run). Memory in GiB/MiB, files in GB/MB. "
           "Ratios are hubbot / by hand. † = hubbot ran build and validation to the end and the variant failed "
           "validation (exit 1): expected with random weights, whose outputs are noise.", ""]
    for shape, rows in by_shape.items():
        out += [table(shape, rows), ""]
        failed = [r for r in latest_runs(rows).values() if not complete(r)]
        out += [failure_note(r) for r in failed]
        if failed:
            out.append("")
    return "\n".join(out).rstrip() + "\n"
