"""Multi-query associative recall (MQAR), the Zoology-style synthetic recall benchmark.

A sequence starts with ``num_kv_pairs`` key-value pairs ``k1 v1 k2 v2 ...``; later, at random
positions, each key appears again as a query and must be followed by its value. Keys come from the
lower half of the vocabulary (ids ``1 .. vocab_size // 2 - 1``), values from the upper half; id 0 is the
filler token between queries. As in Zoology, the answer is *not* in the input (the position after a
query holds the filler 0), so earlier answers cannot be used to rule values out; the loss is taken only
on the answers: ``labels`` is -100 everywhere except at the position after a query, which holds the
key's value (HF convention: ``labels`` are aligned with ``input_ids`` and shifted inside the model, so
the model predicts ``labels[t]`` from tokens ``< t``).

>>> ids, labels = generate_mqar(2, seq_len=32, num_kv_pairs=4, vocab_size=64, seed=0)
>>> ids.shape, int((labels != -100).sum())
(torch.Size([2, 32]), 8)

:func:`run_mqar` trains one small 2-layer model per (architecture, width, learning rate) on a mixture
of (sequence length, number of key-value pairs) settings, after a short curriculum on the easiest one,
then measures the answer accuracy on held-out sequences of every setting.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ttt.data import IGNORE_INDEX
from ttt.models.registry import ARCHS, build_model
from ttt.util.device import pick_device
from ttt.util.files import atomic_write_json, atomic_write_text

from .plots import plot_mqar


def generate_mqar(
    num_examples: int,
    seq_len: int,
    num_kv_pairs: int,
    vocab_size: int,
    seed: int = 0,
    reveal_answers: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate MQAR examples.

    Args:
        num_examples: number of sequences.
        seq_len: tokens per sequence; needs ``seq_len >= 4 * num_kv_pairs`` (pairs + one query slot each).
        num_kv_pairs: key-value pairs per sequence (each key is queried once, in random order).
        vocab_size: total vocabulary; keys are drawn without replacement from ``1 .. vocab_size//2 - 1``,
            values (with replacement) from ``vocab_size//2 .. vocab_size - 1``.
        seed: generator seed (same seed, same data).
        reveal_answers: also put each answer in the input after its query (this repository's
            pre-Zoology variant). Off by default: with the answers visible a model can score well on
            late queries by ruling out the values already answered, and small models get stuck on that
            shortcut instead of learning the lookup.

    Returns:
        ``(input_ids, labels)``, both ``LongTensor[num_examples, seq_len]``; labels hold the value at each
        answer position and -100 elsewhere.
    """
    key_hi = vocab_size // 2
    if num_kv_pairs < 1:
        raise ValueError("num_kv_pairs must be at least 1")
    if key_hi - 1 < num_kv_pairs:
        raise ValueError(f"vocab_size {vocab_size} too small for {num_kv_pairs} distinct keys")
    if seq_len < 4 * num_kv_pairs:
        raise ValueError(f"seq_len {seq_len} must be >= 4 * num_kv_pairs = {4 * num_kv_pairs}")
    rng = np.random.default_rng(seed)
    n, p = num_examples, num_kv_pairs
    keys = np.argsort(rng.random((n, key_hi - 1)), axis=1)[:, :p] + 1
    values = rng.integers(key_hi, vocab_size, size=(n, p))
    ids = np.zeros((n, seq_len), dtype=np.int64)
    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    ids[:, 0 : 2 * p : 2] = keys
    ids[:, 1 : 2 * p : 2] = values
    # query slots: pairs of positions (q, q+1) after the context, chosen without overlap
    num_slots = (seq_len - 2 * p) // 2
    rows = np.arange(n)[:, None]
    slots = np.sort(np.argsort(rng.random((n, num_slots)), axis=1)[:, :p], axis=1)
    qpos = 2 * p + 2 * slots
    order = np.argsort(rng.random((n, p)), axis=1)  # which pair is asked in each slot
    ids[rows, qpos] = keys[rows, order]
    if reveal_answers:
        ids[rows, qpos + 1] = values[rows, order]
    labels[rows, qpos + 1] = values[rows, order]
    return torch.from_numpy(ids), torch.from_numpy(labels)


