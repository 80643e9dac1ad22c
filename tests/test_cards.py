"""Reproducible cards: README.md is a function of the build alone (no date, no build seconds, no
memory peak), so ``--force`` on an identical build, on another day in another time zone, makes the
same files and the Hub gets no new commit."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from hubbot.card import card_row
from tests.conftest import ROOT, USER

SOURCE_REPO = "microsoft/Phi-3-tiny-test"
REPOS = [f"{USER}/Phi-3-tiny-test-GGUF", f"{USER}/Phi-3-tiny-test-onnx"]
SHIFT_SECONDS = 400 * 86400 + 7 * 3600  # 400 days and 7 hours on

# Python-level clocks of every process that starts with this on its path (hubbot and its Python
# tools) run SHIFT_SECONDS ahead; with TZ, the local date differs too (C-level clocks see only TZ).
CLOCK = textwrap.dedent("""
    import datetime as _dt, os as _os, time as _time

    _shift = float(_os.environ["TEST_CLOCK_SHIFT_SECONDS"])
    _real_time, _real_time_ns = _time.time, _time.time_ns
    _time.time = lambda: _real_time() + _shift
    _time.time_ns = lambda: _real_time_ns() + int(_shift * 1e9)
    for _name in ("localtime", "gmtime", "ctime"):
        _real = getattr(_time, _name)
        setattr(_time, _name, lambda secs=None, _real=_real: _real(_time.time() if secs is None else secs))
    _real_strftime = _time.strftime
    _time.strftime = lambda fmt, t=None: _real_strftime(fmt, _time.localtime() if t is None else t)


    class _Datetime(_dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls.fromtimestamp(_time.time(), tz)

        @classmethod
        def utcnow(cls):
            return cls.fromtimestamp(_time.time(), _dt.timezone.utc).replace(tzinfo=None)

        @classmethod
        def today(cls):
            return cls.now()


    class _Date(_dt.date):
        @classmethod
        def today(cls):
            return cls.fromtimestamp(_time.time())


    _dt.datetime, _dt.date = _Datetime, _Date
""")


def test_card_rows_leave_measurements_out():
    row = {"id": "onnx-cpu-int4", "bytes": 123, "build_seconds": 41.5,
           "details": {"builder": "-p int4 -e cpu", "peak_rss_bytes": 7 << 30, "fp32_seconds": 3.2,
                       "quantize_peak_rss_bytes": 5 << 30, "block_size": 32}}
    assert card_row(row) == {"id": "onnx-cpu-int4", "bytes": 123,
                             "details": {"builder": "-p int4 -e cpu", "block_size": 32}}


def test_shifted_clock_runs_ahead(tmp_path):
    """The fake clock the slow test below runs hubbot on really moves what Python-level code reads."""
    env = clock_env(tmp_path, "UTC0")
    probe = subprocess.run([sys.executable, "-c", "import datetime, time; print(datetime.datetime.now("
                            "datetime.timezone.utc).date(), datetime.date.today(), time.strftime('%Y-%m-%d'))"],
                           capture_output=True, text=True, env=env, check=True)
    shifted = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=SHIFT_SECONDS)).date()
    assert probe.stdout.split() == [str(shifted)] * 3


def clock_env(tmp_path: Path, tz: str, shift: float = SHIFT_SECONDS) -> dict[str, str]:
    clock = tmp_path / "clock"
    clock.mkdir(exist_ok=True)
    (clock / "sitecustomize.py").write_text(CLOCK)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(clock), str(ROOT)]), "TZ": tz,
            "TEST_CLOCK_SHIFT_SECONDS": str(shift)}


@pytest.mark.slow
def test_force_on_another_day_makes_the_same_cards_and_no_commit(hub_env, tiny_phi3, tmp_path):
    hub = hub_env
    hub.seed_repo(SOURCE_REPO, {p.name: p for p in tiny_phi3.iterdir() if p.is_file()})
    data = yaml.safe_load((ROOT / "recipes" / "phi.yaml").read_text())
    data["recipes"]["cards"] = {"description": "GGUF and ONNX (its card used to show build seconds)", "variants": [
        {"format": "gguf", "precision": "int8"},
        {"format": "onnx", "precision": "int4", "target": "cpu", "options": {"block_size": 32, "accuracy_level": 4}},
    ]}
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "phi.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    command = [sys.executable, "-m", "hubbot.cli", "--recipes-dir", str(recipes), "publish", SOURCE_REPO,
               "--recipe", "cards"]

    first = subprocess.run(command, capture_output=True, text=True, timeout=900, env=clock_env(tmp_path, "AAA12", 0))
    assert first.returncode == 0, first.stderr
    published = {repo: hub.files(repo) for repo in REPOS}
    commits = {repo: [c.oid for c in hub.commits(repo)] for repo in REPOS}

    # 400 days and 7 hours later, 26 hours of time zone away (UTC-12, then UTC+14)
    again = subprocess.run([*command, "--force"], capture_output=True, text=True, timeout=900,
                           env=clock_env(tmp_path, "BBB-14"))
    assert again.returncode == 0, again.stderr
    for repo in REPOS:
        assert f"{repo}: rebuilt files are identical to the published ones; nothing changed, no commit" in again.stderr
        assert [c.oid for c in hub.commits(repo)] == commits[repo]
        assert hub.files(repo) == published[repo]
    card = published[REPOS[1]]["README.md"].decode()
    assert "## How the variants were built" in card and "peak RSS" not in card
