"""Throughput on every run: ``tokens_per_sec``, achieved ``flops_per_sec``, ``mfu`` and ``peak_memory_mib``.

Logged to every logger each ``window`` optimizer steps, and summed up in one console line when
training ends, e.g. ``throughput: 12,345 tokens/s, 1.2 GFLOP/s, MFU 0.7% of 166 GFLOP/s/device,
peak memory 812 MiB (RSS)``.

* FLOPs per token come from the task (``flops_per_token``: PaLM's 6N + 12·L·H·Q·T at the training
  block size T for decoders; the encoder plus the heads as computed for BERT).
* Peak FLOP/s of one device: ``peak_flops`` when set (the override), else on GPU Lightning's table
  (``get_available_flops`` for the compute dtype of ``trainer.precision``) or, for names that table
  does not parse (a plain "NVIDIA H200"), ``PEAK_FLOPS``; on CPU ``cpu_peak_flops`` (the fp32 peak),
  times ``cpu_bf16_ratio`` for a run that computes in bf16.
  ``mfu = flops_per_sec / (peak x world_size)``.
* Peak memory of this process (rank 0 is what loggers receive): ``torch.cuda.max_memory_allocated``
  on GPU, the peak resident set size (``getrusage``) on CPU.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
import warnings
from typing import Any

import lightning as L
import torch

log = logging.getLogger("lm_lab")

# Dense bf16/fp16 peak FLOP/s, used only where Lightning's table has no entry for the name the
# driver reports: that table lists the H200 only as "h200 sxm1" / "h200 nvl1", so a device named
# plainly "NVIDIA H200" gets None there. Not used for float32 (the TF32/FP32 peaks differ).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "4090": 165e12}


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak FLOP/s of one CUDA ``device`` for ``dtype``: Lightning's table, then ``PEAK_FLOPS`` (16-bit only)."""
    if device.type != "cuda":
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "FLOPs not found for ...": the fallback below answers
        known = get_available_flops(device, dtype)
    if known:
        return float(known)
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes, kind): the peak memory of this process so far, allocated on a GPU or resident on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "RSS"  # Linux reports KiB, macOS bytes


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:,.3g} {prefix}{unit}"
    return f"{value:,.3g} {unit}"


