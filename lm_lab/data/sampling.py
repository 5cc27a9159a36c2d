"""A seeded, rank-sharded sampler that can resume in the middle of an epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Yields this rank's share of ``range(n)``, shuffled by ``(seed, epoch)`` if ``shuffle``.

    ``skip`` samples of the first epoch after ``load_state_dict`` are skipped, so a resumed
    run sees exactly the samples the interrupted one had not yet trained on. Every rank gets
    the same number of samples (the tail that does not divide evenly is dropped).
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
    ) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        # nanoGPT-style sampling: ``with_replacement`` uniform draws from range(n) per epoch.
        self.with_replacement = with_replacement
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.with_replacement is not None:
            per_rank = self.with_replacement // self.world_size
            return torch.randint(self.n, (per_rank * self.world_size,), generator=g)[self.rank :: self.world_size]
        idx = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        per_rank = self.n // self.world_size
        return idx[self.rank : per_rank * self.world_size : self.world_size]

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        yield from self.order()[skip:].tolist()

    def __len__(self) -> int:
        # Constant, even while skipping: Lightning counts the resumed epoch's batches from its
        # own restored progress, so the loader's length must stay the full epoch's.
        return (self.with_replacement or self.n) // self.world_size

    def state_dict(self, consumed: int) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": consumed, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("n") == self.n and state.get("seed") == self.seed:
            self.epoch = int(state["epoch"])
            self.skip = int(state["consumed"])
