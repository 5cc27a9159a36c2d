"""Hydra multirun and the Optuna sweeper drive train.py for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, SHAKESPEARE

TINY_CLI = [
    "model=gpt_tiny",
    "logger=csv",
    "data=files",
    f"data.data_files={SHAKESPEARE}",
    "data.tokenizer=char",
    "data.block_size=32",
    "data.batch_size=4",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "sample_tokens=0",
    "callbacks.text_samples=null",
    "scheduler.warmup_steps=1",
]


def _run(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LM_LAB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_multirun_grid(tmp_path: Path, shared_cache: Path) -> None:
    r = _run(["-m", *TINY_CLI, "optimizer.lr=1e-3,3e-3"], tmp_path, shared_cache)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = sorted((tmp_path / "logs" / "train" / "multiruns").glob("*/*/checkpoints/last.ckpt"))
    assert len(runs) == 2


def test_optuna_search_returns_best_params(tmp_path: Path, shared_cache: Path) -> None:
    r = _run(
        ["hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2", *TINY_CLI],
        tmp_path,
        shared_cache,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    best = next((tmp_path / "logs" / "train" / "multiruns").glob("*/optimization_results.yaml")).read_text()
    assert "best_params" in best and "optimizer.lr" in best and "best_value" in best
