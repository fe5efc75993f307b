"""PyTorch modules: the TTT layers and their streaming state."""

from .ttt_layer import TTTMLP, TTTLayer, TTTLayerState, TTTLinear

__all__ = ["TTTLayer", "TTTLayerState", "TTTLinear", "TTTMLP"]
