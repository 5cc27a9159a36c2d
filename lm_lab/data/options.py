"""The ``data`` config group as a typed dataclass."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from lm_lab.schema import RESUME_FREE, TOKENIZER, ConfigBase, ConfigError

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
    # Labelled data (fine-tuning, evaluation): the label (or tag list), the second text of a pair,
    # an SFT example's prompt and response, and the split the final test runs on.
    label_column: str = "label"
    text_pair_column: str | None = None
    prompt_column: str = "prompt"
    response_column: str = "response"
    test_split: str | None = "test"
    split: str = "train"
    val_split: str | None = "validation"
    val_fraction: float = 0.1
    # What one document is: a whole file / paragraph / line of a .txt file; for datasets of rows
    # (JSON, Parquet, the Hub): document|line = a row, paragraph = rows up to a blank row,
    # article = rows from one top-level " = Title = " heading to the next (WikiText).
    sample_by: Literal["document", "paragraph", "line", "article"] = "document"
    streaming: bool = False
    streaming_val_docs: int = 200
    tokenizer: str = field(default="auto", metadata=TOKENIZER)
    vocab_size: int = field(default=8192, metadata=TOKENIZER)
    tokenizer_train_docs: int | None = None
    lowercase: bool = field(default=True, metadata=TOKENIZER)
    strip_accents: bool | None = field(default=None, metadata=TOKENIZER)
    block_size: int = 256
    # blocks: each epoch visits every fixed block once, shuffled. windows: nanoGPT's sampling,
    # windows at uniformly random token offsets (as many per epoch as there are blocks).
    sampling: Literal["blocks", "windows"] = "blocks"
    batch_size: int = 32
    micro_batch_size: int | None = field(default=None, metadata=RESUME_FREE)
    num_workers: int = field(default=0, metadata=RESUME_FREE)
    num_proc: int | None = field(default=None, metadata=RESUME_FREE)
    cache_dir: str = field(default=".cache/lm_lab", metadata=RESUME_FREE)

    def validate(self) -> None:
        self.require(self.block_size >= 2, f"data.block_size={self.block_size} must be >= 2")
        self.require(self.batch_size > 0, f"data.batch_size={self.batch_size} must be > 0")
        self.require(
            self.micro_batch_size is None or self.micro_batch_size > 0,
            f"data.micro_batch_size={self.micro_batch_size} must be > 0 (or null)",
        )
        self.require(0.0 < self.val_fraction < 1.0, f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        self.require(self.vocab_size >= 2, f"data.vocab_size={self.vocab_size} must be >= 2")
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
