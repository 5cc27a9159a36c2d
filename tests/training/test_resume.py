"""Exact resume, tested the way it happens: `python train.py` killed with SIGTERM or SIGKILL, then
rerun with ckpt_path=last into the same run directory; its per-step train/loss must equal an
uninterrupted run's (dropout on, so the RNG streams matter too)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from tests.conftest import REPO, SHAKESPEARE, compose_config, step_losses

TRAIN = str(REPO / "train.py")
STEPS = 40
# Tiny, with dropout; the LR schedule is pinned to STEPS so a run may be started with more steps
# (it is killed long before) and resumed with STEPS.
COMMON = [
    "trainer.val_check_interval=5",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "+logger.csv.flush_logs_every_n_steps=1",
    "callbacks.text_samples=null",
    "sample_tokens=0",
    "final_validation=false",
    "scheduler.warmup_steps=3",
    f"scheduler.decay_steps={STEPS}",
    f"data.data_files={SHAKESPEARE}",
]
FAMILIES = {
    "gpt": [
        "model=gpt_tiny",
        "model.dropout=0.1",
        "data=files",
        "data.tokenizer=char",
        "data.block_size=32",
        "data.batch_size=4",
    ],
    "bert": [
        "model=bert_tiny",
        "data=files",
        "data.path=text",
        "data.sample_by=paragraph",
        "data.vocab_size=500",
        "data.block_size=32",
        "data.batch_size=8",
    ],
}
# 2 CPU processes (gloo), each accumulating 2 micro-batches of 2 per optimizer step.
FAMILIES["gpt-ddp"] = ["trainer=ddp_cpu", *FAMILIES["gpt"], "data.batch_size=8", "data.micro_batch_size=2"]
TOL = 1e-6


def env(cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "LM_LAB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
    }


def start(args: list[str], run_dir: Path, cache: Path) -> subprocess.Popen:
    # A session of its own, so that a DDP run's second process is killed with the first.
    return subprocess.Popen(
        [sys.executable, TRAIN, *args, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        env=env(cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def run(args: list[str], run_dir: Path, cache: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, TRAIN, *args, f"hydra.run.dir={run_dir}"],
        cwd=run_dir.parent,
        env=env(cache),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def saved_step(ckpt: Path) -> int:
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


def wait_for_checkpoint(proc: subprocess.Popen, ckpt: Path, at_least: int, timeout: float = 240) -> int:
    """Poll until ``ckpt`` holds step >= at_least (writes are atomic, so a read never sees half a file)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"training ended early:\n{proc.stdout.read()[-3000:]}"
        if ckpt.is_file():
            step = saved_step(ckpt)
            if step >= at_least:
                return step
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no checkpoint at step >= {at_least} within {timeout}s")


def val_losses(run_dir: Path) -> dict[int, float]:
    """val/loss per step at which the run validated (the last row of each step wins)."""
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["val/loss"]) for r in csv.DictReader(f) if r.get("val/loss")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> dict[str, dict[int, float]]:
    """Uninterrupted runs, one per family, computed on first use: train/loss per step
    (``reference(family)``) and val/loss per validation (``reference(family, "val")``)."""
    cache: dict[tuple[str, str], dict[int, float]] = {}

    def get(family: str, split: str = "train") -> dict[int, float]:
        if (family, split) not in cache:
            run_dir = tmp_path_factory.mktemp(f"ref_{family}") / "run"
            run([*FAMILIES[family], *COMMON, f"trainer.max_steps={STEPS}"], run_dir, shared_cache)
            cache[family, "train"] = step_losses(run_dir)[0]
            cache[family, "val"] = val_losses(run_dir)
            assert sorted(cache[family, "train"]) == list(range(1, STEPS + 1))  # steps completed
        return cache[family, split]

    return get


def compare(got: dict[int, float], want: dict[int, float]) -> float:
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    diff = max(abs(got[s] - want[s]) for s in want)
    print(f"max |train/loss difference| over {len(want)} steps: {diff:.2e}")
    return diff


