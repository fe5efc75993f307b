"""End to end (issue 10): train a tiny model with a BPE tokenizer -> delete the corpus -> eval, generate
and export still work and give the same numbers -> the export loads in a clean subprocess without
``ttt`` -> lm-eval on a tiny local task."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from export_helpers import corpus_documents, run_clean, write_corpus
from test_lm_eval import TASK, reference_loglikelihoods, write_task
from typer.testing import CliRunner

from ttt.cli import app
from ttt.data.tokenizer import load_tokenizer, tokenizer_fingerprint

runner = CliRunner()


@pytest.mark.slow
def test_train_bpe_delete_corpus_eval_generate_export_lm_eval(tmp_path) -> None:
    corpus = write_corpus(tmp_path / "corpus" / "c.jsonl", corpus_documents(60))
    keep = tmp_path / "keep" / "c.jsonl"  # the same documents elsewhere, for evaluating after deletion
    keep.parent.mkdir()
    shutil.copy(corpus, keep)
    run = tmp_path / "run"
    res = runner.invoke(app, [
        "train", "tiny", f"train.run_dir={run}", f"data.cache_dir={tmp_path / 'cache'}",
        f"data.source={corpus}",
        "data.tokenizer=bpe", "data.vocab_size=320", "data.seq_len=32", "data.val_rows=4", "train.steps=4",
        "train.micro_batch_size=2", "train.eval_every=2", "log.progress=false", "log.tensorboard=false",
        "train.device=cpu",
    ])
    assert res.exit_code == 0, res.output
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    run_tok = load_tokenizer(run / "tokenizer")
    meta = json.loads((run / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["tokenizer_sha256"] == tokenizer_fingerprint(run_tok)

    ev = ["--seq-len", "32", "--max-windows", "6", "--buckets", "4"]
    gen = ["--prompt", "ROMEO:", "--max-new-tokens", "16", "--temperature", "0"]

    def evaluate(path, name, *extra):
        r = runner.invoke(app, ["eval", str(path), *ev, "--out", str(tmp_path / name), *extra])
        assert r.exit_code == 0, r.output
        return json.loads((tmp_path / name / "eval.json").read_text())

    def generate(path):
        r = runner.invoke(app, ["generate", str(path), *gen])
        assert r.exit_code == 0, r.output
        return r.output[r.output.index("ROMEO:"):].strip()

    before = evaluate(run, "before")
    before_text = generate(run)
    shutil.rmtree(corpus.parent)
    shutil.rmtree(tmp_path / "cache")
    after = evaluate(run, "after", "--data", str(keep))
    assert after["loss"] == before["loss"] and after["num_tokens"] == before["num_tokens"]
    assert generate(run) == before_text
    res = runner.invoke(app, ["eval", str(run), *ev, "--out", str(tmp_path / "x")])  # its corpus is gone
    assert res.exit_code == 2 and "Traceback" not in res.output

    out = tmp_path / "export"
    res = runner.invoke(app, ["export", str(run), str(out)])
    assert res.exit_code == 0, res.output
    assert evaluate(out, "exported", "--data", str(keep))["loss"] == before["loss"]
    assert generate(out) == before_text
    val = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val_loss = [r["loss"] for r in val if r.get("split") == "val"][-1]
    assert f"validation loss | {val_loss:.4f}" in (out / "README.md").read_text()

    # a clean process without ttt: plain transformers gives the same greedy text
    code = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = tok('ROMEO:', return_tensors='pt').input_ids
print('RESULT', repr(tok.decode(model.generate(ids, max_new_tokens=16, do_sample=False)[0])))
"""
    res = run_clean(code, str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    line = res.stdout[res.stdout.index("RESULT ") + 7:].strip()
    assert eval(line).strip() == before_text  # noqa: S307 - the child's own repr()

    # lm-eval on a tiny local task, against independently computed log-likelihoods
    tasks = write_task(tmp_path / "tasks")
    ref = reference_loglikelihoods(out)
    from test_lm_eval import DOCS

    ref_acc = sum(max(range(len(r)), key=r.__getitem__) == d["label"] for r, d in zip(ref, DOCS)) / len(DOCS)
    res = runner.invoke(app, ["eval", str(out), "--lm-eval", TASK, "--lm-eval-include", str(tasks),
                              "--out", str(tmp_path / "lm")])
    assert res.exit_code == 0, res.output
    got = json.loads((tmp_path / "lm" / "lm_eval.json").read_text())["results"][TASK]["acc,none"]
    assert got == pytest.approx(ref_acc)
    assert all(math.isfinite(v) for row in ref for v in row)
