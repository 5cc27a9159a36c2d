"""SLURM and Hydra launchers, tested as far as a machine without SLURM allows.

``cluster=slurm`` is built into a real Trainer under SLURM's environment variables, and a real run
is sent SIGUSR1 (SLURM's warning before the time limit, ``--signal=SIGUSR1@90``) under those
variables: ``scontrol`` is the one cluster program that cannot run here, so a recording stand-in
on PATH takes its place. Hydra's submitit launcher runs a real sweep with its local executor (each
job a process of its own); the SLURM launcher preset can only be composed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SHAKESPEARE, compose_config, step_losses

TRAIN = str(REPO / "train.py")
STEPS = 16
ARGS = [
    "model=gpt_tiny",
    "data=files",
    "data.tokenizer=char",
    "data.block_size=32",
    "data.batch_size=4",
    f"data.data_files={SHAKESPEARE}",
    "trainer.val_check_interval=8",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "logger=csv",
    "+logger.csv.flush_logs_every_n_steps=1",
    "callbacks.text_samples=null",
    "sample_tokens=0",
    "final_validation=false",
    "scheduler.warmup_steps=2",
    f"scheduler.decay_steps={STEPS}",
    f"trainer.max_steps={STEPS}",
]
SLURM_ENV = {
    "SLURM_NTASKS": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "train",
    "SLURM_NODELIST": "localhost",
}


def env(cache: Path, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**base, "LM_LAB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **extra}


def test_slurm_cluster_preset_gives_the_trainer_lightnings_slurm_environment_with_auto_requeue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hydra.utils
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from lm_lab.training.checkpoints import AtomicCheckpointIO
    from train import trainer_plugins

    for key, value in {**SLURM_ENV, "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2"}.items():
        monkeypatch.setenv(key, value)
    cfg = compose_config(
        ["cluster=slurm", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"],
        tmp_path / "run",
        tmp_path / "cache",
    )
    trainer = hydra.utils.instantiate(
        cfg.trainer, plugins=trainer_plugins(cfg.trainer), callbacks=[], logger=False, _convert_="all"
    )
    env = trainer._accelerator_connector.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal == signal.SIGUSR1
    assert trainer.world_size == 2 and isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_hydra_slurm_launcher_preset_composes_to_submitits_slurm_launcher(tmp_path: Path) -> None:
    cfg = compose_config(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"], tmp_path / "run", tmp_path / "c")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node, launcher.partition) == (1, 8, 8, "gpu")
    assert launcher.max_num_timeout == 3


def test_the_sbatch_template_requests_the_requeue_signal_and_its_command_composes(tmp_path: Path) -> None:
    """docs/slurm/train.sbatch: the signal lm_lab handles, a requeueable job, and a train.py command
    line (as srun runs it) that composes with the SLURM environment and resumes from its run dir."""
    import shlex

    text = (REPO / "docs" / "slurm" / "train.sbatch").read_text()
    assert "#SBATCH --signal=SIGUSR1@90" in text and "#SBATCH --requeue" in text
    command = text.split("srun python train.py", 1)[1].replace("\\\n", " ").split("\n")[0]
    overrides = [a for a in shlex.split(command.replace("${SLURM_JOB_ID}", "4242")) if a != "$@"]
    assert "ckpt_path=last" in overrides and "hydra.run.dir=logs/train/runs/slurm-4242" in overrides
    cfg = compose_config(overrides, tmp_path / "run", tmp_path / "cache")
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.strategy) == (4, 8, "ddp")
    assert cfg.trainer.plugins[0]._target_ == "lightning.fabric.plugins.environments.SLURMEnvironment"
    assert "--nodes=4" in text and "--ntasks-per-node=8" in text  # one srun task per device, as Lightning expects


def test_a_torchrun_job_without_one_run_directory_is_one_line(tmp_path: Path) -> None:
    """Each process of a torchrun/srun job names its run directory from its own clock: refused,
    before anything is trained, unless the job gives one hydra.run.dir."""
    r = subprocess.run(
        [sys.executable, TRAIN, *ARGS],
        cwd=tmp_path,
        env=env(tmp_path / "cache", RANK="0", WORLD_SIZE="2", LOCAL_RANK="0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "same hydra.run.dir" in errors[0], r.stderr[-2000:]
    assert not list((tmp_path / "logs").glob("*/runs/*"))


@pytest.mark.slow
def test_sigusr1_on_slurm_saves_at_a_step_boundary_requeues_and_the_requeued_job_resumes_exactly(
    tmp_path: Path, shared_cache: Path
) -> None:
    """The sbatch template's command, twice, as SLURM runs it: the first attempt gets SIGUSR1, saves
    last.ckpt at the next step boundary, runs `scontrol requeue <job>` and exits 0; the requeued
    attempt (same job id, same command, ckpt_path=last) continues to the end. Its per-step losses
    equal an uninterrupted run's."""
    ref = tmp_path / "ref"
    r = subprocess.run(
        [sys.executable, TRAIN, *ARGS, f"hydra.run.dir={ref}"],
        cwd=tmp_path,
        env=env(shared_cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]

    bin_dir, log = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\n')
    (bin_dir / "scontrol").chmod(0o755)
    run = tmp_path / "job-4242"
    cmd = [sys.executable, TRAIN, *ARGS, "trainer=cpu", "cluster=slurm", "ckpt_path=last", f"hydra.run.dir={run}"]
    slurm = env(shared_cache, **SLURM_ENV, PATH=f"{bin_dir}:{os.environ['PATH']}", SCONTROL_LOG=str(log))
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=slurm, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not (run / "metrics.csv").is_file() or not step_losses(run)[0]:  # a step done: training has begun
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped for SLURM requeue after step" in out, out[-3000:]
    assert log.read_text().split() == ["requeue", "4242"]
    saved = int(out.split("stopped for SLURM requeue after step ")[1].split(";")[0])
    assert saved < STEPS and not list(run.glob("hpc_ckpt_*.ckpt"))  # lm_lab's handler, not Lightning's

    r = subprocess.run(cmd, cwd=tmp_path, env=slurm, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'}" in r.stdout + r.stderr
    got, want = step_losses(run)[0], step_losses(ref)[0]
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    diff = max(abs(got[s] - want[s]) for s in want)
    print(f"\nSIGUSR1 at step {saved}, requeued and resumed vs uninterrupted: train/loss max |difference| {diff:.1e}")
    assert diff <= 1e-6


@pytest.mark.slow
def test_hydra_submitit_local_launcher_runs_each_sweep_job_as_a_process(tmp_path: Path, shared_cache: Path) -> None:
    """`-m hydra/launcher=submitit_local`: the launcher the SLURM preset uses, with its local
    executor. Two jobs, each a process of its own, each a complete run in its own sweep subdir."""
    sweep = tmp_path / "sweep"
    r = subprocess.run(
        [
            sys.executable,
            TRAIN,
            "-m",
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=10",
            *[a for a in ARGS if not a.startswith("trainer.max_steps")],
            "trainer.max_steps=3",
            "seed=1,2",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env=env(shared_cache),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in r.stdout + r.stderr
    jobs = sorted(p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit())  # local job ids are pids
    assert len(jobs) == 2 and str(os.getpid()) not in jobs
    losses = [step_losses(sweep / str(n))[0] for n in (0, 1)]
    assert all(sorted(x) == [1, 2, 3] for x in losses)
    assert losses[0][1] != losses[1][1]  # seed=1 and seed=2: two different runs
    assert all((sweep / str(n) / "checkpoints" / "last.ckpt").is_file() for n in (0, 1))
