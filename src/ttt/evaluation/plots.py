"""Figures of the evaluation and the comparison study (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .metrics import EvalResult  # noqa: E402


def _as_result(r: EvalResult | Mapping[str, Any]) -> EvalResult:
    return r if isinstance(r, EvalResult) else EvalResult.from_dict(dict(r))


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_loss_by_position(
    results: Mapping[str, EvalResult | Mapping[str, Any]],
    path: str | Path,
    title: str = "Loss by token position",
    log_x: bool = True,
    baseline: float | None = None,
) -> Path:
    """One curve per model: bucketed mean loss against context length (token position + 1), with a
    shaded 95% band (mean +- 1.96 standard errors across windows) when the results carry
    ``bucket_stderr``; the legend gives each model's number of windows.

    Args:
        results: model name -> :class:`EvalResult` (or its ``to_dict()``).
        path: PNG file to write.
        baseline: optional horizontal reference line (e.g. the unigram loss).
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    banded = False
    for name, r in results.items():
        res = _as_result(r)
        x, y = res.bucket_centers(), res.bucket_loss
        (line,) = ax.plot(x, y, marker="o", markersize=3, label=f"{name} ({res.num_windows} windows)")
        if len(res.bucket_stderr) == len(y):
            half = [1.96 * s for s in res.bucket_stderr]
            ax.fill_between(x, [m - h for m, h in zip(y, half)], [m + h for m, h in zip(y, half)],
                            color=line.get_color(), alpha=0.2, linewidth=0)
            banded = True
    if banded:
        title += "\nshaded: 95% confidence band of the mean over windows"
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label="unigram")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel("token position (context length)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_loss_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    title: str = "Validation loss during training",
    ylabel: str = "validation loss (nats / token)",
) -> Path:
    """One curve per model: validation loss against training tokens seen (``[(tokens, loss), ...]``)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in curves.items():
        pts = sorted(pts)
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_mqar(
    rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "MQAR test answer accuracy"
) -> Path:
    """MQAR accuracy (best over learning rates): one panel per sequence length against the number of
    key-value pairs, then one panel against sequence length at a fixed number of pairs (the largest one
    tested at every length); one line per architecture (and width), chance level dashed."""
    seq_lens = sorted({int(r["seq_len"]) for r in rows})
    kvs_at = {s: {int(r["num_kv_pairs"]) for r in rows if int(r["seq_len"]) == s} for s in seq_lens}
    common = set.intersection(*kvs_at.values()) if kvs_at else set()
    fixed_kv = max(common) if common else None
    order = ["ttt-linear", "ttt-mlp", "transformer", "mamba", "mamba2"]
    lines = sorted(
        {(str(r["arch"]), int(r["width"])) for r in rows},
        key=lambda aw: (order.index(aw[0]) if aw[0] in order else len(order), aw),
    )
    widths = {w for _, w in lines}
    chance = max((float(r["chance"]) for r in rows if "chance" in r), default=None)
    panels = len(seq_lens) + (fixed_kv is not None)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(3.6 * max(panels, 1), 3.8), squeeze=False)

    def label(arch: str, width: int) -> str:
        return arch if len(widths) == 1 else f"{arch} d={width}"

    def finish(ax: Any, xlabel: str, sub: str, ticks: Sequence[int]) -> None:
        if chance is not None:
            ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label=f"chance {chance:.3f}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(ticks), [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test answer accuracy")
        ax.set_title(sub, fontsize=10)
        ax.grid(True, alpha=0.3)

    for ax, seq_len in zip(axes[0], seq_lens):
        for arch, width in lines:
            pts = sorted(
                (int(r["num_kv_pairs"]), float(r["accuracy"]))
                for r in rows
                if r["arch"] == arch and int(r["width"]) == width and int(r["seq_len"]) == seq_len
            )
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", markersize=4, label=label(arch, width))
        finish(ax, "key-value pairs", f"sequence length {seq_len}", sorted(kvs_at[seq_len]))
    if fixed_kv is not None:
        ax = axes[0][len(seq_lens)]
        for arch, width in lines:
            pts = sorted(
                (int(r["seq_len"]), float(r["accuracy"]))
                for r in rows
                if r["arch"] == arch and int(r["width"]) == width and int(r["num_kv_pairs"]) == fixed_kv
            )
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", markersize=4, label=label(arch, width))
        finish(ax, "sequence length", f"{fixed_kv} key-value pairs", seq_lens)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
