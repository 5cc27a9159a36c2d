"""Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) through Lightning's
``ModelParallelStrategy``, with the network's transformer blocks as the sharding unit, optional
activation checkpointing of the same blocks, and sharded checkpoints that are written atomically
and carry checksums.

``trainer=fsdp`` selects ``ShardedStrategy``; ``LMTask.configure_model`` calls ``shard_blocks``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

log = logging.getLogger("lm_lab")

META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint
CHECKSUM_FILE = "lm_lab_checksums.json"  # CRC-32 of every file of a sharded checkpoint


# ---------------------------------------------------------------------- the sharding unit


def shard_blocks(module: nn.Module, mesh: Any, block_types: tuple[type, ...]) -> int:
    """``fully_shard`` each module of ``block_types`` inside ``module``, then ``module`` itself (the
    embeddings, final norm and head: one more unit). Returns the number of blocks sharded.

    Each block's parameters are gathered just before its forward (and backward) and freed after,
    so at most about one block's full weights are materialized at a time; FSDP2 averages the
    gradients over ``mesh`` like DDP. Already sharded modules are left as they are (Lightning
    calls ``configure_model`` again for ``trainer.test``).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(module, FSDPModule):
        return 0
    blocks = [m for m in module.modules() if isinstance(m, block_types)]
    if not blocks:
        names = ", ".join(t.__name__ for t in block_types)
        raise ValueError(f"no {names} inside {type(module).__name__}: nothing to shard block by block")
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return len(blocks)


def checkpoint_activations(module: nn.Module, block_types: tuple[type, ...]) -> int:
    """Recompute each block's activations in the backward pass instead of storing them (torch's
    non-reentrant ``checkpoint_wrapper``). Saves activation memory for about one extra forward.

    The wrapper's state-dict hooks strip its ``_checkpoint_wrapped_module.`` prefix, so checkpoints,
    exports and resumes see the usual parameter names. Returns the number of blocks wrapped.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        CheckpointWrapper,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    count = sum(isinstance(m, block_types) for m in module.modules())
    if count and not any(isinstance(m, CheckpointWrapper) for m in module.modules()):
        apply_activation_checkpointing(
            module,
            checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda m: isinstance(m, block_types),
        )
    return count


# ---------------------------------------------------------------------- the strategy


class ShardedStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2) for data-parallel sharding only, with two changes.

    * ``data_parallel_size=None`` (the default) shards over every process of the job and sets
      ``tensor_parallel_size=1``. Lightning's ``"auto"`` puts only the nodes on the data-parallel
      axis and the devices of a node on the tensor-parallel one, which is tensor parallelism.
    * A sharded checkpoint (``save_distributed_checkpoint=True``, a directory of per-rank shards plus
      ``meta.pt``) is written into a temporary sibling directory and renamed into place once complete,
      with a CRC-32 of each of its files (``lm_lab_checksums.json``) that every reader checks
      (``lm_lab.training.checkpoints.read_checkpoint``). Lightning writes the shards into the final
      directory in place: a kill during the write leaves a directory that mixes two steps, and
      nothing detects a damaged shard (``torch.load`` does not check the zip CRCs, see NOTES.md).

    A full (single-file) checkpoint (``save_distributed_checkpoint=False``) goes through the
    CheckpointIO plugin, i.e. ``AtomicCheckpointIO`` and its weights checksum, as under DDP.
    """

    def __init__(self, data_parallel_size: int | str | None = None, tensor_parallel_size: int | str = 1, **kwargs: Any):
        super().__init__(
            data_parallel_size="auto" if data_parallel_size is None else data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            **kwargs,
        )
        self._all_data_parallel = data_parallel_size is None

    def setup_environment(self) -> None:
        if self._all_data_parallel:
            self._data_parallel_size = self.num_nodes * self.num_processes
            self._tensor_parallel_size = 1
        super().setup_environment()

    @property
    def sharded_checkpoints(self) -> bool:
        return self._save_distributed_checkpoint

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint or "://" in str(filepath):
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}.tmp-{self.broadcast(os.getpid())}")
        if self.global_rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()  # every rank's shard is on disk
        if self.global_rank == 0:
            write_checksums(tmp)
            replace_dir(tmp, path)
        self.barrier()
        return None


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_checksums(directory: Path) -> None:
    """``lm_lab_checksums.json``: the CRC-32 of every other file of ``directory``; files fsynced."""
    sums = {p.name: file_crc32(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != CHECKSUM_FILE}
    (directory / CHECKSUM_FILE).write_text(json.dumps({"crc32": sums}, indent=1))
    for p in directory.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def verify_checksums(directory: Path) -> str | None:
    """The first file of a sharded checkpoint that is missing or differs from its CRC-32, else None."""
    sums = json.loads((directory / CHECKSUM_FILE).read_text())["crc32"]
    for name, crc in sorted(sums.items()):
        p = directory / name
        if not p.is_file() or file_crc32(p) != crc:
            return name
    return None


def replace_dir(new: Path, path: Path) -> None:
    """Put directory ``new`` at ``path``: the old one (file or directory) is moved aside, the new one
    renamed into place, the old one removed. A reader sees the old or the new checkpoint (or, for
    the instant between the two renames, none, and ``ckpt_path=last`` falls back to an older one)."""
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.is_dir() and not path.is_symlink():
        os.replace(path, old)
    elif path.exists() or path.is_symlink():
        path.unlink()
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def is_sharded_checkpoint(path: Path) -> bool:
    """A directory written by ``ShardedStrategy`` (or Lightning's own sharded save: ``meta.pt``)."""
    return path.is_dir() and (path / META_FILE).is_file()


def read_sharded(path: Path) -> dict[str, Any]:
    """A sharded checkpoint as one dict like a single-file one: ``meta.pt`` (loaded with
    ``weights_only=True``) plus the full ``state_dict`` consolidated from the shards on CPU (Lightning's
    ``consolidate_checkpoint`` loader; no process group needed). The optimizer shards are not read."""
    from lightning.fabric.utilities.load import _METADATA_FILENAME
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    assert _METADATA_FILENAME == META_FILE
    meta = torch.load(path / META_FILE, map_location="cpu", weights_only=True)
    loaded: dict[str, Any] = {}
    _load_state_dict(
        loaded,
        storage_reader=FileSystemReader(path),
        planner=_EmptyStateDictLoadPlanner(keys={"state_dict"}),
        no_dist=True,
    )
    return {**meta, "state_dict": loaded["state_dict"]}
