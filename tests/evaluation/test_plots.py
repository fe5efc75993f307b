"""Plots are written as non-empty PNG files."""

from __future__ import annotations

from eval_helpers import synthetic_docs, tiny_llama

from ttt.evaluation import evaluate
from ttt.evaluation.plots import plot_loss_by_position, plot_loss_curves


def test_plots_written(tmp_path) -> None:
    res = evaluate(tiny_llama(), synthetic_docs(n=2, length=64), seq_len=32, num_buckets=8)
    p = plot_loss_by_position({"a": res, "b": res.to_dict()}, tmp_path / "pos.png", baseline=3.4)
    assert p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 1000
    q = plot_loss_curves({"a": [(10, 3.0), (20, 2.5)], "b": []}, tmp_path / "sub" / "curve.png")
    assert q.stat().st_size > 1000
