"""Numeric precision: which ``trainer.precision`` presets run where, and TF32 matmuls on CUDA.

Presets (Lightning's names): ``32-true`` (also ``32``), ``bf16-mixed`` (autocast to bfloat16, fp32
weights), ``16-mixed`` (autocast to float16 with a gradient scaler: loss scaling), ``bf16-true``
(bfloat16 weights and activations). Attention goes through ``F.scaled_dot_product_attention``
without forcing a backend, so on CUDA PyTorch picks the flash or memory-efficient kernel by itself
for bf16/fp16 inputs (``lm_lab.models.layers.attention``, Llama's ``Attention``).
"""

from __future__ import annotations

import logging

import torch

from lm_lab.schema import ConfigError

log = logging.getLogger("lm_lab")

MATMUL_PRECISIONS = ("highest", "high", "medium")


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
