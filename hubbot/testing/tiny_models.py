"""Tiny, real, deterministic Phi fixtures built offline.

`build_tiny_model(kind, out_dir)` writes a small but genuine `Phi3ForCausalLM` checkpoint with a real
tokenizer and chat template, trained for a fixed number of steps on list-continuation tasks (counting,
days of the week, letters, months, and two chat questions).  Unlike random-weight tiny models, whose
top-1/top-2 logit margins are a few hundredths, these fixtures continue `VALIDATION_PROMPTS` greedily with
margins of several logits, so quantized exports can be compared with the source model meaningfully.

Kinds:

* ``phi3`` -- Phi-3-mini style: sentencepiece BPE tokenizer (``tokenizer.model``, byte fallback) trained
  here, Phi-3's added tokens and chat template, untied embeddings, full rotary embeddings.
* ``phi4`` -- Phi-4 style: byte-level BPE (``GPT2Tokenizer``) with the real GPT-2 ranks, so llama.cpp's
  converter recognises the pre-tokenizer; Phi-4's ``<|im_start|>``/``<|im_sep|>`` chat template; GQA.
* ``phi4-mini`` -- Phi-4-mini style: the same byte-level vocabulary with Phi-4-mini's added tokens and
  chat template, ``partial_rotary_factor=0.75``, tied embeddings, GQA.

The GPT-2 ranks file is not vendored: it is taken from the ``openai-whisper`` sdist on PyPI
(``whisper/assets/gpt2.tiktoken``, pinned by sha256) with ``pip download`` the first time it is needed and
kept in the cache folder.  Set ``HUBBOT_GPT2_TIKTOKEN`` to a local copy to skip the download.

Command line: ``python -m hubbot.testing.tiny_models KIND OUT_DIR [--seed N] [--steps N]``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "KINDS",
    "VALIDATION_PROMPTS",
    "TinySpec",
    "SPECS",
    "build_tiny_model",
    "cached_tiny_model",
    "default_cache_dir",
    "render_prompt_ids",
    "reference_ids",
]

KINDS = ("phi3", "phi4", "phi4-mini")

# Each entry: name, kind ("plain": raw text continuation; "chat": `text` is the user message, rendered with
# the tokenizer's chat template and add_generation_prompt=True), text, and `expected`: the reference
# continuation the fixture is trained to produce (for chat: the whole assistant answer, which is followed
# by the end-of-turn token).
VALIDATION_PROMPTS: list[dict] = [
    {
        "name": "count",
        "kind": "plain",
        "text": "Count: 1, 2, 3, 4, 5,",
        "expected": " 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20",
    },
    {
        "name": "days",
        "kind": "plain",
        "text": "Days: Monday, Tuesday, Wednesday,",
        "expected": " Thursday, Friday, Saturday, Sunday, Monday, Tuesday, Wednesday, Thursday, Friday",
    },
    {
        "name": "letters",
        "kind": "plain",
        "text": "Letters: A B C D E",
        "expected": " F G H I J K L M N O P Q R S T U V W X Y Z",
    },
    {
        "name": "months",
        "kind": "plain",
        "text": "Months: January, February, March,",
        "expected": " April, May, June, July, August, September, October, November, December, January, February",
    },
    {
        "name": "count-chat",
        "kind": "chat",
        "text": "Count from 1 to 10.",
        "expected": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10.",
    },
    {
        "name": "days-chat",
        "kind": "chat",
        "text": "List the days of the week.",
        "expected": "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.",
    },
]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip
LETTERS = [chr(ord("A") + i) for i in range(26)]

# ---------------------------------------------------------------------------------------------------------
# Kinds


@dataclass(frozen=True)
class TinySpec:
    kind: str
    tokenizer: str  # "spm" (trained sentencepiece BPE) or "gpt2" (GPT-2 byte-level BPE ranks)
    num_hidden_layers: int
    num_key_value_heads: int
    intermediate_size: int
    tie_word_embeddings: bool
    partial_rotary_factor: float
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None
    steps: int
    hidden_size: int = 256
    num_attention_heads: int = 4  # head_dim 64
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 40
    spm_vocab_size: int = 1000


SPECS: dict[str, TinySpec] = {
    "phi3": TinySpec(
        kind="phi3", tokenizer="spm", num_hidden_layers=2, num_key_value_heads=4, intermediate_size=768,
        tie_word_embeddings=False, partial_rotary_factor=1.0, rope_theta=10000.0,
        max_position_embeddings=4096, sliding_window=2047, steps=600,
    ),
    "phi4": TinySpec(
        kind="phi4", tokenizer="gpt2", num_hidden_layers=2, num_key_value_heads=2, intermediate_size=1024,
        tie_word_embeddings=False, partial_rotary_factor=1.0, rope_theta=250000.0,
        max_position_embeddings=16384, sliding_window=None, steps=600,
    ),
    "phi4-mini": TinySpec(
        kind="phi4-mini", tokenizer="gpt2", num_hidden_layers=4, num_key_value_heads=2, intermediate_size=768,
        tie_word_embeddings=True, partial_rotary_factor=0.75, rope_theta=10000.0,
        max_position_embeddings=4096, sliding_window=262144, steps=600,
    ),
}  # fmt: skip

_PHI3_ADDED = [  # in Phi-3-mini's order, right after the sentencepiece vocabulary (ids 32000.. there)
    "<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
    "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>",
]  # fmt: skip
_PHI4_ADDED = ["<|im_start|>", "<|im_end|>", "<|im_sep|>"]  # after <|endoftext|>, as in Phi-4
_PHI4_MINI_ADDED = [
    "<|assistant|>", "<|end|>", "<|user|>", "<|system|>", "<|tool|>", "<|/tool|>",
    "<|tool_call|>", "<|/tool_call|>", "<|tool_response|>", "<|tag|>",
]  # fmt: skip

# Chat templates as shipped by the real models (Phi-3-mini-4k-instruct, phi-4, Phi-4-mini-instruct).
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
    "{% endif %}"
)
PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}{{'<|im_start|>system<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% elif (message['role'] == 'assistant') %}"
    "{{'<|im_start|>assistant<|im_sep|>' + message['content'] + '<|im_end|>'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)
PHI4_MINI_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + "
    "message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + "
    "message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

# End-of-turn token written after each assistant answer in training, per kind.
_END_OF_TURN = {"phi3": "<|end|>", "phi4": "<|im_end|>", "phi4-mini": "<|end|>"}

# GPT-2's BPE ranks (identical to GPT-2's vocab.json ids), shipped in openai-whisper's sdist.
_WHISPER_SDIST = "openai-whisper==20250625"
_GPT2_TIKTOKEN_MEMBER = "whisper/assets/gpt2.tiktoken"
_GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

_MODEL_CARD = """\
---
license: mit
library_name: transformers
pipeline_tag: text-generation
model_name: {name}
tags:
- phi3
- synthetic
- test-fixture
---

