"""Preflight: memory and disk are checked from safetensors headers before anything is downloaded.

A phi-4-shaped folder (14.66B bf16 parameters, Phi3's real tensor names) is a real safetensors
header followed by a sparse 29 GB hole: it costs no disk, and nothing here reads past its header.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from hubbot import preflight
from hubbot.backends import costs, formats
from hubbot.cli import main
from hubbot.errors import UsageError
from hubbot.plan import count_parameters, make_plan
from hubbot.recipe import load_families
from hubbot.source import SourceRef

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny-phi3"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "chat_template.jinja")
GiB = 2**30

PHI4 = {"hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 10,
        "intermediate_size": 17920, "vocab_size": 100352}
PHI35_MINI = {"hidden_size": 3072, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
              "intermediate_size": 8192, "vocab_size": 32064}
EDGE_ONNX_CPU_INT4 = "onnx-cpu-int4-rtn-block-32-acc-level-4"


def phi3_tensors(shape: dict[str, int]) -> dict[str, list[int]]:
    """Phi3ForCausalLM's tensors (untied lm_head, fused qkv and gate_up), in safetensors' order."""
    h, inter, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    head_dim = h // shape["num_attention_heads"]
    qkv = (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * head_dim
    tensors = {"lm_head.weight": [vocab, h], "model.embed_tokens.weight": [vocab, h], "model.norm.weight": [h]}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors |= {p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h],
                    p + "mlp.down_proj.weight": [h, inter], p + "mlp.gate_up_proj.weight": [2 * inter, h],
                    p + "self_attn.o_proj.weight": [h, h], p + "self_attn.qkv_proj.weight": [qkv, h]}
    return dict(sorted(tensors.items()))


def n_params(shape: dict[str, int]) -> int:
    total = 0
    for dims in phi3_tensors(shape).values():
        count = 1
        for d in dims:
            count *= d
        total += count
    return total


def write_sparse_safetensors(path: Path, tensors: dict[str, list[int]], dtype: str = "BF16", itemsize: int = 2) -> int:
    """A real header, then a hole as long as the data: the file has its full size and no blocks."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dims in tensors.items():
        size = itemsize
        for d in dims:
            size *= d
        header[name] = {"dtype": dtype, "shape": dims, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset)
    return offset


@pytest.fixture
def phi4_shaped(tmp_path) -> Path:
    folder = tmp_path / "phi4-shaped"
    folder.mkdir()
    config = json.loads((TINY / "config.json").read_text())
    config.update(PHI4, dtype="bfloat16", max_position_embeddings=16384, original_max_position_embeddings=16384)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        shutil.copyfile(TINY / name, folder / name)
    write_sparse_safetensors(folder / "model.safetensors", phi3_tensors(PHI4))
    return folder


def _stop_after_preflight(monkeypatch, error: Exception) -> None:
    """Replace the stage after the preflight (the download, or the build) by raising ``error``."""
    def reached(*args, **kwargs):
        raise error

    monkeypatch.setattr("hubbot.cli.publish.prepare", reached)
    monkeypatch.setattr("hubbot.cli.build.build_variant", reached)


@pytest.fixture
def no_download(monkeypatch):
    """Fail the test if a command gets past the preflight to the download or the build."""
    _stop_after_preflight(monkeypatch, AssertionError("the command went on to download/build"))


class Reached(UsageError):
    """Raised by a stand-in for the stage after the preflight."""


@pytest.fixture
def next_stage(monkeypatch):
    _stop_after_preflight(monkeypatch, Reached("reached the stage after the preflight"))


def machine(monkeypatch, memory: str, disk: str = "10TB") -> None:
    monkeypatch.setenv(preflight.MEMORY_ENV, memory)
    monkeypatch.setenv(preflight.DISK_ENV, disk)


def plan_for(shape: dict[str, int], recipe: str = "edge", local: bool = True):
    family = load_families()["phi"]
    ref = SourceRef("x", family, "shaped", path=Path("/nonexistent/shaped")) if local else \
        SourceRef("x", family, "shaped", repo_id="someone/shaped")
    return make_plan(ref, family.recipe(recipe), n_params(shape))


# ------------------------------------------------------------------------------- the CLI refuses
def test_sparse_folder_is_phi4_sized_and_costs_no_disk(phi4_shaped):
    weights = phi4_shaped / "model.safetensors"
    assert count_parameters(phi4_shaped) == n_params(PHI4) == 14_659_507_200
    assert weights.stat().st_size > 29e9
    assert weights.stat().st_blocks * 512 < 10**6


