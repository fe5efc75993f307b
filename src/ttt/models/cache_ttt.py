"""The generation cache of a TTT language model: per layer the TTT state and the pre-conv buffer.

Unlike a KV cache its size does not grow with the context: per layer it holds the inner weights, the
open mini-batch's gradient accumulators and position (:class:`~ttt.layers.TTTLayerState`, including
the Q/K conv buffers of shared-Q/K layers), and the last ``K-1`` inputs of the block's pre-conv.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..layers import TTTLayerState

#: The name ``transformers`` uses for the cache argument of ``forward`` and the cache field of model outputs:
#: ``"cache"`` from transformers 5.24 on, ``"past_key_values"`` before. TTT models accept both names.
CACHE_KEY = ("cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
             else "past_key_values")


class TTTCache:
    """Recurrent state of a :class:`~ttt.models.TTTForCausalLM`, filled lazily by the first forward.

    It follows the parts of the ``transformers`` cache protocol that generation uses
    (``get_seq_length``, ``reorder_cache`` for beam search, ``is_compileable``), and is updated in place
    by each forward that receives it.

    Attributes:
        layer_states: per block, the TTT layer's :class:`TTTLayerState` (``None`` before the first call).
        conv_states: per block, the pre-conv buffer ``[B, D, K-1]`` (``None`` without pre-conv).
        seen_tokens: number of token columns consumed so far (padding columns included, as in the
            Hugging Face attention-mask convention).
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, num_layers: int | None = None) -> None:
        n = num_layers or 0
        self.layer_states: list[TTTLayerState | None] = [None] * n
        self.conv_states: list[Tensor | None] = [None] * n
        self.seen_tokens = 0

    # ----------------------------------------------------------------- queries
    @property
    def is_initialized(self) -> bool:
        return any(s is not None for s in self.layer_states)

    @property
    def batch_size(self) -> int | None:
        for state in self.layer_states:
            if state is not None:
                return state.batch_size
        return None

    @property
    def is_linear(self) -> list[bool]:
        """Per layer, whether ``generate`` must treat it as a state without a sequence length.

        All ``False``: the cache counts the token columns it has seen (:meth:`get_seq_length`), so
        ``generate`` (transformers >= 5.24) may slice the already-seen part off a continued prompt as it
        does for a key/value cache.
        """
        return [False] * len(self.layer_states)

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.layer_states)

    def __len__(self) -> int:
        return len(self.layer_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Token columns seen so far (used by ``generate`` to slice new inputs)."""
        return self.seen_tokens

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        """No maximum: the state has a fixed size whatever the context length."""
        return -1

    def memory_bytes(self) -> int:
        """Bytes held by all tensors of the cache (constant in the context length)."""
        total = 0
        for state in self.layer_states:
            if state is None:
                continue
            inner = state.inner
            for t in (*inner.weights(), *inner.grads(), inner.pos, state.conv_q, state.conv_k):
                if t is not None:
                    total += t.numel() * t.element_size()
        for t in self.conv_states:
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    # ----------------------------------------------------------------- updates
    def update(self, layer_idx: int, state: TTTLayerState, conv_state: Tensor | None) -> None:
        """Store the state of block ``layer_idx`` after a forward."""
        while len(self.layer_states) <= layer_idx:
            self.layer_states.append(None)
            self.conv_states.append(None)
        self.layer_states[layer_idx] = state
        self.conv_states[layer_idx] = conv_state

    def _apply(self, fn_state: Callable[[TTTLayerState], TTTLayerState], fn_tensor: Callable[[Tensor], Tensor]
               ) -> None:
        self.layer_states = [None if s is None else fn_state(s) for s in self.layer_states]
        self.conv_states = [None if t is None else fn_tensor(t) for t in self.conv_states]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder / select batch rows in place (beam search)."""
        self._apply(lambda s: s.index_select(beam_idx), lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep only batch rows ``indices`` (in place)."""
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times (in place), e.g. to expand a prompt cache for sampling."""
        bsz = self.batch_size
        if bsz is None:
            return
        device = next(s.inner.W1.device for s in self.layer_states if s is not None)
        self.reorder_cache(torch.arange(bsz, device=device).repeat_interleave(repeats))

    def index_select(self, index: Tensor) -> TTTCache:
        """A new cache with batch rows ``index`` (this one is left unchanged)."""
        out = self.copy()
        out.reorder_cache(index)
        return out

    def copy(self) -> TTTCache:
        """A shallow copy (same tensors); forwards replace states rather than mutate them."""
        out = TTTCache()
        out.layer_states = list(self.layer_states)
        out.conv_states = list(self.conv_states)
        out.seen_tokens = self.seen_tokens
        return out

    def clone(self) -> TTTCache:
        """A deep copy (cloned tensors)."""
        out = self.copy()
        out._apply(lambda s: s.clone(), lambda t: t.clone())
        return out

    def detach(self) -> TTTCache:
        """Cut the autograd history in place (truncated back-propagation through time); returns self."""
        self._apply(lambda s: s.detach(), lambda t: t.detach())
        return self

    def to(self, device: torch.device | str) -> TTTCache:
        """Move all tensors (in place); returns self."""
        self._apply(lambda s: s.to(device), lambda t: t.to(device))
        return self

    def reset(self) -> None:
        """Forget everything (the next forward starts a fresh sequence)."""
        n = len(self.layer_states)
        self.layer_states = [None] * n
        self.conv_states = [None] * n
        self.seen_tokens = 0

    def __repr__(self) -> str:
        return (f"TTTCache(layers={len(self)}, batch_size={self.batch_size}, seen_tokens={self.seen_tokens}, "
                f"bytes={self.memory_bytes()})")


__all__ = ["CACHE_KEY", "TTTCache"]
