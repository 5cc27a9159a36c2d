"""Report each validation to the Optuna trial of a sweep job, and stop the run when its pruner says so.

Optuna 2.10's own ``PyTorchLightningPruningCallback`` imports the old ``pytorch_lightning`` package
(not ``lightning``) and raises ``TrialPruned`` inside ``fit``, which would end the job as a failure;
this one stops at the step boundary instead, so the run ends normally (last checkpoint, final metrics)
and the sweeper records the trial as pruned.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import lightning as L

from lm_lab.training.sweeps import mark_pruned

log = logging.getLogger("lm_lab")


class TrialPruning(L.Callback):
    def __init__(self, trial: Any, monitor: str = "val/loss") -> None:
        self.trial, self.monitor = trial, monitor
        self.pruned = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or self.pruned:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        value = float(value)
        if not math.isfinite(value):
            return
        step = trainer.global_step
        with warnings.catch_warnings():  # a step reported twice (a resumed trial) keeps its first value
            warnings.simplefilter("ignore")
            self.trial.report(value, step)
        if self.trial.should_prune():
            log.info("trial %d pruned at step %d (%s %.4f)", self.trial.number, step, self.monitor, value)
            self.pruned = True
            mark_pruned()
            trainer.should_stop = True
