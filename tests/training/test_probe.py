"""probe=polarity: a downstream linear probe during pretraining, logged next to the loss, without
changing what the run trains."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from lm_lab.callbacks.probe import fit_and_score
from tests.conftest import TINY, compose_config, step_losses
from train import train

RUN = [
    *TINY,
    "model=bert_tiny",
    "data.batch_size=8",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "sample_tokens=0",
]


def test_logistic_probe_separates_separable_data_and_not_noise() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    assert fit_and_score(x[:300], y[:300], x[300:], y[300:], 1e-3) > 0.95
    noise = torch.randint(0, 2, (400,), generator=g)
    assert 0.3 < fit_and_score(x[:300], noise[:300], x[300:], noise[300:], 1e-3) < 0.7


@pytest.mark.slow  # long end-to-end runs: make test-slow (CI runs both)
def test_probe_is_logged_and_leaves_training_unchanged(tmp_path: Path, shared_cache: Path) -> None:
    for name, extra in (("plain", []), ("probed", ["probe=polarity"])):
        cfg = compose_config([*RUN, *extra], tmp_path / name, shared_cache)
        try:
            train(cfg)
        finally:
            GlobalHydra.instance().clear()
    assert step_losses(tmp_path / "plain")[0] == step_losses(tmp_path / "probed")[0]
    rows = list(csv.DictReader((tmp_path / "probed" / "metrics.csv").open()))
    probes = [float(r["probe/polarity_acc"]) for r in rows if r.get("probe/polarity_acc")]
    assert len(probes) == 2 and all(0.0 <= p <= 1.0 for p in probes)
