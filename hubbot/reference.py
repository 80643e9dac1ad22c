"""The reference: the source model's own answers to the recipe's prompts, which every variant is
judged against.

The source runs in transformers on CPU **in its own dtype** (bf16 for every Phi release): with
the dtype of the safetensors files, transformers keeps the weights memory-mapped, so the
reference holds file-backed pages the kernel can drop (``RssFile``), not a private copy
(measured: anonymous memory does not grow when the model loads). An fp32 copy would hold 4
bytes per parameter — 15 GB for a 3.8B model, 59 GB for phi-4.

A reference is computed once per source commit and validation settings and cached on disk
(``~/.cache/hubbot/references/<key>.json``); ``hubbot reference`` writes one to a file and
``hubbot build --reference FILE`` reuses it, so N fanned-out build jobs do not each pay for it.

With ``validation.heldout`` the reference also holds the source's next-token distributions over
the held text (``hubbot.metrics.SourceDistribution``: top-K log-probs per position, compressed
inside the same JSON file, ~1 MB at real size), which the variants' KLD and perplexity are
measured against.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .errors import UsageError
from .metrics import SourceDistribution, right_padded, source_distribution, window_batches
from .paths import cache_root
from .progress import step
from .recipe import Prompt, ValidationSettings, stable_hash
from .source import config_dtype

Log = Callable[[str], None]
FORMAT = 3  # bump when what a reference holds or how it is computed changes
DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


@dataclass
class PreparedPrompt:
    name: str
    chat: bool
    text: str  # exactly what is tokenized (chat prompts already rendered)
    ids: list[int]
    continuation: list[int]  # the source model's greedy continuation
    continuation_text: str
    min_margin: float  # smallest top-1 minus top-2 logit along the continuation


def source_dtype(config: dict[str, Any]) -> str:
    """The dtype the reference runs in: the source's own (fp32 when the config does not say)."""
    return DTYPES.get(str(config_dtype(config)), "float32")


def reference_key(commit: str, settings: ValidationSettings, dtype: str) -> str:
    return stable_hash({"format": FORMAT, "commit": commit, "settings": asdict(settings), "dtype": dtype})[:24]


class TransformersRuntime:
    """The source model in transformers, in its own dtype."""

    def __init__(self, model_dir: Path, dtype: str):
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = sorted({eos} if isinstance(eos, int) else set(eos or []))

    def render(self, prompt: Prompt) -> str:
        if not prompt.chat:
            return prompt.text
        return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}],
                                                  tokenize=False, add_generation_prompt=True)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def logits(self, ids: Sequence[int]):
        with self.torch.no_grad():
            return self.model(self.torch.tensor([list(ids)])).logits[0].float()

    def top1(self, ids: Sequence[int]) -> list[int]:
        return self.logits(ids).argmax(-1).tolist()

    def numpy_logits(self, ids: Sequence[int]):
        return self.logits(ids).numpy()

    def window_logits(self, parts: Sequence[Sequence[int]], tokens_per_pass: int = 4096) -> Iterator[Any]:
        """Each window's logits (numpy), several windows to a forward pass: a model bigger than the
        page cache is read from disk once per pass, not once per window. The windows are
        right-padded, which under causal attention never reaches their own positions; the output
        head runs one window at a time, so only one window × vocab of logits is in memory."""
        torch = self.torch
        decoder, head = self.model.get_decoder(), self.model.get_output_embeddings()
        for group in window_batches(parts, tokens_per_pass):
            batch = torch.tensor(right_padded(group))
            with torch.no_grad():
                hidden = decoder(input_ids=batch).last_hidden_state
            for row, w in zip(hidden, group):
                with torch.no_grad():
                    yield head(row[: len(w)]).float().numpy()
            del hidden

    def generate_all(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = (),
                     on_token: Callable[[int], None] | None = None) -> list[tuple[list[int], float]]:
        """Greedy continuations of all ``prompts`` in one left-padded batch, each with its smallest
        top-1 minus top-2 logit margin. One forward pass per new token serves every prompt: a model
        that does not fit the page cache is read from disk ``max_new_tokens`` times, not once per
        token per prompt (phi-4, 6 prompts × 16 tokens: 16 passes instead of ~100). ``on_token(n)`` is
        called as the n-th new token comes out."""
        torch = self.torch
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (list(stop_ids) or [0])[0]
        inputs = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = self.model.generate(inputs, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                      eos_token_id=list(stop_ids) or None, pad_token_id=pad,
                                      return_dict_in_generate=True, output_logits=True,
                                      streamer=_TokenCounter(on_token) if on_token else None)
        steps = torch.stack(out.logits, dim=1).float()  # (prompts, steps, vocab), before any processor
        stops = set(stop_ids)
        results = []
        for row, logits in zip(out.sequences[:, width:].tolist(), steps):
            n = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            top2 = logits[:n].topk(2, dim=-1).values
            results.append((row[:n], float((top2[:, 0] - top2[:, 1]).min()) if n else 0.0))
        return results

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def close(self) -> None:
        self.model = None
        gc.collect()


