"""W&B tracking, offline: what a run leaves in its offline records, read back with tests/wandb_records.py."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SHAKESPEARE
from tests.wandb_records import summary

TINY = [
    "model=gpt_tiny",
    "logger=wandb",
    "data=files",
    f"data.data_files={SHAKESPEARE}",
    "data.tokenizer=char",
    "data.block_size=32",
    "data.batch_size=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "sample_tokens=0",
    "callbacks.text_samples.max_new_tokens=4",
    "scheduler.warmup_steps=1",
]


def _train(args: list[str], run_dir: Path, cache: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LM_LAB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **extra_env}
    env.pop("WANDB_API_KEY", None)
    r = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def _artifacts(s: dict) -> dict[str, tuple[str, str, bool]]:
    return {a.type: (a.name, a.digest, a.use_after_commit) for a in s["artifacts"]}


@pytest.mark.slow
def test_offline_wandb_run_records_config_history_samples_lineage_and_resumes_in_the_same_run(
    tmp_path: Path, shared_cache: Path
) -> None:
    """A run logged offline holds its resolved config, train/loss at every step, the samples table,
    the tokenizer and data artifacts it uses and (log_model) its checkpoint; resumed, it continues the
    same W&B run id; another run on the same data uses the same artifacts (same digests)."""
    run_a = tmp_path / "a"
    args = [TINY[0], "optimizer.lr=2e-3", *TINY[1:]]  # the name lists the overrides in the command's order
    r = _train([*args, "trainer.max_steps=4", "logger.wandb.log_model=true"], run_a, shared_cache)
    (first,) = _offline_runs(run_a)
    assert f"wandb sync {first.parent}" in r.stdout  # the command to upload it, printed at the end
    s = summary(first)
    run_id = s["run"].run_id
    assert first.name == f"run-{run_id}.wandb" and (run_a / "wandb" / "run_id").read_text().strip() == run_id
    assert s["run"].display_name.startswith("train ") and "optimizer.lr=2e-3" in s["run"].display_name
    assert "optimizer.lr=2e-3" in s["run"].tags and "model=gpt_tiny" in s["run"].tags
    assert s["config"]["model"]["n_layer"] == 2 and s["config"]["optimizer"]["lr"] == 2e-3  # resolved config
    assert s["config"]["data"]["data_files"] == str(SHAKESPEARE)
    assert sorted(step for step, _ in s["history"]["train/loss"]) == [1, 2, 3, 4]
    assert s["run"].display_name.count("data.data_files=input.txt") == 1  # a file name, not its path
    assert "logger=wandb" not in s["run"].tags
    tables = [v for _, v in s["history"]["samples/_type"]]
    assert tables == ["table-file", "table-file"]  # a wandb.Table at each validation (steps 2 and 4)
    arts = _artifacts(s)
    assert arts["tokenizer"][2] and arts["dataset"][2]  # used by the run, not produced
    assert not arts["model"][2]  # log_model: the checkpoint is the run's output
    assert s["exit"] == 0

    _train([*args, "trainer.max_steps=6", "ckpt_path=last"], run_a, shared_cache)
    resumed = [p for p in _offline_runs(run_a) if p != first]
    assert len(resumed) == 1 and summary(resumed[0])["run"].run_id == run_id
    assert sorted(step for step, _ in summary(resumed[0])["history"]["train/loss"]) == [5, 6]

    run_b = tmp_path / "b"
    r = _train([*TINY, "trainer.max_steps=2", "optimizer.lr=1e-3"], run_b, shared_cache, PYTHONPROFILEIMPORTTIME="1")
    # W&B (and the Launch package wandb.init imports) before Lightning: loggers.import_wandb.
    done = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    assert done.index("wandb.sdk.launch.inputs.internal") < done.index("lightning"), "W&B imported after Lightning"
    (other,) = _offline_runs(run_b)
    t = summary(other)
    assert t["run"].run_id != run_id
    b = _artifacts(t)
    for kind in ("tokenizer", "dataset"):  # same data, same tokenizer: the same artifact version
        assert b[kind][:2] == arts[kind][:2], kind


@pytest.mark.slow
def test_offline_wandb_encoder_logs_a_fill_mask_table(tmp_path: Path, shared_cache: Path) -> None:
    run = tmp_path / "bert"
    args = [
        "model=bert_tiny",
        "logger=wandb",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "data.batch_size=4",
        "data.block_size=32",
        "sample_tokens=0",
        "scheduler.warmup_steps=1",
    ]
    _train(args, run, shared_cache)
    (log,) = _offline_runs(run)
    s = summary(log)
    assert [v for _, v in s["history"]["fill_mask/_type"]] == ["table-file"]
    ((_, path),) = s["history"]["fill_mask/path"]
    data = json.loads((log.parent / "files" / path).read_text())
    assert data["columns"] == ["step", "prompt", "predictions"]
    assert data["data"][0][0] == 2 and "[MASK]" in data["data"][0][1] and "(" in data["data"][0][2]


@pytest.mark.slow  # 40 s measured on the shared 2-core machine (load ~10)
def test_a_wandb_that_cannot_start_is_one_warning_and_training_goes_on(
    tmp_path: Path, shared_cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A project name W&B refuses (an unwritable folder is no test: wandb 0.31 falls back to a temporary
    one): the run trains to the end with CSV, and the only trace of W&B is one warning line."""
    from tests.training.test_reliability import train_in_process

    monkeypatch.setenv("WANDB_MODE", "offline")
    caplog.set_level(logging.INFO, logger="lm_lab")
    overrides = [*TINY[:1], "logger=wandb", "logger.wandb.project=a/b", "trainer.max_steps=2"]
    overrides += [o for o in TINY[2:] if not o.startswith("callbacks.")]
    out = train_in_process(overrides, tmp_path / "run", shared_cache)
    assert out["trainer"].global_step == 2
    assert [type(lg).__name__ for lg in out["trainer"].loggers] == ["AppendingCSVLogger"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    (wandb_warning,) = [w for w in warnings if "Wandb" in w or "W&B" in w]
    assert "logger WandbLogger could not start" in wandb_warning and "\n" not in wandb_warning


def test_uses_wandb_and_import_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    """Which logger settings log to W&B (train() imports it before Lightning for those), and that
    import_wandb imports the module wandb.init itself imports on every run (if W&B moved it, the early
    import would silently stop saving its cost: this fails instead)."""
    import inspect

    import wandb

    from lm_lab.training.loggers import import_wandb, uses_wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    ours = {"_target_": "lm_lab.training.loggers.wandb_logger", "mode": "auto"}
    csv = {"_target_": "lm_lab.training.loggers.csv_logger"}
    assert uses_wandb([csv, ours]) and not uses_wandb([csv]) and not uses_wandb([])
    assert not uses_wandb([{**ours, "mode": "disabled"}])
    assert uses_wandb([{"_target_": "lightning.pytorch.loggers.WandbLogger"}])
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert not uses_wandb([ours])  # WANDB_MODE wins over the config, as in wandb_logger
    import_wandb()
    assert "wandb.sdk.launch.inputs.internal" in sys.modules
    assert "wandb.sdk.launch.inputs.internal" in inspect.getsource(wandb.sdk.wandb_run.Run._detect_and_apply_job_inputs)
