"""GPU speed of the Triton TTT kernels, side by side with the PyTorch scan and HF Llama (SDPA).

One short run (about 5 minutes on one H100/H200) measures, at 2k / 8k / 32k tokens (batch 1):

* layer: one TTT-Linear / TTT-MLP layer (width 768, 12 heads, mini-batch 16) on the ``triton`` and
  ``torch`` scan backends, and a causal SDPA attention layer: forward and forward+backward;
* model (125m preset): forward, training step (bf16 autocast, AdamW) and prefill, for TTT-Linear /
  TTT-MLP on both backends and Llama (SDPA) of the same shape; decode ms/token after the prefill;
* flash-linear-attention's TTT-Linear op at the layer shape, if ``fla`` is importable.

The PyTorch backend is measured at 2k and 8k only (at 32k it alone would take minutes). Writes
``benchmarks/results/gpu.{json,md}``. Without a CUDA device it prints one line and exits.

    python -m ttt.benchmarks.gpu            # or: ttt bench gpu
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..ops.scan import ENV_VAR
from .common import RESULTS_DIR, machine_info, markdown_table, time_fn, write_results

LENGTHS = (2048, 8192, 32768)
TORCH_MAX_LEN = 8192


def _set_backend(name: str | None) -> None:
    if name is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = name


def _timed(fn, reps: int) -> float | str:
    """Median seconds, or the error (out of memory, ...) as a short string."""
    try:
        return time_fn(fn, reps=reps, warmup=1, device="cuda", budget_s=20.0)["median_s"]
    except Exception as exc:  # noqa: BLE001 - one failed cell must not lose the whole run
        torch.cuda.empty_cache()
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def layer_rows(lengths: list[int], reps: int) -> list[dict[str, Any]]:
    from ..layers import TTTMLP, TTTLinear
    from .layer_speed import CausalSelfAttention

    width, heads = 768, 12
    layers = {"attention": (CausalSelfAttention(width, heads), None)}
    for backend in ("triton", "torch"):
        layers[f"ttt_linear_{backend}"] = (TTTLinear(width, heads), backend)
        layers[f"ttt_mlp_{backend}"] = (TTTMLP(width, heads), backend)
    rows = []
    for length in lengths:
        x = torch.randn(1, length, width, device="cuda")
        for name, (layer, backend) in layers.items():
            if backend == "torch" and length > TORCH_MAX_LEN:
                continue
            layer.to("cuda").train()
            _set_backend(backend)

            def fwd(layer=layer, x=x) -> None:
                with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                    layer(x)

            def fwd_bwd(layer=layer, x=x) -> None:
                with torch.autocast("cuda", torch.bfloat16):
                    out = layer(x)
                out = out[0] if isinstance(out, tuple) else out
                out.float().square().mean().backward()

            rows.append({"part": "layer", "model": name, "length": length,
                         "fwd_s": _timed(fwd, reps), "fwd_bwd_s": _timed(fwd_bwd, reps)})
            layer.zero_grad(set_to_none=True)
            print(rows[-1], flush=True)
    _set_backend(None)
    rows += fla_rows(lengths, reps)
    return rows


def fla_rows(lengths: list[int], reps: int) -> list[dict[str, Any]]:
    """flash-linear-attention's chunked TTT-Linear op at the layer's shape (12 heads x 64), if installed."""
    try:
        from fla.ops.ttt import chunk_ttt_linear
    except Exception as exc:  # noqa: BLE001
        return [{"part": "layer", "model": "fla_ttt_linear", "error": f"not importable ({exc})"[:120]}]
    rows = []
    for length in lengths:
        q, k, v = (torch.randn(1, length, 12, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        w = (0.02 * torch.randn(12, 64, 64, device="cuda")).requires_grad_()
        b = torch.zeros(12, 1, 64, device="cuda", requires_grad=True)
        eta = torch.full((1, length, 12, 1), 0.1, device="cuda", dtype=torch.bfloat16, requires_grad=True)

        def run(q=q, k=k, v=v, w=w, b=b, eta=eta):
            return chunk_ttt_linear(q, k, v, w, b, eta, mini_batch_size=16)[0]

        def fwd() -> None:
            with torch.no_grad():
                run()

        def fwd_bwd() -> None:
            run().float().square().mean().backward()

        rows.append({"part": "layer", "model": "fla_ttt_linear", "length": length,
                     "fwd_s": _timed(fwd, reps), "fwd_bwd_s": _timed(fwd_bwd, reps)})
        print(rows[-1], flush=True)
    return rows


def model_rows(lengths: list[int], reps: int, decode_tokens: int) -> list[dict[str, Any]]:
    from .decode_speed import build_model
    from .decode_speed import measure as measure_decode

    rows = []
    variants = [("llama", None), ("ttt-linear", "triton"), ("ttt-mlp", "triton"), ("ttt-linear", "torch"),
                ("ttt-mlp", "torch")]
    for kind, backend in variants:
        model = build_model(kind, "125m", torch.float32, "cuda", max(lengths))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        name = kind if backend is None else f"{kind}_{backend}"
        _set_backend(backend)
        for length in lengths:
            if backend == "torch" and length > TORCH_MAX_LEN:
                continue
            ids = torch.randint(0, model.config.vocab_size, (1, length), device="cuda")

            def forward(model=model, ids=ids) -> None:
                model.eval()
                with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                    model(input_ids=ids, use_cache=False, logits_to_keep=1)

            def train_step(model=model, ids=ids, opt=opt) -> None:
                model.train()
                with torch.autocast("cuda", torch.bfloat16):
                    logits = model(input_ids=ids, use_cache=False).logits
                loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            rec: dict[str, Any] = {"part": "model", "model": name, "length": length,
                                   "fwd_s": _timed(forward, reps), "train_step_s": _timed(train_step, reps)}
            try:
                model.eval()
                with torch.autocast("cuda", torch.bfloat16):
                    d = measure_decode(kind, model, 1, length, decode_tokens, length, "cuda")
                rec["prefill_s"], rec["decode_ms_per_token"] = d["prefill_s"], d["decode_ms_per_token"]
            except Exception as exc:  # noqa: BLE001
                rec["prefill_s"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            rows.append(rec)
            print(rec, flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        del model, opt
        gc.collect()
        torch.cuda.empty_cache()
    _set_backend(None)
    return rows


def table(payload: dict[str, Any]) -> str:
    def cell(v: Any) -> Any:
        return v if v is not None else "-"

    lay = [r for r in payload["results"] if r["part"] == "layer" and "length" in r]
    mod = [r for r in payload["results"] if r["part"] == "model"]
    t1 = markdown_table(["layer", "length", "fwd s", "fwd+bwd s"],
                        [[r["model"], r["length"], cell(r.get("fwd_s")), cell(r.get("fwd_bwd_s"))]
                         for r in lay])
    t2 = markdown_table(["125m model", "length", "fwd s", "train step s", "prefill s", "decode ms/token"],
                        [[r["model"], r["length"], cell(r.get("fwd_s")), cell(r.get("train_step_s")),
                          cell(r.get("prefill_s")), cell(r.get("decode_ms_per_token"))] for r in mod])
    return f"{t1}\n\n{t2}"


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the benchmark (see the module docstring); returns the payload, or None without a GPU."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--skip-model", action="store_true", help="layers only")
    p.add_argument("--out", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("ttt.benchmarks.gpu: no CUDA device on this machine; nothing measured.")
        return None
    from ..ops.scan import backend_status

    status = backend_status()
    torch.manual_seed(0)
    results = layer_rows(args.lengths, args.reps)
    if not args.skip_model:
        results += model_rows(args.lengths, args.reps, args.decode_tokens)
    cmd = "python -m ttt.benchmarks.gpu " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"machine": machine_info("cuda"), "backends": status, "results": results, "command": cmd}
    text = table(payload)
    write_results("gpu", payload, text, Path(args.out))
    print(text)
    return payload


if __name__ == "__main__":
    main()
