"""The ``data`` config group as a typed dataclass."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

from lm_lab.config import ConfigBase, ConfigError

DataFiles = str | list[str] | dict[str, Any] | None


@dataclass
class DataConfig(ConfigBase):
    """Where the text comes from, how it is tokenized, and how batches are built.

    ``path``, ``name``, ``data_files`` and ``split`` mean what they mean for
    ``datasets.load_dataset``; ``path="pydocs"`` is the built-in offline corpus and
    ``path=None`` with ``data_files`` infers the loader (text/json/csv/parquet) from the extension.
    """

    _section: typing.ClassVar[str] = "data"
    path: str | None = "pydocs"
    name: str | None = None
    data_files: DataFiles = None
    text_column: str = "text"
    split: str = "train"
    val_split: str | None = "validation"
    val_fraction: float = 0.1
    # What one document is: a whole file / paragraph / line of a .txt file; for datasets of rows
    # (JSON, Parquet, the Hub): document|line = a row, paragraph = rows up to a blank row,
    # article = rows from one top-level " = Title = " heading to the next (WikiText).
    sample_by: Literal["document", "paragraph", "line", "article"] = "document"
    streaming: bool = False
    streaming_val_docs: int = 200
    tokenizer: str = "auto"
    vocab_size: int = 8192
    tokenizer_train_docs: int | None = None
    lowercase: bool = True
    strip_accents: bool | None = None
    block_size: int = 256
    # blocks: each epoch visits every fixed block once, shuffled. windows: nanoGPT's sampling,
    # windows at uniformly random token offsets (as many per epoch as there are blocks).
    sampling: Literal["blocks", "windows"] = "blocks"
    batch_size: int = 32
    micro_batch_size: int | None = None
    num_workers: int = 0
    num_proc: int | None = None
    cache_dir: str = ".cache/lm_lab"
    # BERT (masked LM) only
    pair_objective: Literal["nsp", "sop", "none"] = "nsp"
    mlm_probability: float = 0.15
    max_predictions: int | None = None
    whole_word_masking: bool = False
    # ALBERT's n-gram masking: spans of up to max_ngram consecutive tokens (words, with
    # whole_word_masking), n drawn with probability ~ 1/n; 1 = BERT's single tokens.
    max_ngram: int = 1
    short_seq_prob: float = 0.1
    dupe_factor: int = 1

    def validate(self) -> None:
        self.require(self.block_size >= 2, f"data.block_size={self.block_size} must be >= 2")
        self.require(self.batch_size > 0, f"data.batch_size={self.batch_size} must be > 0")
        self.require(
            self.micro_batch_size is None or self.micro_batch_size > 0,
            f"data.micro_batch_size={self.micro_batch_size} must be > 0 (or null)",
        )
        self.require(0.0 < self.val_fraction < 1.0, f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        self.require(self.vocab_size >= 2, f"data.vocab_size={self.vocab_size} must be >= 2")
        self.require(0.0 < self.mlm_probability < 1.0, f"data.mlm_probability={self.mlm_probability} must be in (0, 1)")
        self.require(self.max_ngram >= 1, f"data.max_ngram={self.max_ngram} must be >= 1 (ALBERT used 3)")
        self.require(self.num_workers >= 0, f"data.num_workers={self.num_workers} must be >= 0")
        self.require(
            self.path is not None or self.data_files is not None,
            "data.path and data.data_files are both empty: set data.data_files=<file> or data.path=<dataset>",
        )

    def micro_batch(self, world_size: int = 1) -> tuple[int, int]:
        """(micro-batch size per device, gradient accumulation steps) for ``batch_size``.

        ``batch_size`` counts sequences per optimizer step over all devices.
        """
        per_device, rem = divmod(self.batch_size, world_size)
        if rem:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is not divisible by the {world_size} devices: "
                f"use a multiple of {world_size}"
            )
        micro = self.micro_batch_size or per_device
        accum, rem = divmod(per_device, micro)
        if rem or accum == 0:
            raise ConfigError(
                f"data.batch_size={self.batch_size} / {world_size} devices is not a multiple of "
                f"data.micro_batch_size={micro}: pick a micro-batch size that divides it"
            )
        return micro, accum
