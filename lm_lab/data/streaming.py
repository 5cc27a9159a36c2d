"""Streaming corpora (``data.streaming=true``): tokenize and pack on the fly.

For corpora too large for the disk or RAM: documents are read lazily from a
``datasets.IterableDataset``, tokenized in batches, and packed into blocks of
``block_size + 1`` tokens as they arrive. Ranks read disjoint shards
(``split_dataset_by_node``). The held-out validation documents are small and kept in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from tokenizers import Tokenizer
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from lm_lab.data.tokenizer import eot_id


class StreamingBlocks(IterableDataset):
    def __init__(self, source: Any, tok: Tokenizer, block_size: int, *, rank: int = 0, world_size: int = 1,
                 encode_batch: int = 64) -> None:
        self.source = split_dataset_by_node(source, rank=rank, world_size=world_size) if world_size > 1 else source
        self.tok_json = tok.to_str()
        self.block_size = block_size
        self.encode_batch = encode_batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        tok = Tokenizer.from_str(self.tok_json)
        eot = eot_id(tok)
        tail = [eot] if eot is not None else []
        info = get_worker_info()
        buf: list[int] = []
        texts: list[str] = []
        need = self.block_size + 1
        for i, row in enumerate(self.source):
            if info is not None and i % info.num_workers != info.id:
                continue
            texts.append(row["text"] or "")
            if len(texts) < self.encode_batch:
                continue
            for enc in tok.encode_batch(texts, add_special_tokens=False):
                buf.extend(enc.ids + tail)
            texts = []
            while len(buf) >= need:
                chunk = torch.tensor(buf[:need], dtype=torch.long)
                del buf[: self.block_size]  # the last token starts the next block
                yield {"input_ids": chunk[:-1], "labels": chunk[1:]}


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
