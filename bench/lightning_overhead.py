"""Lightning's per-step cost: lm_lab's training step vs a plain PyTorch loop with lm_lab's own settings.

    python bench/lightning_overhead.py [--pairs 20] [--block 50] [--chunk 10] [--process-repeats 1] [--threads N]
                                       [--precision 32-true|bf16-mixed] [--compile] [--fused auto|true|false] [--floor]

Both sides train nanoGPT's character-level CPU recipe network (4 layers, 4 heads, 128 dims, block 64,
batch 12) on random windows of Tiny Shakespeare with the same settings: lm_lab's AdamW (decay on
matrices only, the same ``fused`` choice: ``--fused auto``, lm_lab's default, is the fused kernel on CPU), its LR schedule, gradient clipping at 1.0, no validation,
and the same arithmetic (``--precision``: lm_lab's ``trainer.precision``, which overrides the recipe's
``auto``; the plain loops run their forward pass under the same CPU autocast for ``bf16-mixed``).

- **paired blocks** (the row the issue's target is judged on): one ``python train.py
  experiment=nanogpt_shakespeare_char_cpu ...`` run (the real Trainer, task, DataModule, callbacks
  and CSV logger) with one more callback, ``bench/paired_loop.py``: after a warm-up, every ``chunk``
  optimizer steps it runs ``chunk`` steps of a plain loop (its own copy of the network, optimizer,
  schedule and clipping, its own random windows) and times both sides; a pair sums ``block``
  steps of each. The ratio of each pair (the sides alternating every second or so in the same
  process) cancels the machine's drift, which between processes reaches +-20% on this 2-core VM;
  the table gives the median ratio and its quartiles.
- **process vs process** (context only): the same run without the callback against the plain loop
  in a fresh process, alternating; median of the per-run rates (the ``Throughput`` callback's
  ``tokens_per_sec`` on one side, the same 10-step windows on the other; first 50 steps skipped).

- **Lightning's floor** (``--floor``): the same pairing with a minimal ``LightningModule`` instead of
  lm_lab (the same network and plain batches; ``training_step`` is the loss, clipping and AdamW as the
  plain loop's; no callbacks, logger or checkpoints): what Lightning's loop itself costs per step.

Start-up, tokenization and validation are excluded: the whole-run comparison is
``bench/shakespeare_char.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
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
bf16 = sys.argv[6] == "bf16-mixed"  # as Lightning's bf16-mixed: the forward pass under CPU autocast
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
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model.loss(x, y)
    opt.zero_grad(set_to_none=True); loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
print(f"RATE {statistics.median(rates):.1f}")
""".replace("SKIP", str(SKIP)).replace("WINDOW", str(WINDOW))


FLOOR = r"""
import copy, json, sys, time, torch, torch.nn.functional as F
sys.path.insert(0, sys.argv[2])
import lightning as L
from lm_lab.models.gpt.model import GPT, GPTConfig
bf16, pairs, block, chunk, warm = sys.argv[3] == "bf16-mixed", int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
torch.manual_seed(1337)
text = open(sys.argv[1], encoding="utf-8").read()
stoi = {c: i for i, c in enumerate(sorted(set(text)))}
data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
B, T = 12, 64
def batch(gen):
    ix = torch.randint(len(data) - T - 1, (B,), generator=gen).tolist()
    return torch.stack([data[i:i + T] for i in ix]), torch.stack([data[i + 1:i + 1 + T] for i in ix])
class Windows(torch.utils.data.IterableDataset):
    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True: yield batch(g)
def make_opt(net):  # the plain loop's settings: fused AdamW (lm_lab's CPU default), a per-step schedule
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.99), fused=True)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
def loss_of(net, x, y):
    return F.cross_entropy(net(x).flatten(0, 1).float(), y.flatten())
class Minimal(L.LightningModule):
    def __init__(self, net): super().__init__(); self.net = net
    def training_step(self, b, i): return loss_of(self.net, *b)
    def configure_optimizers(self):
        opt, s = make_opt(self.net); return {"optimizer": opt, "lr_scheduler": {"scheduler": s, "interval": "step"}}
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), gradient_clip_val)  # Lightning refuses fused + autocast
class Paired(L.Callback):
    def __init__(self): self.pairs, self.t0, self.sums = [], None, [0.0, 0.0]
    def on_train_start(self, trainer, pm):
        self.net = copy.deepcopy(pm.net); self.opt, self.sched = make_opt(self.net); self.gen = torch.Generator().manual_seed(1)
    def plain(self, n):
        for _ in range(n):
            x, y = batch(self.gen)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_of(self.net, x, y)
            self.opt.zero_grad(set_to_none=True); loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), 1.0); self.opt.step(); self.sched.step()
    def on_train_batch_end(self, trainer, pm, out, b, i):
        s = trainer.global_step
        if s < warm: return
        if self.t0 is None: self.plain(warm); self.t0, self.start = time.perf_counter(), s; return
        if (s - self.start) % chunk: return
        self.sums[0] += time.perf_counter() - self.t0
        t = time.perf_counter(); self.plain(chunk); self.sums[1] += time.perf_counter() - t
        if s - self.start >= block: self.pairs.append(tuple(self.sums)); self.sums, self.start = [0.0, 0.0], s
        self.t0 = time.perf_counter()
net = GPT(GPTConfig(vocab_size=67, n_layer=4, n_head=4, n_embd=128, max_seq_len=T, dropout=0.0, bias=False, activation="gelu"))
cb = Paired()
trainer = L.Trainer(max_steps=warm + pairs * block, precision="bf16-mixed" if bf16 else "32-true", gradient_clip_val=1.0,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[cb], accelerator="cpu")
trainer.fit(Minimal(net), torch.utils.data.DataLoader(Windows(), batch_size=None))
print("PAIRS", json.dumps(cb.pairs))
"""


