"""Decode speed: ms per generated token after long prompts, TTT (constant-size state) vs Llama (KV cache)
and Mamba / Mamba-2 (constant-size state).

For a 125m-size TTT-Linear and TTT-MLP language model, a ``transformers`` LlamaForCausalLM of the same
size (width 768, 12 layers, 12 heads, FFN 2048, vocab 32000) and ``transformers`` Mamba / Mamba-2 models
of the same width and about the same parameter count (:mod:`ttt.models.registry`), at batch 1 and 16,
after prompts of 1k, 4k, 16k and 32k tokens: the prefill throughput (tokens/s, the prompt fed in chunks
through the cache) and the decode time per token (one token per forward with the cache). The decode
cost and cache size of TTT and Mamba should be flat in the prompt length; Llama's grow with it.

Mamba (v1) takes its prompt in one forward: ``transformers``' Mamba layer starts its sequence scan from a
zero state, so a cache cannot be continued with more than one token at a time (Mamba-2's can).

Settings that would not fit are skipped and reported as such (``status: "skipped"`` with the reason):
a Llama KV cache above ``--max-cache-gb``, Mamba's one-pass prefill working memory above
``--max-prefill-gb``, or a prefill whose time, extrapolated from the previous prompt length of the same
model and batch, exceeds ``--max-prefill-s``.

    python -m ttt.benchmarks.decode_speed                                   # the full run (slow on CPU)
    python -m ttt.benchmarks.decode_speed --preset tiny --prompt-lens 64 128 --batches 1 2 \
        --decode-tokens 4 --out /tmp/x                                      # smoke
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..models import CACHE_KEY, TTTCache, registry
from ..models.presets import get_config
from .common import RESULTS_DIR, machine_info, markdown_table, sync, write_results

MODELS = ("ttt-linear", "ttt-mlp", "llama", "mamba", "mamba2")
#: models whose cache takes a prompt in one forward only (see the module docstring)
ONE_PASS_PREFILL = ("mamba",)
#: Mamba's one-pass prefill holds about this many ``[batch, length, d_inner, d_state]`` tensors at its peak
#: (its PyTorch selective scan; measured 7.9x / 7.4x at 1k / 4k tokens for the 125m size)
MAMBA_PREFILL_TENSORS = 8
#: how a prefill's time grows with the prompt, for the skip estimate: linear for the chunked
#: constant-state models, faster for attention and for Mamba's one-pass scan (6.9 s -> 49 s from 1k to 4k)
PREFILL_EXPONENT = {"ttt-linear": 1.0, "ttt-mlp": 1.0, "mamba2": 1.0, "llama": 1.5, "mamba": 1.5}


def build_model(kind: str, preset: str, dtype: torch.dtype, device: str, max_len: int) -> nn.Module:
    """A randomly initialised model of the preset's size: TTT (linear / mlp), Llama with the same shape, or
    Mamba / Mamba-2 of the same width and about the same parameter count."""
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; choose from {MODELS}")
    arch = "transformer" if kind == "llama" else kind
    vocab = get_config(preset).vocab_size
    model = registry.build_model(arch, preset, vocab, max(max_len, 2048), match=False)
    return model.to(device=device, dtype=dtype).eval()


def _new_cache(kind: str, model: nn.Module) -> Any:
    if kind.startswith("ttt"):
        return TTTCache(model.config.num_hidden_layers)
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _cache_bytes(cache: Any) -> int:
    if isinstance(cache, TTTCache):
        return cache.memory_bytes()
    total = 0
    for layer in getattr(cache, "layers", []):  # KV layers (keys, values); Mamba layers (dicts of states)
        for value in vars(layer).values():
            for t in value.values() if isinstance(value, dict) else (value,):
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def mamba_prefill_bytes(model: nn.Module, batch: int, length: int, dtype: torch.dtype) -> int:
    """Working memory of a Mamba model's one-pass prefill of ``length`` tokens (about
    ``MAMBA_PREFILL_TENSORS`` tensors of ``[batch, length, d_inner, d_state]``)."""
    cfg = model.config
    elem = torch.empty((), dtype=dtype).element_size()
    return MAMBA_PREFILL_TENSORS * batch * length * cfg.intermediate_size * cfg.state_size * elem


def prefill_chunk(kind: str, prompt_len: int, chunk: int) -> int:
    """Prompt tokens per prefill forward (at most): ``chunk``, or the whole prompt for
    :data:`ONE_PASS_PREFILL` models."""
    return prompt_len if kind in ONE_PASS_PREFILL else chunk


def prefill(kind: str, model: nn.Module, prompt: Tensor, chunk: int) -> tuple[Any, Tensor]:
    """Feed ``prompt [B, L]`` through a new cache, :func:`prefill_chunk` tokens per forward; returns
    ``(cache, logits of the last token [B, vocab])``."""
    chunk = prefill_chunk(kind, prompt.shape[1], chunk)
    cache = _new_cache(kind, model)
    logits = None
    for start in range(0, prompt.shape[1], chunk):
        out = model(input_ids=prompt[:, start:start + chunk], **{CACHE_KEY: cache}, use_cache=True,
                    logits_to_keep=1)
        cache, logits = getattr(out, CACHE_KEY), out.logits
    return cache, logits[:, -1]


def decode_step(model: nn.Module, token: Tensor, cache: Any) -> tuple[Any, Tensor]:
    """One token ``[B, 1]`` through the cache; returns ``(cache, its logits [B, vocab])``."""
    out = model(input_ids=token, **{CACHE_KEY: cache}, use_cache=True)
    return getattr(out, CACHE_KEY), out.logits[:, -1]


def kv_cache_bytes(model: nn.Module, batch: int, length: int, dtype: torch.dtype) -> int:
    """Bytes of a full KV cache of ``length`` tokens for a Llama model."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * batch * length * cfg.num_key_value_heads * head_dim * elem


