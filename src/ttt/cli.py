"""The ``ttt`` command line: train, evaluate, generate, compare architectures, MQAR, benchmarks, data.

Every command has ``--help``. Heavy imports (torch, transformers) happen inside the commands, so
``ttt --help`` is fast. Every command behaves the same way on bad input and on interruption:

* a user error (bad config, missing file, unusable corpus, ...) prints one line ``error: ...`` and exits
  with status 2, without a traceback;
* Ctrl-C or SIGTERM stops the command (``ttt train`` and ``ttt compare`` first finish the current
  step and save a checkpoint) and exits with status 130.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

app = typer.Typer(
    name="ttt",
    help="Test-Time Training (TTT) layers: train, evaluate, generate, compare architectures, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

BENCHMARKS = {"layer": "layer_speed", "decode": "decode_speed", "train": "train_speed",
              "backends": "backends", "scan": "scan_speed", "rowops": "rowops_speed",
              "prepare": "prepare_speed", "gpu": "gpu"}
EXIT_USAGE, EXIT_INTERRUPTED = 2, 130
F = TypeVar("F", bound=Callable[..., Any])


def _fail(message: str) -> typer.Exit:
    """Print a one-line error and return the exit (status 2) to raise."""
    err_console.print(f"error: {' '.join(str(message).split())}", markup=False, highlight=False)
    return typer.Exit(EXIT_USAGE)


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input (not a bug): reported in one line, exit status 2."""
    from ttt.data import DataError
    from ttt.evaluation.generation import GenerationError
    from ttt.evaluation.loading import ModelLoadError, TokenizerMismatch
    from ttt.evaluation.metrics import EvaluationError
    from ttt.export import ExportError
    from ttt.study import StudyError
    from ttt.training import TrainingError
    from ttt.training.checkpoint import CheckpointError
    from ttt.util.config import ConfigError

    return (ConfigError, CheckpointError, DataError, ModelLoadError, EvaluationError, StudyError,
            TrainingError, GenerationError, TokenizerMismatch, ExportError)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def command(fn: F) -> F:
    """Run a command with the CLI's error and signal handling (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            err_console.print("interrupted", markup=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as e:
            if isinstance(e, _user_errors()):
                raise _fail(str(e)) from None
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper  # type: ignore[return-value]


def _overrides(ctx: typer.Context, set_: list[str] | None) -> list[str]:
    """``--set`` values and extra ``key=value`` arguments, in command-line order."""
    bad = [a for a in ctx.args if "=" not in a]
    if bad:
        raise _fail(f"unexpected argument(s) {bad}; overrides look like key=value")
    return [*(set_ or []), *ctx.args]


def _plain(text: str) -> None:
    """Print a line as is (no rich markup: ``[ttt-linear]`` is text, not a style tag)."""
    console.print(text, markup=False, highlight=False)


def _finite(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.4f}"


DEVICE_HELP = "auto (CUDA if available, else CPU), cpu, cuda or cuda:N."


def _at_least(**values: tuple[int | None, int]) -> None:
    """``name=(value, minimum)``: a one-line error for the first option below its minimum (None: unset)."""
    for name, (value, low) in values.items():
        if value is not None and value < low:
            raise _fail(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def _writable_dir(path: Path, option: str) -> None:
    """Create ``path`` (an output directory) now, so an unusable one fails before any work."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".ttt-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise _fail(f"cannot write to {option} {str(path)!r}: {e.strerror or e}") from None


def _lm_eval(path: Path, tasks: str, include: Path | None, limit: int | None, batch_size: int, device: str,
             out: Path) -> None:
    """``ttt eval --lm-eval``: lm-evaluation-harness tasks on PATH (a run is exported to a temporary dir)."""
    import tempfile

    from ttt.export import export_run, lm_eval_tasks
    from ttt.util.files import atomic_write_json

    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    if not task_list:
        raise _fail("--lm-eval needs at least one task name")
    if include is not None and not include.is_dir():
        raise _fail(f"--lm-eval-include {include} is not a folder")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = path
        if not (path / "config.json").is_file():
            export_run(path, Path(tmp) / "model")
            model_dir = Path(tmp) / "model"
        results = lm_eval_tasks(model_dir, task_list, include=include, limit=limit, batch_size=batch_size,
                                device=device)
    from lm_eval.utils import make_table

    results["ttt"] = {"model": str(path), "tasks": task_list, "limit": limit}
    atomic_write_json(out / "lm_eval.json", results)
    _plain(f"model {path} | lm-eval tasks {', '.join(task_list)} | samples per task: "
           + ", ".join(f"{k}={v.get('effective', v) if isinstance(v, dict) else v}"
                       for k, v in (results.get("n-samples") or {}).items()))
    _plain(make_table(results))
    console.print(f"wrote {out / 'lm_eval.json'}")


