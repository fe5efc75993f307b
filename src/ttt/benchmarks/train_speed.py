"""Training throughput (tokens/s) of every architecture at matched parameter counts.

One full training step = forward, next-token cross-entropy, backward, gradient clipping and an AdamW
update, exactly as :class:`ttt.training.Trainer` does it (same loss code, same parameter groups, same
model construction through :mod:`ttt.models.registry`). Each context length keeps the same number of
tokens per step (``--tokens-per-step``; rows = tokens / context), so tokens/s compare directly across
lengths: a Transformer's cost per token grows with the context, the TTT and Mamba layers' should not.
By default all architectures of one context are timed in rounds (one step of each per round, median
over ``--reps`` rounds), so a shared machine's drifting speed affects them alike; ``--no-interleave``
times each architecture alone.

    python -m ttt.benchmarks.train_speed                       # small size, contexts 2k and 8k
    python -m ttt.benchmarks.train_speed --size tiny --lengths 128 256 --tokens-per-step 512 --reps 1

Writes ``benchmarks/results/train_speed.json`` (+ ``.md``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ttt.benchmarks.common import (
    RESULTS_DIR,
    gc_paused,
    machine_info,
    markdown_table,
    sync,
    time_fn,
    write_results,
)
from ttt.models.registry import ARCHS, build_model

DEFAULT_LENGTHS = (2048, 8192)


def train_step_fn(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ids: torch.Tensor,
    pass_positions: bool,
    bf16: bool,
) -> Any:
    """One training step as the trainer does it (forward, shifted cross-entropy, backward, clip 1.0,
    optimizer step); returns a callable giving the step's loss."""
    device = ids.device
    positions = torch.arange(ids.shape[1], device=device).expand_as(ids)

    def step() -> float:
        kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
        if pass_positions:
            kwargs["position_ids"] = positions
        ctx = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)
        with ctx:
            logits = model(**kwargs).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def prepare(
    arch: str,
    size: str,
    seq_len: int,
    tokens_per_step: int,
    vocab_size: int,
    device: torch.device,
    bf16: bool,
    gradient_checkpointing: bool = False,
) -> tuple[Callable[[], float], dict[str, Any]]:
    """Build one (arch, context) training step; returns the step and the record's static fields."""
    from ttt.training.trainer import param_groups

    torch.manual_seed(0)
    model = build_model(arch, size, vocab_size, seq_len).to(device)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95))
    rows = max(1, tokens_per_step // seq_len)
    ids = torch.randint(0, vocab_size, (rows, seq_len), device=device)
    step = train_step_fn(model, optimizer, ids, arch in ("ttt-linear", "ttt-mlp", "transformer"), bf16)
    info = {
        "arch": arch,
        "size": size,
        "seq_len": seq_len,
        "rows": rows,
        "tokens_per_step": rows * seq_len,
        "params": model.num_parameters(),
        "params_non_embedding": model.num_parameters(exclude_embeddings=True),
    }
    return step, info


def _timed_record(info: dict[str, Any], median_s: float, min_s: float, runs: int) -> dict[str, Any]:
    return {**info, "step_s_median": median_s, "step_s_min": min_s, "runs": runs,
            "tokens_per_s": info["tokens_per_step"] / median_s}


def measure(
    arch: str,
    size: str,
    seq_len: int,
    tokens_per_step: int,
    vocab_size: int,
    device: torch.device,
    reps: int,
    bf16: bool,
    gradient_checkpointing: bool = False,
) -> dict[str, Any]:
    """Time training steps of one (arch, context) alone; returns tokens/s and details."""
    step, info = prepare(arch, size, seq_len, tokens_per_step, vocab_size, device, bf16,
                         gradient_checkpointing)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time_fn(step, reps=reps, warmup=1, device=device, budget_s=120.0)
    out = _timed_record(info, t["median_s"], t["min_s"], t["runs"])
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def measure_interleaved(
    arches: list[str],
    size: str,
    seq_len: int,
    tokens_per_step: int,
    vocab_size: int,
    device: torch.device,
    reps: int,
    bf16: bool,
    gradient_checkpointing: bool = False,
) -> list[dict[str, Any]]:
    """Time all ``arches`` at one context in rounds (one step of each per round, after a warm-up step).

    On a shared machine whose speed drifts over minutes, interleaving makes the architectures see the
    same conditions, so their ratios are meaningful even when the absolute numbers move. An
    architecture that fails to build or to step (e.g. out of memory) gets an ``error`` record.
    """
    steps: dict[str, Callable[[], float]] = {}
    infos: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    times: dict[str, list[float]] = {a: [] for a in arches}
    for arch in arches:
        try:
            steps[arch], infos[arch] = prepare(arch, size, seq_len, tokens_per_step, vocab_size, device,
                                               bf16, gradient_checkpointing)
            steps[arch]()  # warm-up
        except Exception as e:  # noqa: BLE001 - record it, go on with the others
            errors[arch] = f"{type(e).__name__}: {e}"
            steps.pop(arch, None)
    for _ in range(reps):
        for arch, step in list(steps.items()):
            try:
                sync(device)
                with gc_paused():
                    t0 = time.perf_counter()
                    step()
                    sync(device)
                    times[arch].append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001
                errors[arch] = f"{type(e).__name__}: {e}"
                steps.pop(arch)
    return [{"arch": a, "seq_len": seq_len, "error": errors[a]} if a in errors
            else _timed_record(infos[a], statistics.median(times[a]), min(times[a]), len(times[a]))
            for a in arches]


def table(payload: dict[str, Any]) -> str:
    lengths = payload["lengths"]
    by = {(r["arch"], r["seq_len"]): r for r in payload["results"]}
    headers = ["arch", "params (non-emb.)", *[f"tokens/s @ {n}" for n in lengths]]
    rows = []
    for arch in payload["arches"]:
        cells: list[Any] = []
        params = ""
        for n in lengths:
            r = by.get((arch, n))
            if r is None:
                cells.append("-")
            elif "error" in r:
                cells.append(f"error: {r['error'][:40]}")
            else:
                cells.append(r["tokens_per_s"])
                params = f"{r['params_non_embedding'] / 1e6:.2f}M"
        rows.append([arch, params, *cells])
    head = (
        f"Training throughput, size {payload['size']}, {payload['tokens_per_step']} tokens/step, "
        f"device {payload['machine']['device']}{' (bf16)' if payload['bf16'] else ''}"
    )
    return head + "\n\n" + markdown_table(headers, rows)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    results = []
    for n in args.lengths:
        if args.interleave:
            t0 = time.perf_counter()
            batch = measure_interleaved(list(args.arches), args.size, n, args.tokens_per_step,
                                        args.vocab_size, device, args.reps, args.bf16,
                                        args.gradient_checkpointing)
            for r in batch:
                r["wall_s"] = (time.perf_counter() - t0) / len(batch)
        else:
            batch = []
            for arch in args.arches:
                t0 = time.perf_counter()
                try:
                    r = measure(arch, args.size, n, args.tokens_per_step, args.vocab_size, device,
                                args.reps, args.bf16, args.gradient_checkpointing)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory at 8k: record it, go on
                    r = {"arch": arch, "seq_len": n, "error": f"{type(e).__name__}: {e}"}
                r["wall_s"] = time.perf_counter() - t0
                batch.append(r)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        for r in batch:
            print(
                f"{r['arch']:>10} @ {n:>6}: "
                + (f"{r['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in r else r["error"]),
                file=sys.stderr,
            )
        results.extend(batch)
    order = {a: i for i, a in enumerate(args.arches)}
    results.sort(key=lambda r: (order[r["arch"]], r["seq_len"]))
    return {
        "benchmark": "train_speed",
        "size": args.size,
        "lengths": list(args.lengths),
        "arches": list(args.arches),
        "tokens_per_step": args.tokens_per_step,
        "vocab_size": args.vocab_size,
        "bf16": args.bf16,
        "gradient_checkpointing": args.gradient_checkpointing,
        "reps": args.reps,
        "interleaved": args.interleave,
        "machine": machine_info(device),
        "results": results,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the payload written to ``<out>/train_speed.json``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arches", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--size", default="small", help="model preset (default: small, ~5M parameters)")
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    p.add_argument("--tokens-per-step", type=int, default=16384, help="tokens per step at every length")
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (as train.bf16)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-interleave", dest="interleave", action="store_false",
                   help="time each architecture alone (default: all architectures of a context in rounds)")
    p.add_argument("--out", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    payload = run(args)
    payload["command"] = "python -m ttt.benchmarks.train_speed " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    text = table(payload)
    from pathlib import Path

    write_results("train_speed", payload, text, Path(args.out))
    print(text)
    return payload


if __name__ == "__main__":
    main()
