"""The LR schedule is a pure function; check it against nanoGPT's get_lr formula."""

from __future__ import annotations

import math

import pytest

from lm_lab.training.schedule import lr_at


def nanogpt_get_lr(it: int, lr=1e-3, warmup=100, decay=2000, min_lr=1e-4) -> float:
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay:
        return min_lr
    ratio = (it - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@pytest.mark.parametrize("step", [0, 1, 50, 99, 100, 101, 500, 1000, 1999, 2000, 2500])
def test_cosine_matches_nanogpt(step: int) -> None:
    got = lr_at(step, max_lr=1e-3, min_lr=1e-4, warmup_steps=100, decay_steps=2000)
    assert got == pytest.approx(nanogpt_get_lr(step), rel=1e-12)


def test_linear_and_constant() -> None:
    kw = dict(max_lr=1.0, min_lr=0.0, warmup_steps=10, decay_steps=110)
    assert lr_at(60, kind="linear", **kw) == pytest.approx(0.5)
    assert lr_at(110, kind="linear", **kw) == 0.0
    assert lr_at(5000, kind="constant", **kw) == 1.0
    assert lr_at(0, kind="constant", **kw) == pytest.approx(1 / 11)