def chance_accuracy(vocab_size: int) -> float:
    """Accuracy of guessing uniformly among the possible values (``1 / (vocab_size - vocab_size // 2)``)."""
    return 1.0 / (vocab_size - vocab_size // 2)


def mqar_settings(seq_lens: Sequence[int], num_kv_pairs: Sequence[int]) -> list[tuple[int, int]]:
    """The ``(seq_len, num_kv_pairs)`` grid that :func:`generate_mqar` accepts (``4 * pairs <= seq_len``),
    easiest (shortest, fewest pairs) first."""
    grid = [(s, p) for s in sorted(set(seq_lens)) for p in sorted(set(num_kv_pairs)) if 4 * p <= s]
    if not grid:
        raise ValueError(
            f"no setting with seq_len >= 4 * num_kv_pairs among seq_lens {list(seq_lens)} "
            f"and num_kv_pairs {list(num_kv_pairs)}"
        )
    return grid




# ----------------------------------------------------------------------------------------------------
# runner
# ----------------------------------------------------------------------------------------------------


@dataclass
class MQARConfig:
    """Settings of an MQAR sweep (see :data:`MQAR_PRESETS`).

    Every (arch, width, lr) trains one model for ``steps`` AdamW steps (warmup + cosine) on the grid
    :func:`mqar_settings` ``(seq_lens, num_kv_pairs)``: the first ``curriculum_steps`` steps on the
    easiest setting only, then a uniformly random setting per batch. A batch holds
    ``tokens_per_batch // seq_len`` sequences drawn from a fixed training set of ``train_examples``
    sequences per setting (cycled: several epochs). Accuracy is measured per setting on
    ``test_examples`` held-out sequences. Whether a model learns recall at all is a matter of luck at
    these budgets (a sudden transition, as for induction heads); so if after the curriculum a model's
    accuracy on held-out *validation* sequences of the easiest setting is below ``curriculum_pass``,
    it is rebuilt from the next seed and trained again, up to ``restarts`` times (the same rule for
    every architecture; the attempts and their time are recorded). ``max_seq_len`` caps the lengths
    of some architectures (e.g. ``{"mamba": 128}``: its CPU scan is slow); their longer settings are skipped.
    ``model_overrides`` sets model config fields per architecture (e.g.
    ``{"ttt-mlp": {"ttt_base_lr": 1.0}}``). ``jobs`` trains that many runs at once in worker processes,
    splitting the CPU threads among them (each run is seeded on its own, whatever the order).
    """

    archs: list[str] = field(default_factory=lambda: list(ARCHS))
    seq_lens: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    num_kv_pairs: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64])
    widths: list[int] = field(default_factory=lambda: [64, 128])
    lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3])
    lrs_by_arch: dict[str, list[float]] = field(default_factory=dict)  # replaces ``lrs`` for an arch
    num_layers: int = 2
    num_heads: int | None = 1  # attention / TTT heads; None keeps the size preset's (4)
    ttt_backbone: str = "transformer"  # "mamba": causal conv before the TTT layer (paper's TTT (M))
    vocab_size: int = 8192
    steps: int = 20000
    curriculum_steps: int = 2000
    tokens_per_batch: int = 4096
    train_examples: int = 20000
    test_examples: int = 1000
    weight_decay: float = 0.0
    restarts: int = 0
    curriculum_pass: float = 0.5
    max_seq_len: dict[str, int] = field(default_factory=dict)
    model_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"
    jobs: int = 1


