"""One trainer for every architecture (TTT-Linear, TTT-MLP, Llama, Mamba, Mamba-2).

Batches. A *global batch* (rows per optimizer step) is ``micro_batch_size * grad_accum * world_size``
(:mod:`ttt.training.batches`). The loss of a step is the mean next-token cross-entropy over all valid
targets of the global batch (summed over ranks and micro-batches, divided by their total count), so 1
process with accumulation and N processes give the same numbers up to float summation order.

Packed rows. ``position_ids`` (restarting at 0 at each document) go to the TTT models (state reset at
document starts) and to Llama (RoPE restarts; with no attention mask and no cache, transformers builds a
block-diagonal causal mask from them, so attention does *not* cross documents). Mamba/Mamba-2 get no
``position_ids``: their PyTorch scans cannot reset state, so it flows across documents within a row
(the labels still never ask to predict a document's first token from the previous one). See
``data.document_mask``.

Exact resume. Checkpoints hold the full model/optimizer/sampler state and the RNGs; the LR schedule and
the TTT inner-LR warmup are pure functions of the step. A run interrupted after step ``k`` and resumed
reproduces the uninterrupted run's losses bit for bit (same device, world size and threads; across
world sizes up to summation order).
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ttt.data import IGNORE_INDEX, DataBundle, PackedRows, prepare_data
from ttt.data.tokenizer import tokenizer_fingerprint
from ttt.models.registry import TTT_ARCHS, build_model, model_max_length
from ttt.util.files import atomic_write_json, atomic_write_text

from . import checkpoint as ckpt
from . import distributed as D
from .batches import Batch, GlobalBatches, validation_batches
from .checkpoint import CheckpointError
from .config import RUN_CONFIG, ConfigError, TrainConfig, config_from_dict, print_config, resume_changes
from .metrics import MetricsLogger, Progress
from .schedule import inner_lr_warmup, resolve_warmup, warmup_cosine
from .signals import StopRequest

# SSM parameters the reference Mamba code exempts from weight decay (``_no_weight_decay``)
NO_DECAY_NAMES = ("A_log", "D", "dt_bias")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on parameters with 2+ dims, except embeddings (and weights tied to them),
    Mamba's ``A_log``/``D``/``dt_bias`` and parameters flagged ``_no_weight_decay``; no decay on norms,
    biases and other vectors."""
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = name.rsplit(".", 1)[-1] in NO_DECAY_NAMES or getattr(p, "_no_weight_decay", False)
        (no_decay if p.ndim < 2 or id(p) in embed_ids or exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_for_training(cfg: TrainConfig, vocab_size: int) -> nn.Module:
    """The model of ``cfg.model`` for a tokenizer of ``vocab_size`` tokens, seeded with ``train.seed``."""
    m, seq_len = cfg.model, cfg.data.seq_len
    overrides = dict(m.overrides)
    vocab = int(overrides.pop("vocab_size", vocab_size))
    if vocab_size > vocab:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens but model.overrides.vocab_size={vocab}: "
                          "the model's vocabulary must be at least the tokenizer's")
    seed_everything(cfg.train.seed)
    try:
        model = build_model(m.arch, m.size, vocab, seq_len, reference_arch=m.match_reference,
                            backbone=m.backbone, **overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build model {m.arch}/{m.size} with overrides {m.overrides}: {e}") from None
    if seq_len > model_max_length(model):
        raise ConfigError(f"data.seq_len={seq_len} exceeds what {m.arch} supports (max_position_embeddings="
                          f"{model_max_length(model)}); lower data.seq_len or raise "
                          "model.overrides.max_position_embeddings")
    if m.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


class TrainingError(RuntimeError):
    """The run cannot go on: a non-finite loss, or a collective that timed out (a rank stopped or died)."""


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Trainer:
    """Train one model from a :class:`TrainConfig`.

    >>> summary = Trainer(load_config("tiny", ["train.steps=10"])).fit()   # doctest: +SKIP
    >>> summary["final_val_loss"], summary["tokens_per_s"], summary["run_dir"]  # doctest: +SKIP

    Args:
        cfg: the configuration.
        resume: ``None`` (fresh run; refuses a run directory that already holds checkpoints), ``True`` /
            ``"latest"`` (the run directory's latest checkpoint) or a checkpoint / run directory path. The
            checkpoint's config must equal ``cfg`` but for the keys of :data:`ttt.training.config.RESUMABLE`.
        log: where rank 0's console lines go (start-up banner, progress, validation); default stderr.
    """

    def __init__(self, cfg: TrainConfig, resume: str | bool | Path | None = None,
                 log: Callable[[str], None] | None = _stderr) -> None:
        self.cfg, self.resume = cfg, resume or None
        self._log = log or (lambda text: None)
        self.dist: D.DistInfo | None = None

    # ------------------------------------------------------------------ setup
    def _lock_run_dir(self) -> None:
        """Rank 0 locks the run directory and removes what killed writers left (all ranks learn if it
        failed)."""
        error: CheckpointError | None = None
        if self.dist.is_main:
            self._lock = ckpt.RunLock(self.run_dir)
            try:
                self._lock.acquire()
            except CheckpointError as e:
                error = e
        if D.all_reduce_max(float(error is not None), self.dist, self.device) > 0:
            raise error or CheckpointError(f"run directory {self.run_dir}: rank 0 could not lock it")
        if self.dist.is_main:
            for name in ckpt.clean_leftovers(self.run_dir):
                self._log(f"removed {name} (left by an interrupted write)")
        D.barrier(self.dist)

    def _setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.dist = info = D.setup(t.device, cfg.dist.backend, cfg.dist.timeout_s)
        self.device = info.device
        grad_accum = t.grad_accum
        if t.global_batch_size is not None:
            per = t.micro_batch_size * info.world_size
            if t.global_batch_size % per:
                raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                                  f"micro_batch_size * world_size = {t.micro_batch_size} * {info.world_size}")
            grad_accum = t.global_batch_size // per
        self.global_batch = t.micro_batch_size * grad_accum * info.world_size
        self.tokens_per_step = self.global_batch * cfg.data.seq_len
        self.total_steps = t.steps if t.steps is not None else math.ceil(t.tokens / self.tokens_per_step)
        self.warmup = resolve_warmup(self.total_steps, cfg.optim.warmup_steps, cfg.optim.warmup_fraction)
        self.run_dir = cfg.run_path()
        self._lock_run_dir()
        # the resume target is resolved, validated and verified first: nothing is written before
        self.resume_path = ckpt.resolve_resume(self.resume, self.run_dir) if self.resume else None
        if self.resume_path is None and ckpt.list_checkpoints(self.run_dir):
            raise CheckpointError(f"run directory {self.run_dir} already holds checkpoints; pass "
                                  "--resume to continue it, or choose another train.run_dir / run_name")
        opened = ckpt.open_checkpoint(self.resume_path) if self.resume_path else None
        meta = opened.meta if opened is not None else None
        if opened is not None:
            self.resume_path = opened.path
            self._states = ckpt.load_checkpoint_files(opened)  # parsed and checked before anything else
            try:
                saved_cfg = config_from_dict(meta["config"])
            except ConfigError as e:
                raise CheckpointError(f"checkpoint {opened.path}: meta.json field 'config' is invalid ({e})"
                                      ) from None
            for note in resume_changes(saved_cfg, cfg):
                self._main_log(f"resume: {note}")
            self._schedule_note(saved_cfg, meta)
        self.data = self._prepare_data()
        if info.is_main:  # a resume with another tokenizer fails before anything is written
            self._keep_run_tokenizer(write=False)
        model = build_for_training(cfg, len(self.data.tokenizer))
        self.n_params = model.num_parameters()
        self.n_params_non_embedding = model.num_parameters(exclude_embeddings=True)
        if meta is not None:
            shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            ckpt.check_compatible(self.resume_path, meta, cfg.model.arch, shapes)
        self.is_ttt = cfg.model.arch in TTT_ARCHS
        self.inner_lr_end = float(model.config.ttt_base_lr) if self.is_ttt else 0.0
        mode = cfg.optim.inner_lr_warmup
        self.inner_warmup = self.is_ttt and (mode == "on" or (mode == "auto" and cfg.model.arch == "ttt-mlp"))
        # Mamba's PyTorch scans cannot restart at document starts (see the module docstring)
        self.uses_position_ids = cfg.data.document_mask and cfg.model.arch not in ("mamba", "mamba2")
        self.raw_model = model.to(self.device)
        self.model = D.wrap_model(model, info, cfg.dist.strategy)
        self.fsdp = info.distributed and cfg.dist.strategy == "fsdp"
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(param_groups(self.raw_model, o.weight_decay), lr=o.lr,
                                           betas=(o.betas[0], o.betas[1]), eps=o.eps)
        self.batches = GlobalBatches(self.train_rows, t.micro_batch_size, grad_accum, info.world_size,
                                     info.rank, t.seed, self.device)
        self.step = self.tokens = 0
        if opened is not None:
            self._load(opened)
            if self.dist.is_main:  # the checkpoint is valid: now the run directory may change
                for moved in ckpt.supersede_after(self.run_dir, opened.path):
                    self._log(f"resume: set aside {moved} (a checkpoint not on the path of the one "
                              "resumed from)")
                note = ckpt.repair_latest(self.run_dir)
                if note:
                    self._log(note)
            D.barrier(self.dist)

    def _last_checkpoint(self) -> str:
        """The run's latest checkpoint, for messages."""
        try:
            return str(ckpt.latest_checkpoint(self.run_dir))
        except (CheckpointError, OSError, AttributeError):
            return "unknown"

    def _schedule_note(self, saved: TrainConfig, meta: dict[str, Any]) -> None:
        """Print how a changed step budget changes the LR schedule from the resumed step on."""
        old_total, step = int(meta["total_steps"]), int(meta["step"])
        o = saved.optim
        old_warmup = resolve_warmup(old_total, o.warmup_steps, o.warmup_fraction)
        if (old_total, old_warmup) == (self.total_steps, self.warmup):
            return
        old = warmup_cosine(step, old_total, old_warmup, o.lr, o.min_lr)
        new = warmup_cosine(step, self.total_steps, self.warmup, self.cfg.optim.lr, self.cfg.optim.min_lr)
        self._main_log(f"resume: LR schedule recomputed for {self.total_steps} steps (warmup {self.warmup}), "
                       f"was {old_total} (warmup {old_warmup}): the LR of step {step + 1} is {new:.4g} "
                       f"(the saved schedule's: {old:.4g})")

    def _main_log(self, text: str) -> None:
        if self.dist.is_main:
            self._log(text)

    def _prepare_data(self) -> DataBundle:
        cfg = self.cfg
        cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.train.out_dir) / "cache"
        if not self.dist.is_main:  # rank 0 tokenizes and fills the cache first, the others then read it
            D.barrier(self.dist)
        bundle = prepare_data(cfg.data.data_config(), cache)
        if self.dist.is_main:
            D.barrier(self.dist)
        self.train_rows = PackedRows(bundle.train, cfg.data.seq_len)
        val = PackedRows(bundle.val, cfg.data.seq_len) if bundle.val is not None else None
        self.val_rows = val if val is not None and len(val) else None
        return bundle

    def _keep_run_tokenizer(self, write: bool = True) -> None:
        """The run directory holds the tokenizer it trains with (``run_dir/tokenizer``): saved (``write``)
        on a fresh run; on resume it must be the one the data was just tokenized with (issue 10)."""
        from ttt.data.tokenizer import RUN_TOKENIZER_DIR, run_tokenizer, save_tokenizer

        saved = run_tokenizer(self.run_dir)
        want = tokenizer_fingerprint(self.data.tokenizer)
        same = saved is not None and tokenizer_fingerprint(saved) == want
        if self.resume_path is None or saved is None:
            if write and not same:
                save_tokenizer(self.data.tokenizer, self.run_dir / RUN_TOKENIZER_DIR)
        elif not same:
            raise ConfigError(
                f"the tokenizer built from the data settings differs from the one this run was trained with "
                f"({self.run_dir / RUN_TOKENIZER_DIR}); did the corpus change? Use "
                f"data.tokenizer={self.run_dir / RUN_TOKENIZER_DIR} to continue with the run's tokenizer")

    def banner(self) -> str:
        """What is trained, where, on what: the start-up line(s)."""
        cfg, d = self.cfg, self.data
        val = f", {d.val.num_tokens:,} validation" if d.val is not None else ""
        return (f"{cfg.model.arch} ({cfg.model.size}): {self.n_params / 1e6:.2f}M parameters "
                f"({self.n_params_non_embedding / 1e6:.2f}M non-embedding) | device {self.device} x "
                f"{self.dist.world_size} | {self.tokens_per_step:,} tokens/step ({self.global_batch} rows x "
                f"{cfg.data.seq_len}), {self.total_steps} steps\n"
                f"corpus {d.source}: {d.train.num_tokens:,} training tokens{val} | tokenizer "
                f"{cfg.data.tokenizer} ({len(d.tokenizer):,} tokens) | run {self.run_dir}")

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path | None:
        """Write a checkpoint of the current step (collective under FSDP; rank 0 writes)."""
        model_sd = ckpt.model_state(self.raw_model, self.fsdp)
        optim_sd = ckpt.optimizer_state(self.raw_model, self.optimizer, self.fsdp)
        path = None
        if self.dist.is_main:
            trainer_state = {"step": self.step, "tokens": self.tokens, "sampler": self.batches.state_dict(),
                             "rng": ckpt.rng_state()}
            meta = {"arch": self.cfg.model.arch, "size": self.cfg.model.size, "tokens": self.tokens,
                    "model_config": self.raw_model.config.to_dict(), "world_size": self.dist.world_size,
                    "global_batch": self.global_batch, "seq_len": self.cfg.data.seq_len,
                    "total_steps": self.total_steps, "config": self.cfg.to_dict(),
                    "tokenizer_sha256": tokenizer_fingerprint(self.data.tokenizer),
                    "tokenizer_files": ckpt.tokenizer_files(self.run_dir)}
            path = ckpt.save_checkpoint(self.run_dir, self.step, model_sd, optim_sd, trainer_state, meta,
                                        keep=self.cfg.checkpoint.keep)
        D.barrier(self.dist)
        self._last_saved = self.step
        return path

    def _load(self, opened: ckpt.CheckpointInfo) -> None:
        path, meta = opened.path, opened.meta
        if meta.get("global_batch") != self.global_batch:
            raise CheckpointError(
                f"checkpoint {path} was trained with a global batch of {meta.get('global_batch')} rows, this "
                f"run uses {self.global_batch}; keep micro_batch_size * grad_accum * world_size unchanged")
        model_sd, optim_sd, trainer_state = self._states
        del self._states
        try:
            ckpt.load_states(self.raw_model, self.optimizer, model_sd, optim_sd, self.fsdp)
            self.batches.load_state_dict(trainer_state["sampler"])
        except Exception as e:  # noqa: BLE001 - anything here means the files do not fit
            text = " ".join(str(e).split())[:300]
            raise CheckpointError(f"checkpoint {path} could not be loaded into this run: {text}") from None
        self.step, self.tokens = int(trainer_state["step"]), int(trainer_state["tokens"])
        ckpt.set_rng_state(trainer_state["rng"])

    # ------------------------------------------------------------------ steps
    def _loss_sum(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """Summed next-token cross-entropy of a micro-batch and its number of valid targets."""
        kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
        if self.uses_position_ids:
            kwargs["position_ids"] = batch["position_ids"]
        bf16 = self.cfg.train.bf16
        with torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            logits = self.model(**kwargs).logits
        targets = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")
        return loss, int((targets != IGNORE_INDEX).sum())

    def _set_learning_rates(self) -> dict[str, float]:
        """The outer LR (and TTT inner base LR) of the current step: pure functions of the step."""
        o = self.cfg.optim
        lr = warmup_cosine(self.step, self.total_steps, self.warmup, o.lr, o.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if not self.is_ttt:
            return {"lr": lr}
        inner = self.inner_lr_end
        if self.inner_warmup:
            inner = inner_lr_warmup(self.step, self.warmup, o.inner_lr_start, self.inner_lr_end)
            self.raw_model.set_ttt_base_lr(inner)
        return {"lr": lr, "ttt_base_lr": inner}

    def _no_sync(self, last: bool) -> Any:
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
        elif self.dist.distributed and not last:
            return self.model.no_sync()
        return nullcontext()

    def train_step(self) -> dict[str, float]:
        """One optimizer step over a global batch; returns its metrics."""
        rates = self._set_learning_rates()
        batches = self.batches.next()
        local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        n_targets = max(D.all_reduce_sum([float(local)], self.dist, self.device)[0], 1.0)
        scale = self.dist.world_size / n_targets  # DDP / FSDP average gradients over ranks
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for a, batch in enumerate(batches):
            with self._no_sync(a == len(batches) - 1):
                loss_sum, _ = self._loss_sum(batch)
                (loss_sum * scale).backward()
            total += loss_sum.detach().double()
        clip = self.cfg.optim.grad_clip
        params = self.raw_model.parameters()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else math.inf)
        grad_norm = grad_norm.full_tensor() if self.fsdp else grad_norm  # a DTensor under FSDP2
        loss = D.all_reduce_sum([float(total.item())], self.dist, self.device)[0] / n_targets
        if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):  # before the weights change
            what = f"training loss {loss}" if not math.isfinite(loss) else f"gradient norm {float(grad_norm)}"
            raise TrainingError(f"non-finite {what} at step {self.step + 1}; the run stopped before updating "
                                f"the model; the last good checkpoint is {self._last_checkpoint()} (try a "
                                "lower optim.lr or a longer warmup)")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.tokens_per_step
        return {"loss": loss, **rates, "grad_norm": float(grad_norm)}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean next-token loss over the first ``data.val_rows`` validation rows (all ranks take part)."""
        if self.val_rows is None:
            return None
        wanted = self.cfg.data.val_rows
        n = len(self.val_rows) if wanted == 0 else min(len(self.val_rows), wanted)
        loss_sum, count = 0.0, 0.0
        self.model.eval()
        try:
            for batch, counts in validation_batches(self.val_rows, n, self.cfg.train.micro_batch_size,
                                                    self.dist.world_size, self.dist.rank, self.device):
                s, c = self._loss_sum(batch)
                if counts:
                    loss_sum, count = loss_sum + float(s), count + c
        finally:
            self.model.train()
        loss_sum, count = D.all_reduce_sum([loss_sum, count], self.dist, self.device)
        return loss_sum / max(count, 1.0)

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        """Train to the step/token budget; returns a summary dict (``final_val_loss``, ``tokens``,
        ``tokens_per_s``, ``run_dir``, ``interrupted``, ``stop_reason``, ...)."""
        self._lock: ckpt.RunLock | None = None
        started = False
        try:
            self._setup()
            started = True
            summary = self._run()
        except BaseException as e:
            if self.dist is not None:
                D.teardown(self.dist, sync=False)
            if self._lock is not None:
                self._lock.release(remove_created=not started)
            if isinstance(e, RuntimeError) and not isinstance(e, (CheckpointError, TrainingError)) \
                    and self.dist is not None and self.dist.distributed and D.is_timeout(e):
                cause = " ".join(str(e).split())[:160]
                raise TrainingError(
                    f"rank {self.dist.rank}: a collective operation did not complete within "
                    f"dist.timeout_s={self.cfg.dist.timeout_s:g} s (another rank stopped or died); last "
                    f"checkpoint: {self._last_checkpoint()} ({cause})") from None
            raise
        D.teardown(self.dist)
        if self._lock is not None:
            self._lock.release()
        return summary

    def _validate(self, logger: MetricsLogger, progress: Progress) -> float | None:
        loss = self.evaluate()
        if loss is not None:
            ppl = math.exp(min(loss, 50.0))
            logger.log({"step": self.step, "tokens": self.tokens, "split": "val", "loss": loss, "ppl": ppl})
            progress.write(f"step {self.step}: validation loss {loss:.4f} (ppl {ppl:.2f})")
        return loss

    def _run(self) -> dict[str, Any]:
        cfg, main = self.cfg, self.dist.is_main
        resumed = self.resume_path is not None
        if main:
            atomic_write_text(self.run_dir / RUN_CONFIG, print_config(cfg))
            self._keep_run_tokenizer()
        self._main_log(self.banner())
        if resumed:
            self._main_log(f"resuming from {self.resume_path} (step {self.step})")
        logger = MetricsLogger(self.run_dir, enabled=main, tensorboard=cfg.log.tensorboard,
                               write_csv=cfg.log.csv, resume_step=self.step if resumed else None)
        progress = Progress(main and cfg.log.progress, self.total_steps, self.step,
                            f"{cfg.model.arch}-{cfg.model.size}", cfg.log.print_every, self._log)
        self._last_saved = self.step if resumed else -1
        start_step, start_time, train_time = self.step, time.perf_counter(), 0.0
        last: dict[str, float] = {}
        val_loss, stop_reason = None, "done"
        self.model.train()
        with StopRequest(cfg.checkpoint.on_signal) as stop:
            try:
                while self.step < self.total_steps:
                    t0 = time.perf_counter()
                    last = self.train_step()
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    train_time += time.perf_counter() - t0
                    tps = (self.step - start_step) * self.tokens_per_step / max(train_time, 1e-9)
                    if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
                        logger.log({"step": self.step, "tokens": self.tokens, "split": "train", **last,
                                    "tokens_per_s": tps, "elapsed_s": time.perf_counter() - start_time})
                    progress.update(self.step, last["loss"], tps)
                    every = cfg.train.eval_every
                    if every and self.step % every == 0 and self.step < self.total_steps:
                        val_loss = self._validate(logger, progress)
                    if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                        self.save()
                    stop_reason = self._stop_reason(stop, start_step)
                    if stop_reason != "done":
                        break
                finished = self.step >= self.total_steps
                # a run resumed at its end was stopped after its final validation had been recorded: keep it
                done = logger.recorded(self.step, "val") if self.step == start_step else None
                if finished and D.all_reduce_max(float(done is not None), self.dist, self.device) > 0:
                    val_loss = done["loss"] if done is not None else None
                elif finished:
                    val_loss = self._validate(logger, progress)
                saved = self.save() if self._last_saved != self.step else ckpt.latest_checkpoint(self.run_dir)
            finally:
                progress.close()
                logger.close()
        val_loss = val_loss if finished else None
        return self._summary(start_step, start_time, train_time, last.get("loss"), val_loss, stop_reason,
                             saved)

    def _stop_reason(self, stop: StopRequest, start_step: int) -> str:
        """``signal`` (on any rank), ``max_steps_this_run`` (this process's limit) or ``done`` (go on)."""
        if D.all_reduce_max(float(stop.signum is not None), self.dist, self.device) > 0:
            return "signal"
        limit = self.cfg.train.max_steps_this_run
        return "max_steps_this_run" if limit is not None and self.step - start_step >= limit else "done"

    def _summary(self, start_step: int, start_time: float, train_time: float, train_loss: float | None,
                 val_loss: float | None, stop_reason: str, saved: Path | None) -> dict[str, Any]:
        """The run's summary (written to ``summary.json`` by rank 0)."""
        cfg, finished = self.cfg, self.step >= self.total_steps
        summary = {
            "run_dir": str(self.run_dir), "arch": cfg.model.arch, "size": cfg.model.size,
            "params": self.n_params, "params_non_embedding": self.n_params_non_embedding,
            "steps": self.step, "total_steps": self.total_steps, "tokens": self.tokens,
            "tokens_per_s": (self.step - start_step) * self.tokens_per_step / max(train_time, 1e-9),
            "final_train_loss": train_loss, "final_val_loss": val_loss,
            "interrupted": not finished, "stop_reason": stop_reason,
            "checkpoint": str(saved) if saved is not None else None, "world_size": self.dist.world_size,
            "elapsed_s": time.perf_counter() - start_time,
        }
        if self.dist.is_main:
            atomic_write_json(self.run_dir / "summary.json", summary)
            self._log(f"stopped at step {self.step}/{self.total_steps} ({stop_reason}); checkpoint {saved}"
                      if not finished else f"finished {self.step} steps; checkpoint {saved}")
        return summary


__all__ = ["Trainer", "TrainingError", "build_for_training", "param_groups", "seed_everything"]
