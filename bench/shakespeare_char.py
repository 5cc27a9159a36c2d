"""nanoGPT's CPU Tiny Shakespeare recipe: lm_lab's whole run vs a plain PyTorch loop.

    python bench/shakespeare_char.py [--repeats 3] [--fp32] [--llama] [--compiled] [--nanogpt DIR] [--data ../shared/data/tinyshakespeare/input.txt]

Both sides train the same recipe (4 layers, 4 heads, 128 dims, block 64, batch 12, 2,000 steps,
lr 1e-3 with 100 warm-up steps and cosine decay to 1e-4, betas 0.9/0.99, weight decay 0.1, clip 1.0,
no dropout, no bias; 20 validation batches every 250 steps):

- ``lm_lab``: ``python train.py experiment=nanogpt_shakespeare_char_cpu`` as a user runs it (a
  fresh process: imports, data loading, tokenizer, Lightning, validation, checkpoints, CSV log).
  The recipe has ``trainer.precision=auto``: ``bf16-mixed`` on CPUs with AVX512-BF16/AMX (attention
  by ``lm_lab.models.layers.sdpa``'s CPU paths), ``32-true`` elsewhere.
- ``lm_lab, 32-true`` (only with ``--fp32``): the same with ``trainer.precision=32-true``, the
  plain loop's arithmetic.
- ``plain loop``: nanoGPT's ``train.py`` algorithm written out in plain PyTorch in a fresh process
  (random windows, ``estimate_loss`` on train and val every 250 steps), same network class. Its
  validation loss in the table is its final weights' on the whole validation split (every 64-token
  block), as the recipe's ``final_val_batches: 1.0`` reports lm_lab's. nanoGPT's own figure, 20
  batches of 12 random windows (printed as ESTIMATE), has a sampling error of 0.015 (1 s.d.): seed
  1337's 1.8837 is 1.9104 on the whole split (docs/benchmarks.md), too loose to compare two runs by.
- ``lm_lab, ... compile=true`` (only with ``--compiled``): the first row plus ``compile=true
  optimizer.fused=true`` (compilation included in the wall time, from a cold Inductor cache as in
  a user's first run).
- ``lm_lab, Llama blocks`` (only with ``--llama``): ``python train.py
  experiment=nanogpt_shakespeare_char_cpu_llama``, the same recipe and run with Llama blocks
  (RMSNorm, rotary positions, SwiGLU 344 wide, ~0.80M parameters like the GPT network). Its ratio is
  against the same plain GPT loop: there is no plain Llama loop.

- ``nanoGPT itself`` (only with ``--nanogpt DIR``, a checkout of karpathy/nanoGPT): its
  ``data/shakespeare_char/prepare.py`` on the same ``input.txt``, then its ``train.py`` with the
  command its README gives for CPUs (``config/train_shakespeare_char.py --device=cpu --compile=False
  --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
  --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``), both timed, in a scratch
  directory that holds copies of its files (nothing of nanoGPT is in this repository). Its val loss
  is the one it prints at step 2,000: its own estimate from 20 random batches, not the whole split.

Runs alternate (A, B[, C], A, B[, C], ...) so machine noise hits every row; the table gives medians and the
ratio. nanoGPT's own figures on this kind of machine (../shared/data/README.md): val loss 1.886,
about 125 s for the whole run.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

PLAIN_LOOP = r"""
import math, sys, time, torch
sys.path.insert(0, sys.argv[2])
from lm_lab.models.gpt.model import GPT, GPTConfig
torch.manual_seed(1337)
text = open(sys.argv[1], encoding="utf-8").read()
chars = sorted(set(text)); stoi = {c: i for i, c in enumerate(chars)}
data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
n = int(0.9 * len(data)); train_data, val_data = data[:n], data[n:]
B, T, iters, eval_every, eval_iters = 12, 64, 2000, 250, 20
def get_batch(split):
    d = train_data if split == "train" else val_data
    ix = torch.randint(len(d) - T, (B,))
    return torch.stack([d[i:i + T] for i in ix]), torch.stack([d[i + 1:i + 1 + T] for i in ix])
