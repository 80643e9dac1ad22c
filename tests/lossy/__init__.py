"""A fixture that loses something when quantized: the tiny Phi-3 with noise on its weights.

The trained fixtures (tests/fixtures) answer the recipe prompts with margins of several logits, so
even GGUF Q2_K keeps every greedy answer. Noise of ``sigma`` times each weight matrix's own std
(seeded) leaves the tokenizer, shapes and architecture as they are and shrinks the margins until
low-bit quantization changes the greedy chat answers: with sigma 1.6, Q2_K's answer to `days-chat`
leaves the source's at token 1 and Q3_K_M's at token 3, while Q8_0's never does (measured with
llama.cpp 0.3.36). Built in a second from the example, so it is not cached.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def noisy_copy(source: Path, target: Path, sigma: float = 1.6, seed: int = 0) -> Path:
    """``source`` (a transformers folder) copied to ``target`` with seeded Gaussian noise on every matrix."""
    import torch
    from transformers import AutoModelForCausalLM

    shutil.copytree(source, target)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * parameter.std() * sigma)
    model.save_pretrained(target)
    return target
