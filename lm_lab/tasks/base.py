"""What every pretraining objective shares: the optimizer, the LR schedule, token counting,
the tokenizer stored in the checkpoint, and the checkpoint's plain-container hyperparameters."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from lm_lab.config import OptimizerConfig, SchedulerConfig
from lm_lab.schedule import lr_at


class PretrainTask(L.LightningModule):
    """Base LightningModule. Subclasses build ``self.net`` and implement ``_step``."""

    family = ""

    def __init__(
        self,
        model_cfg: Any,
        optimizer: OptimizerConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        super().__init__()
        self.model_cfg = model_cfg
        self.optim_cfg = optimizer or OptimizerConfig()
        self.sched_cfg = scheduler or SchedulerConfig()
        # Plain containers only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "family": self.family,
                "model": dataclasses.asdict(model_cfg),
                "optimizer": dataclasses.asdict(self.optim_cfg),
                "scheduler": dataclasses.asdict(self.sched_cfg),
            }
        )
        self.tokenizer_backend = tokenizer
        self._hf_tokenizer: Any = None
        # Counters live in buffers so they are saved and restored with the weights.
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long), persistent=True)
        self._micro_batches = 0  # training micro-batches so far, all epochs (saved in checkpoints)

    # ------------------------------------------------------------------ tokenizer
    @property
    def tokenizer(self) -> Any:
        """The run's tokenizer as a ``transformers.PreTrainedTokenizerFast``."""
        if self._hf_tokenizer is None and self.tokenizer_backend is not None:
            from lm_lab.data.tokenizer import to_hf

            self._hf_tokenizer = to_hf(self.tokenizer_backend, self.family)
        return self._hf_tokenizer

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.tokenizer_backend is not None:
            checkpoint["tokenizer_json"] = self.tokenizer_backend.to_str()
        checkpoint["lm_lab"] = {"micro_batches": self._micro_batches}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._micro_batches = int(checkpoint.get("lm_lab", {}).get("micro_batches", 0))

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                # Matrices (linear weights, embeddings) decay; biases and norm gains do not.
                (decay if p.dim() >= 2 else no_decay).append(p)
        o = self.optim_cfg
        fused = o.fused if o.fused is not None else (self.device.type == "cuda")
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            fused=fused,
        )
        s = self.sched_cfg
        decay_steps = s.decay_steps or self._max_steps()
        fn = functools.partial(
            lr_at, max_lr=o.lr, min_lr=s.min_lr, warmup_steps=s.warmup_steps, decay_steps=decay_steps, kind=s.kind
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: fn(step) / o.lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _max_steps(self) -> int:
        trainer = self._trainer
        if trainer is not None and trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        if trainer is not None:
            return max(1, int(trainer.estimated_stepping_batches))
        return 1

    # ------------------------------------------------------------------ steps
    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else batch["input_ids"].numel()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self._step(batch, "train")
        n = self._count_tokens(batch) * self.trainer.world_size
        self.tokens_seen += n
        bs = batch["input_ids"].size(0)
        for name, value in out.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "loss", batch_size=bs)
        self.log("tokens_seen", self.tokens_seen.float(), batch_size=bs)
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=False, batch_size=bs)
        return out["loss"]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Count the data position and seed every RNG for this micro-batch.

        The random state (dropout, and anything drawing from Python's, NumPy's or torch's global
        generators) is a function of (seed, rank, micro-batch number), so a resumed run draws what
        the uninterrupted run drew, whatever ran in between (validation, checkpointing, a new
        DataLoader iterator); nothing needs restoring but the counter.
        """
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "on_train_batch_consumed"):
            dm.on_train_batch_consumed(self.trainer.current_epoch)
        seed = getattr(dm, "seed", None)
        if seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        seed_step(seed, self.trainer.global_rank, self._micro_batches)
        self._micro_batches += 1

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self._step(batch, "val")
        bs = batch["input_ids"].size(0)
        for name, value in out.items():
            self.log(f"val/{name}", value, prog_bar=name == "loss", sync_dist=True, batch_size=bs)

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get(self.ppl_source)
        if loss is not None:
            self.log("val/ppl", math.exp(min(float(loss), 50.0)), sync_dist=False)

    ppl_source = "val/loss"

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators from (seed, rank, step)."""
    s = int(np.random.SeedSequence([seed % (1 << 64), rank, step]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        torch.manual_seed(s)  # every device's generator
    else:
        torch.default_generator.manual_seed(s)  # the same on a CPU-only machine, minus ~0.2 ms of device probing


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "_orig_mod", module)
