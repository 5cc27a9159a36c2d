"""A callback for ``bench/lightning_overhead.py``: inside a real lm_lab run, alternate blocks of K
lm_lab optimizer steps with K steps of a plain PyTorch loop (interleaved in chunks of C steps), and
time each side.

    python train.py ... +callbacks.paired._target_=bench.paired_loop.PairedPlainLoop \
        +callbacks.paired.data=input.txt +callbacks.paired.block=50

The plain loop trains its own copy of the task's network (``copy.deepcopy`` at the start of
training) with lm_lab's optimizer settings (AdamW, decay on matrices only, the same ``fused``
choice; the LambdaLR schedule of ``configure_optimizers``), the Trainer's gradient clipping
(``clip_grad_norm_``) and its own random windows of the run's tokenized corpus (a private
generator: the run's RNG streams are left alone). After every C lm_lab steps the callback runs C
plain steps, so the two sides alternate within a second or so and the machine's drift (other
jobs, clock changes) falls on both; a pair sums K steps of each side. K should span whole logging
periods (``log_every_n_steps``, the progress line), so that each lm_lab block pays for the same
share of them.
"""

from __future__ import annotations

import copy
import functools
import json
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from lm_lab.training.schedule import lr_at


class PairedPlainLoop(L.Callback):
    def __init__(self, data: str, block: int = 50, chunk: int = 10, warmup: int = 50, out: str = "pairs.json") -> None:
        if block % chunk:
            raise ValueError(f"block={block} must be a multiple of chunk={chunk}")
        self.text_file, self.block, self.chunk, self.warmup, self.out = data, block, chunk, warmup, out
        self.pairs: list[tuple[float, float]] = []  # (lm_lab seconds, plain seconds) per block of K steps
        self._t0: float | None = None
        self._start_step = 0
        self._sums = [0.0, 0.0]

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.net = copy.deepcopy(pl_module.net).train()
        params = [p for p in self.net.parameters() if p.requires_grad]
        o, s = pl_module.optim_cfg, pl_module.sched_cfg
        fused = bool(trainer.optimizers[0].defaults.get("fused"))  # the run's own choice (auto: fused on CPU)
        self.opt = torch.optim.AdamW(
            [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            fused=fused,
        )
        fn = functools.partial(
            lr_at,
            max_lr=o.lr,
            min_lr=s.min_lr,
            warmup_steps=s.warmup_steps,
            decay_steps=s.decay_steps or trainer.max_steps,
            kind=s.kind,
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: fn(step) / o.lr)
        self.clip = trainer.gradient_clip_val
        # The run's arithmetic: under bf16-mixed the plain side's forward runs under the same autocast.
        self.bf16 = str(trainer.precision) == "bf16-mixed"
        dm = trainer.datamodule
        with open(self.text_file, encoding="utf-8") as fh:
            text = fh.read()
        self.data = torch.tensor(pl_module.tokenizer_backend.encode(text).ids, dtype=torch.long)
        self.batch, self.seq = dm.micro_batch_size, dm.cfg.block_size
        self.gen = torch.Generator().manual_seed(1337)

    def plain_steps(self, n: int) -> None:
        B, T = self.batch, self.seq
        for _ in range(n):
            ix = torch.randint(len(self.data) - T - 1, (B,), generator=self.gen).tolist()
            x = torch.stack([self.data[i : i + T] for i in ix])
            y = torch.stack([self.data[i + 1 : i + 1 + T] for i in ix])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.net(x)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip:
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.clip)
            self.opt.step()
            self.sched.step()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step < self.warmup:
            return
        if self._t0 is None:
            self.plain_steps(self.warmup)  # the plain loop's own warm-up, untimed
            self._t0, self._start_step, self._sums = time.perf_counter(), step, [0.0, 0.0]
            return
        if (step - self._start_step) % self.chunk:
            return
        # Every `chunk` lm_lab steps, `chunk` plain steps: the two sides alternate within seconds.
        self._sums[0] += time.perf_counter() - self._t0
        t = time.perf_counter()
        self.plain_steps(self.chunk)
        self._sums[1] += time.perf_counter() - t
        if step - self._start_step >= self.block:  # a pair: `block` steps of each side
            self.pairs.append((self._sums[0], self._sums[1]))  # (lm_lab, plain) seconds
            self._start_step, self._sums = step, [0.0, 0.0]
        self._t0 = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.is_global_zero:
            with open(self.out, "w") as fh:
                json.dump({"block": self.block, "pairs": self.pairs}, fh)
