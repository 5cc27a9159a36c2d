"""Lightning's per-step cost: lm_lab's steady-state training throughput vs a plain PyTorch loop.

    python bench/lightning_overhead.py [--repeats 3] [--steps 400] [--compile]

Both sides train nanoGPT's character-level CPU recipe network (4 layers, 4 heads, 128 dims, block 64,
batch 12) on random windows of Tiny Shakespeare with the same settings: lm_lab's AdamW (decay on
matrices only, the same ``fused`` choice), gradient clipping at 1.0, no validation.

- ``lm_lab``: ``python train.py experiment=nanogpt_shakespeare_char_cpu trainer.max_steps=N
  trainer.val_check_interval=N+1 ...`` in a fresh process: the Lightning Trainer, lm_lab's task,
  DataModule (random windows), callbacks and CSV logger. Its rate is the median ``tokens_per_sec``
  the ``Throughput`` callback logged over the steady-state windows (the first 50 steps skipped).
- ``plain loop``: the same network, optimizer and batches in a plain loop in a fresh process, timed
  the same way (windows of 10 steps, the first 50 skipped, median).

Runs alternate (A, B, A, B, ...); the table gives medians of the per-run rates and the overhead
(1 - lm_lab / plain). Start-up, tokenization and validation are excluded on both sides: the
whole-run comparison is ``bench/shakespeare_char.py``.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
SKIP = 50  # warm-up steps left out on both sides
WINDOW = 10

PLAIN = r"""
import sys, time, statistics, torch
sys.path.insert(0, sys.argv[2])
from lm_lab.models.gpt.model import GPT, GPTConfig
steps, compile_net, fused = int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5] == "1"
torch.manual_seed(1337)
text = open(sys.argv[1], encoding="utf-8").read()
stoi = {c: i for i, c in enumerate(sorted(set(text)))}
data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
B, T = 12, 64
model = GPT(GPTConfig(vocab_size=67, n_layer=4, n_head=4, n_embd=128, max_seq_len=T, dropout=0.0, bias=False,
                      activation="gelu"))
decay = [p for p in model.parameters() if p.dim() >= 2]; rest = [p for p in model.parameters() if p.dim() < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                        lr=1e-3, betas=(0.9, 0.99), eps=1e-8, fused=fused)
if compile_net:
    model.compile()
rates, t0 = [], None
for it in range(steps):
    if it == SKIP or (it > SKIP and (it - SKIP) % WINDOW == 0):
        now = time.perf_counter()
        if t0 is not None:
            rates.append(WINDOW * B * T / (now - t0))
        t0 = now
    ix = torch.randint(len(data) - T - 1, (B,))
    x = torch.stack([data[i:i + T] for i in ix]); y = torch.stack([data[i + 1:i + 1 + T] for i in ix])
    loss = model.loss(x, y)
    opt.zero_grad(set_to_none=True); loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
print(f"RATE {statistics.median(rates):.1f}")
""".replace("SKIP", str(SKIP)).replace("WINDOW", str(WINDOW))


def lm_lab_rate(data: Path, workdir: Path, steps: int, compile_net: bool, fused: bool) -> float:
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        "experiment=nanogpt_shakespeare_char_cpu",
        f"data.data_files={data}",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps + 1}",
        "final_validation=false",
        "sample_tokens=0",
        "callbacks.text_samples=null",
        f"compile={str(compile_net).lower()}",
        f"optimizer.fused={str(fused).lower()}",
        f"hydra.run.dir={workdir}/run",
    ]
    env = {**os.environ, "LM_LAB_CACHE": str(workdir.parent / "cache"), "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd, check=True, cwd=workdir, env=env, capture_output=True, text=True)
    with open(workdir / "run" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("tokens_per_sec")]
    return statistics.median(float(r["tokens_per_sec"]) for r in rows if int(r["step"]) > SKIP)


def plain_rate(data: Path, workdir: Path, steps: int, compile_net: bool, fused: bool) -> float:
    script = workdir / "plain.py"
    script.write_text(PLAIN)
    out = subprocess.run(
        [sys.executable, str(script), str(data), str(REPO), str(steps), str(int(compile_net)), str(int(fused))],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.split("RATE")[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--compile", action="store_true", help="compile the network on both sides")
    p.add_argument("--fused", action="store_true", help="fused AdamW on both sides")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = p.parse_args()
    rates: dict[str, list[float]] = {"lm_lab": [], "plain loop": []}
    with tempfile.TemporaryDirectory() as root:
        for i in range(args.repeats):
            for name, fn in (("lm_lab", lm_lab_rate), ("plain loop", plain_rate)):
                work = Path(root) / f"{name.replace(' ', '_')}{i}"
                work.mkdir()
                rates[name].append(fn(args.data.resolve(), work, args.steps, args.compile, args.fused))
                print(f"  repeat {i + 1}: {name:<11} {rates[name][-1]:,.0f} tokens/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(
        f"\nsteady-state training throughput, nanoGPT char recipe network, {args.steps} steps "
        f"(first {SKIP} skipped), compile={args.compile}, fused AdamW={args.fused}; median of {args.repeats}\n"
    )
    print("| run | tokens/s | vs plain loop |")
    print("| --- | ---: | ---: |")
    for name, r in med.items():
        print(f"| {name} | {r:,.0f} | {r / med['plain loop']:.3f} |")
    print(f"\nLightning + lm_lab overhead per step: {(1 - med['lm_lab'] / med['plain loop']) * 100:.1f}%")


if __name__ == "__main__":
    main()
