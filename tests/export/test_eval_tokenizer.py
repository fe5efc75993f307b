"""Every command that loads a model uses exactly the model's tokenizer, and every evaluation says what it
measured (issue 10, points 1 and 4), including the exact repros of the issue."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from export_helpers import corpus_documents, make_run, write_corpus
from typer.testing import CliRunner

from ttt.cli import app
from ttt.data.tokenizer import load_tokenizer, tokenizer_fingerprint

runner = CliRunner()
EVAL = ["--seq-len", "32", "--max-windows", "4", "--buckets", "4"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaltok")
    corpus = write_corpus(root / "corpus" / "c.jsonl", corpus_documents())
    run = make_run(root, corpus=corpus, steps=(1,))
    res = runner.invoke(app, ["export", str(run), str(root / "out")])
    assert res.exit_code == 0, res.output
    return {"root": root, "run": run, "out": root / "out", "corpus": corpus}


def _eval(path: Path, out: Path, *extra: str) -> dict:
    res = runner.invoke(app, ["eval", str(path), *EVAL, "--out", str(out), *extra])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "eval.json").read_text())
    data["_output"] = res.output
    return data


def test_eval_of_export_uses_its_bpe_tokenizer_repro(setup, tmp_path) -> None:
    """Repro: ``ttt eval <exported HF dir> --data ...`` applied the byte tokenizer to a BPE model."""
    run, out, corpus = setup["run"], setup["out"], setup["corpus"]
    via_export = _eval(out, tmp_path / "a", "--data", str(corpus))
    via_run = _eval(run, tmp_path / "b", "--data", str(corpus))
    via_run_default = _eval(run, tmp_path / "c")  # the run's own corpus
    assert via_export["loss"] == pytest.approx(via_run["loss"], abs=1e-6)
    assert via_run_default["loss"] == pytest.approx(via_run["loss"], abs=1e-6)
    sha = tokenizer_fingerprint(load_tokenizer(run / "tokenizer"))[:16]
    for data in (via_export, via_run, via_run_default):
        tok = data["extra"]["tokenizer"]
        assert tok["sha256"] == sha and tok["kind"] == "bpe" and tok["vocab_size"] == 300
        assert data["extra"]["corpus"] == {"source": str(corpus), "split": "validation"}
        assert data["num_windows"] == 4 and data["num_tokens"] == 4 * 31
        text = data["_output"]
        assert f"sha256 {sha}" in text and f"corpus {corpus}" in text and "4 windows x 32 tokens" in text
    # without --data the export evaluates on its run's corpus (recorded in ttt_run.json), not Shakespeare
    assert _eval(out, tmp_path / "d")["extra"]["corpus"]["source"] == str(corpus)


def test_tokenizer_mismatch_is_an_error(setup, tmp_path) -> None:
    out = setup["out"]
    res = runner.invoke(app, ["eval", str(out), *EVAL, "--tokenizer", "byte", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "differs from --tokenizer byte" in res.output, res.output
    # an HF directory without tokenizer or run: the byte tokenizer's end-of-text id is not the model's
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "ttt_run.json"):
        (bare / name).unlink()
    data = ["--data", str(setup["corpus"])]
    res = runner.invoke(app, ["eval", str(bare), *EVAL, *data, "--out", str(tmp_path)])
    assert res.exit_code == 2 and "no tokenizer and no training run" in res.output, res.output
    res = runner.invoke(app, ["eval", str(bare), *EVAL, *data, "--tokenizer", "byte", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "end-of-text id is 256 but the model's is 0" in res.output, res.output
    res = runner.invoke(app, ["eval", str(bare), *EVAL, "--tokenizer", str(out), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "pass --data" in res.output, res.output
    assert "Traceback" not in res.output


def test_corpus_deleted_or_edited_does_not_change_the_tokenizer_repro(setup, tmp_path) -> None:
    """Repro: eval/generate re-trained the run's BPE tokenizer from the corpus: with the corpus deleted
    generate failed; with it edited, a different tokenizer was silently used."""
    root, run, corpus = setup["root"], setup["run"], setup["corpus"]
    copy = tmp_path / "copy" / corpus.name
    copy.parent.mkdir()
    shutil.copy(corpus, copy)
    gen_args = ["--prompt", "ROMEO:", "--max-new-tokens", "12", "--temperature", "0"]
    before_gen = runner.invoke(app, ["generate", str(run), *gen_args])
    assert before_gen.exit_code == 0, before_gen.output
    before = _eval(run, tmp_path / "e1", "--data", str(copy))
    saved = corpus.read_text()
    try:
        corpus.write_text("".join(json.dumps({"text": f"entirely different words {i} " * 40}) + "\n"
                                  for i in range(30)))
        shutil.rmtree(root / "cache", ignore_errors=True)  # nothing cached to fall back on
        edited = _eval(run, tmp_path / "e2", "--data", str(copy))
        corpus.unlink()
        deleted = _eval(run, tmp_path / "e3", "--data", str(copy))
        after_gen = runner.invoke(app, ["generate", str(run), *gen_args])
        assert after_gen.exit_code == 0, after_gen.output
        export_gen = runner.invoke(app, ["generate", str(setup["out"]), *gen_args])
    finally:
        corpus.write_text(saved)
    assert edited["loss"] == before["loss"] and deleted["loss"] == before["loss"]
    assert edited["extra"]["tokenizer"]["sha256"] == before["extra"]["tokenizer"]["sha256"]
    def text(output: str) -> str:  # the streamed text (after any progress bar of the loader)
        return output[output.index("ROMEO:"):].strip()

    assert text(after_gen.output) == text(before_gen.output) == text(export_gen.output)
    assert len(text(before_gen.output).strip()) > len("ROMEO:")
