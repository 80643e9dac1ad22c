"""Microsoft's real Phi-3 tokenizer in every runtime: llama.cpp's own test strings and expected ids,
and the tokenizer probes passing on a good build and failing on a mis-converted tokenizer.

The fixture (``tests.realvocab``) carries the 32k Phi-3 vocabulary that llama.cpp's sources ship
(``models/ggml-vocab-phi-3.gguf`` in the llama-cpp-python sdist), rebuilt as a Hugging Face
tokenizer, with Microsoft's Phi-3.5-mini chat template; every format is built by hubbot's own
backends through ``hubbot publish --out``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from hubbot.backends.gguf import LlamaCppRuntime
from hubbot.backends.mlx import MLXRuntime
from hubbot.backends.onnx import OrtGenAIRuntime
from hubbot.backends.openvino import OpenVINORuntime
from hubbot.cli import main
from hubbot.probes import PROBES, battery, run_probes, stop_token_reason
from tests.conftest import ROOT
from tests.realvocab import cached_real_vocab_phi3, sources_dir, vocab_cases
from tests.realvocab.vocab import TEMPLATE

FORMATS = ("gguf", "onnx", "openvino", "mlx")
END = 32007  # <|end|>


@pytest.fixture(scope="session")
def vocab_sources() -> Path:
    return sources_dir()


@pytest.fixture(scope="session")
def real_phi3(vocab_sources) -> Path:
    return cached_real_vocab_phi3()


def test_rebuilt_tokenizer_gives_llama_cpp_expected_ids(real_phi3, vocab_sources):
    """The HF tokenizer and tokenizer.model rebuilt from the GGUF vocabulary tokenize every one of
    llama.cpp's test strings to its expected ids, and the chat template is Microsoft's file."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_phi3)
    sp = spm.SentencePieceProcessor(model_file=str(real_phi3 / "tokenizer.model"))
    cases = vocab_cases(vocab_sources)
    assert len(cases) >= 40 and any(c.text == " Hello" and c.ids == [29871, 15043] for c in cases)
    assert [tok(c.text).input_ids for c in cases] == [c.ids for c in cases]
    assert [sp.encode(c.text) for c in cases] == [c.ids for c in cases]
    assert tok.chat_template == (vocab_sources / TEMPLATE).read_text(encoding="utf-8")
    assert tok.convert_tokens_to_ids(["<|end|>", "<|user|>", "<|endoftext|>"]) == [END, 32010, 32000]


def _misconverted_tokenizer(real_phi3: Path, out: Path):
    """transformers' own conversion of Phi-3's tokenizer.model (what a folder without tokenizer.json gets)."""
    from transformers import AutoTokenizer

    out.mkdir()
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copyfile(real_phi3 / name, out / name)
    return AutoTokenizer.from_pretrained(out)


def test_transformers_conversion_gets_leading_spaces_wrong(real_phi3, tmp_path):
    tok = _misconverted_tokenizer(real_phi3, tmp_path / "converted")
    assert tok(" Hello").input_ids == [15043]  # llama.cpp and Microsoft's tokenizer.json: [29871, 15043]


