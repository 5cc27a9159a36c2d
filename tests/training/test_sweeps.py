"""Hydra multirun and the Optuna sweeper drive train.py for real."""

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
from omegaconf import OmegaConf

from lm_lab.training.sweeps import FINISHED, sweep_dir_name
from tests.conftest import REPO, SHAKESPEARE, step_losses

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
    """Two jobs, each finished (its marker); with logger=csv, W&B is never imported."""
    r = _run(["-m", *TINY_CLI, "optimizer.lr=1e-3,3e-3"], tmp_path, shared_cache, PYTHONPROFILEIMPORTTIME="1")
    assert r.returncode == 0, r.stderr[-2000:]
    runs = sorted((tmp_path / "logs" / "train" / "multiruns").glob("*/*/checkpoints/last.ckpt"))
    assert len(runs) == 2
    assert all((run.parents[1] / FINISHED).is_file() for run in runs)
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "lightning" in imported and not any(m.split(".")[0] == "wandb" for m in imported)


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


# ---------------------------------------------------------------------- sweeps that resume

# Long enough (30 steps, a checkpoint every 2) to be killed mid-run; validation every 10 steps.
RESUMABLE = _cli(
    "trainer.max_steps=30",
    "trainer.val_check_interval=10",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "trainer.log_every_n_steps=1",
)