model = GPT(GPTConfig(vocab_size=len(chars), n_layer=4, n_head=4, n_embd=128, max_seq_len=T, dropout=0.0,
                      bias=False, activation="gelu"))
decay = [p for p in model.parameters() if p.dim() >= 2]; no_decay = [p for p in model.parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                        lr=1e-3, betas=(0.9, 0.99))
def get_lr(it, lr=1e-3, warmup=100, decay_iters=2000, min_lr=1e-4):
    if it < warmup: return lr * (it + 1) / (warmup + 1)
    if it > decay_iters: return min_lr
    r = (it - warmup) / (decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * r)) * (lr - min_lr)
@torch.no_grad()
def estimate_loss():
    model.eval(); out = {}
    for split in ("train", "val"):
        out[split] = sum(model.loss(*get_batch(split)).item() for _ in range(eval_iters)) / eval_iters
    model.train(); return out
val = None
for it in range(iters + 1):
    for g in opt.param_groups: g["lr"] = get_lr(it)
    if it % eval_every == 0 and it > 0:
        val = estimate_loss()["val"]
    if it == iters: break
    x, y = get_batch("train")
    loss = model.loss(x, y)
    opt.zero_grad(set_to_none=True); loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
@torch.no_grad()
def whole_val():  # the final weights on every 64-token block of the split, as lm_lab's final_val_batches=1.0
    model.eval(); n = (len(val_data) - 1) // T; starts = torch.arange(n) * T; total = 0.0
    for s in starts.split(256):
        x = torch.stack([val_data[i:i + T] for i in s]); y = torch.stack([val_data[i + 1:i + 1 + T] for i in s])
        total += model.loss(x, y).item() * len(s)
    return total / n
