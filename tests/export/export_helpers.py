"""Helpers of the export tests: a small run directory written with the trainer's own checkpoint code,
and a clean Python subprocess in which the ``ttt`` package cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from ttt.data.corpus import Document, load_shakespeare
from ttt.data.tokenizer import (
    RUN_TOKENIZER_DIR,
    byte_tokenizer,
    save_tokenizer,
    tokenizer_fingerprint,
    train_bpe_tokenizer,
)
from ttt.models.registry import build_model
from ttt.training import load_config
from ttt.training.checkpoint import rng_state, save_checkpoint, tokenizer_files

SEQ_LEN = 32
BPE_VOCAB = 300


def corpus_documents(n: int = 40, chars: int = 1500) -> list[Document]:
    text = " ".join(d.text for d in load_shakespeare())
    return [Document(name=f"doc{i}", text=text[i * chars:(i + 1) * chars]) for i in range(n)]


def write_corpus(path: Path, docs: list[Document]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs))
    return path


def make_run(root: Path, tokenizer: str = "bpe", backbone: str = "mamba", steps: tuple[int, ...] = (1, 2),
             corpus: Path | None = None, save_tok: bool = True) -> Path:
    """A run directory as ``ttt train`` leaves it: checkpoints (trainer format), tokenizer, metrics."""
    run = root / "run"
    docs = corpus_documents()
    tok = train_bpe_tokenizer(docs, BPE_VOCAB) if tokenizer == "bpe" else byte_tokenizer()
    if save_tok:
        save_tokenizer(tok, run / RUN_TOKENIZER_DIR)
    extra = [f"data.source={corpus}"] if corpus is not None else []
    overrides = [f"train.run_dir={run}", f"data.cache_dir={root / 'cache'}", f"data.tokenizer={tokenizer}",
                 f"data.seq_len={SEQ_LEN}",
                 f"model.backbone={backbone}", *extra]
    cfg = load_config("tiny", overrides + ([f"data.vocab_size={BPE_VOCAB}"] if tokenizer == "bpe" else []))
    torch.manual_seed(0)
    model = build_model("ttt-linear", "tiny", len(tok), SEQ_LEN, backbone=backbone)
    with torch.no_grad():
        for p in model.parameters():  # not the initialisation: every weight matters
            p.add_(0.05 * torch.randn_like(p))
    model.config.use_cache = False  # as the trainer saves it
    records = []
    for step in steps:
        with torch.no_grad():
            model.lm_head.weight.mul_(1.01)
        meta = {"arch": "ttt-linear", "size": "tiny", "tokens": step * 64, "seq_len": SEQ_LEN,
                "global_batch": 2, "total_steps": max(steps), "world_size": 1,
                "model_config": model.config.to_dict(), "config": cfg.to_dict(),
                "tokenizer_sha256": tokenizer_fingerprint(tok), "tokenizer_files": tokenizer_files(run)}
        trainer_state = {"step": step, "tokens": step * 64, "sampler": {}, "rng": rng_state()}
        save_checkpoint(run, step, model.state_dict(), {"state": {}, "param_groups": []}, trainer_state, meta,
                        keep=10)
        records.append({"step": step, "tokens": step * 64, "split": "val", "loss": 5.0 - step})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


CHILD_PRELUDE = """
import sys
sys.path[:] = [p for p in sys.path if not p.rstrip('/').endswith('/src')]
for name in list(sys.modules):
    if name == 'ttt' or name.startswith('ttt.'):
        del sys.modules[name]
try:
    import ttt  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit('the ttt package is importable in the clean subprocess')
import warnings
warnings.simplefilter('error')
warnings.filterwarnings('ignore', category=DeprecationWarning)
"""


def run_clean(code: str, *args: str, timeout: float = 600, strict_warnings: bool = True
              ) -> subprocess.CompletedProcess:
    """Run ``code`` in ``python -I`` (no PYTHONPATH, no user site) with every ``.../src`` path (the
    editable install of this package) removed, offline; fails if ``ttt`` is importable there."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    prelude = CHILD_PRELUDE if strict_warnings else CHILD_PRELUDE.split("import warnings")[0]
    return subprocess.run([sys.executable, "-I", "-c", prelude + code, *args], capture_output=True,
                          stdin=subprocess.DEVNULL,
                          text=True, timeout=timeout, env=env)
