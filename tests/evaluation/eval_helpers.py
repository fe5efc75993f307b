"""Tiny models and synthetic documents for the evaluation tests (no registry needed)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(vocab_size: int = 32, width: int = 16, layers: int = 1, seed: int = 0) -> LlamaForCausalLM:
    """A 1-layer Llama small enough to run in milliseconds."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(cfg)


def llama_factory(arch: str, width: int, num_layers: int, vocab_size: int, seq_len: int) -> torch.nn.Module:
    """MQAR model factory ignoring ``arch`` (every architecture is a tiny Llama here)."""
    return tiny_llama(vocab_size=vocab_size, width=width, layers=num_layers)


def synthetic_docs(n: int = 4, length: int = 200, vocab_size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """Random token documents."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (length,), generator=g) for _ in range(n)]