print(f"ESTIMATE {val:.4f}")
print(f"VAL {whole_val():.4f}")
"""


def run_lm_lab(
    data: Path, workdir: Path, experiment: str = "nanogpt_shakespeare_char_cpu", extra: tuple[str, ...] = ()
) -> tuple[float, float]:
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        f"experiment={experiment}",
        f"data.data_files={data}",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={workdir}/run",
        *extra,
    ]
    # A cold Inductor cache in each run: compilation is counted as a user's first run pays it.
    env = {
        **os.environ,
        "LM_LAB_CACHE": str(workdir / "cache"),
        "HF_HUB_OFFLINE": "1",
        "TORCHINDUCTOR_CACHE_DIR": str(workdir / "inductor"),
    }
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    with open(workdir / "run" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss") and r.get("step") in ("1999", "2000")]
    return wall, val[-1]


def run_lm_lab_llama(data: Path, workdir: Path) -> tuple[float, float]:
    return run_lm_lab(data, workdir, "nanogpt_shakespeare_char_cpu_llama")


def run_lm_lab_fp32(data: Path, workdir: Path) -> tuple[float, float]:
    return run_lm_lab(data, workdir, extra=("trainer.precision=32-true",))


def run_lm_lab_compiled(data: Path, workdir: Path) -> tuple[float, float]:
    return run_lm_lab(data, workdir, extra=("compile=true", "optimizer.fused=true"))


NANOGPT_FILES = (
    "train.py",
    "model.py",
    "configurator.py",
    "config/train_shakespeare_char.py",
    "data/shakespeare_char/prepare.py",
)
# nanoGPT's README, "I only have a macbook" (a CPU): its recipe for this benchmark.
NANOGPT_ARGS = [
    "config/train_shakespeare_char.py",
    "--device=cpu",
    "--compile=False",
    "--eval_iters=20",
    "--log_interval=1",
    "--block_size=64",
    "--batch_size=12",
    "--n_layer=4",
    "--n_head=4",
    "--n_embd=128",
    "--max_iters=2000",
    "--lr_decay_iters=2000",
    "--dropout=0.0",
]


def check_nanogpt(checkout: Path) -> None:
    missing = [f for f in NANOGPT_FILES if not (checkout / f).is_file()]
    if missing:
        sys.exit(
            f"error: --nanogpt {checkout} lacks {', '.join(missing)}: "
            "give a checkout of https://github.com/karpathy/nanoGPT"
        )


def run_nanogpt(checkout: Path, data: Path, workdir: Path) -> tuple[float, float]:
    for name in NANOGPT_FILES:
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(checkout / name, workdir / name)
    (workdir / "data" / "shakespeare_char" / "input.txt").symlink_to(data)  # prepare.py downloads it otherwise
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "data/shakespeare_char/prepare.py"], cwd=workdir, check=True, capture_output=True)
    out = subprocess.run(
        [sys.executable, "train.py", *NANOGPT_ARGS], cwd=workdir, check=True, capture_output=True, text=True
    ).stdout
    wall = time.perf_counter() - t0
    return wall, float(re.findall(r"step 2000: train loss [0-9.]+, val loss ([0-9.]+)", out)[-1])


def run_plain(data: Path, workdir: Path) -> tuple[float, float]:
    script = workdir / "plain_loop.py"
    script.write_text(PLAIN_LOOP)
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(script), str(data), str(REPO)], check=True, capture_output=True, text=True
    ).stdout
    wall = time.perf_counter() - t0
    return wall, float(out.split("VAL")[-1])


GPT_ROW = "lm_lab, GPT-2 blocks (the recipe: precision auto)"
FP32_ROW = "lm_lab, GPT-2 blocks, trainer.precision=32-true"
PLAIN_ROW = "plain loop, GPT-2 blocks (baseline)"
LLAMA_ROW = "lm_lab, Llama blocks"
COMPILED_ROW = "lm_lab, GPT-2 blocks, compile=true optimizer.fused=true"
NANOGPT_ROW = "nanoGPT itself (its train.py; val: its 20-batch estimate)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--llama", action="store_true", help="also run the recipe with Llama blocks (a third row)")
    p.add_argument("--fp32", action="store_true", help="also run lm_lab with trainer.precision=32-true (a row)")
    p.add_argument(
        "--compiled", action="store_true", help="also run lm_lab with compile=true optimizer.fused=true (a row)"
    )
    p.add_argument(
        "--nanogpt",
        type=Path,
        default=None,
        help="a checkout of karpathy/nanoGPT: also run its train.py with its README's CPU command (a row)",
    )
    args = p.parse_args()
    runs = [(GPT_ROW, run_lm_lab), (PLAIN_ROW, run_plain)]
    if args.nanogpt is not None:
        check_nanogpt(args.nanogpt)
        runs.append((NANOGPT_ROW, functools.partial(run_nanogpt, args.nanogpt.resolve())))
    if args.fp32:
        runs.append((FP32_ROW, run_lm_lab_fp32))
    if args.compiled:
        runs.append((COMPILED_ROW, run_lm_lab_compiled))
    if args.llama:
        runs.append((LLAMA_ROW, run_lm_lab_llama))
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in runs}
    for i in range(args.repeats):
        for name, fn in runs:
            with tempfile.TemporaryDirectory() as d:
                wall, val = fn(args.data.resolve(), Path(d))
            results[name].append((wall, val))
            print(f"  repeat {i + 1}: {name:<40} {wall:6.1f} s  val/loss {val:.4f}", flush=True)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(x for _, x in v)) for k, v in results.items()}
    print(
        f"\nnanoGPT CPU recipe, Tiny Shakespeare char, 2,000 steps; median of {args.repeats} "
        f"(torch {__import__('torch').__version__}, {os.cpu_count()} CPUs)\n"
    )
    print("| run | whole-run wall time (s) | val loss at step 2,000 | time vs plain loop |")
    print("| --- | ---: | ---: | ---: |")
    base = med[PLAIN_ROW][0]
    for name, (wall, val) in med.items():
        print(f"| {name} | {wall:.1f} | {val:.4f} | {wall / base:.2f}x |")
    print("| nanoGPT (reference, ../shared/data/README.md) | ~125 | 1.886 | |")
    if NANOGPT_ROW in med:
        print(f"\nlm_lab / nanoGPT itself, whole run: {med[GPT_ROW][0] / med[NANOGPT_ROW][0]:.2f}x")


if __name__ == "__main__":
    main()
