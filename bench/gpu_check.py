"""The GPU check in one command: four real ``train.py`` runs, then one markdown table of tokens/s,
MFU, peak memory and validation loss against the issue's targets.

    bash bench/gpu_check.sh                 # on a GPU machine (see the .sh header for the wheels)
    python bench/gpu_check.py --cpu-smoke   # the same four runs shrunk to seconds on a CPU

The runs (GPU):

1. ``gpt2_small`` at block 1024, bf16-mixed, ``compile=true``, batch 32 x 1024, vocabulary padded
   to 50,304 as in GPT-2/nanoGPT: target MFU >= 50% on one H200.
2. ``bert_base`` (MLM + NSP) at 128 tokens, bf16-mixed, ``compile=true``, batch 256: target MFU >= 40%.
3. A 1-GPU FSDP smoke run (``trainer=fsdp trainer.devices=1``, ``gpt_mini``): trains, writes a sharded
   checkpoint, and ``python -m lm_lab.export`` consolidates it.
4. nanoGPT's GPU recipe (``experiment=nanogpt_shakespeare_char``, 5,000 steps): nanoGPT reports
   val loss 1.4697.

``tokens_per_sec`` and ``mfu`` are read from each run's ``metrics.csv`` (the ``Throughput``
callback), as the median over the logged windows after the first (which holds compilation); peak
memory from the column whose name starts with ``peak_mem`` when the run logs one, else ``-``.
``--cpu-smoke`` runs tiny models, fp32, no compile, a dozen steps each: it proves the script and
the runs work end to end; its figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
QUIET = [
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "callbacks.text_samples=null",
    "callbacks.throughput.window=10",
    "sample_tokens=0",
    "trainer.log_every_n_steps=10",
]


@dataclass
class Run:
    name: str
    args: list[str]
    target: str = ""
    mfu_target: float | None = None
    val_target: float | None = None
    export: bool = False
    result: dict[str, str] = field(default_factory=dict)


def gpu_runs(shakespeare: Path) -> list[Run]:
    throughput = ["trainer.limit_val_batches=0", "final_validation=false", "trainer.val_check_interval=null"]
    return [
        Run(
            "gpt2_small, block 1024, bf16-mixed, compile",
            ["model=gpt2_small", "model.vocab_size=50304", "trainer=gpu", "trainer.precision=bf16-mixed"]
            + ["compile=true", "data.block_size=1024", "data.batch_size=32", "trainer.max_steps=80", *throughput],
            "MFU >= 50%",
            mfu_target=0.50,
        ),
        Run(
            "bert_base, 128 tokens, bf16-mixed, compile",
            ["model=bert_base", "trainer=gpu", "trainer.precision=bf16-mixed", "compile=true"]
            + ["data.block_size=128", "data.batch_size=256", "trainer.max_steps=80", *throughput],
            "MFU >= 40%",
            mfu_target=0.40,
        ),
        Run(
            "FSDP, 1 GPU (gpt_mini), sharded checkpoint + export",
            ["model=gpt_mini", "trainer=fsdp", "trainer.devices=1", "trainer.max_steps=40"]
            + ["trainer.val_check_interval=20", "trainer.limit_val_batches=5"],
            "runs, exports",
            export=True,
        ),
        Run(
            "nanoGPT shakespeare_char (5,000 steps)",
            ["experiment=nanogpt_shakespeare_char", f"data.data_files={shakespeare}"],
            "val 1.4697 (nanoGPT)",
            val_target=1.4697,
        ),
    ]


def cpu_smoke_runs(shakespeare: Path) -> list[Run]:
    """The same four runs, shrunk: tiny models, short blocks, fp32 (bf16 is ~5x slower on this CPU), no compile."""
    cpu = ["trainer.accelerator=cpu", "trainer.precision=32-true", "compile=false", "trainer.max_steps=24"]
    cpu += ["trainer.val_check_interval=12", "trainer.limit_val_batches=2"]
    runs = gpu_runs(shakespeare)
    shrunk = {
        "gpt_tiny, block 64": ["model=gpt_tiny", "trainer=cpu", "data.block_size=64", "data.batch_size=8"],
        "bert_tiny, 32 tokens": ["model=bert_tiny", "trainer=cpu", "data.block_size=32", "data.batch_size=8"],
        "FSDP, 1 CPU process (gpt_tiny), sharded checkpoint + export": ["model=gpt_tiny", "trainer=fsdp"]
        + ["trainer.devices=1", "data.block_size=64", "data.batch_size=8"],
        "nanoGPT shakespeare_char, 2 x 64 dims": [
            "experiment=nanogpt_shakespeare_char",
            f"data.data_files={shakespeare}",
        ]
        + ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "data.block_size=64", "data.batch_size=8"],
    }
    for run, (name, args) in zip(runs, shrunk.items(), strict=True):
        run.args = [*args, *cpu]
        run.name = f"[cpu-smoke] {name}"
        run.mfu_target = run.val_target = None  # tiny CPU runs: no target applies
        run.target = f"(GPU: {run.target})"
    return runs


def read_metrics(run_dir: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    with open(run_dir / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value and key not in ("step", "epoch"):
                    out.setdefault(key, []).append(float(value))
    return out


def steady(values: list[float]) -> float | None:
    """Median of the logged windows after the first (compilation, warm-up); the only one if just one."""
    if not values:
        return None
    return statistics.median(values[1:] if len(values) > 1 else values)


def execute(run: Run, root: Path, cache: Path, timeout: int) -> None:
    run_dir = root / "".join(c if c.isalnum() else "_" for c in run.name.split(",")[0]).strip("_")
    env = {**os.environ, "LM_LAB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *run.args, *QUIET, f"hydra.run.dir={run_dir}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.perf_counter() - t0
    (root / f"{run_dir.name}.log").write_text(r.stdout + r.stderr)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        run.result = {"status": f"FAILED (exit {r.returncode}): {last[:120]}"}
        return
    m = read_metrics(run_dir)
    tps, mfu = steady(m.get("tokens_per_sec", [])), steady(m.get("mfu", []))
    mem_key = next((k for k in m if k.startswith("peak_mem")), None)
    val = m.get("val/loss", [None])[-1]
    status = "ok"
    if run.mfu_target is not None:
        status = "PASS" if mfu is not None and mfu >= run.mfu_target else "below target"
    if run.val_target is not None and val is not None:
        status = f"{'PASS' if val <= run.val_target + 0.02 else 'above'} ({val - run.val_target:+.4f})"
    if run.export:
        last = run_dir / "checkpoints" / "last.ckpt"
        sharded = last.is_dir()
        e = subprocess.run(
            [sys.executable, "-m", "lm_lab.export", str(last), str(run_dir / "hf")],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        ok = e.returncode == 0 and (run_dir / "hf" / "model.safetensors").is_file()
        status = f"{'sharded' if sharded else 'NOT sharded'} checkpoint, export {'ok' if ok else 'FAILED'}"
    run.result = {
        "tokens/s": f"{tps:,.0f}" if tps is not None else "-",
        "MFU": f"{mfu:.1%}" if mfu is not None else "-",
        "peak memory": f"{max(m[mem_key]):,.2f} ({mem_key})" if mem_key else "-",
        "val loss": f"{val:.4f}" if val is not None else "-",
        "wall s": f"{wall:.0f}",
        "status": status,
    }


def table(runs: list[Run]) -> str:
    cols = ["tokens/s", "MFU", "peak memory", "val loss", "wall s"]
    lines = ["| run | " + " | ".join(cols) + " | target | result |", "|---" * (len(cols) + 3) + "|"]
    for run in runs:
        cells = [run.result.get(c, "-") for c in cols]
        lines.append(f"| {run.name} | " + " | ".join(cells) + f" | {run.target} | {run.result.get('status', '-')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="shrink every run to seconds on a CPU")
    p.add_argument("--data", type=Path, default=SHAKESPEARE, help="Tiny Shakespeare input.txt (nanoGPT recipe)")
    p.add_argument("--out", type=Path, default=REPO / "logs" / "gpu_check", help="run directories and logs")
    p.add_argument("--only", type=int, nargs="*", help="run numbers to run (1-4); default all")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    a = p.parse_args(argv)
    if not a.data.is_file():
        print(f"error: {a.data} not found: pass --data PATH to Tiny Shakespeare's input.txt", file=sys.stderr)
        return 2
    if not a.cpu_smoke:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA GPU here: run on a GPU machine, or pass --cpu-smoke", file=sys.stderr)
            return 2
    runs = cpu_smoke_runs(a.data.resolve()) if a.cpu_smoke else gpu_runs(a.data.resolve())
    chosen = [r for i, r in enumerate(runs, 1) if not a.only or i in a.only]
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = a.out / stamp
    root.mkdir()
    for run in chosen:
        print(f"running: {run.name}", flush=True)
        execute(run, root, a.out / "cache", a.timeout)
        print(f"  -> {run.result.get('status')}", flush=True)
    text = table(chosen)
    print(text)
    (root / "table.md").write_text(text + "\n")
    print(f"logs and run directories: {root}")
    return 0 if all(not r.result.get("status", "").startswith("FAILED") for r in chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