class Throughput(L.Callback):
    """Logs ``tokens_per_sec``, ``flops_per_sec``, ``mfu`` and ``peak_memory_mib`` every ``window`` optimizer steps.

    ``peak_flops``: FLOP/s of one device, overriding the table (e.g. another precision, an unlisted
    GPU). ``cpu_peak_flops``: the fp32 peak of a CPU process (None: no ``mfu`` on CPU);
    ``cpu_bf16_ratio``: its bf16 peak over that, used when the run computes in bf16 (``bf16-mixed``,
    ``bf16-true``): 2 on AVX512-BF16 (one 512-bit ``vdpbf16ps`` does 32 bf16 multiply-adds where an fp32
    FMA does 16), more with AMX. Against the fp32 peak a bf16 run's MFU was twice what it is: the
    nanoGPT CPU recipe read "MFU 71%" while its bf16 matmuls alone ran above that fp32 peak.

    Not Lightning's ``ThroughputMonitor``: that one calls ``torch.cuda.synchronize()`` after every
    micro-batch (a host stall on the step path), counts items through a ``length_fn`` evaluated on
    the host for each batch, and expects a constant ``flops_per_batch``; here the count is the
    task's ``tokens_seen`` (real tokens, already reduced over ranks once per optimizer step, padding
    excluded), read only every ``window`` steps, as is ``flops_per_token`` (BERT's varies with the
    masked fraction). The peak FLOP/s does come from Lightning's table (``peak_flops``).
    """

    def __init__(
        self,
        window: int = 10,
        peak_flops: float | None = None,
        cpu_peak_flops: float | None = None,
        cpu_bf16_ratio: float = 2.0,
    ) -> None:
        if window < 1:
            raise ValueError(f"callbacks.throughput.window={window} must be >= 1")
        for name, value in (("peak_flops", peak_flops), ("cpu_peak_flops", cpu_peak_flops)):
            if value is not None and value <= 0:
                raise ValueError(f"callbacks.throughput.{name}={value} must be > 0 FLOP/s (or null)")
        if not cpu_bf16_ratio > 0:
            raise ValueError(
                f"callbacks.throughput.cpu_bf16_ratio={cpu_bf16_ratio} must be > 0 (bf16 peak / fp32 peak)"
            )
        self.window = window
        self.peak_override = peak_flops
        self.cpu_peak_flops = cpu_peak_flops
        self.cpu_bf16_ratio = cpu_bf16_ratio
        self._t0: float | None = None
        self._tokens0 = 0
        self._steps = 0
        self._timed_tokens = 0  # totals over the timed windows, for the end-of-fit line
        self._timed_seconds = 0.0
        self.summary: dict[str, float] = {}

    def device_peak(self, trainer: L.Trainer, device: torch.device) -> float | None:
        """Peak FLOP/s of one device for this run (the override, the GPU table, or the CPU setting)."""
        if self.peak_override is not None:
            return float(self.peak_override)
        from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

        dtype = _plugin_to_compute_dtype(trainer.precision_plugin)
        if device.type == "cpu":
            if self.cpu_peak_flops is None:
                return None
            return self.cpu_peak_flops * (self.cpu_bf16_ratio if dtype == torch.bfloat16 else 1.0)
        return peak_flops(device, dtype)

    def metrics(self, trainer: L.Trainer, pl_module: Any, tokens: float, seconds: float) -> dict[str, float]:
        """The logged values for ``tokens`` trained in ``seconds`` (all ranks together)."""
        rate = tokens / max(seconds, 1e-9)
        out = {"tokens_per_sec": rate}
        flops_per_token = getattr(pl_module, "flops_per_token", None)
        if flops_per_token:
            out["flops_per_sec"] = rate * flops_per_token
            peak = self.device_peak(trainer, pl_module.device)
            if peak:
                out["mfu"] = out["flops_per_sec"] / (peak * trainer.world_size)
        out["peak_memory_mib"] = peak_memory_bytes(pl_module.device)[0] / 2**20
        return out

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._t0 is None:
            # The first step (or the first after a validation) pays for start-up: time from its end.
            self._t0, self._tokens0, self._steps = time.perf_counter(), int(pl_module.tokens_seen), trainer.global_step
            return
        if trainer.global_step - self._steps >= self.window:
            self._close_window(trainer, pl_module, log_metrics=True)

    def _close_window(self, trainer: L.Trainer, pl_module: Any, log_metrics: bool) -> None:
        now, tokens = time.perf_counter(), int(pl_module.tokens_seen)  # one host read per window
        if self._t0 is not None and trainer.global_step > self._steps:
            self._timed_tokens += tokens - self._tokens0
            self._timed_seconds += now - self._t0
            if log_metrics:
                pl_module.log_dict(self.metrics(trainer, pl_module, tokens - self._tokens0, now - self._t0))
        self._t0, self._tokens0, self._steps = now, tokens, trainer.global_step

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.state.fn == "fit" and self._t0 is not None:
            self._close_window(trainer, pl_module, log_metrics=False)  # count the steps before it
        self._t0 = None  # do not count validation time as training time

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._close_window(trainer, pl_module, log_metrics=False)
        if self._timed_seconds <= 0:
            return
        self.summary = self.metrics(trainer, pl_module, self._timed_tokens, self._timed_seconds)
        if trainer.is_global_zero:
            log.info(self.describe(trainer, pl_module))

    def describe(self, trainer: L.Trainer, pl_module: Any) -> str:
        """The end-of-fit console line from ``summary``."""
        s = self.summary
        parts = [f"{s['tokens_per_sec']:,.0f} tokens/s"]
        if "flops_per_sec" in s:
            parts.append(_si(s["flops_per_sec"], "FLOP/s"))
        if "mfu" in s:
            peak = self.device_peak(trainer, pl_module.device) or 0.0
            parts.append(f"MFU {100 * s['mfu']:.1f}% of {_si(peak, 'FLOP/s')}/device")
        kind = peak_memory_bytes(pl_module.device)[1]
        parts.append(f"peak memory {s['peak_memory_mib']:,.0f} MiB ({kind})")
        return "throughput: " + ", ".join(parts)