MQAR_PRESETS: dict[str, dict[str, Any]] = {
    # seconds, for the test suite (too short to learn)
    "smoke": dict(
        archs=["ttt-linear", "transformer"],
        seq_lens=[16, 32],
        num_kv_pairs=[2, 4],
        widths=[32],
        lrs=[3e-3],
        vocab_size=64,
        steps=6,
        curriculum_steps=2,
        tokens_per_batch=256,
        train_examples=64,
        test_examples=16,
    ),
    # learns on this 2-core CPU in under half an hour (timed: 24 min wall, 27 CPU-min): two worker
    # processes, the slowest runs first (Mamba's pure-PyTorch scan alone is ~half of the CPU time);
    # docs/results.md, "MQAR"
    "cpu": dict(
        archs=["mamba", "mamba2", "ttt-mlp", "ttt-linear", "transformer"],
        seq_lens=[32, 64, 128, 256],
        num_kv_pairs=[4, 8, 16],
        widths=[64],
        lrs=[3e-3],
        num_heads=1,
        ttt_backbone="mamba",
        vocab_size=64,
        steps=3000,
        curriculum_steps=1200,
        tokens_per_batch=1024,
        train_examples=10000,
        test_examples=256,
        restarts=2,
        max_seq_len={"mamba": 128},
        jobs=2,
    ),
    # the standard sweep (GPU-sized; not run in this repository)
    "default": dict(restarts=2),
}


ModelFactory = Callable[[str, int, int, int, int], torch.nn.Module]


def registry_factory(
    arch: str,
    width: int,
    num_layers: int,
    vocab_size: int,
    seq_len: int,
    num_heads: int | None = None,
    ttt_backbone: str = "transformer",
    model_overrides: dict[str, dict[str, Any]] | None = None,
) -> torch.nn.Module:
    """Build ``arch`` with :func:`ttt.models.registry.build_model` at the given width and depth.

    All architectures get the same width and depth (Zoology's protocol, not parameter matching); the
    SwiGLU width of TTT / Transformer blocks is ``8/3 * width`` rounded to a multiple of 8.
    ``num_heads`` sets the attention / TTT heads (``None``: the ``tiny`` preset's 4); ``ttt_backbone``
    is the TTT models' block (``"mamba"``: a causal conv before the TTT layer, the paper's TTT (M)
    variant; see :func:`ttt.models.presets.backbone_flags`); Mamba-2's scan
    chunk is ``min(seq_len, 32)`` (its pure-PyTorch scan pads every sequence to a whole chunk);
    ``model_overrides[arch]`` (config fields) is applied last.
    """
    fields: dict[str, Any] = {"hidden_size": width, "num_hidden_layers": num_layers}
    if arch in ("ttt-linear", "ttt-mlp", "transformer"):
        fields["intermediate_size"] = max(8, round(8 * width / 3 / 8) * 8)
        if num_heads is not None:
            fields["num_attention_heads"] = num_heads
            if arch == "transformer":
                fields["num_key_value_heads"] = num_heads
    if arch == "mamba2":
        fields["chunk_size"] = min(seq_len, 32)
    if arch in ("ttt-linear", "ttt-mlp"):
        fields["backbone"] = ttt_backbone
    fields.update((model_overrides or {}).get(arch, {}))
    return build_model(arch, "tiny", vocab_size=vocab_size, max_seq_len=seq_len, match=False, **fields)


def _forward_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def _answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


@torch.no_grad()
def mqar_accuracy(
    model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, batch_size: int = 64
) -> float:
    """Fraction of answer tokens predicted exactly (argmax) by ``model``."""
    model.eval()
    device = next(model.parameters()).device
    correct = total = 0
    for i in range(0, len(ids), batch_size):
        x, y = ids[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
        pred = _forward_logits(model, x)[:, :-1].argmax(-1)
        tgt = y[:, 1:]
        mask = tgt != IGNORE_INDEX
        correct += int((pred[mask] == tgt[mask]).sum())
        total += int(mask.sum())
    return correct / max(total, 1)


Data = dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]


