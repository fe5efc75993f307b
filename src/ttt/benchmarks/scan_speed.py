"""The scan alone (``ttt.ops.scan``), backend against backend: where the compiled kernels stand.

Times each backend's scan forward (no checkpoints) and forward+backward (checkpoints, reverse scan)
at the layer benchmark's shape (12 heads of 64, mini-batch 16, batch 1) in interleaved rounds in one
process, next to the dense-matmul peak measured in the same rounds, and reports each backend's
matmul FLOP rate as a fraction of that peak. The kernels' own efficiency, without the layer around them.

    python -m ttt.benchmarks.scan_speed                       # 2k and 8k tokens, TTT-Linear and TTT-MLP
    python -m ttt.benchmarks.scan_speed --lengths 256 --rounds 1 --backends cpp   # smoke
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..ops.scan import BACKENDS, default_group, get_backend
from .common import RESULTS_DIR, interleaved_rounds, machine_info, markdown_table, write_results


def scan_inputs(rows: int, n_mb: int, mb: int, f: int, mlp: bool, seed: int = 0) -> tuple[Any, ...]:
    """Scan inputs shaped like a layer's (fresh state, every mini-batch complete), fp32."""
    g = torch.Generator().manual_seed(seed)
    h = 4 * f if mlp else f

    def r(*shape: int, scale: float = 1.0) -> Tensor:
        return scale * torch.randn(*shape, generator=g)

    k, q, s = r(rows, n_mb, mb, f), r(rows, n_mb, mb, f), r(rows, n_mb, mb, f)
    lr = torch.rand(rows, n_mb, mb, generator=g) * 0.01
    coef = 1.0 / torch.arange(1, mb + 1, dtype=torch.float32)
    shapes = [(f, h), (1, h), (h, f), (1, f)] if mlp else [(f, f), (1, f)]
    weights = [r(rows, *sh, scale=0.02) for sh in shapes]
    state = tuple(weights + [torch.zeros_like(w) for w in weights])
    return k, q, s, lr, coef, 1 + r(rows, f, scale=0.1), torch.full((rows,), n_mb), state


def scan_forward_flops(rows: int, n_mb: int, mb: int, f: int, mlp: bool) -> float:
    """Matmul FLOPs of the scan forward (elementwise work not counted)."""
    if mlp:  # Z1, Z2, G2 W2^T, Zbar1, Zbar2, two weight updates; Q K^T, Xbar2 X2^T, A1 G1, A2 G2
        per = 7 * 2 * mb * f * 4 * f + 2 * 2 * mb * mb * (f + 4 * f)
    else:  # K W, Q W, K^T G; Q K^T, A G
        per = 3 * 2 * mb * f * f + 2 * 2 * mb * mb * f
    return float(rows * n_mb * per)


def run(lengths: list[int], backends: list[str], rounds: int, heads: int, head_dim: int, mb: int
        ) -> list[dict[str, Any]]:
    impls = {}
    for name in backends:
        impl = get_backend(name)
        if impl is None:
            print(f"skipping scan backend {name!r}: unavailable")
        else:
            impls[name] = impl
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    cases: dict[tuple, Callable[[], Any]] = {("peak",): lambda: a @ b}
    for length in lengths:
        n_mb = length // mb
        for mlp in (False, True):
            args = scan_inputs(heads, n_mb, mb, head_dim, mlp)
            group = default_group(n_mb)
            for name, impl in impls.items():
                def fwd(impl=impl, args=args, group=group) -> None:
                    impl.forward(*args, group, False)

                def fwd_bwd(impl=impl, args=args, group=group) -> None:
                    z, final, saved = impl.forward(*args, group, True)
                    impl.backward(*args[:7], saved, group, torch.ones_like(z),
                                  tuple(torch.zeros_like(t) for t in final))

                cases[(length, mlp, name, "fwd")] = fwd
                cases[(length, mlp, name, "fwd+bwd")] = fwd_bwd
    times = interleaved_rounds(cases, rounds)  # its warm-up call is the compiled backends' first call
    best = {key: min(v) for key, v in times.items()}
    peak = 2 * 2048**3 / best[("peak",)] / 1e9
    print(f"dense matmul peak: {peak:.1f} GFLOP/s")
    rows = []
    for length in lengths:
        for mlp in (False, True):
            flops = scan_forward_flops(heads, length // mb, mb, head_dim, mlp)
            for phase in ("fwd", "fwd+bwd"):
                rec: dict[str, Any] = {"length": length, "layer": "ttt_mlp" if mlp else "ttt_linear",
                                       "phase": phase}
                for name in impls:
                    t = best[(length, mlp, name, phase)]
                    rec[f"{name}_ms"] = 1e3 * t
                    if phase == "fwd":
                        rec[f"{name}_frac_of_peak"] = flops / t / 1e9 / peak
                base = next(iter(impls))
                for name in list(impls)[1:]:
                    rec[f"{name}_vs_{base}"] = rec[f"{name}_ms"] / rec[f"{base}_ms"]
                print({k: round(v, 3) if isinstance(v, float) else v for k, v in rec.items()}, flush=True)
                rows.append(rec)
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--backends", nargs="+", default=["torch", "cpp"], choices=BACKENDS)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--mini-batch", type=int, default=16)
    p.add_argument("--out", default=str(RESULTS_DIR), help="folder for scan_speed.{json,md}")
    raw = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(raw)
    bad = [n for n in args.lengths if n % args.mini_batch or n <= 0]
    if bad:
        p.error(f"lengths must be positive multiples of the mini-batch size {args.mini_batch}, got {bad}")
    rows = run(args.lengths, args.backends, args.rounds, args.heads, args.head_dim, args.mini_batch)
    payload = {"benchmark": "scan_speed", "command": "python -m ttt.benchmarks.scan_speed " + " ".join(raw),
               "machine": machine_info("cpu"), "dtype": "float32", "heads": args.heads,
               "head_dim": args.head_dim, "mini_batch": args.mini_batch, "batch": 1, "results": rows}
    names = args.backends
    headers = ["layer", "length", "phase", *[f"{n} ms" for n in names],
               *[f"{n} / {names[0]}" for n in names[1:]], *[f"{n} fwd % of peak" for n in names]]
    table = markdown_table(headers, [
        [r["layer"], r["length"], r["phase"], *[r[f"{n}_ms"] for n in names],
         *[r[f"{n}_vs_{names[0]}"] for n in names[1:]],
         *[100 * r[f"{n}_frac_of_peak"] if f"{n}_frac_of_peak" in r else "-" for n in names]]
        for r in rows])
    print(table)
    write_results("scan_speed", payload, table, Path(args.out))
    return rows


if __name__ == "__main__":
    main()
