"""lm-evaluation-harness on an exported model (issue 10, point 3): ``lm_eval --model hf`` in a clean
subprocess without ``ttt``, and ``ttt eval --lm-eval``, on a tiny local task; both are checked against
log-likelihoods computed here independently with this package's model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from export_helpers import make_run, run_clean
from typer.testing import CliRunner

from ttt.cli import app
from ttt.data.tokenizer import load_tokenizer
from ttt.models import TTTForCausalLM

runner = CliRunner()
TASK = "ttt_tiny_choice"
DOCS = [
    {"context": "ROMEO: I love", "choices": [" thee", " stone", " seven"], "label": 0},
    {"context": "JULIET: Good", "choices": [" night", " fish"], "label": 0},
    {"context": "To be or not to", "choices": [" be", " cat"], "label": 0},
    {"context": "My lord, the", "choices": [" king", " queen"], "label": 1},
    {"context": "What light through yonder", "choices": [" window", " breaks", " dog"], "label": 2},
]


def write_task(folder: Path) -> Path:
    """A multiple-choice task over a local JSONL file (no download)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / "tiny.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
target_delimiter: ""
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return folder


def reference_loglikelihoods(model_dir: Path) -> list[list[float]]:
    """Sum of log-probabilities of each choice given its context, computed with ``ttt``'s own model;
    the continuation's tokens are those of ``tok(context + choice)`` after ``tok(context)``."""
    tok = load_tokenizer(model_dir)
    model = TTTForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for doc in DOCS:
        ctx = tok(doc["context"]).input_ids
        row = []
        for choice in doc["choices"]:
            whole = tok(doc["context"] + choice).input_ids
            assert whole[:len(ctx)] == ctx
            with torch.no_grad():
                logp = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
            cont = whole[len(ctx):]
            row.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        out.append(row)
    return out


@pytest.mark.slow
def test_lm_eval_on_exported_model(tmp_path) -> None:
    run = make_run(tmp_path, steps=(1,))
    out = tmp_path / "out"
    assert runner.invoke(app, ["export", str(run), str(out)]).exit_code == 0
    tasks = write_task(tmp_path / "tasks")
    ref = reference_loglikelihoods(out)
    ref_acc = sum(max(range(len(r)), key=r.__getitem__) == d["label"] for r, d in zip(ref, DOCS)) / len(DOCS)

    # the lm_eval command line, in a process where ttt cannot be imported
    code = """
import sys
from lm_eval.__main__ import cli_evaluate
sys.argv = ['lm_eval', '--model', 'hf', '--model_args', f'pretrained={sys.argv[1]},trust_remote_code=True',
            '--tasks', sys.argv[2], '--include_path', sys.argv[3], '--device', 'cpu', '--batch_size', '2',
            '--output_path', sys.argv[4], '--log_samples']
cli_evaluate()
"""
    res = run_clean(code, str(out), TASK, str(tasks), str(tmp_path / "results"), strict_warnings=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert TASK in res.stdout and "acc" in res.stdout
    results = json.loads(next((tmp_path / "results").rglob("results_*.json")).read_text())
    assert results["results"][TASK]["acc,none"] == pytest.approx(ref_acc)
    samples = [json.loads(line) for line in next((tmp_path / "results").rglob(f"samples_{TASK}_*.jsonl"))
               .read_text().splitlines()]
    assert len(samples) == len(DOCS)
    for s in samples:
        got = [float(r[0][0]) for r in s["resps"]]
        assert got == pytest.approx(ref[s["doc_id"]], abs=1e-3)

    # ttt eval --lm-eval wraps the same harness, on the export and on the run directory itself
    for path in (out, run):
        res = runner.invoke(app, ["eval", str(path), "--lm-eval", TASK, "--lm-eval-include", str(tasks),
                                  "--batch-size", "2", "--out", str(tmp_path / "ttt_eval")])
        assert res.exit_code == 0, res.output
        data = json.loads((tmp_path / "ttt_eval" / "lm_eval.json").read_text())
        assert data["results"][TASK]["acc,none"] == pytest.approx(ref_acc)
        assert data["ttt"]["model"] == str(path) and TASK in res.output


@pytest.mark.slow  # indexing every lm-eval task takes ~10 s
def test_lm_eval_errors(tmp_path) -> None:
    run = make_run(tmp_path, steps=(1,))
    res = runner.invoke(app, ["eval", str(run), "--lm-eval", "no_such_task_xyz", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown lm-eval task" in res.output, res.output
    res = runner.invoke(app, ["eval", "--arch", "ttt-linear", "--lm-eval", "x", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "give PATH" in res.output
