"""Microsoft's Phi-3 vocabulary and chat template, as llama.cpp's sources ship them.

The llama-cpp-python sdist vendors llama.cpp, whose ``models/`` folder holds a vocabulary-only
GGUF of Phi-3 (``ggml-vocab-phi-3.gguf``: tokens, sentencepiece scores and token types, no
weights) with llama.cpp's own tokenizer test strings (``.inp``) and the ids it expects (``.out``),
and real chat templates (``models/templates/``). They are fetched once into hubbot's cache through
`hubbot.sdist.fetch_sdist_files`, for the installed llama-cpp-python version.

`phi3_tokenizer` rebuilds the Hugging Face tokenizer Microsoft ships with Phi-3 from that vocabulary:
a `tokenizers` BPE with byte fallback whose merges are ranked by the sentencepiece scores (as
transformers' own sentencepiece converter ranks them), Phi-3's normalizer (``Prepend("▁")`` then
spaces to ``▁``, no pre-tokenizer), its decoder, and its added tokens with their whitespace flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

from hubbot.paths import cache_root
from hubbot.sdist import fetch_sdist_files

VOCAB = "models/ggml-vocab-phi-3.gguf"
TEMPLATE = "models/templates/microsoft-Phi-3.5-mini-instruct.jinja"
MEMBERS = (VOCAB, f"{VOCAB}.inp", f"{VOCAB}.out", TEMPLATE)
TEST_SEPARATOR = "\n__ggml_vocab_test__\n"
# gguf's TokenType values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Phi-3's tokenizer.json: these added tokens keep the whitespace after them (all other added tokens,
# </s> included, strip it: `<|user|>\nHi` is `<|user|>`, `▁Hi`)
KEEPS_WHITESPACE = {"<unk>", "<s>", "<|endoftext|>"}


@cache
def sources_dir() -> Path:
    """The vocabulary, its test strings and the chat template, fetched once from the sdist (the folder
    is resolved once per process: tests point HUBBOT_CACHE elsewhere per test)."""
    ver = version("llama-cpp-python")
    return fetch_sdist_files(f"llama-cpp-python=={ver}", "vendor/llama.cpp/", MEMBERS,
                             cache_root() / f"llama.cpp-{ver}-phi3-vocab")


@dataclass(frozen=True)
class VocabCase:
    text: str
    ids: list[int]  # as llama.cpp tokenizes it, without BOS


def vocab_cases(folder: Path) -> list[VocabCase]:
    """llama.cpp's own test strings for the vocabulary and the ids it expects."""
    raw = (folder / f"{VOCAB}.inp").read_text(encoding="utf-8")
    texts = raw.removesuffix(TEST_SEPARATOR.rstrip("\n") + "\n").split(TEST_SEPARATOR)
    outs = (folder / f"{VOCAB}.out").read_text(encoding="utf-8").split("\n")[: len(texts)]
    assert len(texts) == len(outs), (len(texts), len(outs))
    return [VocabCase(t, [int(i) for i in o.split()]) for t, o in zip(texts, outs)]


@dataclass(frozen=True)
class GGUFVocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int


@cache
def read_vocab(path: Path) -> GGUFVocab:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(key: str) -> Any:
        return reader.fields[key].contents()

    return GGUFVocab(field("tokenizer.ggml.tokens"), [float(s) for s in field("tokenizer.ggml.scores")],
                     [int(t) for t in field("tokenizer.ggml.token_type")], int(field("tokenizer.ggml.bos_token_id")),
                     int(field("tokenizer.ggml.eos_token_id")), int(field("tokenizer.ggml.unknown_token_id")))


def _merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a piece into two known pieces, best sentencepiece score first (ties: by ids)."""
    ranked = []
    for piece, i in vocab.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                ranked.append((-scores[piece], i, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def phi3_backend(v: GGUFVocab) -> Any:
    """The `tokenizers` Tokenizer of Microsoft's Phi-3 tokenizer.json, rebuilt from the GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    # the sentencepiece model (32000 pieces) and the added tokens after it; llama.cpp's [PAD…] rows
    # only pad the GGUF to the embedding size and are not part of Phi-3's tokenizer
    size = max(i for i, t in enumerate(v.types) if t != UNKNOWN) + 1
    added = [i for i in range(size) if v.types[i] in (CONTROL, USER_DEFINED)]
    base = {v.tokens[i]: i for i in range(size) if i not in added or i <= 2}
    scores = {v.tokens[i]: v.scores[i] for i in base.values() if v.types[i] == NORMAL}
    normal = {t: i for t, i in base.items() if t in scores}
    merges = _merges(normal, scores)
    backend = Tokenizer(models.BPE(vocab=base, merges=merges, unk_token=v.tokens[v.unk_id], fuse_unk=True,
                                   byte_fallback=True, dropout=None))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1, right=0)])
    backend.add_tokens([AddedToken(v.tokens[i], special=v.types[i] == CONTROL, normalized=False, lstrip=False,
                                   rstrip=v.tokens[i] not in KEEPS_WHITESPACE) for i in added])
    return backend


def sentencepiece_model(v: GGUFVocab) -> bytes:
    """Phi-3's ``tokenizer.model`` (sentencepiece BPE with byte fallback) from the GGUF vocabulary:
    llama.cpp's converter reads the pieces, scores and types from it."""
    from sentencepiece import sentencepiece_model_pb2 as sp

    kinds = {NORMAL: sp.ModelProto.SentencePiece.NORMAL, BYTE: sp.ModelProto.SentencePiece.BYTE,
             CONTROL: sp.ModelProto.SentencePiece.CONTROL, USER_DEFINED: sp.ModelProto.SentencePiece.USER_DEFINED}
    model = sp.ModelProto()
    for i in range(_spm_size(v)):
        kind = sp.ModelProto.SentencePiece.UNKNOWN if i == v.unk_id else kinds[v.types[i]]
        # </s> is an added (user-defined) token in Phi-3's tokenizer.json, a control piece in its tokenizer.model
        kind = sp.ModelProto.SentencePiece.CONTROL if i in (v.bos_id, 2) else kind
        model.pieces.add(piece=v.tokens[i], score=0.0 if kind != sp.ModelProto.SentencePiece.NORMAL else v.scores[i],
                         type=kind)
    t = model.trainer_spec
    t.model_type, t.vocab_size, t.byte_fallback = sp.TrainerSpec.BPE, len(model.pieces), True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = v.unk_id, v.bos_id, 2, -1
    t.split_digits, t.allow_whitespace_only_pieces = True, True
    n = model.normalizer_spec
    n.name, n.add_dummy_prefix, n.remove_extra_whitespaces, n.escape_whitespaces = "identity", True, False, True
    return model.SerializeToString()


def _spm_size(v: GGUFVocab) -> int:
    """Pieces of the sentencepiece model: everything before Phi-3's first added token (<|endoftext|>)."""
    return v.eos_id
