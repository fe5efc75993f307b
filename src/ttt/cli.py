"""The ``ttt`` command line: train, evaluate, generate, compare architectures, MQAR, benchmarks.

Every command has ``--help``. Heavy imports (torch, transformers, the package's parts) happen inside
the commands, so ``ttt --help`` is fast and a missing part gives a clear message.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

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
              "backends": "backends"}


def _fail(message: str, code: int = 2) -> typer.Exit:
    """Print a red error line and return the exit exception to raise."""
    err_console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def _parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": 1, "c": "x"}`` (values parsed as YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise _fail(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _plain(text: str) -> None:
    """Print a log line as is (no rich markup: ``[ttt-linear]`` is text, not a style tag)."""
    console.print(text, markup=False, highlight=False)


def _finite(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.4f}"


# ----------------------------------------------------------------------------------------------------
# ttt eval
# ----------------------------------------------------------------------------------------------------


@app.command("eval")
def eval_cmd(
    path: Path | None = typer.Argument(
        None, help="Saved HF model directory, run directory or checkpoint directory."
    ),
    arch: str | None = typer.Option(
        None, help="Evaluate a freshly initialised registry model of this architecture instead of PATH."
    ),
    size: str = typer.Option("tiny", help="Registry size for --arch."),
    data: str | None = typer.Option(
        None, help="Corpus (path / source for ttt.data.load_documents); default: the run's corpus "
        "(required for a model without a training run; --arch: Shakespeare)."
    ),
    tokenizer: str | None = typer.Option(
        None, help="Tokenizer ('byte', a tokenizer folder or Hub name) for a model saved without one; "
        "a model's own tokenizer is always used."
    ),
    seq_len: int | None = typer.Option(None, help="Window length (default: the run's context, else 512)."),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    max_windows: int | None = typer.Option(64, help="Evaluate at most this many windows (0: all)."),
    buckets: int = typer.Option(32, help="Buckets of the loss-by-position curve."),
    out: Path = typer.Option(Path("eval"), help="Output directory for eval.json and loss_by_position.png."),
    device: str = typer.Option("cpu", help="torch device."),
    lm_eval: str | None = typer.Option(
        None, "--lm-eval", help="Comma-separated lm-evaluation-harness tasks: run them on PATH (exported "
        "first if it is a run) with lm_eval's hf model instead of the loss evaluation."
    ),
    lm_eval_include: Path | None = typer.Option(
        None, "--lm-eval-include", help="Folder of extra lm-eval task YAML files (e.g. local tasks)."
    ),
    limit: int | None = typer.Option(None, help="--lm-eval: at most this many examples per task."),
) -> None:
    """Validation loss, perplexity, bits per byte and loss by position (JSON + PNG), or lm-eval tasks."""
    from ttt.evaluation import EvaluationError, evaluate
    from ttt.evaluation.loading import ModelLoadError, TokenizerMismatch, load_model, resolve_tokenizer
    from ttt.evaluation.plots import plot_loss_by_position
    from ttt.evaluation.study_data import DataUnavailable, eval_data

    if (path is None) == (arch is None):
        raise _fail("give exactly one of PATH (a saved model or run) or --arch")
    if lm_eval is not None:
        if path is None:
            raise _fail("--lm-eval evaluates a saved model or run: give PATH")
        return _lm_eval(path, lm_eval, lm_eval_include, limit, batch_size, device, out)
    run_cfg: dict[str, Any] = {}
    tok = None
    tok_spec = tokenizer
    if path is not None:
        try:
            loaded = load_model(path, device=device)
            tok, tok_spec = resolve_tokenizer(loaded, tokenizer)
        except (ModelLoadError, TokenizerMismatch) as e:
            raise _fail(str(e)) from None
        model, run_cfg, name = loaded.model, loaded.run_config, str(path)
        if data is None and not run_cfg:
            raise _fail(f"{path} has no training run to take the evaluation corpus from; pass --data")
    try:
        bundle = eval_data(source=data, tokenizer=tok_spec, loaded_tokenizer=None, run_config=run_cfg)
    except (DataUnavailable, ValueError, FileNotFoundError) as e:
        raise _fail(str(e)) from None
    from ttt.data.tokenizer import describe_tokenizer, tokenizer_fingerprint

    if tok is not None and tokenizer_fingerprint(tok) != tokenizer_fingerprint(bundle.tokenizer):
        raise _fail(f"the evaluation data was tokenized with a different tokenizer than {path}'s own")
    if arch is not None:
        from ttt.evaluation.compare import UnknownArch, build_arch

        try:
            model = build_arch(arch, size, vocab_size=len(bundle.tokenizer), max_seq_len=seq_len or 512)
        except UnknownArch as e:
            raise _fail(str(e)) from None
        model = model.to(device)
        name = f"{arch} ({size}, untrained)"
    seq_len = seq_len or int(bundle.seq_len or 512)
    try:
        res = evaluate(
            model,
            bundle.val,
            seq_len,
            batch_size=batch_size,
            max_windows=max_windows or None,
            num_buckets=buckets,
            tokenizer=bundle.tokenizer,
        )
    except EvaluationError as e:
        raise _fail(str(e)) from None
    tok_info = describe_tokenizer(bundle.tokenizer, str(tok_spec or "byte"))
    res.extra.update(
        {"model": name, "tokenizer": tok_info, "corpus": {"source": bundle.source, "split": "validation"},
         "data": data or bundle.source, "params": sum(p.numel() for p in model.parameters())}
    )
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "eval.json", res.to_dict())
    plot = plot_loss_by_position({name: res}, out / "loss_by_position.png")
    _plain(
        f"model {name} | tokenizer {tok_info['source']} ({tok_info['kind']}, "
        f"{tok_info['vocab_size']} tokens, "
        f"sha256 {tok_info['sha256']}) | corpus {bundle.source} (validation split) | "
        f"{res.num_windows} windows x {res.seq_len} tokens = {res.num_tokens} scored tokens"
    )
    console.print(
        f"loss {res.loss:.4f} nats/token | ppl {res.perplexity:.3f} | "
        f"bits/byte {_finite(res.bits_per_byte)} | "
        f"first/last quarter {res.first_quarter_loss:.4f}/{res.last_quarter_loss:.4f} | "
        f"{res.num_windows} windows x {res.seq_len} tokens"
    )
    console.print(f"wrote {out / 'eval.json'} and {plot}")


def _write_json(path: Path, data: Any) -> None:
    """Write JSON via a temporary file and a rename (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    tmp.replace(path)


def _lm_eval(path: Path, tasks: str, include: Path | None, limit: int | None, batch_size: int, device: str,
             out: Path) -> None:
    """``ttt eval --lm-eval``: lm-evaluation-harness tasks on PATH (a run is exported to a temporary dir)."""
    import tempfile

    from ttt.export import ExportError, export_run, lm_eval_tasks

    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    if not task_list:
        raise _fail("--lm-eval needs at least one task name")
    if include is not None and not include.is_dir():
        raise _fail(f"--lm-eval-include {include} is not a folder")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = path
        if not (path / "config.json").is_file():
            try:
                export_run(path, Path(tmp) / "model")
            except ExportError as e:
                raise _fail(str(e)) from None
            model_dir = Path(tmp) / "model"
        try:
            results = lm_eval_tasks(model_dir, task_list, include=include, limit=limit, batch_size=batch_size,
                                    device=device)
        except ExportError as e:
            raise _fail(str(e)) from None
    from lm_eval.utils import make_table

    results["ttt"] = {"model": str(path), "tasks": task_list, "limit": limit}
    _write_json(out / "lm_eval.json", results)
    _plain(f"model {path} | lm-eval tasks {', '.join(task_list)} | samples per task: "
           + ", ".join(f"{k}={v.get('effective', v) if isinstance(v, dict) else v}"
                       for k, v in (results.get("n-samples") or {}).items()))
    _plain(make_table(results))
    console.print(f"wrote {out / 'lm_eval.json'}")


# ----------------------------------------------------------------------------------------------------
# ttt export
# ----------------------------------------------------------------------------------------------------


@app.command("export")
def export_cmd(
    run: Path = typer.Argument(..., help="Run directory (its latest checkpoint) or checkpoint directory."),
    out: Path = typer.Argument(..., help="Directory to write the Hugging Face model to."),
    step: int | None = typer.Option(None, help="Export the checkpoint of this step instead of the latest."),
    overwrite: bool = typer.Option(False, help="Replace OUT if it exists."),
) -> None:
    """Write a run as a self-contained Hugging Face model directory (weights, config, tokenizer, code, card).

    Load it anywhere with AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True).
    """
    from ttt.export import ExportError, export_run

    try:
        res = export_run(run, out, step=step, overwrite=overwrite)
    except ExportError as e:
        raise _fail(str(e)) from None
    val = "-" if res.val_loss is None else f"{res.val_loss:.4f}"
    _plain(f"exported {res.checkpoint} (step {res.step}, {res.tokens} tokens, val loss {val}) to {res.out}")


# ----------------------------------------------------------------------------------------------------
# ttt train
# ----------------------------------------------------------------------------------------------------


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train_cmd(
    ctx: typer.Context,
    config: str | None = typer.Argument(
        None, help="YAML config file or shipped config name (e.g. tiny); default: the built-in defaults."
    ),
    set_: list[str] | None = typer.Option(
        None, "--set", "-s", help="Dotted override section.key=value (repeatable), e.g. -s optim.lr=1e-3."
    ),
    resume: bool = typer.Option(False, "--resume", help="Resume from the newest checkpoint of the run."),
) -> None:
    """Train a model with the trainer: config file + dotted overrides (e.g. ttt train tiny optim.lr=1e-3)."""
    bad = [a for a in ctx.args if "=" not in a]
    if bad:
        raise _fail(f"unexpected arguments {bad}; overrides look like section.key=value")
    overrides = list(set_ or []) + list(ctx.args)
    try:
        from ttt.training import Trainer, load_config
        from ttt.training.config import ConfigError
    except ImportError as e:
        raise _fail(f"the trainer (ttt.training) is not available: {e}") from None
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        raise _fail(f"bad configuration: {e}") from None
    trainer = _make_trainer(Trainer, cfg, resume)
    result = trainer.fit()
    console.print(f"training finished; run directory: {cfg.run_path()}")
    if isinstance(result, dict):
        console.print_json(json.dumps(result, default=_json_default))


def _make_trainer(trainer_cls: Any, cfg: Any, resume: bool) -> Any:
    """``Trainer(cfg, resume=...)`` if the trainer takes the flag, else ``Trainer(cfg)``."""
    import inspect

    if "resume" in inspect.signature(trainer_cls).parameters:
        return trainer_cls(cfg, resume=resume)
    if resume:
        raise _fail("this trainer has no resume option")
    return trainer_cls(cfg)


# ----------------------------------------------------------------------------------------------------
# ttt generate
# ----------------------------------------------------------------------------------------------------


@app.command("generate")
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
    device: str = typer.Option("cpu", help="torch device."),
) -> None:
    """Generate text from a saved model (with its own tokenizer), streaming it to the terminal."""
    from ttt.evaluation.generation import generate_text
    from ttt.evaluation.loading import ModelLoadError, TokenizerMismatch, load_model, resolve_tokenizer

    try:
        loaded = load_model(path, device=device)
        tok, _ = resolve_tokenizer(loaded, tokenizer)
    except (ModelLoadError, TokenizerMismatch) as e:
        raise _fail(str(e)) from None
    generate_text(
        loaded.model,
        tok,
        prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stream=True,
    )


