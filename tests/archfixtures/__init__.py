"""Tiny, real PhiMoE and Phi-2 fixtures built offline (test support), on tests.fixtures' helpers.

`cached_arch_model(kind)` builds one once (a few minutes on 2 busy cores) into the tiny-model cache:

* ``phimoe`` -- ``PhiMoEForCausalLM`` as Phi-3.5-MoE ships it: 4 experts, top-2 (sparsemixer), LayerNorm,
  attention and LM-head biases, a LongRoPE long-context config (16k over 4k; short and long factors
  alike), GQA, Phi-3's sentencepiece tokenizer and chat template.
* ``phi2`` -- ``PhiForCausalLM`` as phi-2 ships it: partial rotary (phi-1_5's 0.5 of head_dim 64), biases,
  LayerNorm, gelu_new MLP, GPT-2's byte-level BPE (CodeGenTokenizer) with the vocabulary padded to 51200,
  and phi-2's "Instruct: …\\nOutput:" format as its chat template.

Both are trained to continue the Phi recipe's validation prompts with clear margins, like tests.fixtures'
Phi3 kinds. Command line: ``python -m tests.archfixtures KIND OUT_DIR [--seed N] [--steps N]``.
(A package of its own: tests.fixtures' fingerprint covers all of its modules.)
"""

from .build import build_arch_model
from .cache import arch_fingerprint, cached_arch_model
from .specs import KINDS, SPECS, ArchSpec

__all__ = ["KINDS", "SPECS", "ArchSpec", "arch_fingerprint", "build_arch_model", "cached_arch_model"]
