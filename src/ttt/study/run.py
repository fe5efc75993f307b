"""Running the comparison study: train every architecture (or reuse its finished run), evaluate, report.

:func:`run_study` trains every architecture on the same data, context length and number of training
tokens, with parameter counts matched by :func:`ttt.models.registry.match_size`; then evaluates each on
the same validation windows and writes the report (:mod:`ttt.study.report`), plus::

    <out>/samples.md              a text sample from every architecture (same prompt, seed)
    <out>/runs/<arch>/            the training run (checkpoints, metrics) and study_result.json

Interrupted studies resume: a run whose ``study_result.json`` matches the study settings is reused; an
interrupted run restarts from its newest checkpoint (the trainer's resume). Training goes through a
:class:`StudyBackend`: :class:`TrainerBackend` (:mod:`ttt.data` + :mod:`ttt.training`) by default; tests
pass a faster one.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ttt.benchmarks.common import time_fn
from ttt.data import DataBundle, DataConfig, DataError, prepare_data
from ttt.evaluation.generation import generate_text
from ttt.evaluation.loading import load_model
from ttt.evaluation.metrics import (
    EvaluationError,
    document_windows,
    evaluate,
    iter_documents,
    unigram_baseline,
)
from ttt.models.registry import ARCH_LABELS
from ttt.training import CheckpointError, ConfigError, Trainer, load_config
from ttt.training.checkpoint import latest_checkpoint
from ttt.util.device import pick_device
from ttt.util.files import atomic_write_json, atomic_write_text

from .config import StudyConfig, StudyError, check_archs
from .report import fmt, results_table, samples_markdown, tokens_label, write_report

Log = Callable[[str], None]


@dataclass
class TrainOutcome:
    """A finished training run."""

    model: torch.nn.Module
    curve: list[tuple[int, float]]  # (training tokens seen, validation loss)
    tokens: int  # training tokens seen
    tokens_per_s: float  # training throughput
    train_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class StudyBackend(Protocol):
    """What the study needs from data and training."""

    def prepare(self, cfg: StudyConfig, out_dir: Path) -> DataBundle:
        """Tokenize the corpus once for all runs."""
        ...

    def train(self, arch: str, cfg: StudyConfig, run_dir: Path, data: DataBundle, log: Log) -> TrainOutcome:
        """Train ``arch`` (resuming from ``run_dir``'s newest checkpoint) and return the final model."""
        ...

    def load(self, arch: str, run_dir: Path) -> torch.nn.Module:
        """The trained model of a finished run."""
        ...


@dataclass
class StudyReport:
    """What :func:`run_study` produced."""

    results: dict[str, Any]
    table_markdown: str
    paths: dict[str, Path]


# ----------------------------------------------------------------------------------------------------
# the default backend: ttt.data + ttt.training
# ----------------------------------------------------------------------------------------------------


def trainer_overrides(arch: str, cfg: StudyConfig, run_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """The dotted :class:`ttt.training.TrainConfig` overrides of one study run."""
    tokens_per_step = cfg.batch_size * cfg.seq_len
    total_steps = max(1, math.ceil(cfg.train_tokens / tokens_per_step))
    eval_every = max(1, total_steps // max(cfg.num_evals, 1))
    out: dict[str, Any] = {
        "model.arch": arch,
        "model.size": cfg.size,
        "model.backbone": cfg.backbone,
        "model.overrides": dict(cfg.model_overrides),
        "data.source": cfg.data,
        "data.seq_len": cfg.seq_len,
        "data.cache_dir": str(cache_dir),
        "data.val_rows": cfg.curve_eval_windows,
        "data.tokenizer": cfg.tokenizer,
        "optim.lr": cfg.lr,
        "optim.weight_decay": cfg.weight_decay,
        "optim.warmup_steps": min(total_steps - 1, round(cfg.warmup_tokens / tokens_per_step)),
        "train.micro_batch_size": cfg.batch_size,
        "train.grad_accum": 1,
        "train.tokens": None,
        "train.steps": total_steps,
        "train.seed": cfg.seed,
        "train.device": cfg.device,
        "train.eval_every": eval_every,
        "train.log_every": max(1, eval_every // 4),
        "train.run_dir": str(run_dir),
        "checkpoint.every": eval_every,
        "checkpoint.keep": 1,
        "log.tensorboard": False,
        "log.csv": False,
        "log.progress": False,
    }
    return {**out, **cfg.training_overrides()}


def read_val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """``(tokens, val loss)`` records of ``run_dir/metrics.jsonl`` (last record per token count)."""
    points: dict[int, float] = {}
    f = run_dir / "metrics.jsonl"
    for line in f.read_text().splitlines() if f.exists() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a torn last line of an interrupted run
            continue
        if rec.get("split") == "val" and rec.get("loss") is not None:
            points[int(rec["tokens"])] = float(rec["loss"])
    return sorted(points.items())


class TrainerBackend:
    """Data from :func:`ttt.data.prepare_data`, training with :class:`ttt.training.Trainer`."""

    def prepare(self, cfg: StudyConfig, out_dir: Path) -> DataBundle:
        """Tokenize the corpus into ``out_dir/data`` (cached across runs and resumes)."""
        try:
            bundle = prepare_data(DataConfig(source=cfg.data, tokenizer=cfg.tokenizer, seq_len=cfg.seq_len),
                                  out_dir / "data")
        except (DataError, OSError) as e:
            raise StudyError(f"cannot prepare the study data: {e}") from None
        if bundle.val is None:
            raise StudyError("the study needs a validation split (val_fraction > 0)")
        return bundle

    def train(self, arch: str, cfg: StudyConfig, run_dir: Path, data: DataBundle, log: Log) -> TrainOutcome:
        """Train with the trainer; resumes from ``run_dir/checkpoints`` when it exists."""
        try:
            tcfg = load_config(None, trainer_overrides(arch, cfg, run_dir, run_dir.parent.parent / "data"))
            resume = latest_checkpoint(run_dir)
            if resume is not None:
                log(f"[{arch}] resuming from {resume}")
            trainer = Trainer(tcfg, resume=resume, log=lambda text: log(f"[{arch}] {text}"))
            summary = trainer.fit()
        except (ConfigError, CheckpointError, DataError) as e:
            raise StudyError(f"{arch}: {e}") from None
        if summary["stop_reason"] == "signal":
            raise KeyboardInterrupt
        return TrainOutcome(model=trainer.raw_model, curve=read_val_curve(run_dir),
                            tokens=int(summary["tokens"]), tokens_per_s=float(summary["tokens_per_s"]),
                            train_seconds=float(summary["elapsed_s"]), extra={"summary": summary})

    def load(self, arch: str, run_dir: Path) -> torch.nn.Module:
        """The final model saved by a finished run."""
        return load_model(run_dir).model


# ----------------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def measure_latencies(models: dict[str, torch.nn.Module], vocab_size: int, prefill_len: int,
                      decode_prompt: int = 128, decode_tokens: int = 32, rounds: int = 3) -> dict[str, Any]:
    """Prefill latency of one ``prefill_len`` sequence and decode latency per token (batch 1, ms) of
    every model, timed side by side: each round times every model once, in turn (after one untimed
    warm-up each), and the result is the median over ``rounds``, so a shared machine's drifting speed
    affects all models alike.

    Decode time per token is ``(t(prompt + 1 + n tokens) - t(prompt + 1 token)) / n`` with the model's
    cache (``generate``, greedy), so the prompt's prefill cancels out.

    Returns:
        name -> ``{"prefill_ms", "prefill_len", "decode_ms_per_token", "rounds"}``.
    """
    gen0 = torch.Generator().manual_seed(0)
    ids_cpu = torch.randint(0, vocab_size, (1, prefill_len), generator=gen0)
    prompt_len = max(1, min(decode_prompt, prefill_len))

    def timings(model: torch.nn.Module) -> tuple[float, float]:
        device = next(model.parameters()).device
        ids = ids_cpu.to(device)
        prompt = ids[:, :prompt_len]

        def gen(n: int) -> float:
            t = time_fn(lambda: model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                               max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                               use_cache=True, pad_token_id=0),
                        reps=1, warmup=0, device=device)
            return t["median_s"]

        prefill = time_fn(lambda: model(input_ids=ids, use_cache=False), reps=1, warmup=0,
                          device=device)["median_s"]
        return prefill, max(gen(decode_tokens + 1) - gen(1), 0.0) / decode_tokens

    for model in models.values():  # warm-up: first calls allocate, build kernels, fill caches
        model.eval()
        timings(model)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for _ in range(max(1, rounds)):
        for name, model in models.items():
            samples[name].append(timings(model))
    out = {}
    for name, rows in samples.items():
        out[name] = {
            "prefill_ms": 1000 * statistics.median(r[0] for r in rows),
            "prefill_len": prefill_len,
            "decode_ms_per_token": 1000 * statistics.median(r[1] for r in rows),
            "rounds": len(rows),
        }
    return out


def _machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


# ----------------------------------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------------------------------


def _train_or_reuse(arch: str, cfg: StudyConfig, out: Path, data: DataBundle, backend: StudyBackend,
                    device: torch.device, log: Log) -> tuple[dict[str, Any], torch.nn.Module | None]:
    """The result of ``arch``'s run: reused when its settings match, else trained and evaluated."""
    run_dir = out / "runs" / arch
    result_file, stamp = run_dir / "study_result.json", run_dir / "study_fingerprint"
    fp = cfg.fingerprint(arch)
    if result_file.exists():
        prev = json.loads(result_file.read_text())
        if prev.get("fingerprint") == fp:
            log(f"[{arch}] reusing finished run ({result_file})")
            return prev, None
        log(f"[{arch}] settings changed since the saved run; training again")
        shutil.rmtree(run_dir)
    if run_dir.exists() and (not stamp.exists() or stamp.read_text().strip() != fp):
        log(f"[{arch}] discarding an unfinished run made with other settings")
        shutil.rmtree(run_dir)
    atomic_write_text(stamp, fp + "\n")
    log(f"[{arch}] training {tokens_label(cfg.train_tokens)} tokens at context {cfg.seq_len} ...")
    outcome = backend.train(arch, cfg, run_dir, data, log)
    model = outcome.model.to(device)
    try:
        ev = evaluate(model, data.val, cfg.seq_len, batch_size=max(1, cfg.batch_size),
                      max_windows=cfg.eval_windows, num_buckets=cfg.buckets, tokenizer=data.tokenizer)
    except EvaluationError as e:
        raise StudyError(str(e)) from None
    result = {
        "arch": arch,
        "fingerprint": fp,
        "params": model.num_parameters(),
        "params_non_embedding": model.num_parameters(exclude_embeddings=True),
        "tokens": outcome.tokens,
        "tokens_per_s": outcome.tokens_per_s,
        "train_seconds": outcome.train_seconds,
        "curve": [list(p) for p in outcome.curve],
        "eval": ev.to_dict(),
        "model_config": model.config.to_dict(),
        **({"train_extra": outcome.extra} if outcome.extra else {}),
    }
    atomic_write_json(result_file, result)
    log(f"[{arch}] val loss {ev.loss:.4f} nats/token, bits/byte {fmt(ev.bits_per_byte, '.4f')} "
        f"({ev.num_windows} windows of {cfg.seq_len}), training {outcome.tokens_per_s:,.0f} tokens/s")
    return result, model


def run_study(cfg: StudyConfig, out: str | Path, fresh: bool = False, backend: StudyBackend | None = None,
              log: Log | None = print) -> StudyReport:
    """Run (or resume) the study and write its report directory (see the module docstring)."""
    log = log or (lambda text: None)
    check_archs(cfg.archs)
    try:
        device = pick_device(cfg.device)
    except ConfigError as e:
        raise StudyError(str(e)) from None
    out = Path(out)
    if fresh and (out / "runs").exists():
        shutil.rmtree(out / "runs")
    out.mkdir(parents=True, exist_ok=True)
    backend = backend or TrainerBackend()
    t_start = time.perf_counter()
    data = backend.prepare(cfg, out)
    try:  # fail before any training if the context does not fit the validation documents
        document_windows(iter_documents(data.val), cfg.seq_len, max_windows=1)
    except EvaluationError as e:
        raise StudyError(str(e)) from None
    bpt = data.val.bytes_per_token
    unigram = unigram_baseline(data.train, data.val, len(data.tokenizer), bytes_per_token=bpt)
    log(f"unigram baseline: {unigram['loss']:.4f} nats/token, "
        f"{fmt(unigram['bits_per_byte'], '.4f')} bits/byte")
    runs: dict[str, Any] = {}
    models: dict[str, torch.nn.Module | None] = {}
    for arch in cfg.archs:
        runs[arch], models[arch] = _train_or_reuse(arch, cfg, out, data, backend, device, log)
    for arch in cfg.archs:  # every model, for the side-by-side speed measurement and the samples
        models[arch] = (models[arch] or backend.load(arch, out / "runs" / arch)).to(device).eval()
    log(f"timing prefill ({cfg.seq_len} tokens) and decode ({cfg.decode_tokens} tokens after "
        f"{cfg.decode_prompt}) of every model, batch 1, side by side ...")
    latency = measure_latencies(models, len(data.tokenizer), cfg.seq_len, cfg.decode_prompt,
                                cfg.decode_tokens, rounds=cfg.latency_rounds)
    for arch in cfg.archs:
        runs[arch]["latency"] = latency[arch]
        lat = latency[arch]
        log(f"[{arch}] prefill {lat['prefill_ms']:.1f} ms ({cfg.seq_len} tokens), decode "
            f"{lat['decode_ms_per_token']:.2f} ms/token (median of {lat['rounds']} rounds)")
    samples: list[dict[str, Any]] = []
    if cfg.sample_tokens > 0:
        for arch in cfg.archs:
            text = generate_text(models[arch], data.tokenizer, cfg.sample_prompt,
                                 max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=50, top_p=0.95,
                                 seed=cfg.seed)
            samples.append({"arch": arch, "label": ARCH_LABELS[arch], "prompt": cfg.sample_prompt,
                            "text": text})
        atomic_write_text(out / "samples.md", "# Samples\n\n" + samples_markdown(samples))
    results = {
        "config": asdict(cfg),
        "unigram": unigram,
        "eval_windows": next(iter(runs.values()))["eval"]["num_windows"],
        "runs": runs,
        "samples": samples,
        "device": str(device),
        "machine": _machine(),
        "study_seconds": time.perf_counter() - t_start,
    }
    paths = write_report(results, out)
    return StudyReport(results=results, table_markdown=results_table(results), paths=paths)


__all__ = ["StudyBackend", "StudyReport", "TrainOutcome", "TrainerBackend", "measure_latencies", "run_study"]