# {name}

This is a synthetic test model: a tiny `Phi3ForCausalLM` ({params:,} parameters, {layers} layers, hidden size
{hidden}) built offline by `hubbot.testing.tiny_models` ({kind} kind, seed {seed}, {steps} training steps).
It was trained briefly on CPU to continue simple lists (counting, days of the week, letters,
months) and to answer two chat questions, so that its greedy continuations have clear logit margins.
It knows nothing else and is not derived from any Microsoft checkpoint; it exists to test conversion,
quantization and validation tooling.

{tokenizer_line}

Greedy continuations (min top-1/top-2 logit margin over the first {n_check} new tokens):

{outputs}
"""

# ---------------------------------------------------------------------------------------------------------
# Training data


def _count_seq(start: int, n: int) -> list[str]:
    return [str(i) for i in range(start, start + n)]


def _cyclic(items: list[str], start: int, n: int) -> list[str]:
    return [items[(start + i) % len(items)] for i in range(n)]


def _plain_text(rng: random.Random) -> str:
    task = rng.choices(["count", "days", "letters", "months"], weights=[4, 2, 2, 2])[0]
    if task == "count":
        start = 1 if rng.random() < 0.2 else rng.randint(1, 300)
        return "Count: " + ", ".join(_count_seq(start, rng.randint(3, 22)))
    if task == "days":
        start = 0 if rng.random() < 0.2 else rng.randrange(7)
        return "Days: " + ", ".join(_cyclic(DAYS, start, rng.randint(3, 16)))
    if task == "months":
        start = 0 if rng.random() < 0.2 else rng.randrange(12)
        return "Months: " + ", ".join(_cyclic(MONTHS, start, rng.randint(3, 18)))
    start = 0 if rng.random() < 0.2 else rng.randrange(24)
    return "Letters: " + " ".join(LETTERS[start : start + rng.randint(3, 26)])


def _chat_pair(rng: random.Random) -> tuple[str, str]:
    task = rng.choices(["count", "days", "days-from", "months", "letters"], weights=[8, 3, 2, 2, 1])[0]
    if task == "count":
        if rng.random() < 0.25:
            a, b = 1, 10
        else:
            a = 1 if rng.random() < 0.3 else rng.randint(1, 200)
            b = a + rng.randint(2, 20)
        return f"Count from {a} to {b}.", ", ".join(_count_seq(a, b - a + 1)) + "."
    if task == "days":
        return "List the days of the week.", ", ".join(DAYS) + "."
    if task == "days-from":
        start = rng.randrange(7)
        return f"List the days of the week starting from {DAYS[start]}.", ", ".join(_cyclic(DAYS, start, 7)) + "."
    if task == "months":
        return "List the months of the year.", ", ".join(MONTHS) + "."
    return "List the letters of the alphabet.", " ".join(LETTERS) + "."


_GENERAL_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model can learn to count, to list the days of the week
and to recite the months of the year. This tokenizer was trained on a short text written for a test fixture.
Numbers such as 1, 2, 3, 10, 42, 100 and 2024 are split into single digits. Questions and answers follow.
What day comes after Monday? Tuesday comes after Monday. Which month follows March? April follows March.
Please count from one to ten, then list the letters of the alphabet in order, from A to Z.
Hello, world! It is a sunny day in the city; people walk, talk, read books and drink coffee or tea.
The system converts models, checks them against the source and publishes the results for everyone.
"""


