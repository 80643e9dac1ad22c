"""Source checks before any build: is this model folder (or Hub repo) whole and self-consistent?

Each check raises UsageError (exit 2) naming the file, the tensor or config key, and what was
expected against what was found. Only safetensors headers and small JSON files are read, never
tensor data, so a 30 GB source checks in milliseconds:

- weights: every header parses; each file is exactly as long as its header says (a truncated
  download is caught here, not by the GGUF converter's mmap); ``-0000k-of-0000N`` shards are all
  there; ``model.safetensors.index.json`` names only files that exist and tensors they hold;
- shapes: tensor names and shapes against config.json (vocab, hidden size, layers, heads, MLP),
  from a table of the architecture's parameter names (``LAYOUTS``); architectures without an
  entry, and quantized sources, are not shape-checked;
- tokenizer: it loads with transformers' AutoTokenizer (what validation uses);
- chat template: present when the family validates with chat prompts.

For a Hub source the header and shape checks run first on ``HfApi.get_safetensors_metadata``
(ranged reads of the headers, before the weights are downloaded), then all checks on the download.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends.support import canonical_architecture
from .errors import UsageError
from .recipe import Family
from .source import INDEX_FILE, SafetensorsHeader, chat_template, read_config, read_safetensors_header

DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}
TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})\.safetensors$")
Config = Mapping[str, Any]


# ------------------------------------------------------------------------------- the weight files
def check_data_size(header: SafetensorsHeader) -> None:
    """The file holds exactly the header plus the tensor data the header describes."""
    expected = header.data_start + header.data_bytes
    found = header.path.stat().st_size
    if found < expected:
        cut = sorted(n for n, t in header.tensors.items() if t["data_offsets"][1] > found - header.data_start)
        raise UsageError(f"{header.path}: truncated: its header describes {expected} bytes "
                         f"({header.data_bytes} of tensor data), the file has {found}; "
                         f"{len(cut)} tensor(s) cut off, e.g. '{cut[0]}' (re-download it)")
    if found > expected:
        raise UsageError(f"{header.path}: {found - expected} bytes more than its header describes "
                         f"(expected {expected}, found {found}); the file is not a valid safetensors file")


def check_offsets(header: SafetensorsHeader) -> None:
    """Each tensor's byte range is as long as its dtype and shape need, and the ranges tile the data."""
    end = 0
    for name, t in sorted(header.tensors.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        start, stop = t["data_offsets"]
        if start != end:
            raise UsageError(f"{header.path}: tensor '{name}' starts at data offset {start}, expected {end} "
                             f"(tensor data must be contiguous, without gaps or overlaps)")
        itemsize = DTYPE_BYTES.get(t["dtype"])
        if itemsize is not None and stop - start != math.prod(t["shape"]) * itemsize:
            raise UsageError(f"{header.path}: tensor '{name}' ({t['dtype']} {t['shape']}) needs "
                             f"{math.prod(t['shape']) * itemsize} bytes, its data_offsets give {stop - start}")
        end = stop


def check_safetensors_opens(path: Path) -> None:
    """The safetensors library itself opens the file (it maps it; no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy"):
            pass
    except SafetensorError as e:
        raise UsageError(f"{path}: the safetensors library cannot open it: {e}") from None


def check_shard_names(names: Iterable[str], where: str) -> None:
    """``model-00001-of-00003.safetensors`` … : every shard of the set is present."""
    sets: dict[tuple[str, str], set[int]] = {}
    for name in names:
        m = SHARD_NAME.match(name)
        if m:
            sets.setdefault((m["stem"], m["total"]), set()).add(int(m["index"]))
    for (stem, total), present in sorted(sets.items()):
        missing = [f"{stem}-{i:05d}-of-{total}.safetensors" for i in range(1, int(total) + 1) if i not in present]
        if missing:
            raise UsageError(f"{where}: missing shard(s) {', '.join(missing)}: found {len(present)} of "
                             f"{int(total)} ({stem}-*-of-{total}.safetensors)")


def read_index(path: Path) -> dict[str, str]:
    """``model.safetensors.index.json``'s weight_map (tensor name -> file name)."""
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UsageError(f"{path}: needs a 'weight_map' object of tensor name -> safetensors file name")
    return weight_map


def check_index_files(weight_map: Mapping[str, str], files: Iterable[str], where: str) -> None:
    """Every file the index names is there."""
    present = set(files)
    absent = sorted(set(weight_map.values()) - present)
    if absent:
        weights = sorted(f for f in present if f.endswith(".safetensors"))
        raise UsageError(f"{where}/{INDEX_FILE} names {', '.join(absent)}, which {where} does not have "
                         f"(it has: {', '.join(weights) or 'no *.safetensors files'})")


def check_index_tensors(weight_map: Mapping[str, str], tensors_by_file: Mapping[str, Iterable[str]],
                        where: str) -> None:
    """Every tensor the index maps to a file is in that file's header."""
    held = {f: set(names) for f, names in tensors_by_file.items()}
    for name, file in sorted(weight_map.items()):
        if name not in held.get(file, set()):
            elsewhere = [f for f, names in held.items() if name in names]
            found = f"it is in {elsewhere[0]}" if elsewhere else "no file has it"
            raise UsageError(f"{where}/{INDEX_FILE} maps tensor '{name}' to {file}, but {file}'s header has "
                             f"no such tensor ({found})")


def check_weight_files(folder: Path) -> dict[str, SafetensorsHeader]:
    """All header-level checks of a local folder's weights; the headers by file name."""
    files = sorted(folder.glob("*.safetensors"))
    check_shard_names((f.name for f in files), str(folder))
    index = folder / INDEX_FILE
    weight_map = read_index(index) if index.is_file() else None
    if weight_map is not None:
        check_index_files(weight_map, (f.name for f in files), str(folder))
    headers = {f.name: read_safetensors_header(f) for f in files}
    for header in headers.values():
        check_data_size(header)
        check_offsets(header)
        check_safetensors_opens(header.path)
    if weight_map is not None:
        check_index_tensors(weight_map, {f: h.tensors for f, h in headers.items()}, str(folder))
    return headers


# ------------------------------------------------------------------------------- shapes vs config.json
@dataclass(frozen=True)
class Quantity:
    """A size derived from config.json, e.g. the fused qkv projection's rows."""

    text: str  # how it reads in a message, in config.json's key names
    keys: tuple[str, ...]  # the keys it comes from (shown with their values)
    value: Callable[[Config], int]


@dataclass(frozen=True)
class Layout:
    """An architecture's parameter names and shapes, each dimension a config key or a Quantity's name."""

    layer_prefix: str  # "model.layers.{i}."
    layers_key: str
    top: dict[str, tuple[str, ...]]
    per_layer: dict[str, tuple[str, ...]]
    quantities: dict[str, Quantity] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)  # tensor -> config key that, when true, drops it
    defaults: dict[str, Callable[[Config], int]] = field(default_factory=dict)  # as transformers fills them in
    present_if: dict[str, str] = field(default_factory=dict)  # tensor -> config key that, when false, drops it
    experts_key: str | None = None  # per_layer names with "{j}" repeat for j < config[experts_key]


