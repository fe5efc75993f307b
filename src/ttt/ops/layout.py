"""Padding / packing layouts: turn any ``[B, L]`` token layout into compact right-padded segments.

A TTT layer (and its convolutions) is causal and stateful, so padding tokens must never reach its state
and every document of a packed row must start from a fresh state. Rather than teaching every op about
masks, the model regroups its tokens once:

* every row's real tokens (``attention_mask == 1``) are moved to the front, in order;
* with ``split_documents``, a row is also cut wherever ``position_ids`` restart at 0 (packed documents);

giving ``N`` segments ``[N, L', ...]`` with ``lengths[N]`` real tokens each (the layer contract's
``lengths``). Per-token parts of the network (norms, MLPs) do not care about the regrouping; after the
blocks, :meth:`SegmentLayout.unpack` scatters the outputs back to their original positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SegmentLayout:
    """How the tokens of a ``[batch_size, seq_len]`` batch map onto ``[num_segments, max_len]`` segments.

    Attributes:
        batch_size, seq_len: the original layout.
        index: ``[N, L']`` flat index (``row * seq_len + t``) of each slot's token (0 for empty slots).
        lengths: ``[N]`` real tokens per segment (at the front of the segment).
        rows: ``[N]`` original row of each segment (segments of a row are consecutive, in order).
        first: ``[N]`` bool, the segment is its row's first one (it continues the row's incoming state).
        last_segment: ``[B]`` index of each row's last segment (whose final state is the row's new state).
    """

    batch_size: int
    seq_len: int
    index: Tensor
    lengths: Tensor
    rows: Tensor
    first: Tensor
    last_segment: Tensor

    @property
    def num_segments(self) -> int:
        return self.index.shape[0]

    @property
    def max_len(self) -> int:
        return self.index.shape[1]

    @property
    def valid(self) -> Tensor:
        """``[N, L']`` bool: slot holds a real token."""
        slots = torch.arange(self.max_len, device=self.index.device)
        return slots.view(1, -1) < self.lengths.view(-1, 1)

    @property
    def is_one_segment_per_row(self) -> bool:
        return self.num_segments == self.batch_size

    def pack(self, x: Tensor) -> Tensor:
        """``[B, L, ...] -> [N, L', ...]``; empty slots are zero. Differentiable."""
        if tuple(x.shape[:2]) != (self.batch_size, self.seq_len):
            raise ValueError(f"pack expects [{self.batch_size}, {self.seq_len}, ...], got {tuple(x.shape)}")
        rest = x.shape[2:]
        flat = x.reshape(self.batch_size * self.seq_len, *rest)
        out = flat.index_select(0, self.index.reshape(-1)).view(self.num_segments, self.max_len, *rest)
        mask = self.valid.view(self.num_segments, self.max_len, *([1] * len(rest)))
        return torch.where(mask, out, torch.zeros((), dtype=out.dtype, device=out.device))

    def unpack(self, y: Tensor, fill: Tensor | float = 0.0) -> Tensor:
        """``[N, L', ...] -> [B, L, ...]``; positions of padding tokens get ``fill``. Differentiable."""
        if tuple(y.shape[:2]) != (self.num_segments, self.max_len):
            raise ValueError(f"unpack expects [{self.num_segments}, {self.max_len}, ...], "
                             f"got {tuple(y.shape)}")
        rest = y.shape[2:]
        valid = self.valid
        out = torch.empty(self.batch_size * self.seq_len, *rest, dtype=y.dtype, device=y.device)
        if isinstance(fill, Tensor):
            out = fill.to(dtype=y.dtype, device=y.device).expand_as(out).clone()
        else:
            out = out.fill_(fill)
        return out.index_put((self.index[valid],), y[valid]).view(self.batch_size, self.seq_len, *rest)


def real_token_mask(attention_mask: Tensor | None, batch_size: int, seq_len: int) -> Tensor | None:
    """The ``[B, L]`` bool mask of the current tokens from a 2-D ``attention_mask``.

    A mask longer than ``seq_len`` covers earlier (cached) tokens too (Hugging Face convention); its last
    ``seq_len`` columns are used. Returns None when every token is real.
    """
    if attention_mask is None:
        return None
    if (attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size
            or attention_mask.shape[1] < seq_len):
        raise ValueError(f"attention_mask must be [batch={batch_size}, length>={seq_len}] (0 = padding), "
                         f"got shape {tuple(attention_mask.shape)}")
    mask = attention_mask[:, attention_mask.shape[1] - seq_len:]
    mask = mask.bool() if mask.dtype == torch.bool else mask != 0
    return None if bool(mask.all()) else mask


def document_starts(position_ids: Tensor | None, real: Tensor | None, batch_size: int, seq_len: int
                    ) -> Tensor | None:
    """``[B, L]`` bool: real tokens (other than a row's first) whose ``position_ids`` restart at 0.

    ``position_ids`` may be ``[B, L]`` or ``[1, L]``. Returns None when no row restarts.
    """
    if position_ids is None:
        return None
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if (position_ids.dim() != 2 or position_ids.shape[1] != seq_len
            or position_ids.shape[0] not in (1, batch_size)):
        raise ValueError(f"position_ids must be [batch={batch_size} or 1, length={seq_len}], "
                         f"got shape {tuple(position_ids.shape)}")
    pos = position_ids.expand(batch_size, seq_len)
    zero = pos == 0
    if real is not None:
        zero = zero & real
        # the row's first real token is not a restart (its state is the incoming one)
        first_real = real & (real.long().cumsum(1) == 1)
        zero = zero & ~first_real
    else:
        zero = zero.clone()
        zero[:, 0] = False
    return zero if bool(zero.any()) else None


def position_ids_from_cu_seqlens(cu_seqlens: Tensor, batch_size: int, seq_len: int) -> Tensor:
    """``position_ids [1, L]`` restarting at each document start of a flattened row.

    ``cu_seqlens`` are the cumulative document lengths ``[0, n_1, n_1 + n_2, ..., L]`` (the
    ``cu_seq_lens_q`` of ``transformers``' ``DataCollatorWithFlattening``); they describe one row.
    """
    cu = cu_seqlens.reshape(-1).long()
    if batch_size != 1:
        raise ValueError(f"cu_seqlens describe one flattened row; got a batch of {batch_size} rows "
                         "(use position_ids restarting at 0 for batched packed rows)")
    if cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != seq_len or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must rise from 0 to the sequence length {seq_len}, got {cu.tolist()}")
    t = torch.arange(seq_len, device=cu.device)
    doc = torch.searchsorted(cu[1:], t, right=True)  # document of each token
    return (t - cu[doc]).view(1, seq_len)


def build_layout(real: Tensor | None, restarts: Tensor | None, batch_size: int, seq_len: int
                 ) -> SegmentLayout | None:
    """Segments for real tokens ``real [B, L]`` (None = all) cut before ``restarts [B, L]`` (None = none).

    Every row gives at least one segment (possibly empty, e.g. an all-padding row), so a row's first
    segment can carry the row's incoming state. Returns None when the layout is already the identity
    (all tokens real, no restarts).
    """
    if real is None and restarts is None:
        return None
    device = (real if real is not None else restarts).device
    if real is None:
        real = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
    starts = real & (real.long().cumsum(1) == 1)  # first real token of each row
    if restarts is not None:
        starts = starts | (restarts & real)
    n_starts = starts.long().sum(1)
    seg_per_row = n_starts.clamp(min=1)
    row_offset = seg_per_row.cumsum(0) - seg_per_row
    seg = row_offset.view(-1, 1) + (starts.long().cumsum(1) - 1).clamp(min=0)  # [B, L]
    rank = real.long().cumsum(1) - 1  # rank of a real token within its row
    rank_at_start = torch.where(starts, rank, torch.full_like(rank, -1)).cummax(1).values
    pos = rank - rank_at_start  # position within its segment
    num_segments = int(seg_per_row.sum())
    flat_seg = seg[real]
    lengths = torch.zeros(num_segments, dtype=torch.long, device=device)
    lengths.index_add_(0, flat_seg, torch.ones_like(flat_seg))
    max_len = max(int(lengths.max()) if num_segments else 0, 1)
    index = torch.zeros(num_segments, max_len, dtype=torch.long, device=device)
    flat_idx = torch.arange(batch_size * seq_len, device=device).view(batch_size, seq_len)
    index[flat_seg, pos[real]] = flat_idx[real]
    rows = torch.repeat_interleave(torch.arange(batch_size, device=device), seg_per_row)
    first = torch.zeros(num_segments, dtype=torch.bool, device=device)
    first[row_offset] = True
    last_segment = row_offset + seg_per_row - 1
    return SegmentLayout(batch_size, seq_len, index, lengths, rows, first, last_segment)


__all__ = ["SegmentLayout", "build_layout", "document_starts", "position_ids_from_cu_seqlens",
           "real_token_mask"]
