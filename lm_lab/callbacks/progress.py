"""Progress a person can read wherever the output goes.

On a terminal Lightning's progress bar is shown (:func:`progress_bar`, without its ``v_num`` and
``Epoch 3/-2`` oddities). Under nohup, SLURM, ``| tee`` or a redirect a bar prints nothing useful,
so there :class:`ProgressLog` prints a plain line every few optimizer steps, as nanoGPT does::

    step 50/600 | loss 5.1234 | lr 3.00e-04 | 12,345 tok/s | elapsed 0:01:02 | eta 0:11:20

The lines always go to ``train.log`` (the ``lm_lab`` logger); on the console only when no bar is shown.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

log = logging.getLogger("lm_lab")


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def total_steps(trainer: L.Trainer) -> int:
    """The run's length in optimizer steps (``max_steps``, or Lightning's estimate for epoch budgets)."""
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        return int(trainer.estimated_stepping_batches)
    except Exception:  # no length known (a streamed corpus without max_steps)
        return 0


class ProgressLog(L.Callback):
    """A line every ``every_n_steps`` optimizer steps (and after the first and the last) with
    step/total, loss, learning rate, tokens/s, elapsed time and ETA, and one after each validation.

    Values are read from ``trainer.callback_metrics`` only when a line is printed: no host sync on
    the other steps. Tokens/s and the ETA count training time only (validation is left out).
    """

    def __init__(self, every_n_steps: int = 25) -> None:
        if every_n_steps < 1:
            from lm_lab.schema import ConfigError

            raise ConfigError(f"callbacks.progress.every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps
        self.lines: list[str] = []  # what was printed (for tests and notebooks)
        self._total = 0
        self._wall0 = time.monotonic()
        self._train_time = 0.0  # training time before the current stretch (validation excluded)
        self._stretch0: float | None = None
        self._first_step = 0
        self._last = (0, 0, 0.0)  # (step, tokens, training time) at the previous line

    def _emit(self, trainer: L.Trainer, line: str) -> None:
        self.lines.append(line)
        # Beside a progress bar the line would tear it: train.log only.
        log.info("%s", line, extra={"console": trainer.progress_bar_callback is None})

    def _training_time(self) -> float:
        running = time.monotonic() - self._stretch0 if self._stretch0 is not None else 0.0
        return self._train_time + running

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._total = total_steps(trainer)
        self._wall0 = self._stretch0 = time.monotonic()
        self._train_time = 0.0
        self._first_step = trainer.global_step
        self._last = (trainer.global_step, int(getattr(pl_module, "tokens_seen", 0)), 0.0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.fit_loop._should_accumulate() or not trainer.is_global_zero:
            return
        step = trainer.global_step
        if not (step % self.every_n_steps == 0 or step == self._first_step + 1 or step == self._total):
            return
        # The task's metrics of this very step (it hands them to Lightning's logging only every
        # log_every_n_steps); Lightning's callback metrics otherwise.
        metrics = getattr(pl_module, "step_metrics", None) or trainer.callback_metrics
        train_time = self._training_time()
        tokens = int(getattr(pl_module, "tokens_seen", 0))
        last_step, last_tokens, last_time = self._last
        parts = [f"step {step}/{self._total}" if self._total else f"step {step}"]
        if "train/loss" in metrics:
            parts.append(f"loss {float(metrics['train/loss']):.4f}")
        if "lr" in metrics:
            parts.append(f"lr {float(metrics['lr']):.2e}")
        done = step - self._first_step
        # The first step also pays for start-up (data loader, allocations): no rate or ETA from it.
        if done > 1 and train_time > last_time and tokens > last_tokens:
            parts.append(f"{(tokens - last_tokens) / (train_time - last_time):,.0f} tok/s")
        parts.append(f"elapsed {_clock(time.monotonic() - self._wall0)}")
        if self._total and done > 1:
            parts.append(f"eta {_clock((self._total - step) * train_time / done)}")
        self._last = (step, tokens, train_time)
        self._emit(trainer, " | ".join(parts))

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self._stretch0 is not None:
            self._train_time += time.monotonic() - self._stretch0
            self._stretch0 = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._stretch0 = time.monotonic()
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        values = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")}
        if not values:
            return
        where = f"step {trainer.global_step}/{self._total}" if self._total else f"step {trainer.global_step}"
        shown = " | ".join(f"{k} {v:.4f}" for k, v in values.items())
        # After fit (final_val_batches, or an epoch budget): the final weights, on more of the split.
        what = "validation" if trainer.state.fn == TrainerFn.FITTING else "final validation"
        self._emit(trainer, f"{where} | {what}: {shown}")


class _StepBarMixin:
    """The bar's metrics without Lightning's ``v_num`` (a W&B id, meaningless here), plus the
    optimizer step out of the run's total (an epoch count means little in a step-budgeted run)."""

    def get_metrics(self, trainer: L.Trainer, pl_module: Any) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)  # type: ignore[misc]
        items.pop("v_num", None)
        total = total_steps(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            items = {"step": f"{trainer.global_step}/{total}" if total else str(trainer.global_step), **items}
        return items


class StepRichProgressBar(_StepBarMixin, RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning writes "Epoch 3/-2" when max_epochs is -1 (the run is bounded by max_steps).
        description = f"Epoch {current_epoch}"
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            description += f"/{self.trainer.max_epochs - 1}"
        if len(self.validation_description) > len(description):
            description = f"{description:{len(self.validation_description)}}"  # no flicker against "Validation"
        return description


class StepTQDMProgressBar(_StepBarMixin, TQDMProgressBar):
    pass


def progress_bar(refresh_rate: int = 1) -> RichProgressBar | TQDMProgressBar:
    """Lightning's progress bar (rich when installed, else tqdm) with the fixes above."""
    if _RICH_AVAILABLE:
        return StepRichProgressBar(refresh_rate=refresh_rate)
    return StepTQDMProgressBar(refresh_rate=refresh_rate)
