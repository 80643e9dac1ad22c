"""Tokenizer probes: strings that tell a correct tokenizer from one that is only right on plain text.

A variant's runtime tokenizes with its own tokenizer (llama.cpp's from the GGUF metadata, ORT
GenAI's and OpenVINO's from their converted files, mlx-lm's), and a user of the runtime reads
text from its own detokenizer. Each probe string is checked twice in the runtime:

- **encode parity**: the runtime's ids equal the source tokenizer's (transformers, the reference);
- **decode round trip**: the runtime's detokenizer turns its ids back into the text the source
  tokenizer decodes them to, piece by piece between added tokens (``shown_texts`` says what
  counts as the same text).

The battery is typed data (``PROBES``) plus what only the source knows: every added token of its
tokenizer, and chat turns (system, user, assistant) rendered by its own chat template. The
expected side is computed from the source tokenizer at validation time (one tokenizer load, a few
ms per string) rather than stored in the reference: it costs less than reading a cache would.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

SPM_SPACE = "\u2581"  # sentencepiece's word-boundary marker ("▁")
MAX_REASONS = 6  # a broken tokenizer fails most probes: name the first few, count the rest


@dataclass(frozen=True)
class ProbeString:
    kind: str  # spaces | whitespace | digits | script | emoji | code | mixed | special | chat
    text: str


def _probes(kind: str, *texts: str) -> list[ProbeString]:
    return [ProbeString(kind, t) for t in texts]


PROBES: tuple[ProbeString, ...] = (
    *_probes("spaces", "Hello", " Hello", "  Hello", "   Hello", "Hello ", "Hello  ", "Hello  world",
             "Hello   world", " ", "  ", " Hello world "),
    *_probes("whitespace", "\t", "\n", "\n\n", "\n\n\n", "\t\n", "Hello\tworld", "line one\nline two",
             "    indented\n        more", "a \n b", "\r\n", "trailing newline\n"),
    *_probes("digits", "3", "33", "333", "3333333", "1, 2, 3, 4, 5,", "3.14159", "1e-5", "2026-12-02",
             "$1,234.56", "0x1F"),
    *_probes("script", "нещо на Български", "Привет, мир!", "你好，世界", "我想在apple工作1314151天～",
             "こんにちは", "안녕하세요", "Äpfel und Öl", "Cửa Việt", "naïve café résumé", "Ελληνικά", "مرحبا",
             "कान्"),
    *_probes("emoji", "🦙", "🚀 (normal)", "😶\u200d🌫️", "✅", "👍🏽", " 🦙🦙 "),
    *_probes("code", "def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) {}", "a['b'] == \"c\"",
             "#include <stdio.h>", "x <= y && y >= z", "<div class=\"a\">", "```python\nprint(1)\n```"),
    *_probes("mixed", "' era", "!!!!!!", "Hello, y'all! How are you 😁 ?", " нещо 🦙 Äpfel", "3 33 333",
             "I've been 'told he's there"),
)


@dataclass(frozen=True)
class Segment:
    """A run of ids between added tokens (or one added token): the unit tokenizers encode on its own."""

    ids: list[int]
    text: str  # the source tokenizer's decoding
    added: bool  # one added token (<|end|>, </s> …)
    dummy_prefix: bool  # the first token carries sentencepiece's word-boundary marker ("▁Hello")
    cleaned: str | None = None  # the decoding with the tokenizer's clean_up_tokenization_spaces, where it differs


@dataclass(frozen=True)
class Probe:
    kind: str
    text: str
    ids: list[int]  # the source tokenizer's, special tokens added as the runtime adds them
    segments: list[Segment]


@dataclass
class ProbeReport:
    strings: int = 0
    encode_failures: int = 0
    decode_failures: int = 0
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """For validation.json: counts only, so identical builds give identical files."""
        return {"strings": self.strings, "encode_failures": self.encode_failures,
                "decode_failures": self.decode_failures}


def _source_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _chat_strings(tok: Any) -> list[ProbeString]:
    if not tok.chat_template:
        return []
    system = {"role": "system", "content": "You are a helpful assistant."}
    user = {"role": "user", "content": "How many legs does a llama have?"}
    answer = {"role": "assistant", "content": "Four legs.\n\nLlamas have four."}
    turns = [[system, user], [user], [system, user, answer, {"role": "user", "content": "  And a spider? 🕷"}]]
    return [ProbeString("chat", tok.apply_chat_template(t, tokenize=False, add_generation_prompt=True))
            for t in turns] + [ProbeString("chat", tok.apply_chat_template([system, user, answer], tokenize=False))]


def _special_strings(tok: Any) -> list[ProbeString]:
    """Every added token alone, and each inside text (where whitespace flags like rstrip matter)."""
    tokens = [t.content for _, t in sorted(tok.added_tokens_decoder.items())]
    return [p for t in tokens for p in (ProbeString("special", t), ProbeString("special", f"Hi{t}\nthere {t} x"))]


def _segments(tok: Any, ids: list[int]) -> list[Segment]:
    added = set(tok.added_tokens_decoder)
    runs: list[list[int]] = []
    for i in ids:
        if i in added or not runs or runs[-1][-1] in added:
            runs.append([i])
        else:
            runs[-1].append(i)
    # clean_up_tokenization_spaces (phi-2's CodeGenTokenizer sets it) rewrites " ?" as "?": a display
    # heuristic of transformers' that runtimes reading the HF tokenizer config (OpenVINO, mlx-lm) apply
    # and llama.cpp and ORT GenAI do not; either is what the source's tokenizer files say
    segments = []
    for run in runs:
        raw = tok.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        cleaned = tok.decode(run, skip_special_tokens=False)
        segments.append(Segment(run, raw, run[0] in added, tok.convert_ids_to_tokens(run[0]).startswith(SPM_SPACE),
                                cleaned if cleaned != raw else None))
    return segments


@cache
def battery(tokenizer_dir: Path) -> tuple[Probe, ...]:
    """The probes with the source tokenizer's ids and decodings, computed once per source folder."""
    tok = _source_tokenizer(tokenizer_dir)
    probes = []
    for s in [*PROBES, *_special_strings(tok), *_chat_strings(tok)]:
        ids = list(tok(s.text).input_ids)
        probes.append(Probe(s.kind, s.text, ids, _segments(tok, ids)))
    return tuple(probes)


