"""How many processes a run will have, known before the Trainer is built, so that the micro-batch
size and gradient accumulation are derived once and passed to the Trainer's constructor."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lm_lab.schema import ConfigError


def planned_world_size(trainer_cfg: Mapping[str, Any]) -> int:
    """``num_nodes`` x the devices per node that Lightning will use for ``trainer.accelerator`` /
    ``trainer.devices``, parsed by the accelerator's own ``parse_devices`` / ``auto_device_count``.

    ``train.py`` checks the built Trainer's ``world_size`` against it.
    """
    from lightning.pytorch.accelerators import AcceleratorRegistry, CUDAAccelerator, MPSAccelerator

    accelerator = trainer_cfg.get("accelerator", "auto") or "auto"
    devices = trainer_cfg.get("devices", "auto")
    nodes = trainer_cfg.get("num_nodes", 1) or 1
    if not isinstance(accelerator, str):  # an Accelerator instance
        cls = type(accelerator)
    else:
        name = accelerator.lower()
        if name in ("auto", "gpu"):
            name = "cuda" if CUDAAccelerator.is_available() else "mps" if MPSAccelerator.is_available() else "cpu"
            if accelerator == "gpu" and name == "cpu":
                raise ConfigError(
                    "trainer.accelerator=gpu but this machine has no GPU: use trainer=cpu (or trainer.accelerator=cpu)"
                )
        if name not in AcceleratorRegistry:
            raise ConfigError(f"trainer.accelerator={accelerator!r} is unknown: use auto, cpu, gpu, cuda or mps")
        cls = AcceleratorRegistry[name]["accelerator"]
    if devices in ("auto", None):
        per_node = cls.auto_device_count()
    else:
        try:
            parsed = cls.parse_devices(devices)
        except Exception as e:  # Lightning's MisconfigurationException: its message names the problem
            raise ConfigError(f"trainer.devices={devices!r}: {e}") from None
        per_node = len(parsed) if isinstance(parsed, (list, tuple)) else int(parsed)
    return int(nodes) * per_node


def planned_on_gpu(trainer_cfg: Mapping[str, Any]) -> bool:
    """Whether ``trainer.accelerator`` will run on CUDA GPUs (``auto`` takes one when there is one)."""
    import torch

    accelerator = trainer_cfg.get("accelerator", "auto") or "auto"
    if not isinstance(accelerator, str):
        return type(accelerator).__name__ == "CUDAAccelerator"
    return accelerator.lower() in ("auto", "gpu", "cuda") and torch.cuda.is_available()
