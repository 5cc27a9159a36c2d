"""Safe checkpoints, killed writes, numerical faults, data faults, failing loggers and the bad
inputs around resuming: each a real run or a real kill, no mocks."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lm_lab.checkpoint import (
    AtomicCheckpointIO,
    CheckpointError,
    find_checkpoints,
    remove_partial_checkpoints,
    resolve_ckpt_path,
)
from lm_lab.config import ConfigError
from lm_lab.data import cache
from lm_lab.errors import USER_ERRORS
from tests.conftest import REPO, SHAKESPEARE, TINY, compose_config
from tests.test_cli import run_dirs, run_train

SHAKES = ["data=files", f"data.data_files={SHAKESPEARE}", "data.tokenizer=char"]
RUN = [
    *TINY,
    *SHAKES,
    "trainer.max_steps=4",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.text_samples=null",
    "sample_tokens=0",
]


def train_in_process(overrides: list[str], run_dir: Path, cache_dir: Path) -> dict:
    from hydra.core.global_hydra import GlobalHydra

    from train import train

    try:
        metrics, objects = train(compose_config(overrides, run_dir, cache_dir))
    finally:
        GlobalHydra.instance().clear()
    return {"metrics": metrics, **objects}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Path:
    """A finished 4-step GPT run: last.ckpt (step 4) and the best by val/loss (step 3)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train_in_process(RUN, run_dir, shared_cache)
    return run_dir


def snapshot(run_dir: Path) -> dict[str, str]:
    """Hashes of a run's own files (Hydra rewrites .hydra/ and appends to train.log on every launch)."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"
    }


# ---------------------------------------------------------------------- safe checkpoints


def test_every_checkpoint_loads_with_weights_only(trained: Path) -> None:
    ckpts = sorted((trained / "checkpoints").glob("*.ckpt"))
    assert {p.name for p in ckpts} == {"last.ckpt", "step000003.ckpt"}
    for path in ckpts:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # plain containers only
        assert isinstance(ckpt["lm_lab"]["micro_batches"], int)
        dm = ckpt["CausalLMDataModule"]
        # The data position: global samples of this epoch (all ranks), and this rank's share.
        assert dm["sampler"]["consumed_global"] == dm["consumed"] == ckpt["global_step"] * 4
        assert dm["data"]["batch_size"] == 4 and dm["seed"] == 1337
        assert ckpt["lm_lab"]["micro_batches"] == ckpt["global_step"]
    assert torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


KILL_WRITE = """
import sys, torch
from lm_lab.checkpoint import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
io.save_checkpoint({"version": 1, "w": torch.zeros(10)}, path)
print("saved", flush=True)
big = {"version": 2, "w": torch.ones(50_000_000)}  # 200 MB: a write long enough to be killed in the middle
while True:
    io.save_checkpoint(big, path)