def _spm_corpus(seed: int) -> list[str]:
    rng = random.Random(f"spm-corpus-{seed}")
    lines = [line for line in _GENERAL_TEXT.splitlines() if line]
    for _ in range(3000):
        lines.append(_plain_text(rng))
        q, a = _chat_pair(rng)
        lines.append(q)
        lines.append(a)
    return lines


# ---------------------------------------------------------------------------------------------------------
# Tokenizers


def _train_sentencepiece(out_file: Path, spec: TinySpec, seed: int) -> None:
    import io

    import sentencepiece as spm

    # In-memory input and output: a file-based run records the (temporary) paths in the model proto,
    # which would make tokenizer.model differ from build to build.
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_spm_corpus(seed)),
        model_writer=model,
        model_type="bpe",
        vocab_size=spec.spm_vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        hard_vocab_limit=False,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    out_file.write_bytes(model.getvalue())


def _spm_backend(model_file: Path):
    """A `tokenizers` BPE equivalent of a sentencepiece BPE model, built without protobuf.

    (transformers' own converter needs the protobuf package, which this project does not depend on.)
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    ranked = []
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i):
            continue
        piece = sp.id_to_piece(i)
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((i, vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True, dropout=None)
    )
    # "always": every stretch of text between special tokens gets the "▁" prefix, as Phi-3's own
    # tokenizer.json (normalizer Prepend("▁")) and llama.cpp's SPM tokenizer do; "first" would make
    # `<|user|>\nCount` tokenize differently from llama.cpp.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)]
    )
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return backend


def _build_phi3_tokenizer(tok_dir: Path, spec: TinySpec, seed: int):
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tok_dir.mkdir(parents=True, exist_ok=True)
    _train_sentencepiece(tok_dir / "tokenizer.model", spec, seed)
    backend = _spm_backend(tok_dir / "tokenizer.model")
    base = backend.get_vocab_size()
    # Phi-3's added tokens: all special, and all but <|endoftext|> strip whitespace on their right.
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=(t != "<|endoftext|>"))
         for t in _PHI3_ADDED]
    )  # fmt: skip
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>",
        pad_token="<|endoftext|>",
    )  # fmt: skip
    ids = tok.convert_tokens_to_ids(_PHI3_ADDED)
    assert ids == list(range(base, base + len(_PHI3_ADDED))), ids
    tok.chat_template = PHI3_CHAT_TEMPLATE
    return tok, {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "legacy": False,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_position_embeddings,
    }


def default_cache_dir() -> Path:
    env = os.environ.get("HUBBOT_TINY_MODEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hubbot" / "tiny-models"


def _gpt2_tiktoken_path() -> Path:
    """Local copy of GPT-2's BPE ranks (whisper/assets/gpt2.tiktoken), fetched from PyPI once."""
    env = os.environ.get("HUBBOT_GPT2_TIKTOKEN")
    candidates = [Path(env)] if env else []
    assets = default_cache_dir() / "_assets"
    target = assets / "gpt2.tiktoken"
    candidates.append(target)
    for path in candidates:
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == _GPT2_TIKTOKEN_SHA256:
            return path
    assets.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, _WHISPER_SDIST]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("openai_whisper-*.tar.gz"))
        if proc.returncode != 0 or not sdists:
            raise RuntimeError(
                f"could not fetch GPT-2 BPE ranks ({' '.join(cmd)} exited {proc.returncode}): "
                f"{proc.stderr.strip()[-2000:]}\nSet HUBBOT_GPT2_TIKTOKEN to a copy of whisper/assets/gpt2.tiktoken."
            )
        with tarfile.open(sdists[0]) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(_GPT2_TIKTOKEN_MEMBER))
            data = tar.extractfile(member).read()
    if hashlib.sha256(data).hexdigest() != _GPT2_TIKTOKEN_SHA256:
        raise RuntimeError("gpt2.tiktoken from the openai-whisper sdist has an unexpected sha256")
    partial = target.with_suffix(f".{os.getpid()}.part")
    partial.write_bytes(data)
    os.replace(partial, target)
    return target


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _gpt2_vocab_and_merges(tiktoken_file: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2 byte-level vocab and merges from tiktoken ranks (one merge per multi-byte token, in rank order)."""
    ranks: dict[bytes, int] = {}
    for line in tiktoken_file.read_text(encoding="ascii").splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    enc = _bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        # Replay tiktoken's BPE on the token's own bytes using only lower ranks: the last two parts left
        # are the merge that creates this token.
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best, best_i = None, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best):
                    best, best_i = r, i
            if best is None:
                break
            parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        if len(parts) == 2:
            merges.append((to_str(parts[0]), to_str(parts[1])))
    vocab = {to_str(token): rank for token, rank in ranks.items()}
    return vocab, merges


def _build_gpt2_tokenizer(tok_dir: Path, spec: TinySpec):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, merges = _gpt2_vocab_and_merges(_gpt2_tiktoken_path())
    vocab["<|endoftext|>"] = len(vocab)  # 50256, as in GPT-2
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    added = _PHI4_ADDED if spec.kind == "phi4" else _PHI4_MINI_ADDED
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ["<|endoftext|>", *added]]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>" if spec.kind == "phi4" else "<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tok.chat_template = PHI4_CHAT_TEMPLATE if spec.kind == "phi4" else PHI4_MINI_CHAT_TEMPLATE
    return tok, {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_position_embeddings,
    }


def _save_tokenizer(tok, overrides: dict, out_dir: Path) -> None:
    tok.save_pretrained(out_dir)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg.update(overrides)
    # transformers 5 writes the template to chat_template.jinja; keep a copy in tokenizer_config.json too
    # so that tools that only read tokenizer_config.json (older transformers, llama.cpp) find it.
    cfg["chat_template"] = tok.chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# Prompt helpers (shared with the tests and the validation code)


def _as_ids(out: Any) -> list[int]:
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return list(out)


def render_prompt_ids(tokenizer, prompt: dict) -> list[int]:
    """Token ids of a VALIDATION_PROMPTS entry as HF transformers would feed them to the model."""
    if prompt["kind"] == "chat":
        return _as_ids(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt["text"]}], add_generation_prompt=True, tokenize=True
            )
        )
    return _as_ids(tokenizer(prompt["text"]))


def _end_of_turn(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    for tok in ("<|end|>", "<|im_end|>"):
        if tok in vocab:
            return tok
    return tokenizer.eos_token


def reference_ids(tokenizer, prompt: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, reference continuation ids) for a VALIDATION_PROMPTS entry, for teacher-forced scoring.

    For chat prompts the continuation is the whole answer followed by the end-of-turn token.
    """
    prompt_ids = render_prompt_ids(tokenizer, prompt)
    if prompt["kind"] == "chat":
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt["text"]}], add_generation_prompt=True, tokenize=False
        )
        full = _as_ids(tokenizer(rendered + prompt["expected"] + _end_of_turn(tokenizer), add_special_tokens=False))
    else:
        full = _as_ids(tokenizer(prompt["text"] + prompt["expected"]))
    if full[: len(prompt_ids)] != prompt_ids:
        raise ValueError(f"prompt {prompt['name']!r} does not tokenize as a prefix of its reference")
    return prompt_ids, full[len(prompt_ids) :]


