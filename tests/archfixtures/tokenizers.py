"""The fixtures' tokenizers, made with tests.fixtures' own builders: Phi-3's sentencepiece tokenizer for
PhiMoE (as Phi-3.5-MoE ships), GPT-2's byte-level BPE ranks for Phi-2 (its CodeGenTokenizer vocabulary)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tests.fixtures.specs import SPECS as PHI3_SPECS
from tests.fixtures.tokenizers import Log, _gpt2_vocab_and_merges, _save_tokenizer, gpt2_tiktoken_path, write_tokenizer

from .specs import PHI2_CHAT_TEMPLATE, ArchSpec


def build_phi2_tokenizer(spec: ArchSpec, log: Log) -> tuple[Any, dict]:
    """GPT-2's vocabulary and merges with <|endoftext|> (50256) as bos, eos, unk and pad, as phi-2 has."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _gpt2_vocab_and_merges(gpt2_tiktoken_path(log))
    vocab["<|endoftext|>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = PHI2_CHAT_TEMPLATE
    return tok, {"tokenizer_class": "CodeGenTokenizer", "add_bos_token": False, "add_prefix_space": False,
                 "clean_up_tokenization_spaces": True, "model_max_length": spec.max_position_embeddings}


def write_arch_tokenizer(spec: ArchSpec, seed: int, out_dir: Path, log: Log) -> Path | None:
    """Write the kind's tokenizer files into ``out_dir``; the sentencepiece model's path, if there is one."""
    if spec.kind == "phimoe":
        phi3 = dataclasses.replace(PHI3_SPECS["phi3"], max_position_embeddings=spec.max_position_embeddings)
        write_tokenizer(phi3, seed, out_dir, log)
        use_phi3_layout(out_dir / "tokenizer.json")
        return out_dir / "tokenizer.model"
    tok, overrides = build_phi2_tokenizer(spec, log)
    _save_tokenizer(tok, overrides, out_dir)
    return None


def use_phi3_layout(path: Path) -> None:
    """Microsoft's Phi-3 tokenizer.json layout, as examples/tiny-phi3 has it: a ``Prepend("▁")`` +
    ``Replace(" ", "▁")`` normalizer instead of a Metaspace pre-tokenizer, and ``</s>`` stripping the
    whitespace after it. tests.fixtures' Metaspace(prepend_scheme=always) gives ' Hello' one id in
    transformers and two in llama.cpp and ORT GenAI (the tokenizer probes catch it); tests.fixtures
    itself is left alone, as a change there rebuilds every fixture."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    data["pre_tokenizer"] = None
    for token in data["added_tokens"]:
        if token["content"] == "</s>":
            token["rstrip"] = True
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
