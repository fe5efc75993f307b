"""The comparison study: TTT-Linear, TTT-MLP, Transformer, Mamba, Mamba-2 at matched size and tokens.

:func:`run_study` trains every architecture (or reuses its finished run) on the same data, context
length and number of training tokens, with parameter counts matched by
:func:`ttt.models.registry.match_size`; then evaluates each on the same validation windows and writes a
report directory::

    <out>/report.md               one table (+ the unigram baseline) and links to the figures
    <out>/results.json            everything measured, raw
    <out>/val_loss.png            validation loss against training tokens, all architectures
    <out>/loss_by_position.png    loss by token position, all architectures on one figure
    <out>/sample.txt              a text sample from the first architecture
    <out>/runs/<arch>/            the training run (checkpoints, metrics) and study_result.json

Interrupted studies resume: a run whose ``study_result.json`` matches the study settings is reused;
an interrupted run restarts from its newest checkpoint (the trainer's resume). Study settings are one
dict per preset in :data:`STUDY_PRESETS`; ``--set key=value`` overrides any field.

Training goes through a :class:`StudyBackend`; the default :class:`TrainerBackend` uses
:mod:`ttt.data` and :mod:`ttt.training`. Tests may pass another backend.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import torch

from .metrics import EvaluationError, document_windows, evaluate, iter_documents, unigram_baseline

ALL_ARCHS = ("ttt-linear", "ttt-mlp", "transformer", "mamba", "mamba2")
ARCH_LABELS = {
    "ttt-linear": "TTT-Linear",
    "ttt-mlp": "TTT-MLP",
    "transformer": "Transformer",
    "mamba": "Mamba",
    "mamba2": "Mamba-2",
}


# trainer settings that do not change a run's result (a run may resume with other values)
RUN_CONTROL_KEYS = frozenset(
    {
        "train.max_steps_this_run",
        "train.device",
        "log.progress",
        "log.tensorboard",
        "log.csv",
        "checkpoint.every",
        "checkpoint.keep",
        "checkpoint.on_signal",
    }
)


class StudyError(RuntimeError):
    """A study that cannot run as configured (clear message for the command line)."""


class UnknownArch(StudyError, ValueError):
    """An architecture name the registry does not know."""


def check_archs(archs: list[str]) -> None:
    """Raise :class:`UnknownArch` for names outside :data:`ALL_ARCHS`."""
    bad = [a for a in archs if a not in ALL_ARCHS]
    if bad:
        raise UnknownArch(f"unknown architecture(s) {bad}; choose from {list(ALL_ARCHS)}")
    if not archs:
        raise UnknownArch("no architecture selected")


def build_arch(arch: str, size: str, vocab_size: int, max_seq_len: int, **overrides: Any) -> torch.nn.Module:
    """Build a registry model, turning an unknown name into :class:`UnknownArch`."""
    check_archs([arch])
    from ttt.models.registry import build_model

    try:
        return build_model(arch, size, vocab_size=vocab_size, max_seq_len=max_seq_len, **overrides)
    except ValueError as e:
        raise UnknownArch(str(e)) from None


# ----------------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------------


@dataclass
class StudyConfig:
    """Every setting of a study. Presets (:data:`STUDY_PRESETS`) are partial dicts of these fields."""

    archs: list[str] = field(default_factory=lambda: list(ALL_ARCHS))
    size: str = "mini"  # registry size; baselines are matched to TTT-Linear of this size
    model_overrides: dict[str, Any] = field(default_factory=dict)  # config fields for every arch
    data: str | None = None  # corpus source for ttt.data (None: built-in Shakespeare)
    tokenizer: str = "byte"
    seq_len: int = 2048
    train_tokens: int = 2_000_000  # per architecture
    batch_size: int = 4
    lr: float = 3e-3
    warmup_tokens: int = 100_000
    weight_decay: float = 0.1
    num_evals: int = 8  # validation points on the loss-vs-tokens curve
    curve_eval_windows: int = 8  # windows per point of that curve
    eval_windows: int = 64  # windows of the final evaluation (loss by position)
    buckets: int = 32
    decode_prompt: int = 128
    decode_tokens: int = 32
    sample_prompt: str = "ROMEO:"
    sample_tokens: int = 300
    seed: int = 0
    train_overrides: dict[str, Any] = field(default_factory=dict)  # dotted TrainConfig overrides
    device: str = "cpu"

    @classmethod
    def from_preset(cls, preset: str, overrides: dict[str, Any] | None = None) -> StudyConfig:
        """Preset dict + overrides (``model_overrides.x`` / ``train_overrides.x`` set nested keys)."""
        if preset not in STUDY_PRESETS:
            raise StudyError(f"unknown preset {preset!r}; choose from {sorted(STUDY_PRESETS)}")
        values: dict[str, Any] = json.loads(json.dumps(STUDY_PRESETS[preset]))
        names = {f.name for f in fields(cls)}
        for key, value in (overrides or {}).items():
            head, _, rest = key.partition(".")
            if head not in names:
                raise StudyError(f"unknown study setting {key!r}; settings: {sorted(names)}")
            if rest:
                if head not in ("model_overrides", "train_overrides"):
                    raise StudyError(f"study setting {head!r} has no sub-keys")
                values.setdefault(head, {})[rest] = value
            else:
                values[head] = value
        for k in ("train_tokens", "warmup_tokens"):  # allow 2e6
            if k in values:
                values[k] = int(float(values[k]))
        if isinstance(values.get("archs"), str):
            values["archs"] = [a.strip() for a in values["archs"].split(",") if a.strip()]
        cfg = cls(**values)
        check_archs(cfg.archs)
        return cfg

    def fingerprint(self, arch: str) -> str:
        """Hash of every setting that changes the run of ``arch`` (not the list of archs / sampling)."""
        d = asdict(self)
        for k in ("archs", "sample_prompt", "sample_tokens", "decode_prompt", "decode_tokens", "device"):
            d.pop(k)
        d["train_overrides"] = {k: v for k, v in d["train_overrides"].items() if k not in RUN_CONTROL_KEYS}
        d["arch"] = arch
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


STUDY_PRESETS: dict[str, dict[str, Any]] = {
    # `make demo`: a fresh 2-core CPU, ~15 minutes in total, byte-level Shakespeare at a 2k context.
    "demo": dict(
        archs=["ttt-linear", "ttt-mlp", "transformer"],
        size="mini",
        seq_len=2048,
        train_tokens=786_432,  # 96 steps of 4 x 2048 bytes; ~11 min of training for the three on 2 cores
        batch_size=4,
        lr=3e-3,
        warmup_tokens=73_728,
        num_evals=6,
        curve_eval_windows=8,
        eval_windows=160,  # loss by position: 160 windows of 2048 bytes, buckets >= 16 positions wide
        buckets=20,
        decode_prompt=128,
        decode_tokens=32,
        sample_tokens=200,
    ),
    # all five architectures, same data and context (tens of minutes on a CPU)
    "full": dict(
        archs=list(ALL_ARCHS),
        size="mini",
        seq_len=2048,
        train_tokens=2_000_000,
        batch_size=4,
        lr=3e-3,
        warmup_tokens=100_000,
        num_evals=8,
        eval_windows=64,
    ),
    # the test suite: seconds
    "tiny": dict(
        archs=list(ALL_ARCHS),
        size="tiny",
        seq_len=64,
        train_tokens=4 * 64 * 4,
        batch_size=4,
        lr=3e-3,
        warmup_tokens=256,
        num_evals=2,
        curve_eval_windows=2,
        eval_windows=4,
        buckets=4,
        decode_prompt=8,
        decode_tokens=4,
        sample_tokens=16,
    ),
}


# ----------------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------------


@dataclass
class StudyData:
    """Tokenizer + train / validation token stores shared by every run of a study."""

    tokenizer: Any
    train: Any
    val: Any
    vocab_size: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainOutcome:
    """A finished (or reused) training run."""

    model: torch.nn.Module
    curve: list[tuple[int, float]]  # (training tokens seen, validation loss)
    tokens: int  # training tokens seen
    tokens_per_s: float  # training throughput
    train_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class StudyBackend(Protocol):
    """What the study needs from data + training."""

    def prepare(self, cfg: StudyConfig, out_dir: Path) -> StudyData:
        """Tokenize the corpus once for all runs."""
        ...

    def train(
        self, arch: str, cfg: StudyConfig, run_dir: Path, data: StudyData, log: Callable[[str], None]
    ) -> TrainOutcome:
        """Train ``arch`` (resuming from ``run_dir``'s newest checkpoint) and return the final model."""
        ...


# ----------------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------------


def _median_time(fn: Callable[[], Any], reps: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


@torch.no_grad()
def measure_latency(
    model: torch.nn.Module,
    vocab_size: int,
    prefill_len: int,
    decode_prompt: int = 128,
    decode_tokens: int = 32,
) -> dict[str, float | None]:
    """Prefill latency of one ``prefill_len`` sequence and decode latency per token (batch 1, ms).

    Decode time per token is ``(t(prompt + 1 + n tokens) - t(prompt + 1 token)) / n`` with the model's
    cache (``generate``, greedy), so the prompt's prefill cancels out.
    """
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (1, prefill_len), generator=g).to(device)

    def prefill() -> None:
        try:
            model(input_ids=ids, use_cache=False)
        except TypeError:
            model(input_ids=ids)

    out: dict[str, float | None] = {
        "prefill_ms": 1000 * _median_time(prefill, reps=2),
        "prefill_len": prefill_len,
    }
    prompt = ids[:, : max(1, min(decode_prompt, prefill_len))]

    def gen(n: int) -> Callable[[], Any]:
        return lambda: model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=True,
            pad_token_id=0,
        )

    try:
        t1 = _median_time(gen(1), reps=2)
        tn = _median_time(gen(decode_tokens + 1), reps=2)
        out["decode_ms_per_token"] = 1000 * max(tn - t1, 0.0) / decode_tokens
    except Exception as e:  # a model without generation support still gets its other numbers
        out["decode_ms_per_token"] = None
        out["decode_error"] = f"{type(e).__name__}: {e}"  # type: ignore[assignment]
    return out


