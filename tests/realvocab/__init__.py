"""A test fixture with Microsoft's real Phi-3 tokenizer, from the vocabulary llama.cpp's sources ship.

Separate from ``tests/fixtures`` (whose fingerprint covers every module there) so that it builds,
and is cached, on its own.
"""

from .model import cached_real_vocab_phi3
from .vocab import VocabCase, sources_dir, vocab_cases

__all__ = ["VocabCase", "cached_real_vocab_phi3", "sources_dir", "vocab_cases"]
