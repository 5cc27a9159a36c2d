"""``compile=true`` (torch.compile, Inductor's C++ backend on CPU) against the eager network.

Every network preset (dropout off: Inductor's random masks come from its own generator) trains a few steps both ways from the same seed: the per-step training
losses and the final validation loss agree to float tolerance. A compiled run with the fused
AdamW also resumes exactly: stopped after step 2 and resumed, it gives the uninterrupted run's
losses to the bit (the compiled module's weights are saved under the eager names), and two compiled
runs are the same run to the bit (deterministic algorithms on CPU: lm_lab.training.compilation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import SHAKESPEARE, TINY, compose_config, step_losses
from train import train

SHAKES = [f"data.data_files={SHAKESPEARE}", "data.path=text", "data.tokenizer=char"]
STEPS = ["trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.log_every_n_steps=1", "sample_tokens=0"]


def _run(run_dir: Path, cache: Path, *overrides: str) -> tuple[dict[int, float], float]:
    from hydra.core.global_hydra import GlobalHydra

    cfg = compose_config([*TINY, *SHAKES, *STEPS, *overrides], run_dir, cache)
    try:
        metrics, _ = train(cfg)
    finally:
        GlobalHydra.instance().clear()
    losses, _ = step_losses(run_dir)
    return losses, metrics["val/loss"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt_tiny", "llama_tiny", "bert_tiny"])
def test_compiled_network_trains_like_eager(model: str, tmp_path: Path, shared_cache: Path) -> None:
    torch._dynamo.reset()
    # BERT: a WordPiece vocabulary (it needs [MASK], [CLS], [SEP]) and no dropout: Inductor draws its
    # random masks from its own generator, so dropout differs from eager's by design.
    bert = ["data.tokenizer=auto", "data.vocab_size=600", "objective.pair_objective=none"]
    extra = [*bert, "model.dropout=0", "model.attn_dropout=0"] if model.startswith("bert") else []
    eager, eager_val = _run(tmp_path / "eager", shared_cache, f"model={model}", "compile=false", *extra)
    compiled, compiled_val = _run(tmp_path / "compiled", shared_cache, f"model={model}", "compile=true", *extra)
    assert sorted(eager) == sorted(compiled) == [1, 2, 3, 4]
    for step, loss in eager.items():
        assert compiled[step] == pytest.approx(loss, rel=1e-4, abs=1e-4), (step, eager, compiled)
    assert compiled_val == pytest.approx(eager_val, rel=1e-4, abs=1e-4)


@pytest.mark.slow
def test_compiled_fused_run_resumes_exactly(tmp_path: Path, shared_cache: Path) -> None:
    torch._dynamo.reset()
    fast = ["compile=true", "optimizer.fused=true", "trainer.val_check_interval=2"]
    whole, _ = _run(tmp_path / "whole", shared_cache, *fast)
    part = tmp_path / "part"
    _run(part, shared_cache, *fast, "trainer.max_steps=2")
    resumed, _ = _run(part, shared_cache, *fast, "ckpt_path=last")
    assert {3, 4} <= set(resumed)
    for step in (3, 4):  # to the bit: compiled CPU training is deterministic (see the test below)
        assert resumed[step] == whole[step], (step, whole, resumed)


def _flags() -> tuple[bool, bool]:
    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


@pytest.mark.slow
def test_compiled_cpu_training_is_the_same_run_after_run(tmp_path: Path, shared_cache: Path) -> None:
    """Inductor's C++ kernels add up the token embedding's gradient with atomic adds from both
    threads, in whatever order they get there: without deterministic algorithms two compiled runs
    from one seed differed in their last bits (lm_lab.training.compilation). compile=true on CPU
    turns them on: two runs give the same losses and the same weights to the bit, and after each
    train() PyTorch's flags are as they were before it."""
    torch._dynamo.reset()
    before = _flags()
    runs = []
    for name in ("first", "second"):
        losses, val = _run(tmp_path / name, shared_cache, "compile=true", "trainer.max_steps=8")
        weights = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        runs.append((losses, val, weights))
        assert _flags() == before
    (first, first_val, first_w), (second, second_val, second_w) = runs
    assert sorted(first) == list(range(1, 9))
    assert first == second and first_val == second_val, (first, second)
    assert first_w.keys() == second_w.keys()
    assert all(torch.equal(first_w[k], second_w[k]) for k in first_w), [
        k for k in first_w if not torch.equal(first_w[k], second_w[k])
    ]