def _probe_recipes(folder: Path) -> Path:
    family = yaml.safe_load((ROOT / "recipes" / "phi.yaml").read_text())
    family["recipes"] = {"probe": {"description": "fp32 in every format", "variants": [
        {"format": "gguf", "precision": "fp32"}, {"format": "onnx", "precision": "fp32", "target": "cpu"},
        {"format": "openvino", "precision": "fp32"}, {"format": "mlx", "precision": "fp32"}]}}
    family["watch"]["default_recipe"] = "probe"
    folder.mkdir()
    (folder / "phi.yaml").write_text(yaml.safe_dump(family, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def published(real_phi3, tmp_path_factory) -> dict[str, Path]:
    """`hubbot publish FIXTURE --recipe probe --out DIR`: one fp32 variant per format, each validated
    (tokenizer probes and stop token included) in its own runtime."""
    out = tmp_path_factory.mktemp("real-vocab")
    recipes = _probe_recipes(out / "recipes")
    result = CliRunner().invoke(main, ["--recipes-dir", str(recipes), "publish", str(real_phi3), "--recipe", "probe",
                                       "--out", str(out / "hub")])
    assert result.exit_code == 0, result.output
    name = real_phi3.name
    return {"gguf": out / "hub" / f"{name}-GGUF", "onnx": out / "hub" / f"{name}-onnx",
            "openvino": out / "hub" / f"{name}-fp32-ov", "mlx": out / "hub" / f"{name}-fp32"}


def _runtime(fmt: str, repo: Path):
    if fmt == "gguf":
        return LlamaCppRuntime(next(repo.glob("*.gguf")))
    if fmt == "onnx":
        return OrtGenAIRuntime(repo / "cpu_and_mobile" / "cpu-fp32")
    return OpenVINORuntime(repo) if fmt == "openvino" else MLXRuntime(repo)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_runtime_tokenizes_llama_cpp_test_strings(published, vocab_sources, fmt):
    runtime = _runtime(fmt, published[fmt])
    try:
        cases = vocab_cases(vocab_sources)
        assert {c.text: runtime.tokenize(c.text) for c in cases} == {c.text: c.ids for c in cases}
    finally:
        runtime.close()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_good_build_passes_probes_and_stops_at_end_of_turn(published, real_phi3, fmt):
    report = json.loads((published[fmt] / "validation.json").read_text())["variants"][0]
    assert report["passed"], report["reasons"]
    assert report["tokenizer_probes"] == {"strings": len(battery(real_phi3)), "encode_failures": 0,
                                          "decode_failures": 0}
    assert len(PROBES) >= 40 and {p.kind for p in battery(real_phi3)} >= {"special", "chat", "emoji", "script"}
    runtime = _runtime(fmt, published[fmt])
    try:
        started = time.monotonic()
        probes = run_probes(runtime, real_phi3)
        print(f"{fmt}: {probes.strings} probe strings in {time.monotonic() - started:.2f} s")
        assert probes.reasons == []
        assert END in runtime.stop_ids() and stop_token_reason(runtime, real_phi3) is None
    finally:
        runtime.close()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _break_tokenizer(fmt: str, repo: Path, real_phi3: Path, tmp: Path) -> Path:
    """A copy of the built variant whose tokenizer is the mis-converted one, in the form its runtime reads."""
    if fmt == "gguf":  # a GGUF whose tokenizer metadata says to add BOS (as Phi-3's first GGUFs did)
        folder = _copy(repo, tmp / "gguf")
        conv = Path(os.environ["HUBBOT_LLAMA_CPP_DIR"])
        subprocess.run([sys.executable, str(conv / "gguf-py" / "gguf" / "scripts" / "gguf_set_metadata.py"),
                        str(next(folder.glob("*.gguf"))), "tokenizer.ggml.add_bos_token", "1", "--force"],
                       check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(conv / "gguf-py")})
        return folder
    wrong = _misconverted_tokenizer(real_phi3, tmp / "converted")
    folder = _copy(repo / "cpu_and_mobile" / "cpu-fp32" if fmt == "onnx" else repo, tmp / fmt)
    if fmt == "openvino":  # the IR is converted from the HF tokenizer at export time: convert the wrong one
        import openvino as ov
        from openvino_tokenizers import convert_tokenizer

        tokenizer, detokenizer = convert_tokenizer(wrong, with_detokenizer=True)
        ov.save_model(tokenizer, folder / "openvino_tokenizer.xml")
        ov.save_model(detokenizer, folder / "openvino_detokenizer.xml")
    else:
        wrong.backend_tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_misconverted_tokenizer_fails_the_probes(published, real_phi3, tmp_path, fmt):
    folder = _break_tokenizer(fmt, published[fmt], real_phi3, tmp_path)
    runtime = OrtGenAIRuntime(folder) if fmt == "onnx" else _runtime(fmt, folder)
    try:
        probes = run_probes(runtime, real_phi3)
    finally:
        runtime.close()
    assert probes.encode_failures > 10, probes.reasons
    hello = [r for r in probes.reasons if r.startswith("tokenizer probe (spaces) ' Hello': the runtime encodes it as ")]
    assert hello and hello[0].endswith(", the source tokenizer as [29871, 15043]"), probes.reasons
    print(f"{fmt} with a mis-converted tokenizer: {hello[0]}")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_generation_config_without_end_of_turn_fails(published, real_phi3, tmp_path, fmt):
    """A genai_config.json / generation_config.json that stops only at <|endoftext|> lets a chat answer run on."""
    if fmt == "onnx":
        folder = _copy(published["onnx"] / "cpu_and_mobile" / "cpu-fp32", tmp_path / "onnx")
        config = json.loads((folder / "genai_config.json").read_text())
        config["model"]["eos_token_id"] = 32000
        (folder / "genai_config.json").write_text(json.dumps(config))
        runtime = OrtGenAIRuntime(folder)
    else:
        folder = _copy(published["openvino"], tmp_path / "openvino")
        config = json.loads((folder / "generation_config.json").read_text())
        config["eos_token_id"] = 32000
        (folder / "generation_config.json").write_text(json.dumps(config))
        runtime = OpenVINORuntime(folder)
    try:
        reason = stop_token_reason(runtime, real_phi3)
    finally:
        runtime.close()
    assert reason == ("the end-of-turn token <|end|> (32007) does not end generation in the runtime's own "
                      "generation config (it stops at [32000])")