def _start(args: list[str], cwd: Path, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "LM_LAB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _kill_during(proc: subprocess.Popen, job_dir: Path, timeout: float = 400, sig: int = signal.SIGKILL) -> None:
    """Signal (SIGKILL) the sweep once ``job_dir`` holds a checkpoint and the job has not finished."""
    import torch

    last = job_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the sweep ended before it could be killed:\n{proc.stdout.read()[-3000:]}"
        if last.is_file() and torch.load(last, map_location="cpu", weights_only=True)["global_step"] >= 2:
            os.killpg(proc.pid, sig)
            if sig == signal.SIGKILL:
                proc.communicate(timeout=60)
                assert not (job_dir / FINISHED).exists(), "the job finished before the kill: nothing was interrupted"
            return
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no checkpoint in {job_dir} within {timeout}s")


def _sweep_dir(cwd: Path) -> Path:
    (sweep,) = (cwd / "logs" / "train" / "multiruns").iterdir()
    return sweep


@pytest.mark.slow
def test_optuna_search_killed_in_its_second_trial_resumes_with_the_same_command(
    tmp_path: Path, shared_cache: Path
) -> None:
    """3 trials; SIGKILL during trial 1; the same command again: trial 0 is not run again, trial 1
    resumes from its checkpoint in its own directory, trial 2 runs; the study holds 3 complete trials
    and optimization_results.yaml the best of them."""
    import optuna

    args = ["hparams_search=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2", *RESUMABLE]
    proc = _start(args, tmp_path, shared_cache)
    # The directory's name comes from the command (not its hydra.* overrides), so it is known in advance.
    sweep = tmp_path / "logs" / "train" / "multiruns" / sweep_dir_name([a for a in args if not a.startswith("hydra.")])
    _kill_during(proc, sweep / "1")
    study = optuna.load_study(study_name=sweep.name, storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "RUNNING"]
    first = (sweep / "0" / FINISHED).stat().st_mtime_ns

    r = _run(args, tmp_path, shared_cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _sweep_dir(tmp_path) == sweep
    study = optuna.load_study(study_name=sweep.name, storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert [(t.number, t.state.name) for t in study.trials] == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 3  # no parameters drawn twice
    assert (sweep / "0" / FINISHED).stat().st_mtime_ns == first  # trial 0 was not trained again
    log1 = (sweep / "1" / "train.log").read_text()
    assert "ckpt_path=last: resuming from" in log1
    losses, _ = step_losses(sweep / "1")
    assert sorted(losses) == list(range(1, 31))  # the resumed trial trained every step to the end
    values = {t.number: t.value for t in study.trials}
    for n, value in values.items():
        assert json.loads((sweep / str(n) / FINISHED).read_text())["metrics"]["val/loss"] == pytest.approx(value)
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    assert results.n_trials == 3 and results.n_complete == 3
    assert results.best_value == pytest.approx(min(values.values()))
    assert dict(results.best_params) == study.best_trial.params


@pytest.mark.slow
def test_grid_multirun_killed_in_its_second_job_resumes_exactly(tmp_path: Path, shared_cache: Path) -> None:
    """A 2-run grid killed during job 1, rerun with the same command: job 0 is skipped, job 1 resumes
    from its checkpoint, and its per-step losses equal an uninterrupted run of the same settings."""
    args = ["-m", *RESUMABLE, "optimizer.lr=1e-3,3e-3"]
    proc = _start(args, tmp_path, shared_cache)
    sweep = tmp_path / "logs" / "train" / "multiruns" / sweep_dir_name(args[1:])
    _kill_during(proc, sweep / "1")
    r = _run(args, tmp_path, shared_cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"job 0: finished before ({sweep / '0'}), skipped" in r.stdout
    assert "ckpt_path=last: resuming from" in (sweep / "1" / "train.log").read_text()
    assert (sweep / "0" / FINISHED).is_file() and (sweep / "1" / FINISHED).is_file()

    ref = tmp_path / "reference"
    r = _run([*RESUMABLE, "optimizer.lr=3e-3", f"hydra.run.dir={ref}"], tmp_path, shared_cache)
    assert r.returncode == 0, r.stderr[-3000:]
    got, want = step_losses(sweep / "1")[0], step_losses(ref)[0]
    assert sorted(got) == sorted(want) == list(range(1, 31))
    assert max(abs(got[s] - want[s]) for s in want) == 0.0

    r = _run(args, tmp_path, shared_cache)  # a third time: nothing left to do
    assert r.returncode == 0 and r.stdout.count("finished before") == 2, r.stderr[-2000:]


@pytest.mark.slow
def test_grid_multirun_stopped_by_sigterm_ends_the_sweep_and_the_same_command_resumes_it(
    tmp_path: Path, shared_cache: Path
) -> None:
    """SIGTERM (preemption) during job 0: it saves at the step boundary and the sweep ends (exit 0)
    before job 1; the same command resumes job 0 and runs job 1."""
    args = ["-m", *RESUMABLE, "optimizer.lr=1e-3,3e-3"]
    proc = _start(args, tmp_path, shared_cache)
    sweep = tmp_path / "logs" / "train" / "multiruns" / sweep_dir_name(args[1:])
    _kill_during(proc, sweep / "0", sig=signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "sweep stopped by SIGTERM: rerun the same command to continue it" in out, out[
        -3000:
    ]
    assert not (sweep / "0" / FINISHED).exists() and not (sweep / "1").exists()
    r = _run(args, tmp_path, shared_cache)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ckpt_path=last: resuming from" in (sweep / "0" / "train.log").read_text()
    assert sorted(step_losses(sweep / "0")[0]) == list(range(1, 31))
    assert (sweep / "0" / FINISHED).is_file() and (sweep / "1" / FINISHED).is_file()


@pytest.mark.slow
def test_optuna_pruner_stops_a_trial_at_its_first_validation(tmp_path: Path, shared_cache: Path) -> None:
    """Pruning is off by default; with a pruner, a trial whose validation loss is above its threshold
    stops at that validation and is recorded as pruned (not failed, not run again)."""
    import optuna

    args = [
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=1",
        "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
        "+hydra.sweeper.pruner.upper=0.1",
        *RESUMABLE,
    ]
    r = _run(args, tmp_path, shared_cache)
    assert r.returncode == 0, r.stderr[-3000:]
    sweep = _sweep_dir(tmp_path)
    (trial,) = optuna.load_study(study_name=sweep.name, storage=f"sqlite:///{sweep / 'optuna.db'}").trials
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [10]
    record = json.loads((sweep / "0" / FINISHED).read_text())
    assert record["pruned"] and record["step"] == 10
    assert OmegaConf.load(sweep / "optimization_results.yaml").n_complete == 0


def test_sweep_dir_name_is_the_sorted_overrides_and_safe_as_a_file_name() -> None:
    assert sweep_dir_name(["seed=1,2", "optimizer.lr=1e-3,3e-3"]) == "optimizer.lr=1e-3,3e-3,seed=1,2"
    assert sweep_dir_name([]) == "default"
    a, b = sweep_dir_name(["data.data_files=a/b.txt"]), sweep_dir_name(["data.data_files=a_b.txt"])
    assert "/" not in a and a.startswith("data.data_files=a_b.txt-") and a != b  # a hash keeps them apart
    long = sweep_dir_name([f"k{i}=v" for i in range(40)])
    assert len(long) <= 96 and long != sweep_dir_name([f"k{i}=v" for i in range(41)])


def test_a_sweep_job_directory_holding_other_overrides_is_refused(tmp_path: Path, compose_cfg) -> None:
    """plan_job: a finished run of the same overrides is skipped with its value; one of other
    overrides is a one-line error naming the fix; checkpoints without a marker mean resume."""
    from lm_lab.schema import ConfigError
    from lm_lab.training.sweeps import plan_job

    compose_cfg("optimizer.lr=1e-3")  # sets Hydra's current config: the job's overrides
    job = tmp_path / "0"
    job.mkdir()
    record = {"step": 4, "metrics": {"val/loss": 3.5}, "overrides": ["optimizer.lr=1e-3"], "pruned": False}
    (job / FINISHED).write_text(json.dumps(record))
    plan = plan_job(job, "val/loss")
    assert plan.skip and plan.value == 3.5
    (job / FINISHED).write_text(json.dumps({**record, "overrides": ["optimizer.lr=3e-3"]}))
    with pytest.raises(ConfigError, match="holds a run of other overrides .* hydra.sweep.dir=<new dir>"):
        plan_job(job, "val/loss")
    (job / FINISHED).unlink()
    (job / "checkpoints").mkdir()
    assert not plan_job(job, "val/loss").resume
    (job / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert plan_job(job, "val/loss").resume
