"""benchmarks/scale.py's model generator: exact Phi3 tensor names and shapes, a checkpoint transformers loads.

Fast (a few seconds): the real-size shapes are checked on the meta device only; the written model is
the ~41 MB `small` shape. The benchmark itself never runs in the test suite.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from scale_lib import make_model, measure, report  # noqa: E402
from scale_lib.shapes import SHAPES, hub_config  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IDS = {"bos": 1, "eos": 2, "pad": 2}
# the parameter counts Microsoft gives (Phi-3.5-mini: 3.8B; phi-4: 14.7B), to the parameter
EXPECTED_PARAMETERS = {"phi-3.5-mini": 3_821_079_552, "phi-4": 14_659_507_200}


def meta_model(config: dict):
    cfg = transformers.Phi3Config(**{k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        return transformers.Phi3ForCausalLM(cfg)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_tensors_match_transformers(name):
    shape = SHAPES[name]
    model = meta_model(hub_config(shape, IDS))
    assert [(n, tuple(p.shape)) for n, p in model.state_dict().items()] == shape.tensors()
    if name in EXPECTED_PARAMETERS:
        assert shape.parameters() == EXPECTED_PARAMETERS[name]


def test_longrope_is_valid_for_transformers():
    config = hub_config(SHAPES["phi-3.5-mini"], IDS)
    assert len(config["rope_scaling"]["long_factor"]) == 48 == len(config["rope_scaling"]["short_factor"])
    cfg = transformers.Phi3Config(**{k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")})
    assert cfg.rope_parameters["rope_type"] == "longrope"


def test_bf16_rounding_matches_torch():
    import numpy as np

    x = (np.random.default_rng(0).standard_normal(10000, dtype=np.float32) * 0.02)
    expected = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.uint16).numpy()
    assert (make_model._to_bf16(x.copy()) == expected).all()


def test_small_model_loads_in_transformers(tmp_path):
    from safetensors import safe_open

    out = tmp_path / "small-phi3"
    info = make_model.make_model("small", out, log=lambda _: None)
    assert info["shards"] > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(n for n, _ in SHAPES["small"].tensors())
    for file in set(index["weight_map"].values()):
        with safe_open(out / file, framework="pt") as f:
            for key in f.keys():
                assert index["weight_map"][key] == file
                t = f.get_tensor(key)
                assert t.dtype == torch.bfloat16
                if key.endswith("norm.weight"):
                    assert (t == 1).all()
    again = make_model.make_model("small", tmp_path / "again-phi3", log=lambda _: None)
    assert again["weight_bytes"] == info["weight_bytes"]
    first = sorted(out.glob("model-*.safetensors"))
    assert [p.read_bytes() for p in first] == [(tmp_path / "again-phi3" / p.name).read_bytes() for p in first]

    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    std = model.model.layers[0].mlp.down_proj.weight.float().std().item()
    assert 0.019 < std < 0.021
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("Count: 1, 2, 3", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], SHAPES["small"].vocab)
    config = json.loads((out / "config.json").read_text())
    assert config["bos_token_id"] == tok.bos_token_id and config["torch_dtype"] == "bfloat16"
    assert (out / "chat_template.jinja").is_file() and tok.chat_template


def test_disk_bytes_counts_hard_links_once(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 100_000)
    (tmp_path / "b").hardlink_to(tmp_path / "a")
    assert 100_000 <= measure.disk_bytes([tmp_path]) < 200_000


def test_report_renders_and_ratios(tmp_path):
    base = {"model": "small-phi3", "shape": "small", "model_bytes": 41_000_000, "recipe": "edge",
            "machine": {"nproc": 2, "MemTotal": 24 * 2**30}, "started_at": "2026-12-01T00:00:00+00:00",
            "load_start": [1.0, 1, 1], "load_end": [2.0, 1, 1], "peak_file_bytes": 0, "peak_disk_bytes": 0,
            "output_bytes": 1}
    rows = [{**base, "variant": "gguf-Q4_K_M", "mode": "hubbot", "wall_s": 40.0, "peak_anon_bytes": 4 * 2**30,
             "rc": 1, "outcome": "failed validation"},
            {**base, "variant": "gguf-Q4_K_M", "mode": "hand", "wall_s": 10.0, "peak_anon_bytes": 2**30, "rc": 0},
            {**base, "variant": "mlx-4bit", "mode": "hubbot", "wall_s": 5.0, "peak_anon_bytes": 1, "rc": -9,
             "outcome": "killed by SIGKILL", "log_tail": "Killed"}]
    text = report.render(rows)
    assert "| gguf-Q4_K_M | 40.0 s † | 4.0 GiB |" in text and "| 4.0× | 4.0× |" in text
    assert "**FAILED** (killed by SIGKILL)" in text and "not run" in text
    assert "mlx-4bit (hubbot) failed: killed by SIGKILL" in text  # … until a later run completes it:
    later = {**rows[2], "wall_s": 50.0, "rc": 1, "outcome": "failed validation"}
    refusal = {**base, "variant": "onnx-cpu-int4", "mode": "hubbot", "wall_s": 9.0, "peak_anon_bytes": 1, "rc": 2,
               "log_tail": "$ hubbot build …\nError: preflight: needs 58.6 GB, has 48.8 GB free\nTo proceed: …"}
    text = report.render([*rows, later, refusal])
    assert "| mlx-4bit | 50.0 s † |" in text and "mlx-4bit (hubbot) failed" not in text
    assert "| onnx-cpu-int4 | refused by the preflight after 9.0 s |" in text
    assert "onnx-cpu-int4 (hubbot) refused: Error: preflight: needs 58.6 GB, has 48.8 GB free To proceed: …" in text


def test_runner_measures_the_tree_and_survives_a_kill(tmp_path, monkeypatch):
    monkeypatch.setattr(measure, "HEARTBEAT", 0.5)
    lines = []
    # a grandchild holds 200 MB of anonymous memory and writes 3 MB, then exits
    grandchild = "import time; b = bytearray(200 * 2**20); open('f', 'wb').write(b'x' * 3_000_000); time.sleep(2)"
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {grandchild!r}])"
    work = tmp_path / "w"
    work.mkdir()
    m = measure.run_measured([sys.executable, "-c", child], log_file=tmp_path / "log", disk_paths=[work],
                             label="t", cwd=work, say=lines.append)
    assert m.rc == 0 and m.peak_anon_bytes > 200 * 2**20 and m.peak_disk_bytes >= 3_000_000
    assert any(" s  RAM anon " in line for line in lines)  # the heartbeat
    die = "import os; print('dying', flush=True); os.kill(os.getpid(), 9)"  # as the out-of-memory killer would
    killed = measure.run_steps([("a", [sys.executable, "-c", "print('step a')"]),
                                ("b", [sys.executable, "-c", die]),
                                ("c", [sys.executable, "-c", "print('never')"])],
                               log_file=tmp_path / "log2", disk_paths=[work], label="k", say=lines.append)
    assert killed.rc == -9 and "SIGKILL" in killed.note and "dying" in killed.tail
    assert [s["step"] for s in killed.steps] == ["a", "b"]


def test_reference_row_computes_its_own_and_keeps_the_file(tmp_path, monkeypatch):
    """`scale.py reference`: a real `hubbot reference` on the small model with a cache of its own (never
    the user's cached one), recorded as a row, its file kept for `run --reference`."""
    from scale_lib.runner import Runner

    from hubbot.reference import Reference

    monkeypatch.setenv("HUBBOT_CACHE", str(tmp_path / "user-cache"))
    model = tmp_path / "small-phi3"
    make_model.make_model("small", model, log=lambda _: None)
    results = tmp_path / "results.jsonl"
    record = Runner(model, "edge", results, tmp_path / "scratch", keep=False).reference(tmp_path / "kept")
    assert record["rc"] == 0 and record["mode"] == "reference" and record["output_bytes"] > 0, record
    kept = Reference.from_json((tmp_path / "kept" / "reference.json").read_text())
    assert len(kept.prompts) == 6 and kept.heldout is not None and kept.dtype == "bfloat16"
    assert not (tmp_path / "user-cache" / "references").exists()
    assert "| reference |" in report.render(report.load(results))
