"""Multi-query associative recall (MQAR), the Zoology-style synthetic recall benchmark.

A sequence starts with ``num_kv_pairs`` key-value pairs ``k1 v1 k2 v2 ...``; later, at random
positions, each key appears again as a query and must be followed by its value. Keys come from the
lower half of the vocabulary (ids ``1 .. vocab_size // 2 - 1``), values from the upper half; id 0 is the
filler token between queries. The loss is taken only on the answers: ``labels`` is -100 everywhere
except at the value that follows a query (HF convention: ``labels`` are aligned with ``input_ids`` and
shifted inside the model, so the model predicts ``labels[t]`` from tokens ``< t``).

>>> ids, labels = generate_mqar(2, seq_len=32, num_kv_pairs=4, vocab_size=64, seed=0)
>>> ids.shape, int((labels != -100).sum())
(torch.Size([2, 32]), 8)

:func:`run_mqar` trains small 2-layer models of several architectures across sequence lengths and
widths with a small learning-rate sweep and reports the best test accuracy per setting.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ttt.data import IGNORE_INDEX
from ttt.models.registry import ARCHS, build_model
from ttt.util.device import pick_device
from ttt.util.files import atomic_write_json, atomic_write_text

from .plots import plot_mqar


def generate_mqar(
    num_examples: int, seq_len: int, num_kv_pairs: int, vocab_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate MQAR examples.

    Args:
        num_examples: number of sequences.
        seq_len: tokens per sequence; needs ``seq_len >= 4 * num_kv_pairs`` (pairs + one query slot each).
        num_kv_pairs: key-value pairs per sequence (each key is queried once, in random order).
        vocab_size: total vocabulary; keys are drawn without replacement from ``1 .. vocab_size//2 - 1``,
            values (with replacement) from ``vocab_size//2 .. vocab_size - 1``.
        seed: generator seed (same seed, same data).

    Returns:
        ``(input_ids, labels)``, both ``LongTensor[num_examples, seq_len]``; labels hold the value at each
        answer position and -100 elsewhere.
    """
    key_hi = vocab_size // 2
    if num_kv_pairs < 1:
        raise ValueError("num_kv_pairs must be at least 1")
    if key_hi - 1 < num_kv_pairs:
        raise ValueError(f"vocab_size {vocab_size} too small for {num_kv_pairs} distinct keys")
    if seq_len < 4 * num_kv_pairs:
        raise ValueError(f"seq_len {seq_len} must be >= 4 * num_kv_pairs = {4 * num_kv_pairs}")
    rng = np.random.default_rng(seed)
    n, p = num_examples, num_kv_pairs
    keys = np.argsort(rng.random((n, key_hi - 1)), axis=1)[:, :p] + 1
    values = rng.integers(key_hi, vocab_size, size=(n, p))
    ids = np.zeros((n, seq_len), dtype=np.int64)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    ids[:, 0 : 2 * p : 2] = keys
    ids[:, 1 : 2 * p : 2] = values
    # query slots: pairs of positions (q, q+1) after the context, chosen without overlap
    num_slots = (seq_len - 2 * p) // 2
    rows = np.arange(n)[:, None]
    slots = np.sort(np.argsort(rng.random((n, num_slots)), axis=1)[:, :p], axis=1)
    qpos = 2 * p + 2 * slots
    order = np.argsort(rng.random((n, p)), axis=1)  # which pair is asked in each slot
    ids[rows, qpos] = keys[rows, order]
    ids[rows, qpos + 1] = values[rows, order]
    labels[rows, qpos + 1] = values[rows, order]
    return torch.from_numpy(ids), torch.from_numpy(labels)