# ----------------------------------------------------------------------------------------------------
# ttt export
# ----------------------------------------------------------------------------------------------------


@app.command("export")
@command
def export_cmd(
    run: Path = typer.Argument(..., help="Run directory (its latest checkpoint) or checkpoint directory."),
    out: Path = typer.Argument(..., help="Directory to write the Hugging Face model to."),
    step: int | None = typer.Option(None, help="Export the checkpoint of this step instead of the latest."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
) -> None:
    """Write a run as a self-contained Hugging Face model directory (weights, config, tokenizer, code, card).

    Load it anywhere with AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True).
    """
    from ttt.export import export_run

    res = export_run(run, out, step=step, overwrite=overwrite)
    val = "-" if res.val_loss is None else f"{res.val_loss:.4f}"
    _plain(f"exported {res.checkpoint} (step {res.step}, {res.tokens} tokens, val loss {val}) to {res.out}")


# ----------------------------------------------------------------------------------------------------
# ttt train
# ----------------------------------------------------------------------------------------------------


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@command
def train_cmd(
    ctx: typer.Context,
    config: str | None = typer.Argument(
        None, help="YAML config file or shipped config name (e.g. tiny); with --resume also a run directory."
    ),
    set_: list[str] | None = typer.Option(
        None, "--set", "-s", help="Dotted override section.key=value (repeatable); also as plain arguments."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run from its newest checkpoint, with its saved config.yaml; "
        "overrides may only change keys like train.steps (see docs/training.md)."
    ),
    resume_from: Path | None = typer.Option(
        None, "--resume-from", help="Start this run from a checkpoint (or run directory) of another run; the "
        "config must match the checkpoint's but for the keys that may change on resume."
    ),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config and exit."),
) -> None:
    """Train a model: config + dotted overrides (ttt train tiny optim.lr=1e-3 train.steps=500)."""
    from ttt.training import Trainer, load_config, resume_config
    from ttt.training.config import print_config as config_yaml

    overrides = _overrides(ctx, set_)
    if config is not None and "=" in config:  # only overrides were given
        config, overrides = None, [config, *overrides]
    if resume and resume_from is not None:
        raise _fail("give --resume (this run) or --resume-from PATH (another run's checkpoint), not both")
    cfg = resume_config(config, overrides) if resume else load_config(config, overrides)
    if print_config:
        _plain(config_yaml(cfg).rstrip())
        return
    summary = Trainer(cfg, resume=True if resume else resume_from).fit()
    if int(os.environ.get("RANK", "0")) != 0:
        return
    console.print_json(json.dumps(summary, default=str))
    if summary["stop_reason"] == "signal":
        err_console.print(f"interrupted at step {summary['steps']}; saved {summary['checkpoint']}; "
                          f"continue with: ttt train {summary['run_dir']} --resume", markup=False)
        raise typer.Exit(EXIT_INTERRUPTED)


# ----------------------------------------------------------------------------------------------------
# ttt eval
# ----------------------------------------------------------------------------------------------------


@app.command("eval")
@command
def eval_cmd(
    path: Path | None = typer.Argument(
        None, help="Saved HF model directory, run directory or checkpoint directory."
    ),
    arch: str | None = typer.Option(
        None, help="Evaluate a freshly initialised registry model of this architecture instead of PATH."
    ),
    size: str = typer.Option("tiny", help="Model size for --arch."),
    data: str | None = typer.Option(
        None, help="Corpus (a source of ttt.data.load_documents, or a directory of `ttt data prepare`); "
        "default: the run's corpus (required for a model without a training run; --arch: Shakespeare)."
    ),
    tokenizer: str | None = typer.Option(
        None, help="Tokenizer ('byte', a tokenizer folder or Hub name) for a model saved without one; "
        "a model's own tokenizer is always used."
    ),
    seq_len: int | None = typer.Option(None, help="Window length (default: the run's context, else 512)."),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    max_windows: int | None = typer.Option(64, help="Evaluate at most this many windows (0: all)."),
    buckets: int = typer.Option(32, help="Buckets of the loss-by-position curve."),
    out: Path | None = typer.Option(
        None, help="Output directory for eval.json and loss_by_position.png (default: PATH/eval for a run "
        "or model, runs/eval-ARCH-SIZE for --arch)."
    ),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    lm_eval: str | None = typer.Option(
        None, "--lm-eval", help="Comma-separated lm-evaluation-harness tasks: run them on PATH (exported "
        "first if it is a run) with lm_eval's hf model instead of the loss evaluation."
    ),
    lm_eval_include: Path | None = typer.Option(
        None, "--lm-eval-include", help="Folder of extra lm-eval task YAML files (e.g. local tasks)."
    ),
    limit: int | None = typer.Option(None, help="--lm-eval: at most this many examples per task."),
) -> None:
    """Validation loss, perplexity, bits per byte and loss by token position (JSON + PNG), or lm-eval
    tasks."""
    from ttt.data.tokenizer import describe_tokenizer, tokenizer_fingerprint
    from ttt.evaluation import evaluate
    from ttt.evaluation.loading import load_model, resolve_tokenizer, run_data
    from ttt.evaluation.plots import plot_loss_by_position
    from ttt.models.registry import build_model, check_arch
    from ttt.util.device import pick_device
    from ttt.util.files import atomic_write_json

    if (path is None) == (arch is None):
        raise _fail("give exactly one of PATH (a saved model or run) or --arch")
    _at_least(seq_len=(seq_len, 2), batch_size=(batch_size, 1), max_windows=(max_windows, 0),
              buckets=(buckets, 1), limit=(limit, 1))
    dev = pick_device(device)
    if lm_eval is not None:
        if path is None:
            raise _fail("--lm-eval evaluates a saved model or run: give PATH")
        out = out or path / "eval"
        _writable_dir(out, "--out")
        return _lm_eval(path, lm_eval, lm_eval_include, limit, batch_size, str(dev), out)
    run_cfg: dict[str, Any] = {}
    tok, tok_spec = None, tokenizer
    if path is not None:
        loaded = load_model(path, device=dev)
        tok, tok_spec = resolve_tokenizer(loaded, tokenizer)
        model, run_cfg, name = loaded.model, loaded.run_config, str(path)
        if data is None and not run_cfg:
            raise _fail(f"{path} has no training run to take the evaluation corpus from; pass --data")
        out = out or (loaded.run_dir or loaded.model_dir) / "eval"
    if out is not None:
        _writable_dir(out, "--out")
    bundle = run_data(run_cfg, source=data, tokenizer=tok_spec)
    if tok is not None and tokenizer_fingerprint(tok) != tokenizer_fingerprint(bundle.tokenizer):
        raise _fail(f"the evaluation data was tokenized with a different tokenizer than {path}'s own")
    tok = bundle.tokenizer
    if arch is not None:
        try:
            check_arch(arch)
            model = build_model(arch, size, vocab_size=len(tok), max_seq_len=seq_len or 512).to(dev)
        except ValueError as e:
            raise _fail(str(e)) from None
        name, out = f"{arch} ({size}, untrained)", out or Path("runs") / f"eval-{arch}-{size}"
        _writable_dir(out, "--out")
    seq_len = seq_len or int((run_cfg.get("data") or {}).get("seq_len") or 512)
    res = evaluate(model, bundle.val, seq_len, batch_size=batch_size, max_windows=max_windows or None,
                   num_buckets=buckets, tokenizer=tok)
    tok_info = describe_tokenizer(tok, str(tok_spec or "byte"))
    res.extra.update({"model": name, "tokenizer": tok_info,
                      "corpus": {"source": bundle.source, "split": "validation"}, "data": bundle.source,
                      "params": model.num_parameters()})
    atomic_write_json(out / "eval.json", res.to_dict())
    plot = plot_loss_by_position({name: res}, out / "loss_by_position.png")
    _plain(f"model {name} | tokenizer {tok_info['source']} ({tok_info['kind']}, {tok_info['vocab_size']} "
           f"tokens, sha256 {tok_info['sha256']}) | corpus {bundle.source} (validation split) | "
           f"{res.num_windows} windows x {res.seq_len} tokens = {res.num_tokens} scored tokens")
    _plain(f"loss {res.loss:.4f} nats/token | ppl {res.perplexity:.3f} | "
           f"bits/byte {_finite(res.bits_per_byte)} | "
           f"first/last quarter {res.first_quarter_loss:.4f}/{res.last_quarter_loss:.4f} | "
           f"{res.num_windows} windows x {res.seq_len} tokens")
    _plain(f"wrote {out / 'eval.json'} and {plot}")


# ----------------------------------------------------------------------------------------------------
# ttt generate
# ----------------------------------------------------------------------------------------------------


@app.command("generate")
@command
def generate_cmd(
    path: Path = typer.Argument(..., help="Saved HF model directory, run directory or checkpoint directory."),
    prompt: str = typer.Option("ROMEO:", "--prompt", "-p", help="Text to continue."),
    max_new_tokens: int = typer.Option(200, help="Tokens to generate."),
    temperature: float = typer.Option(0.8, help="Sampling temperature (0: greedy)."),
    top_k: int = typer.Option(50, help="Keep the k most likely tokens (0: off)."),
    top_p: float = typer.Option(0.95, help="Nucleus sampling mass (1.0: off)."),
    seed: int = typer.Option(0, help="Random seed."),
    tokenizer: str | None = typer.Option(
        None, help="Tokenizer ('byte', a tokenizer folder) for a model saved without one."
    ),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Generate text from a saved model (with its own tokenizer), streaming it to the terminal."""
    from ttt.evaluation.generation import check_sampling, generate_text
    from ttt.evaluation.loading import load_model, resolve_tokenizer
    from ttt.util.device import pick_device

    check_sampling(max_new_tokens, temperature, top_k, top_p)
    loaded = load_model(path, device=pick_device(device))
    tok, _ = resolve_tokenizer(loaded, tokenizer)
    generate_text(loaded.model, tok, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                  top_k=top_k, top_p=top_p, seed=seed, stream=True)


# ----------------------------------------------------------------------------------------------------
# ttt compare
# ----------------------------------------------------------------------------------------------------


@app.command("compare", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@command
def compare_cmd(
    ctx: typer.Context,
    archs: str | None = typer.Option(
        None, help="Comma-separated architectures (ttt-linear, ttt-mlp, transformer, mamba, mamba2)."
    ),
    preset: str = typer.Option(
        "demo",
        help="Study preset: demo (CPU, ~15 min), full (all five, CPU, ~1-2 h), gpu / gpu-8k (125m, one GPU),"
        " smoke (seconds).",
    ),
    out: Path | None = typer.Option(None, help="Report directory (default: runs/compare-<preset>)."),
    set_: list[str] | None = typer.Option(
        None, "--set", "-s", help="Study setting key=value (repeatable), e.g. -s train_tokens=2_000_000."
    ),
    device: str | None = typer.Option(None, help=f"{DEVICE_HELP} Default: the preset's (auto)."),
    fresh: bool = typer.Option(False, help="Ignore finished runs in --out and train everything again."),
) -> None:
    """Train (or reuse) each architecture at matched size and tokens, then write report.md + plots + JSON."""
    from ttt.study import run_study, study_config

    overrides = _overrides(ctx, set_)
    if archs:
        overrides.append(f"archs=[{','.join(a.strip() for a in archs.split(',') if a.strip())}]")
    if device:
        overrides.append(f"device={device}")
    cfg = study_config(preset, overrides)
    report = run_study(cfg, out or Path("runs") / f"compare-{preset}", fresh=fresh, log=_plain)
    console.print()
    _plain(report.table_markdown)
    for sample in report.results.get("samples") or []:
        console.print()
        console.rule(f"sample from {sample['label']} ({sample['arch']})", style="dim")
        _plain(sample["prompt"] + sample["text"])
        console.rule(style="dim")
    console.print()
    for label, p in report.paths.items():
        _plain(f"{label:>22s}: {p}")


# ----------------------------------------------------------------------------------------------------
# ttt mqar
# ----------------------------------------------------------------------------------------------------


@app.command("mqar")
@command
def mqar_cmd(
    preset: str = typer.Option(
        "cpu", help="Sweep preset: smoke (seconds, does not learn), cpu (~25 min on 2 cores), default (GPU)."
    ),
    archs: str | None = typer.Option(None, help="Comma-separated architectures."),
    seq_lens: str | None = typer.Option(None, help="Comma-separated sequence lengths, e.g. 32,64,128,256."),
    num_kv_pairs: str | None = typer.Option(
        None, help="Comma-separated numbers of key-value pairs, e.g. 4,8,16,32 (needs 4 * pairs <= length)."
    ),
    widths: str | None = typer.Option(None, help="Comma-separated model widths."),
    lrs: str | None = typer.Option(None, help="Comma-separated learning rates."),
    steps: int | None = typer.Option(None, help="Optimizer steps per model."),
    curriculum_steps: int | None = typer.Option(None, help="First steps on the easiest setting only."),
    train_examples: int | None = typer.Option(None, help="Training sequences per setting."),
    out: Path = typer.Option(Path("runs/mqar"), help="Output directory (mqar.json, mqar.md, mqar.png)."),
    jobs: int | None = typer.Option(
        None, help="Runs trained at once in worker processes, sharing the CPU threads (preset's default)."
    ),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Multi-query associative recall: test answer accuracy per architecture, sequence length and number
    of key-value pairs (one model per architecture, trained on all settings)."""
    from ttt.evaluation.mqar import MQAR_PRESETS, MQARConfig, mqar_table, run_mqar
    from ttt.models.registry import ARCHS

    if preset not in MQAR_PRESETS:
        raise _fail(f"unknown preset {preset!r}; choose from {sorted(MQAR_PRESETS)}")
    fields: dict[str, Any] = dict(MQAR_PRESETS[preset])
    try:
        if archs:
            fields["archs"] = [a.strip() for a in archs.split(",") if a.strip()]
        if seq_lens:
            fields["seq_lens"] = [int(x) for x in seq_lens.split(",")]
        if num_kv_pairs:
            fields["num_kv_pairs"] = [int(x) for x in num_kv_pairs.split(",")]
        if widths:
            fields["widths"] = [int(x) for x in widths.split(",")]
        if lrs:
            fields["lrs"] = [float(x) for x in lrs.split(",")]
    except ValueError as e:
        raise _fail(f"bad list option: {e}") from None
    counts = {"steps": steps, "curriculum_steps": curriculum_steps, "train_examples": train_examples,
              "jobs": jobs}
    for k, v in counts.items():
        if v is not None:
            least = 0 if k == "curriculum_steps" else 1
            if v < least:
                raise _fail(f"--{k.replace('_', '-')} must be at least {least}, got {v}")
            fields[k] = v
    fields["device"] = device
    unknown = [a for a in fields.get("archs", ARCHS) if a not in ARCHS]
    if unknown:
        raise _fail(f"unknown architecture(s) {unknown}; choose from {list(ARCHS)}")
    try:
        rows = run_mqar(MQARConfig(**fields), out, log=_plain)
    except ValueError as e:  # settings the generator cannot satisfy (e.g. too many pairs for seq_len)
        raise _fail(str(e)) from None
    _plain("test answer accuracy (best over learning rates):")
    _plain(mqar_table(rows))
    _plain(f"wrote {out / 'mqar.md'}, {out / 'mqar.json'}, {out / 'mqar.png'}")


# ----------------------------------------------------------------------------------------------------
# ttt data prepare / ttt data info
# ----------------------------------------------------------------------------------------------------

data_app = typer.Typer(
    name="data",
    help="Prepare corpora: stream, split and tokenize them in parallel into sharded token files.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished child processes."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@data_app.command("prepare")
@command
def data_prepare_cmd(
    source: str = typer.Argument(
        ..., help="Corpus: text file, folder, glob, .jsonl, saved datasets folder, hf:NAME[:CONFIG][@SPLIT] "
                  "or 'shakespeare'."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (created; resumed if interrupted)."),
    tokenizer: str = typer.Option(
        "byte", help="'byte', 'bpe' (trained on a sample), a saved tokenizer folder or a prepared directory."
    ),
    vocab_size: int | None = typer.Option(None, help="BPE vocabulary size (default 8192)."),
    text_field: str = typer.Option("text", help="Text field of JSONL records / dataset rows."),
    data_files: list[str] | None = typer.Option(
        None, "--data-files",
        help="data_files for hf: sources, e.g. hf:json --data-files 'c/*.jsonl' (repeatable).",
    ),
    streaming: bool = typer.Option(False, help="Load hf: sources in streaming mode."),
    val_fraction: float = typer.Option(
        0.05, help="Share of the text held out for validation (whole documents)."
    ),
    seed: int = typer.Option(0, help="Seed of the document-level split and of the BPE sample."),
    workers: int | None = typer.Option(
        None, help="Tokenizing processes (default: the CPU cores; 1: in-process)."
    ),
    shard_mb: float = typer.Option(32.0, help="MB of text per shard."),
    bpe_sample_mb: float = typer.Option(256.0, help="MB of training text the BPE tokenizer is trained on."),
) -> None:
    """Stream SOURCE, split it by document, tokenize it in parallel into sharded token files under --out.

    Give --out as data.source to `ttt train` / `ttt eval` afterwards; every run and rank reads it.
    """
    import time

    from ttt.data.prepare import PrepareConfig, default_workers, prepare_corpus

    files: str | list[str] | None = None
    if data_files:
        files = data_files[0] if len(data_files) == 1 else list(data_files)
    cfg = PrepareConfig(source=source, text_field=text_field, data_files=files, streaming=streaming,
                        tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction, seed=seed,
                        workers=workers, shard_mb=shard_mb, bpe_sample_mb=bpe_sample_mb)
    t0, cpu0, kids0 = time.perf_counter(), time.process_time(), _children_cpu()
    try:
        manifest = prepare_corpus(cfg, out, log=lambda msg: err_console.print(msg, markup=False,
                                                                               highlight=False))
    except OSError as e:  # an unwritable --out, a full disk, an unreadable file
        raise _fail(str(e)) from None
    seconds = time.perf_counter() - t0
    cpu, kids = time.process_time() - cpu0, _children_cpu() - kids0
    mb = manifest["source"]["num_bytes"] / 1e6
    tok = manifest["tokenizer"]
    _plain(f"prepared {out}: {manifest['source']['num_docs']} documents, {mb:.1f} MB of text, "
           f"tokenizer {tok['spec']} ({tok['vocab_size']} tokens, {manifest['dtype']})")
    for split, info in manifest["splits"].items():
        _plain(f"  {split}: {info['num_docs']} documents, {info['num_tokens']} tokens, "
               f"{len(info['shards'])} shards")
    _plain(f"wall time of this command: {seconds:.1f} s ({mb / max(seconds, 1e-9):.1f} MB of text per "
           f"second, {cfg.workers or default_workers()} worker(s))")
    _plain(f"CPU time of the preparation: {cpu:.1f} s in this process, {kids:.1f} s in worker processes")


@data_app.command("info")
@command
def data_info_cmd(path: Path = typer.Argument(..., help="A prepared directory.")) -> None:
    """Print the manifest of a prepared directory (counts, tokenizer, split, shards)."""
    from ttt.data import read_manifest

    manifest = read_manifest(path)
    summary = {k: v for k, v in manifest.items() if k != "splits"}
    summary["splits"] = {s: {k: v for k, v in info.items() if k != "shards"} | {"shards": len(info["shards"])}
                         for s, info in manifest["splits"].items()}
    console.print_json(json.dumps(summary))


# ----------------------------------------------------------------------------------------------------
# ttt bench
# ----------------------------------------------------------------------------------------------------


@app.command("bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@command
def bench_cmd(
    ctx: typer.Context,
    which: str = typer.Argument(
        ..., help="layer | decode | train | backends | scan | rowops | prepare | gpu | all (later arguments: "
                  "the benchmark's)."
    ),
) -> None:
    """Speed benchmarks (ttt.benchmarks: layer, decode, train, backends, scan, rowops, prepare, gpu);
    arguments after WHICH go to the benchmark.

    Use -- to pass options the benchmark shares with this command: ttt bench layer -- --help.
    """
    import importlib

    names = list(BENCHMARKS) if which == "all" else [which]
    for n in names:
        if n not in BENCHMARKS:
            raise _fail(f"unknown benchmark {n!r}; choose from {[*BENCHMARKS, 'all']}")
    for n in names:
        console.rule(f"benchmark: {n}")
        importlib.import_module(f"ttt.benchmarks.{BENCHMARKS[n]}").main(list(ctx.args))


def main() -> None:
    """Run the app (``ttt`` and ``python -m ttt``)."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