class _TokenCounter:
    """A transformers streamer that only counts: ``put`` gets the prompt first, then each new token."""

    def __init__(self, on_token: Callable[[int], None]):
        self.on_token = on_token
        self.seen = -1

    def put(self, value) -> None:
        self.seen += 1
        if self.seen:
            self.on_token(self.seen)

    def end(self) -> None:
        pass


@dataclass
class Reference:
    key: str
    source_commit: str
    dtype: str
    stop_ids: list[int]
    prompts: list[PreparedPrompt]
    seconds: float = 0.0
    tokenizer_dir: Path | None = None  # where decode() finds the source's tokenizer
    heldout: SourceDistribution | None = None  # the source over the held text (validation.heldout)
    settings: ValidationSettings | None = None  # what it was computed for (the gates validation applies)

    def decode(self, ids: Sequence[int]) -> str:
        if not hasattr(self, "_tokenizer"):
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)

    def summary(self) -> list[dict[str, Any]]:
        return [{"name": p.name, "chat": p.chat, "prompt_tokens": len(p.ids),
                 "continuation": p.continuation_text, "min_logit_margin": p.min_margin} for p in self.prompts]

    def to_json(self) -> str:
        data = {"hubbot": __version__, "format": FORMAT, "key": self.key, "source_commit": self.source_commit,
                "dtype": self.dtype, "stop_ids": self.stop_ids, "seconds": self.seconds,
                "prompts": [asdict(p) for p in self.prompts],
                "heldout": self.heldout.to_json() if self.heldout else None}
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str, tokenizer_dir: Path | None = None) -> Reference:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"reference format {data.get('format')}, expected {FORMAT}")
        heldout = SourceDistribution.from_json(data["heldout"]) if data.get("heldout") else None
        return cls(data["key"], data["source_commit"], data["dtype"], data["stop_ids"],
                   [PreparedPrompt(**p) for p in data["prompts"]], data.get("seconds", 0.0), tokenizer_dir, heldout)


def compute_reference(model_dir: Path, commit: str, settings: ValidationSettings, config: dict[str, Any],
                      log: Log = lambda _: None) -> Reference:
    dtype = source_dtype(config)
    log(f"running the source model in transformers ({dtype}, memory-mapped) on {len(settings.prompts)} prompts")
    started = time.monotonic()
    with step("loading the source model", log=log):
        rt = TransformersRuntime(model_dir, dtype)
    try:
        prompts = _prepare_all(rt, settings.prompts, settings.max_new_tokens, log)
        log(f"reference: {len(prompts)} prompts done ({time.monotonic() - started:.0f} s)")
        heldout = _heldout(rt, settings, log) if settings.heldout else None
    finally:
        rt.close()
    return Reference(reference_key(commit, settings, dtype), commit, dtype, rt.stop_ids, prompts,
                     round(time.monotonic() - started, 1), model_dir, heldout, settings)


