"""Pure tensor math of TTT layers: the token-by-token reference, the dual-form fast path, helpers."""

from .conv import causal_conv1d
from .decode import ttt_step
from .dual import ttt_dual
from .functional import gelu_tanh, layer_norm, ln_l2_grad, rope_adjacent, token_coefficients
from .reference import ttt_reference
from .state import InnerState

__all__ = [
    "InnerState",
    "causal_conv1d",
    "gelu_tanh",
    "layer_norm",
    "ln_l2_grad",
    "rope_adjacent",
    "token_coefficients",
    "ttt_dual",
    "ttt_reference",
    "ttt_step",
]
