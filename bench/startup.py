"""Start-up: process start to the end of the first optimizer step, against bare imports.

    python bench/startup.py [--repeats 3]

Rows (each a fresh process, alternating, median of repeats; the corpus is already tokenized in the
cache, as from a user's second run):

- ``python -c "import torch"`` and ``python -c "import torch, lightning"``, process start to the end
  of the import: the floor a Lightning program cannot go below (Lightning's import pulls in
  ``torch._dynamo`` and torchmetrics, which imports scipy.signal, matplotlib and transformers when
  they are installed).
- the same import to the process's exit, without and with ``gc.freeze()`` as the last statement:
  what Python's shutdown costs after it, and what ``lm_lab.training.console.run_command`` (the end of
  ``train.py`` and the ``lm-lab-*`` commands) saves of that.
- ``train.py experiment=nanogpt_shakespeare_char_cpu logger=csv``: to the end of step 1 (the
  time stamp of its first progress line in train.log).
- the same with the default loggers (W&B offline + CSV).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def bare(modules: str) -> float:
    """Process start to the end of ``import <modules>`` (not to the process's exit: Python's shutdown
    after such an import takes another ~1.3 s, which a train.py run's first step never waits for)."""
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-c", f"import time; import {modules}; print(time.time())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.split()[-1]) - t0


def process_end(modules: str, freeze: bool) -> float:
    """Process start to its exit after ``import <modules>``: the import plus Python's shutdown, with or
    without ``gc.freeze()`` as the last statement (what ``lm_lab.training.console.run_command`` does)."""
    t0 = time.time()
    code = f"import gc; import {modules}" + ("; gc.freeze()" if freeze else "")
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.time() - t0


def first_step(data: Path, work: Path, logger: str) -> float:
    run = work / f"run_{logger}_{time.monotonic_ns()}"
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "experiment=nanogpt_shakespeare_char_cpu",
        f"data.data_files={data}",
        f"logger={logger}",
        "trainer.enable_progress_bar=false",
        "trainer.max_steps=2",
        "scheduler.warmup_steps=1",
        "final_validation=false",
        "sample_tokens=0",
        f"hydra.run.dir={run}",
    ]
    env = {**os.environ, "LM_LAB_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=work, env=env, capture_output=True)
    line = next(x for x in (run / "train.log").read_text().splitlines() if "step 1/" in x)
    stamp = dt.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return stamp - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as root:
        work = Path(root)
        first_step(args.data.resolve(), work, "csv")  # tokenize the corpus once (not timed)
        rows = {
            "python -c 'import torch'": lambda: bare("torch"),
            "python -c 'import torch, lightning'": lambda: bare("torch, lightning"),
            "the same, to the process's exit": lambda: process_end("torch, lightning", freeze=False),
            "the same, to the exit, gc.freeze() last": lambda: process_end("torch, lightning", freeze=True),
            "train.py ... logger=csv: start to end of step 1": lambda: first_step(args.data.resolve(), work, "csv"),
            "train.py ... (default loggers: W&B offline + CSV)": lambda: first_step(
                args.data.resolve(), work, "default"
            ),
        }
        times: dict[str, list[float]] = {k: [] for k in rows}
        for _ in range(args.repeats):
            for name, fn in rows.items():
                times[name].append(fn())
    med = {k: statistics.median(v) for k, v in times.items()}
    floor = med["python -c 'import torch, lightning'"]
    print(f"\nstart-up, median of {args.repeats} (corpus cached)\n")
    print("| process | seconds | vs importing torch + lightning |")
    print("| --- | ---: | ---: |")
    for name, t in med.items():
        print(f"| {name} | {t:.2f} | {t / floor:.2f}x |")


if __name__ == "__main__":
    main()
