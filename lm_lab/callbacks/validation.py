"""Validate the final weights inside ``fit`` when the run ends between two validations, optionally on
more of the validation split than the validations during training."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.trainer.setup import _determine_batch_limits

from lm_lab.schema import ConfigError


class FinalValidation(L.Callback):
    """When ``trainer.max_steps`` is not a multiple of ``val_check_interval``, the last in-training
    validation describes weights older than the ones saved in ``last.ckpt``. At the last optimizer
    step this sets ``trainer.should_stop``, which makes Lightning run one more validation there,
    inside ``fit``: its metrics are logged at the final step, the best checkpoint is chosen with it
    and ``callback_metrics`` (what train.py reports and returns to sweepers) holds it.

    ``limit_batches`` (config ``final_val_batches``; Lightning's convention: an int is a number of
    batches, a float a fraction of the split, 1.0 all of it) asks for one more validation of the
    final weights, after ``fit`` (``train()`` runs it, see ``needs_validation``), on more of the
    split than ``trainer.limit_val_batches``. With a small ``limit_val_batches`` the in-training
    validations score the same few blocks each time (``EvalSampler``'s fixed order): cheap and
    comparable along the curve, but the whole run's reported loss is then that one sample's, off the
    split's loss by its sampling error (nanoGPT's CPU recipe: 240 blocks, about 0.02 nats). The
    validation inside ``fit`` at the final step keeps the in-training batches: the best checkpoint is
    chosen among values of one estimator (a whole-split value compared with 240-block ones chose by
    sampling error), and the curve's last point is like the others. The wider validation is logged
    after it at the same step, and is what the run reports. ``None``: no further validation.

    ``last_val_step`` is the step of the latest validation (``final_step`` that of one with
    ``limit_batches``), so that ``train()`` can still validate after ``fit`` a run that ended
    otherwise (an epoch budget, a stop by another callback) or whose final weights are still to be
    validated on ``limit_batches``: ``needs_validation``.
    """

    def __init__(self, limit_batches: int | float | None = None) -> None:
        if limit_batches is not None:
            count = isinstance(limit_batches, int) and not isinstance(limit_batches, bool) and limit_batches >= 0
            fraction = isinstance(limit_batches, float) and 0.0 <= limit_batches <= 1.0
            if not (count or fraction):
                raise ConfigError(
                    f"final_val_batches={limit_batches!r} must be a number of validation batches (an int >= 0), "
                    "a fraction of the validation split (a float in [0, 1]; 1.0: all of it) or null (as "
                    "trainer.limit_val_batches)"
                )
            limit_batches = _determine_batch_limits(limit_batches, "final_val_batches")
        self.limit_batches = limit_batches
        self.last_val_step: int | None = None
        self.final_step: int | None = None  # step of the latest validation run with limit_batches

    def widen(self, trainer: L.Trainer) -> None:
        """Make the validation after ``fit`` (``trainer.validate``, its own loop, which counts the
        batches when it starts) cover ``limit_batches``."""
        if self.limit_batches is not None:
            trainer.limit_val_batches = self.limit_batches

    def needs_validation(self, trainer: L.Trainer) -> bool:
        """Whether the final weights are still to be validated (as asked) after ``fit``."""
        if self.last_val_step != trainer.global_step:
            return True
        return self.limit_batches is not None and self.final_step != trainer.global_step

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.last_val_step = trainer.global_step
            if self.limit_batches is not None and trainer.limit_val_batches == self.limit_batches:
                self.final_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.fit_loop._should_accumulate():
            return
        last = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        if last and self.last_val_step != trainer.global_step:
            trainer.should_stop = True  # Lightning validates at a step where a stop is requested
