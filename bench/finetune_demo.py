"""Pretrain -> fine-tune, measured: sentence polarity test accuracy of a pretrained encoder against
the same network from random initialization and against a linear probe, over seeds.

    python bench/finetune_demo.py --init-from RUN/checkpoints/last.ckpt [--seeds 1 2 3] [--steps 400]

Every run is ``python train.py experiment=polarity_cpu ...`` in a fresh process, as a user runs it;
the test split is scored once with the best checkpoint by validation accuracy. Prints a table of
the median and the spread (min-max) of test accuracy per variant.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def final_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged value of each metric in the run's metrics.csv."""
    out: dict[str, float] = {}
    with open(run_dir / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            out.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return out


def run(args: list[str], run_dir: Path) -> tuple[dict[str, float], float]:
    start = time.perf_counter()
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "experiment=polarity_cpu",
        "logger=csv",
        *args,
        f"hydra.run.dir={run_dir}",
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return final_metrics(run_dir), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--init-from", required=True, help="a pretrained encoder: lm_lab checkpoint or HF directory")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--out", default=None, help="where the runs go (default: a temporary directory)")
    a = p.parse_args()
    variants = {
        "pretrained, fine-tuned": [f"init_from={a.init_from}"],
        "random init, same network": [],  # the model preset of the recipe (bert_mini), trained from scratch
        "pretrained, linear probe": [f"init_from={a.init_from}", "objective.freeze_backbone=true", "optimizer.lr=1e-3"],
    }
    root = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="finetune_demo."))
    results: dict[str, list[float]] = {name: [] for name in variants}
    for seed in a.seeds:
        for name, extra in variants.items():
            run_dir = root / f"{name.split(',')[0].replace(' ', '_')}_{'probe' if 'probe' in name else 'ft'}_seed{seed}"
            metrics, seconds = run([*extra, f"seed={seed}", f"trainer.max_steps={a.steps}"], run_dir)
            results[name].append(metrics["test/acc"])
            print(f"{name:28s} seed {seed}: test/acc {metrics['test/acc']:.4f} ({seconds:.0f} s)", flush=True)
    print(f"\nsentence_polarity test accuracy (400 sentences), {len(a.seeds)} seeds, {a.steps} steps; runs in {root}\n")
    print("| variant | median | min - max |")
    print("| --- | ---: | ---: |")
    for name, accs in results.items():
        print(f"| {name} | {statistics.median(accs):.4f} | {min(accs):.4f} - {max(accs):.4f} |")


if __name__ == "__main__":
    main()
