"""Seeded, rank-sharded samplers: a training sampler that resumes mid-epoch from a *global*
position, and an evaluation sampler that gives every sample to exactly one rank."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler, default_collate

PAD_INDEX = -1  # an evaluation slot with no sample behind it (see EvalSampler)


class ResumableSampler(Sampler[int]):
    """Yields this rank's share of one global order of ``range(n)``, shuffled by ``(seed, epoch)``.

    The global order is dealt out round-robin: rank ``r`` of ``W`` gets positions ``r, r+W, ...``.
    After every rank has drawn ``s`` samples, the samples drawn so far are exactly the first
    ``s * W`` of the global order, so the data position is one global count, whatever the number
    of processes. An epoch is cut to whole optimizer steps (``step_samples``, the global batch):
    every rank draws equally and, at the same global batch, every world size sees the same epoch.

    ``skip`` (global samples) are left out of the next epoch's iteration after ``load_state_dict``,
    so a resumed run sees exactly the samples the interrupted one had not yet trained on.
    """

    def __init__(
        self,
        n: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        with_replacement: int | None = None,
        step_samples: int | None = None,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.n, self.shuffle, self.seed = n, shuffle, seed
        # nanoGPT-style sampling: ``with_replacement`` uniform draws from range(n) per epoch.
        self.with_replacement = with_replacement
        self.rank, self.world_size = rank, world_size
        # Samples per optimizer step over all ranks: an epoch is a whole number of steps, the
        # same on any number of ranks, so no step gets a partial batch.
        self.step_samples = step_samples or world_size
        if self.step_samples % world_size:
            raise ValueError(f"step_samples={self.step_samples} is not a multiple of world_size={world_size}")
        self.epoch = 0
        self.skip = 0  # global samples of ``epoch`` already trained on

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def epoch_samples(self) -> int:
        """Samples per epoch over all ranks: whole optimizer steps (the rest is dropped)."""
        return (self.with_replacement or self.n) // self.step_samples * self.step_samples

    def global_order(self) -> torch.Tensor:
        """The epoch's order over all ranks, cut to whole optimizer steps."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.with_replacement is not None:
            idx = torch.randint(self.n, (self.with_replacement,), generator=g)
        else:
            idx = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        return idx[: self.epoch_samples]

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        yield from self.global_order()[skip + self.rank :: self.world_size].tolist()

    def __len__(self) -> int:
        # Constant, even while skipping: Lightning counts the resumed epoch's batches from its
        # own restored progress, so the loader's length must stay the full epoch's.
        return self.epoch_samples // self.world_size

    def state_dict(self, consumed_global: int) -> dict[str, int]:
        """The position after ``consumed_global`` samples of this epoch (all ranks together)."""
        return {
            "epoch": self.epoch,
            "consumed_global": consumed_global,
            "world_size": self.world_size,
            "seed": self.seed,
            "n": self.n,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("n") != self.n or state.get("seed") != self.seed:
            return
        self.epoch = int(state["epoch"])
        if "consumed_global" in state:
            self.skip = int(state["consumed_global"])
        else:  # checkpoints of lm_lab <= 0.1 stored a per-rank count (then always a single rank in effect)
            self.skip = int(state["consumed"]) * int(state.get("world_size", 1))


class EvalSampler(Sampler[int]):
    """Each sample of ``range(n)`` exactly once over all ranks, in a fixed seeded order.

    Rank ``r`` gets positions ``r, r+W, ...`` of the order, padded with ``PAD_INDEX`` so that
    every rank runs the same number of batches (collectives stay in step); a padded slot carries
    no targets (``EvalPadding``) and so weighs nothing in the token-weighted metrics. Fixed order,
    so a limited number of validation batches (``limit_val_batches``) is a spread-out sample of the
    split, the same one at every evaluation and, at the same global batch, on any number of ranks.
    """

    def __init__(self, n: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.per_rank = math.ceil(n / world_size)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        order += [PAD_INDEX] * (self.per_rank * self.world_size - self.n)
        yield from order[self.rank :: self.world_size]

    def __len__(self) -> int:
        return self.per_rank

    def set_epoch(self, epoch: int) -> None:  # the order never changes
        pass


IGNORED_TARGETS = ("labels", "next_sentence_label")


class EvalPadding(Dataset):
    """Wraps an evaluation dataset so that ``PAD_INDEX`` yields a placeholder example (a copy of
    example 0 marked ``_pad``); ``EvalPadding.collate`` sets its targets to -100 (ignored)."""

    def __init__(self, ds: Any, collate_fn: Any = None) -> None:
        self.ds = ds
        self.inner_collate = collate_fn or default_collate

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, keys: list[int]) -> list[dict[str, Any]]:
        real = [0 if k == PAD_INDEX else k for k in keys]
        items = self.ds.__getitems__(real) if hasattr(self.ds, "__getitems__") else [self.ds[k] for k in real]
        return [{**item, "_pad": k == PAD_INDEX} for item, k in zip(items, keys, strict=True)]

    def collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        pad = torch.tensor([bool(ex.pop("_pad", False)) for ex in examples])
        batch = self.inner_collate(examples)
        if bool(pad.any()):
            for key in IGNORED_TARGETS:
                if key in batch:
                    batch[key] = batch[key].clone()
                    batch[key][pad] = -100
        return batch
