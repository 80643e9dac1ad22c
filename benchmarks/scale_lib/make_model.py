"""Write a random-weight Phi3ForCausalLM checkpoint of a given shape, offline and deterministically.

Weights are N(0, 0.02) (norms 1.0), drawn per tensor from a generator seeded by the tensor's
name, in row chunks of at most CHUNK_BYTES float32, converted to bf16 (round to nearest even)
and appended to the open shard. The shard's safetensors header is written first (every shape is
known up front), so memory stays at one chunk whatever the model size; the format is the one
the `safetensors` library reads (8-byte header length, JSON header, raw little-endian data).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .shapes import SHAPES, Shape, hub_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_PHI3 = ROOT / "examples" / "tiny-phi3"
CHUNK_BYTES = 64 * 2**20
STD = 0.02
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt")


def phi4_fixture_dir() -> Path:
    """A folder holding a GPT-2 byte-level BPE tokenizer with Phi-4's added tokens and chat template.

    It comes from the test-fixture builder (kind "phi4"), whose tokenizer llama.cpp's converter
    recognises (tests/fixtures, test support outside the hubbot package). It is built once and
    cached (HUBBOT_CACHE/tiny-models).
    """
    sys.path.insert(0, str(ROOT))
    from tests.fixtures import cached_tiny_model

    return cached_tiny_model("phi4")


def tokenizer_source(shape: Shape) -> Path:
    return EXAMPLE_PHI3 if shape.tokenizer == "phi3-spm" else phi4_fixture_dir()


def special_ids(tok_dir: Path, shape: Shape) -> dict[str, Any]:
    """bos/eos/pad and the generation stop ids, read from tokenizer.json (no transformers needed)."""
    data = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ids = {t["content"]: t["id"] for t in data["added_tokens"]}
    if shape.tokenizer == "phi3-spm":  # as Phi-3.5-mini: <s>, <|endoftext|>, stops <|endoftext|> <|assistant|> <|end|>
        return {"bos": ids["<s>"], "eos": ids["<|endoftext|>"], "pad": ids["<|endoftext|>"],
                "stop": [ids["<|end|>"], ids["<|assistant|>"], ids["<|endoftext|>"]], "size": _vocab_size(data)}
    # as phi-4: bos <|endoftext|>, eos <|im_end|>, stops <|im_end|> <|endoftext|>
    return {"bos": ids["<|endoftext|>"], "eos": ids["<|im_end|>"], "pad": ids["<|endoftext|>"],
            "stop": [ids["<|im_end|>"], ids["<|endoftext|>"]], "size": _vocab_size(data)}


def _vocab_size(tokenizer_json: dict) -> int:
    ids = list(tokenizer_json["model"]["vocab"].values()) + [t["id"] for t in tokenizer_json["added_tokens"]]
    return max(ids) + 1


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), rounding to nearest even (no NaNs here)."""
    bits = x.view(np.uint32)
    bits += 0x7FFF + ((bits >> 16) & 1)  # in place: the float32 chunk is not used again
    return (bits >> 16).astype(np.uint16)


