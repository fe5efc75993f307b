"""Shared helpers for the benchmark scripts (and the study's latency): timing, machine description,
result files."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ttt.util.files import atomic_write_text

RESULTS_DIR = Path("benchmarks/results")


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued device work (no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off inside (as ``timeit`` times), after one collection, so a
    timed call never pays for a collection of garbage that other code left; back on afterwards."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def interleaved_rounds(cands: dict[Any, Callable[[], Any]], rounds: int,
                       device: torch.device | str | None = None) -> dict[Any, list[float]]:
    """One warm-up call each, then ``rounds`` rounds of one timed call per candidate, in order (a shared
    machine's drifting speed affects all of them alike), each with the garbage collector paused
    (:func:`gc_paused`: a collection's cost lands on no candidate). Returns each candidate's seconds."""
    times: dict[Any, list[float]] = {name: [] for name in cands}
    for fn in cands.values():
        fn()
        sync(device)
    for _ in range(rounds):
        for name, fn in cands.items():
            with gc_paused():
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t0)
    return times


def time_fn(fn: Callable[[], Any], reps: int = 3, warmup: int = 1, device: torch.device | str | None = None,
            budget_s: float = 30.0) -> dict[str, float]:
    """Run ``fn`` ``warmup`` times, then up to ``reps`` timed times (fewer if a run exceeds ``budget_s``),
    each with the garbage collector paused (:func:`gc_paused`).

    Returns min / median seconds over the timed runs.
    """
    last = 0.0
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        sync(device)
        last = time.perf_counter() - t0
    times = []
    n = reps if last * reps <= budget_s else 1
    for _ in range(max(n, 1)):
        with gc_paused():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    return {"min_s": min(times), "median_s": statistics.median(times), "runs": len(times)}


def matmul_peak_gflops(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       sizes: Sequence[int] = (1024, 2048, 3072)) -> dict[str, float]:
    """Dense square-matmul throughput (GFLOP/s) measured now, on this device: the best over ``sizes``."""
    out = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t = time_fn(lambda a=a, b=b: a @ b, reps=5, device=device)
        out[str(n)] = 2 * n**3 / t["min_s"] / 1e9
    return {"per_size": out, "peak": max(out.values())}


def cpu_model(cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The CPU's model as the OS reports it (Linux: the first processor's ``model name``, family and model
    in ``cpuinfo``; ratios between workloads differ from one CPU generation to the next), or None."""
    try:
        with open(cpuinfo) as fh:
            lines = fh.read().split("\n\n", 1)[0].splitlines()
    except OSError:
        return None
    fields = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    name = fields.get("model name")
    if name is None:
        return None
    ids = [f"{k} {fields[k]}" for k in ("cpu family", "model") if k in fields]
    return f"{name} ({', '.join(ids)})" if ids else name


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_results(
    name: str, payload: dict[str, Any], table: str, out_dir: Path = RESULTS_DIR
) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` (the markdown table plus the command) atomically."""
    jpath, mpath = out_dir / f"{name}.json", out_dir / f"{name}.md"
    atomic_write_text(jpath, json.dumps(payload, indent=2) + "\n")
    cmd = payload.get("command", "")
    atomic_write_text(mpath, f"<!-- generated by: {cmd} -->\n{table}\n")
    return jpath, mpath


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class SavedTensorMeter:
    """Counts the bytes autograd saves for backward (unique storages): training activation memory."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        self.storages[st.data_ptr()] = st.nbytes()
        return t

    def __enter__(self) -> SavedTensorMeter:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())
