"""python -m lm_lab.report on real runs made through train.py's command line."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SHAKESPEARE

TINY_CLI = [
    "model=gpt_tiny",
    "logger=csv",
    "data=shakespeare_char",
    f"data.data_files={SHAKESPEARE}",
    "data.block_size=32",
    "data.batch_size=4",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "sample_tokens=0",
    "callbacks.text_samples=null",
    "scheduler.warmup_steps=1",
]
PNG = b"\x89PNG\r\n\x1a\n"


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "LM_LAB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


def _train(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=_env(cache), capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def _report(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lm_lab.report", *map(str, args)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )


def _table(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 10_000, path  # a figure with axes and curves, not an empty canvas


def test_report_refuses_what_is_not_a_run_directory(tmp_path: Path) -> None:
    for target, words in ((tmp_path / "missing", "is not a directory"), (tmp_path, "no runs under")):
        r = _report(target, cwd=tmp_path)
        assert r.returncode == 2
        assert r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
        assert not (target / "report").exists()


@pytest.mark.slow
def test_report_on_a_multirun_and_a_resumed_run(tmp_path: Path, shared_cache: Path) -> None:
    _train(["-m", *TINY_CLI, "optimizer.lr=1e-3,3e-3", "hydra.sweep.dir=logs/sweep"], tmp_path, shared_cache)
    sweep = tmp_path / "logs" / "sweep"
    r = _report(sweep, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert (
        lines[0].split()[:3] == ["run", "optimizer.lr", "status"]
        and len([x for x in lines if x.startswith(("0 ", "1 "))]) == 2
    )
    rows = _table(sweep / "report" / "runs.csv")
    assert [(row["run"], row["optimizer.lr"], row["status"], row["steps"]) for row in rows] == [
        ("0", "0.001", "finished", "4"),
        ("1", "0.003", "finished", "4"),
    ]
    for row, job in zip(rows, ("0", "1"), strict=True):  # the final and best val/loss are those of metrics.csv
        with open(sweep / job / "metrics.csv", newline="") as f:
            val = [float(m["val/loss"]) for m in csv.DictReader(f) if m.get("val/loss")]
        assert float(row["final val/loss"]) == pytest.approx(val[-1], abs=1e-4)
        assert float(row["best val/loss"]) == pytest.approx(min(val), abs=1e-4)
        assert row["tokens"] == "512" and row["wall"].count(":") == 2
    _png(sweep / "report" / "loss_curves.png")
    _png(sweep / "report" / "sweep.png")

    # Job 0 continued in a new directory from its checkpoint, then once more in that directory:
    # one run of 8 steps, 3 attempts, each step counted once.
    ckpt = sweep / "0" / "checkpoints" / "last.ckpt"
    more = [a for a in TINY_CLI if not a.startswith("trainer.max_steps")]
    _train([*more, "trainer.max_steps=6", f"ckpt_path={ckpt}", "hydra.run.dir=logs/resumed"], tmp_path, shared_cache)
    _train([*more, "trainer.max_steps=8", "ckpt_path=last", "hydra.run.dir=logs/resumed"], tmp_path, shared_cache)
    r = _report(tmp_path / "logs", "--out", tmp_path / "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = {row["run"]: row for row in _table(tmp_path / "out" / "runs.csv")}
    assert sorted(rows) == ["sweep/0", "sweep/1"]  # logs/resumed is sweep/0's continuation, not a run of its own
    assert (rows["sweep/0"]["steps"], rows["sweep/0"]["status"], rows["sweep/0"]["tokens"]) == (
        "8",
        "finished",
        "1,024",
    )
    assert rows["sweep/1"]["steps"] == "4"
    status = json.loads((tmp_path / "logs" / "resumed" / "status.json").read_text())
    assert [a["status"] for a in status["attempts"]] == ["finished", "finished"]
    assert status["attempts"][0]["resumed_from"] == str(ckpt.resolve())


@pytest.mark.slow
def test_report_tells_running_from_killed(tmp_path: Path, shared_cache: Path) -> None:
    more = [a for a in TINY_CLI if not a.startswith("trainer.max_steps")]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *more, "trainer.max_steps=100000", "hydra.run.dir=logs/long"],
        cwd=tmp_path,
        env=_env(shared_cache),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run = tmp_path / "logs" / "long"
    try:
        deadline = time.monotonic() + 240
        while not (run / "metrics.csv").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert (run / "status.json").exists(), "the run never started"
        r = _report(run, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert _table(run / "report" / "runs.csv")[0]["status"] == "running"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    r = _report(run, cwd=tmp_path)
    assert _table(run / "report" / "runs.csv")[0]["status"] == "failed"  # killed: its attempt never closed
    assert json.loads((run / "status.json").read_text())["attempts"][0]["status"] == "running"
