"""Learning-rate schedules as pure functions of the step (unit-testable, no optimizer needed)."""

from __future__ import annotations

import math


def lr_at(
    step: int,
    *,
    max_lr: float,
    min_lr: float,
    warmup_steps: int,
    decay_steps: int,
    kind: str = "cosine",
) -> float:
    """Linear warm-up from 0 to ``max_lr`` over ``warmup_steps``, then decay to ``min_lr`` at
    ``decay_steps`` (cosine or linear), then constant ``min_lr``. ``kind="constant"`` keeps
    ``max_lr`` after warm-up. Matches nanoGPT's ``get_lr`` (which warms up over ``it + 1``)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return max_lr
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    if kind == "linear":
        return max_lr + (min_lr - max_lr) * progress
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
