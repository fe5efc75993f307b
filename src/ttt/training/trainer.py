"""One trainer for every architecture (TTT-Linear, TTT-MLP, Llama, Mamba, Mamba-2).

Batches. A *global batch* (rows per optimizer step) is ``micro_batch_size * grad_accum * world_size``.
Every rank runs the same :class:`ttt.data.ResumableSampler` over the training rows with
``batch_size = global batch`` (rank 0 of world 1), so the data order and the sampler state do not
depend on the number of processes; micro-batch ``k = a * world_size + rank`` (``a`` the accumulation
index) is the slice ``[k * micro, (k + 1) * micro)`` of the global batch. The loss of a step is the
mean next-token cross-entropy over all valid targets of the global batch (summed over ranks and
micro-batches, divided by their total count), so 1 process with accumulation and N processes give the
same numbers up to float summation order.

Packed rows. ``position_ids`` (restarting at 0 at each document) go to the TTT models (state reset at
document starts) and to Llama (RoPE restarts; with no attention mask and no cache, transformers builds a
block-diagonal causal mask from them, so attention does *not* cross documents). Mamba/Mamba-2 get no
``position_ids``: their PyTorch scans cannot reset state, so it flows across documents within a row
(the labels still never ask to predict a document's first token from the previous one). See
``data.document_mask``.

Exact resume. Checkpoints hold the full model/optimizer/scheduler/sampler state and the RNGs; the LR
schedule and the TTT inner-LR warmup are pure functions of the step. A run interrupted after step ``k``
and resumed reproduces the uninterrupted run's losses bit for bit (same device, world size and
threads; across world sizes up to summation order).
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from . import checkpoint as ckpt
from . import distributed as D
from .config import ConfigError, TrainConfig, apply_overrides, load_config
from .metrics import MetricsLogger
from .schedule import inner_lr_warmup, resolve_warmup, warmup_cosine

IGNORE_INDEX = -100


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# SSM parameters the reference Mamba code exempts from weight decay (``_no_weight_decay``)
NO_DECAY_NAMES = ("A_log", "D", "dt_bias")


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
        if p.ndim < 2 or id(p) in embed_ids or exempt:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _to_tensor(x: Any) -> torch.Tensor:
    return x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))


class Trainer:
    """Train one model from a :class:`TrainConfig`.

    >>> summary = Trainer(load_config("tiny", ["train.steps=10"])).fit()   # doctest: +SKIP
    >>> summary["final_val_loss"], summary["tokens_per_s"], summary["run_dir"]  # doctest: +SKIP

    Args:
        cfg: the configuration.
        resume: ``None`` (fresh run; refuses a run directory that already holds checkpoints), ``True`` /
            ``"latest"`` (the run directory's latest checkpoint) or a checkpoint / run directory path.
    """

    def __init__(self, cfg: TrainConfig, resume: str | bool | Path | None = None) -> None:
        self.cfg = cfg
        self.resume = resume if resume not in (False, "", "false", "False") else None
        self._stop_signal: int | None = None
        self._old_handlers: dict[int, Any] = {}

    # ------------------------------------------------------------------ setup
    def _prepare_data(self) -> None:
        from ttt.data import DataConfig, PackedRows, ResumableSampler, prepare_data

        cfg, info = self.cfg, self.dist
        try:
            data_cfg = DataConfig(**{**cfg.data.config, "seq_len": cfg.data.seq_len})
        except TypeError as e:
            raise ConfigError(f"invalid data section: {e}") from e
        cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.train.out_dir) / "cache"
        # rank 0 tokenizes and fills the cache first, the others then read it
        if not info.is_main:
            D.barrier(info)
        bundle = prepare_data(data_cfg, cache)
        if info.is_main:
            D.barrier(info)
        self.tokenizer = bundle.tokenizer
        if info.is_main:
            self._keep_run_tokenizer(write=False)  # a resume with another tokenizer fails before any write
        seq = cfg.data.seq_len
        self.train_rows = PackedRows(bundle.train, seq)
        self.val_rows = PackedRows(bundle.val, seq) if bundle.val is not None else None
        if len(self.train_rows) == 0:
            raise ValueError(
                f"the training split holds no full row of data.seq_len={seq} tokens "
                f"(corpus too small or empty); lower data.seq_len or use a larger corpus"
            )
        if self.val_rows is not None and len(self.val_rows) == 0:
            self.val_rows = None
        self.sampler = ResumableSampler(
            len(self.train_rows), self.global_batch, cfg.train.seed, rank=0, world_size=1
        )
        self._sampler_iter = None

    def _keep_run_tokenizer(self, write: bool = True) -> None:
        """The run directory holds the tokenizer it trains with (``run_dir/tokenizer``): saved (``write``)
        on a fresh run; on resume it must be the one the data was just tokenized with (issue 10)."""
        from ttt.data.tokenizer import RUN_TOKENIZER_DIR, run_tokenizer, save_tokenizer, tokenizer_fingerprint

        saved = run_tokenizer(self.run_dir)
        same = saved is not None and tokenizer_fingerprint(saved) == tokenizer_fingerprint(self.tokenizer)
        if self.resume_path is None or saved is None:
            if write and not same:
                save_tokenizer(self.tokenizer, self.run_dir / RUN_TOKENIZER_DIR)
        elif not same:
            raise ConfigError(
                f"the tokenizer built from the data settings differs from the one this run was trained with "
                f"({self.run_dir / RUN_TOKENIZER_DIR}); did the corpus change? Use "
                f"data.tokenizer={self.run_dir / RUN_TOKENIZER_DIR} to continue with the run's tokenizer"
            )

    def _tokenizer_vocab(self) -> int:
        return int(len(self.tokenizer))

    def _build_model(self) -> nn.Module:
        from ttt.models.registry import TTT_ARCHS, build_model, model_max_length

        m = self.cfg.model
        overrides = dict(m.overrides)
        tok_vocab = self._tokenizer_vocab()
        vocab = int(overrides.pop("vocab_size", tok_vocab))
        if tok_vocab > vocab:
            raise ConfigError(
                f"the tokenizer has {tok_vocab} tokens but model.overrides.vocab_size={vocab}: "
                "the model's vocabulary must be at least the tokenizer's"
            )
        if m.arch in TTT_ARCHS:
            overrides["backbone"] = m.backbone
        seed_everything(self.cfg.train.seed)
        try:
            if m.arch in TTT_ARCHS:
                model = build_model(m.arch, m.size, vocab, self.cfg.data.seq_len, **overrides)
            else:
                from ttt.models.registry import match_size

                sized = match_size(
                    m.arch,
                    m.size,
                    vocab_size=vocab,
                    max_seq_len=self.cfg.data.seq_len,
                    reference_arch=m.match_reference,
                    backbone=m.backbone,
                )
                model = build_model(
                    m.arch, m.size, vocab, self.cfg.data.seq_len, match=False, **{**sized, **overrides}
                )
        except (TypeError, ValueError) as e:
            raise ConfigError(
                f"cannot build model {m.arch}/{m.size} with overrides {m.overrides}: {e}"
            ) from e
        limit = model_max_length(model)
        if self.cfg.data.seq_len > limit:
            raise ConfigError(
                f"data.seq_len={self.cfg.data.seq_len} exceeds what {m.arch} supports "
                f"(max_position_embeddings={limit}); lower data.seq_len or raise "
                "model.overrides.max_position_embeddings"
            )
        if m.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False}
                )
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        return model

    def _setup(self) -> None:
        cfg = self.cfg
        self.dist = info = D.setup(cfg.train.device, cfg.dist.backend)
        self.device = info.device
        t = cfg.train
        if t.global_batch_size is not None:
            per = t.micro_batch_size * info.world_size
            if t.global_batch_size % per:
                raise ConfigError(
                    f"train.global_batch_size={t.global_batch_size} is not divisible by "
                    f"micro_batch_size * world_size = {t.micro_batch_size} * {info.world_size}"
                )
            self.grad_accum = t.global_batch_size // per
        else:
            self.grad_accum = t.grad_accum
        self.global_batch = t.micro_batch_size * self.grad_accum * info.world_size
        self.tokens_per_step = self.global_batch * cfg.data.seq_len
        self.total_steps = t.steps if t.steps is not None else math.ceil(t.tokens / self.tokens_per_step)
        self.warmup = resolve_warmup(self.total_steps, cfg.optim.warmup_steps, cfg.optim.warmup_fraction)
        self.run_dir = cfg.run_path()

        # resume target and run-dir checks come first: nothing is written before they pass
        self.resume_path: Path | None = None
        if self.resume is not None:
            self.resume_path = ckpt.resolve_resume(self.resume, self.run_dir)
            self.resume_meta = ckpt.read_meta(self.resume_path)
        elif ckpt.list_checkpoints(self.run_dir):
            raise ckpt.CheckpointError(
                f"run directory {self.run_dir} already holds checkpoints; pass --resume "
                "to continue it, or choose another train.run_dir / train.run_name"
            )

        self._prepare_data()
        model = self._build_model()
        from ttt.models.registry import count_params

        self.n_params = count_params(model)
        self.n_params_non_embedding = count_params(model, exclude_embeddings=True)
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if self.resume_path is not None:
            ckpt.check_compatible(self.resume_path, self.resume_meta, cfg.model.arch, self.shapes)
        self.is_ttt = hasattr(model, "set_ttt_base_lr")
        self.inner_lr_end = float(getattr(model.config, "ttt_base_lr", 0.0) or 0.0)
        mode = cfg.optim.inner_lr_warmup
        self.inner_warmup = self.is_ttt and (mode == "on" or (mode == "auto" and cfg.model.arch == "ttt-mlp"))
        self.uses_position_ids = cfg.data.document_mask and cfg.model.arch in (
            "ttt-linear",
            "ttt-mlp",
            "transformer",
        )
        model.to(self.device)
        self.raw_model = model
        self.model = D.wrap_model(model, info, cfg.dist.strategy)
        self.fsdp = info.distributed and cfg.dist.strategy == "fsdp"
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            param_groups(self.raw_model, o.weight_decay), lr=o.lr, betas=(o.betas[0], o.betas[1]), eps=o.eps
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, self.total_steps, self.warmup, o.lr, o.min_lr) / o.lr
        )
        self.step = 0
        self.tokens = 0
        if self.resume_path is not None:
            self._load(self.resume_path)

    # ------------------------------------------------------------------ checkpoints
    def _model_state(self) -> dict[str, torch.Tensor]:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(
                self.raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return self.raw_model.state_dict()

    def _optimizer_state(self) -> dict[str, Any]:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(
                self.raw_model,
                self.optimizer,
                options=StateDictOptions(full_state_dict=True, cpu_offload=True),
            )
        return ckpt.optimizer_state_to_named(self.raw_model, self.optimizer)

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (collective under FSDP; rank 0 writes)."""
        model_state = self._model_state()
        optim_state = self._optimizer_state()
        path = None
        if self.dist.is_main:
            trainer_state = {
                "step": self.step,
                "tokens": self.tokens,
                "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict(),
                "rng": ckpt.rng_state(),
            }
            meta = {
                "arch": self.cfg.model.arch,
                "size": self.cfg.model.size,
                "tokens": self.tokens,
                "model_config": self.raw_model.config.to_dict(),
                "tokenizer_sha256": self._tokenizer_sha256(),
                "world_size": self.dist.world_size,
                "global_batch": self.global_batch,
                "seq_len": self.cfg.data.seq_len,
                "total_steps": self.total_steps,
                "config": self.cfg.to_dict(),
            }
            path = ckpt.save_checkpoint(
                self.run_dir,
                self.step,
                model_state,
                optim_state,
                trainer_state,
                meta,
                keep=self.cfg.checkpoint.keep,
            )
        D.barrier(self.dist)
        self._last_saved = self.step
        return path

    def _tokenizer_sha256(self) -> str:
        from ttt.data.tokenizer import tokenizer_fingerprint

        return tokenizer_fingerprint(self.tokenizer)

    def _load(self, path: Path) -> None:
        model_state, optim_state, trainer_state = ckpt.load_checkpoint_files(path)
        meta = self.resume_meta
        if meta.get("global_batch") != self.global_batch or meta.get("seq_len") != self.cfg.data.seq_len:
            raise ckpt.CheckpointError(
                f"checkpoint {path} was trained with global batch {meta.get('global_batch')} x seq_len "
                f"{meta.get('seq_len')}, this config uses {self.global_batch} x {self.cfg.data.seq_len}; "
                "keep micro_batch_size * grad_accum * world_size and data.seq_len unchanged to resume"
            )
        try:
            if self.fsdp:
                from torch.distributed.checkpoint.state_dict import (
                    StateDictOptions,
                    set_model_state_dict,
                    set_optimizer_state_dict,
                )

                opts = StateDictOptions(full_state_dict=True)
                set_model_state_dict(self.raw_model, model_state, options=opts)
                set_optimizer_state_dict(self.raw_model, self.optimizer, optim_state, options=opts)
            else:
                self.raw_model.load_state_dict(model_state, strict=True)
                ckpt.load_named_optimizer_state(self.raw_model, self.optimizer, optim_state)
            self.scheduler.load_state_dict(trainer_state["scheduler"])
            self.sampler.load_state_dict(trainer_state["sampler"])
        except ckpt.CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - anything here means the files do not fit
            raise ckpt.CheckpointError(f"checkpoint {path} could not be loaded into this run: {e}") from e
        self.step = int(trainer_state["step"])
        self.tokens = int(trainer_state["tokens"])
        ckpt.set_rng_state(trainer_state["rng"])
        self._last_saved = self.step

    # ------------------------------------------------------------------ batches
    def _next_global_indices(self) -> list[int]:
        """Row indices of the next global batch (same on every rank)."""
        out: list[int] = []
        restarts = 0
        while len(out) < self.global_batch:
            if self._sampler_iter is None:
                self._sampler_iter = iter(self.sampler)
            try:
                item = next(self._sampler_iter)
            except StopIteration:
                self._sampler_iter = None
                restarts += 1
                if restarts > 2:
                    raise RuntimeError("the data sampler yields no batches") from None
                continue
            if isinstance(item, (int, np.integer)):
                out.append(int(item))
            else:
                out.extend(int(i) for i in (item.tolist() if hasattr(item, "tolist") else item))
        return out[: self.global_batch]

    def _collate(self, rows: Any, indices: list[int]) -> dict[str, torch.Tensor]:
        items = [rows.row(i) for i in indices]
        batch = {
            k: torch.stack([_to_tensor(it[k]) for it in items]).long()
            for k in ("input_ids", "labels", "position_ids")
        }
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _micro_batches(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        micro, world, rank = self.cfg.train.micro_batch_size, self.dist.world_size, self.dist.rank
        out = []
        for a in range(self.grad_accum):
            k = a * world + rank
            out.append(self._collate(self.train_rows, indices[k * micro : (k + 1) * micro]))
        return out

    def _forward_loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Summed next-token cross-entropy of a micro-batch and its number of valid targets."""
        kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
        if self.uses_position_ids:
            kwargs["position_ids"] = batch["position_ids"]
        autocast = (
            torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
            if self.cfg.train.bf16
            else nullcontext()
        )
        with autocast:
            logits = self.model(**kwargs).logits
        targets = batch["labels"][:, 1:]
        loss_sum = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        return loss_sum, int((targets != IGNORE_INDEX).sum())

    # ------------------------------------------------------------------ train / eval
    def _set_inner_lr(self) -> float | None:
        if not self.is_ttt:
            return None
        if self.inner_warmup:
            value = inner_lr_warmup(self.step, self.warmup, self.cfg.optim.inner_lr_start, self.inner_lr_end)
            self.raw_model.set_ttt_base_lr(value)
            return value
        return self.inner_lr_end

    def train_step(self) -> dict[str, float]:
        """One optimizer step over a global batch; returns its metrics."""
        inner_lr = self._set_inner_lr()
        lr = self.optimizer.param_groups[0]["lr"]
        batches = self._micro_batches(self._next_global_indices())
        local_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        (n_targets,) = D.all_reduce_sum([float(local_targets)], self.dist, self.device)
        n_targets = max(n_targets, 1.0)
        scale = self.dist.world_size / n_targets  # DDP / FSDP average gradients over ranks
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for a, batch in enumerate(batches):
            last = a == len(batches) - 1
            sync = nullcontext()
            if self.dist.distributed and not last:
                if self.fsdp:
                    self.model.set_requires_gradient_sync(False)
                else:
                    sync = self.model.no_sync()
            elif self.fsdp:
                self.model.set_requires_gradient_sync(True)
            with sync:
                loss_sum, _ = self._forward_loss_sum(batch)
                (loss_sum * scale).backward()
            total += loss_sum.detach().double()
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.raw_model.parameters(), clip if clip > 0 else math.inf
        )
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        (loss_total,) = D.all_reduce_sum([float(total.item())], self.dist, self.device)
        loss = loss_total / n_targets
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss} at step {self.step + 1}")
        self.step += 1
        self.tokens += self.tokens_per_step
        out = {"loss": loss, "lr": lr, "grad_norm": float(grad_norm)}
        if inner_lr is not None:
            out["ttt_base_lr"] = inner_lr
        return out

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean next-token loss over the first ``data.val_rows`` validation rows (all ranks take part)."""
        if self.val_rows is None:
            return None
        n = (
            len(self.val_rows)
            if self.cfg.data.val_rows == 0
            else min(len(self.val_rows), self.cfg.data.val_rows)
        )
        micro, world, rank = self.cfg.train.micro_batch_size, self.dist.world_size, self.dist.rank
        per_round = micro * world
        rounds = math.ceil(n / per_round)
        self.model.eval()
        loss_sum, count = 0.0, 0.0
        try:
            for r in range(rounds):
                idx = [r * per_round + rank * micro + j for j in range(micro)]
                real = [i for i in idx if i < n]
                # every rank runs the same number of forwards (FSDP); padding rows are not counted
                batch = self._collate(self.val_rows, real if real else [0])
                s, c = self._forward_loss_sum(batch)
                if real:
                    loss_sum += float(s)
                    count += c
        finally:
            self.model.train()
        loss_sum, count = D.all_reduce_sum([loss_sum, count], self.dist, self.device)
        return loss_sum / max(count, 1.0)

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:  # second signal: give up immediately
            raise KeyboardInterrupt
        self._stop_signal = signum

    def _install_signals(self) -> None:
        if not self.cfg.checkpoint.on_signal or threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    # ------------------------------------------------------------------ loop
    def _validate(self, logger) -> float | None:
        """Validation loss now; logged (step, tokens, loss, perplexity) when ``logger`` is given."""
        val_loss = self.evaluate()
        if logger is not None and val_loss is not None:
            logger.log({"step": self.step, "tokens": self.tokens, "split": "val", "loss": val_loss,
                        "ppl": math.exp(min(val_loss, 50.0))})
        return val_loss

    def fit(self) -> dict[str, Any]:
        """Train to the step/token budget; returns a summary dict (``final_val_loss``, ``tokens``,
        ``tokens_per_s``, ``run_dir``, ``interrupted``, ...)."""
        try:
            self._setup()
            summary = self._fit()
        except BaseException:
            self._restore_signals()
            if hasattr(self, "dist"):
                D.teardown(self.dist, sync=False)
            raise
        self._restore_signals()
        D.teardown(self.dist)
        return summary

    def _fit(self) -> dict[str, Any]:
        cfg, info = self.cfg, self.dist
        main = info.is_main
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            self._keep_run_tokenizer()
        resumed_from = self.step if self.resume_path is not None else None
        logger = MetricsLogger(
            self.run_dir,
            enabled=main,
            tensorboard=cfg.log.tensorboard,
            write_csv=cfg.log.csv,
            resume_step=resumed_from,
        )
        self._last_saved = self.step if resumed_from is not None else -1
        self._install_signals()
        bar = None
        if main and cfg.log.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.total_steps,
                initial=self.step,
                desc=f"{cfg.model.arch}-{cfg.model.size}",
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )
        start_step, start_time = self.step, time.perf_counter()
        train_time, run_tokens, last = 0.0, 0, {}
        val_loss = None
        stop_reason = "done"
        self.model.train()
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                last = self.train_step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                train_time += dt
                run_tokens += self.tokens_per_step
                tps = run_tokens / max(train_time, 1e-9)
                if main and (self.step % cfg.train.log_every == 0 or self.step == self.total_steps):
                    logger.log(
                        {
                            "step": self.step,
                            "tokens": self.tokens,
                            "split": "train",
                            **last,
                            "tokens_per_s": tps,
                            "elapsed_s": time.perf_counter() - start_time,
                        }
                    )
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{tps:,.0f}")
                if (
                    cfg.train.eval_every
                    and self.step % cfg.train.eval_every == 0
                    and self.step < self.total_steps
                ):
                    val_loss = self._validate(logger if main else None)
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save()
                stop = 1.0 if self._stop_signal is not None else 0.0
                if D.all_reduce_max(stop, info, self.device) > 0:
                    stop_reason = "signal"
                    break
                limit = cfg.train.max_steps_this_run
                if limit is not None and self.step - start_step >= limit:
                    stop_reason = "max_steps_this_run"
                    break
        finally:
            if bar is not None:
                bar.close()
        finished = self.step >= self.total_steps
        if finished:
            val_loss = self._validate(logger if main else None)
        saved = self.save() if self._last_saved != self.step else ckpt.latest_checkpoint(self.run_dir)
        logger.close()
        summary = {
            "run_dir": str(self.run_dir),
            "arch": cfg.model.arch,
            "size": cfg.model.size,
            "params": self.n_params,
            "params_non_embedding": self.n_params_non_embedding,
            "steps": self.step,
            "total_steps": self.total_steps,
            "tokens": self.tokens,
            "tokens_per_s": run_tokens / train_time if train_time > 0 else 0.0,
            "final_train_loss": last.get("loss"),
            "final_val_loss": val_loss if finished else None,
            "interrupted": not finished,
            "stop_reason": stop_reason,
            "checkpoint": str(saved) if saved is not None else None,
            "world_size": info.world_size,
            "elapsed_s": time.perf_counter() - start_time,
        }
        if main:
            import json

            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def train_main(
    config: str | Path | TrainConfig | None = None,
    overrides: list[str] | None = None,
    resume: str | bool | Path | None = None,
) -> dict[str, Any]:
    """Load a config (path or shipped name), apply dotted overrides, train; returns the summary."""
    if isinstance(config, TrainConfig):
        cfg = apply_overrides(config, overrides)
    else:
        cfg = load_config(config, overrides)
    return Trainer(cfg, resume=resume).fit()


def _cli(argv: list[str] | None = None) -> int:
    """``python -m ttt.training CONFIG [key=value ...] [--resume [PATH]]`` (also used under torchrun)."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m ttt.training", description=_cli.__doc__)
    p.add_argument("config", help="YAML path or shipped config name")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="resume from the run's latest checkpoint, or from PATH",
    )
    args = p.parse_args(argv)
    try:
        summary = train_main(args.config, args.overrides, args.resume)
    except (ConfigError, ckpt.CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 130 if summary["interrupted"] and summary["stop_reason"] == "signal" else 0


__all__ = ["Trainer", "param_groups", "seed_everything", "train_main"]