def test_publish_phi4_edge_refused_before_anything(phi4_shaped, tmp_path, monkeypatch, no_download):
    machine(monkeypatch, "16GB", disk="50GB")  # a GitHub-hosted runner's memory
    out = tmp_path / "preview"
    result = CliRunner().invoke(main, ["publish", str(phi4_shaped), "--recipe", "edge", "--out", str(out)])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "Error: preflight:" in message and "Traceback" not in message
    # onnx-cpu-fp32 is not among them: its 58.6 GB model.onnx.data is over the Hub's file limit, so it is dropped
    assert "3 of 9 variant(s) of phi4-shaped (recipe 'edge') need more memory than the 16.0 GB available here" \
        in message
    # the reference every variant needs, once (memory-mapped: file pages, not anonymous memory); then
    # each refused variant's build step and validation
    assert message.count("validating any variant takes ~293.2 MB for the source model in transformers "
                         "(bf16, memory-mapped)") == 1
    # optimum-intel's export grows faster than the parameters (measured at 3.8B and at phi-4's 14.66B)
    assert "openvino-int4_asym: build ~19.4 GB (optimum-intel's OpenVINO export (int4))" in message
    assert ("openvino-int8_asym: build ~26.8 GB (optimum-intel's OpenVINO export (int8)); validation ~18.9 GB "
            "(+ ~18.1 GB for the variant in OpenVINO)") in message
    assert "mlx-8bit: build ~9.5 GB (mlx_lm.convert); validation ~21.1 GB" in message
    for fits in ("gguf-Q4_K_M", "mlx-4bit", EDGE_ONNX_CPU_INT4, "onnx-cpu-fp32"):
        assert f" {fits}:" not in message
    # the GGUF repo's BF16 intermediate and its three files, and all the outputs, do not fit the disk either
    assert "needs 83.2 GB for the working files" in message and "which has 50.0 GB free" in message
    assert "run on a machine with 26.8 GB of memory" in message
    assert "--no-preflight" in message and "--workdir" in message
    assert not out.exists()