# ----------------------------------------------------------------------------------------------------
# the study
# ----------------------------------------------------------------------------------------------------


@dataclass
class StudyReport:
    """What :func:`run_study` produced."""

    results: dict[str, Any]
    table_markdown: str
    paths: dict[str, Path]


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def _fmt(x: Any, spec: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def _tokens(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def results_table(results: dict[str, Any]) -> str:
    """The study's markdown table: one row per architecture, then the unigram baseline."""
    seq_len = results["config"]["seq_len"]
    head = (
        "| Architecture | Params (non-emb.) | Tokens | Val loss | Bits/byte "
        "| Loss 1st quarter | Loss last quarter "
        f"| Train tok/s | Prefill ms ({seq_len} tok) | Decode ms/tok |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arch, r in results["runs"].items():
        ev, lat = r["eval"], r["latency"]
        lines.append(
            f"| {ARCH_LABELS.get(arch, arch)} "
            f"| {r['params'] / 1e6:.2f}M ({r['params_non_embedding'] / 1e6:.2f}M) "
            f"| {_tokens(r['tokens'])} "
            f"| {_fmt(ev['loss'], '.4f')} | {_fmt(ev['bits_per_byte'], '.4f')} "
            f"| {_fmt(ev['first_quarter_loss'], '.4f')} | {_fmt(ev['last_quarter_loss'], '.4f')} "
            f"| {_fmt(r['tokens_per_s'], ',.0f')} | {_fmt(lat.get('prefill_ms'), '.1f')} "
            f"| {_fmt(lat.get('decode_ms_per_token'), '.2f')} |"
        )
    u = results["unigram"]
    lines.append(
        f"| Unigram (train frequencies) | - | - | {_fmt(u['loss'], '.4f')} "
        f"| {_fmt(u['bits_per_byte'], '.4f')} "
        "| - | - | - | - | - |"
    )
    return "\n".join(lines)


def write_report(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write results.json, report.md and the two figures; return their paths."""
    from .plots import plot_loss_by_position, plot_loss_curves

    out.mkdir(parents=True, exist_ok=True)
    labels = {a: ARCH_LABELS.get(a, a) for a in results["runs"]}
    curves = {labels[a]: [tuple(p) for p in r["curve"]] for a, r in results["runs"].items()}
    val_png = plot_loss_curves(curves, out / "val_loss.png", title="Validation loss vs training tokens")
    pos_png = plot_loss_by_position(
        {labels[a]: r["eval"] for a, r in results["runs"].items()},
        out / "loss_by_position.png",
        title=f"Loss by token position (context {results['config']['seq_len']})",
        baseline=results["unigram"]["loss"],
    )
    _write_json(out / "results.json", results)
    cfg = results["config"]
    table = results_table(results)
    sample = results.get("sample") or {}
    md = [
        "# TTT comparison study",
        "",
        f"Data: {cfg['data'] or 'built-in Shakespeare'} ({cfg['tokenizer']} tokenizer); "
        f"context {cfg['seq_len']} tokens; {_tokens(cfg['train_tokens'])} training tokens per architecture; "
        f"size preset `{cfg['size']}` "
        "(baselines matched to TTT-Linear's non-embedding parameter count).",
        f"Validation: {results['eval_windows']} windows of {cfg['seq_len']} tokens inside documents "
        "(position = true context length); losses in nats/token.",
        "",
        table,
        "",
        "Loss 1st/last quarter: mean loss of the tokens in the first / last quarter of the context. "
        "Latencies: batch 1, prefill of one full-context sequence, decode per token with the model's cache "
        f"({results.get('device', 'cpu')}).",
        "",
        "![validation loss](val_loss.png)",
        "",
        "![loss by position](loss_by_position.png)",
        "",
    ]
    if sample:
        md += [
            f"## Sample ({sample.get('arch')})",
            "",
            "```",
            sample.get("prompt", "") + sample.get("text", ""),
            "```",
            "",
        ]
    md.append(f"Raw numbers: `results.json`. Machine: {results.get('machine', '')}.")
    (out / "report.md").write_text("\n".join(md) + "\n")
    paths = {
        "report": out / "report.md",
        "results": out / "results.json",
        "val_loss_plot": val_png,
        "loss_by_position_plot": pos_png,
    }
    if (out / "sample.txt").exists():
        paths["sample"] = out / "sample.txt"
    return paths


def _count(model: torch.nn.Module, exclude_embeddings: bool = False) -> int:
    try:
        from ttt.models.registry import count_params

        return count_params(model, exclude_embeddings=exclude_embeddings)
    except ImportError:  # pragma: no cover - registry always present in the package
        return sum(p.numel() for p in model.parameters())


def run_study(
    preset: str | StudyConfig,
    out: str | Path,
    overrides: dict[str, Any] | None = None,
    fresh: bool = False,
    backend: StudyBackend | None = None,
    log: Callable[[str], None] | None = print,
) -> StudyReport:
    """Run (or resume) the study and write its report directory (see the module docstring)."""
    from .generation import generate_text

    log = log or (lambda s: None)
    cfg = preset if isinstance(preset, StudyConfig) else StudyConfig.from_preset(preset, overrides)
    check_archs(cfg.archs)
    out = Path(out)
    if fresh and (out / "runs").exists():
        shutil.rmtree(out / "runs")
    out.mkdir(parents=True, exist_ok=True)
    backend = backend or TrainerBackend()
    t_start = time.perf_counter()
    data = backend.prepare(cfg, out)
    bpt = data.extra.get("bytes_per_token")
    try:  # fail before any training if the context does not fit the validation documents
        document_windows(iter_documents(data.val), cfg.seq_len, max_windows=1)
    except EvaluationError as e:
        raise StudyError(str(e)) from None
    unigram = unigram_baseline(data.train, data.val, data.vocab_size, bytes_per_token=bpt or 1.0)
    if bpt is None and cfg.tokenizer != "byte":
        unigram["bits_per_byte"] = None
    log(
        f"unigram baseline: {unigram['loss']:.4f} nats/token, "
        f"{_fmt(unigram['bits_per_byte'], '.4f')} bits/byte"
    )
    runs: dict[str, Any] = {}
    models: dict[str, torch.nn.Module] = {}
    for arch in cfg.archs:
        run_dir = out / "runs" / arch
        result_file = run_dir / "study_result.json"
        fp = cfg.fingerprint(arch)
        if result_file.exists():
            prev = json.loads(result_file.read_text())
            if prev.get("fingerprint") == fp:
                log(f"[{arch}] reusing finished run ({result_file})")
                runs[arch] = prev
                continue
            log(f"[{arch}] settings changed since the saved run; training again")
            shutil.rmtree(run_dir)
        stamp = run_dir / "study_fingerprint"
        if run_dir.exists() and (not stamp.exists() or stamp.read_text().strip() != fp):
            log(f"[{arch}] discarding an unfinished run made with other settings")
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fp + "\n")
        log(f"[{arch}] training {_tokens(cfg.train_tokens)} tokens at context {cfg.seq_len} ...")
        outcome = backend.train(arch, cfg, run_dir, data, log)
        model = outcome.model.to(cfg.device)
        try:
            ev = evaluate(
                model,
                data.val,
                cfg.seq_len,
                batch_size=max(1, cfg.batch_size),
                max_windows=cfg.eval_windows,
                num_buckets=cfg.buckets,
                tokenizer=data.tokenizer,
                bytes_per_token=bpt,
            )
        except EvaluationError as e:
            raise StudyError(str(e)) from None
        lat = measure_latency(model, data.vocab_size, cfg.seq_len, cfg.decode_prompt, cfg.decode_tokens)
        runs[arch] = {
            "arch": arch,
            "fingerprint": fp,
            "params": _count(model),
            "params_non_embedding": _count(model, exclude_embeddings=True),
            "tokens": outcome.tokens,
            "tokens_per_s": outcome.tokens_per_s,
            "train_seconds": outcome.train_seconds,
            "curve": [list(p) for p in outcome.curve],
            "eval": ev.to_dict(),
            "latency": lat,
            "model_config": model.config.to_dict() if hasattr(model, "config") else {},
            **({"train_extra": outcome.extra} if outcome.extra else {}),
        }
        _write_json(result_file, runs[arch])
        models[arch] = model
        log(
            f"[{arch}] val loss {ev.loss:.4f}, bits/byte {_fmt(ev.bits_per_byte, '.4f')}, "
            f"{outcome.tokens_per_s:,.0f} tok/s, prefill {lat['prefill_ms']:.1f} ms, "
            f"decode {_fmt(lat.get('decode_ms_per_token'), '.2f')} ms/token"
        )
    # a text sample from the first architecture
    first = cfg.archs[0]
    sample_model = models.get(first) or backend_model(backend, first, cfg, out / "runs" / first, data)
    sample: dict[str, Any] = {}
    if sample_model is not None and cfg.sample_tokens > 0:
        text = generate_text(
            sample_model.to(cfg.device),
            data.tokenizer,
            cfg.sample_prompt,
            max_new_tokens=cfg.sample_tokens,
            temperature=0.8,
            top_k=50,
            top_p=0.95,
            seed=cfg.seed,
        )
        sample = {"arch": ARCH_LABELS.get(first, first), "prompt": cfg.sample_prompt, "text": text}
        (out / "sample.txt").write_text(cfg.sample_prompt + text + "\n")
    results = {
        "config": asdict(cfg),
        "unigram": unigram,
        "eval_windows": next(iter(runs.values()))["eval"]["num_windows"],
        "runs": runs,
        "sample": sample,
        "device": cfg.device,
        "machine": _machine(),
        "study_seconds": time.perf_counter() - t_start,
    }
    paths = write_report(results, out)
    return StudyReport(results=results, table_markdown=results_table(results), paths=paths)


def backend_model(
    backend: StudyBackend, arch: str, cfg: StudyConfig, run_dir: Path, data: StudyData
) -> torch.nn.Module | None:
    """The trained model of a reused run (for the text sample), if the backend can load it."""
    loader = getattr(backend, "load_trained", None)
    if loader is None:
        return None
    try:
        return loader(arch, cfg, run_dir, data)
    except Exception:  # a sample is a nicety: never fail the study for it
        return None


def _machine() -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


# ----------------------------------------------------------------------------------------------------
# default backend: ttt.data + ttt.training
# ----------------------------------------------------------------------------------------------------


class TrainerBackend:
    """Data from :func:`ttt.data.prepare_data`, training with :class:`ttt.training.Trainer`."""

    def prepare(self, cfg: StudyConfig, out_dir: Path) -> StudyData:
        """Tokenize the corpus into ``out_dir/data`` (cached across runs and resumes)."""
        from .study_data import DataUnavailable, study_data

        try:
            return study_data(cfg, out_dir / "data")
        except (DataUnavailable, ValueError, OSError) as e:  # ttt.data.DataError is a ValueError
            raise StudyError(f"cannot prepare the study data: {e}") from None

    def train(
        self, arch: str, cfg: StudyConfig, run_dir: Path, data: StudyData, log: Callable[[str], None]
    ) -> TrainOutcome:
        """Train with the trainer; resumes from ``run_dir/checkpoints`` when it exists."""
        from .study_train import train_with_trainer

        return train_with_trainer(arch, cfg, run_dir, data, log)

    def load_trained(self, arch: str, cfg: StudyConfig, run_dir: Path, data: StudyData) -> torch.nn.Module:
        """The final model saved by a finished run."""
        from .loading import load_model

        return load_model(run_dir).model
