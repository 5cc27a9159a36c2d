"""1 process vs 2-process DDP (CPU, gloo) at the same global batch: do they train the same model?

Runs `python train.py` as a user would, once on 1 process and once with `trainer=ddp_cpu`, for each
seed, then prints a markdown table: the final validation loss of both (each run scores the whole
validation split, every sample once), the largest per-step train-loss difference, and the
whole-run wall time ratio (2 cores shared by both processes: this is a correctness check, not a
scaling benchmark).

    python bench/ddp_parity.py                       # gpt_tiny, Tiny Shakespeare, 150 steps, 16 x 128
    python bench/ddp_parity.py --seeds 3 4 5 --steps 150
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def run(args: list[str], run_dir: Path, cache: Path) -> float:
    env = {**os.environ, "LM_LAB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args, f"hydra.run.dir={run_dir}"],
        env=env,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        sys.exit(f"run failed ({' '.join(args)}):\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def curves(run_dir: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    with open(run_dir / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key in ("train/loss", "val/loss"):
                if row.get(key):
                    out.setdefault(key, {})[int(row["step"])] = float(row[key])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--data", default=str(SHAKESPEARE))
    a = p.parse_args()
    common = [
        "model=gpt_tiny",
        "data=files",
        f"data.data_files={a.data}",
        "data.block_size=128",
        "data.batch_size=16",
        f"trainer.max_steps={a.steps}",
        f"trainer.val_check_interval={a.steps}",
        "trainer.limit_val_batches=1.0",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        "callbacks.text_samples=null",
        "sample_tokens=0",
    ]
    rows, ratios = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp), Path(tmp) / "cache"
        run([*common, "trainer.max_steps=1"], root / "warm", cache)  # tokenize once, outside the timings
        for seed in a.seeds:
            one, two = root / f"one-{seed}", root / f"two-{seed}"
            t1 = run([*common, f"seed={seed}"], one, cache)
            t2 = run([*common, f"seed={seed}", "trainer=ddp_cpu"], two, cache)
            c1, c2 = curves(one), curves(two)
            step_diff = max(abs(c1["train/loss"][s] - c2["train/loss"][s]) for s in c1["train/loss"])
            v1, v2 = c1["val/loss"][max(c1["val/loss"])], c2["val/loss"][max(c2["val/loss"])]
            rows.append((seed, v1, v2, step_diff, t2 / t1))
            ratios.append(t2 / t1)
    print(f"\n1 process vs 2-process DDP, gpt_tiny, {a.steps} steps of 16 x 128 tokens, {Path(a.data).name}\n")
    print("| seed | val loss, 1 process | val loss, 2 processes | max per-step train-loss diff | wall time 2p / 1p |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for seed, v1, v2, d, r in rows:
        print(f"| {seed} | {v1:.6f} | {v2:.6f} | {d:.1e} | {r:.2f}x |")
    print(f"\nmedian wall-time ratio (2 processes / 1 process): {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
