"""Every process of a job resumes from the same checkpoint, or none does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from lm_lab.errors import CheckpointError


class SameResumePoint(L.Callback):
    """Refuse a job whose processes resolved different checkpoints (``ckpt_path=last``).

    Each process resolves ``ckpt_path`` itself. When the nodes of a job do not share the run
    directory's file system, ``ckpt_path=last`` finds the checkpoint on node 0 only: the others
    would start from step 0 with a fresh optimizer, schedule and data position while node 0
    resumes (DDP broadcasts only the weights), and the job would hang or train on garbage. One
    ``all_gather_object`` in ``setup``, where the process group exists.
    """

    def __init__(self, ckpt_path: Path | None) -> None:
        self.mine = None if ckpt_path is None else (ckpt_path.name, ckpt_path.stat().st_size)

    def setup(self, trainer: L.Trainer, pl_module: Any, stage: str) -> None:
        import torch.distributed as dist

        if stage != "fit" or trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return
        seen: list[Any] = [None] * trainer.world_size
        dist.all_gather_object(seen, self.mine)
        if len(set(seen)) > 1:
            shown = ", ".join(f"rank {r}: {s[0] if s else 'none'}" for r, s in enumerate(seen))
            raise CheckpointError(
                f"the processes of this job found different checkpoints to resume from ({shown}): every node "
                "reads the checkpoint itself, so hydra.run.dir must be on a file system that all nodes share"
            )
