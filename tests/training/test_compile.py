"""``compile=true`` (torch.compile, Inductor's C++ backend on CPU) against the eager network.

Every network preset (dropout off: Inductor's random masks come from its own generator) trains a few steps both ways from the same seed: the per-step training
losses and the final validation loss agree to float tolerance. A compiled run with the fused
AdamW also resumes exactly: killed after step 3 and resumed, it gives the uninterrupted run's
losses (the compiled module's weights are saved under the eager names)."""

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
    for step in (3, 4):
        assert resumed[step] == pytest.approx(whole[step], rel=1e-6, abs=1e-6), (step, whole, resumed)
