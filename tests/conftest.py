"""Shared fixtures: the real Hydra config composed with tiny CPU overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"
sys.path.insert(0, str(REPO))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small, fast defaults for tests that run train(cfg).
TINY = [
    "model=gpt_tiny",
    "logger=csv",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "data.batch_size=4",
    "data.block_size=32",
    "scheduler.warmup_steps=2",
    "sample_tokens=8",
    "callbacks.text_samples.max_new_tokens=4",
]


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tokenizer/token cache for the whole session (the built-in corpus is tokenized once)."""
    return tmp_path_factory.mktemp("lm_lab_cache")


def compose_config(overrides: list[str], run_dir: Path, cache: Path) -> DictConfig:
    """Compose conf/config.yaml as `python train.py <overrides>` would, writing under run_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.paths.cache_dir = str(cache)
    return cfg


@pytest.fixture()
def compose_cfg(tmp_path: Path, shared_cache: Path) -> Callable[..., DictConfig]:
    """compose_cfg(*overrides, run_dir=None, cache=None) -> the real composed config."""

    def _compose(*overrides: str, run_dir: Path | None = None, cache: Path | None = None) -> DictConfig:
        return compose_config(list(overrides), run_dir or tmp_path / "run", cache or shared_cache)

    yield _compose
    GlobalHydra.instance().clear()


# ---------------------------------------------------------------- train.py as a user runs it
TRAIN = str(REPO / "train.py")


def run_train(args: list[str], cwd: Path, cache: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "LM_LAB_CACHE": str(cache), "WANDB_MODE": os.environ.get("WANDB_MODE", ""), **env}
    full_env.pop("WANDB_MODE") if not full_env["WANDB_MODE"] else None
    return subprocess.run(
        [sys.executable, TRAIN, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def run_dirs(cwd: Path) -> list[Path]:
    return [p for p in (cwd / "logs").glob("*/runs/*") if p.is_dir()]


def model_preset(name: str) -> DictConfig:
    """conf/model/<name>.yaml without its defaults list (which only picks the objective)."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
    node.pop("defaults", None)
    return node


def step_losses(run_dir: Path) -> tuple[dict[int, float], int]:
    """train/loss per step (the last row of each step wins) and the number of train/loss rows."""
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return {int(r["step"]): float(r["train/loss"]) for r in rows}, len(rows)
