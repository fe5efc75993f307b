"""Checkpoints that cannot run code, lose work, or be shared by two trainers (regression tests of issue 11):
no unpickling, checksums of every file, the ``latest`` rule after a crash, resuming from an older
checkpoint, the run-directory lock, non-finite values, malformed fields, the CLI's checks."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from training_utils import REPO, records, tiny_config, tiny_overrides, train_child, train_losses
from typer.testing import CliRunner

from ttt.cli import app
from ttt.evaluation.loading import find_model_dir, load_model
from ttt.training import CheckpointError, ConfigError, Trainer, TrainingError
from ttt.training import checkpoint as C
from ttt.training.schedule import warmup_cosine

runner = CliRunner()
COMMON = ("model.arch=transformer", "train.steps=4", "checkpoint.every=2", "checkpoint.keep=5",
          "optim.warmup_steps=1", "train.device=cpu")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data_cache: Path) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4 (copy it before changing anything)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    Trainer(tiny_config(run, data_cache, *COMMON), log=None).fit()
    return run


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    (dest / ".lock").unlink(missing_ok=True)
    return dest


def _write_meta(ckpt: Path, meta: dict) -> None:
    """Write meta.json with a consistent meta_sha256 (computed here, independently of the module)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    meta = {**body, "meta_sha256": hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _forge(ckpt: Path, name: str, data: bytes) -> None:
    """Replace a file *and* its recorded checksum, as someone crafting a checkpoint would."""
    (ckpt / name).write_bytes(data)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _write_meta(ckpt, meta)


def _one_line_error(res: object, needle: str) -> None:
    out = getattr(res, "output", "")
    lines = [line for line in out.splitlines() if line.strip()]
    assert getattr(res, "exit_code", None) == 2, out[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out[-2000:]


def _resume(run: Path, cache: Path, *extra: str, **kwargs: object) -> dict:
    return Trainer(tiny_config(run, cache, *COMMON, *extra), resume=kwargs.pop("resume", True), log=None,
                   **kwargs).fit()


def _outputs(run: Path) -> dict[str, bytes]:
    names = ("config.yaml", "metrics.jsonl", "metrics.csv", "summary.json")
    return {n: (run / n).read_bytes() for n in names}


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------------------------------- finding 1
def test_crafted_pickle_runs_no_code(trained: Path, tmp_path: Path, data_cache: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsCode(marker))
    pickle.loads(payload)  # the payload is real: unpickling it runs the command
    assert marker.exists()
    marker.unlink()
    # a format-1 checkpoint (pickled trainer_state.pt / optimizer.pt), checksums made to match
    run = _copy(trained, tmp_path / "v1")
    ckpt = C.latest_checkpoint(run)
    for name in ("trainer_state.pt", "optimizer.pt"):
        (ckpt / name).write_bytes(payload)
    meta = json.loads((ckpt / "meta.json").read_text())
    _write_meta(ckpt, {**meta, "format_version": 1})
    with pytest.raises(CheckpointError, match="format version 1"):
        _resume(run, data_cache, "train.steps=6")
    _one_line_error(runner.invoke(app, ["train", str(run), "--resume", "train.steps=6"]), "format version 1")
    _one_line_error(runner.invoke(app, ["eval", str(run)]), "format version 1")
    # the pickle in place of each file of a current checkpoint, with matching checksums
    for name, needle in (("trainer_state.json", "trainer_state.json is corrupt"),
                         ("optimizer.safetensors", "optimizer.safetensors is corrupt"),
                         ("model.safetensors", "model.safetensors is corrupt")):
        run = _copy(trained, tmp_path / name)
        _forge(C.latest_checkpoint(run), name, payload)
        with pytest.raises(CheckpointError, match=needle):
            _resume(run, data_cache, "train.steps=6")
        _one_line_error(runner.invoke(app, ["train", str(run), "--resume", "train.steps=6"]), needle)
        if name == "model.safetensors":
            _one_line_error(runner.invoke(app, ["generate", str(run)]), needle)
    assert not marker.exists()


def test_no_unpickling_anywhere_in_the_package() -> None:
    """Every torch.load in src/ passes weights_only=True; nothing imports pickle."""
    for path in (REPO / "src").rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        assert not re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M), path


# ---------------------------------------------------------------------------------------------- finding 2
def test_crash_between_rename_and_latest(trained: Path, tmp_path: Path, data_cache: Path) -> None:
    reference = _copy(trained, tmp_path / "reference")
    _resume(reference, data_cache, "train.steps=6")
    run = _copy(trained, tmp_path / "crashed")
    root = run / "checkpoints"
    (root / "latest").write_text("step_00000002\n")  # step_4 renamed into place, latest not yet updated
    found, note = C.latest_state(run)
    assert found == root / "step_00000004" and "newer and complete" in note
    assert find_model_dir(run) == (root / "step_00000004", run)  # eval / generate: the same rule
    log: list[str] = []
    summary = Trainer(tiny_config(run, data_cache, *COMMON, "train.steps=6"), resume=True,
                      log=log.append).fit()
    assert any("latest now names step_00000004" in line for line in log), log
    assert summary["checkpoint"] == str(root / "step_00000006")
    assert (root / "latest").read_text().strip() == "step_00000006"
    assert train_losses(run) == train_losses(reference)
    # latest naming a checkpoint that does not exist: refused by the trainer, eval and generate alike
    (root / "latest").write_text("step_00000009\n")
    with pytest.raises(CheckpointError, match="names 'step_00000009'"):
        _resume(run, data_cache, "train.steps=8")
    for cmd in (["eval", str(run)], ["generate", str(run)]):
        _one_line_error(runner.invoke(app, cmd), "names 'step_00000009'")


def test_resume_from_older_checkpoint_with_changed_setting(trained: Path, tmp_path: Path,
                                                           data_cache: Path) -> None:
    run = _copy(trained, tmp_path / "run")
    root = run / "checkpoints"
    old_step4 = load_file(str(root / "step_00000004" / "model.safetensors"))
    older = shutil.copytree(root / "step_00000002", tmp_path / "older")
    log: list[str] = []
    summary = Trainer(tiny_config(run, data_cache, *COMMON, "train.steps=8"), resume=root / "step_00000002",
                      log=log.append).fit()
    # the newer checkpoint of the abandoned continuation is set aside, not kept as the new step 4
    aside = list((root / "superseded").iterdir())
    assert [p.name.split("-")[0] for p in aside] == ["step_00000004"]
    kept = load_file(str(aside[0] / "model.safetensors"))
    assert all(torch.equal(kept[k], old_step4[k]) for k in kept)
    # the LR change is printed with the values of both schedules (computed here independently)
    warm = 1
    new, old = warmup_cosine(2, 8, warm, 3e-3, 1e-5), warmup_cosine(2, 4, warm, 3e-3, 1e-5)
    assert any(f"LR of step 3 is {new:.4g} (the saved schedule's: {old:.4g})" in line for line in log), log
    # the new step 4 and the final checkpoint equal an independent run from the same older checkpoint
    other = tmp_path / "other"
    Trainer(tiny_config(other, data_cache, *COMMON, "train.steps=8"), resume=older, log=None).fit()
    assert summary["checkpoint"] == str(root / "step_00000008")
    for step in ("step_00000004", "step_00000008"):
        mine = load_file(str(root / step / "model.safetensors"))
        ref = load_file(str(other / "checkpoints" / step / "model.safetensors"))
        assert all(torch.equal(mine[k], ref[k]) for k in ref)
    assert not all(torch.equal(old_step4[k], load_file(str(root / "step_00000004" / "model.safetensors"))[k])
                   for k in old_step4)
    assert [r["step"] for r in records(run)] == list(range(1, 9))
    assert train_losses(run)[2:] == train_losses(other)
    # a changed recipe is refused, not silently ignored
    with pytest.raises(ConfigError, match="changed optim.lr"):
        _resume(run, data_cache, "train.steps=8", "optim.lr=1e-4")


def test_save_never_keeps_an_existing_step(tmp_path: Path) -> None:
    state = {"w": torch.ones(2)}
    optim = {"state": {}, "param_groups": [{"lr": 0.1, "params": ["w"]}]}
    trainer_state = {"step": 1, "tokens": 0, "sampler": {}, "rng": C.rng_state()}
    meta = {"arch": "x", "size": "tiny", "model_config": {}, "config": {}, "global_batch": 1, "seq_len": 2,
            "total_steps": 1, "tokens": 0}
    C.save_checkpoint(tmp_path, 1, state, optim, trainer_state, meta)
    with pytest.raises(CheckpointError, match="already exists; refusing to keep it"):
        C.save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, optim, trainer_state, meta)
    assert torch.equal(load_file(str(tmp_path / "checkpoints" / "step_00000001" / "model.safetensors"))["w"],
                       torch.ones(2))