"""


def test_sigkill_during_a_checkpoint_write_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_WRITE, str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.readline().strip() == "saved"
    tmp = path.with_name(f".last.ckpt.tmp-{proc.pid}")
    deadline = time.monotonic() + 120
    while not (tmp.is_file() and tmp.stat().st_size > 10_000_000):  # in the middle of writing 200 MB
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    ckpt = torch.load(path, weights_only=True)  # the previous complete version (or a complete new one)
    assert ckpt["version"] in (1, 2) and ckpt["w"].numel() == (10 if ckpt["version"] == 1 else 50_000_000)
    assert tmp.exists() and find_checkpoints(tmp_path) == [path]  # the partial file is never a candidate
    remove_partial_checkpoints(path.parent)  # what the next run does first
    assert not tmp.exists()


def test_truncated_last_ckpt_is_reported_and_the_previous_one_still_resumes(
    trained: Path, tmp_path: Path, shared_cache: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # e.g. copied by hand and cut off
    previous = run_dir / "checkpoints" / "step000003.ckpt"

    # Named explicitly: an error naming the problem and the checkpoint to use instead.
    with pytest.raises(CheckpointError, match="is corrupt or truncated") as e:
        train_in_process([*RUN, f"ckpt_path={last}"], run_dir, shared_cache)
    assert f"ckpt_path={previous}" in str(e.value) and "\n" not in str(e.value)
    # ckpt_path=last skips it (with a warning) and resumes the previous checkpoint, then rewrites last.ckpt whole.
    assert resolve_ckpt_path("last", run_dir) == previous
    out = train_in_process([*RUN, "trainer.max_steps=5", "ckpt_path=last"], run_dir, shared_cache)
    assert out["trainer"].global_step == 5
    assert torch.load(last, weights_only=True)["global_step"] == 5


# ---------------------------------------------------------------------- numerical faults


def test_nonfinite_losses_skip_steps_then_stop_with_a_checkpoint(tmp_path: Path, shared_cache: Path) -> None:
    """lr=1e6 blows the tiny model up within a few steps: each NaN step is skipped with a warning,
    the fifth in a row saves a checkpoint and stops with one line and a non-zero status."""
    r = run_train([*RUN, "trainer.max_steps=50", "optimizer.lr=1e6"], tmp_path, shared_cache)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not finite for 5 optimizer steps in a row" in errors[0], r.stderr[-2000:]
    assert "lower optimizer.lr (now 1e+06)" in errors[0] and "Traceback" not in r.stderr
    warned = [
        line
        for line in (r.stdout + r.stderr).splitlines()
        if "non-finite loss or gradients: optimizer step skipped" in line and "[lm_lab]" in line
    ]
    assert len(warned) == 5
    (run,) = run_dirs(tmp_path)
    (saved,) = (run / "checkpoints").glob("nonfinite-step*.ckpt")
    ckpt = torch.load(saved, weights_only=True)
    # The skipped steps changed nothing: the weights are those after the last finite step.
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert resolve_ckpt_path("last", run) != saved  # never resumed by ckpt_path=last


# ---------------------------------------------------------------------- data faults


def test_killed_tokenization_leaves_no_trusted_cache_and_is_rebuilt(tmp_path: Path) -> None:
    from lm_lab.data.config import DataConfig
    from lm_lab.data.datamodule import CausalLMDataModule

    corpus = tmp_path / "big.txt"
    corpus.write_text(SHAKESPEARE.read_text() * 5)  # ~5.5 MB: seconds of tokenizing
    cache_dir = tmp_path / "cache"
    args = [*RUN, f"data.data_files={corpus}", "trainer.max_steps=1"]
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *args],
        cwd=tmp_path,
        start_new_session=True,
        env={**os.environ, "LM_LAB_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not list((cache_dir / "tokens").glob("*.tmp-*")):  # tokenizing into a temporary entry
        assert time.monotonic() < deadline and proc.poll() is None, "tokenization was not caught in progress"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    entries = list((cache_dir / "tokens").iterdir())
    assert entries and all(".tmp-" in p.name for p in entries)  # only the temporary build, never trusted
    # The next run's data preparation rebuilds it.
    dm = CausalLMDataModule(
        DataConfig(
            path="text", data_files=str(corpus), tokenizer="char", block_size=32, batch_size=4, cache_dir=str(cache_dir)
        ),
        seed=1337,
    )
    assert cache.load_entry(dm.token_cache()) is None
    dm.prepare_data()
    assert cache.load_entry(dm.token_cache())["train_tokens"] > 4_500_000


@pytest.fixture()
def tiny_disk(tmp_path: Path) -> Path:
    """A 1 MiB tmpfs (needs root and mount rights; skipped elsewhere)."""
    mnt = tmp_path / "tiny_disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_while_checkpointing_is_a_clear_error_and_no_partial_file(
    tiny_disk: Path, shared_cache: Path
) -> None:
    run_dir = tiny_disk / "run"  # the tokenizer and logs fit; a 1.5 MB checkpoint does not
    with pytest.raises(CheckpointError, match="disk full while writing checkpoint .*last.ckpt") as e:
        train_in_process(RUN, run_dir, shared_cache)
    assert "nothing was written" in str(e.value)
    assert list((run_dir / "checkpoints").iterdir()) == []  # no last.ckpt, no partial file


def test_disk_full_while_caching_tokens_is_a_clear_error_and_no_entry(tiny_disk: Path) -> None:
    from lm_lab.data.config import DataConfig
    from lm_lab.data.datamodule import CausalLMDataModule
    from lm_lab.data.sources import DataError

    dm = CausalLMDataModule(
        DataConfig(
            path="text",
            data_files=str(SHAKESPEARE),
            tokenizer="char",
            block_size=32,
            batch_size=4,
            cache_dir=str(tiny_disk),
        ),
        seed=1337,
    )
    with pytest.raises(DataError, match="disk full while writing the data cache"):
        dm.prepare_data()  # 1M characters -> 2 MB of tokens on a 1 MiB disk
    assert list((tiny_disk / "tokens").iterdir()) == []


# ---------------------------------------------------------------------- loggers and side systems


def test_failing_loggers_are_warnings_and_training_goes_on(
    tmp_path: Path, shared_cache: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """W&B online without an API key, and TensorBoard under a path that cannot be a directory: both
    are dropped with a warning, CSV keeps logging, training finishes."""
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the TensorBoard folder should go")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    overrides = [*RUN, "logger=[wandb,tensorboard,csv]", f"logger.tensorboard.save_dir={blocker}/tb"]
    out = train_in_process(overrides, tmp_path / "run", shared_cache)
    assert out["trainer"].global_step == 4
    assert [type(lg).__name__ for lg in out["trainer"].loggers] == ["AppendingCSVLogger"]
    assert (tmp_path / "run" / "metrics.csv").is_file()
    failed = [r.getMessage() for r in caplog.records if "could not start" in r.getMessage()]
    assert any("WandbLogger" in m and "api key" in m.lower() for m in failed), failed
    assert any("TensorBoardLogger" in m for m in failed), failed


def test_no_logger_at_all_still_trains(tmp_path: Path, shared_cache: Path) -> None:
    out = train_in_process([*RUN, "logger=none", "trainer.max_steps=2"], tmp_path / "run", shared_cache)
    assert out["trainer"].global_step == 2


# ---------------------------------------------------------------------- bad input around resuming


RESUME_REFUSALS = {
    "other model size": (["model.n_layer=3"], CheckpointError, "other model settings: model.n_layer=3 (checkpoint: 2)"),
    "other batch size": (["data.batch_size=8"], CheckpointError, "data.batch_size=8 (checkpoint: 4)"),
    "other block size": (["data.block_size=16"], CheckpointError, "data.block_size=16 (checkpoint: 32)"),
    "other seed": (["seed=7"], CheckpointError, "seed=7 (checkpoint: 1337)"),
    "other family": (["model=bert_tiny"], CheckpointError, "is a gpt checkpoint but model is bert"),
}


@pytest.mark.parametrize("case", list(RESUME_REFUSALS))
def test_resume_with_a_different_setup_is_refused_before_touching_the_run(
    case: str, trained: Path, tmp_path: Path, shared_cache: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    before = snapshot(run_dir)
    extra, error, message = RESUME_REFUSALS[case]
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        train_in_process([*RUN, *extra, "ckpt_path=last"], run_dir, shared_cache)
    assert issubclass(error, USER_ERRORS)
    assert snapshot(run_dir) == before


OTHER_BAD_INPUT = {
    "init_from with another tokenizer": (
        ["init_from={ckpt}", "data.tokenizer=bpe"],
        "has its own tokenizer, built with other settings: data.tokenizer='bpe'",
    ),
    "ckpt_path is a directory": (["ckpt_path={run}"], "is a directory: pass a checkpoint file"),
    "data file is a directory": (["data.data_files={run}"], "is a directory: pass the files inside it"),
    "max_steps=0": (["trainer.max_steps=0"], "trainer.max_steps=0 must be > 0"),
    "never stops": (["trainer.max_steps=-1", "trainer.max_epochs=-1"], "the run would never stop"),
    "nonfinite patience 0": (["callbacks.nonfinite.patience=0"], "patience=0 must be >= 1"),
}


@pytest.mark.parametrize("case", list(OTHER_BAD_INPUT))
def test_more_bad_input_one_line_error(case: str, trained: Path, tmp_path: Path, shared_cache: Path) -> None:
    args, message = OTHER_BAD_INPUT[case]
    args = [a.format(ckpt=trained / "checkpoints" / "last.ckpt", run=trained) for a in args]
    with pytest.raises(USER_ERRORS, match=message.replace("(", r"\(")):
        train_in_process([*RUN, *args], tmp_path / "run", shared_cache)


def test_cli_refused_resume_exits_2_with_one_line_and_keeps_the_run(
    trained: Path, tmp_path: Path, shared_cache: Path
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    before = snapshot(run_dir)
    r = run_train([*RUN, "data.batch_size=8", "ckpt_path=last", f"hydra.run.dir={run_dir}"], tmp_path, shared_cache)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "data.batch_size=8 (checkpoint: 4)" in errors[0], r.stderr
    assert "Traceback" not in r.stderr and snapshot(run_dir) == before


def test_budget_check_is_a_config_error() -> None:
    from omegaconf import OmegaConf

    from train import _check_budget

    _check_budget(OmegaConf.create({"max_steps": -1, "max_epochs": 2}))
    with pytest.raises(ConfigError, match="trainer.max_steps=-5 must be > 0"):
        _check_budget(OmegaConf.create({"max_steps": -5, "max_epochs": 2}))


def test_atomic_io_keeps_the_old_file_when_the_write_fails(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"version": 1}, path)
    with pytest.raises(Exception):  # noqa: B017 - a lambda cannot be pickled by torch.save
        io.save_checkpoint({"version": 2, "bad": lambda: 0}, path)
    assert torch.load(path, weights_only=True) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
