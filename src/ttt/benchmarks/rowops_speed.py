"""The model's compiled row ops against their PyTorch references, forward and forward+backward.

RMSNorm (every block, width ``D``), the TTT layer's post-norm with its ``gelu_tanh`` output gate (width
``D``) and the SwiGLU gate of the feed-forward network (width ``FFN``), on ``[1, L, width]`` fp32 CPU
tensors, each timed in interleaved rounds in one process: the reference (``ttt.ops.norm`` /
``ttt.ops.swiglu`` ``*_reference``, PyTorch ops and their autograd) and the compiled path the models use
(``rms_norm``, ``gated_layer_norm_``, ``swiglu``). "fwd" runs without autograd; "fwd+bwd" runs the
forward and a backward into all inputs.

    python -m ttt.benchmarks.rowops_speed                 # the committed run (2k and 8k tokens)
    python -m ttt.benchmarks.rowops_speed --lengths 256 --rounds 1 --out /tmp/r   # smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..ops.norm import gated_layer_norm_, gated_layer_norm_reference, rms_norm, rms_norm_reference
from ..ops.swiglu import swiglu, swiglu_reference
from .common import RESULTS_DIR, interleaved_rounds, machine_info, markdown_table, write_results


def _cases(length: int, width: int, ffn: int) -> dict[str, tuple[Callable, Callable, list[torch.Tensor]]]:
    """op -> (reference, compiled, inputs that get gradients)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    x, w, b, gate = r(1, length, width), r(width), r(width), r(1, length, width)
    up, gp = r(1, length, ffn), r(1, length, ffn)
    return {
        "rms_norm": (lambda a, c: rms_norm_reference(a, c), lambda a, c: rms_norm(a, c), [x, w]),
        "post_norm_gate": (lambda a, c, d, e: gated_layer_norm_reference(a, c, d, 1e-6, e),
                           lambda a, c, d, e: gated_layer_norm_(a, c, d, 1e-6, e), [x, w, b, gate]),
        "swiglu": (swiglu_reference, swiglu, [gp, up]),
    }


def run(lengths: list[int], width: int, ffn: int, rounds: int) -> list[dict[str, Any]]:
    rows = []
    for length in lengths:
        cands: dict[tuple[str, str, str], Callable[[], None]] = {}
        for op, (ref, fast, inputs) in _cases(length, width, ffn).items():
            for impl, fn in (("reference", ref), ("compiled", fast)):
                # the first input in its own buffer: the compiled post-norm writes over it at inference
                args = (inputs[0].clone(), *inputs[1:])

                def fwd(fn=fn, args=args) -> None:
                    with torch.no_grad():
                        fn(*args)

                leaves = [t.clone().requires_grad_() for t in inputs]
                dout = torch.randn_like(fn(*[t.detach() for t in leaves]))

                def fwd_bwd(fn=fn, leaves=leaves, dout=dout) -> None:
                    torch.autograd.backward(fn(*leaves), dout, inputs=leaves)
                    for t in leaves:
                        t.grad = None

                cands[(op, impl, "fwd")] = fwd
                cands[(op, impl, "fwd+bwd")] = fwd_bwd
        times = interleaved_rounds(cands, rounds)
        for (op, impl, mode), ts in times.items():
            if impl == "compiled":
                ref_ms = 1e3 * statistics.median(times[(op, "reference", mode)])
                ms = 1e3 * statistics.median(ts)
                rows.append({"op": op, "mode": mode, "length": length,
                             "width": ffn if op == "swiglu" else width, "reference_ms": ref_ms,
                             "compiled_ms": ms, "compiled_vs_reference": ms / ref_ms})
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--width", type=int, default=512, help="model width D (the training benchmark's)")
    p.add_argument("--ffn", type=int, default=1376, help="feed-forward width (the training benchmark's)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--out", default=str(RESULTS_DIR), help="folder for rowops_speed.{json,md}")
    raw = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(raw)
    if min(args.lengths) <= 0 or args.width <= 0 or args.ffn <= 0 or args.rounds <= 0:
        p.error("lengths, --width, --ffn and --rounds must be positive")
    rows = run(args.lengths, args.width, args.ffn, args.rounds)
    command = "python -m ttt.benchmarks.rowops_speed " + " ".join(raw)
    payload = {"benchmark": "rowops_speed", "command": command.strip(),
               "machine": machine_info("cpu"), "dtype": "float32", "batch": 1, "rounds": args.rounds,
               "results": rows}
    headers = ["op", "mode", "tokens", "width", "reference ms", "compiled ms", "compiled / reference"]
    table = markdown_table(headers, [[r["op"], r["mode"], r["length"], r["width"], r["reference_ms"],
                                      r["compiled_ms"], r["compiled_vs_reference"]] for r in rows])
    print(table)
    write_results("rowops_speed", payload, table, Path(args.out))
    return rows


if __name__ == "__main__":
    main()
