"""``ttt data ...``: prepare a corpus once into sharded token files (see :mod:`ttt.data.prepare`)."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console

data_app = typer.Typer(
    name="data",
    help="Prepare corpora: stream, split and tokenize them in parallel into sharded token files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
_console = Console(soft_wrap=True)
_err = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    _err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    return typer.Exit(code)


@data_app.command("prepare")
def prepare_cmd(
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
    from ttt.data import DataError
    from ttt.data.prepare import PrepareConfig, default_workers, prepare_corpus

    files: str | list[str] | None = None
    if data_files:
        files = data_files[0] if len(data_files) == 1 else list(data_files)
    cfg = PrepareConfig(source=source, text_field=text_field, data_files=files, streaming=streaming,
                        tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction, seed=seed,
                        workers=workers, shard_mb=shard_mb, bpe_sample_mb=bpe_sample_mb)

    def log(msg: str) -> None:
        _err.print(msg, markup=False, highlight=False)

    t0, cpu0, kids0 = time.perf_counter(), time.process_time(), _children_cpu()
    try:
        manifest = prepare_corpus(cfg, out, log=log)
    except (DataError, OSError) as e:
        raise _fail(str(e)) from None
    seconds = time.perf_counter() - t0
    cpu, kids = time.process_time() - cpu0, _children_cpu() - kids0
    mb = manifest["source"]["num_bytes"] / 1e6
    tok = manifest["tokenizer"]
    _console.print(f"prepared {out}: {manifest['source']['num_docs']} documents, {mb:.1f} MB of text, "
                   f"tokenizer {tok['spec']} ({tok['vocab_size']} tokens, {manifest['dtype']})",
                   markup=False, highlight=False)
    for split, info in manifest["splits"].items():
        _console.print(f"  {split}: {info['num_docs']} documents, {info['num_tokens']} tokens, "
                       f"{len(info['shards'])} shards", markup=False, highlight=False)
    _console.print(f"wall time of this command: {seconds:.1f} s "
                   f"({mb / max(seconds, 1e-9):.1f} MB of text per second, "
                   f"{cfg.workers or default_workers()} worker(s))", markup=False, highlight=False)
    _console.print(f"CPU time of the preparation: {cpu:.1f} s in this process, {kids:.1f} s in worker "
                   "processes", markup=False, highlight=False)


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished child processes."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


@data_app.command("info")
def info_cmd(path: Path = typer.Argument(..., help="A prepared directory.")) -> None:
    """Print the manifest of a prepared directory (counts, tokenizer, split, shards)."""
    import json

    from ttt.data import DataError, read_manifest

    try:
        manifest = read_manifest(path)
    except DataError as e:
        raise _fail(str(e)) from None
    summary = {k: v for k, v in manifest.items() if k != "splits"}
    summary["splits"] = {s: {k: v for k, v in info.items() if k != "shards"} | {"shards": len(info["shards"])}
                         for s, info in manifest["splits"].items()}
    _console.print_json(json.dumps(summary))
