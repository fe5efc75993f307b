"""Layer speed: TTT-Linear and TTT-MLP (projections included) versus a causal softmax-attention layer.

Measures forward (inference, no autograd) and forward+backward (training) at width 768 and 12 heads
over batch sizes and context lengths in one run, the machine's dense-matmul peak in the same run, the
TTT-Linear forward's FLOP throughput against that peak, and the training activation memory at one
length with and without rematerialisation of the scan.

    python -m ttt.benchmarks.layer_speed                      # the committed run
    python -m ttt.benchmarks.layer_speed --lengths 512 --batches 1 --out /tmp/x   # smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import TTTMLP, TTTLinear
from .common import (
    RESULTS_DIR,
    SavedTensorMeter,
    machine_info,
    markdown_table,
    matmul_peak_gflops,
    time_fn,
    write_results,
)


class CausalSelfAttention(nn.Module):
    """The comparison layer: q/k/v/o projections around ``scaled_dot_product_attention``."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(hidden_size, hidden_size, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        b, n, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_heads, -1).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, n, d)), None


def ttt_linear_forward_flops(batch: int, length: int, width: int, heads: int, mini_batch: int) -> float:
    """Matmul FLOPs of one TTT-Linear layer forward (elementwise work not counted).

    Projections q/k/v/o: ``4 * 2 B L D^2``; learning-rate gate: ``2 B L D H``; inner dual form per token
    and head: ``[K;Q] W`` ``4F^2``, ``Q K^T`` and ``A G`` ``4 b F``, weight update ``2F^2``, bias ``2F``.
    """
    f = width // heads
    proj = 4 * 2 * batch * length * width**2 + 2 * batch * length * width * heads
    inner = batch * length * heads * (6 * f * f + 4 * mini_batch * f + 2 * f)
    return float(proj + inner)


def _layers(width: int, heads: int, device: torch.device, remat: int) -> dict[str, nn.Module]:
    return {
        "attention": CausalSelfAttention(width, heads).to(device),
        "ttt_linear": TTTLinear(width, heads, remat_group_size=remat).to(device),
        "ttt_mlp": TTTMLP(width, heads, remat_group_size=remat).to(device),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    peak = matmul_peak_gflops(device)
    print(f"dense matmul peak: {peak['peak']:.1f} GFLOP/s")
    layers = _layers(args.width, args.heads, device, args.remat)
    rows = []
    for batch in args.batches:
        for length in args.lengths:
            x = torch.randn(batch, length, args.width, device=device)
            rec: dict[str, Any] = {"batch": batch, "length": length}
            for name, layer in layers.items():
                layer.train()

                def fwd(layer=layer, x=x) -> None:
                    with torch.no_grad():
                        layer(x)

                def fwd_bwd(layer=layer, x=x) -> None:
                    out, _ = layer(x)
                    out.float().square().mean().backward()

                rec[f"{name}_fwd_s"] = time_fn(fwd, reps=args.reps, device=device)["min_s"]
                rec[f"{name}_fwdbwd_s"] = time_fn(fwd_bwd, reps=args.reps, device=device)["min_s"]
                layer.zero_grad(set_to_none=True)
            flops = ttt_linear_forward_flops(batch, length, args.width, args.heads, 16)
            rec["ttt_linear_fwd_gflops"] = flops / rec["ttt_linear_fwd_s"] / 1e9
            rec["ttt_linear_fwd_frac_of_peak"] = rec["ttt_linear_fwd_gflops"] / peak["peak"]
            for name in ("ttt_linear", "ttt_mlp"):
                rec[f"{name}_fwdbwd_vs_attention"] = rec[f"{name}_fwdbwd_s"] / rec["attention_fwdbwd_s"]
                rec[f"{name}_fwd_vs_attention"] = rec[f"{name}_fwd_s"] / rec["attention_fwd_s"]
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}, flush=True)
            rows.append(rec)

    memory = []
    x = torch.randn(1, args.memory_length, args.width, device=device)
    for remat in (0, args.remat or 16):
        for name, layer in _layers(args.width, args.heads, device, remat).items():
            if name == "attention" and remat:
                continue
            with SavedTensorMeter() as meter:
                out, _ = layer(x)
            del out
            memory.append({"layer": name, "remat_group_size": remat, "length": args.memory_length,
                           "saved_for_backward_MiB": meter.bytes / 2**20})
            print(memory[-1], flush=True)
    return {"machine": machine_info(device), "matmul_peak_gflops": peak, "width": args.width,
            "heads": args.heads, "mini_batch_size": 16, "results": rows, "memory": memory}


def profile_layers(width: int, heads: int, length: int, device: torch.device, top: int = 12) -> str:
    """Per-operator CPU-time profile of one forward+backward of each TTT layer (markdown)."""
    from torch.profiler import ProfilerActivity, profile

    parts = []
    x = torch.randn(1, length, width, device=device)
    for name, layer in _layers(width, heads, device, 0).items():
        if name == "attention":
            continue
        for _ in range(2):
            out, _ = layer(x)
            out.square().mean().backward()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out, _ = layer(x)
            out.square().mean().backward()
        rows = []
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        for e in events[:top]:
            rows.append([e.key, e.count, e.self_cpu_time_total / 1e3, 100 * e.self_cpu_time_total / total])
        parts.append(f"**{name}**, batch 1, length {length}, forward+backward "
                     f"(total self CPU {total / 1e3:.0f} ms):\n\n"
                     + markdown_table(["op", "calls", "self ms", "%"], rows))
    return "\n\n".join(parts)


def table(payload: dict[str, Any]) -> str:
    rows = []
    for r in payload["results"]:
        rows.append([r["batch"], r["length"], r["attention_fwd_s"], r["ttt_linear_fwd_s"], r["ttt_mlp_fwd_s"],
                     r["attention_fwdbwd_s"], r["ttt_linear_fwdbwd_s"], r["ttt_mlp_fwdbwd_s"],
                     r["ttt_linear_fwdbwd_vs_attention"], r["ttt_mlp_fwdbwd_vs_attention"],
                     r["ttt_linear_fwd_frac_of_peak"]])
    head = ["batch", "length", "attn fwd s", "TTT-Lin fwd s", "TTT-MLP fwd s", "attn f+b s", "TTT-Lin f+b s",
            "TTT-MLP f+b s", "Lin/attn f+b", "MLP/attn f+b", "Lin fwd / matmul peak"]
    t = markdown_table(head, rows)
    mem = markdown_table(["layer", "remat group", "length", "saved for backward (MiB)"],
                         [[m["layer"], m["remat_group_size"], m["length"], m["saved_for_backward_MiB"]]
                          for m in payload["memory"]])
    text = f"{t}\n\nMatmul peak: {payload['matmul_peak_gflops']['peak']:.1f} GFLOP/s\n\n{mem}"
    if payload.get("profile"):
        text += "\n\n" + payload["profile"]
    return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--remat", type=int, default=0, help="remat group size for the timed TTT layers (0: off)")
    p.add_argument("--memory-length", type=int, default=8192)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--profile-length", type=int, default=2048,
                   help="operator profile at this length (0: off)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    payload = run(args)
    if args.profile_length:
        payload["profile"] = profile_layers(args.width, args.heads, args.profile_length,
                                            torch.device(args.device))
    payload["command"] = "python -m ttt.benchmarks.layer_speed " + " ".join(argv if argv is not None
                                                                             else sys.argv[1:])
    text = table(payload)
    write_results("layer_speed", payload, text, args.out)
    print(text)
    return payload


if __name__ == "__main__":
    main()
