"""Processes started by an external launcher (``torchrun``, SLURM's ``srun``): one ``python train.py``
per device, each composing its own config, possibly on different machines.

Lightning reads the job's shape from the launcher itself (``TorchElasticEnvironment`` for torchrun,
``SLURMEnvironment`` under srun); what is left for lm_lab is that every process of the job agrees on
its run directory, and that only global rank 0 writes the run's files (checkpoints, metrics, the
Hydra record, the tokenizer: Lightning and ``train()`` do that) — the other processes log to a file
of their own, so that nodes sharing a file system do not interleave lines in one ``train.log``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lm_lab.schema import ConfigError


def external_launch() -> tuple[int, int]:
    """(global rank, world size) set by torchrun (``RANK``/``WORLD_SIZE``) or srun
    (``SLURM_PROCID``/``SLURM_NTASKS``); (0, 1) for a process started by hand or by Lightning's own
    launcher (which sets only ``LOCAL_RANK`` in the processes it starts and passes them the run dir)."""
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        rank, world = os.environ.get(rank_var, ""), os.environ.get(world_var, "")
        if rank.isdigit() and world.isdigit() and int(world) > 1:
            return int(rank), int(world)
    return 0, 1


def check_run_dir_given(hydra_overrides: list[str], world: int, *, multirun: bool = False) -> None:
    """Each process of an externally launched job names its run directory from its own clock
    (``${now:...}``), so two processes started a second apart would train into two directories and
    a resume would find no checkpoint: the job must name one (a sweep job: its sweep directory)."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = any(o.lstrip("+").split("=", 1)[0] == key for o in hydra_overrides)
    if world > 1 and not given:
        raise ConfigError(
            f"this is one of {world} processes started by torchrun or srun, and each would name its own run "
            f"directory from its clock: give every process the same {key}=<dir> "
            f"(e.g. {key}=logs/train/{'multiruns' if multirun else 'runs'}/$SLURM_JOB_ID)"
        )


def log_to_rank_file(rank: int) -> None:
    """Point this process's log file (Hydra's ``<run dir>/train.log``) at ``train_rank<R>.log``:
    rank 0 keeps ``train.log``; on a shared file system the ranks no longer write into one file."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if not isinstance(handler, logging.FileHandler):
            continue
        path = Path(handler.baseFilename)
        moved = logging.FileHandler(path.with_name(f"{path.stem}_rank{rank}{path.suffix}"), encoding=handler.encoding)
        moved.setLevel(handler.level)
        moved.setFormatter(handler.formatter)
        for f in handler.filters:
            moved.addFilter(f)
        root.removeHandler(handler)
        handler.close()
        root.addHandler(moved)
