"""Validate the final weights inside ``fit`` when the run ends between two validations."""

from __future__ import annotations

from typing import Any

import lightning as L


class FinalValidation(L.Callback):
    """When ``trainer.max_steps`` is not a multiple of ``val_check_interval``, the last in-training
    validation describes weights older than the ones saved in ``last.ckpt``. At the last optimizer
    step this sets ``trainer.should_stop``, which makes Lightning run one more validation there,
    inside ``fit``: its metrics are logged at the final step, the best checkpoint is chosen with it
    and ``callback_metrics`` (what train.py reports and returns to sweepers) holds it.

    ``last_val_step`` is the step of the latest validation, so that ``train()`` can still validate
    after ``fit`` a run that ended otherwise (an epoch budget).
    """

    def __init__(self) -> None:
        self.last_val_step: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.last_val_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.fit_loop._should_accumulate():
            return
        last = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        if last and self.last_val_step != trainer.global_step:
            trainer.should_stop = True  # Lightning validates at a step where a stop is requested