# ---------------------------------------------------------------------------------------------------------
# Building


_PUNCT_WEIGHT = 4
_MAX_SAMPLE_TOKENS = 80  # long counts in digit-split tokenizers are cut (keeps batches short)


def _encode_samples(tok, kind: str, n: int, seed: int, spm_model: Path | None = None) -> list[tuple[list[int], list[int]]]:
    """n training samples as (ids, loss mask).

    With `spm_model` (phi3), some chat samples tokenize the user message the way sentencepiece and llama.cpp
    do (a "▁" prefix after the special token) instead of HF's way, so both runtimes see familiar input.
    """
    rng = random.Random(f"samples-{kind}-{seed}")
    end = _END_OF_TURN[kind]
    bos = tok.bos_token_id
    sp = None
    if spm_model is not None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(spm_model))
        user_id, end_id, asst_id = tok.convert_tokens_to_ids(["<|user|>", "<|end|>", "<|assistant|>"])
    punct = set(tok.convert_tokens_to_ids([",", "."])) - {tok.unk_token_id}
    samples: list[tuple[list[int], list[int]]] = []
    prompt_cache: dict[str, tuple[str, list[int]]] = {}
    for _ in range(n):
        if rng.random() < 0.55:
            ids = _as_ids(tok(_plain_text(rng)))
            mask = [1] * len(ids)
        else:
            q, a = _chat_pair(rng)
            if q not in prompt_cache:
                rendered = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
                p_ids = _as_ids(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True))
                prompt_cache[q] = (rendered, p_ids)
            rendered, p_ids = prompt_cache[q]
            ids = _as_ids(tok(rendered + a + end, add_special_tokens=False))
            assert ids[: len(p_ids)] == p_ids, (q, ids, p_ids)
            if sp is not None and rng.random() < 0.3 and p_ids[0] == user_id and p_ids[-2:] == [end_id, asst_id]:
                sp_prompt = [user_id, *sp.encode(q), end_id, asst_id]
                ids, p_ids = sp_prompt + ids[len(p_ids) :], sp_prompt
            # The "," or "." after each item decides whether the answer goes on: weigh it up.
            mask = [0] * len(p_ids) + [_PUNCT_WEIGHT if t in punct else 1 for t in ids[len(p_ids) :]]
        # Some runtimes add BOS where HF does not (or the reverse): teach both.
        if bos is not None and rng.random() < 0.25:
            if ids and ids[0] == bos:
                ids, mask = ids[1:], mask[1:]
            else:
                ids, mask = [bos] + ids, [0] + mask
        samples.append((ids[:_MAX_SAMPLE_TOKENS], mask[:_MAX_SAMPLE_TOKENS]))
    return samples


