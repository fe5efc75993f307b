"""Scan backends side by side: TTT layers and models on each backend against attention / HF Llama.

One command, one process, interleaved rounds (every candidate of a workload runs once per round, so a
shared machine's drifting speed affects all of them alike), fp32:

* the dense-matmul peak of this device, measured now;
* **layer** (width 768, 12 heads, batch 1): causal softmax attention (SDPA) and TTT-Linear / TTT-MLP
  on every backend, forward (no autograd) and forward+backward, at each length; the TTT-Linear
  forward's FLOP rate as a fraction of the matmul peak;
* **model forward** (the paper's 125m size, vocabulary 32000, batch 1, ``use_cache=True`` i.e. a
  prefill): TTT-Linear / TTT-MLP (Mamba backbone) on every backend and HF ``LlamaForCausalLM`` (SDPA)
  of the same shape; prefill tokens/s;
* **training step** (width 512, 4 layers, 8 heads, FFN 1376, vocabulary 256; batch 2 at 2k, batch 1
  at 8k): forward, cross-entropy, backward, AdamW, the same models.

Ratios are to the attention layer / Llama measured in the same rounds.

    python -m ttt.benchmarks.backends                                  # the committed run
    python -m ttt.benchmarks.backends --lengths 256 --rounds 1 --model-size tiny --out /tmp/b  # smoke
    python -m ttt.benchmarks.backends --threads 1 --name backends_1thread   # on a shared machine
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..layers import TTTMLP, TTTLinear
from ..models.registry import build_model
from ..ops.scan import BACKENDS, backend_status
from .common import (
    RESULTS_DIR,
    interleaved_rounds,
    machine_info,
    markdown_table,
    matmul_peak_gflops,
    write_results,
)
from .layer_speed import CausalSelfAttention, ttt_linear_forward_flops
from .train_speed import train_step_fn

TRAIN_SHAPE = {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
               "intermediate_size": 1376}


def _summary(times: list[float]) -> dict[str, Any]:
    """Min / median and the per-round seconds (``times_s``, in round order: paired statistics)."""
    return {"min_s": min(times), "median_s": statistics.median(times), "runs": len(times), "times_s": times}


def _ttt_arch_name(arch: str, backend: str) -> str:
    return f"{arch}[{backend}]"


MATMUL_N = 2048  # the square matmul timed in the layer rounds (the peak a layer's FLOP rate is held to)


def layer_workload(length: int, backends: list[str], rounds: int, device: torch.device, width: int = 768,
                   heads: int = 12) -> list[dict[str, Any]]:
    """Attention vs TTT layers (every backend), forward and forward+backward at one length; also a
    ``MATMUL_N``-square matmul in the same rounds (record ``model="matmul"``), so a layer's FLOP rate can be
    compared with the matmul rate of the same moments on a machine whose speed drifts."""
    torch.manual_seed(0)
    layers: dict[str, torch.nn.Module] = {"attention": CausalSelfAttention(width, heads)}
    for b in backends:
        layers[_ttt_arch_name("ttt-linear", b)] = TTTLinear(width, heads, scan_backend=b)
        layers[_ttt_arch_name("ttt-mlp", b)] = TTTMLP(width, heads, scan_backend=b)
    x = torch.randn(1, length, width, device=device)
    a, b = (torch.randn(MATMUL_N, MATMUL_N, device=device) for _ in range(2))
    cands: dict[str, Callable[[], Any]] = {"matmul|fwd": lambda: a @ b}
    for name, layer in layers.items():
        layer.to(device).train()

        def fwd(layer=layer) -> None:
            with torch.no_grad():
                layer(x)

        def fwd_bwd(layer=layer) -> None:
            out, _ = layer(x)
            out.square().mean().backward()
            layer.zero_grad(set_to_none=True)

        cands[f"{name}|fwd"] = fwd
        cands[f"{name}|fwd+bwd"] = fwd_bwd
    times = interleaved_rounds(cands, rounds, device)
    out = []
    for key, ts in times.items():
        name, mode = key.split("|")
        out.append({"workload": "layer", "model": name, "mode": mode, "length": length, "batch": 1,
                    "width": width, "heads": heads, **_summary(ts)})
    return out


def _model(arch: str, backend: str | None, size: str, vocab: int, seq_len: int, device: torch.device,
           **fields: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "transformer":
        return build_model("transformer", size, vocab, seq_len, match=False, **fields).to(device)
    return build_model(arch, size, vocab, seq_len, match=False, backbone="mamba", scan_backend=backend,
                       **fields).to(device)


def _candidates(backends: list[str]) -> list[tuple[str, str | None]]:
    return [("transformer", None)] + [(a, b) for a in ("ttt-linear", "ttt-mlp") for b in backends]


def forward_workload(length: int, backends: list[str], rounds: int, device: torch.device, size: str
                     ) -> list[dict[str, Any]]:
    """Prefill (forward with ``use_cache=True``) of the ``size`` models, batch 1."""
    cands, meta = {}, {}
    for arch, backend in _candidates(backends):
        model = _model(arch, backend, size, 32000, length, device).eval()
        ids = torch.randint(0, 32000, (1, length), device=device)

        def fwd(model=model, ids=ids) -> None:
            with torch.no_grad():
                model(input_ids=ids, use_cache=True)

        name = arch if backend is None else _ttt_arch_name(arch, backend)
        cands[name] = fwd
        meta[name] = model.num_parameters()
    times = interleaved_rounds(cands, rounds, device)
    return [{"workload": "model forward", "model": name, "size": size, "mode": "prefill", "length": length,
             "batch": 1, "params": meta[name], **_summary(ts),
             "tokens_per_s": length / statistics.median(ts)} for name, ts in times.items()]


def train_workload(length: int, backends: list[str], rounds: int, device: torch.device, size: str
                   ) -> list[dict[str, Any]]:
    """One training step (forward, loss, backward, AdamW) of the training-shape models."""
    rows = 2 if length <= 2048 else 1
    cands, meta = {}, {}
    for arch, backend in _candidates(backends):
        fields = dict(TRAIN_SHAPE) if size == "train" else {}
        model = _model(arch, backend, "small" if size == "train" else size, 256, length, device, **fields)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        ids = torch.randint(0, 256, (rows, length), device=device)
        name = arch if backend is None else _ttt_arch_name(arch, backend)
        cands[name] = train_step_fn(model, opt, ids, pass_positions=True, bf16=False)
        meta[name] = model.num_parameters()
    times = interleaved_rounds(cands, rounds, device)
    return [{"workload": "training step", "model": name, "mode": "train", "length": length, "batch": rows,
             "params": meta[name], **_summary(ts), "tokens_per_s": rows * length / statistics.median(ts)}
            for name, ts in times.items()]


def _with_ratios(records: list[dict[str, Any]]) -> None:
    """Add ``ratio``: median time over the baseline's (attention layer / Llama) in the same workload."""
    base = {}
    for r in records:
        if r["model"] in ("attention", "transformer"):
            base[(r["workload"], r["mode"], r["length"])] = r["median_s"]
    for r in records:
        ref = base.get((r["workload"], r["mode"], r["length"]))
        r["ratio"] = r["median_s"] / ref if ref else None


