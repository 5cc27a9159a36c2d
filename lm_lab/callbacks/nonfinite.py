"""Skip optimizer steps with a non-finite loss or gradients; stop a run that keeps producing them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lm_lab.errors import NonFiniteLossError  # defined there (importable without torch), raised here
from lm_lab.schema import ConfigError

log = logging.getLogger("lm_lab")


class NonFiniteGuard(L.Callback):
    """An optimizer step whose loss (any micro-batch, any rank) or gradients are NaN/inf is skipped:
    its gradients are dropped, so the weights and the optimizer's moments stay as they were, and
    a warning names the step. After ``patience`` such steps in a row the run saves
    ``checkpoints/nonfinite-stepNNNNNN.ckpt`` (never picked by ``ckpt_path=last``) and stops with
    ``NonFiniteLossError``. Under ``16-mixed`` precision the gradient check is left to the
    GradScaler, which skips overflowing steps itself while it calibrates.
    """

    def __init__(self, patience: int = 5) -> None:
        if patience < 1:
            raise ConfigError(f"callbacks.nonfinite.patience={patience} must be >= 1 (steps in a row before stopping)")
        self.patience = patience
        self.bad_steps = 0
        self.first_bad: int | None = None
        self._loss_bad: torch.Tensor | None = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: Any, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach())
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad  # no host sync here

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        device = pl_module.device
        bad = self._loss_bad.float().max() if self._loss_bad is not None else torch.zeros((), device=device)
        self._loss_bad = None
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        shared_norm = None  # the norm clipping may reuse: plain tensors only (DTensors clip Lightning's way)
        if grads and str(trainer.precision) != "16-mixed":
            total = torch.nn.utils.get_total_norm(grads)  # NaN/inf if any gradient is
            if hasattr(total, "full_tensor"):  # FSDP2's sharded gradients: a DTensor, each rank holding a part
                total = total.full_tensor()
            else:
                shared_norm = total
            bad = torch.maximum(bad, (~torch.isfinite(total)).float().to(bad.device))
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="sum")
        if not bool(bad.item()):  # one host sync per optimizer step
            self.bad_steps, self.first_bad = 0, None
            if shared_norm is not None and hasattr(pl_module, "step_grad_norm"):
                pl_module.step_grad_norm = shared_norm  # LMTask clips with it (configure_gradient_clipping)
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # nothing to apply: AdamW leaves these parameters and moments alone
        step = trainer.global_step + 1  # as logged: train/loss of this step carries the same step number
        self.bad_steps += 1
        self.first_bad = step if self.first_bad is None else self.first_bad
        if trainer.is_global_zero:
            log.warning(
                "step %d: non-finite loss or gradients: optimizer step skipped (%d in a row; the run stops after %d)",
                step,
                self.bad_steps,
                self.patience,
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.bad_steps < self.patience:
            return
        ckpt_cb = trainer.checkpoint_callback
        dirpath = Path(getattr(ckpt_cb, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints")
        path = dirpath / f"nonfinite-step{trainer.global_step:06d}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)
        lr = getattr(getattr(pl_module, "optim_cfg", None), "lr", None)
        fixes = f"lower optimizer.lr (now {lr:g})" if lr is not None else "lower optimizer.lr"
        raise NonFiniteLossError(
            f"the loss or gradients were not finite for {self.bad_steps} optimizer steps in a row (steps "
            f"{self.first_bad}-{trainer.global_step}); stopped and saved {path}: {fixes} and start again (or "
            "from an earlier checkpoint), raise scheduler.warmup_steps, or use trainer.precision=32-true (or "
            "bf16-mixed instead of 16-mixed)"
        )
