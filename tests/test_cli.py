"""`python train.py` as a user runs it: the default run, and one-line errors for bad input."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import REPO, SHAKESPEARE, run_dirs, run_train
from tests.wandb_records import summary

FAST = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "sample_tokens=4",
    "callbacks.text_samples.max_new_tokens=2",
]


def test_default_run_offline_with_wandb_and_csv(tmp_path: Path, shared_cache: Path) -> None:
    """The no-argument run (default model, corpus, loggers incl. offline W&B), shortened."""
    env = {"HF_HUB_OFFLINE": "1", "WANDB_API_KEY": "", "WANDB_MODE": ""}
    r = run_train(FAST, tmp_path, shared_cache, **env)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = run_dirs(tmp_path)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "metrics.csv").is_file()
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    (wandb_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")  # W&B logs offline without a login
    # train.py's process ends fast (gc.freeze, no collection at shutdown): W&B's exit hook must still have
    # finished the run, with the final validation in its history.
    record = summary(wandb_file)
    assert record["exit"] == 0, record["exit"]
    assert record["history"].get("val/loss"), sorted(record["history"])
    assert "--- sample" in r.stdout and "run directory: " in r.stdout and "final metrics: {'val/loss'" in r.stdout
    # The printed command runs as printed, from where the run was launched (no venv activated).
    (use,) = [line.split("use it:", 1)[1] for line in r.stdout.splitlines() if "use it:" in line]
    g = subprocess.run(shlex.split(use), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert g.returncode == 0 and g.stdout.startswith("Hello"), (use, g.stderr[-2000:])


# Lines a run must not print on the console (train.log may keep them).
NOISE = ["💡", "litlogger", "anonymous setting", "LeafSpec", "exists and is not empty", "INFO:"]


def test_console_off_a_terminal_shows_progress_lines_once_and_no_noise(tmp_path: Path, shared_cache: Path) -> None:
    """stdout is a pipe here (as under nohup, SLURM or `| tee`): plain progress lines instead of a
    bar, each message once, no tips or repeated deprecations; train.log has the loss lines. A
    resume into the same directory adds no "directory not empty" warning. ``sample_prompt=null``: no
    samples, after the validations or at the end."""
    run_dir = tmp_path / "run"
    args = [
        "model=gpt_tiny",
        *FAST,
        "trainer.enable_progress_bar=null",  # the default: a bar only on a terminal
        "callbacks.progress.every_n_steps=2",
        "sample_prompt=null",
        f"hydra.run.dir={run_dir}",
    ]
    env = {"HF_HUB_OFFLINE": "1", "WANDB_API_KEY": "", "WANDB_MODE": ""}  # the default loggers: W&B offline + CSV
    first = run_train(args, tmp_path, shared_cache, **env)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_train([*args, "trainer.max_steps=6", "ckpt_path=last"], tmp_path, shared_cache, **env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for r, total in ((first, 4), (resumed, 6)):
        console = (r.stdout + r.stderr).splitlines()
        repeated = [line for line, n in Counter(line for line in console if line.strip()).items() if n > 1]
        assert not repeated, repeated
        assert not [line for line in console if any(n in line for n in NOISE)], console
        steps = [line for line in console if line.startswith("step ") and "| loss " in line]
        assert f"step {total}/{total} | loss " in "\n".join(steps) and "tok/s" in steps[-1] and "eta" in steps[-1]
        assert any(line.startswith(f"step {total}/{total} | validation: val/loss ") for line in console)
        assert "━" not in r.stdout + r.stderr  # no progress bar
        assert not [
            line for line in console if "sample at step" in line or "--- sample" in line or "sample gen" in line
        ]
    log = (run_dir / "train.log").read_text()
    assert "step 2/4 | loss " in log and "step 6/6 | loss " in log  # both attempts' progress, with the loss
    assert "Tip" in log and "exists and is not empty" in log  # what the console leaves out is still in the log


def test_offline_hub_preset_fails_with_one_line(tmp_path: Path, shared_cache: Path) -> None:
    """Before torch, Lightning or a logger starts: the whole output is the error, naming the fix
    the README gives (data=files)."""
    r = run_train(["data=wikitext2"], tmp_path, shared_cache, HF_HUB_OFFLINE="1")
    assert r.returncode == 2
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the Hugging Face Hub is unreachable"), lines
    assert "data=files data.data_files=" in lines[0]
    assert "python train.py data=files data.data_files=" in (REPO / "README.md").read_text()


def test_console_scripts_run() -> None:
    """The commands train.py prints (lm-lab-generate, ...) are installed console scripts; each
    target runs as pip's generated wrapper runs it."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"lm-lab-generate", "lm-lab-export", "lm-lab-fill-mask"} <= set(scripts)
    for name, target in scripts.items():
        module, func = target.split(":")
        code = f"import sys; sys.argv[0] = {name!r}; from {module} import {func}; sys.exit({func}())"
        r = subprocess.run(
            [sys.executable, "-c", code, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0 and "usage:" in r.stdout, (name, r.stderr[-2000:])


@pytest.mark.parametrize(
    "script,args",
    [("lm-lab-generate", []), ("lm-lab-export", ["out"]), ("lm-lab-fill-mask", ["The [MASK] is here."])],
)
def test_console_script_errors_keep_their_exit_code(script: str, args: list[str], tmp_path: Path) -> None:
    """The cli entry (main() as the whole process, lm_lab.training.console.run_command) keeps main's
    exit code and its one-line error, and writes nothing."""
    tomllib = pytest.importorskip("tomllib")
    module, func = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"][script].split(":")
    code = f"import sys; sys.argv[0] = {script!r}; from {module} import {func}; sys.exit({func}())"
    missing = str(tmp_path / "missing.ckpt")
    r = subprocess.run(
        [sys.executable, "-c", code, missing, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "missing.ckpt" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_default_run_no_arguments(tmp_path: Path, shared_cache: Path) -> None:
    r = run_train([], tmp_path, shared_cache, timeout=900, HF_HUB_OFFLINE="1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "final metrics: {'val/loss'" in r.stdout


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


BAD = {
    "missing data file": (["data=files", "data.data_files=nope/missing.txt"], "data file not found: nope/missing.txt"),
    "empty data file": (["data=files", "data.data_files={tmp}/empty.txt"], "is empty"),
    "not UTF-8": (["data=files", "data.data_files={tmp}/latin1.txt"], "is not UTF-8 text"),
    "hub offline": (["data=wikitext2"], "Hugging Face Hub is unreachable"),
    "n_embd % n_head": (["model.n_embd=100", "model.n_head=3"], "model.n_embd=100 is not divisible by model.n_head=3"),
    "block > max_seq_len": (["data.block_size=1024"], "data.block_size=1024 is larger than model.max_seq_len=256"),
    "corpus too short": (
        ["data=files", "data.data_files={tmp}/short.txt", "data.tokenizer=char"],
        "too short for one block",
    ),
    "streamed corpus with no training document": (  # one .txt file is one document: all of it to validation
        ["data=files", f"data.data_files={SHAKESPEARE}", "data.streaming=true", "data.tokenizer=char"],
        "data.streaming: the training stream is empty",
    ),
    "unknown key (+)": (["+model.n_layrs=2"], "unknown config key model.n_layrs"),
    "wrong type": (["model.n_layer=two"], "model.n_layer='two' has the wrong type"),
    "negative lr": (["optimizer.lr=-0.001"], "optimizer.lr=-0.001 must be > 0"),
    "infinite lr": (["optimizer.lr=inf"], "optimizer.lr=inf must be > 0 and finite"),
    "negative seed": (["seed=-1"], "seed=-1 must be an integer from 0 to 4294967295"),
    "sample prompt not text": (["sample_prompt=5"], "sample_prompt=5 must be text"),
    "missing checkpoint": (["ckpt_path={tmp}/nope.ckpt"], "checkpoint not found"),
    "corrupt checkpoint": (["ckpt_path={tmp}/corrupt.ckpt"], "is corrupt or truncated"),
    "checkpoint without hyperparameters": (["ckpt_path={tmp}/no_hparams.ckpt"], "is not an lm_lab checkpoint"),
    "checkpoint with code objects": (
        ["ckpt_path={tmp}/pickle.ckpt"],
        "pickle.ckpt is not an lm_lab checkpoint: it contains Python objects (argparse.Namespace)",
    ),
    "vocab mismatch": (
        ["data=files", f"data.data_files={SHAKESPEARE}", "data.tokenizer=char", "model.vocab_size=10"],
        "the tokenizer has 67 tokens but model.vocab_size=10",
    ),
    "numbers in a JSONL text column": (
        ["data=files", "data.data_files={tmp}/numbers.jsonl"],
        "column 'text' of {tmp}/numbers.jsonl holds int64 values, not text: set data.text_column",
    ),
    "numbers in a Parquet text column": (
        ["data=files", "data.data_files={tmp}/numbers.parquet"],
        "holds float64 values, not text: set data.text_column to a column of strings (text columns: ['body'])",
    ),
    "tokenizer.json not JSON": (
        ["data=files", f"data.data_files={SHAKESPEARE}", "data.tokenizer={tmp}/tok_not_json"],
        "tok_not_json/tokenizer.json is not a tokenizers JSON file",
    ),
    "tokenizer.json not a tokenizer": (
        ["data=files", f"data.data_files={SHAKESPEARE}", "data.tokenizer={tmp}/tok_not_tokenizer"],
        "tok_not_tokenizer/tokenizer.json is not a tokenizers JSON file",
    ),
    "batch not divisible": (
        ["data.batch_size=16", "data.micro_batch_size=5"],
        "not a multiple of data.micro_batch_size=5",
    ),
    "batch not divisible by the processes of the job": (
        ["trainer=ddp_cpu", "trainer.num_nodes=3", "data.batch_size=16"],
        "data.batch_size=16 is not divisible by the 6 devices: use a multiple of 6",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_error_nonzero_exit_no_output(case: str, tmp_path: Path, shared_cache: Path) -> None:
    _write(tmp_path / "empty.txt", b"")
    _write(tmp_path / "latin1.txt", "café crème brûlée\n".encode("latin-1") * 50)
    _write(tmp_path / "short.txt", b"too short\n")
    _write(tmp_path / "corrupt.ckpt", b"PK\x03\x04 this is not a checkpoint")
    _write(tmp_path / "numbers.jsonl", b"".join(b'{"text": %d}\n' % i for i in range(50)))
    pq.write_table(pa.table({"text": [0.5] * 50, "body": ["words"] * 50}), tmp_path / "numbers.parquet")
    for name, content in (("tok_not_json", b'{"version": "1.0", "model": '), ("tok_not_tokenizer", b'{"a": 1}')):
        (tmp_path / name).mkdir()
        _write(tmp_path / name / "tokenizer.json", content)
    torch.save({"state_dict": {}}, tmp_path / "no_hparams.ckpt")
    torch.save(
        {"state_dict": {}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "pickle.ckpt"
    )  # refused by weights_only
    args, message = BAD[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    message = message.replace("{tmp}", str(tmp_path))
    r = run_train(["model=gpt_tiny", "logger=csv", *args], tmp_path, shared_cache, HF_HUB_OFFLINE="1")
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "weights_only" not in r.stderr  # never advise unpickling code
    assert run_dirs(tmp_path) == [], "a failed run must not leave a run directory behind"


def test_misspelled_override_is_rejected_by_hydra_with_the_key(tmp_path: Path, shared_cache: Path) -> None:
    r = run_train(["model.n_layrs=2"], tmp_path, shared_cache)
    assert r.returncode != 0
    assert "model.n_layrs" in r.stderr and "Traceback" not in r.stderr
    assert run_dirs(tmp_path) == []
