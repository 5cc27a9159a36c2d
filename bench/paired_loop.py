"""A callback for ``bench/lightning_overhead.py``: inside a real lm_lab run, alternate blocks of K
lm_lab optimizer steps with K steps of a plain PyTorch loop, and time each block.

    python train.py ... +callbacks.paired._target_=bench.paired_loop.PairedPlainLoop \
        +callbacks.paired.data=input.txt +callbacks.paired.block=50

The plain loop trains its own copy of the task's network (``copy.deepcopy`` at the start of
training) with lm_lab's optimizer settings (AdamW, decay on matrices only, the same ``fused``
choice; the LambdaLR schedule of ``configure_optimizers``), the Trainer's gradient clipping
(``clip_grad_norm_``) and its own random windows of the run's tokenized corpus (a private
generator: the run's RNG streams are left alone). Each pair is (lm_lab block, the plain block
right after it) a few seconds apart, so the machine's drift over tens of seconds cancels in the
ratio. Blocks of K steps should span whole logging periods (``log_every_n_steps``, the progress
line), so that each lm_lab block pays for the same share of them.
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
    def __init__(self, data: str, block: int = 50, warmup: int = 50, out: str = "pairs.json") -> None:
        self.text_file, self.block, self.warmup, self.out = data, block, warmup, out
        self.pairs: list[tuple[float, float]] = []  # (lm_lab seconds, plain seconds) per block of K steps
        self._t0: float | None = None
        self._start_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.net = copy.deepcopy(pl_module.net).train()
        params = [p for p in self.net.parameters() if p.requires_grad]
        o, s = pl_module.optim_cfg, pl_module.sched_cfg
        fused = o.fused if o.fused is not None else (pl_module.device.type == "cuda")
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
            self._t0, self._start_step = time.perf_counter(), step
            return
        if step - self._start_step < self.block:
            return
        lm_lab = time.perf_counter() - self._t0
        t = time.perf_counter()
        self.plain_steps(self.block)
        self.pairs.append((lm_lab, time.perf_counter() - t))  # (lm_lab, plain) seconds
        self._t0, self._start_step = time.perf_counter(), step

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.is_global_zero:
            with open(self.out, "w") as fh:
                json.dump({"block": self.block, "pairs": self.pairs}, fh)
