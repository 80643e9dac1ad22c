"""Long steps are never silent: heartbeat lines in logs and CI, live bars at a terminal."""

from __future__ import annotations

import io
import re
import sys
import time

import pytest

from hubbot import progress
from hubbot.progress import HeartbeatSink, RichSink, set_sink, step, wants_live_display
from hubbot.toolrun import fraction_progress, run_tool


class Recording:
    """A sink that keeps every state it was shown, to see what a step reported."""

    def __init__(self):
        self.events: list[tuple[str, str, float, float | None, str]] = []

    def start(self, s):
        self.events.append(("start", s.what, s.completed, s.total, s.info))

    def update(self, s):
        self.events.append(("update", s.what, s.completed, s.total, s.info))

    def finish(self, s):
        self.events.append(("finish", s.what, s.completed, s.total, s.info))


@pytest.fixture
def sink():
    recording = Recording()
    previous = set_sink(recording)
    yield recording
    set_sink(previous)


def test_heartbeat_lines_show_elapsed_time_and_how_far_a_blocked_step_is(monkeypatch):
    previous = set_sink(HeartbeatSink(interval=0.2))
    lines: list[str] = []
    try:
        with step("reference", total=6, log=lines.append) as s:
            s.update(3, info="'days-chat': token 7/16")
            time.sleep(0.9)  # the step blocks, as a forward pass in torch does
        stopped_at = len(lines)
        time.sleep(0.5)
    finally:
        set_sink(previous)
    assert len(lines) >= 2, lines
    assert all(line.startswith("reference: ") and " s elapsed, 3/6, 'days-chat': token 7/16" in line for line in lines)
    assert len(lines) == stopped_at  # nothing more once the step ended


def test_a_tool_run_reports_the_tools_own_fraction_and_memory(tmp_path, sink):
    script = "import time\nfor i in range(1, 6):\n    print(f'[{i:3d}/ 5] tensor', flush=True)\n    time.sleep(0.4)\n"
    run = run_tool([sys.executable, "-c", script], tmp_path / "tool.log", what="quantize")
    assert run.peak_rss_bytes > 0
    updates = [e for e in sink.events if e[0] == "update" and e[1] == "quantize"]
    fractions = {(done, total) for _, _, done, total, _ in updates if total}
    assert (5.0, 5.0) in fractions or (4.0, 5.0) in fractions, fractions
    assert all(total == 5.0 for _, total in fractions)
    assert any(info.endswith(" GiB") for *_, info in updates)
    assert sink.events[-1][0] == "finish"


def test_fraction_progress_reads_llama_cpp_counters_and_tqdm_bars():
    assert fraction_progress("[  12/ 195] blk.0.attn_q.weight") == (12.0, 195.0)
    assert fraction_progress("Quantizing:  45%|████▌     | 45/100") == (45.0, 100.0)
    assert fraction_progress("loading model") is None


def test_the_reference_reports_each_generated_token(tiny_phi3, tmp_path, sink):
    from hubbot.recipe import load_families
    from hubbot.reference import compute_reference
    from hubbot.source import read_config

    settings = load_families()["phi"].validation
    compute_reference(tiny_phi3, "local:test", settings, read_config(tiny_phi3))
    infos = [info for kind, what, *_, info in sink.events if what == "reference" and kind == "update"]
    assert any("token 1/" in i for i in infos)
    assert any(f"{len(settings.prompts)} prompts in one batch" in i for i in infos)
    done = [completed for kind, what, completed, *_ in sink.events if what == "reference" and kind == "finish"]
    assert done == [settings.max_new_tokens]


def test_a_live_bar_only_for_a_person_at_a_terminal(monkeypatch):
    tty = io.StringIO()
    tty.isatty = lambda: True
    for var in ("CI", "GITHUB_ACTIONS", "HUBBOT_PLAIN_PROGRESS"):
        monkeypatch.delenv(var, raising=False)
    assert wants_live_display(tty)
    assert not wants_live_display(io.StringIO())
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    assert not wants_live_display(tty)


def test_the_rich_sink_draws_a_bar_and_clears_it(monkeypatch):
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    previous = set_sink(RichSink(console))
    try:
        with step("converting to GGUF", total=10) as s:
            for i in range(10):
                s.update(i + 1, info="1.2 GiB")
                time.sleep(0.03)
    finally:
        set_sink(previous)
    drawn = out.getvalue()
    assert "converting to GGUF" in drawn and "1.2 GiB" in drawn and re.search(r"\b\d+/10\b", drawn)
    assert "\x1b[?25h" in drawn  # the bar was taken down (the cursor shown again) when the step ended
    assert isinstance(progress._sink, HeartbeatSink)
