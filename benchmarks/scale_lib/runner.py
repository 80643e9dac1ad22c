"""`run` and `publish`: one measured process per variant and mode, one JSON line per measurement."""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import commands
from .measure import disk_bytes, run_steps
from .shapes import SHAPES


def machine() -> dict[str, Any]:
    """What the numbers depend on, without the host's name."""
    info: dict[str, Any] = {"nproc": os.cpu_count()}
    try:
        info["nproc_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("MemTotal", "SwapTotal"):
                info[key] = int(value.split()[0]) * 1024
        cpu = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("model name")]
        info["cpu"] = cpu[0] if cpu else None
    except OSError:
        pass
    return info


def shape_of(model: Path) -> str:
    """The SHAPES entry MODEL's config matches, else a description."""
    c = json.loads((model / "config.json").read_text())
    for name, s in SHAPES.items():
        if (c.get("hidden_size"), c.get("num_hidden_layers"), c.get("num_key_value_heads"), c.get("vocab_size")) == (
                s.hidden, s.layers, s.kv_heads, s.vocab):
            return name
    return f"hidden {c.get('hidden_size')} x {c.get('num_hidden_layers')} layers"


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def outcome(mode: str, rc: int, note: str, out: Path, tail: str) -> str:
    """passed | failed validation (the whole build and validation ran: expected on random weights) | the failure."""
    if rc == 0:
        return "passed" if mode != "hand" else "ok"
    if mode == "hubbot" and rc == 1:
        try:
            data = json.loads((out / "build.json").read_text())
            report = data["result"]["report"] if "result" in data else data["report"]  # build.json before 154fb9c
        except (OSError, ValueError, KeyError):
            report = None
        if report is not None and not report.get("passed"):
            return "failed validation"
    if mode == "publish" and rc == 1 and "FAILED" in tail:  # the results table names each failing variant
        return "failed validation"
    return note or f"exit {rc}"


class Runner:
    def __init__(self, model: Path, recipe: str, results: Path, scratch: Path, keep: bool):
        self.model, self.recipe, self.results, self.scratch, self.keep = model.resolve(), recipe, results, scratch, keep
        self.logs = scratch / "logs"
        self.base_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
                         "HF_HUB_DISABLE_TELEMETRY": "1"}
        self.common = {"model": self.model.name, "shape": shape_of(self.model),
                       "model_bytes": file_bytes(self.model), "recipe": recipe, "machine": machine(),
                       "hubbot": commands.hubbot_source(), "versions": commands.tool_versions()}

    def variants(self, wanted: list[str] | None) -> list[dict[str, Any]]:
        found = commands.plan_variants(self.model, self.recipe, self.base_env)
        if wanted:
            unknown = sorted(set(wanted) - {v["id"] for v in found})
            if unknown:
                raise SystemExit(f"not in recipe {self.recipe}: {', '.join(unknown)}; "
                                 f"its variants: {', '.join(v['id'] for v in found)}")
            found = [v for v in found if v["id"] in wanted]
        return found

    def measure(self, label: str, variant: dict[str, Any] | None, mode: str, make_steps,
                keep_output: Path | None = None) -> dict[str, Any]:
        """Run the steps in a fresh folder (work/, out/, tmp/ = TMPDIR, hf/ = HF_HOME), measure, record."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        run_dir = self.scratch / f"{stamp}-{label}-{mode}"
        work, out, tmp, hf = (run_dir / d for d in ("work", "out", "tmp", "hf"))
        for d in (work, tmp, hf):
            d.mkdir(parents=True)
        env = {**self.base_env, "TMPDIR": str(tmp), "HF_HOME": str(hf)}
        steps, env = make_steps(out, work, env)
        log_file = self.logs / f"{run_dir.name}.log"
        record: dict[str, Any] = {"variant": label, "mode": mode,
                                  "format": variant["format"] if variant else None,
                                  "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                  "load_start": list(os.getloadavg()), **self.common}
        shown = " && ".join(" ".join("<script>" if "\n" in a else a for a in c) for _, c in steps)
        print(f"=== {label} ({mode}) on {self.model.name}: {shown}", flush=True)
        m = run_steps(steps, log_file=log_file, disk_paths=[run_dir], env=env, say=lambda s: print(s, flush=True),
                      label=label if label == mode else f"{label} {mode}")
        record.update({
            "wall_s": m.wall_s, "peak_anon_bytes": m.peak_anon_bytes, "peak_file_bytes": m.peak_file_bytes,
            "peak_disk_bytes": m.peak_disk_bytes, "ru_maxrss_bytes": m.ru_maxrss_bytes,
            "output_bytes": file_bytes(out), "rc": m.rc, "note": m.note, "load_end": list(os.getloadavg()),
            "steps": m.steps, "commands": [c for _, c in steps], "log_file": m.log_file, "cwd": str(run_dir),
            "disk_left_bytes": disk_bytes([run_dir]),
        })
        record["outcome"] = outcome(mode, m.rc, m.note, out, m.tail)
        if m.rc == 0 and not record["output_bytes"]:
            record["outcome"] = "exit 0 but wrote no output"
        if m.rc:
            record["log_tail"] = m.tail
        self.results.parent.mkdir(parents=True, exist_ok=True)
        with self.results.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if keep_output and m.rc == 0:
            shutil.copytree(out, keep_output, dirs_exist_ok=True)
        if not self.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
        return record

    def run(self, wanted: list[str] | None, hubbot: bool, hand: bool,
            reference: Path | None = None) -> list[dict[str, Any]]:
        variants = self.variants(wanted)
        if any(v["format"] == "gguf" for v in variants):
            commands.gguf_converter_env(self.base_env)  # fetch llama.cpp's converter now, not inside a measurement
        records = []
        for v in variants:
            if hubbot:
                records.append(self.measure(v["id"], v, "hubbot", lambda out, work, env, v=v: (
                    commands.hubbot_build(self.model, v, self.recipe, out, work, reference), env)))
            if hand:
                records.append(self.measure(v["id"], v, "hand", lambda out, work, env, v=v: (
                    commands.by_hand(self.model, v, out, work, env))))
            time.sleep(1)
        return records

    def reference(self, keep_in: Path) -> dict[str, Any]:
        """`hubbot reference` with a cache of its own (so it computes, never reuses); the file it
        writes is kept as KEEP_IN/reference.json for `run --reference`."""
        return self.measure("reference", None, "reference", lambda out, work, env: (
            commands.hubbot_reference(self.model, out), {**env, "HUBBOT_CACHE": str(work / "cache")}),
            keep_output=keep_in)

    def publish(self, extra: tuple[str, ...] = ()) -> dict[str, Any]:
        return self.measure("publish", None, "publish", lambda out, work, env: (
            commands.hubbot_publish(self.model, self.recipe, out, work, extra), env))
