"""The data position and the per-step random state: what makes a resumed run draw what the
uninterrupted run drew. Always on (``train.py`` adds it); the one place that tells the DataModule
how far training got."""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import lightning as L
import numpy as np
import torch

log = logging.getLogger("lm_lab")


class DataPosition(L.Callback):
    """Counts training micro-batches, tells the DataModule each one it starts (its data position,
    saved in every checkpoint by ``TextDataModule.state_dict``), and seeds every RNG from
    (seed, rank, micro-batch number) before it runs.

    The random state (dropout, and anything drawing from Python's, NumPy's or torch's global
    generators) is then a function of the step, so a resumed run draws what the uninterrupted run
    drew, whatever ran in between (validation, checkpointing, a new DataLoader iterator); nothing
    needs restoring but the counter.

    On resume it also repairs two things in Lightning's saved loop state before Lightning restores
    it: an epoch that ``max_steps`` cut short is reopened (``reopen_cut_epoch``), and the micro-batch
    counters are rescaled when the run resumes with another accumulation count (another number of
    devices at the same global batch, ``rescale_batch_progress``).
    """

    def __init__(self) -> None:
        self.micro_batches = 0  # training micro-batches so far, all epochs

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # Counted at the start: ModelCheckpoint saves in its on_train_batch_end, before any later
        # hook; a count at the end would miss the batch just trained, and a resumed run would train
        # on it a second time.
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "on_train_batch_consumed"):
            dm.on_train_batch_consumed(trainer.current_epoch)
        seed = getattr(dm, "seed", None)
        if seed is None:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        seed_step(seed, trainer.global_rank, self.micro_batches)
        self.micro_batches += 1

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        return {
            "micro_batches": self.micro_batches,
            "accumulate": trainer.accumulate_grad_batches if trainer is not None else 1,
            "world_size": trainer.world_size if trainer is not None else 1,
        }

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        self._trainer = trainer

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # Runs before Lightning restores its loops from ``checkpoint``, so they can be repaired here.
        saved = checkpoint.get("callbacks", {}).get(self.state_key) or checkpoint.get("lm_lab", {})
        self.micro_batches = int(saved.get("micro_batches", 0))
        reopen_cut_epoch(checkpoint)
        if "accumulate" not in saved:
            return
        old, new = int(saved["accumulate"]), trainer.accumulate_grad_batches
        if old != new:
            # Resumed on another number of devices at the same global batch: the accumulation count
            # changed, so Lightning's micro-batch counters of this epoch (which decide where the next
            # optimizer step falls) are rescaled to the same number of optimizer steps. The data
            # position is global (TextDataModule.state_dict) and needs nothing.
            rescale_batch_progress(checkpoint, old, new)
            self.micro_batches = self.micro_batches * new // old
            log.info("resuming with %d micro-batches per optimizer step (the checkpoint's run had %d)", new, old)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # read in on_load_checkpoint, which also sees the loops it must repair


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators from (seed, rank, step)."""
    s = int(np.random.SeedSequence([seed % (1 << 64), rank, step]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        torch.manual_seed(s)  # every device's generator
    else:
        torch.default_generator.manual_seed(s)  # the same on a CPU-only machine, minus ~0.2 ms of device probing


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