def floor_ratios(data: Path, workdir: Path, args: argparse.Namespace) -> list[tuple[float, float]]:
    """(minimal LightningModule seconds, plain seconds) of each pair of blocks: Lightning's own cost."""
    script = workdir / "floor.py"
    script.write_text(FLOOR)
    cmd = [sys.executable, str(script), str(data), str(REPO), args.precision, str(args.pairs), str(args.block)]
    out = subprocess.run(
        [*cmd, str(args.chunk), str(SKIP)], check=True, capture_output=True, text=True, cwd=workdir
    ).stdout
    return [tuple(p) for p in json.loads(out.split("PAIRS")[-1])]


def train_cmd(
    data: Path, workdir: Path, steps: int, compile_net: bool, fused: str, precision: str = "32-true"
) -> list[str]:
    return [
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
        *([] if fused == "auto" else [f"optimizer.fused={fused}"]),
        f"trainer.precision={precision}",
        f"hydra.run.dir={workdir}/run",
    ]


def run_train(cmd: list[str], workdir: Path) -> None:
    env = {
        **os.environ,
        "LM_LAB_CACHE": str(workdir.parent / "cache"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    subprocess.run(cmd, check=True, cwd=workdir, env=env, capture_output=True, text=True)


def paired_ratios(data: Path, workdir: Path, args: argparse.Namespace) -> list[tuple[float, float]]:
    """(lm_lab seconds, plain seconds) of each pair of ``args.block``-step blocks in one run."""
    steps = SKIP + args.pairs * args.block  # pairs close at steps SKIP + block, SKIP + 2 block, ...
    out = workdir / "pairs.json"
    cmd = train_cmd(data, workdir, steps, args.compile, args.fused, args.precision) + [
        "+callbacks.paired._target_=bench.paired_loop.PairedPlainLoop",
        f"+callbacks.paired.data={data}",
        f"+callbacks.paired.block={args.block}",
        f"+callbacks.paired.chunk={args.chunk}",
        f"+callbacks.paired.warmup={SKIP}",
        f"+callbacks.paired.out={out}",
    ]
    run_train(cmd, workdir)
    return [tuple(p) for p in json.loads(out.read_text())["pairs"]]


def lm_lab_rate(data: Path, workdir: Path, steps: int, compile_net: bool, fused: str, precision: str) -> float:
    run_train(train_cmd(data, workdir, steps, compile_net, fused, precision), workdir)
    with open(workdir / "run" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("tokens_per_sec")]
    return statistics.median(float(r["tokens_per_sec"]) for r in rows if int(r["step"]) > SKIP)


def plain_rate(data: Path, workdir: Path, steps: int, compile_net: bool, fused: str, precision: str) -> float:
    script = workdir / "plain.py"
    script.write_text(PLAIN)
    out = subprocess.run(
        [
            sys.executable,
            str(script),
            str(data),
            str(REPO),
            str(steps),
            str(int(compile_net)),
            str(int(fused != "false")),  # auto: lm_lab's CPU default, the fused kernel
            precision,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out.split("RATE")[-1])


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return q[0], statistics.median(values), q[2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=20, help="timed pairs of blocks in the paired run")
    p.add_argument("--block", type=int, default=50, help="optimizer steps per block (whole logging periods)")
    p.add_argument("--chunk", type=int, default=10, help="the sides alternate every CHUNK steps within a block")
    p.add_argument("--process-repeats", type=int, default=1, help="process-vs-process runs per side (0: none)")
    p.add_argument("--steps", type=int, default=400, help="steps of each process-vs-process run")
    p.add_argument("--compile", action="store_true", help="compile the network on both sides")
    p.add_argument(
        "--fused",
        choices=["auto", "true", "false"],
        default="auto",
        help="AdamW's fused kernel on both sides (auto: lm_lab's default, fused on CPU and CUDA)",
    )
    p.add_argument(
        "--precision",
        choices=["32-true", "bf16-mixed"],
        default="32-true",
        help="both sides' arithmetic (lm_lab: trainer.precision; the plain loops: CPU autocast for bf16-mixed)",
    )
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of both sides (default: torch's)")
    p.add_argument("--floor", action="store_true", help="also pair a minimal LightningModule: Lightning's own cost")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = p.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by torch in each child process
    data = args.data.resolve()
    rates: dict[str, list[float]] = {"lm_lab": [], "plain loop": []}
    with tempfile.TemporaryDirectory() as root:
        work = Path(root) / "paired"
        work.mkdir()
        pairs = paired_ratios(data, work, args)
        floor = floor_ratios(data, work, args) if args.floor else []
        for i in range(args.process_repeats):
            for name, fn in (("lm_lab", lm_lab_rate), ("plain loop", plain_rate)):
                work = Path(root) / f"{name.replace(' ', '_')}{i}"
                work.mkdir()
                rates[name].append(fn(data, work, args.steps, args.compile, args.fused, args.precision))
                print(f"  process repeat {i + 1}: {name:<11} {rates[name][-1]:,.0f} tokens/s", flush=True)
    ratios = [lm / plain for lm, plain in pairs]
    q1, med, q3 = quartiles(ratios)
    ms = 1000 / args.block
    print(
        f"\nnanoGPT char recipe network, {args.precision}, compile={args.compile}, fused AdamW={args.fused}, "
        f"threads={args.threads or 'default'}; paired run: "
        f"{len(pairs)} pairs of {args.block}-step blocks (alternating every {args.chunk} steps) after {SKIP} "
        "warm-up steps\n"
    )
    print("| comparison | lm_lab step time / plain loop step time | overhead per step |")
    print("| --- | ---: | ---: |")
    print(
        f"| paired blocks in one process (median ratio, quartiles {q1:.3f}-{q3:.3f}; blocks "
        f"{statistics.median(lm for lm, _ in pairs) * ms:.1f} vs {statistics.median(pl for _, pl in pairs) * ms:.1f} "
        f"ms/step) | {med:.3f} | {(med - 1) * 100:.1f}% |"
    )
    if floor:
        f1, fmed, f3 = quartiles([lm / plain for lm, plain in floor])
        print(
            f"| Lightning's floor: a minimal LightningModule, paired the same way (quartiles {f1:.3f}-{f3:.3f}; "
            f"blocks {statistics.median(lm for lm, _ in floor) * ms:.1f} vs "
            f"{statistics.median(pl for _, pl in floor) * ms:.1f} ms/step) | {fmed:.3f} | {(fmed - 1) * 100:.1f}% |"
        )
    if args.process_repeats:
        med_rates = {k: statistics.median(v) for k, v in rates.items()}
        r = med_rates["plain loop"] / med_rates["lm_lab"]  # time ratio = inverse rate ratio
        print(
            f"| process vs process, {args.steps} steps, median of {args.process_repeats} (drift-prone) "
            f"| {r:.3f} | {(r - 1) * 100:.1f}% |"
        )
    print("\nThe target (overhead <= 2%) is judged on the paired row.")


if __name__ == "__main__":
    main()
