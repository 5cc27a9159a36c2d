"""Per-step cost of the CPU speed levers on nanoGPT's character-level recipe network.

    python bench/cpu_levers.py [--steps 40] [--repeats 5] [--threads 2]

One process; the network is the recipe's (4 layers, 4 heads, 128 dims, block 64, batch 12, vocab 67,
no bias), trained on random windows of Tiny Shakespeare. Each variant gets its own copy of the same
initial weights; variants are timed in turn (A, B, C, ..., A, B, C, ...) so machine noise hits
all of them, and the table gives the median milliseconds per optimizer step (forward, backward,
clip, AdamW step) and the ratio against the first row, lm_lab's eager path before this benchmark
(``torch.optim.AdamW`` with neither ``foreach`` nor ``fused``: what it picks on CPU by default).
Compile time (first steps of a compiled variant) is reported separately; the whole-run effect,
compile time included, is in ``bench/shakespeare_char.py``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lm_lab.models.gpt.model import GPT, GPTConfig  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def make_optimizer(model: torch.nn.Module, **kw: object) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), **kw)


class Variant:
    def __init__(self, name: str, base: GPT, compile_model: bool | str, **opt_kw: object) -> None:
        self.name = name
        self.model = copy.deepcopy(base)
        self.opt = make_optimizer(self.model, **opt_kw)
        if compile_model:
            mode = compile_model if isinstance(compile_model, str) else None
            self.fwd = torch.compile(self.model.loss, mode=mode)
        else:
            self.fwd = self.model.loss
        self.compile_s: float | None = None
        self.compiled = compile_model
        self.times: list[float] = []

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.fwd(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(1337)
    text = args.data.read_text(encoding="utf-8")
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    B, T = 12, 64

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - T - 1, (B,))
        return torch.stack([data[i : i + T] for i in ix]), torch.stack([data[i + 1 : i + 1 + T] for i in ix])

    cfg = GPTConfig(vocab_size=67, n_layer=4, n_head=4, n_embd=128, max_seq_len=T, dropout=0.0, bias=False)
    cfg.activation = "gelu"
    base = GPT(cfg)
    variants = [
        Variant("eager, AdamW for-loop (torch's CPU default)", base, False),
        Variant("eager, AdamW foreach", base, False, foreach=True),
        Variant("eager, AdamW fused", base, False, fused=True),
        Variant("compiled network, AdamW foreach", base, True, foreach=True),
        Variant("compiled network, AdamW fused", base, True, fused=True),
        Variant("compiled network (max-autotune), AdamW fused", base, "max-autotune", fused=True),
    ]
    batches = [batch() for _ in range(args.steps)]
    for v in variants:  # warm-up (and compilation)
        t0 = time.perf_counter()
        for x, y in batches[:3]:
            v.step(x, y)
        if v.compiled:
            v.compile_s = time.perf_counter() - t0
    for _ in range(args.repeats):
        for v in variants:
            t0 = time.perf_counter()
            for x, y in batches:
                v.step(x, y)
            v.times.append((time.perf_counter() - t0) / len(batches) * 1e3)
    base_ms = statistics.median(variants[0].times)
    print(
        f"\nnanoGPT char recipe network, batch {B} x {T}; median of {args.repeats} x {args.steps} steps; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print("| variant | ms / step | vs first row | compile time (s) |")
    print("| --- | ---: | ---: | ---: |")
    for v in variants:
        ms = statistics.median(v.times)
        comp = f"{v.compile_s:.1f}" if v.compile_s is not None else ""
        print(f"| {v.name} | {ms:.1f} | {ms / base_ms:.2f}x | {comp} |")


if __name__ == "__main__":
    main()
