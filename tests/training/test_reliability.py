"""Safe checkpoints, killed writes, numerical faults, data faults, failing loggers and the bad
inputs around resuming: each a real run or a real kill, no mocks."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from lm_lab.data import cache
from lm_lab.errors import USER_ERRORS
from lm_lab.schema import ConfigError
from lm_lab.training.checkpoints import (
    AtomicCheckpointIO,
    CheckpointError,
    find_checkpoints,
    load_checkpoint,
    remove_partial_checkpoints,
    resolve_ckpt_path,
)
from lm_lab.training.rundir import RunDirInUseError, run_dir_lock
from tests.conftest import REPO, SHAKESPEARE, TINY, compose_config, run_dirs, run_train

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
    """A finished 4-step GPT run: last.ckpt (step 4), the best by val/loss (validated at steps 3 and 4)
    and best.ckpt pointing to it."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train_in_process(RUN, run_dir, shared_cache)
    return run_dir


def snapshot(run_dir: Path) -> dict[str, str]:
    """Hashes of a run's own files (train.log gets every launch's lines; .hydra/ is compared where it matters)."""
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"
    }


# ---------------------------------------------------------------------- safe checkpoints


def test_every_checkpoint_loads_with_weights_only(trained: Path) -> None:
    ckpts = sorted((trained / "checkpoints").glob("*.ckpt"))
    (best,) = (trained / "checkpoints").glob("step*.ckpt")
    assert {p.name for p in ckpts} == {"last.ckpt", "best.ckpt", best.name}
    assert re.fullmatch(r"step00000[34]-val\d+\.\d{3}\.ckpt", best.name)
    assert (trained / "checkpoints" / "best.ckpt").resolve() == best.resolve()
    for path in ckpts:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # plain containers only
        position = ckpt["callbacks"]["DataPosition"]  # lm_lab.callbacks.data_position
        assert isinstance(position["micro_batches"], int)
        dm = ckpt["CausalLMDataModule"]
        # The data position: global samples of this epoch (all ranks), and this rank's share.
        assert dm["sampler"]["consumed_global"] == dm["consumed"] == ckpt["global_step"] * 4
        assert dm["data"]["batch_size"] == 4 and dm["seed"] == 1337
        assert position["micro_batches"] == ckpt["global_step"]
        assert ckpt["lm_lab_checksum"]["crc32"].keys() == ckpt["state_dict"].keys()
        assert dm["corpus"]  # the corpus fingerprint a resume is checked against
    assert torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


KILL_WRITE = """
import sys, torch
from lm_lab.training.checkpoints import AtomicCheckpointIO
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
    (previous,) = (run_dir / "checkpoints").glob("step*.ckpt")

    # Named explicitly: an error naming the problem and the checkpoint to use instead.
    with pytest.raises(CheckpointError, match="is corrupt or truncated") as e:
        train_in_process([*RUN, f"ckpt_path={last}"], run_dir, shared_cache)
    assert f"ckpt_path={previous}" in str(e.value) and "\n" not in str(e.value)
    # ckpt_path=last skips it (with a warning) and resumes the previous checkpoint, then rewrites last.ckpt whole.
    assert resolve_ckpt_path("last", run_dir) == previous
    out = train_in_process([*RUN, "trainer.max_steps=5", "ckpt_path=last"], run_dir, shared_cache)
    assert out["trainer"].global_step == 5
    assert torch.load(last, weights_only=True)["global_step"] == 5


def flip_a_byte_in(ckpt: Path, key: str) -> None:
    """Flip one bit inside the stored data of ``state_dict[key]``; the file keeps its length and
    stays a valid zip (torch.load does not check the records' CRCs)."""
    tensor = torch.load(ckpt, weights_only=True)["state_dict"][key]
    with zipfile.ZipFile(ckpt) as z:
        (info,) = [i for i in z.infolist() if "/data/" in i.filename and z.read(i) == tensor.numpy().tobytes()]
    assert info.compress_type == zipfile.ZIP_STORED
    with open(ckpt, "r+b") as f:
        f.seek(info.header_offset + 26)  # the local header's file name and extra field lengths
        name_len, extra_len = struct.unpack("<HH", f.read(4))
        at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x01]))  # the lowest mantissa bit of one float32: a finite, plausible weight


def best_checkpoint(run_dir: Path) -> Path:
    """The run's other checkpoint besides last.ckpt: the best by val/loss (step<N>-val<loss>.ckpt)."""
    (best,) = (run_dir / "checkpoints").glob("step*.ckpt")
    return best