def _model_config(spec: TinySpec, vocab_size: int, tok):
    from transformers import Phi3Config

    vocab = tok.get_vocab()
    if spec.kind == "phi3":
        bos, eos, pad = tok.bos_token_id, vocab["<|endoftext|>"], vocab["<|endoftext|>"]
        gen_eos = [vocab["<|endoftext|>"], vocab["<|assistant|>"], vocab["<|end|>"]]
    elif spec.kind == "phi4":
        bos, eos, pad = vocab["<|endoftext|>"], vocab["<|im_end|>"], vocab["<|endoftext|>"]
        gen_eos = [vocab["<|im_end|>"], vocab["<|endoftext|>"]]
    else:
        bos, eos, pad = vocab["<|endoftext|>"], vocab["<|endoftext|>"], vocab["<|endoftext|>"]
        gen_eos = [vocab["<|endoftext|>"], vocab["<|end|>"]]
    config = Phi3Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        original_max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        partial_rotary_factor=spec.partial_rotary_factor,
        tie_word_embeddings=spec.tie_word_embeddings,
        sliding_window=spec.sliding_window,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attention_dropout=0.0,
    )
    return config, gen_eos


def _lr_at(step: int, spec: TinySpec, steps: int) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, steps - spec.warmup)
    return spec.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train(spec: TinySpec, samples, used: list[int], full_vocab: int, config, *, seed: int, steps: int, log=None):
    """Train a compact-vocabulary copy of the model; returns its state dict.

    Only the tokens in `used` get embedding/output rows during training; the softmax still accounts for
    the other `full_vocab - len(used)` tokens as one constant logit column (their output rows are ~0 in the
    saved model), so the trained margins hold in the full-vocabulary model.
    """
    import torch
    from transformers import Phi3ForCausalLM

    remap = {tid: i for i, tid in enumerate(used)}
    data = [([remap[t] for t in ids], mask) for ids, mask in samples]
    compact = config.__class__.from_dict(
        {**config.to_dict(), "vocab_size": len(used), "pad_token_id": remap[config.pad_token_id],
         "bos_token_id": None, "eos_token_id": None}
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(compact)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.0, eps=1e-8)
    others = math.log(max(1, full_vocab - len(used)))
    rng = random.Random(f"batches-{seed}")
    pad = 0
    for step in range(steps):
        batch = [data[rng.randrange(len(data))] for _ in range(spec.batch_size)]
        width = max(len(ids) for ids, _ in batch)
        x = torch.full((len(batch), width), pad, dtype=torch.long)
        m = torch.zeros((len(batch), width), dtype=torch.float32)
        for row, (ids, mask) in enumerate(batch):
            x[row, : len(ids)] = torch.tensor(ids)
            m[row, : len(mask)] = torch.tensor(mask, dtype=torch.float32)
        logits = model(input_ids=x).logits[:, :-1]
        logits = torch.cat([logits, logits.new_full((*logits.shape[:2], 1), others)], dim=-1)
        target = x[:, 1:]
        weight = m[:, 1:]
        loss_tok = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
        loss = (loss_tok * weight.reshape(-1)).sum() / weight.sum()
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, spec, steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"step {step:4d} loss {loss.item():.4f}")
    return model.state_dict()