# ----------------------------------------------------------------------------------------------------
# ttt compare
# ----------------------------------------------------------------------------------------------------


@app.command("compare", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def compare_cmd(
    ctx: typer.Context,
    archs: str | None = typer.Option(
        None, help="Comma-separated architectures (ttt-linear, ttt-mlp, transformer, mamba, mamba2)."
    ),
    preset: str = typer.Option("demo", help="Study preset: demo (CPU, ~15 min), tiny (tests), ..."),
    out: Path | None = typer.Option(None, help="Report directory (default: runs/compare-<preset>)."),
    set_: list[str] | None = typer.Option(
        None, "--set", "-s", help="Override a preset field key=value (repeatable), e.g. -s train_tokens=2e6."
    ),
    fresh: bool = typer.Option(False, help="Ignore finished runs in --out and train everything again."),
) -> None:
    """Train (or reuse) each architecture at matched size and tokens, then write report.md + plots + JSON."""
    from ttt.evaluation.compare import STUDY_PRESETS, StudyError, run_study

    if preset not in STUDY_PRESETS:
        raise _fail(f"unknown preset {preset!r}; choose from {sorted(STUDY_PRESETS)}")
    overrides = _parse_overrides((set_ or []) + [a for a in ctx.args if "=" in a])
    bad = [a for a in ctx.args if "=" not in a]
    if bad:
        raise _fail(f"unexpected arguments {bad}; overrides look like key=value")
    if archs:
        overrides["archs"] = [a.strip() for a in archs.split(",") if a.strip()]
    out = out or Path("runs") / f"compare-{preset}"
    try:
        report = run_study(preset, out, overrides=overrides, fresh=fresh, log=_plain)
    except StudyError as e:
        raise _fail(str(e)) from None
    console.print()
    _plain(report.table_markdown)
    sample = report.results.get("sample") or {}
    if sample:
        console.print()
        console.rule(f"sample from {sample['arch']}", style="dim")
        _plain(sample["prompt"] + sample["text"])
        console.rule(style="dim")
    console.print()
    for label, p in report.paths.items():
        _plain(f"{label:>22s}: {p}")


# ----------------------------------------------------------------------------------------------------
# ttt mqar
# ----------------------------------------------------------------------------------------------------


@app.command("mqar")
def mqar_cmd(
    preset: str = typer.Option("small", help="Sweep preset: tiny (seconds), small (minutes, CPU), default."),
    archs: str | None = typer.Option(None, help="Comma-separated architectures."),
    seq_lens: str | None = typer.Option(None, help="Comma-separated sequence lengths, e.g. 64,128,256,512."),
    widths: str | None = typer.Option(None, help="Comma-separated model widths."),
    lrs: str | None = typer.Option(None, help="Comma-separated learning rates."),
    epochs: int | None = typer.Option(None, help="Training epochs per run."),
    train_examples: int | None = typer.Option(None, help="Training sequences per setting."),
    num_kv_pairs: int | None = typer.Option(
        None, help="Key-value pairs per sequence (default: seq_len // 16)."
    ),
    out: Path = typer.Option(Path("runs/mqar"), help="Output directory (mqar.json, mqar.md, mqar.png)."),
    device: str = typer.Option("cpu", help="torch device."),
) -> None:
    """Multi-query associative recall: accuracy per architecture, sequence length and width."""
    from ttt.evaluation.mqar import ALL_ARCHS, MQAR_PRESETS, MQARConfig, mqar_table, run_mqar

    if preset not in MQAR_PRESETS:
        raise _fail(f"unknown preset {preset!r}; choose from {sorted(MQAR_PRESETS)}")
    fields: dict[str, Any] = dict(MQAR_PRESETS[preset])
    try:
        if archs:
            fields["archs"] = [a.strip() for a in archs.split(",") if a.strip()]
        if seq_lens:
            fields["seq_lens"] = [int(x) for x in seq_lens.split(",")]
        if widths:
            fields["widths"] = [int(x) for x in widths.split(",")]
        if lrs:
            fields["lrs"] = [float(x) for x in lrs.split(",")]
    except ValueError as e:
        raise _fail(f"bad list option: {e}") from None
    for k, v in (("epochs", epochs), ("train_examples", train_examples), ("num_kv_pairs", num_kv_pairs)):
        if v is not None:
            fields[k] = v
    fields["device"] = device
    unknown = [a for a in fields.get("archs", ALL_ARCHS) if a not in ALL_ARCHS]
    if unknown:
        raise _fail(f"unknown architecture(s) {unknown}; choose from {list(ALL_ARCHS)}")
    cfg = MQARConfig(**fields)
    try:
        rows = run_mqar(cfg, out, log=_plain)
    except ValueError as e:
        raise _fail(str(e)) from None
    _plain(mqar_table(rows))
    console.print(f"wrote {out / 'mqar.md'}, {out / 'mqar.json'}, {out / 'mqar.png'}")


# ----------------------------------------------------------------------------------------------------
# ttt bench
# ----------------------------------------------------------------------------------------------------


@app.command(
    "bench",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def bench_cmd(
    ctx: typer.Context,
    which: str = typer.Argument(
        ..., help="layer | decode | train | backends | all (extra arguments go to the benchmark)."
    ),
) -> None:
    """Speed benchmarks: ttt.benchmarks.{layer,decode,train}_speed; arguments after WHICH go to the benchmark.

    Use -- to pass options the benchmark shares with this command: ttt bench layer -- --help.
    """
    import importlib

    names = list(BENCHMARKS) if which == "all" else [which]
    for n in names:
        if n not in BENCHMARKS:
            raise _fail(f"unknown benchmark {n!r}; choose from {[*BENCHMARKS, 'all']}")
    missing = []
    for n in names:
        module = f"ttt.benchmarks.{BENCHMARKS[n]}"
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"benchmark {n!r} is not available ({module} could not be imported: {e})")
            if which != "all":
                raise _fail(missing[-1]) from None
            err_console.print(f"[yellow]skipping:[/] {missing[-1]}")
            continue
        if not hasattr(mod, "main"):
            raise _fail(f"{module} has no main(argv) entry point")
        console.rule(f"benchmark: {n}")
        mod.main(list(ctx.args))
    if missing:
        raise _fail(f"{len(missing)} of {len(names)} benchmarks were not available")


def main() -> None:  # pragma: no cover - console entry alias
    """Run the app (``python -m ttt.cli``)."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
