"""Tokens per second (and model FLOPs utilisation on known GPUs), logged as ``tokens_per_sec``."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

# Dense bf16 peak FLOP/s, used only where Lightning's table (``get_available_flops``) has no entry for
# the name the driver reports: that table lists the H200 only as "h200 sxm1" / "h200 nvl1", so a
# device named plainly "NVIDIA H200" gets None (and a warning) there.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "4090": 165e12}


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak FLOP/s of one ``device`` for ``dtype``: Lightning's table first, then ``PEAK_FLOPS`` (bf16)."""
    if device.type != "cuda":
        return None
    import warnings

    from lightning.fabric.utilities.throughput import get_available_flops

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "FLOPs not found for ...": the fallback below answers
        known = get_available_flops(device, dtype)
    if known:
        return float(known)
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class Throughput(L.Callback):
    """Logs ``tokens_per_sec`` averaged over the last ``window`` optimizer steps (and ``mfu``).

    Not Lightning's ``ThroughputMonitor``: that one calls ``torch.cuda.synchronize()`` after every
    micro-batch (a host stall on the step path), counts items through a ``length_fn`` evaluated on
    the host for each batch, and expects a constant ``flops_per_batch``; here the count is the
    task's ``tokens_seen`` (real tokens, already reduced over ranks once per optimizer step, padding
    excluded), read every ``window`` steps, with the FLOPs per token of the training block size.
    The peak FLOP/s does come from Lightning's table (``peak_flops``).
    """

    def __init__(self, window: int = 10) -> None:
        self.window = window
        self._t0: float | None = None
        self._tokens0 = 0
        self._steps = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        tokens = int(pl_module.tokens_seen)
        if self._t0 is None:
            self._t0, self._tokens0, self._steps = now, tokens, trainer.global_step
            return
        steps = trainer.global_step - self._steps
        if steps >= self.window:
            rate = (tokens - self._tokens0) / max(now - self._t0, 1e-9)
            metrics = {"tokens_per_sec": rate}
            peak = peak_flops(pl_module.device, pl_module.dtype if pl_module.dtype != torch.float32 else torch.bfloat16)
            flops_per_token = getattr(pl_module, "flops_per_token", None)
            if peak and flops_per_token:
                metrics["mfu"] = rate * flops_per_token / (peak * trainer.world_size)
            pl_module.log_dict(metrics, prog_bar=False)
            self._t0, self._tokens0, self._steps = now, tokens, trainer.global_step

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._t0 = None  # do not count validation time as training time