def test_supersede_sets_aside_what_does_not_lead_to_the_resumed_checkpoint(tmp_path: Path) -> None:
    optim = {"state": {}, "param_groups": [{"lr": 0.1, "params": ["w"]}]}
    meta = {"arch": "x", "size": "tiny", "model_config": {}, "config": {}, "global_batch": 1, "seq_len": 2,
            "total_steps": 9, "tokens": 0}
    run, other = tmp_path / "run", tmp_path / "other"
    for where, steps in ((run, (1, 2, 3)), (other, (5,))):
        for step in steps:
            C.save_checkpoint(where, step, {"w": torch.full((2,), float(step))}, optim,
                              {"step": step, "tokens": 0, "sampler": {}, "rng": C.rng_state()}, meta, keep=9)
    root = run / "checkpoints"
    moved = C.supersede_after(run, root / "step_00000001")  # an older checkpoint of the run itself
    assert sorted(p.name.split("-")[0] for p in moved) == ["step_00000002", "step_00000003"]
    assert [p.name for p in C.list_checkpoints(run)] == ["step_00000001"]
    assert (root / "latest").read_text().strip() == "step_00000001"
    assert all(C.open_checkpoint(p).step in (2, 3) for p in moved)  # intact, still verifiable
    moved = C.supersede_after(run, other / "checkpoints" / "step_00000005")  # another run's checkpoint
    assert [p.name.split("-")[0] for p in moved] == ["step_00000001"]
    assert C.list_checkpoints(run) == [] and not (root / "latest").exists()
    assert len(list((root / "superseded").iterdir())) == 3


