"""The ``objective=masked_lm`` settings: how tokens are masked and sentence pairs are built."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from lm_lab.schema import ConfigBase


@dataclass
class MaskedLMConfig(ConfigBase):
    """BERT's pretraining: ``mlm_probability`` of the tokens masked 80/10/10 (at most
    ``max_predictions`` per sequence, default ceil(block_size * mlm_probability)), plus a
    sentence-pair task on ``[CLS] A [SEP] B [SEP]``: ``nsp`` (is B the next segment?), ``sop``
    (ALBERT: are A and B swapped?) or ``none``."""

    _section: typing.ClassVar[str] = "objective"
    objective: typing.ClassVar[str] = "masked_lm"
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
        self.require(
            0.0 < self.mlm_probability < 1.0, f"objective.mlm_probability={self.mlm_probability} must be in (0, 1)"
        )
        self.require(
            self.max_predictions is None or self.max_predictions > 0,
            f"objective.max_predictions={self.max_predictions} must be > 0 (or null)",
        )
        self.require(self.max_ngram >= 1, f"objective.max_ngram={self.max_ngram} must be >= 1 (ALBERT used 3)")
        self.require(
            0.0 <= self.short_seq_prob <= 1.0, f"objective.short_seq_prob={self.short_seq_prob} must be in [0, 1]"
        )
        self.require(self.dupe_factor >= 1, f"objective.dupe_factor={self.dupe_factor} must be >= 1")