def tensor_chunks(name: str, dims: tuple[int, ...], seed: int):
    """The tensor's bf16 bytes, in row chunks (norm weights are 1.0)."""
    if len(dims) == 1:
        yield _to_bf16(np.ones(dims, dtype=np.float32)).tobytes()
        return
    rng = np.random.default_rng(_seed(seed, name))
    rows, cols = dims
    step = max(1, CHUNK_BYTES // (4 * cols))
    for start in range(0, rows, step):
        chunk = rng.standard_normal((min(step, rows - start), cols), dtype=np.float32)
        chunk *= STD
        yield _to_bf16(chunk).tobytes()


def _nbytes(dims: tuple[int, ...]) -> int:
    n = 2
    for d in dims:
        n *= d
    return n


def plan_shards(shape: Shape) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors in order, a new shard whenever the next tensor would take the shard past shard_bytes."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in shape.tensors():
        if shards[-1] and size + _nbytes(dims) > shape.shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += _nbytes(dims)
    return shards


def safetensors_header(tensors: list[tuple[str, tuple[int, ...]]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dims in tensors:
        header[name] = {"dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + _nbytes(dims)]}
        offset += _nbytes(dims)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    return struct.pack("<Q", len(raw)) + raw


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> int:
    partial = path.with_suffix(".partial")
    with partial.open("wb") as fh:
        fh.write(safetensors_header(tensors))
        for name, dims in tensors:
            for chunk in tensor_chunks(name, dims, seed):
                fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
        if hasattr(os, "posix_fadvise"):  # don't push other developers' files out of the page cache
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    os.replace(partial, path)
    return path.stat().st_size


def _write_tokenizer(out: Path, shape: Shape) -> dict[str, Any]:
    src = tokenizer_source(shape)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["model_max_length"] = shape.max_positions
    if "chat_template" not in cfg and (out / "chat_template.jinja").is_file():
        cfg["chat_template"] = (out / "chat_template.jinja").read_text(encoding="utf-8")  # older readers
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    return special_ids(out, shape)


CARD = """\
---
license: mit
library_name: transformers
pipeline_tag: text-generation
tags: [phi3, synthetic, benchmark, random-weights]
---

# {folder}

Random weights in the exact shape of {real} ({params:,} parameters, {layers} layers, hidden {hidden}),
written by `benchmarks/scale.py make-model --shape {shape}` (seed {seed}) to measure what building and
validating variants costs at real size. It is NOT a trained model: outputs are noise.
{rope}Tokenizer: {tokenizer} ({tok_size} tokens; config vocab_size {vocab} is padded, as the real ones are).
"""


def make_model(shape_name: str, out: Path, *, seed: int = 0, log=print) -> dict[str, Any]:
    shape = SHAPES[shape_name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = out.resolve().name.lower()
    if shape.tokenizer == "phi3-spm" and "phi3" not in name and "phi-3" not in name:
        log(f"warning: the folder name {out.name!r} lacks 'phi3'/'phi-3': llama.cpp applies Phi-3's "
            "special-token rules only when general.name (from the folder name) contains one")
    started = time.monotonic()
    ids = _write_tokenizer(out, shape)
    config = hub_config(shape, ids)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    generation = {"_from_model_config": True, "bos_token_id": ids["bos"], "eos_token_id": ids["stop"],
                  "pad_token_id": ids["pad"], "transformers_version": config["transformers_version"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    shards = plan_shards(shape)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards, 1):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        t0 = time.monotonic()
        size = write_shard(out / file, tensors, seed)
        total += sum(_nbytes(d) for _, d in tensors)
        weight_map.update({n: file for n, _ in tensors})
        log(f"  {file}: {len(tensors)} tensors, {size / 1e9:.2f} GB in {time.monotonic() - t0:.1f} s, "
            f"peak RSS so far {peak_rss_bytes() / 2**30:.2f} GiB")
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    rope = ("Rope: longrope with MADE-UP short/long factors (deterministic, the right length and range), "
            "not Microsoft's.\n") if shape.longrope else ""
    tok = ("the bundled example's sentencepiece Phi-3 tokenizer (examples/tiny-phi3)" if shape.tokenizer == "phi3-spm"
           else "GPT-2 byte-level BPE with Phi-4's added tokens and chat template (hubbot's phi4 test fixture)")
    real = {"phi-3.5-mini": "microsoft/Phi-3.5-mini-instruct", "phi-4": "microsoft/phi-4"}.get(
        shape.name, f"a small model with {'Phi-4' if 'phi4' in shape.name else 'Phi-3.5-mini'}'s structure")
    (out / "README.md").write_text(CARD.format(
        folder=out.name, real=real, params=shape.parameters(), layers=shape.layers, hidden=shape.hidden,
        shape=shape.name, seed=seed, rope=rope, tokenizer=tok, tok_size=ids["size"], vocab=shape.vocab),
        encoding="utf-8")
    seconds = time.monotonic() - started
    return {"shape": shape.name, "out": str(out), "parameters": shape.parameters(), "shards": len(shards),
            "weight_bytes": total, "seconds": round(seconds, 1), "peak_rss_bytes": peak_rss_bytes()}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
