"""Checkpoints for long and preemptible runs: a resume point every N steps and/or M minutes,
the best by the monitored metric, and one more at the step boundary after SIGTERM."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lm_lab.training.checkpoints import BEST_LINK

log = logging.getLogger("lm_lab")


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``every_n_train_steps`` / ``every_n_minutes`` write ``last.ckpt``.

    Lightning's own ``every_n_train_steps`` (and ``train_time_interval``, which it does not allow
    together with it) save the *top-k* checkpoints, and while ``monitor`` (val/loss) has not been
    logged yet they defer every save to the next validation: hours without a resume point on a
    big run. Here the schedule writes ``last.ckpt`` whatever the metric does; the best checkpoint by
    ``monitor`` is still chosen after each validation; ``last.ckpt`` is also written when training
    ends and, after SIGTERM, at the next step boundary (Lightning raises ``SIGTERMException``
    there; this saves in ``on_exception``; the run then exits with status 0).

    SIGTERM: Lightning's handler broadcasts from inside the signal handler, which deadlocks a DDP
    run whose other rank is inside a gradient all-reduce (seen here about every other time).
    This callback's handler only sets a flag (and forwards the signal to the processes Lightning
    launched); the ranks agree on it with one all-reduce after each training batch and then stop
    together. A validation due at that step runs first (Lightning would cut it short after one
    batch, and the resumed run would never make it up: its val/loss and best-checkpoint choice
    would be missing from the record); a signal that arrives during a validation stops the run
    right after it.

    SLURM auto-requeue (a ``SLURMEnvironment(auto_requeue=True)`` plugin, ``cluster=slurm``): the
    requeue signal (SIGUSR1, sent ``--signal=SIGUSR1@90`` seconds before the time limit) is handled
    the same way — ``last.ckpt`` at the next step boundary, then rank 0 runs ``scontrol requeue``
    and the run stops. Lightning's own handler instead writes ``hpc_ckpt_<k>.ckpt`` from inside the
    signal handler, mid-step (a resume from it is not exact, and its save's barrier runs inside a
    signal handler, the SIGTERM deadlock above); the requeued job resumes exactly from
    ``last.ckpt`` with ``ckpt_path=last``.
    """

    def __init__(
        self,
        *args: Any,
        every_n_train_steps: int | None = None,
        every_n_minutes: float | None = None,
        train_time_interval: timedelta | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("save_last", True)
        # A resumed run rewrites its own files (last.ckpt, step<N>.ckpt) instead of adding -v1 copies.
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(*args, **kwargs)
        self.every_steps = every_n_train_steps or 0
        if train_time_interval is not None and every_n_minutes is None:
            every_n_minutes = train_time_interval.total_seconds() / 60
        self.every_seconds = every_n_minutes * 60 if every_n_minutes else None
        self._last_saved_step = -1
        self._clock = time.monotonic()
        self.preempted_at: int | None = None  # the step saved after SIGTERM
        self.requeued: str | None = None  # the SLURM job this run requeued (rank 0)
        self._sigterm = False
        self._requeue = False
        self._stop_after_validation = False

    def _skip(self, trainer: L.Trainer) -> bool:
        return bool(trainer.fast_dev_run) or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_saved_step = trainer.global_step
            self._clock = time.monotonic()

    def _update_best_and_save(
        self, current: torch.Tensor, trainer: L.Trainer, monitor_candidates: dict[str, Any]
    ) -> None:
        super()._update_best_and_save(current, trainer, monitor_candidates)
        if trainer.is_global_zero:
            self._link_best()

    def _link_best(self) -> None:
        """Point ``best.ckpt`` at the best checkpoint: a relative symlink (the run directory can be
        moved or copied), a copy where the file system has none; replaced atomically."""
        if not self.best_model_path or self.dirpath is None or "://" in str(self.dirpath):
            return
        best = Path(self.best_model_path)
        if not best.exists():  # a file, or a directory (a sharded checkpoint, trainer=fsdp)
            return
        link = Path(self.dirpath) / BEST_LINK
        # The ".*.ckpt.tmp-<pid>" pattern of AtomicCheckpointIO: a killed run's leftover is cleaned up.
        tmp = link.with_name(f".{BEST_LINK}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            os.symlink(best.name if best.parent == link.parent else best.resolve(), tmp)
        except OSError:
            if best.is_dir():
                shutil.copytree(best, tmp)
            else:
                shutil.copyfile(best, tmp)
        os.replace(tmp, link)

    def write_last(self, trainer: L.Trainer) -> None:
        """Write ``last.ckpt`` now (all ranks call this; rank 0 writes)."""
        # Lightning skips the validation-end top-k save at a step it has already saved; a resume
        # point is not a reason to skip choosing the best checkpoint.
        already = self._last_global_step_saved
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_global_step_saved = already

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        self._clock = time.monotonic()
        self._sigterm = self._requeue = self._stop_after_validation = False
        if threading.current_thread() is threading.main_thread():
            # Replaces the handlers Lightning installed for this fit; Lightning restores the originals at teardown.
            signal.signal(signal.SIGTERM, lambda signum, frame: self._on_sigterm(trainer, signum))
            env = trainer._accelerator_connector.cluster_environment
            if isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None:
                signal.signal(env.requeue_signal, lambda signum, frame: self._on_requeue_signal(signum))

    def _on_requeue_signal(self, signum: int) -> None:
        if not self._requeue:
            log.info(
                "received %s (SLURM auto-requeue): saving last.ckpt at the next step boundary, then requeueing",
                signal.Signals(signum).name,
            )
        self._requeue = self._sigterm = True

    def _on_sigterm(self, trainer: L.Trainer, signum: int) -> None:
        if not self._sigterm:
            log.info("received SIGTERM: saving last.ckpt at the next step boundary, then stopping")
            launcher = trainer.strategy.launcher
            if launcher is not None and hasattr(launcher, "kill"):
                launcher.kill(signum)  # the ranks Lightning started itself
        self._sigterm = True

    def _stop_requested(self, trainer: L.Trainer) -> bool:
        if trainer.world_size == 1:
            return self._sigterm
        flags = torch.tensor([float(self._sigterm), float(self._requeue)], device=trainer.strategy.root_device)
        stop, requeue = (trainer.strategy.reduce(flags, reduce_op="sum") > 0).tolist()
        self._requeue = bool(requeue)  # any rank's signal: rank 0 requeues the job
        return bool(stop)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.fit_loop._should_accumulate():
            return  # only at optimizer-step boundaries: accumulated gradients are not saved
        if self._stop_requested(trainer):
            # All ranks at once: Lightning raises SIGTERMException after this batch; on_exception
            # below saves. A validation due now runs whole first (see on_validation_end).
            if self._validation_due(trainer):
                self._stop_after_validation = True
            else:
                trainer._signal_connector.received_sigterm = True
        if self._skip(trainer):
            return
        step = trainer.global_step
        due = self.every_steps > 0 and step % self.every_steps == 0
        if self.every_seconds is not None:
            # Rank 0's clock decides, so that every rank saves together.
            due = trainer.strategy.broadcast(due or time.monotonic() - self._clock >= self.every_seconds)
        if due and step != self._last_saved_step:
            self.write_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.state.fn == TrainerFn.FITTING and trainer.fit_loop._should_accumulate():
            # Validation between two micro-batches of one optimizer step (val_check_interval counts
            # micro-batches): a checkpoint here could not hold the gradients accumulated so far.
            return
        super().on_validation_end(trainer, pl_module)
        fitting = trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        # The stop deferred to the end of this validation, or a signal that arrived during it.
        if fitting and (self._stop_after_validation or self._stop_requested(trainer)):
            trainer._signal_connector.received_sigterm = True

    @staticmethod
    def _validation_due(trainer: L.Trainer) -> bool:
        """Whether Lightning validates after the batch that just ended (its own test; rank 0's
        answer, which a time-based ``val_check_interval`` could make differ between ranks)."""
        loop = trainer.fit_loop.epoch_loop
        due = bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
        return bool(trainer.strategy.broadcast(due)) if trainer.world_size > 1 else due

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        super().on_train_end(trainer, pl_module)
        if not self._skip(trainer) and self.save_last and self._last_saved_step != trainer.global_step:
            self.write_last(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return super().on_exception(trainer, pl_module, exception)
        if self._skip(trainer) or not self.save_last:
            return None
        if self._last_saved_step != trainer.global_step:
            self.write_last(trainer)
        self.preempted_at = trainer.global_step
        if self._requeue and trainer.is_global_zero:
            self.requeued = requeue_slurm_job()
        return None


def requeue_slurm_job() -> str:
    """``scontrol requeue`` this SLURM job (an array job's task: ``<array job>_<task>``), as Lightning's
    auto-requeue handler does; returns the job id. A failure is logged: the checkpoint is saved."""
    import subprocess

    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:  # no scontrol here, or the controller does not answer
        log.warning("cannot requeue SLURM job %s (%s); last.ckpt is saved", job, e)
        return job
    if result.returncode == 0:
        log.info("requeued SLURM job %s", job)
    else:
        log.warning("scontrol requeue %s failed (%s): %s", job, result.returncode, result.stderr.strip())
    return job