def _head_dim(c: Config) -> int:
    if c.get("head_dim"):
        return int(c["head_dim"])
    if c["hidden_size"] % c["num_attention_heads"]:
        raise ValueError(f"hidden_size = {c['hidden_size']} is not a multiple of "
                         f"num_attention_heads = {c['num_attention_heads']} (and there is no head_dim)")
    return c["hidden_size"] // c["num_attention_heads"]


def _q_size() -> Quantity:
    return Quantity("num_attention_heads × head_dim", ("num_attention_heads", "head_dim"),
                    lambda c: c["num_attention_heads"] * _head_dim(c))


def _kv_size() -> Quantity:
    return Quantity("num_key_value_heads × head_dim", ("num_key_value_heads", "head_dim"),
                    lambda c: c["num_key_value_heads"] * _head_dim(c))


def _with_bias(weights: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """Each ``….weight`` with its ``….bias`` (one row per output)."""
    return {**weights, **{n.removesuffix("weight") + "bias": dims[:1] for n, dims in weights.items()}}


GQA_DEFAULTS = {"num_key_value_heads": lambda c: c["num_attention_heads"], "head_dim": _head_dim}
PHI3 = Layout(
    layer_prefix="model.layers.{i}.",
    layers_key="num_hidden_layers",
    top={"model.embed_tokens.weight": ("vocab_size", "hidden_size"),
         "model.norm.weight": ("hidden_size",),
         "lm_head.weight": ("vocab_size", "hidden_size")},
    per_layer={"input_layernorm.weight": ("hidden_size",),
               "post_attention_layernorm.weight": ("hidden_size",),
               "self_attn.qkv_proj.weight": ("qkv_size", "hidden_size"),
               "self_attn.o_proj.weight": ("hidden_size", "q_size"),
               "mlp.gate_up_proj.weight": ("gate_up_size", "hidden_size"),
               "mlp.down_proj.weight": ("hidden_size", "intermediate_size")},
    quantities={
        "q_size": _q_size(),
        "qkv_size": Quantity("(num_attention_heads + 2 × num_key_value_heads) × head_dim",
                             ("num_attention_heads", "num_key_value_heads", "head_dim"),
                             lambda c: (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * _head_dim(c)),
        "gate_up_size": Quantity("2 × intermediate_size", ("intermediate_size",),
                                 lambda c: 2 * c["intermediate_size"]),
    },
    tied={"lm_head.weight": "tie_word_embeddings"},
    defaults=GQA_DEFAULTS,
)
_ATTENTION = {"self_attn.q_proj.weight": ("q_size", "hidden_size"),
              "self_attn.k_proj.weight": ("kv_size", "hidden_size"),
              "self_attn.v_proj.weight": ("kv_size", "hidden_size")}
# Phi-3.5-MoE as the Hub stores it (transformers 5 fuses the experts only when it loads them)
PHIMOE = Layout(
    layer_prefix="model.layers.{i}.",
    layers_key="num_hidden_layers",
    top={"model.embed_tokens.weight": ("vocab_size", "hidden_size"),
         **_with_bias({"model.norm.weight": ("hidden_size",), "lm_head.weight": ("vocab_size", "hidden_size")})},
    per_layer={
        **_with_bias({"input_layernorm.weight": ("hidden_size",), "post_attention_layernorm.weight": ("hidden_size",),
                      **_ATTENTION, "self_attn.o_proj.weight": ("hidden_size", "q_size")}),
        "block_sparse_moe.gate.weight": ("num_local_experts", "hidden_size"),
        "block_sparse_moe.experts.{j}.w1.weight": ("intermediate_size", "hidden_size"),
        "block_sparse_moe.experts.{j}.w2.weight": ("hidden_size", "intermediate_size"),
        "block_sparse_moe.experts.{j}.w3.weight": ("intermediate_size", "hidden_size"),
    },
    quantities={"q_size": _q_size(), "kv_size": _kv_size()},
    tied={"lm_head.weight": "tie_word_embeddings"},
    defaults=GQA_DEFAULTS,
    present_if={"lm_head.bias": "lm_head_bias", **{f"self_attn.{p}_proj.bias": "attention_bias" for p in "qkvo"}},
    experts_key="num_local_experts",
)
# phi-2, phi-1_5, phi-1: biases everywhere, LayerNorm, a plain fc1/fc2 MLP
PHI = Layout(
    layer_prefix="model.layers.{i}.",
    layers_key="num_hidden_layers",
    top={"model.embed_tokens.weight": ("vocab_size", "hidden_size"),
         **_with_bias({"model.final_layernorm.weight": ("hidden_size",),
                       "lm_head.weight": ("vocab_size", "hidden_size")})},
    per_layer=_with_bias({"input_layernorm.weight": ("hidden_size",), **_ATTENTION,
                          "self_attn.dense.weight": ("hidden_size", "q_size"),
                          "self_attn.q_layernorm.weight": ("head_dim",), "self_attn.k_layernorm.weight": ("head_dim",),
                          "mlp.fc1.weight": ("intermediate_size", "hidden_size"),
                          "mlp.fc2.weight": ("hidden_size", "intermediate_size")}),
    quantities={"q_size": _q_size(), "kv_size": _kv_size()},
    tied={"lm_head.weight": "tie_word_embeddings"},
    defaults=GQA_DEFAULTS,
    present_if={f"self_attn.{q}_layernorm.{p}": "qk_layernorm" for q in "qk" for p in ("weight", "bias")},
)
# by the support table's architecture names (canonical_architecture reads an alias as its architecture)
LAYOUTS: dict[str, Layout] = {"Phi3ForCausalLM": PHI3, "PhiMoEForCausalLM": PHIMOE, "PhiForCausalLM": PHI}


@dataclass(frozen=True)
class Tensor:
    file: str
    shape: list[int]


def layout_for(config: Config) -> Layout | None:
    """The table entry for config.json's architecture; None for unknown or quantized sources."""
    arch = (config.get("architectures") or [None])[0]
    if config.get("quantization_config"):
        return None
    return LAYOUTS.get(canonical_architecture(arch))


def check_shapes(config: Config, tensors: Mapping[str, Tensor], where: str) -> bool:
    """Tensor names and shapes against config.json; False when the architecture has no table entry."""
    layout = layout_for(config)
    if layout is None:
        return False
    c = _complete(layout, config, where)
    expected = _expected_tensors(layout, c)
    _check_layers(layout, c, tensors, where)
    for name, dims in expected.items():
        if name not in tensors:
            raise UsageError(f"{where}: no tensor '{name}' in any *.safetensors file; "
                             f"{config['architectures'][0]} with this config.json needs it")
        _check_shape(layout, c, name, dims, tensors[name], where)
    return True


def _complete(layout: Layout, config: Config, where: str) -> dict[str, Any]:
    """config.json's values the layout uses, with transformers' defaults filled in; each a positive int."""
    keys = {k for dims in (*layout.top.values(), *layout.per_layer.values()) for k in dims} - set(layout.quantities)
    keys |= {layout.layers_key, *(k for q in layout.quantities.values() for k in q.keys)}
    c = dict(config)

    def require(key: str) -> None:
        value = c.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UsageError(f"{where}/config.json: '{key}' must be a positive integer for "
                             f"{config['architectures'][0]}, found {value!r}")

    for key in sorted(keys - set(layout.defaults)):
        require(key)
    for key, default in layout.defaults.items():
        if c.get(key) is None:
            try:
                c[key] = default(c)
            except ValueError as e:
                raise UsageError(f"{where}/config.json: {e}") from None
        require(key)
    return c


def _expected_tensors(layout: Layout, c: Config) -> dict[str, tuple[str, ...]]:
    def wanted(name: str) -> bool:
        return not c.get(layout.tied.get(name, ""), False) and \
            (name not in layout.present_if or bool(c.get(layout.present_if[name], False)))

    per_layer: dict[str, tuple[str, ...]] = {}
    for suffix, dims in layout.per_layer.items():
        if not wanted(suffix):
            continue
        experts = range(c[layout.experts_key]) if "{j}" in suffix else [None]
        per_layer |= {suffix.replace("{j}", str(j)): dims for j in experts}
    expected = {n: dims for n, dims in layout.top.items() if wanted(n)}
    for i in range(c[layout.layers_key]):
        prefix = layout.layer_prefix.format(i=i)
        expected |= {prefix + suffix: dims for suffix, dims in per_layer.items()}
    return expected


def _check_layers(layout: Layout, c: Config, tensors: Mapping[str, Tensor], where: str) -> None:
    pattern = re.compile(re.escape(layout.layer_prefix).replace(r"\{i\}", r"(\d+)"))
    found = sorted({int(m[1]) for m in map(pattern.match, tensors) if m})
    wanted = c[layout.layers_key]
    if len(found) != wanted or (found and found[-1] != wanted - 1):
        def layer(i: int) -> str:
            return layout.layer_prefix.format(i=i).rstrip(".")

        have = f"{len(found)} layers ({layer(found[0])} … {layer(found[-1])})" if found else "no layers"
        raise UsageError(f"{where}: config.json says {layout.layers_key} = {wanted}, but the weights have {have}")


def _check_shape(layout: Layout, c: Config, name: str, dims: tuple[str, ...], tensor: Tensor, where: str) -> None:
    want = [layout.quantities[d].value(c) if d in layout.quantities else c[d] for d in dims]
    if list(tensor.shape) == want:
        return
    said = ", ".join(f"{_text(layout, d)} = {v}" for d, v in zip(dims, want))
    message = f"{where}/{tensor.file}: tensor '{name}' has shape {list(tensor.shape)}, config.json gives [{said}]"
    if len(tensor.shape) == len(want):
        d, w, f = next((d, w, f) for d, w, f in zip(dims, want, tensor.shape) if w != f)
        if d in layout.quantities:
            values = ", ".join(f"{k} = {c[k]}" for k in layout.quantities[d].keys)
            verb = "gives" if len(layout.quantities[d].keys) == 1 else "give"
            message += f": config.json's {values} {verb} {w}, the weights have {f}"
        else:
            message += f": {d} is {w} in config.json, {f} in the weights"
    raise UsageError(message)


def _text(layout: Layout, dim: str) -> str:
    return layout.quantities[dim].text if dim in layout.quantities else dim


# ------------------------------------------------------------------------------- tokenizer and template
def check_tokenizer(folder: Path) -> None:
    """The tokenizer loads the way validation loads it (transformers' AutoTokenizer)."""
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise UsageError(f"{folder}: no tokenizer (tokenizer.json or tokenizer.model)")
    for name in TOKENIZER_JSON:  # name the broken file rather than let the loader fail somewhere inside
        path = folder / name
        if path.is_file():
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UsageError(f"{path}: not valid JSON ({e}); the tokenizer cannot load") from None
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # any failure to load is the source's fault; say which files and why
        files = ", ".join(f for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
                          if (folder / f).is_file())
        reason = f"missing key {e}" if isinstance(e, KeyError) else \
            (str(e).strip().splitlines() or ["no message"])[0]
        raise UsageError(f"{folder}: the tokenizer ({files}) does not load with transformers' AutoTokenizer: "
                         f"{type(e).__name__}: {reason[:300]}") from None


def check_chat_template(folder: Path, family: Family) -> None:
    """Chat prompts in the family's validation need the model's chat template."""
    chat = [p.name for p in family.validation.prompts if p.chat]
    template = chat_template(folder)
    if chat and not (template and template.strip()):
        raise UsageError(f"{folder}: no chat template (chat_template.jinja, or 'chat_template' in "
                         f"tokenizer_config.json), but family '{family.name}' validates with chat prompts "
                         f"({', '.join(chat)}) from {family.path}")


# ------------------------------------------------------------------------------- entry points
def check_folder(folder: Path, family: Family | None = None, *, tokenizer: bool = True) -> None:
    """Every check on a local model folder (``tokenizer=False`` skips loading the tokenizer, the one
    check that imports transformers)."""
    folder = Path(folder)
    config = read_config(folder)
    if not list(folder.glob("*.safetensors")):
        raise UsageError(f"{folder}: no *.safetensors weights (other weight formats are not read)")
    headers = check_weight_files(folder)
    check_shapes(config, {n: Tensor(f, t["shape"]) for f, h in headers.items() for n, t in h.tensors.items()},
                 str(folder))
    if family is not None:
        check_chat_template(folder, family)
    if tokenizer:
        check_tokenizer(folder)
    elif not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise UsageError(f"{folder}: no tokenizer (tokenizer.json or tokenizer.model)")


def check_hub_weights(api: Any, repo_id: str, commit: str, files: Iterable[str], where: str,
                      cache_dir: str | Path | None = None) -> tuple[dict[str, Any], dict[str, int]]:
    """Before downloading the weights of ``repo_id`` at ``commit``: its config.json, index and
    safetensors headers (ranged reads), checked as a local folder's would be; returns the config and
    the headers' parameter count per dtype."""
    from huggingface_hub.errors import EntryNotFoundError, NotASafetensorsRepoError, SafetensorsParsingError

    files = set(files)
    if "config.json" not in files:
        raise UsageError(f"{where}: no config.json; is this a Hugging Face model repo?")
    config = read_config(Path(api.hf_hub_download(repo_id, "config.json", revision=commit, cache_dir=cache_dir)).parent)
    check_shard_names(files, where)
    if INDEX_FILE in files:
        weight_map = read_index(Path(api.hf_hub_download(repo_id, INDEX_FILE, revision=commit, cache_dir=cache_dir)))
        check_index_files(weight_map, files, where)
    try:
        meta = api.get_safetensors_metadata(repo_id, revision=commit)
    except NotASafetensorsRepoError:
        raise UsageError(f"{where}: no *.safetensors weights (neither model.safetensors nor {INDEX_FILE}; "
                         f"other weight formats are not read)") from None
    except (SafetensorsParsingError, EntryNotFoundError) as e:
        raise UsageError(f"{where}: cannot read a safetensors header: {e}") from None
    tensors_by_file = {f: m.tensors for f, m in meta.files_metadata.items()}
    if meta.sharded:
        check_index_tensors(meta.weight_map, tensors_by_file, where)
    check_shapes(config, {n: Tensor(f, list(t.shape)) for f, ts in tensors_by_file.items() for n, t in ts.items()},
                 where)
    return config, dict(meta.parameter_count)