def train_mqar_model(
    model: torch.nn.Module,
    train: Data,
    lr: float,
    steps: int,
    tokens_per_batch: int,
    curriculum_steps: int = 0,
    weight_decay: float = 0.0,
    seed: int = 0,
    gate: Callable[[torch.nn.Module], bool] | None = None,
) -> tuple[float, bool]:
    """Train ``model`` on the answer tokens of the settings in ``train`` (AdamW, warmup + cosine).

    The first ``curriculum_steps`` batches come from the first setting of ``train`` (the easiest), the
    rest from a uniformly random setting each; a batch has ``tokens_per_batch // seq_len`` sequences
    (at least 1), read in order from a per-setting permutation that is redrawn at the end of each
    epoch. After the curriculum, ``gate(model)`` (if given) decides whether to go on; training stops
    there when it returns False. Returns (mean answer loss of the last 10% of the steps run, whether
    the gate passed).
    """
    device = next(model.parameters()).device
    settings = list(train)
    gen = torch.Generator().manual_seed(seed)
    order = {s: torch.randperm(len(train[s][0]), generator=gen) for s in settings}
    pos = dict.fromkeys(settings, 0)
    warmup = max(1, steps // 10)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    tail: list[float] = []
    for step in range(steps):
        if gate is not None and step == curriculum_steps and curriculum_steps > 0:
            passed = gate(model)
            model.train()
            if not passed:
                return float(np.mean(tail)) if tail else float("nan"), False
        if step < curriculum_steps:
            setting = settings[0]
        else:
            setting = settings[int(torch.randint(len(settings), (1,), generator=gen))]
        ids, labels = train[setting]
        bs = min(max(1, tokens_per_batch // setting[0]), len(ids))
        if pos[setting] + bs > len(ids):
            order[setting], pos[setting] = torch.randperm(len(ids), generator=gen), 0
        idx = order[setting][pos[setting] : pos[setting] + bs]
        pos[setting] += bs
        loss = _answer_loss(_forward_logits(model, ids[idx].to(device)), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        tail.append(float(loss.detach()))
        tail = tail[-max(1, steps // 10) :]
    return float(np.mean(tail)) if tail else float("nan"), True


def _accuracy_gate(
    val: tuple[torch.Tensor, torch.Tensor], threshold: float, record: list[float]
) -> Callable[[torch.nn.Module], bool]:
    """A gate for :func:`train_mqar_model`: accuracy on ``val`` >= ``threshold`` (appended to ``record``)."""

    def gate(model: torch.nn.Module) -> bool:
        record.append(mqar_accuracy(model, *val))
        return record[-1] >= threshold

    return gate


def _setting_key(seq_len: int, kv: int) -> str:
    return f"L={seq_len},kv={kv}"


def _mqar_data(cfg: MQARConfig, grid: Sequence[tuple[int, int]]) -> tuple[Data, Data]:
    """The fixed training and test sequences of every setting (the same for every run and process)."""
    train: Data = {}
    test: Data = {}
    for i, (seq_len, kv) in enumerate(grid):
        train[(seq_len, kv)] = generate_mqar(
            cfg.train_examples, seq_len, kv, cfg.vocab_size, seed=cfg.seed + i
        )
        test[(seq_len, kv)] = generate_mqar(
            cfg.test_examples, seq_len, kv, cfg.vocab_size, seed=cfg.seed + 10_000 + i
        )
    return train, test


def _arch_settings(cfg: MQARConfig, arch: str, grid: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The settings of ``grid`` that ``arch`` trains and is tested on (up to its ``max_seq_len``)."""
    cap = cfg.max_seq_len.get(arch)
    return [s for s in grid if cap is None or s[0] <= cap]


def _train_and_test(
    cfg: MQARConfig,
    arch: str,
    width: int,
    lr: float,
    factory: ModelFactory,
    log: Callable[[str], None] | None,
    data: tuple[Data, Data] | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """One run: train ``arch`` at ``width`` and ``lr`` (with the curriculum gate and restarts), then test
    it on every setting it covers. Returns the run's record (see :func:`run_mqar`)."""
    if threads is not None:  # a worker process: its share of the CPU threads
        torch.set_num_threads(threads)
    grid = mqar_settings(cfg.seq_lens, cfg.num_kv_pairs)
    train_all, test_all = data if data is not None else _mqar_data(cfg, grid)
    device = pick_device(cfg.device)
    mine = _arch_settings(cfg, arch, grid)
    easiest = mine[0]
    val = generate_mqar(128, *easiest, cfg.vocab_size, seed=cfg.seed + 20_000)
    gate_acc: list[float] = []
    gate = _accuracy_gate(val, cfg.curriculum_pass, gate_acc)
    t0, c0 = time.perf_counter(), time.process_time()
    for attempt in range(cfg.restarts + 1):
        torch.manual_seed(cfg.seed + attempt)
        model = factory(arch, width, cfg.num_layers, cfg.vocab_size, max(s[0] for s in mine)).to(device)
        loss, passed = train_mqar_model(
            model, {s: train_all[s] for s in mine}, lr, cfg.steps, cfg.tokens_per_batch,
            cfg.curriculum_steps, cfg.weight_decay, cfg.seed + attempt,
            gate=gate if attempt < cfg.restarts else None,
        )
        if log and gate_acc and len(gate_acc) == attempt + 1:
            log(f"mqar {arch:12s} attempt {attempt + 1}: validation answer accuracy after the curriculum "
                f"(L={easiest[0]}, {easiest[1]} kv pairs): {gate_acc[-1]:.3f}"
                + ("" if passed else f" < {cfg.curriculum_pass}: restart"))
        if passed:
            break
    t1 = time.perf_counter()
    batch = max(1, cfg.tokens_per_batch // max(s[0] for s in mine))
    acc = {_setting_key(*s): mqar_accuracy(model, *test_all[s], batch_size=max(batch, 16)) for s in mine}
    run = {
        "key": f"{arch}|{width}|{lr:g}",
        "config": _run_config(cfg, arch),
        "arch": arch,
        "width": width,
        "lr": lr,
        "params": model.num_parameters(),
        "settings": [list(s) for s in mine],
        "final_train_loss": loss,
        "attempts": attempt + 1,
        "curriculum_val_accuracy": gate_acc,
        "accuracy": acc,
        "chance": chance_accuracy(cfg.vocab_size),
        "threads": torch.get_num_threads(),
        "train_seconds": t1 - t0,
        "test_seconds": time.perf_counter() - t1,
        "cpu_seconds": time.process_time() - c0,  # CPU time of this process (all its threads)
    }
    if log:
        lines = [
            f"mqar {arch:12s} d={width} lr={lr:g}: trained in {t1 - t0:.0f}s ({attempt + 1} attempt(s), "
            f"{cfg.steps} steps in the last, {run['threads']} thread(s)) "
            f"(answer loss, last 10% of steps: {loss:.3f}); tested {len(mine)} settings in "
            f"{run['test_seconds']:.0f}s; {run['cpu_seconds']:.0f} CPU-seconds in all"
        ]
        lines += [
            f"  test answer accuracy at seq_len {seq_len:4d}, {kv:3d} kv pairs: {a:.3f} "
            f"(chance {run['chance']:.3f})"
            for (seq_len, kv), a in zip(mine, acc.values())
        ]
        log("\n".join(lines))
    return run


def _picklable(fn: Any) -> bool:
    """Whether ``fn`` can go to a spawned worker by reference: a module-level function or class (or a
    ``functools.partial`` of one), not a lambda, a local function or a bound method."""
    if isinstance(fn, functools.partial):
        return _picklable(fn.func)
    qual = getattr(fn, "__qualname__", "")
    return bool(getattr(fn, "__module__", None)) and bool(qual) and "<" not in qual and "." not in qual


def run_mqar(
    cfg: MQARConfig,
    out_dir: str | Path | None = None,
    model_factory: ModelFactory | None = None,
    log: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
    """Train and test every (arch, width, lr); return one row per (arch, width, seq_len, kv pairs).

    Each row keeps the best test accuracy over the learning rates, every lr's accuracy, the chance
    level and the arch's training time. With ``out_dir``, writes ``mqar.json`` (config, runs, rows,
    per-arch seconds; rewritten after each run so an interrupted sweep keeps its results and resumes:
    a stored run is reused when its arch, width, lr and :func:`_run_config` are unchanged),
    ``mqar.md`` (tables) and ``mqar.png`` (plot). With ``cfg.jobs > 1`` the runs train in that many
    worker processes (``spawn``; ``model_factory`` and ``log`` must then be picklable, e.g.
    module-level functions), in the order of ``cfg.archs``, each with ``threads // jobs`` threads.
    """
    if cfg.jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {cfg.jobs}")
    factory = model_factory or functools.partial(
        registry_factory, num_heads=cfg.num_heads, ttt_backbone=cfg.ttt_backbone,
        model_overrides=cfg.model_overrides,
    )
    out = Path(out_dir) if out_dir is not None else None
    runs: dict[str, dict[str, Any]] = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        prev = out / "mqar.json"
        if prev.exists():
            data = json.loads(prev.read_text())
            runs = {
                r["key"]: r for r in data.get("runs", []) if r.get("config") == _run_config(cfg, r["arch"])
            }
    grid = mqar_settings(cfg.seq_lens, cfg.num_kv_pairs)
    jobs = [(a, w, lr) for a in cfg.archs for w in cfg.widths for lr in cfg.lrs_by_arch.get(a, cfg.lrs)]
    keys = {f"{a}|{w}|{lr:g}" for a, w, lr in jobs}
    runs = {k: r for k, r in runs.items() if k in keys}
    todo = [(a, w, lr) for a, w, lr in jobs if f"{a}|{w}|{lr:g}" not in runs and _arch_settings(cfg, a, grid)]

    def done(run: dict[str, Any]) -> None:
        runs[run["key"]] = run
        if out is not None:
            atomic_write_json(out / "mqar.json", _result(cfg, runs, []))

    if cfg.jobs == 1 or len(todo) <= 1:
        data = _mqar_data(cfg, grid) if todo else None
        for arch, width, lr in todo:
            done(_train_and_test(cfg, arch, width, lr, factory, log, data))
    else:
        if not _picklable(factory):
            raise ValueError("jobs > 1 needs a picklable model_factory (a module-level function or partial)")
        worker_log = log if _picklable(log) else print if log else None
        threads = max(1, torch.get_num_threads() // cfg.jobs)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(cfg.jobs, len(todo)), mp_context=ctx) as pool:
            futures = [
                pool.submit(_train_and_test, cfg, arch, width, lr, factory, worker_log, None, threads)
                for arch, width, lr in todo
            ]
            for future in as_completed(futures):
                done(future.result())
    rows = summarize_mqar(list(runs.values()))
    if out is not None:
        atomic_write_json(out / "mqar.json", _result(cfg, runs, rows))
        atomic_write_text(out / "mqar.md", mqar_table(rows) + "\n")
        plot_mqar(rows, out / "mqar.png")
    return rows


def _run_config(cfg: MQARConfig, arch: str) -> dict[str, Any]:
    """The settings one arch's runs depend on (a stored run is reused only when they are unchanged)."""
    fields = asdict(cfg)
    for name in ("archs", "lrs", "lrs_by_arch", "max_seq_len", "model_overrides", "device", "jobs"):
        fields.pop(name)
    fields["max_seq_len"] = cfg.max_seq_len.get(arch)
    if cfg.model_overrides.get(arch):
        fields["model_overrides"] = cfg.model_overrides[arch]
    return fields


def _result(cfg: MQARConfig, runs: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    seconds: dict[str, float] = {}
    cpu: dict[str, float | None] = {}  # None: a run stored before CPU time was recorded
    for r in runs.values():
        seconds[r["arch"]] = seconds.get(r["arch"], 0.0) + r["train_seconds"] + r["test_seconds"]
        mine, prev = r.get("cpu_seconds"), cpu.get(r["arch"], 0.0)
        cpu[r["arch"]] = None if mine is None or prev is None else prev + mine
    known = [c for c in cpu.values() if c is not None]
    return {
        "config": asdict(cfg),
        "chance": chance_accuracy(cfg.vocab_size),
        "seconds_by_arch": seconds,
        "total_seconds": sum(seconds.values()),
        "cpu_seconds_by_arch": cpu,
        "total_cpu_seconds": sum(known) if len(known) == len(cpu) else None,
        "runs": list(runs.values()),
        "rows": rows,
    }


def summarize_mqar(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (arch, width, seq_len, kv pairs): best accuracy over lrs, per-lr accuracies, chance,
    and the arch's total train + test seconds at that width (all its lrs)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["arch"], int(r["width"])), []).append(r)
    rows = []
    for (arch, width), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        seconds = sum(r["train_seconds"] + r["test_seconds"] for r in rs)
        settings = sorted({tuple(s) for r in rs for s in r["settings"]})
        for seq_len, kv in settings:
            k = _setting_key(seq_len, kv)
            have = [r for r in rs if k in r["accuracy"]]
            best = max(have, key=lambda r: r["accuracy"][k])
            rows.append(
                {
                    "arch": arch,
                    "width": width,
                    "seq_len": seq_len,
                    "num_kv_pairs": kv,
                    "params": best["params"],
                    "accuracy": best["accuracy"][k],
                    "chance": best["chance"],
                    "best_lr": best["lr"],
                    "accuracy_by_lr": {f"{r['lr']:g}": r["accuracy"][k] for r in have},
                    "seconds": seconds,
                }
            )
    return rows


def mqar_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of test answer accuracy: one row per (width, arch, seq_len), one column per number
    of key-value pairs, then the arch's train + test time; a last row gives the chance level."""
    kvs = sorted({int(r["num_kv_pairs"]) for r in rows})
    head = "| width | architecture | params | seq len | " + " | ".join(f"{k} kv pairs" for k in kvs)
    head += " | train + test time (all lengths) |"
    sep = "|---:|---|---:|---:|" + "---:|" * len(kvs) + "---:|"
    lines = [head, sep]
    for width in sorted({int(r["width"]) for r in rows}):
        archs = sorted({r["arch"] for r in rows if int(r["width"]) == width}, key=_arch_order)
        for arch in archs:
            mine = [r for r in rows if r["arch"] == arch and int(r["width"]) == width]
            for seq_len in sorted({int(r["seq_len"]) for r in mine}):
                cells = []
                for k in kvs:
                    m = [r for r in mine if int(r["seq_len"]) == seq_len and int(r["num_kv_pairs"]) == k]
                    cells.append(f"{m[0]['accuracy']:.3f}" if m else "-")
                params = f"{mine[0]['params'] / 1e6:.3f}M"
                secs = f"{mine[0]['seconds']:.{0 if mine[0]['seconds'] >= 10 else 1}f} s"
                lines.append(
                    f"| {width} | {arch} | {params} | {seq_len} | " + " | ".join(cells) + f" | {secs} |"
                )
    chances = sorted({float(r["chance"]) for r in rows})
    chance = ", ".join(f"{c:.3f}" for c in chances)
    lines.append("| | chance (1 / possible values) | | | " + " | ".join(chance for _ in kvs) + " | |")
    return "\n".join(lines)


def _arch_order(arch: str) -> tuple[int, str]:
    return (list(ARCHS).index(arch) if arch in ARCHS else len(ARCHS), arch)
