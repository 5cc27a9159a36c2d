"""The optimizer and learning-rate schedule settings (the ``optimizer`` and ``scheduler`` groups)."""

from __future__ import annotations

import dataclasses
import math
import typing

from lm_lab.schema import ConfigBase


@dataclasses.dataclass
class OptimizerConfig(ConfigBase):
    """AdamW settings. Weight decay applies only to matrices (not biases, norms, embeddings' 1-D)."""

    _section: typing.ClassVar[str] = "optimizer"
    lr: float = 6e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    fused: bool | None = None

    def validate(self) -> None:
        # inf passes "> 0" and turns every weight into NaN at the first step (nan fails the comparison).
        self.require(
            math.isfinite(self.lr) and self.lr > 0,
            f"optimizer.lr={self.lr} must be > 0 and finite: pass a positive learning rate",
        )
        self.require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optimizer.betas={list(self.betas)} must be two numbers in [0, 1)",
        )
        self.require(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            f"optimizer.weight_decay={self.weight_decay} must be >= 0 and finite",
        )
        self.require(math.isfinite(self.eps) and self.eps > 0, f"optimizer.eps={self.eps} must be > 0 and finite")


@dataclasses.dataclass
class SchedulerConfig(ConfigBase):
    """Linear warm-up then decay to ``min_lr`` (cosine or linear) over ``decay_steps``.

    ``decay_steps=None`` means "until trainer.max_steps", resolved in ``train()``.
    """

    _section: typing.ClassVar[str] = "scheduler"
    warmup_steps: int = 100
    min_lr: float = 6e-5
    decay_steps: int | None = None
    kind: typing.Literal["cosine", "linear", "constant"] = "cosine"

    def validate(self) -> None:
        self.require(self.warmup_steps >= 0, f"scheduler.warmup_steps={self.warmup_steps} must be >= 0")
        self.require(
            math.isfinite(self.min_lr) and self.min_lr >= 0, f"scheduler.min_lr={self.min_lr} must be >= 0 and finite"
        )
        self.require(
            self.decay_steps is None or self.decay_steps > 0,
            f"scheduler.decay_steps={self.decay_steps} must be > 0 (or null for trainer.max_steps)",
        )
