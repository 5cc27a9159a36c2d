"""Gradient clipping with the norm the NonFiniteGuard computed: the same weights as Lightning's own clipping."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from omegaconf import DictConfig

from tests.conftest import SHAKESPEARE, TINY
from train import train

# Character-level Tiny Shakespeare, no validation; a clip value small enough that every step is clipped.
RUN = [
    *TINY,
    "data=files",
    f"data.data_files={SHAKESPEARE}",
    "data.tokenizer=char",
    "trainer.max_steps=5",
    "trainer.val_check_interval=100",
    "final_validation=false",
    "sample_tokens=0",
    "callbacks.text_samples=null",
    "trainer.gradient_clip_val=0.05",
    "seed=3",
]


def weights_after(compose_cfg: Callable[..., DictConfig], tmp_path: Any, name: str, *extra: str) -> tuple[dict, dict]:
    _, objects = train(compose_cfg(*RUN, *extra, run_dir=tmp_path / name))
    return {k: v.clone() for k, v in objects["task"].net.state_dict().items()}, objects


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_with_the_guard_gives_the_weights_of_lightnings_clipping(
    algorithm: str, compose_cfg: Callable[..., DictConfig], tmp_path: Any
) -> None:
    """With the guard, clipping by norm reuses its norm (LMTask.configure_gradient_clipping); without it
    Lightning computes clip_grad_norm_ itself. Clipping by value always takes Lightning's path."""
    clip = f"+trainer.gradient_clip_algorithm={algorithm}"
    guarded, _ = weights_after(compose_cfg, tmp_path, "guard", clip)
    stock, _ = weights_after(compose_cfg, tmp_path, "stock", clip, "callbacks.nonfinite=null")
    unclipped, _ = weights_after(compose_cfg, tmp_path, "unclipped", "trainer.gradient_clip_val=null")
    assert guarded.keys() == stock.keys()
    for k in guarded:
        assert torch.equal(guarded[k], stock[k]), k
    assert any(not torch.equal(guarded[k], unclipped[k]) for k in guarded)  # the clipping did something


@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_the_guards_norm_clips_exactly_like_clip_grad_norm(
    max_norm: float, compose_cfg: Callable[..., DictConfig], tmp_path: Any
) -> None:
    """One step's gradients, by hand through the real trainer's guard and task hooks: the same bits as
    clip_grad_norm_ whether it clips (0.05) or the norm is within the limit (1e6, where the task skips
    the multiplication by 1.0 on CPU)."""
    from lm_lab.callbacks.nonfinite import NonFiniteGuard

    _, objects = weights_after(compose_cfg, tmp_path, "run")
    trainer, task = objects["trainer"], objects["task"]
    (guard,) = [c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)]
    optimizer = trainer.optimizers[0]
    task.train()
    ids = torch.randint(0, task.model_cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
    logits = task.net(ids[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    expected = [p.grad.clone() for p in params]
    norm = torch.nn.utils.clip_grad_norm_([_with_grad(g) for g in expected], max_norm)  # clips `expected` in place
    assert (norm > max_norm) == (max_norm == 0.05)  # one case clips, the other does not

    guard.on_before_optimizer_step(trainer, task, optimizer)
    assert task.step_grad_norm is not None and torch.equal(task.step_grad_norm, norm)
    task.configure_gradient_clipping(optimizer, max_norm, "norm")
    assert task.step_grad_norm is None  # used once
    for g, p in zip(expected, params, strict=True):
        assert torch.equal(p.grad, g)
    optimizer.zero_grad()


def _with_grad(g: torch.Tensor) -> torch.Tensor:
    p = torch.nn.Parameter(torch.empty_like(g))
    p.grad = g  # clipped in place: `g` itself
    return p


@pytest.mark.parametrize("guard", [True, False])
def test_bf16_mixed_clips_the_default_fused_adamw(
    guard: bool, compose_cfg: Callable[..., DictConfig], tmp_path: Any
) -> None:
    """AdamW's fused kernel is the CPU default; Lightning refuses to clip for it under autocast (it
    unscales inside its step, which only matters with a loss scaler). Under bf16-mixed the task clips
    it itself, with or without the guard, and the clipping changes the weights."""
    bf16 = ["trainer.precision=bf16-mixed"]
    no_guard = [] if guard else ["callbacks.nonfinite=null"]
    clipped, objects = weights_after(compose_cfg, tmp_path, "clipped", *bf16, *no_guard)
    assert objects["trainer"].optimizers[0].defaults["fused"] is True
    unclipped, _ = weights_after(compose_cfg, tmp_path, "unclipped", *bf16, *no_guard, "trainer.gradient_clip_val=null")
    # The same run with the for-loop AdamW (which Lightning clips itself without the guard) agrees to
    # the two kernels' rounding: Adam divides by sqrt(v), so a weight whose gradients are near zero moves
    # by up to a few percent of lr (1e-3 here) apart. Clipping moves the weights by far more than that.
    loop, _ = weights_after(compose_cfg, tmp_path, "loop", *bf16, *no_guard, "optimizer.fused=false")
    effect = max((clipped[k] - unclipped[k]).abs().max().item() for k in clipped)
    apart = max((clipped[k] - loop[k]).abs().max().item() for k in clipped)
    assert apart < 1e-4 < effect / 10, (apart, effect)
