"""Streaming corpora (``data.streaming=true``): tokenize and pack on the fly.

For corpora too large for the disk or RAM: documents are read lazily from a
``datasets.IterableDataset``, tokenized in batches, and packed into blocks of
``block_size + 1`` tokens as they arrive. Ranks read disjoint shards
(``split_dataset_by_node``). The held-out validation documents are small and kept in memory.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from lm_lab.data.tokenizer import eot_id


class StreamingBlocks(IterableDataset):
    """Packed blocks from a document stream, resumable mid-pass.

    ``state_dict(consumed)`` is the resume point after ``consumed`` blocks of the current pass.
    It holds an *anchor*: the source's own ``state_dict()`` taken between two encode batches plus
    the few tokens carried over, so a resume re-reads at most one encode batch. The stream is read
    in the main process (``num_workers=0``): DataLoader workers would keep their anchors to
    themselves, and ``datasets`` shards a stream across workers by its files, not by batches.
    """

    def __init__(
        self,
        source: Any,
        tok: Tokenizer,
        block_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        encode_batch: int = 64,
    ) -> None:
        if world_size > 1:
            from datasets.distributed import split_dataset_by_node  # here: importing datasets costs ~0.5 s

            source = split_dataset_by_node(source, rank=rank, world_size=world_size)
        self.source = source
        self.tok_json = tok.to_str()
        self.block_size = block_size
        self.encode_batch = encode_batch
        self._resume: dict[str, Any] | None = None
        # (blocks yielded before, source state or None for "from the start", carried tokens), oldest first
        self._anchors: deque[tuple[int, Any, list[int]]] = deque()

    def has_blocks(self, n: int) -> bool:
        """Whether this rank's stream holds at least ``n`` blocks (reads only as far as it needs)."""
        tok = Tokenizer.from_str(self.tok_json)
        eot = eot_id(tok)
        need = n * self.block_size + 1
        self.source.load_state_dict(None)  # from the start, whatever was loaded before
        have = 0
        for row in self.source:
            have += len(tok.encode(row["text"] or "", add_special_tokens=False).ids) + (eot is not None)
            if have >= need:
                return True
        return False

    # ------------------------------------------------------------------ resume
    def state_dict(self, consumed: int) -> dict[str, Any]:
        state: dict[str, Any] = {"blocks": consumed}
        anchor = None
        for a in self._anchors:
            if a[0] > consumed:
                break
            anchor = a
        if anchor is not None:
            state.update(anchor_blocks=anchor[0], source=anchor[1], carry=list(anchor[2]))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)

    def mark_consumed(self, consumed: int) -> None:
        """Forget anchors no resume point can need any more (``consumed`` only grows within a pass)."""
        while len(self._anchors) > 1 and self._anchors[1][0] <= consumed:
            self._anchors.popleft()

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        resume, self._resume = self._resume, None
        tok = Tokenizer.from_str(self.tok_json)
        eot = eot_id(tok)
        tail = [eot] if eot is not None else []
        if get_worker_info() is not None:
            raise RuntimeError("StreamingBlocks is read in the main process (num_workers=0), so it can resume mid-pass")
        buf: list[int] = []
        produced, skip = 0, 0
        source_state = None
        if resume:
            skip = int(resume["blocks"])
            if "source" in resume:  # from the anchor: re-read at most one encode batch
                source_state, buf, produced = resume["source"], list(resume["carry"]), int(resume["anchor_blocks"])
                skip -= produced
        source = self.source
        # A loaded state stays in force for later passes too: reset it (None = from the start).
        source.load_state_dict(source_state)
        self._anchors = deque([(produced, source_state, list(buf))])
        need = self.block_size + 1
        texts: list[str] = []

        def blocks() -> Iterator[dict[str, torch.Tensor]]:
            while len(buf) >= need:
                chunk = torch.tensor(buf[:need], dtype=torch.long)
                del buf[: self.block_size]  # the last token starts the next block
                yield {"input_ids": chunk[:-1], "labels": chunk[1:]}

        def encode() -> None:
            for enc in tok.encode_batch(texts, add_special_tokens=False):
                buf.extend(enc.ids + tail)
            texts.clear()

        for row in source:
            texts.append(row["text"] or "")
            if len(texts) < self.encode_batch:
                continue
            encode()
            for block in blocks():
                produced += 1
                if skip > 0:
                    skip -= 1
                    continue
                yield block
            # Between encode batches: a cheap resume point.
            self._anchors.append((produced, copy.deepcopy(source.state_dict()), list(buf)))
        if texts:  # the stream's last, partial encode batch
            encode()
            for block in blocks():
                if skip > 0:
                    skip -= 1
                    continue
                yield block


class InMemoryBlocks(Dataset):
    def __init__(self, tokens: np.ndarray, block_size: int) -> None:
        self.tokens, self.block_size, self.n_tokens = tokens, block_size, len(tokens)

    def __len__(self) -> int:
        return max(0, (self.n_tokens - 1) // self.block_size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        chunk = torch.from_numpy(self.tokens[i * self.block_size : (i + 1) * self.block_size + 1].astype(np.int64))
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}


def materialize_blocks(source: Any, tok: Tokenizer, block_size: int) -> InMemoryBlocks:
    eot = eot_id(tok)
    tail = [eot] if eot is not None else []
    ids: list[int] = []
    texts = [row["text"] or "" for row in source]
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids + tail)
    return InMemoryBlocks(np.asarray(ids, dtype=np.int64), block_size)
