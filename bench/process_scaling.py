"""1 vs 2 processes on CPU at the same global batch: DDP and FSDP (``trainer=fsdp``) scaling efficiency.

Runs ``python train.py`` three times (1 process; ``trainer=ddp_cpu``; ``trainer=fsdp`` on 2 CPU
processes), all fp32 with the same data, batch and steps, and prints a markdown table of the
steady-state training throughput (``tokens_per_sec`` from the ``Throughput`` callback: the median of
the logged windows after the first) and the scaling efficiency ``tokens/s (2 processes) / (2 x
tokens/s (1 process))``. Each process uses one intra-op thread, so 2 processes use 2 cores where 1
uses one: the comparison is one core against two.

    python bench/process_scaling.py                       # gpt_mini, Tiny Shakespeare (char), 16 x 256, 40 steps
    python bench/process_scaling.py --model gpt_tiny --steps 30
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
SETUPS = {
    "1 process": ["trainer=cpu"],
    "2 processes, DDP": ["trainer=ddp_cpu"],
    "2 processes, FSDP": ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"],
}


def tokens_per_sec(run_dir: Path) -> float:
    import csv

    with open(run_dir / "metrics.csv", newline="") as f:
        rates = [float(r["tokens_per_sec"]) for r in csv.DictReader(f) if r.get("tokens_per_sec")]
    if not rates:
        sys.exit(f"{run_dir}: no tokens_per_sec logged (run more steps than 2 throughput windows)")
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt_mini")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--data", default=str(SHAKESPEARE))
    a = p.parse_args()
    common = [
        f"model={a.model}",
        "data=files",
        f"data.data_files={a.data}",
        "data.tokenizer=char",
        f"data.block_size={a.block}",
        f"data.batch_size={a.batch}",
        f"trainer.max_steps={a.steps}",
        "trainer.limit_val_batches=0",
        "trainer.val_check_interval=null",
        "final_validation=false",
        "trainer.log_every_n_steps=5",
        "callbacks.throughput.window=5",
        "callbacks.text_samples=null",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        "sample_tokens=0",
        "scheduler.warmup_steps=5",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    rates: dict[str, float] = {}
    walls: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        env["LM_LAB_CACHE"] = str(Path(tmp) / "cache")
        for i, (name, extra) in enumerate(SETUPS.items()):
            run_dir = Path(tmp) / f"run{i}"
            t0 = time.perf_counter()
            r = subprocess.run(
                [sys.executable, str(REPO / "train.py"), *common, *extra, f"hydra.run.dir={run_dir}"],
                env=env,
                capture_output=True,
                text=True,
            )
            walls[name] = time.perf_counter() - t0
            if r.returncode != 0:
                sys.exit(f"{name} failed:\n{r.stderr[-3000:]}")
            rates[name] = tokens_per_sec(run_dir)
    base = rates["1 process"]
    print(f"{a.model}, batch {a.batch} x {a.block} (global), {a.steps} steps, fp32, 1 thread per process\n")
    print("| setup | tokens/s (steady state) | speed-up | scaling efficiency | whole run, s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, rate in rates.items():
        procs = 1 if name == "1 process" else 2
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f}x | {rate / (procs * base):.0%} | {walls[name]:.0f} |")


if __name__ == "__main__":
    main()
