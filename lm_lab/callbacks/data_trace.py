"""Record which samples each rank trains on (``debug=data_trace``).

One JSON line per training micro-batch in ``<dirpath>/rank<R>.jsonl``:
``{"step": optimizer steps done, "epoch": E, "ids": [...]}``. ``ids`` are dataset positions where
the batch carries them (``index``: packed blocks, BERT pairs) and otherwise a 64-bit hash of each
sequence's tokens (streamed blocks). Lets a researcher check what a distributed or resumed run
actually read: disjoint shards per rank, nothing skipped or repeated across a resume.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch


def sample_ids(batch: dict[str, Any]) -> list[Any]:
    """The identities of a batch's samples: their ``index`` or a hash of their ``input_ids``."""
    index = batch.get("index")
    if isinstance(index, torch.Tensor):
        return [int(i) for i in index.tolist()]
    rows = batch["input_ids"].cpu().numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=8).hexdigest() for row in rows]


class DataTrace(L.Callback):
    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self._file: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        # Appended to, so a resumed run adds its attempt to the same record.
        self._file = open(self.dirpath / f"rank{trainer.global_rank}.jsonl", "a")  # noqa: SIM115

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._file is None:
            return
        line = {"step": trainer.global_step, "epoch": trainer.current_epoch, "ids": sample_ids(batch)}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
