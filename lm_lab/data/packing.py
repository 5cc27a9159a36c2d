"""Tokenize a corpus once into a flat token file, then serve fixed-length blocks from it.

Documents are tokenized with ``datasets.map(batched=True, num_proc=...)``, each followed by the
end-of-text token, and concatenated into one ``uint16``/``uint32`` array on disk (nanoGPT's
``train.bin``). Blocks are views into a memory map, so memory stays flat for corpora larger
than RAM and there is no padding: block ``i`` is tokens ``[i*T, i*T + T + 1)`` (inputs plus the
one-token-shifted targets).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tokenizers import Tokenizer
from torch.utils.data import Dataset

from lm_lab.data.tokenizer import CharEncoder, is_char_level


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def tokenize_dataset(ds: Any, tok: Tokenizer, *, eot: int | None, num_proc: int | None = None) -> Any:
    """Add an ``ids`` column (token ids, EOT appended) and drop the text."""
    tok_json = tok.to_str()
    by_chars = is_char_level(tok)  # a character-level vocabulary: encoded by a lookup table (CharEncoder)

    def encode(batch: dict[str, list[str]]) -> dict[str, list[Any]]:
        texts = [s or "" for s in batch["text"]]
        tail = [eot] if eot is not None else []
        if not by_chars:
            encodings = _tokenizer_from_json(tok_json).encode_batch(texts, add_special_tokens=False)
            return {"ids": [e.ids + tail for e in encodings]}
        chars = _char_encoder(tok_json)
        return {"ids": [np.concatenate([chars(text), np.asarray(tail, dtype=np.int64)]) for text in texts]}

    kwargs: dict[str, Any] = {"batched": True, "remove_columns": ["text"]}
    if num_proc and num_proc > 1 and len(ds) >= num_proc:
        kwargs["num_proc"] = num_proc
    return ds.map(encode, desc="tokenizing", **kwargs)


_TOK_CACHE: dict[str, Tokenizer] = {}
_CHAR_CACHE: dict[str, CharEncoder] = {}


def _tokenizer_from_json(s: str) -> Tokenizer:
    # One Tokenizer per process (map's workers included), rebuilt from JSON so it pickles cheaply.
    key = str(hash(s))
    if key not in _TOK_CACHE:
        _TOK_CACHE[key] = Tokenizer.from_str(s)
    return _TOK_CACHE[key]


def _char_encoder(s: str) -> CharEncoder:
    key = str(hash(s))
    if key not in _CHAR_CACHE:
        _CHAR_CACHE[key] = CharEncoder(_tokenizer_from_json(s))
    return _CHAR_CACHE[key]


def write_tokens(ds: Any, path: Path, dtype: np.dtype) -> int:
    """Write the ``ids`` column of a tokenized dataset as one flat array; returns its length."""
    column = ds.data.column("ids") if hasattr(ds, "data") else pa.chunked_array([])
    total = sum(len(chunk.flatten()) for chunk in column.chunks)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(total,))
    if hasattr(os, "posix_fallocate"):
        # Reserve the space now: a full disk then raises ENOSPC here, where writing through the
        # memory map would kill the process with SIGBUS.
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    pos = 0
    for chunk in column.chunks:
        values = chunk.flatten().to_numpy(zero_copy_only=False)
        arr[pos : pos + len(values)] = values
        pos += len(values)
    arr.flush()
    del arr
    return total


class PackedBlocks(Dataset):
    """Fixed blocks of ``block_size + 1`` tokens from a flat token file (memory-mapped).

    ``__getitem__`` returns ``{"input_ids": (T,), "labels": (T,), "index": i}`` with labels shifted
    by one (``index`` lets a run record which samples it trained on: ``debug=data_trace``).
    With ``windows=True`` the index is a token offset instead (any of ``n_windows`` starts), for
    nanoGPT's sampling of random windows.
    """

    def __init__(self, path: str | Path, block_size: int, windows: bool = False) -> None:
        self.path = str(path)
        self.block_size = block_size
        self.windows = windows
        self._tokens: np.ndarray | None = None
        self.n_tokens = int(np.load(self.path, mmap_mode="r").shape[0])

    @property
    def tokens(self) -> np.ndarray:
        # Opened lazily so DataLoader workers each map the file themselves.
        if self._tokens is None:
            self._tokens = np.load(self.path, mmap_mode="r")
        return self._tokens

    def __len__(self) -> int:
        return max(0, (self.n_tokens - 1) // self.block_size)

    @property
    def n_windows(self) -> int:
        return max(0, self.n_tokens - self.block_size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = i if self.windows else i * self.block_size
        chunk = torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))
        return {"input_ids": chunk[:-1], "labels": chunk[1:], "index": i}

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A batch's samples from one gather (the DataLoader's batched fetch): the same samples as
        ``__getitem__`` gives one by one, without a memory-map slice and a conversion per sample."""
        starts = np.asarray(indices, dtype=np.int64)
        if not self.windows:
            starts = starts * self.block_size
        rows = torch.from_numpy(self.tokens[starts[:, None] + np.arange(self.block_size + 1)].astype(np.int64))
        return [{"input_ids": row[:-1], "labels": row[1:], "index": i} for row, i in zip(rows, indices, strict=True)]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None}