def _expand(spec: TinySpec, state: dict, used: list[int], config, *, seed: int):
    import torch
    from transformers import Phi3ForCausalLM

    torch.manual_seed(seed + 1)
    model = Phi3ForCausalLM(config)
    idx = torch.tensor(used)
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        full = model.state_dict()
        for name, value in state.items():
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                continue
            full[name].copy_(value)
        emb = full["model.embed_tokens.weight"]
        # Rows of tokens never seen in training: tiny, so their logits stay ~0 (as assumed in training).
        std = 0.002 if spec.tie_word_embeddings else 0.02
        emb.copy_(torch.randn(emb.shape, generator=gen) * std)
        emb[idx] = state["model.embed_tokens.weight"]
        if not spec.tie_word_embeddings:
            head = full["lm_head.weight"]
            head.copy_(torch.randn(head.shape, generator=gen) * 0.002)
            head[idx] = state["lm_head.weight"]
    if spec.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    return model


def _greedy_report(model, tok, n_check: int = 12, max_new_tokens: int = 40) -> list[dict]:
    import torch

    report = []
    for prompt in VALIDATION_PROMPTS:
        prompt_ids, ref = reference_ids(tok, prompt)
        x = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
        new = out.sequences[0, len(prompt_ids) :].tolist()
        margins = []
        for step_logits in out.logits[:n_check]:
            top = torch.topk(step_logits[0].float(), 2).values
            margins.append(float(top[0] - top[1]))
        with torch.no_grad():
            tf = model(input_ids=torch.tensor([prompt_ids + ref])).logits[0, len(prompt_ids) - 1 : -1].float()
        top2 = torch.topk(tf, 2)
        tf_margin = (tf.gather(1, torch.tensor(ref)[:, None])[:, 0] - torch.where(
            top2.indices[:, 0] == torch.tensor(ref), top2.values[:, 1], top2.values[:, 0])).min()
        n_ok = 0
        for a, b in zip(new, ref):
            if a != b:
                break
            n_ok += 1
        report.append(
            {
                "name": prompt["name"],
                "new_tokens": len(new),
                "correct_prefix": n_ok,
                "reference_tokens": len(ref),
                "min_margin": min(margins) if margins else None,
                # teacher-forced over the whole reference: reference logit minus the best other logit
                "reference_min_margin": float(tf_margin),
                "output": tok.decode(prompt_ids + new)[len(tok.decode(prompt_ids)) :],
            }
        )
    return report


