"""What every pretraining objective shares: the optimizer, the LR schedule, token counting,
the tokenizer stored in the checkpoint, and the checkpoint's plain-container hyperparameters."""

from __future__ import annotations

import dataclasses
import functools
import logging
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

log = logging.getLogger("lm_lab")


@dataclasses.dataclass
class StepOutput:
    """What a task's ``_step`` returns for one micro-batch.

    ``loss`` is back-propagated; ``metrics`` maps a name to ``(mean, weight)``: the mean over the
    items the metric counts (target tokens, masked tokens, sentence pairs) and how many there were
    (0 for a batch with none, e.g. an evaluation padding slot). Aggregation divides summed
    ``mean * weight`` by summed weights, so every item weighs the same.
    """

    loss: torch.Tensor
    metrics: dict[str, tuple[torch.Tensor, torch.Tensor]]


class WeightedMeans:
    """Running sums of ``mean * weight`` and of ``weight`` per metric (detached, on device: no host
    sync per micro-batch), reduced over ranks with one all-reduce."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str, torch.Tensor] = {}
        self.tokens: torch.Tensor | None = None

    def add(self, metrics: dict[str, tuple[torch.Tensor, torch.Tensor]], tokens: torch.Tensor | None = None) -> None:
        for name, (mean, weight) in metrics.items():
            w = weight.detach().to(torch.float64)
            s = mean.detach().to(torch.float64) * w
            if name in self.sums:
                self.sums[name] += s
                self.weights[name] += w
            else:
                self.sums[name], self.weights[name] = s, w
        if tokens is not None:
            t = tokens.detach().to(torch.float64)
            self.tokens = t if self.tokens is None else self.tokens + t

    def reduce(self, trainer: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(means over everything added on every rank, total tokens); then starts afresh."""
        names = sorted(self.sums)  # the same order on every rank
        device = trainer.strategy.root_device
        parts = [self.sums[n] for n in names] + [self.weights[n] for n in names]
        parts.append(self.tokens if self.tokens is not None else torch.zeros((), dtype=torch.float64))
        packed = torch.stack([p.to(device) for p in parts])
        if trainer.world_size > 1:
            packed = trainer.strategy.reduce(packed, reduce_op="sum")
        k = len(names)
        means = {n: (packed[i] / packed[k + i].clamp(min=1)).float() for i, n in enumerate(names)}
        tokens = packed[-1].round().long()
        self.__init__()
        return means, tokens


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
        self._train_means = WeightedMeans()  # this optimizer step's micro-batches so far
        self._val_means = WeightedMeans()

    @classmethod
    def task_options(cls, data_cfg: Any) -> dict[str, Any]:
        """Constructor options this objective takes from the data config (e.g. BERT's pair objective)."""
        return {}

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
        trainer = self._trainer
        checkpoint["lm_lab"] = {
            "micro_batches": self._micro_batches,
            "accumulate": trainer.accumulate_grad_batches if trainer is not None else 1,
            "world_size": trainer.world_size if trainer is not None else 1,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("lm_lab", {})
        self._micro_batches = int(saved.get("micro_batches", 0))
        reopen_cut_epoch(checkpoint)
        trainer = self._trainer
        if trainer is None or "accumulate" not in saved:
            return
        old, new = int(saved["accumulate"]), trainer.accumulate_grad_batches
        if old != new:
            # Resumed on another number of devices at the same global batch: the accumulation count
            # changed, so Lightning's micro-batch counters of this epoch (which decide where the next
            # optimizer step falls) are rescaled to the same number of optimizer steps. The data
            # position is global (TextDataModule.state_dict) and needs nothing.
            rescale_batch_progress(checkpoint, old, new)
            self._micro_batches = self._micro_batches * new // old
            log.info(
                "resuming with %d micro-batches per optimizer step (the checkpoint's run had %d)",
                new,
                old,
            )

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
    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> StepOutput:
        """One micro-batch: the loss to back-propagate and the metrics as (mean, weight) pairs."""
        raise NotImplementedError

    def token_mean(self, total: torch.Tensor, n: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss to back-propagate for ``total``, a sum over this micro-batch's ``n`` target tokens.

        Outside training (or without ``step_targets``) it is the plain mean ``total / n``. In
        training it is this micro-batch's share of the mean over every target token of the whole
        optimizer step (all micro-batches, all ranks), as ``transformers`` does since its 2024
        gradient-accumulation fix: Lightning divides each micro-batch's loss by the accumulation
        count and DDP averages gradients over ranks, so ``total * accumulation * world / N_step``
        gives gradients equal to one batch of the whole step's size, however its targets fall.
        """
        step_targets = batch.get("step_targets")
        if not self.training or step_targets is None:
            return total / n.clamp(min=1)
        trainer = self.trainer
        n_step = step_targets.to(total.device, torch.float32)
        if trainer.world_size > 1:
            n_step = trainer.strategy.reduce(n_step, reduce_op="sum")
        return total * (trainer.accumulate_grad_batches * trainer.world_size) / n_step.clamp(min=1)

    def combine(self, means: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Metrics derived from the aggregated means (e.g. a total loss); by default none."""
        return means

    def _count_tokens(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch.get("attention_mask")
        return mask.sum() if mask is not None else torch.tensor(batch["input_ids"].numel(), device=self.device)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self._step(batch, "train")
        self._train_means.add(out.metrics, tokens=self._count_tokens(batch))
        return out.loss

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Log the optimizer step's metrics over all its micro-batches and all ranks (one all-reduce)."""
        means, tokens = self._train_means.reduce(self.trainer)
        self.tokens_seen += tokens.to(self.tokens_seen)
        for name, value in self.combine(means).items():
            self.log(f"train/{name}", value, prog_bar=name == "loss", on_step=True, on_epoch=False)
        self.log("tokens_seen", self.tokens_seen.float(), on_step=True, on_epoch=False)
        self.log("lr", optimizer.param_groups[0]["lr"], prog_bar=False, on_step=True, on_epoch=False)
        # Logged metrics carry the number of optimizer steps completed, as checkpoint names and
        # messages do: this is step global_step + 1 (Lightning would log it at global_step, and a
        # validation after step N at N - 1).
        self.log("step", float(self.trainer.global_step + 1), on_step=True, on_epoch=False)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Count the data position and seed every RNG for this micro-batch.

        The random state (dropout, and anything drawing from Python's, NumPy's or torch's global
        generators) is a function of (seed, rank, micro-batch number), so a resumed run draws what
        the uninterrupted run drew, whatever ran in between (validation, checkpointing, a new
        DataLoader iterator); nothing needs restoring but the counter.
        """
        dm = self.trainer.datamodule
        if dm is not None and hasattr(dm, "on_train_batch_consumed"):
            dm.on_train_batch_consumed(self.trainer.current_epoch)
        seed = getattr(dm, "seed", None)
        if seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        seed_step(seed, self.trainer.global_rank, self._micro_batches)
        self._micro_batches += 1

    def on_validation_epoch_start(self) -> None:
        self._val_means = WeightedMeans()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._val_means.add(self._step(batch, "val").metrics)

    def on_validation_epoch_end(self) -> None:
        # Sums and counts over every sample of every rank, divided once: each validation sample
        # (each token, for token metrics) weighs the same whatever the batch and the world size.
        means, _ = self._val_means.reduce(self.trainer)
        values = self.combine(means)
        if self.ppl_source in values:
            values["ppl"] = torch.exp(values[self.ppl_source].clamp(max=50.0))
        for name, value in values.items():
            # Already the global value on every rank: no further sync.
            self.log(f"val/{name}", value, prog_bar=name == "loss", sync_dist=False)
        self.log("step", float(self.trainer.global_step), sync_dist=False)  # the weights' step (see above)

    ppl_source = "loss"  # val/ppl = exp(this aggregated metric)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def reopen_cut_epoch(checkpoint: dict[str, Any]) -> None:
    """Mark an epoch that ``max_steps`` cut short as unfinished, so that a run extended from this
    checkpoint (a larger ``trainer.max_steps``) goes on with the rest of the epoch.

    Lightning saves the final checkpoint of a run that stopped at ``max_steps`` with the epoch
    counted as complete; resuming from it would start the next epoch and silently skip the
    samples the cut epoch had left (measured: 12 of 17 steps of epoch 0 done, the resumed run went
    on with epoch 1). The data position in the checkpoint still says where the epoch stopped.
    """
    loops = checkpoint.get("loops", {}).get("fit_loop", {})
    batches, epochs = loops.get("epoch_loop.batch_progress"), loops.get("epoch_progress")
    if not batches or not epochs or batches.get("is_last_batch", True):
        return
    current = batches.get("current", {})
    if not current.get("ready") or current.get("completed") != current.get("ready"):
        return  # saved mid-step (by a callback at batch end): Lightning resumes that itself
    for part in ("current", "total"):
        e = epochs.get(part, {})
        if e and e.get("ready") == e.get("started") == e.get("processed") == e.get("completed") and e["ready"] > 0:
            e["processed"] -= 1
            e["completed"] -= 1
    if "epoch" in checkpoint and epochs.get("current", {}).get("completed") is not None:
        checkpoint["epoch"] = epochs["current"]["completed"]


def rescale_batch_progress(checkpoint: dict[str, Any], old: int, new: int) -> None:
    """Rewrite the fit loop's micro-batch counters of ``checkpoint`` from ``old`` to ``new``
    micro-batches per optimizer step (before Lightning restores its loops from it)."""
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
    if not progress:
        return
    for part in ("current", "total"):
        counts = progress.get(part)
        if not counts or "ready" not in counts:
            continue
        shift = counts["ready"] // old * new - counts["ready"]  # whole optimizer steps, counted anew
        for key in ("ready", "started", "processed", "completed"):
            if key in counts:
                counts[key] = max(0, counts[key] + shift)


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