def default_num_kv_pairs(seq_len: int) -> int:
    """Pairs per sequence for a length (Zoology-like scaling: 64 -> 4, 128 -> 8, 256 -> 16, 512 -> 32)."""
    return max(1, seq_len // 16)


# ----------------------------------------------------------------------------------------------------
# runner
# ----------------------------------------------------------------------------------------------------


@dataclass
class MQARConfig:
    """Settings of an MQAR sweep (see :data:`MQAR_PRESETS`)."""

    archs: list[str] = field(default_factory=lambda: list(ARCHS))
    seq_lens: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    widths: list[int] = field(default_factory=lambda: [64, 128])
    lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3])
    num_layers: int = 2
    vocab_size: int = 8192
    num_kv_pairs: int | None = None  # None: default_num_kv_pairs(seq_len)
    train_examples: int = 20000
    test_examples: int = 1000
    batch_size: int = 64
    epochs: int = 4
    weight_decay: float = 0.1
    seed: int = 0
    device: str = "auto"


MQAR_PRESETS: dict[str, dict[str, Any]] = {
    # seconds, for the test suite
    "smoke": dict(
        archs=["ttt-linear", "transformer"],
        seq_lens=[32],
        widths=[32],
        lrs=[3e-3],
        vocab_size=64,
        num_kv_pairs=4,
        train_examples=64,
        test_examples=16,
        batch_size=16,
        epochs=1,
    ),
    # minutes on a CPU
    "quick": dict(
        archs=["ttt-linear", "ttt-mlp", "transformer", "mamba", "mamba2"],
        seq_lens=[64, 128],
        widths=[64],
        lrs=[1e-3, 3e-3],
        vocab_size=256,
        train_examples=4000,
        test_examples=256,
        batch_size=32,
        epochs=3,
    ),
    # the standard sweep (GPU-sized)
    "default": {},
}


ModelFactory = Callable[[str, int, int, int, int], torch.nn.Module]


def registry_factory(
    arch: str, width: int, num_layers: int, vocab_size: int, seq_len: int
) -> torch.nn.Module:
    """Build ``arch`` with :func:`ttt.models.registry.build_model` at the given width and depth.

    All architectures get the same width and depth (Zoology's protocol, not parameter matching); the
    SwiGLU width of TTT / Transformer blocks is ``8/3 * width`` rounded to a multiple of 8.
    """
    fields: dict[str, Any] = {"hidden_size": width, "num_hidden_layers": num_layers}
    if arch in ("ttt-linear", "ttt-mlp", "transformer"):
        fields["intermediate_size"] = max(8, round(8 * width / 3 / 8) * 8)
    return build_model(arch, "tiny", vocab_size=vocab_size, max_seq_len=seq_len, match=False, **fields)


def _forward_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def _answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


