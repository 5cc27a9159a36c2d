"""Sweeps that resume: a sweep directory named from the command, a finished marker per run, and what
a multirun job does when its directory already holds a run (skip it, or resume it).

Imports neither torch nor Lightning nor Optuna: ``train.py`` registers the resolver at start-up.

- ``hydra.sweep.dir`` is ``.../multiruns/${sweep_name:}``: the command's overrides (not the ``hydra.*``
  ones), sorted, so the same command finds the same directory, and with it the Optuna study stored there.
- Each finished run writes ``finished.json`` (its final metrics and overrides); a multirun job whose
  directory holds one with the same overrides is skipped and returns the stored value; a job whose
  directory holds checkpoints but no marker resumes from ``last.ckpt``.
- The Optuna sweeper (``lm_lab.training.optuna_sweep``) lends each job its trial here, for pruning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from lm_lab.schema import ConfigError

log = logging.getLogger("lm_lab")

FINISHED = "finished.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]")
MAX_NAME = 96


# ---------------------------------------------------------------------- the sweep directory's name


def sweep_dir_name(overrides: list[str]) -> str:
    """``a=1,b=2`` for the overrides ``b=2 a=1``; characters that cannot be in a file name become ``_``
    and a short hash of the overrides is appended then (and when the name is cut at ``MAX_NAME``), so
    two different commands never share a directory."""
    text = ",".join(sorted(overrides)) or "default"
    name = _UNSAFE.sub("_", text)
    if name != text or len(name) > MAX_NAME:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME - 9]}-{digest}"
    return name


_SWEEP_OVERRIDES: list[str] | None = None  # the running multirun's command (set by SweepNaming)


def _sweep_name() -> str:
    if _SWEEP_OVERRIDES is None:
        raise ValueError(
            "${sweep_name:} needs lm_lab's Hydra callback: keep hydra.callbacks.sweep_naming "
            "(conf/hydra/default.yaml), or set hydra.sweep.dir"
        )
    return sweep_dir_name(_SWEEP_OVERRIDES)


def register_resolvers() -> None:
    """``${sweep_name:}`` (``hydra.sweep.dir``), the name of the running multirun's command."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("sweep_name"):
        OmegaConf.register_new_resolver("sweep_name", _sweep_name)


class SweepNaming(Callback):
    """A Hydra callback (``hydra.callbacks.sweep_naming``): at the start of a multirun it keeps the
    command's overrides for ``${sweep_name:}``. A resolver cannot read them itself: each job's config
    is composed again with only that job's overrides (one value per swept key), and
    ``HydraConfig`` is not set while the sweeper resolves its directory."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        global _SWEEP_OVERRIDES
        _SWEEP_OVERRIDES = [str(o) for o in config.hydra.overrides.task]


# ---------------------------------------------------------------------- the finished marker


def write_finished(run_dir: Path, metrics: dict[str, float], *, step: int, pruned: bool = False) -> None:
    """Record that the run in ``run_dir`` ended normally (written last, atomically)."""
    record = {
        "step": step,
        "metrics": {k: v for k, v in sorted(metrics.items())},
        "overrides": job_overrides(),
        "pruned": pruned,
    }
    tmp = run_dir / f".{FINISHED}.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / FINISHED)


def read_finished(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / FINISHED).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def clear_finished(run_dir: Path) -> None:
    """A run resumed (or extended) into its directory is no longer finished."""
    (run_dir / FINISHED).unlink(missing_ok=True)


# ---------------------------------------------------------------------- a multirun job's plan


def job_overrides() -> list[str] | None:
    """This job's task overrides as Hydra parsed them; None without Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return [str(o) for o in HydraConfig.get().overrides.task]
    except (ImportError, ValueError):
        return None


def job_number() -> int | None:
    """``hydra.job.num`` in a multirun, else None."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        return int(hc.job.num) if hc.mode == RunMode.MULTIRUN else None
    except (ImportError, ValueError, AttributeError):
        return None


@dataclass
class JobPlan:
    skip: bool = False  # finished before: return ``value`` without training
    value: float | None = None
    resume: bool = False  # interrupted before: resume from its last checkpoint
    pruned: bool = False


def plan_job(run_dir: Path, optimized_metric: str | None) -> JobPlan:
    """What a multirun job does with its (stable) directory: train fresh, resume, or skip."""
    record = read_finished(run_dir)
    recorded = record.get("overrides") if record else _recorded_overrides(run_dir)
    current = job_overrides()
    if recorded is not None and current is not None and sorted(recorded) != sorted(current):
        raise ConfigError(
            f"{run_dir} holds a run of other overrides ({' '.join(recorded)}), not this job's "
            f"({' '.join(current)}): rerun the sweep's own command, or start a new sweep with hydra.sweep.dir=<new dir>"
        )
    if record is not None:
        value = record["metrics"].get(optimized_metric or "")
        return JobPlan(skip=True, value=value, pruned=bool(record.get("pruned")))
    checkpoints = run_dir / "checkpoints"
    return JobPlan(resume=checkpoints.is_dir() and any(checkpoints.glob("*.ckpt")))


def _recorded_overrides(run_dir: Path) -> list[str] | None:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


# ---------------------------------------------------------------------- Optuna trials lent to jobs

# The Optuna sweeper runs its jobs in this process (Hydra's basic launcher): it lends each job its
# trial by job number (= trial number) so that a callback can report validation losses to it.
_TRIALS: dict[int, Any] = {}
_PRUNED: set[int] = set()


def lend_trial(number: int, trial: Any) -> None:
    _TRIALS[number] = trial
    _PRUNED.discard(number)


def return_trial(number: int) -> bool:
    """Take the trial back; True when the job was pruned."""
    _TRIALS.pop(number, None)
    pruned = number in _PRUNED
    _PRUNED.discard(number)
    return pruned


def active_trial() -> Any | None:
    """The Optuna trial of this job, when an lm_lab Optuna sweep runs it; else None."""
    number = job_number()
    return _TRIALS.get(number) if number is not None else None


def mark_pruned() -> None:
    number = job_number()
    if number is not None:
        _PRUNED.add(number)
