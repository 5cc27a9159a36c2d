"""Hydra multirun and the Optuna sweeper drive train.py for real."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def _cli(*changes: str) -> list[str]:
    """TINY_CLI with some keys (or groups) set otherwise."""
    keys = {c.split("=", 1)[0] for c in changes}
    return [a for a in TINY_CLI if a.split("=", 1)[0] not in keys] + list(changes)


def _run(args: list[str], cwd: Path, cache: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LM_LAB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", **extra_env}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_multirun_grid(tmp_path: Path, shared_cache: Path) -> None:
    r = _run(["-m", *TINY_CLI, "optimizer.lr=1e-3,3e-3"], tmp_path, shared_cache)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = sorted((tmp_path / "logs" / "train" / "multiruns").glob("*/*/checkpoints/last.ckpt"))
    assert len(runs) == 2


def test_multirun_jobs_are_separate_wandb_runs_grouped_by_sweep(tmp_path: Path, shared_cache: Path) -> None:
    """All jobs of a multirun share one process; each must still be its own W&B run."""
    args = ["-m", *_cli("logger=wandb"), "optimizer.lr=1e-3,3e-3"]
    r = _run(args, tmp_path, shared_cache, WANDB_MODE="offline")
    assert r.returncode == 0, r.stderr[-2000:]
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    runs = sorted(sweep.glob("*/wandb/offline-run-*"))
    assert [p.parts[-3] for p in runs] == ["0", "1"], runs  # one run folder in each job's directory
    ids = {p.name.rsplit("-", 1)[1] for p in runs}
    assert len(ids) == 2
    for job, run in enumerate(runs):
        (log,) = run.glob("run-*.wandb")
        data = log.read_bytes()
        assert f"train-{sweep.name}".encode() in data and f"train-{job}".encode() in data  # group and name
    assert "already in progress" not in r.stdout + r.stderr


def test_optuna_search_returns_best_params(tmp_path: Path, shared_cache: Path) -> None:
    """3 steps with validation every 2: the value each trial returns is the validation of its final
    (step 3) weights, not the step-2 one."""
    r = _run(
        [
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2",
            *_cli("trainer.max_steps=3"),
        ],
        tmp_path,
        shared_cache,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    best = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in best and "optimizer.lr" in best and "best_value" in best
    best_value = float(best.split("best_value:")[1].split()[0])
    final = []
    for job in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()):
        rows = list(csv.DictReader((job / "metrics.csv").open()))
        final += [float(r["val/loss"]) for r in rows if r.get("val/loss") and r["step"] == "3"]
    assert len(final) == 2 and best_value == pytest.approx(min(final), abs=1e-6)
    assert "setup plugin alembic" not in r.stdout + r.stderr