def _write_config_json(out_dir: Path, spec: TinySpec) -> None:
    """Mirror the Hub's configs: transformers 5 writes only `rope_parameters`; also give the top-level keys
    (rope_theta, partial_rotary_factor) that real Phi config.json files carry and older readers use."""
    path = out_dir / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg.setdefault("rope_theta", spec.rope_theta)
    if spec.partial_rotary_factor != 1.0:
        cfg.setdefault("partial_rotary_factor", spec.partial_rotary_factor)
    cfg.setdefault("rope_scaling", None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _check_tokenizer_unchanged(tok, out_dir: Path) -> None:
    """The saved folder must tokenize the validation prompts and answers as the training tokenizer did."""
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out_dir)
    for prompt in VALIDATION_PROMPTS:
        if reference_ids(saved, prompt) != reference_ids(tok, prompt):
            raise RuntimeError(
                f"{out_dir}: the saved tokenizer ({type(saved).__name__}) tokenizes {prompt['name']!r} unlike the "
                f"one the model was trained with ({type(tok).__name__})"
            )


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_tiny_model(kind: str, out_dir: Path, *, seed: int = 0, steps: int | None = None, verbose: bool = False) -> Path:
    """Build the `kind` fixture into `out_dir` (created; existing model files are overwritten).

    Deterministic for a given kind, seed, steps and library versions. Returns `out_dir`.
    """
    if kind not in SPECS:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {KINDS}")
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    spec = SPECS[kind]
    steps = spec.steps if steps is None else int(steps)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = (lambda msg: print(f"[tiny-{kind}] {msg}", file=sys.stderr, flush=True)) if verbose else None
    t0 = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if spec.tokenizer == "spm":
                tok, overrides = _build_phi3_tokenizer(Path(tmp) / "spm", spec, seed)
                _save_tokenizer(tok, overrides, out_dir)
                shutil.copyfile(Path(tmp) / "spm" / "tokenizer.model", out_dir / "tokenizer.model")
            else:
                tok, overrides = _build_gpt2_tokenizer(Path(tmp), spec)
                _save_tokenizer(tok, overrides, out_dir)
        # Train on exactly what `AutoTokenizer.from_pretrained(out_dir)` produces once the model is saved.
        # transformers 5 picks the tokenizer class by config.json's model_type when there is one (phi3:
        # tokenizer.json as written) and by tokenizer_class otherwise (LlamaTokenizer: rebuilt with its own
        # pre-tokenizer), so a placeholder config.json must be there first; save_pretrained replaces it.
        (out_dir / "config.json").write_text(json.dumps({"model_type": "phi3"}) + "\n", encoding="utf-8")
        tok = AutoTokenizer.from_pretrained(out_dir)
        full_vocab = -(-len(tok) // 64) * 64
        spm_model = out_dir / "tokenizer.model" if spec.tokenizer == "spm" else None
        samples = _encode_samples(tok, kind, 6000, seed, spm_model)
        used = sorted(
            {t for ids, _ in samples for t in ids}
            | {i for i in tok.all_special_ids}
            | {i for i in tok.added_tokens_decoder}
        )
        config, gen_eos = _model_config(spec, full_vocab, tok)
        if log:
            log(f"tokenizer {len(tok)} tokens, config vocab {full_vocab}, {len(used)} used in training")
        state = _train(spec, samples, used, full_vocab, config, seed=seed, steps=steps, log=log)
        model = _expand(spec, state, used, config, seed=seed)
        model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=gen_eos, pad_token_id=config.pad_token_id)
        model.save_pretrained(out_dir, safe_serialization=True)
        _write_config_json(out_dir, spec)
        _check_tokenizer_unchanged(tok, out_dir)
        report = _greedy_report(model, tok)
        params = sum(p.numel() for p in model.parameters())
    finally:
        torch.set_num_threads(threads)
    seconds = time.monotonic() - t0
    name = f"tiny-{kind}"
    tokenizer_line = (
        "Tokenizer: sentencepiece BPE with byte fallback (`tokenizer.model`), trained on the fixture's own text, "
        "with Phi-3's added tokens and chat template."
        if spec.tokenizer == "spm"
        else "Tokenizer: GPT-2's byte-level BPE ranks (from openai-whisper's `gpt2.tiktoken`) with "
        + ("Phi-4's" if kind == "phi4" else "Phi-4-mini's")
        + " added tokens and chat template."
    )
    outputs = "\n".join(
        f"- `{r['name']}`: {r['correct_prefix']}/{min(r['new_tokens'], r['reference_tokens'])} tokens match, "
        f"min margin {r['min_margin']:.2f}: `{r['output']!r}`"
        for r in report
    )
    (out_dir / "README.md").write_text(
        _MODEL_CARD.format(
            name=name, params=params, layers=spec.num_hidden_layers, hidden=spec.hidden_size, kind=kind, seed=seed,
            steps=steps, tokenizer_line=tokenizer_line, outputs=outputs, n_check=12,
        ),
        encoding="utf-8",
    )  # fmt: skip
    info = {
        "kind": kind,
        "seed": seed,
        "steps": steps,
        "spec": asdict(spec),
        "params": params,
        "used_tokens": len(used),
        "validation": report,
    }
    (out_dir / "tiny_model_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    if log:
        log(f"built in {seconds:.1f}s, {params:,} params, {_dir_size(out_dir) / 1e6:.1f} MB")
    return out_dir


def _builder_fingerprint(kind: str) -> str:
    import tokenizers
    import torch
    import transformers

    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(json.dumps(asdict(SPECS[kind]), sort_keys=True).encode())
    h.update(f"{torch.__version__}|{transformers.__version__}|{tokenizers.__version__}".encode())
    return h.hexdigest()[:12]


def cached_tiny_model(kind: str, cache_dir: Path | None = None) -> Path:
    """Path to the `kind` fixture (seed 0), building it once into `cache_dir`.

    The folder is named `tiny-{kind}-{hash}`, the hash covering this module's source, the kind's parameters
    and the torch/transformers/tokenizers versions, so a change to any of them builds a fresh copy. The
    folder name keeps `phi3`/`phi4` in it because llama.cpp's converter derives `general.name` from it.
    Default cache: $HUBBOT_TINY_MODEL_CACHE, else ~/.cache/hubbot/tiny-models.
    """
    if kind not in SPECS:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {KINDS}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"tiny-{kind}-{_builder_fingerprint(kind)}"
    if (target / "tiny_model_info.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{kind}-", dir=root))
    try:
        build_tiny_model(kind, tmp / target.name)
        try:
            os.replace(tmp / target.name, target)
        except OSError:
            if not (target / "tiny_model_info.json").is_file():  # not a concurrent build that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hubbot.testing.tiny_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    out = build_tiny_model(args.kind, args.out_dir, seed=args.seed, steps=args.steps, verbose=True)
    seconds = time.monotonic() - t0
    info = json.loads((out / "tiny_model_info.json").read_text())
    for r in info["validation"]:
        print(
            f"{r['name']:>11}: {r['correct_prefix']:2d}/{r['new_tokens']} ok, margin {r['min_margin']:.2f} "
            f"(whole reference {r['reference_min_margin']:.2f})  {r['output']!r}"
        )
    print(f"{out}: {info['params']:,} params, {_dir_size(out) / 1e6:.2f} MB, built in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