def _heldout(rt: TransformersRuntime, settings: ValidationSettings, log: Log) -> SourceDistribution:
    ids, prefix = rt.tokenize(settings.heldout_text), rt.tokenize("")
    with step("reference: held text", log=log) as shown:
        dist = source_distribution(rt.window_logits, ids, prefix, settings.heldout_window, settings.heldout_top_k,
                                   lambda i, n: shown.update(info=f"window {i}/{n}"))
    log(f"reference: held text '{settings.heldout}', {dist.positions} positions, source perplexity "
        f"{dist.perplexity():.3f}")
    return dist


def _prepare_all(rt: TransformersRuntime, prompts: Sequence[Prompt], max_new_tokens: int,
                 log: Log) -> list[PreparedPrompt]:
    texts = [rt.render(p) for p in prompts]
    ids = [rt.tokenize(t) for t in texts]
    with step("reference", total=max_new_tokens, log=log) as shown:
        shown.update(info=f"{len(prompts)} prompts in one batch")
        answers = rt.generate_all(ids, max_new_tokens, rt.stop_ids,
                                  on_token=lambda n: shown.update(n, info=f"token {n}/{max_new_tokens}"))
    return [PreparedPrompt(p.name, p.chat, text, i, continuation, rt.decode(continuation), round(margin, 3))
            for p, text, i, (continuation, margin) in zip(prompts, texts, ids, answers)]


def cache_path(key: str) -> Path:
    return cache_root() / "references" / f"{key}.json"


def read_reference_file(path: Path, expected_key: str, tokenizer_dir: Path) -> Reference:
    """A reference passed with ``--reference``: it must be of this source commit and these settings."""
    try:
        reference = Reference.from_json(Path(path).read_text(), tokenizer_dir)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{path}: not a hubbot reference ({type(e).__name__}: {e}); make one with "
                         f"`hubbot reference SOURCE --out FILE`") from None
    if reference.key != expected_key:
        raise UsageError(f"{path}: the reference is of source commit {reference.source_commit} (key "
                         f"{reference.key}), not of this source and recipe's validation settings (key {expected_key})")
    return reference


def obtain_reference(model_dir: Path, commit: str, settings: ValidationSettings, config: dict[str, Any],
                     log: Log = lambda _: None, preset: Path | None = None) -> Reference:
    """The reference for this source commit: from ``preset``, the disk cache, or computed (and cached)."""
    key = reference_key(commit, settings, source_dtype(config))
    if preset:
        log(f"using the reference in {preset}")
        reference = read_reference_file(preset, key, model_dir)
        reference.settings = settings
        return reference
    cached = cache_path(key)
    if cached.is_file():
        try:
            reference = Reference.from_json(cached.read_text(), model_dir)
            reference.settings = settings
            log(f"using the cached reference {cached} (computed in {reference.seconds:.0f} s)")
            return reference
        except (ValueError, KeyError, TypeError):
            cached.unlink(missing_ok=True)
    reference = compute_reference(model_dir, commit, settings, config, log)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".part")
    partial.write_text(reference.to_json())
    partial.replace(cached)
    return reference


class LazyReference:
    """The reference, obtained the first time a variant needs it (never, when every repo is up to date
    or no variant can run here)."""

    def __init__(self, snapshot, log: Log = lambda _: None, preset: Path | None = None):
        self.snapshot = snapshot
        self.log = log
        self.preset = preset
        self._reference: Reference | None = None

    def get(self) -> Reference:
        if self._reference is None:
            s = self.snapshot
            self._reference = obtain_reference(s.path, s.commit, s.ref.family.validation, s.config, self.log,
                                               self.preset)
        return self._reference

    def summary(self) -> list[dict[str, Any]]:
        return self._reference.summary() if self._reference else []
