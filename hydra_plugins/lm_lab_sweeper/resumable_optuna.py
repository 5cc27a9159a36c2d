"""Hydra finds sweepers only in the ``hydra_plugins`` package: this is lm_lab's resumable Optuna
sweeper's entry there (``conf/hydra/sweeper/optuna_resumable.yaml``). Hydra imports every plugin module
when it starts, so Optuna is imported only when the sweeper is built."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class ResumableOptunaSweeper(Sweeper):
    """See ``lm_lab.training.optuna_sweep``."""

    def __init__(self, **kwargs: Any) -> None:
        from lm_lab.training.optuna_sweep import ResumableOptunaSweeperImpl

        self.sweeper = ResumableOptunaSweeperImpl(**kwargs)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
