"""The tokenizer probe battery and its rules, on the bundled example's tokenizer (fast); every
runtime on Microsoft's real Phi-3 tokenizer is in test_real_vocab.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hubbot.probes import PROBES, Segment, battery, end_of_turn, run_probes, shown_texts, stop_token_reason
from tests.conftest import ROOT

EXAMPLE = ROOT / "examples" / "tiny-phi3"


class HFTokenizerRuntime:
    """A transformers tokenizer where a runtime's tokenizer would be (tokenize, detokenize, stop ids)."""

    def __init__(self, folder: Path, stops: set[int]):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(folder)
        self.stops = stops

    def tokenize(self, text: str) -> list[int]:
        return list(self.tok(text).input_ids)

    def detokenize(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def stop_ids(self) -> set[int]:
        return self.stops


def test_battery_covers_the_kinds_every_added_token_and_chat_turns():
    probes = battery(EXAMPLE)
    assert len(PROBES) >= 40
    assert {p.kind for p in probes} == {"spaces", "whitespace", "digits", "script", "emoji", "code", "mixed",
                                        "special", "chat"}
    texts = [p.text for p in probes]
    assert all(t in texts for t in ("<|end|>", "<|user|>", "<|system|>", "</s>", "<|endoftext|>"))
    system_turns = [p for p in probes if p.kind == "chat" and p.text.startswith("<|system|>\nYou are")]
    assert system_turns and all("<|end|>" in p.text for p in system_turns)
    chat = system_turns[0]
    assert [s.added for s in chat.segments][:3] == [True, False, True]  # <|system|>, its text, <|end|>


def test_end_of_turn_is_read_from_the_chat_template(tmp_path):
    assert end_of_turn(EXAMPLE) == ("<|end|>", 1007)
    phi4_like = tmp_path / "eos-is-end-of-turn"  # Phi-4: eos_token is <|im_end|>, the turn's own end
    shutil.copytree(EXAMPLE, phi4_like)
    config = json.loads((phi4_like / "tokenizer_config.json").read_text())
    (phi4_like / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|end|>"}))
    assert end_of_turn(phi4_like) == ("<|end|>", 1007)


def test_shown_texts_allow_only_the_dummy_prefix_conventions():
    spm = Segment([571], "Hello", added=False, dummy_prefix=True)
    assert shown_texts(spm) == {"Hello", " Hello"}
    assert shown_texts(Segment([931, 571], " Hello", False, True)) == {" Hello", "  Hello", "Hello"}
    assert shown_texts(Segment([5, 6], "ello", False, False)) == {"ello"}
    assert shown_texts(Segment([220, 18435], "  Hello a", False, False)) == {"  Hello a", " Hello a", "Hello a"}
    assert shown_texts(Segment([1007], "<|end|>", True, False)) == {"<|end|>", "", " "}
    # clean_up_tokenization_spaces: the raw and the cleaned text are both right, nothing else
    cleaned = shown_texts(Segment([1, 2], "you ?", False, False, cleaned="you?"))
    assert cleaned == {"you ?", "you?"} and "you  ?" not in cleaned


def test_same_tokenizer_passes(tmp_path):
    report = run_probes(HFTokenizerRuntime(EXAMPLE, {1000, 1007}), EXAMPLE)
    assert report.strings == len(battery(EXAMPLE)) and report.reasons == []
    assert stop_token_reason(HFTokenizerRuntime(EXAMPLE, {1000, 1007}), EXAMPLE) is None


def test_metaspace_tokenizer_fails_on_leading_spaces_naming_the_string(tmp_path):
    """The example's tokenizer before it got Phi-3's Prepend normalizer: right on every prompt, wrong
    wherever a text starts with a space."""
    wrong = tmp_path / "metaspace"
    shutil.copytree(EXAMPLE, wrong)
    data = json.loads((wrong / "tokenizer.json").read_text())
    data["normalizer"] = None
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": False}
    (wrong / "tokenizer.json").write_text(json.dumps(data))
    report = run_probes(HFTokenizerRuntime(wrong, {1000}), EXAMPLE)
    assert report.encode_failures >= 5 and report.decode_failures == 0
    assert report.reasons[0] == ("tokenizer probe (spaces) ' Hello': the runtime encodes it as [571], "
                                 "the source tokenizer as [931, 571]")
    assert stop_token_reason(HFTokenizerRuntime(wrong, {1000}), EXAMPLE) == (
        "the end-of-turn token <|end|> (1007) does not end generation in the runtime's own generation config "
        "(it stops at [1000])")