def test_a_flipped_bit_in_the_weights_is_detected_everywhere(
    trained: Path, tmp_path: Path, shared_cache: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    from lm_lab import export, fill_mask, generate

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    last, previous = run_dir / "checkpoints" / "last.ckpt", best_checkpoint(run_dir)
    size = last.stat().st_size
    flip_a_byte_in(last, "net.transformer.h.0.mlp.c_fc.weight")
    assert last.stat().st_size == size
    assert torch.load(last, weights_only=True)["global_step"] == 4  # PyTorch alone notices nothing
    damaged = "is damaged: tensor net.transformer.h.0.mlp.c_fc.weight does not match the checksum"

    # Named explicitly: one line, status 2, the run (incl. .hydra/) untouched.
    before, hydra = snapshot(run_dir), {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    r = run_train([*RUN, f"ckpt_path={last}", f"hydra.run.dir={run_dir}"], tmp_path, shared_cache)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and damaged in errors[0], r.stderr[-2000:]
    assert f"(e.g. ckpt_path={previous})" in errors[0] and "Traceback" not in r.stderr
    assert snapshot(run_dir) == before
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == hydra

    # ckpt_path=last falls back to the previous checkpoint with a warning.
    caplog.clear()
    assert resolve_ckpt_path("last", run_dir) == previous
    assert any(r.levelname == "WARNING" and f"skipping {last}" in r.getMessage() for r in caplog.records)

    # init_from, export, generate and fill_mask refuse it too.
    with pytest.raises(CheckpointError, match=damaged):
        train_in_process([*RUN, f"init_from={last}"], tmp_path / "other", shared_cache)
    capsys.readouterr()
    for main, args in (
        (export.main, [str(last), str(tmp_path / "hf")]),
        (generate.main, [str(last), "--prompt", "ROMEO:", "--max-new-tokens", "2"]),
        (fill_mask.main, [str(last), "The [MASK] is here."]),
    ):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: checkpoint") and damaged in err and "\n" not in err
    assert not (tmp_path / "hf").exists()


def test_nonfinite_weights_in_a_checkpoint_are_refused_and_last_falls_back(
    trained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["state_dict"]["net.transformer.wpe.weight"][3, 5] = float("nan")
    AtomicCheckpointIO().save_checkpoint(ckpt, last)  # a valid checksum, over a NaN
    with pytest.raises(CheckpointError, match=r"last.ckpt holds non-finite weights \(NaN/inf in net.transformer.wpe"):
        resolve_ckpt_path(str(last), run_dir)
    assert resolve_ckpt_path("last", run_dir) == best_checkpoint(run_dir)
    assert any("non-finite weights" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_a_checkpoint_without_a_checksum_still_loads(
    trained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Checkpoints written before the checksum existed are read (with a note), not refused."""
    import logging

    old = tmp_path / "old.ckpt"
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    del ckpt["lm_lab_checksum"]
    torch.save(ckpt, old)
    with caplog.at_level(logging.INFO, logger="lm_lab"):
        task = load_checkpoint(old)
    assert task.network == "gpt"
    assert any("has no weights checksum" in r.getMessage() for r in caplog.records)


def _without_hyperparameters(ckpt: dict) -> dict:
    del ckpt["hyper_parameters"]
    return ckpt


NOT_LM_LAB = {
    "hyper_parameters removed": _without_hyperparameters,
    "hyper_parameters None": lambda c: {**c, "hyper_parameters": None},
    "hyper_parameters empty": lambda c: {**c, "hyper_parameters": {}},
    "state_dict only": lambda c: {"state_dict": {}},
}


@pytest.mark.parametrize("case", list(NOT_LM_LAB))
@pytest.mark.parametrize("use", ["ckpt_path", "init_from"])
def test_a_checkpoint_without_hyperparameters_is_one_line(
    case: str, use: str, trained: Path, tmp_path: Path, shared_cache: Path
) -> None:
    path = tmp_path / "edited.ckpt"
    torch.save(NOT_LM_LAB[case](torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)), path)
    with pytest.raises(CheckpointError, match="is not an lm_lab checkpoint") as e:
        train_in_process([*RUN, f"{use}={path}"], tmp_path / "run", shared_cache)
    assert "None" not in str(e.value) and "\n" not in str(e.value)


def test_resume_on_a_corpus_edited_in_place_is_refused_unless_allowed(tmp_path: Path, shared_cache: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    text = SHAKESPEARE.read_text()[:100_000]
    corpus.write_text(text)
    run = [*RUN, f"data.data_files={corpus}", "trainer.max_steps=2", "trainer.val_check_interval=2"]
    run_dir = tmp_path / "run"
    train_in_process(run, run_dir, shared_cache)
    # Same length, same characters, so the same number of blocks and the same tokenizer: only the text differs.
    corpus.write_text(text[:1000] + text[1000:50_000][::-1] + text[50_000:])
    before = snapshot(run_dir)
    with pytest.raises(CheckpointError, match="on different data: the corpus changed since the checkpoint") as e:
        train_in_process([*run, "trainer.max_steps=3", "ckpt_path=last"], run_dir, shared_cache)
    assert "allow_data_change=true" in str(e.value) and "\n" not in str(e.value)
    assert snapshot(run_dir) == before
    out = train_in_process(
        [*run, "trainer.max_steps=3", "ckpt_path=last", "allow_data_change=true"], run_dir, shared_cache
    )
    assert out["trainer"].global_step == 3


def test_a_second_run_into_a_busy_run_directory_is_refused(tmp_path: Path, shared_cache: Path) -> None:
    run_dir = tmp_path / "run"
    slow = [*RUN, "trainer.max_steps=100000", "trainer.val_check_interval=100000"]
    slow += ["callbacks.model_checkpoint.every_n_train_steps=null", f"hydra.run.dir={run_dir}"]
    first = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *slow],
        cwd=tmp_path,
        env={**os.environ, "LM_LAB_CACHE": str(shared_cache)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "tokenizer" / "tokenizer.json").is_file():  # past its checks: training
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.1)
        hydra = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
        os.setpriority(os.PRIO_PROCESS, first.pid, 19)  # its training loop would slow the second's start-up
        r = run_train([*slow, "seed=7"], tmp_path, shared_cache)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1, r.stderr[-2000:]
        assert errors[0].startswith(f"error: run directory {run_dir} is in use by pid {first.pid} on host ")
        assert errors[0].endswith(": wait for it or choose another hydra.run.dir")
        assert first.poll() is None, "the first run must go on"
        assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == hydra
        assert "in use" not in (run_dir / "train.log").read_text()
    finally:
        first.kill()
        first.wait()
    # The kernel released the dead process's lock: the directory is free again (the stale file is no obstacle).
    assert (run_dir / ".lock").is_file()
    with run_dir_lock(run_dir):
        assert f"pid {os.getpid()} " in (run_dir / ".lock").read_text()
    assert not (run_dir / ".lock").exists()


def test_only_the_launching_process_of_a_distributed_job_takes_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with run_dir_lock(tmp_path):
        with pytest.raises(RunDirInUseError, match=f"is in use by pid {os.getpid()} "), run_dir_lock(tmp_path):
            pass
        # The ranks Lightning's DDP launcher starts (LOCAL_RANK=1..) share the launcher's run directory.
        monkeypatch.setenv("LOCAL_RANK", "1")
        with run_dir_lock(tmp_path):
            pass


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
        if "non-finite loss or gradients: optimizer step skipped" in line and line.startswith("warning: step")
    ]
    assert len(warned) == 5
    (run,) = run_dirs(tmp_path)
    (saved,) = (run / "checkpoints").glob("nonfinite-step*.ckpt")
    ckpt = torch.load(saved, weights_only=True)
    # The skipped steps changed nothing: the weights are those after the last finite step.
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert resolve_ckpt_path("last", run) != saved  # never resumed by ckpt_path=last


# ---------------------------------------------------------------------- data faults


@pytest.mark.slow  # ~22-26 s; the cache's own guards (damaged entries, dead builders' tmp dirs) are in tests/data
def test_killed_tokenization_leaves_no_trusted_cache_and_is_rebuilt(tmp_path: Path) -> None:
    from lm_lab.data.options import DataConfig
    from lm_lab.objectives.causal_lm.data import CausalLMDataModule

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
    # Only the temporary build is left, never a trusted entry (and the build's lock file, which a
    # later build takes over: lm_lab/data/cache.py).
    entries = [p for p in (cache_dir / "tokens").iterdir() if not p.name.endswith(".build.lock")]
    assert entries and all(".tmp-" in p.name for p in entries)
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
    from lm_lab.data.options import DataConfig
    from lm_lab.data.sources import DataError
    from lm_lab.objectives.causal_lm.data import CausalLMDataModule

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
    # No cache entry, complete or partial (the build's lock file is not one: lm_lab/data/cache.py).
    assert [p for p in (tiny_disk / "tokens").iterdir() if not p.name.endswith(".build.lock")] == []


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


PREFILLED = 20_000  # rows: Lightning's rewrite of a file this size takes ~60 ms here


def _csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_kill_while_metrics_csv_gains_a_column_keeps_every_row(tmp_path: Path) -> None:
    """Lightning rewrites metrics.csv whenever a column appears (the first validation, a new metric).
    Rewritten in place, a run SIGKILLed in the middle left an empty file and its resumed attempt only
    its own rows (seen in CI: a run killed during its first validation lost steps 1-8). Killed at
    random moments while every save rewrites a 20,000-row file, the file always holds every row saved
    before the kill, and a resumed logger appends to it."""
    import random

    from lm_lab.training.loggers import csv_logger

    seed_dir = tmp_path / "seed"
    logger = csv_logger(str(seed_dir), flush_logs_every_n_steps=PREFILLED)
    for i in range(PREFILLED):
        logger.log_metrics({"train/loss": i / 7}, step=i)
    seed = (seed_dir / "metrics.csv").read_bytes()
    rng = random.Random(0)
    for attempt in range(6):
        run_dir = tmp_path / f"attempt{attempt}"
        run_dir.mkdir()
        (run_dir / "metrics.csv").write_bytes(seed)
        read_end, write_end = os.pipe()
        pid = os.fork()  # this process has Lightning imported already: each attempt starts at once
        if pid == 0:  # the run: a new column at every save, so every save rewrites the file
            try:
                os.close(read_end)
                run_logger = csv_logger(str(run_dir), flush_logs_every_n_steps=1)
                for k in range(10_000):
                    run_logger.log_metrics({"train/loss": float(k), f"val/m{k}": 1.0}, step=PREFILLED + k)
                    os.write(write_end, b"s")
            finally:
                os._exit(1)
        os.close(write_end)
        assert os.read(read_end, 1) == b"s"  # one rewrite done
        time.sleep(rng.uniform(0.0, 0.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        saved = 1
        while chunk := os.read(read_end, 4096):
            saved += len(chunk)
        os.close(read_end)

        rows = _csv_rows(run_dir / "metrics.csv")
        assert len(rows) >= PREFILLED + saved, (attempt, len(rows), saved)
        assert [int(r["step"]) for r in rows] == list(range(len(rows)))
        assert all(float(r["train/loss"]) == i / 7 for i, r in enumerate(rows[:PREFILLED]))
        assert all(float(r["train/loss"]) == k for k, r in enumerate(rows[PREFILLED:]))

        resumed = csv_logger(str(run_dir), flush_logs_every_n_steps=1)
        resumed.log_metrics({"train/loss": -1.0, "val/loss": 2.0}, step=len(rows))
        again = _csv_rows(run_dir / "metrics.csv")
        assert again[:-1] == [{**r, "val/loss": ""} for r in rows]
        assert (again[-1]["step"], again[-1]["train/loss"], again[-1]["val/loss"]) == (str(len(rows)), "-1.0", "2.0")
        assert not (run_dir / "metrics.csv.tmp").exists()


def test_a_row_cut_short_by_a_kill_is_dropped_on_resume(tmp_path: Path) -> None:
    """A kill in the middle of an append leaves a partial last row; appended to, it would merge with
    the next row into one wrong row (a wrong loss read as right). The resumed logger drops it."""
    from lm_lab.training.loggers import csv_logger

    logger = csv_logger(str(tmp_path), flush_logs_every_n_steps=1)
    for i in range(3):
        logger.log_metrics({"train/loss": 1.25 + i}, step=i)
    path = tmp_path / "metrics.csv"
    whole = path.read_bytes()
    assert whole.endswith(b"\r\n2,3.25\r\n")  # the csv module ends rows in \r\n
    for cut, kept in ((b"2,3.2", 2), (b"2,3.25\r", 3)):  # mid-row; between \r and \n (the row is whole)
        path.write_bytes(whole[: whole.rindex(b"2,3.25\r\n")] + cut)
        resumed = csv_logger(str(tmp_path), flush_logs_every_n_steps=1)
        resumed.log_metrics({"train/loss": 9.5}, step=kept)
        rows = _csv_rows(path)
        assert [(r["step"], r["train/loss"]) for r in rows] == [
            *[(str(i), str(1.25 + i)) for i in range(kept)],
            (str(kept), "9.5"),
        ]


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
    hydra = {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    assert set(hydra) == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    r = run_train([*RUN, "data.batch_size=8", "ckpt_path=last", f"hydra.run.dir={run_dir}"], tmp_path, shared_cache)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "data.batch_size=8 (checkpoint: 4)" in errors[0], r.stderr
    assert "Traceback" not in r.stderr and snapshot(run_dir) == before
    # Hydra's record of the run is not replaced by the refused launch's config.
    assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == hydra


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
