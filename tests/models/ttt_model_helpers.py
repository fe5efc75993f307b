"""Shared helpers of the model tests: small random TTT language models of every variant."""

from __future__ import annotations

import torch

from ttt.models import TTTForCausalLM, get_config

VOCAB = 37
VARIANTS = [("linear", "transformer"), ("linear", "mamba"), ("mlp", "transformer"), ("mlp", "mamba")]


def build_model(ttt_layer_type: str = "linear", backbone: str = "transformer", *, perturb: bool = True,
                **overrides) -> TTTForCausalLM:
    """A 2-block width-32 model (4 heads of 8, mini-batch 4) in eval mode, fp32.

    With ``perturb``, every parameter gets a small random offset so that zero-initialised parts
    (biases, ``learnable_token_idx``, ...) are exercised too.
    """
    fields = {"vocab_size": VOCAB, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64,
              "num_hidden_layers": 2, "mini_batch_size": 4}
    fields.update(overrides)
    model = TTTForCausalLM(get_config("tiny", ttt_layer_type=ttt_layer_type, backbone=backbone, **fields))
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()