def table(payload: dict[str, Any]) -> str:
    """Markdown: one row per measurement, with the ratio to the baseline of its workload."""
    rows = []
    for r in payload["results"]:
        rows.append([r["workload"], r["mode"], r["length"], r["batch"], r["model"], r["median_s"],
                     r["ratio"] if r["ratio"] is not None else "-", r.get("tokens_per_s", "-")])
    text = markdown_table(["workload", "mode", "length", "batch", "model", "median s", "x baseline",
                           "tokens/s"], rows)
    peak = payload["matmul_peak_gflops"]
    machine = payload.get("machine", {})
    parts = [str(v) for v in (machine.get("cpu_model"), machine.get("gpu")) if v]
    if machine.get("torch_threads"):
        parts.append(f"{machine['torch_threads']} torch threads")
    where = "; " + ", ".join(parts) if parts else ""
    text += f"\n\nMatmul peak: {peak:.1f} GFLOP/s (fp32, measured in the same run{where})\n"
    for f in payload.get("linear_forward_fraction_of_peak", []):
        text += (f"\nTTT-Linear layer forward [{f['backend']}] at {f['length']}: {f['gflops']:.1f} GFLOP/s = "
                 f"{100 * f['fraction']:.0f}% of the matmul peak")
        if "fraction_best" in f:
            text += f" (its best call {f['best_gflops']:.1f} GFLOP/s = {100 * f['fraction_best']:.0f}%)"
        if "fraction_in_rounds" in f:
            text += (f"; {100 * f['fraction_in_rounds']:.0f}% of the {f['matmul_gflops_in_rounds']:.1f} "
                     f"GFLOP/s of a {MATMUL_N}-square matmul timed in the same rounds")
        if "fraction_paired" in f:
            text += f" ({100 * f['fraction_paired']:.0f}% as the median of the per-round ratios)"
    return text + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    status = backend_status()
    backends = [b for b in args.backends if status[b] == "available"]
    for b in args.backends:
        if b not in backends:
            print(f"skipping scan backend {b!r}: {status[b]}")
    peak = matmul_peak_gflops(device)["peak"]
    print(f"dense matmul peak: {peak:.1f} GFLOP/s")
    results: list[dict[str, Any]] = []
    fractions = []
    for length in args.lengths:
        if "layer" in args.workloads:
            recs = layer_workload(length, backends, args.rounds, device)
            mm = next(r for r in recs if r["model"] == "matmul")
            mm_flops = 2 * MATMUL_N**3
            in_rounds = mm_flops / mm["median_s"] / 1e9
            results += [r for r in recs if r is not mm]
            flops = ttt_linear_forward_flops(1, length, 768, 12, 16)
            for r in recs:
                if r["model"].startswith("ttt-linear[") and r["mode"] == "fwd":
                    gf = flops / r["median_s"] / 1e9
                    best = flops / r["min_s"] / 1e9  # the best call, like the peak (the best of its calls)
                    # each round's layer rate over the same round's matmul rate: a drift of the machine's
                    # speed within the run cancels round by round (the medians above come from any rounds)
                    paired = statistics.median((flops / t) / (mm_flops / t_mm)
                                               for t, t_mm in zip(r["times_s"], mm["times_s"], strict=True))
                    fractions.append({"backend": r["model"][11:-1], "length": length, "gflops": gf,
                                      "fraction": gf / peak, "best_gflops": best,
                                      "fraction_best": best / peak, "matmul_gflops_in_rounds": in_rounds,
                                      "fraction_in_rounds": gf / in_rounds, "fraction_paired": paired})
        if "forward" in args.workloads:
            results += forward_workload(length, backends, args.rounds, device, args.model_size)
        if "train" in args.workloads:
            results += train_workload(length, backends, args.rounds, device, args.train_size)
        print(f"length {length}: done")
    _with_ratios(results)
    return {
        "benchmark": "backends",
        "command": "python -m ttt.benchmarks.backends " + " ".join(args.argv),
        "machine": machine_info(device),
        "dtype": "float32",
        "rounds": args.rounds,
        "backends": backends,
        "matmul_peak_gflops": peak,
        "linear_forward_fraction_of_peak": fractions,
        "results": results,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", default=[b for b in BACKENDS if b != "triton"], choices=BACKENDS)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--workloads", nargs="+", default=["layer", "forward", "train"],
                   choices=["layer", "forward", "train"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model-size", default="125m", help="preset of the forward workload (default 125m)")
    p.add_argument("--train-size", default="train",
                   help="'train' (width 512, 4 layers, vocab 256) or a preset name")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default); 1 makes ratios robust on a loaded machine")
    p.add_argument("--name", default="backends", help="results file name (default backends)")
    p.add_argument("--out", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    args.argv = argv
    if args.threads:
        torch.set_num_threads(args.threads)
    payload = run(args)
    text = table(payload)
    print(text)
    write_results(args.name, payload, text, Path(args.out))
    return payload


if __name__ == "__main__":
    main()