@pytest.mark.parametrize(
    "family", ["gpt", pytest.param("bert", marks=pytest.mark.slow), pytest.param("gpt-ddp", marks=pytest.mark.slow)]
)  # slow ones: ~60 s each
def test_sigterm_then_sigkill_then_resume_equals_uninterrupted(
    family: str, reference, tmp_path: Path, shared_cache: Path
) -> None:
    """SIGTERM (to every process, as SLURM or torchrun send it): saves at the next step boundary,
    exits 0. Resumed, then SIGKILLed right after a periodic checkpoint. Resumed again to the end:
    every step's loss equals the uninterrupted run's, and metrics.csv still holds the killed
    attempts' rows. Under DDP each rank's data shard and dropout stream must resume exactly."""
    want = reference(family)
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    args = [*FAMILIES[family], *COMMON, "callbacks.model_checkpoint.every_n_train_steps=3"]

    # 1. SIGTERM (preemption): the run saves last.ckpt at the next step boundary and exits with 0.
    proc = start([*args, "trainer.max_steps=1000", "ckpt_path=last"], run_dir, shared_cache)
    wait_for_checkpoint(proc, last, 3)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "ckpt_path=last: no checkpoint in" in out  # "last" with nothing to resume starts fresh
    assert "stopped by SIGTERM after step" in out, out[-2000:]
    first_stop = saved_step(last)
    assert 3 <= first_stop < STEPS - 10, first_stop
    _, rows_first = step_losses(run_dir)
    assert rows_first == first_stop

    # 2. Resumed with the same command, then SIGKILLed after its next periodic checkpoint.
    proc = start([*args, "trainer.max_steps=1000", "ckpt_path=last"], run_dir, shared_cache)
    wait_for_checkpoint(proc, last, first_stop + 1)
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert f"resuming from {last}" in out
    killed_at = saved_step(last)
    assert first_stop < killed_at < STEPS, (first_stop, killed_at)

    # 3. Resumed to the end.
    r = run([*args, f"trainer.max_steps={STEPS}", "ckpt_path=last"], run_dir, shared_cache)
    # The newest checkpoint of the run dir (last.ckpt, or a best-by-val file written after it).
    assert f"ckpt_path=last: resuming from {last.parent}" in r.stdout + r.stderr
    got, _ = step_losses(run_dir)
    # Steps before killed_at come only from the killed attempts: their rows were kept. Only a SIGKILL
    # landing between a checkpoint and the log row of the step it closes (Lightning logs a step after
    # on_train_batch_end, where the checkpoint is written) loses that one row.
    missing = set(want) - set(got)
    assert missing <= {killed_at}, missing  # rows carry the number of steps completed
    assert compare({s: got[s] for s in want if s in got}, {s: want[s] for s in want if s in got}) <= TOL
    assert saved_step(last) == STEPS


def _stream_losses(run_dir: Path, shared_cache: Path, *overrides: str) -> dict[int, float]:
    from hydra.core.global_hydra import GlobalHydra

    from train import train

    args = [
        *FAMILIES["gpt"],
        *COMMON,
        "data.streaming=true",
        "data.path=text",
        "data.sample_by=paragraph",
        "data.streaming_val_docs=20",
        "data.tokenizer_train_docs=500",
        *overrides,
    ]
    train(compose_config(args, run_dir, shared_cache))
    GlobalHydra.instance().clear()
    return step_losses(run_dir)[0]


def test_streaming_resume_mid_pass_equals_uninterrupted(tmp_path: Path, shared_cache: Path) -> None:
    """A streamed corpus (datasets.IterableDataset) resumes from the source's own state_dict mid-pass."""
    want = _stream_losses(tmp_path / "ref", shared_cache, "trainer.max_steps=10")
    run_dir = tmp_path / "run"
    _stream_losses(run_dir, shared_cache, "trainer.max_steps=4")
    last = run_dir / "checkpoints" / "last.ckpt"
    stream = torch.load(last, weights_only=True)["CausalLMDataModule"]["stream"][0]
    assert stream["blocks"] == 4 * 4 and "source" in stream  # resumes from an anchor, not by replaying
    got = _stream_losses(run_dir, shared_cache, "trainer.max_steps=10", "ckpt_path=last")
    assert compare(got, want) <= TOL


class SigtermInStep(L.Callback):
    """Sends this process SIGTERM at the start of training step ``step`` (a real signal)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_in_a_step_due_a_validation_validates_before_it_stops(
    reference, tmp_path: Path, shared_cache: Path
) -> None:
    """SIGTERM during the step after which a validation is due (step 5 of val_check_interval=5).
    Lightning used to cut that validation short after one batch and the resumed run never made it
    up: the record lacked val/loss at step 5 and the best checkpoint could not be step 5's. Now the
    validation runs, then the run stops at step 5; resumed to step 10, every val/loss and
    train/loss equals the uninterrupted run's."""
    from hydra.core.global_hydra import GlobalHydra

    from train import train

    want_train, want_val = reference("gpt"), reference("gpt", "val")
    run_dir = tmp_path / "run"
    args = [*FAMILIES["gpt"], *COMMON, "ckpt_path=last"]
    sigterm = ["+callbacks.sigterm._target_=tests.training.test_resume.SigtermInStep", "+callbacks.sigterm.step=5"]
    try:
        train(compose_config([*args, "trainer.max_steps=1000", *sigterm], run_dir, shared_cache))
        assert saved_step(run_dir / "checkpoints" / "last.ckpt") == 5
        assert val_losses(run_dir).keys() == {5}
        assert [p.name for p in (run_dir / "checkpoints").glob("step000005-*.ckpt")]  # step 5 can be the best
        train(compose_config([*args, "trainer.max_steps=10"], run_dir, shared_cache))
    finally:
        GlobalHydra.instance().clear()
    got_val = val_losses(run_dir)
    assert got_val.keys() == {5, 10}
    assert compare(got_val, {s: want_val[s] for s in (5, 10)}) <= TOL
    assert compare(step_losses(run_dir)[0], {s: want_train[s] for s in range(1, 11)}) <= TOL
