"""The inner (fast-weight) state of a TTT layer carried across calls (math §3)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class InnerState:
    """Inner-model weights at the start of the open mini-batch, plus its accumulated gradients.

    All tensors are batch-first: ``W1 [B,H,F,F1]``, ``b1 [B,H,1,F1]`` and, for TTT-MLP, ``W2 [B,H,F1,F]``,
    ``b2 [B,H,1,F]``. ``g*`` hold ``sum_j lr_j * grad_j`` over the tokens already seen in the open
    mini-batch (all gradients taken at ``W*``), and ``pos [B]`` counts those tokens (0..b-1). The weights
    of the next token at position ``i`` are ``W - coef_i * (g + lr_i * grad_i)``.
    """

    W1: Tensor
    b1: Tensor
    gW1: Tensor
    gb1: Tensor
    pos: Tensor
    W2: Tensor | None = None
    b2: Tensor | None = None
    gW2: Tensor | None = None
    gb2: Tensor | None = None

    @property
    def is_mlp(self) -> bool:
        return self.W2 is not None

    @property
    def batch_size(self) -> int:
        return self.W1.shape[0]

    def weights(self) -> tuple[Tensor, ...]:
        return (self.W1, self.b1) if self.W2 is None else (self.W1, self.b1, self.W2, self.b2)

    def grads(self) -> tuple[Tensor, ...]:
        return (self.gW1, self.gb1) if self.W2 is None else (self.gW1, self.gb1, self.gW2, self.gb2)

    def _map(self, fn) -> InnerState:
        return replace(self, **{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                                for f in fields(self)})

    def detach(self) -> InnerState:
        return self._map(lambda t: t.detach())

    def clone(self) -> InnerState:
        return self._map(lambda t: t.clone())

    def to(self, device: torch.device | str) -> InnerState:
        return self._map(lambda t: t.to(device))

    def index_select(self, index: Tensor) -> InnerState:
        """Rows ``index`` of the batch (batch reordering for beam search, dropping finished rows)."""
        return self._map(lambda t: t.index_select(0, index.to(t.device)))

    @staticmethod
    def from_parts(weights: tuple[Tensor, ...], grads: tuple[Tensor, ...], pos: Tensor) -> InnerState:
        """Build from ``weights()``-ordered weights, ``grads()``-ordered accumulators and ``pos``."""
        if len(weights) != len(grads) or len(weights) not in (2, 4):
            raise ValueError(f"need 2 (TTT-Linear) or 4 (TTT-MLP) weights and as many accumulators, "
                             f"got {len(weights)} and {len(grads)}")
        w1, b1, *w2b2 = weights
        gw1, gb1, *gw2gb2 = grads
        if not w2b2:
            return InnerState(W1=w1, b1=b1, gW1=gw1, gb1=gb1, pos=pos)
        return InnerState(W1=w1, b1=b1, gW1=gw1, gb1=gb1, pos=pos, W2=w2b2[0], b2=w2b2[1],
                          gW2=gw2gb2[0], gb2=gw2gb2[1])

    @staticmethod
    def from_weights(
        weights: tuple[Tensor, ...], batch_size: int, dtype: torch.dtype | None = None
    ) -> InnerState:
        """Fresh state with the (learned) initial weights ``[H, ...]`` broadcast over the batch."""
        ws = [w.to(dtype) if dtype is not None and w.dtype != dtype else w for w in weights]
        ws = [w.expand(batch_size, *w.shape) for w in ws]
        zeros = [torch.zeros_like(w) for w in ws]
        pos = torch.zeros(batch_size, dtype=torch.long, device=ws[0].device)
        return InnerState.from_parts(tuple(ws), tuple(zeros), pos)