@torch.inference_mode()
def measure(kind: str, model: nn.Module, batch: int, prompt_len: int, decode_tokens: int, chunk: int,
            device: str, seed: int = 0) -> dict[str, Any]:
    """Prefill a random prompt in chunks, then decode ``decode_tokens`` tokens greedily; time both."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(device)
    sync(device)
    t0 = time.perf_counter()
    cache, logits = prefill(kind, model, prompt, chunk)
    sync(device)
    prefill_s = time.perf_counter() - t0
    bytes_after_prefill = _cache_bytes(cache)
    token = logits.argmax(-1, keepdim=True)
    times = []
    for step in range(decode_tokens + 2):  # two warm-up steps
        sync(device)
        t1 = time.perf_counter()
        cache, logits = decode_step(model, token, cache)
        token = logits.argmax(-1, keepdim=True)
        sync(device)
        if step >= 2:
            times.append(time.perf_counter() - t1)
    return {
        "prefill_chunk": prefill_chunk(kind, prompt_len, chunk),
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": batch * prompt_len / prefill_s,
        "decode_ms_per_token": 1000 * statistics.median(times),
        "decode_ms_per_token_mean": 1000 * statistics.fmean(times),
        "cache_bytes": bytes_after_prefill,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    lens = sorted(args.prompt_lens)
    max_len = max(lens) + args.decode_tokens + 4
    records: list[dict[str, Any]] = []
    for kind in args.models:
        torch.manual_seed(0)
        model = build_model(kind, args.preset, dtype, args.device, max_len)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{kind}: {n_params / 1e6:.1f}M parameters", flush=True)
        for batch in args.batches:
            prev: tuple[int, float] | None = None
            for length in lens:
                rec: dict[str, Any] = {"model": kind, "params": n_params, "batch": batch,
                                       "prompt_len": length}
                reason = None
                if kind == "llama":
                    need = kv_cache_bytes(model, batch, length + args.decode_tokens + 2, dtype)
                    if need > args.max_cache_gb * 2**30:
                        reason = (f"KV cache would need {need / 2**30:.1f} GiB > --max-cache-gb "
                                  f"{args.max_cache_gb}")
                if kind in ONE_PASS_PREFILL:
                    need = mamba_prefill_bytes(model, batch, length, dtype)
                    if need > args.max_prefill_gb * 2**30:
                        reason = (f"one-pass prefill would need ~{need / 2**30:.1f} GiB > --max-prefill-gb "
                                  f"{args.max_prefill_gb}")
                if reason is None and prev is not None:
                    exponent = PREFILL_EXPONENT[kind]
                    estimate = prev[1] * (length / prev[0]) ** exponent
                    if estimate > args.max_prefill_s:
                        reason = (f"prefill estimated at {estimate:.0f} s (from {prev[0]} tokens) > "
                                  f"--max-prefill-s {args.max_prefill_s}")
                if reason is not None:
                    rec.update(status="skipped", reason=reason)
                else:
                    try:
                        rec.update(measure(kind, model, batch, length, args.decode_tokens, args.prefill_chunk,
                                           args.device))
                        rec["status"] = "ok"
                        prev = (length, rec["prefill_s"])
                    except (RuntimeError, MemoryError) as err:  # out of memory
                        rec.update(status="skipped", reason=f"failed: {type(err).__name__}: {str(err)[:200]}")
                records.append(rec)
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}, flush=True)
                gc.collect()
                if torch.device(args.device).type == "cuda":
                    torch.cuda.empty_cache()
        del model
        gc.collect()
    return {
        "benchmark": "decode_speed",
        "machine": machine_info(args.device),
        "settings": {"preset": args.preset, "dtype": args.dtype, "prompt_lens": lens, "batches": args.batches,
                     "decode_tokens": args.decode_tokens, "prefill_chunk": args.prefill_chunk,
                     "max_cache_gb": args.max_cache_gb, "max_prefill_gb": args.max_prefill_gb,
                     "max_prefill_s": args.max_prefill_s},
        "results": records,
    }


def table(payload: dict[str, Any]) -> str:
    """Markdown: one row per (model, batch, prompt length)."""
    rows = []
    for r in payload["results"]:
        if r["status"] == "ok":
            one_pass = r["model"] in ONE_PASS_PREFILL
            rows.append([r["model"], r["batch"], r["prompt_len"], r["decode_ms_per_token"],
                         r["prefill_tokens_per_s"], r["cache_bytes"] / 2**20,
                         "ok (prompt in one forward)" if one_pass else "ok"])
        else:
            rows.append([r["model"], r["batch"], r["prompt_len"], "-", "-", "-", "skipped: " + r["reason"]])
    return markdown_table(["model", "batch", "prompt tokens", "decode ms/token", "prefill tokens/s",
                           "cache MiB", "status"], rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--preset", default="125m", help="model size (ttt.models.presets name)")
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--decode-tokens", type=int, default=32, help="timed decode steps (after 2 warm-up steps)")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens per prefill forward")
    p.add_argument("--max-cache-gb", type=float, default=24.0,
                   help="skip Llama settings whose KV cache is larger")
    p.add_argument("--max-prefill-gb", type=float, default=16.0,
                   help="skip Mamba settings whose one-pass prefill would need more working memory")
    p.add_argument("--max-prefill-s", type=float, default=1800.0,
                   help="skip settings whose extrapolated prefill time is longer")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR)
    p.add_argument("--name", default="decode_speed", help="result files' name (<name>.json / <name>.md)")
    args = p.parse_args(argv)
    if min(args.prompt_lens) < 1 or min(args.batches) < 1 or args.prefill_chunk < 1 or args.decode_tokens < 1:
        p.error("prompt lengths, batches, --prefill-chunk and --decode-tokens must be >= 1")
    payload = run(args)
    payload["command"] = "python -m ttt.benchmarks.decode_speed " + " ".join(
        argv if argv is not None else sys.argv[1:])
    text = table(payload)
    write_results(args.name, payload, text, args.out)
    print(text)
    return payload


if __name__ == "__main__":
    main()