@torch.no_grad()
def mqar_accuracy(
    model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 64
) -> float:
    """Fraction of answer tokens predicted exactly (argmax) by ``model``."""
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for i in range(0, len(ids), batch_size):
        x, y = ids[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
        pred = _forward_logits(model, x)[:, :-1].argmax(-1)
        tgt = y[:, 1:]
        mask = tgt != IGNORE_INDEX
        correct += int((pred[mask] == tgt[mask]).sum())
        total += int(mask.sum())
    return correct / max(total, 1)


def train_mqar_model(
    model: torch.nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    lr: float,
    epochs: int,
    batch_size: int,
    weight_decay: float = 0.1,
    seed: int = 0,
) -> float:
    """Train ``model`` on the answer tokens of ``train`` (AdamW, warmup + cosine); returns the last loss."""
    device = next(model.parameters()).device
    ids, labels = train
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(ids) / batch_size)
    total = max(epochs * steps_per_epoch, 1)
    warmup = max(1, total // 10)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    model.train()
    last = float("nan")
    for _ in range(epochs):
        perm = torch.randperm(len(ids), generator=gen)
        for i in range(0, len(ids), batch_size):
            idx = perm[i : i + batch_size]
            x, y = ids[idx].to(device), labels[idx].to(device)
            loss = _answer_loss(_forward_logits(model, x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            last = float(loss.detach())
    return last


def run_mqar(
    cfg: MQARConfig,
    out_dir: str | Path | None = None,
    model_factory: ModelFactory | None = None,
    log: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """Train and test every (arch, seq_len, width, lr); return one row per (arch, seq_len, width).

    Each row keeps the best test accuracy over the learning rates, plus every lr's accuracy. With
    ``out_dir``, writes ``mqar.json`` (config + rows, rewritten after each run so an interrupted sweep
    keeps its results and resumes), ``mqar.md`` (table) and ``mqar.png`` (plot).
    """
    factory = model_factory or registry_factory
    out = Path(out_dir) if out_dir is not None else None
    runs: dict[str, dict[str, Any]] = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        prev = out / "mqar.json"
        if prev.exists():
            data = json.loads(prev.read_text())
            if data.get("config") == asdict(cfg):
                runs = {r["key"]: r for r in data.get("runs", [])}
    device = pick_device(cfg.device)
    for seq_len in cfg.seq_lens:
        kv = cfg.num_kv_pairs or default_num_kv_pairs(seq_len)
        train = generate_mqar(cfg.train_examples, seq_len, kv, cfg.vocab_size, seed=cfg.seed)
        test = generate_mqar(cfg.test_examples, seq_len, kv, cfg.vocab_size, seed=cfg.seed + 10_000)
        for arch, width, lr in itertools.product(cfg.archs, cfg.widths, cfg.lrs):
            key = f"{arch}|{seq_len}|{width}|{lr:g}"
            if key in runs:
                continue
            torch.manual_seed(cfg.seed)
            model = factory(arch, width, cfg.num_layers, cfg.vocab_size, seq_len).to(device)
            t0 = time.perf_counter()
            loss = train_mqar_model(model, train, lr, cfg.epochs, cfg.batch_size, cfg.weight_decay, cfg.seed)
            acc = mqar_accuracy(model, *test, batch_size=cfg.batch_size)
            run = {
                "key": key,
                "arch": arch,
                "seq_len": seq_len,
                "width": width,
                "lr": lr,
                "num_kv_pairs": kv,
                "params": model.num_parameters(),
                "final_train_loss": loss,
                "accuracy": acc,
                "seconds": time.perf_counter() - t0,
            }
            runs[key] = run
            if log:
                secs = run["seconds"]
                log(f"mqar {arch:12s} L={seq_len:4d} d={width:4d} lr={lr:g}: acc {acc:.3f} ({secs:.1f}s)")
            if out is not None:
                partial = {"config": asdict(cfg), "runs": list(runs.values()), "rows": []}
                atomic_write_json(out / "mqar.json", partial)
    rows = summarize_mqar(list(runs.values()))
    if out is not None:
        result = {"config": asdict(cfg), "runs": list(runs.values()), "rows": rows}
        atomic_write_json(out / "mqar.json", result)
        atomic_write_text(out / "mqar.md", mqar_table(rows) + "\n")
        plot_mqar(rows, out / "mqar.png")
    return rows


def summarize_mqar(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group runs by (arch, seq_len, width); keep the best accuracy and the per-lr accuracies."""
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["arch"], int(r["seq_len"]), int(r["width"])), []).append(r)
    rows = []
    for (arch, seq_len, width), rs in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        best = max(rs, key=lambda r: r["accuracy"])
        rows.append(
            {
                "arch": arch,
                "seq_len": seq_len,
                "width": width,
                "num_kv_pairs": best["num_kv_pairs"],
                "params": best["params"],
                "accuracy": best["accuracy"],
                "best_lr": best["lr"],
                "accuracy_by_lr": {f"{r['lr']:g}": r["accuracy"] for r in rs},
            }
        )
    return rows


def mqar_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table: one row per (width, arch), one column per sequence length (best accuracy)."""
    seq_lens = sorted({r["seq_len"] for r in rows})
    head = "| width | architecture | params | " + " | ".join(f"L={s}" for s in seq_lens) + " |"
    sep = "|---|---|---:|" + "---:|" * len(seq_lens)
    lines = [head, sep]
    for width in sorted({r["width"] for r in rows}):
        for arch in sorted({r["arch"] for r in rows if r["width"] == width}):
            cells = []
            params = ""
            for s in seq_lens:
                m = [r for r in rows if r["arch"] == arch and r["width"] == width and r["seq_len"] == s]
                cells.append(f"{m[0]['accuracy']:.3f}" if m else "-")
                params = params or (f"{m[0]['params'] / 1e6:.2f}M" if m else "")
            lines.append(f"| {width} | {arch} | {params} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
