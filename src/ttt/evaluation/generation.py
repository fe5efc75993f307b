"""Text generation from a causal LM with sampling options, optionally streamed to the terminal."""

from __future__ import annotations

import math
from typing import Any

import torch


class GenerationError(ValueError):
    """An invalid sampling parameter or size (the message names it)."""


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """Validate generation settings.

    Raises:
        GenerationError: ``max_new_tokens < 1``, ``temperature`` negative or not finite, ``top_k < 0``, or
            ``top_p`` outside ``(0, 1]``.
    """
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise GenerationError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k < 0:
        raise GenerationError(f"top_k must be >= 0 (0: off), got {top_k}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1] (1: off), got {top_p}")


def generate_text(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 0.95,
    seed: int = 0,
    stream: bool = False,
) -> str:
    """Continue ``prompt`` and return the new text (HF ``generate``; ``temperature <= 0`` is greedy).

    With ``stream=True`` the text is printed to stdout token by token (``transformers.TextStreamer``).

    Raises:
        GenerationError: invalid settings (:func:`check_sampling`).
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    from transformers import TextStreamer

    torch.manual_seed(seed)
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    ids = enc["input_ids"].to(device)
    if ids.numel() == 0:  # generation needs at least one token
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
        ids = torch.tensor([[start]], device=device)
    sample = temperature > 0
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=sample)
    if sample:
        kwargs.update(temperature=temperature, top_k=top_k if top_k > 0 else None, top_p=top_p)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        kwargs["pad_token_id"] = pad
    streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True) if stream else None
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs)
    return tokenizer.decode(out[0, ids.size(1) :].tolist(), skip_special_tokens=True)