def test_build_onnx_variant_refused(phi4_shaped, tmp_path, monkeypatch, no_download):
    machine(monkeypatch, "12GB")
    out = tmp_path / "built"
    result = CliRunner().invoke(main, ["build", str(phi4_shaped), "--recipe", "edge", "--variant", EDGE_ONNX_CPU_INT4,
                                       "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "preflight: 1 of 1 variant(s)" in result.output
    assert (f"{EDGE_ONNX_CPU_INT4}: build ~11.8 GB (ORT's quantizer (fp32 weights memory-mapped)); "
            "validation ~13.4 GB") in " ".join(result.output.split())
    assert "openvino" not in result.output  # only the variant asked for
    assert not out.exists()


def test_a_machine_big_enough_goes_on(phi4_shaped, tmp_path, monkeypatch, next_stage):
    machine(monkeypatch, "1TB")
    result = CliRunner().invoke(main, ["publish", str(phi4_shaped), "--recipe", "edge", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "reached the stage after the preflight" in result.output, result.output
    assert "preflight: 14.66B parameters (BF16); peak RAM ~" in result.output


def test_build_with_a_precomputed_reference_needs_no_source_model(phi4_shaped, tmp_path, monkeypatch, next_stage):
    machine(monkeypatch, "7450MB")  # the memory-mapped reference's ~0.3 GB decides
    args = ["build", str(phi4_shaped), "--recipe", "edge", "--variant", "gguf-Q4_K_M", "--out", str(tmp_path / "o")]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2 and "validation ~7.6 GB" in refused.output, refused.output
    reference = tmp_path / "reference.json"
    reference.write_text("{}")  # what `hubbot reference` writes; the stand-in build does not read it
    result = CliRunner().invoke(main, [*args, "--reference", str(reference)])
    assert result.exit_code == 2 and "reached the stage after the preflight" in result.output, result.output


@pytest.mark.parametrize("command", [["publish", "--recipe", "edge"],
                                     ["build", "--recipe", "edge", "--variant", EDGE_ONNX_CPU_INT4]])
def test_no_preflight_skips_the_check(phi4_shaped, tmp_path, monkeypatch, next_stage, command):
    machine(monkeypatch, "1GB", disk="1GB")
    args = [command[0], str(phi4_shaped), *command[1:], "--out", str(tmp_path / "o")]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2 and "Error: preflight:" in refused.output
    result = CliRunner().invoke(main, [*args, "--no-preflight"])
    assert result.exit_code == 2 and "reached the stage after the preflight" in result.output, result.output
    assert "preflight" not in result.output.replace("after the preflight", "")


def test_bad_memory_override_is_a_usage_error(phi4_shaped, tmp_path, monkeypatch, no_download):
    monkeypatch.setenv(preflight.MEMORY_ENV, "lots")
    result = CliRunner().invoke(main, ["publish", str(phi4_shaped), "--recipe", "edge", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "HUBBOT_AVAILABLE_MEMORY='lots' is not a size" in result.output


# ------------------------------------------------------------------------------- plan shows it
def test_plan_json_local_phi4(phi4_shaped, monkeypatch):
    machine(monkeypatch, "24GiB", disk="80GB")
    result = CliRunner().invoke(main, ["plan", str(phi4_shaped), "--recipe", "edge", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["parameters"] == 14_659_507_200 and data["dtype"] == "BF16"
    assert data["machine"] == {"available_memory_bytes": 24 * GiB, "free_disk_bytes": 80 * 10**9,
                               "disk_path": data["machine"]["disk_path"]}
    variants = {v["id"]: v for r in data["repos"] for v in r["variants"]}
    q4 = variants["gguf-Q4_K_M"]
    assert q4["estimated_bytes"] == int(14_659_507_200 * 4.89 / 8)
    assert q4["estimated_disk_bytes"] == q4["estimated_bytes"] + 2 * 14_659_507_200  # + the BF16 intermediate
    f16 = variants["gguf-F16"]  # the converter's own output, moved into place: no intermediate
    assert f16["estimated_disk_bytes"] == f16["estimated_bytes"] == 2 * 14_659_507_200
    onnx = variants[EDGE_ONNX_CPU_INT4]
    assert 10e9 < onnx["estimated_peak_ram_bytes"] < 20e9  # its quantizer and its runtime
    assert onnx["estimated_disk_bytes"] > 4 * 14_659_507_200  # the fp32 intermediate
    assert data["run"]["peak_ram_bytes"] == max(v["estimated_peak_ram_bytes"] for v in variants.values())


def test_plan_table_shows_ram_and_disk(phi4_shaped, monkeypatch):
    machine(monkeypatch, "24GiB")
    monkeypatch.setattr(costs, "REFERENCE_DTYPE", "F32")  # an fp32 copy of phi-4 (59 GB) fits nothing here
    result = CliRunner().invoke(main, ["plan", str(phi4_shaped), "--recipe", "edge-gguf"])
    assert result.exit_code == 0, result.output
    assert "peak RAM" in result.stdout and "?" not in result.stdout
    assert "14.66B parameters (BF16); this machine has 25.8 GB of memory available; too big for it:" in result.stdout


def _shards(tmp_path: Path) -> dict[str, Path]:
    """tiny-phi3's weights split in two shards with an index, as big models are published."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(TINY / "model.safetensors")
    names = sorted(tensors)
    files, weight_map = {}, {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, tmp_path / shard, metadata={"format": "pt"})
        files[shard] = tmp_path / shard
        weight_map |= {n: shard for n in part}
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                                 "weight_map": weight_map}))
    return files | {index.name: index}


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_plan_json_hub_source_reads_headers_only(hub_env, tmp_path, monkeypatch, layout):
    from huggingface_hub import HfApi

    from tests.conftest import SENTINEL_TOKEN, USER

    hub, repo = hub_env, f"{USER}/Phi-4-tiny-{layout}"
    upload = tmp_path / "upload"
    upload.mkdir()
    for f in TINY.iterdir():
        if f.is_file() and not (layout == "sharded" and f.name == "model.safetensors"):
            shutil.copyfile(f, upload / f.name)
    if layout == "sharded":
        for name, path in _shards(tmp_path).items():
            shutil.move(path, upload / name)
    api = HfApi(endpoint=hub.url, token=SENTINEL_TOKEN)
    api.create_repo(repo)
    api.upload_folder(repo_id=repo, folder_path=upload)
    weights = {f"{repo}/{f.name}": f.stat().st_size for f in upload.glob("*.safetensors")}
    hub.reset_counters()
    machine(monkeypatch, "24GiB")

    result = CliRunner().invoke(main, ["plan", repo, "--family", "phi", "--recipe", "edge", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["parameters"] == count_parameters(TINY) and data["dtype"] == "F32"
    for v in (v for r in data["repos"] for v in r["variants"]):
        assert v["estimated_bytes"] > 0 and v["estimated_peak_ram_bytes"] > 0
        assert v["estimated_disk_bytes"] > count_parameters(TINY) * 4  # the source download is part of it
    for key, size in weights.items():  # each weight file was read up to its header, never whole
        assert 0 < hub.bytes_downloaded[key] < size, (key, hub.bytes_downloaded)


def test_publish_hub_source_refused_without_downloading(hub_env, tmp_path, monkeypatch, no_download):
    hub, repo = hub_env, "microsoft/Phi-4-tiny-refused"
    hub.seed_repo(repo, {p.name: p for p in TINY.iterdir() if p.is_file()})
    hub.reset_counters()
    machine(monkeypatch, "100MB")
    result = CliRunner().invoke(main, ["publish", repo, "--recipe", "edge-gguf", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Error: preflight: 3 of 3 variant(s)" in result.output, result.output
    assert hub.bytes_downloaded[f"{repo}/model.safetensors"] <= 100_001  # the header read only
    assert not any("/resolve/" in target and "config.json" in target for _, target, _ in hub.requests)


# ------------------------------------------------------------------------------- the cost table
# (variant, measured peak anonymous memory in GB of `hubbot build --variant` with validation, at
# Phi-3.5-mini's shape, the reference memory-mapped): benchmarks/results/scale.md
MEASURED_3_8B = [("gguf-Q4_K_M", 2.35), ("gguf-Q8_0", 1.44), ("gguf-F16", 1.39), (EDGE_ONNX_CPU_INT4, 3.96),
                 ("onnx-cpu-fp32", 15.42), ("onnx-gpu-int4-rtn-block-32", 3.18), ("openvino-int4_asym", 3.43),
                 ("openvino-int8_asym", 4.69), ("mlx-4bit", 3.41), ("mlx-8bit", 5.09)]


@pytest.mark.parametrize(("variant", "measured_gb"), MEASURED_3_8B)
def test_the_table_covers_the_measured_peaks_without_overshooting(variant, measured_gb):
    plan = plan_for(PHI35_MINI)
    e = preflight.estimate(plan, plan.parameters, "BF16")[variant]
    assert measured_gb * 1e9 <= e.peak_ram_bytes <= measured_gb * 1e9 * 1.4, e


def test_every_measured_edge_variant_of_a_3_8b_but_onnx_fp32_fits_a_16gb_runner(monkeypatch):
    plan = plan_for(PHI35_MINI)
    assert 3.8e9 < plan.parameters < 3.83e9
    estimates = preflight.estimate(plan, plan.parameters, "BF16")
    for variant, _ in MEASURED_3_8B:
        if variant != "onnx-cpu-fp32":
            assert estimates[variant].peak_ram_bytes < 14e9, estimates[variant]
    machine(monkeypatch, "16GB")  # a hosted runner: ORT holding the 15.3 GB fp32 model does not fit it
    with pytest.raises(preflight.PreflightError, match="onnx-cpu-fp32"):
        preflight.check(plan, plan.parameters, "BF16", variant_ids=["onnx-cpu-fp32"])
    assert all(e.build.ram_bytes < 3e9 for v, e in estimates.items() if v.startswith("gguf"))  # llama.cpp streams


def test_the_old_fp32_reference_alone_breaks_a_16gb_runner(monkeypatch):
    monkeypatch.setattr(costs, "REFERENCE_DTYPE", "F32")  # as before b445f1a: 15.1 GB at 3.8B
    plan = plan_for(PHI35_MINI, "edge-gguf")
    assert all(e.peak_ram_bytes > 15e9 for e in preflight.estimate(plan, plan.parameters, "BF16").values())


def test_phi4_quantized_gguf_and_mlx_fit_20gb_onnx_fp32_is_dropped_and_the_rest_refused_by_memory():
    plan = plan_for(PHI4)
    estimates = preflight.estimate(plan, plan.parameters, "BF16")
    for variant in ("gguf-Q4_K_M", "gguf-Q8_0", "mlx-4bit"):
        assert estimates[variant].peak_ram_bytes < 20e9, estimates[variant]
    [dropped] = plan.dropped  # its one 58.6 GB model.onnx.data: the Hub refuses files over 50 GB
    assert dropped.id == "onnx-cpu-fp32" and "over the Hub's 50.0 GB per-file limit" in dropped.reason
    with pytest.raises(preflight.PreflightError) as refused:
        with pytest.MonkeyPatch.context() as mp:
            machine(mp, "16GB")
            preflight.check(plan, plan.parameters, "BF16", variant_ids=["openvino-int8_asym"])
    assert "openvino-int8_asym" in str(refused.value) and refused.value.exit_code == 2


def test_build_steps_match_the_measurements():
    """Each step's own measured anonymous peak at 3.8B (hubbot.toolrun), with the process on top."""
    n = n_params(PHI35_MINI)
    measured = {("gguf", "convert"): 1.40, ("gguf", "quantize"): 0.54, ("onnx", "builder-fp32"): 2.47,
                ("onnx", "quantizer"): 3.52, ("openvino", "export-int4"): 3.07,
                ("openvino", "export-int8"): 4.28, ("mlx", "convert"): 2.98}
    for step, gb in measured.items():
        estimate = costs.PROCESS_BYTES + costs.STEPS[step].ram(n)
        assert gb * 1e9 <= estimate <= gb * 1e9 * 1.5, (step, estimate)
    # and at phi-4's 14.66B, where measured (benchmarks/results/scale.md)
    measured_phi4 = {("openvino", "export-int4"): 17.53}
    for step, gb in measured_phi4.items():
        estimate = costs.PROCESS_BYTES + costs.STEPS[step].ram(n_params(PHI4))
        assert gb * 1e9 <= estimate <= gb * 1e9 * 1.5, (step, estimate)
    assert costs.STEPS["onnx", "builder-fp32"].disk(n) >= 15.25e9  # its fp32 model: "15.3 GB", rounded


def test_run_disk_is_source_plus_the_largest_repo_plus_outputs(tmp_path):
    plan = plan_for(PHI4, local=False)
    n = plan.parameters
    run = preflight.estimate_run(plan, n, "BF16", workdir=tmp_path / "work", out_dir=tmp_path / "out")
    needs = {d.what: d.bytes for d in run.disk}
    outputs = {r.format: sum(int(n * v.bits_per_weight / 8) for v in r.variants) for r in plan.repos}
    # the largest repo at a time: its intermediate (BF16 GGUF, the ONNX quantizer's fp32 model) + its files
    assert needs["the working files"] == max(2 * n + outputs["gguf"], 4 * n + outputs["onnx"])
    assert needs["the source download"] == 2 * n
    assert needs["the output folders"] == sum(int(n * v.bits_per_weight / 8) for v in plan.variants)


def test_costs_module_is_not_a_format():
    assert "costs" not in formats()


# ------------------------------------------------------------------------------- the machine
def test_memory_override_units(monkeypatch):
    for text, expected in (("25769803776", 24 * GiB), ("24GiB", 24 * GiB), ("24 GB", 24 * 10**9), ("512M", 512e6)):
        monkeypatch.setenv(preflight.MEMORY_ENV, text)
        assert preflight.available_memory() == expected


def test_memory_from_meminfo_and_cgroup(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24576000 kB\nMemAvailable:   20000000 kB\n")
    assert preflight._meminfo_available(meminfo) == 20000000 * 1024
    root, me = tmp_path / "cgroup", tmp_path / "self-cgroup"
    job = root / "runner" / "job"
    job.mkdir(parents=True)
    (root / "memory.max").write_text("max\n")
    (root / "runner" / "memory.max").write_text(f"{16 * GiB}\n")
    (root / "runner" / "memory.stat").write_text(f"anon {2 * GiB}\nfile {9 * GiB}\n")
    (job / "memory.max").write_text("max\n")
    me.write_text("0::/runner/job\n")
    assert preflight._cgroup_available(root, me) == 14 * GiB  # page cache is not counted as used
    me.write_text("0::/\n")
    assert preflight._cgroup_available(root, me) is None  # no limit


def test_real_machine_numbers_are_sane(tmp_path):
    memory = preflight.available_memory()
    assert memory is None or 0 < memory < 2**50
    assert preflight.free_disk(tmp_path / "not" / "yet") == preflight.free_disk(tmp_path)
