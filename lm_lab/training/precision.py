"""Numeric precision: which ``trainer.precision`` presets run where, and TF32 matmuls on CUDA.

Presets (Lightning's names): ``32-true`` (also ``32``), ``bf16-mixed`` (autocast to bfloat16, fp32
weights), ``16-mixed`` (autocast to float16 with a gradient scaler: loss scaling), ``bf16-true``
(bfloat16 weights and activations); and lm_lab's ``auto``: ``bf16-mixed`` where the hardware runs
bfloat16 matmuls natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX), ``32-true``
elsewhere (``resolve_precision``). Attention goes through ``F.scaled_dot_product_attention``
without forcing a backend, so on CUDA PyTorch picks the flash or memory-efficient kernel by itself
for bf16/fp16 inputs (``lm_lab.models.layers.attention``, Llama's ``Attention``).
"""

from __future__ import annotations

import logging

import torch

from lm_lab.schema import ConfigError

log = logging.getLogger("lm_lab")

MATMUL_PRECISIONS = ("highest", "high", "medium")
# /proc/cpuinfo flags of CPUs with bfloat16 dot products in hardware (x86: AVX512-BF16, AMX; Arm: BF16).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 dot products in hardware (oneDNN's bf16 matmuls then run at
    ~2x the fp32 rate; without it they are emulated and slower than fp32). False where unknown."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith(("flags", "features")):
                    return any(flag in line.split() for flag in NATIVE_BF16_FLAGS)
    except OSError:
        pass
    return False


def resolve_precision(precision: object, on_gpu: bool) -> object:
    """``trainer.precision=auto`` -> ``bf16-mixed`` where bfloat16 runs natively (a CUDA GPU that supports
    it; a CPU with AVX512-BF16 / AMX / Arm BF16), else ``32-true``; any other value is returned as is.

    On this project's 2-core AVX512-BF16 CPUs a ``bf16-mixed`` step of nanoGPT's Tiny Shakespeare recipe
    takes 0.68x the fp32 step, at the same validation loss (``docs/benchmarks.md``)."""
    if str(precision) != "auto":
        return precision
    native = torch.cuda.is_bf16_supported() if on_gpu else cpu_has_native_bf16()
    chosen = "bf16-mixed" if native else "32-true"
    where = "GPU" if on_gpu else "CPU"
    log.info("trainer.precision=auto: %s (%s %s native bfloat16)", chosen, where, "has" if native else "lacks")
    return chosen


def check_precision(precision: object, on_gpu: bool, sharded: bool = False) -> None:
    """Refuse ``16-mixed`` without a GPU: Lightning 2.6 cannot run fp16 AMP on CPU and would silently
    train in ``bf16-mixed`` instead (a warning), i.e. not the run that was asked for. Under
    ``trainer=fsdp`` (``sharded``) Lightning's ``ModelParallelStrategy`` has no fp16 loss scaling and
    raises a ``ValueError``; here that is one line naming the precisions it runs."""
    if str(precision) in ("16-mixed", "16") and sharded:
        raise ConfigError(
            f"trainer=fsdp cannot run trainer.precision={precision} (Lightning's ModelParallelStrategy has no "
            "fp16 loss scaling): use trainer.precision=bf16-mixed, bf16-true or 32-true"
        )
    if str(precision) in ("16-mixed", "16") and not on_gpu:
        raise ConfigError(
            f"trainer.precision={precision} (float16 with loss scaling) needs a GPU: on CPU use "
            "trainer.precision=bf16-mixed or 32-true"
        )


def set_matmul_precision(value: object, on_cuda: bool) -> None:
    """``torch.set_float32_matmul_precision(value)`` on CUDA ("high": TF32 on GPUs that have it).

    Process-wide; on CPU nothing is changed (the setting would only select bf16 matmul passes there)."""
    if value not in MATMUL_PRECISIONS:
        raise ConfigError(f"matmul_precision={value!r} must be one of {', '.join(MATMUL_PRECISIONS)}")
    if on_cuda:
        torch.set_float32_matmul_precision(str(value))
        log.info("float32 matmul precision: %s (TF32 where the GPU has it unless 'highest')", value)
