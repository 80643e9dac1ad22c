"""A tiny Phi3ForCausalLM carrying Microsoft's real Phi-3 vocabulary and chat template.

The weights are random (seeded) with a wide LM head, so every position has a clear greedy token
and fp32 builds in every runtime agree with transformers exactly; what the fixture is for is the
tokenizer: the 32k sentencepiece vocabulary with byte fallback, Phi-3's added tokens and their
whitespace rules, and the Phi-3.5-mini chat template, all as Microsoft ships them.

Built once into hubbot's cache (``tiny-models/tiny-phi3-realvocab-<fingerprint>``), the
fingerprint covering this package's sources, the vocabulary files and the library versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from hubbot.paths import cache_root

from .vocab import TEMPLATE, VOCAB, phi3_backend, read_vocab, sentencepiece_model, sources_dir

PACKAGE_DIR = Path(__file__).resolve().parent
SEED = 0
VOCAB_SIZE = 32064  # Phi-3-mini's embedding rows (the tokenizer has 32011 tokens)
CONFIG = {
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": VOCAB_SIZE, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
    "max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5, "sliding_window": 2047, "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000,
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "dtype": "float32",
}
# Phi-3-mini-4k-instruct's generation_config.json: <|end|>, <|assistant|>, <|endoftext|>
GENERATION_EOS = [32000, 32001, 32007]
TOKENIZER_CONFIG = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                    "legacy": False, "padding_side": "left", "clean_up_tokenization_spaces": False,
                    "model_max_length": 4096}


def fingerprint() -> str:
    import tokenizers
    import torch
    import transformers

    h = hashlib.sha256()
    for source in sorted(PACKAGE_DIR.glob("*.py")):
        h.update(source.name.encode() + b"\0" + source.read_bytes())
    folder = sources_dir()
    for member in (VOCAB, TEMPLATE):
        h.update((folder / member).read_bytes())
    h.update(f"{torch.__version__}|{transformers.__version__}|{tokenizers.__version__}".encode())
    return h.hexdigest()[:12]


def write_tokenizer(out: Path) -> None:
    """tokenizer.json, tokenizer_config.json, tokenizer.model and chat_template.jinja, as in Microsoft's repo."""
    from transformers import PreTrainedTokenizerFast

    folder = sources_dir()
    vocab = read_vocab(folder / VOCAB)
    tok = PreTrainedTokenizerFast(tokenizer_object=phi3_backend(vocab), bos_token="<s>", eos_token="<|endoftext|>",
                                  unk_token="<unk>", pad_token="<|endoftext|>")
    tok.chat_template = (folder / TEMPLATE).read_text(encoding="utf-8")
    tok.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = {**json.loads(cfg_path.read_text(encoding="utf-8")), **TOKENIZER_CONFIG, "chat_template": tok.chat_template}
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    (out / "tokenizer.model").write_bytes(sentencepiece_model(vocab))


def write_model(out: Path) -> None:
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    torch.manual_seed(SEED)
    config = Phi3Config(**{k: v for k, v in CONFIG.items() if k not in ("architectures", "model_type")})
    model = Phi3ForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        model.lm_head.weight.normal_(0.0, 1.0)
        model.lm_head.weight[32011:] = 0.0  # rows past the tokenizer: never the greedy token
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=GENERATION_EOS, pad_token_id=32000).save_pretrained(out)
    (out / "README.md").write_text("---\nlicense: mit\n---\n# tiny-phi3-realvocab\n\nRandom weights, Microsoft's "
                                   "Phi-3 vocabulary and Phi-3.5-mini chat template (hubbot test fixture).\n")


def build(out: Path) -> None:
    out.mkdir(parents=True)
    write_model(out)
    write_tokenizer(out)


def cached_real_vocab_phi3(cache_dir: Path | None = None) -> Path:
    """The fixture folder, built once. Its name keeps ``phi3`` in it: llama.cpp applies Phi-3's
    special-token whitespace rules only to a model whose name says so."""
    root = Path(cache_dir) if cache_dir else Path(os.environ.get("HUBBOT_TINY_MODEL_CACHE") or
                                                  cache_root() / "tiny-models")
    target = root / f"tiny-phi3-realvocab-{fingerprint()}"
    if (target / "config.json").is_file() and (target / "tokenizer.model").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-phi3-realvocab-", dir=root))
    try:
        build(tmp / target.name)
        try:
            os.replace(tmp / target.name, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