def shown_texts(segment: Segment) -> set[str]:
    """What a correct detokenizer may show for one segment decoded on its own.

    Tokenizers encode the text between added tokens piece by piece, each piece with its own
    sentencepiece dummy prefix ("▁"), so each piece is decoded on its own too. An added token may
    be shown or hidden (ORT GenAI's stream and ``decode`` hide special tokens, OpenVINO GenAI's does
    by default, llama.cpp and mlx-lm show them).

    The start of a decoded stream is where runtimes apply their display conventions, so leading
    spaces may differ there and nowhere else: for a piece whose first token carries the dummy
    prefix, transformers strips that one space while llama-cpp-python's ``detokenize`` and ORT
    GenAI's decoder keep it (llama-cpp-python strips it only after BOS); mlx-lm's streaming
    detokenizers, what ``mlx_lm.generate`` prints, trim a stream's leading space (sentencepiece:
    all of them; byte-level BPE: one) so that an answer does not start with one. The sentencepiece
    convention says the prefix is a word boundary, not text, and encode parity already pins the
    ids of every leading space; any other difference (a space lost or added inside the text, a
    wrong byte or character) is a wrong detokenizer, except transformers' own
    ``clean_up_tokenization_spaces`` rewriting (where the tokenizer config asks for it), which some
    runtimes apply and others do not.
    """
    if segment.added:  # hidden may leave a space: ORT GenAI decodes GPT-2's <|endoftext|> alone as " "
        return {segment.text, "", " "}
    shown: set[str] = set()
    for text in filter(None, (segment.text, segment.cleaned)):
        leading = len(text) - len(text.lstrip(" "))
        shown |= {text[k:] for k in range(leading + 1)} | ({" " + text} if segment.dummy_prefix else set())
    return shown


def _show(ids: Sequence[int], limit: int = 24) -> str:
    ids = list(ids)
    return str(ids) if len(ids) <= limit else f"{ids[:limit]}… ({len(ids)} ids)"


def _shorten(text: str, limit: int = 60) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "…"


def run_probes(runtime: Any, tokenizer_dir: Path) -> ProbeReport:
    """Encode parity and decode round trip of every probe in ``runtime``."""
    started = time.monotonic()
    probes = battery(Path(tokenizer_dir))
    report = ProbeReport(strings=len(probes))
    found = []
    for p in probes:
        got = runtime.tokenize(p.text)
        if got != p.ids:
            report.encode_failures += 1
            found.append(f"tokenizer probe ({p.kind}) {_shorten(p.text)}: the runtime encodes it as {_show(got)}, "
                         f"the source tokenizer as {_show(p.ids)}")
            continue
        for segment in p.segments:
            shown = runtime.detokenize(segment.ids)
            if shown not in shown_texts(segment):
                report.decode_failures += 1
                found.append(f"tokenizer probe ({p.kind}) {_shorten(p.text)}: the runtime's detokenizer shows ids "
                             f"{_show(segment.ids)} as {_shorten(shown)}, the source tokenizer as "
                             f"{_shorten(segment.text)}")
                break
    report.reasons = found[:MAX_REASONS]
    if len(found) > MAX_REASONS:
        report.reasons.append(f"tokenizer probes: {len(found) - MAX_REASONS} more of {len(probes)} strings fail")
    report.seconds = round(time.monotonic() - started, 3)
    return report


@cache
def end_of_turn(tokenizer_dir: Path) -> tuple[str, int] | None:
    """The token the source's chat template closes an assistant turn with (Phi-3's ``<|end|>``,
    Phi-4's ``<|im_end|>``), or None when the template has none."""
    tok = _source_tokenizer(tokenizer_dir)
    if not tok.chat_template:
        return None
    marker = "MARKER-7f3a"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                                   tokenize=False)
    after = text[text.index(marker) + len(marker):]
    specials = {t.content: i for i, t in tok.added_tokens_decoder.items() if t.special}
    starts = [(after.find(s), s) for s in specials if s in after]
    if not starts:
        return None
    token = min(starts)[1]
    return token, specials[token]


def stop_token_reason(runtime: Any, tokenizer_dir: Path) -> str | None:
    """Why the runtime's own generation config would not stop at the end of the assistant's turn."""
    eot = end_of_turn(Path(tokenizer_dir))
    if eot is None:
        return None
    token, token_id = eot
    stops = runtime.stop_ids()
    if token_id in stops:
        return None
    return (f"the end-of-turn token {token} ({token_id}) does not end generation in the runtime's own "
            f"generation config (it stops at {sorted(stops)})")
