"""The tiny Phi fixtures are real models that continue their validation prompts with clear margins."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tests.fixtures as fixtures  # noqa: E402
from hubbot.recipe import Prompt, load_family  # noqa: E402
from tests.fixtures import (  # noqa: E402
    KINDS,
    build_tiny_model,
    cached_tiny_model,
    default_cache_dir,
    reference_ids,
    render_prompt_ids,
    validation_prompts,
)
from tests.fixtures.cache import builder_fingerprint  # noqa: E402
from tests.fixtures.tokenizers import GPT2_TIKTOKEN_MEMBER, gpt2_tiktoken_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny-phi3"
MIN_NEW_TOKENS = 12
MIN_MARGIN = 2.0  # logits between the greedy token and the runner-up, over the first 12 new tokens


# Building the three kinds (and once more for determinism) takes minutes: the tests that build a model are
# marked slow (CI runs them with -m slow); those that read the recipe, the cache or the checked-in example are not.
@pytest.fixture(scope="module", params=[pytest.param(kind, marks=pytest.mark.slow) for kind in KINDS])
def model_dir(request) -> Path:
    return cached_tiny_model(request.param)


def _load(path: Path):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return tok, model


def _greedy(model, prompt_ids: list[int], n: int):
    x = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    new = out.sequences[0, len(prompt_ids) :].tolist()
    margins = [float(torch.topk(step[0].float(), 2).values.diff().neg()) for step in out.logits]
    return new, margins


def _teacher_forced_argmax(model, prompt_ids: list[int], ref: list[int]) -> list[int]:
    x = torch.tensor([prompt_ids + ref])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0]
    return logits[len(prompt_ids) - 1 : -1].argmax(-1).tolist()


def _fake_int4_(model, group: int = 32) -> None:
    """Symmetric round-to-nearest int4 with per-group scales on every 2-D weight (embeddings and head too)."""
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() != 2 or p.shape[1] % group:
                continue
            g = p.reshape(p.shape[0], -1, group)
            scale = g.abs().amax(-1, keepdim=True) / 7
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)
            p.copy_(((g / scale).round().clamp(-8, 7) * scale).reshape(p.shape))


def test_validation_prompts_are_the_phi_recipes():
    recipe = load_family(REPO / "recipes" / "phi.yaml").validation.prompts
    prompts = validation_prompts()
    assert [(p.name, p.text, p.chat) for p in prompts] == [(p.name, p.text, p.chat) for p in recipe]
    assert {p.name for p in prompts} == set(fixtures.EXPECTED_CONTINUATIONS)  # no answer left unused
    assert all(p.expected for p in prompts)


def test_a_recipe_prompt_without_an_expected_answer_fails_clearly(tmp_path):
    recipe = tmp_path / "phi.yaml"
    text = (REPO / "recipes" / "phi.yaml").read_text()
    anchor = "    - {name: count, "
    assert anchor in text
    recipe.write_text(text.replace(anchor, '    - {name: weeks, text: "Weeks: 1, 2,"}\n' + anchor, 1))
    assert "weeks" in [p.name for p in load_family(recipe).validation.prompts]
    with pytest.raises(ValueError, match=r"phi\.yaml: validation prompt\(s\) weeks have no expected continuation"):
        validation_prompts(recipe)


def test_unknown_kind_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny model kind"):
        build_tiny_model("phi2", tmp_path)
    with pytest.raises(ValueError, match="unknown tiny model kind"):
        cached_tiny_model("phi2", tmp_path)


def test_greedy_continues_every_prompt_with_clear_margins(model_dir):
    tok, model = _load(model_dir)
    for prompt in validation_prompts():
        prompt_ids, ref = reference_ids(tok, prompt)
        assert prompt_ids == render_prompt_ids(tok, prompt)
        assert len(ref) >= MIN_NEW_TOKENS, prompt.name
        n = min(len(ref), 20)
        new, margins = _greedy(model, prompt_ids, n)
        assert new == ref[:n], (prompt.name, tok.decode(new), tok.decode(ref[:n]))
        assert min(margins[:MIN_NEW_TOKENS]) >= MIN_MARGIN, (prompt.name, margins)


def test_chat_answers_end_with_the_end_of_turn_token(model_dir):
    tok, model = _load(model_dir)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for prompt in (p for p in validation_prompts() if p.chat):
        prompt_ids, ref = reference_ids(tok, prompt)
        new, _ = _greedy(model, prompt_ids, len(ref) + 8)
        assert new == ref, prompt.name  # generation stopped at the end-of-turn token
        assert ref[-1] in eos
        text = tok.decode(new, skip_special_tokens=True)
        assert text.strip() == prompt.expected


def test_int4_round_to_nearest_keeps_teacher_forced_agreement(model_dir):
    tok, model = _load(model_dir)
    cases = [reference_ids(tok, p) for p in validation_prompts()]
    before = [_teacher_forced_argmax(model, p, r) for p, r in cases]
    _fake_int4_(model)
    after = [_teacher_forced_argmax(model, p, r) for p, r in cases]
    pairs = [(a, b) for xs, ys in zip(before, after) for a, b in zip(xs, ys)]
    agreement = sum(a == b for a, b in pairs) / len(pairs)
    assert agreement >= 0.95, agreement
    # and the fp32 model itself predicts the references teacher-forced
    refs = [r for _, r in cases]
    hits = sum(a == b for xs, ys in zip(before, refs) for a, b in zip(xs, ys))
    assert hits / sum(len(r) for r in refs) >= 0.98


def test_configs_fit_the_kind(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    info = json.loads((model_dir / "tiny_model_info.json").read_text())
    kind = info["kind"]
    assert cfg["architectures"] == ["Phi3ForCausalLM"]
    assert cfg["hidden_size"] == 256 and cfg["hidden_size"] // cfg["num_attention_heads"] == 64
    assert cfg["intermediate_size"] % 256 == 0
    assert 2 <= cfg["num_hidden_layers"] <= 4
    assert cfg["vocab_size"] % 64 == 0
    assert (model_dir / "model.safetensors").is_file()
    assert (model_dir / "chat_template.jinja").is_file() and tok_cfg["chat_template"]
    assert tok_cfg["add_bos_token"] is False
    if kind == "phi3":
        assert tok_cfg["tokenizer_class"] == "LlamaTokenizer"
        assert (model_dir / "tokenizer.model").is_file()
        assert cfg["tie_word_embeddings"] is False
        assert cfg["rope_parameters"].get("partial_rotary_factor", 1.0) == 1.0
    else:
        assert tok_cfg["tokenizer_class"] == "GPT2Tokenizer"
        assert not (model_dir / "tokenizer.model").exists()
    if kind == "phi4":
        assert cfg["tie_word_embeddings"] is False
        assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    if kind == "phi4-mini":
        assert cfg["tie_word_embeddings"] is True
        assert cfg["rope_parameters"]["partial_rotary_factor"] == 0.75
        assert cfg["partial_rotary_factor"] == 0.75
        # ORT GenAI needs head_dim * factor / 2 to be a multiple of 8
        assert (64 * 0.75 / 2) % 8 == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.partial_rotary_factor == cfg["rope_parameters"]["partial_rotary_factor"]


def test_tokenizers_match_their_kind(model_dir):
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    kind = json.loads((model_dir / "tiny_model_info.json").read_text())["kind"]
    vocab = tok.get_vocab()
    text = "Hello world, 1 2 3! Ünïcödé \u2014 tabs\tand\nnewlines"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    ids = tok("Count: 1, 2")["input_ids"]
    assert tok.bos_token_id not in ids  # like the real models, HF adds no BOS
    hi = [{"role": "user", "content": "Hi"}]
    rendered = tok.apply_chat_template(hi, add_generation_prompt=True, tokenize=False)
    if kind == "phi3":
        specials = [
            "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
            "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
        ]  # fmt: skip
        first = vocab["<|endoftext|>"]
        assert [vocab[t] for t in specials] == list(range(first, first + len(specials)))
        assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
        assert tok.convert_tokens_to_ids("<0x0A>") == 13  # byte fallback pieces, as in Llama/Phi-3
        assert rendered == "<|user|>\nHi<|end|>\n<|assistant|>\n"
        # like Phi-3's tokenizer.json and llama.cpp: the added tokens eat the "\n", and every stretch of
        # text after a special token starts with "\u2581"
        toks = tok.convert_ids_to_tokens(render_prompt_ids(tok, Prompt("hi", "Hi", chat=True)))
        assert toks[0] == "<|user|>" and toks[1].startswith("\u2581") and toks[-2:] == ["<|end|>", "<|assistant|>"]
    else:
        # the real GPT-2 ranks: known ids for GPT-2's own docstring example
        assert tok("Hello world")["input_ids"] == [15496, 995]
        assert tok(" Hello world")["input_ids"] == [18435, 995]
        assert vocab["<|endoftext|>"] == 50256
        if kind == "phi4":
            assert rendered == "<|im_start|>user<|im_sep|>Hi<|im_end|><|im_start|>assistant<|im_sep|>"
        else:
            assert rendered == "<|user|>Hi<|end|><|assistant|>"


def test_model_card_marks_a_synthetic_mit_model(model_dir):
    card = (model_dir / "README.md").read_text()
    front = card.split("---")[1]
    assert "license: mit" in front.splitlines()
    assert "base_model" not in front
    assert "synthetic test model" in card


@pytest.mark.slow
def test_cached_model_is_reused(tmp_path):
    first = cached_tiny_model("phi3")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert cached_tiny_model("phi3") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert "phi3" in first.name  # llama.cpp keys Phi-3 tokenizer behaviour on the name


def test_cache_is_hubbots_unless_overridden(tmp_path, monkeypatch):
    monkeypatch.delenv("HUBBOT_TINY_MODEL_CACHE", raising=False)
    monkeypatch.setenv("HUBBOT_CACHE", str(tmp_path / "hubbot-cache"))
    assert default_cache_dir() == tmp_path / "hubbot-cache" / "tiny-models"
    monkeypatch.setenv("HUBBOT_TINY_MODEL_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"


def test_tests_share_one_tiny_model_cache(tmp_path):
    # conftest gives each test its own HUBBOT_CACHE; the built models must not follow it
    assert Path(os.environ["HUBBOT_CACHE"]).is_relative_to(tmp_path)
    assert not default_cache_dir().is_relative_to(tmp_path)


def test_fingerprint_covers_every_module_of_the_builder(tmp_path, monkeypatch):
    copy = tmp_path / "fixtures"
    shutil.copytree(Path(fixtures.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(fixtures.cache, "PACKAGE_DIR", copy)
    modules = sorted(copy.glob("*.py"))
    assert {"build.py", "cache.py", "corpus.py", "prompts.py", "specs.py", "tokenizers.py", "training.py"} <= {
        m.name for m in modules
    }
    base = builder_fingerprint("phi3")
    assert builder_fingerprint("phi4") != base
    for module in modules:
        source = module.read_bytes()
        module.write_bytes(source + b"\n# edited\n")
        assert builder_fingerprint("phi3") != base, module.name
        module.write_bytes(source)
    assert builder_fingerprint("phi3") == base


def test_gpt2_ranks_override_must_be_the_real_file(tmp_path, monkeypatch):
    bogus = tmp_path / "gpt2.tiktoken"
    bogus.write_text("IQ== 0\n")
    monkeypatch.setenv("HUBBOT_GPT2_TIKTOKEN", str(bogus))
    with pytest.raises(RuntimeError, match="HUBBOT_GPT2_TIKTOKEN=.*sha256"):
        gpt2_tiktoken_path()


def test_gpt2_ranks_in_hubbots_cache_are_checked(monkeypatch):
    monkeypatch.delenv("HUBBOT_GPT2_TIKTOKEN", raising=False)
    # a damaged earlier fetch: the folder exists, so nothing is downloaded, and the sha256 check catches it
    folder = Path(os.environ["HUBBOT_CACHE"]) / "openai-whisper-20250625"
    (folder / GPT2_TIKTOKEN_MEMBER).parent.mkdir(parents=True)
    (folder / GPT2_TIKTOKEN_MEMBER).write_text("IQ== 0\n")
    with pytest.raises(RuntimeError, match=f"delete {re.escape(str(folder))} to fetch it again"):
        gpt2_tiktoken_path()


@pytest.mark.slow
def test_build_is_deterministic(tmp_path):
    a = build_tiny_model("phi3", tmp_path / "a", steps=3)
    b = build_tiny_model("phi3", tmp_path / "b", steps=3)
    for name in ("model.safetensors", "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = build_tiny_model("phi3", tmp_path / "c", steps=3, seed=1)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_command_line_help():
    out = subprocess.run(
        [sys.executable, "-m", "tests.fixtures", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0 and "phi4-mini" in out.stdout


@pytest.mark.skipif(not EXAMPLE.is_dir(), reason="examples/tiny-phi3 not generated")
def test_checked_in_example_is_a_working_phi3_fixture():
    size = sum(p.stat().st_size for p in EXAMPLE.rglob("*") if p.is_file())
    assert size <= 10 * 1024 * 1024
    assert json.loads((EXAMPLE / "tiny_model_info.json").read_text())["kind"] == "phi3"
    tok, model = _load(EXAMPLE)
    assert next(model.parameters()).dtype == torch.float32
    for prompt in validation_prompts():
        prompt_ids, ref = reference_ids(tok, prompt)
        new, margins = _greedy(model, prompt_ids, MIN_NEW_TOKENS)
        assert new == ref[:MIN_NEW_TOKENS], prompt.name
        assert min(margins) >= MIN_MARGIN


def test_module_exports():
    assert fixtures.KINDS == ("phi3", "phi4", "phi4-mini")
    assert set(fixtures.SPECS) == set(KINDS)