def test_leftovers_of_killed_writes_are_removed_at_start(trained: Path, tmp_path: Path,
                                                         data_cache: Path) -> None:
    run = _copy(trained, tmp_path / "run")
    root = run / "checkpoints"
    junk = [root / ".tmp-step_00000006-123", root / ".old-step_00000002-77"]
    for d in junk:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    (run / ".summary.json.abc123.tmp").write_text("{")
    (run / "notes.txt").write_text("mine")
    _resume(run, data_cache, "train.steps=5")
    assert not any(d.exists() for d in junk) and not (run / ".summary.json.abc123.tmp").exists()
    assert (run / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------- finding 3
def test_two_trainers_on_one_directory(trained: Path, tmp_path: Path, data_cache: Path) -> None:
    run = _copy(trained, tmp_path / "run")
    with C.RunLock(run):  # another trainer holds the directory
        for resume in (True, None):
            with pytest.raises(CheckpointError, match="in use by another trainer"):
                Trainer(tiny_config(run, data_cache, *COMMON, "train.steps=6"), resume=resume, log=None).fit()
        _one_line_error(runner.invoke(app, ["train", str(run), "--resume", "train.steps=6"]),
                        "in use by another trainer")
    _resume(run, data_cache, "train.steps=5")  # released on exit
    # a lock held by another process (plain flock, as the OS sees it) is refused; kill -9 releases it
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; "
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); "
         "os.ftruncate(fd, 0); os.write(fd, b'pid %d' % os.getpid()); print('held', flush=True); "
         "time.sleep(120)", str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=f"in use by another trainer \\(pid {holder.pid}\\)"):
            _resume(run, data_cache, "train.steps=6")
    finally:
        holder.kill()
        holder.wait()
    with C.RunLock(run) as lock:
        assert lock.held


