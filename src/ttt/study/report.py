"""The study's report: one markdown table, ``report.md``, ``results.json`` and two figures.

    <out>/report.md               one table (+ the unigram baseline) and links to the figures
    <out>/results.json            everything measured, raw
    <out>/samples.md              a generated sample from every architecture
    <out>/val_loss.png            validation loss against training tokens, all architectures
    <out>/loss_by_position.png    loss by token position, all architectures on one figure
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ttt.evaluation.plots import plot_loss_by_position, plot_loss_curves
from ttt.models.registry import ARCH_LABELS
from ttt.util.files import atomic_write_json, atomic_write_text


def fmt(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def tokens_label(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def results_table(results: dict[str, Any]) -> str:
    """The study's markdown table: one row per architecture, then the unigram baseline."""
    seq_len = results["config"]["seq_len"]
    head = (
        "| Architecture | Params (non-emb.) | Tokens | Val loss | Bits/byte "
        "| Loss 1st quarter | Loss last quarter "
        f"| Train tok/s | Prefill ms ({seq_len} tok) | Decode ms/tok |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arch, r in results["runs"].items():
        ev, lat = r["eval"], r["latency"]
        lines.append(
            f"| {ARCH_LABELS[arch]} "
            f"| {r['params'] / 1e6:.2f}M ({r['params_non_embedding'] / 1e6:.2f}M) "
            f"| {tokens_label(r['tokens'])} "
            f"| {fmt(ev['loss'], '.4f')} | {fmt(ev['bits_per_byte'], '.4f')} "
            f"| {fmt(ev['first_quarter_loss'], '.4f')} | {fmt(ev['last_quarter_loss'], '.4f')} "
            f"| {fmt(r['tokens_per_s'], ',.0f')} | {fmt(lat.get('prefill_ms'), '.1f')} "
            f"| {fmt(lat.get('decode_ms_per_token'), '.2f')} |"
        )
    u = results["unigram"]
    lines.append(
        f"| Unigram (train frequencies) | - | - | {fmt(u['loss'], '.4f')} "
        f"| {fmt(u['bits_per_byte'], '.4f')} "
        "| - | - | - | - | - |"
    )
    return "\n".join(lines)


def samples_markdown(samples: list[dict[str, Any]], level: int = 2) -> str:
    """The generated samples as markdown: a heading of ``level`` and a fenced block per architecture."""
    lines = ["Same prompt and seed for every model; temperature 0.8, top-k 50, top-p 0.95.", ""]
    for s in samples:
        lines += [f"{'#' * level} {s['label']}", "", "```", s["prompt"] + s["text"], "```", ""]
    return "\n".join(lines)


def write_report(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write results.json, report.md and the two figures; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    labels = {a: ARCH_LABELS[a] for a in results["runs"]}
    curves = {labels[a]: [tuple(p) for p in r["curve"]] for a, r in results["runs"].items()}
    val_png = plot_loss_curves(curves, out / "val_loss.png", title="Validation loss vs training tokens")
    pos_png = plot_loss_by_position(
        {labels[a]: r["eval"] for a, r in results["runs"].items()},
        out / "loss_by_position.png",
        title=f"Loss by token position (context {results['config']['seq_len']})",
        baseline=results["unigram"]["loss"],
    )
    atomic_write_json(out / "results.json", results)
    cfg = results["config"]
    table = results_table(results)
    samples = results.get("samples") or []
    md = [
        "# TTT comparison study",
        "",
        f"Data: {cfg['data'] or 'built-in Shakespeare'} ({cfg['tokenizer']} tokenizer); "
        f"context {cfg['seq_len']} tokens; {tokens_label(cfg['train_tokens'])} training tokens per "
        "architecture; "
        f"size preset `{cfg['size']}` "
        "(baselines matched to TTT-Linear's non-embedding parameter count).",
        f"Validation: {results['eval_windows']} windows of {cfg['seq_len']} tokens inside documents "
        "(position = true context length); losses in nats/token.",
        "",
        table,
        "",
        "Loss 1st/last quarter: mean loss of the tokens in the first / last quarter of the context. "
        "Latencies: batch 1, prefill of one full-context sequence, decode per token with the model's cache "
        f"({results.get('device', 'cpu')}), all models timed side by side in interleaved rounds (median). "
        "Train tok/s: the training run's own throughput (runs made at different times on a shared machine "
        "are not comparable; `ttt bench train` times architectures side by side).",
        "",
        "![validation loss](val_loss.png)",
        "",
        "![loss by position](loss_by_position.png)",
        "",
    ]
    if samples:
        md += ["## Samples", "", samples_markdown(samples, level=3)]
    md.append(f"Raw numbers: `results.json`. Machine: {results.get('machine', '')}.")
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    paths = {
        "report": out / "report.md",
        "results": out / "results.json",
        "val_loss_plot": val_png,
        "loss_by_position_plot": pos_png,
    }
    if (out / "samples.md").exists():
        paths["samples"] = out / "samples.md"
    return paths


__all__ = ["fmt", "results_table", "samples_markdown", "tokens_label", "write_report"]