@pytest.mark.slow
def test_second_trainer_process_is_refused_while_the_first_runs(tmp_path: Path, data_cache: Path) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    busy = tmp_path / "busy"
    overrides = tiny_overrides(busy, data_cache, "model.arch=transformer", "train.steps=100000")
    proc = ctx.Process(target=train_child, args=(overrides,))
    proc.start()
    try:
        deadline = time.time() + 120
        while not (busy / "metrics.jsonl").exists() or not (busy / "metrics.jsonl").read_text():
            assert time.time() < deadline and proc.is_alive()
            time.sleep(0.05)
        with pytest.raises(CheckpointError, match=f"in use by another trainer \\(pid {proc.pid} "):
            Trainer(tiny_config(busy, data_cache, "train.steps=2"), log=None).fit()
        assert (busy / "metrics.jsonl").read_text()  # the running trainer's files are untouched
    finally:
        proc.kill()
        proc.join(60)
    with C.RunLock(busy) as lock:
        assert lock.held


# ---------------------------------------------------------------------------------------------- finding 4
def _flip(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 2 if path.suffix != ".safetensors" else \
        8 + int.from_bytes(data[:8], "little") + (len(data) - 8 - int.from_bytes(data[:8], "little")) // 2
    for i in range(start, min(start + count, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "trainer_state.json",
                                  "meta.json"])
def test_flipped_bytes_in_each_file(trained: Path, tmp_path: Path, data_cache: Path, name: str) -> None:
    run = _copy(trained, tmp_path / "run")
    _flip(C.latest_checkpoint(run) / name)
    before = _outputs(run)
    with pytest.raises(CheckpointError, match=re.escape(name)):
        _resume(run, data_cache, "train.steps=6")
    assert _outputs(run) == before  # nothing rewritten before the checkpoint is validated
    _one_line_error(runner.invoke(app, ["eval", str(run)]), name)


def test_edited_meta_json_is_detected(trained: Path, tmp_path: Path) -> None:
    run = _copy(trained, tmp_path / "run")
    meta = C.latest_checkpoint(run) / "meta.json"
    meta.write_text(meta.read_text().replace('"seq_len": 64', '"seq_len": 65'))
    with pytest.raises(CheckpointError, match="meta.json is corrupt"):
        C.open_checkpoint(run)


def test_nan_weights_and_optimizer_state(trained: Path, tmp_path: Path, data_cache: Path) -> None:
    for name in ("model.safetensors", "optimizer.safetensors"):
        run = _copy(trained, tmp_path / name)
        ckpt = C.latest_checkpoint(run)
        file = ckpt / name
        from safetensors import safe_open

        with safe_open(str(file), "pt") as f:
            header = f.metadata()
        tensors = load_file(str(file))
        key = sorted(k for k, v in tensors.items() if v.is_floating_point() and v.ndim > 0)[0]
        tensors[key][0] = float("nan")
        save_file(tensors, str(file), metadata=header)
        _forge(ckpt, name, file.read_bytes())
        before = _outputs(run)
        with pytest.raises(CheckpointError, match=f"{re.escape(name)} holds non-finite values"):
            _resume(run, data_cache, "train.steps=6")
        assert _outputs(run) == before
        if name == "model.safetensors":
            with pytest.raises(CheckpointError, match="non-finite"):
                load_model(run)


@pytest.mark.parametrize(("file", "change", "needle"), [
    ("meta.json", {"global_batch": "x"}, "meta.json field 'global_batch' must be int"),
    ("meta.json", {"step": -1}, "meta.json field 'step' must be int >= 0"),
    ("meta.json", {"files": None}, "meta.json field 'files'"),
    ("meta.json", {"model_config": []}, "meta.json field 'model_config'"),
    ("trainer_state.json", {"step": "4"}, "trainer_state.json: field 'step'"),
    ("trainer_state.json", {"sampler": [1]}, "trainer_state.json: field 'sampler'"),
    ("trainer_state.json", {"rng": {"python": [3, [1, 2], None]}}, "trainer_state.json: field 'rng'.python"),
])
def test_malformed_fields_name_file_and_field(trained: Path, tmp_path: Path, file: str, change: dict,
                                              needle: str) -> None:
    run = _copy(trained, tmp_path / "run")
    ckpt = C.latest_checkpoint(run)
    data = {**json.loads((ckpt / file).read_text()), **change}
    if file == "meta.json":
        _write_meta(ckpt, data)
    else:
        _forge(ckpt, file, json.dumps(data).encode())
    with pytest.raises(CheckpointError, match=re.escape(needle)):
        C.load_checkpoint_files(C.open_checkpoint(run))
    _one_line_error(runner.invoke(app, ["train", str(run), "--resume", "train.steps=6"]), needle)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, data_cache: Path) -> None:
    class NanAtStep3(Trainer):
        def _loss_sum(self, batch):  # type: ignore[no-untyped-def]
            loss, count = super()._loss_sum(batch)
            return (loss * float("nan"), count) if self.step == 2 else (loss, count)

    run = tmp_path / "run"
    cfg = tiny_config(run, data_cache, *COMMON, "checkpoint.every=1")
    with pytest.raises(TrainingError, match=r"non-finite training loss nan at step 3; .* checkpoint is "
                                            r".*step_00000002"):
        NanAtStep3(cfg, log=None).fit()
    assert [p.name for p in C.list_checkpoints(run)] == ["step_00000001", "step_00000002"]
    info = C.open_checkpoint(run)
    assert info.step == 2 and all(torch.isfinite(t).all() for t in C.read_model_state(info).values())
    assert not (run / "summary.json").exists()
    summary = Trainer(cfg, resume=True, log=None).fit()  # the run goes on from the last good checkpoint
    assert summary["steps"] == 4


# ---------------------------------------------------------------------------------------------- format
def test_rng_and_optimizer_state_round_trip_through_json_and_safetensors(tmp_path: Path) -> None:
    import random

    import numpy as np

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # a cached gaussian in numpy's state
    saved = json.loads(json.dumps(C.rng_state()))
    expected = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    C.set_rng_state(saved)
    got = (random.random(), np.random.normal(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    named = C.optimizer_state_to_named(model, opt)
    meta = {"arch": "x", "size": "tiny", "model_config": {}, "config": {}, "global_batch": 1, "seq_len": 2,
            "total_steps": 1, "tokens": 0}
    C.save_checkpoint(tmp_path, 1, model.state_dict(), named, {"step": 1, "tokens": 0, "sampler": {},
                                                                "rng": saved}, meta)
    back = C.read_optimizer_state(C.open_checkpoint(tmp_path))
    assert back["param_groups"] == named["param_groups"]
    for name, state in named["state"].items():
        assert all(torch.equal(state[k], back["state"][name][k]) for k in state)
    other = torch.optim.AdamW(model.parameters(), lr=0.1)
    C.load_named_optimizer_state(model, other, back)
    assert other.param_groups[0]["betas"] == (0.8, 0.9)


# ---------------------------------------------------------------------------------------------- finding 6
def test_eval_and_generate_check_their_options(trained: Path, tmp_path: Path) -> None:
    cases = [
        (["generate", str(trained), "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
        (["generate", str(trained), "--temperature", "-1"], "temperature must be >= 0"),
        (["generate", str(trained), "--top-p", "0"], "top_p must be in (0, 1]"),
        (["generate", str(trained), "--top-k", "-3"], "top_k must be >= 0"),
        (["eval", str(trained), "--batch-size", "0"], "--batch-size must be >= 1"),
        (["eval", str(trained), "--seq-len", "0"], "--seq-len must be >= 2"),
        (["eval", str(trained), "--buckets", "0"], "--buckets must be >= 1"),
    ]
    blocker = tmp_path / "file"
    blocker.write_text("")
    cases.append((["eval", str(trained), "--out", str(blocker / "sub")], "cannot write to --out"))
    for args, needle in cases:
        _one_line_error(runner.invoke(app, args), needle)


# ---------------------------------------------------------------------------------------------- finding 7
def test_collective_timeout_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    from ttt.training import distributed as D

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    info = D.setup("cpu", "auto", timeout_s=7)
    assert seen["timeout"] == timedelta(seconds=7) and seen["backend"] == "gloo" and info.rank == 1
    with pytest.raises(ConfigError, match="dist.timeout_s must be > 0"):
        tiny_config(Path("x"), Path("y"), "dist.timeout_s=0")
