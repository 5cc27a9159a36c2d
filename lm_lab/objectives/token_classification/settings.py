"""The ``objective=token_classification`` settings."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from lm_lab.schema import ConfigBase


def is_bio(labels: typing.Iterable[str]) -> bool:
    """Whether ``labels`` is a BIO tag set: every tag is ``O`` or ``B-<type>`` / ``I-<type>``, and some are not ``O``."""
    tags = list(labels)
    return all(t == "O" or (t[:2] in ("B-", "I-") and len(t) > 2) for t in tags) and any(t != "O" for t in tags)


@dataclass
class TokenClassificationConfig(ConfigBase):
    """A tag per word: part-of-speech tagging, named-entity (BIO) tagging, chunking.

    ``labels``: the tag set in index order; null = the sorted tags of the training split, filled in
    before training (``TokenClassificationDataModule.complete_settings``) and recorded in the
    checkpoint and in an export's ``id2label``. ``label_all_subtokens``: train on every sub-token of a
    word (a ``B-X`` word's later sub-tokens get ``I-X``) instead of its first only (BERT's recipe);
    evaluation always reads the first. ``freeze_backbone``: train the head only (a linear probe).
    ``scheme``: ``auto`` reads a tag set of ``O`` / ``B-*`` / ``I-*`` as BIO, ``bio`` insists on it,
    ``none`` never; with BIO, entity-level precision / recall / F1 (seqeval) are reported.
    """

    _section: typing.ClassVar[str] = "objective"
    objective: typing.ClassVar[str] = "token_classification"
    labels: list[str] | None = None
    label_all_subtokens: bool = False
    freeze_backbone: bool = False
    scheme: Literal["auto", "bio", "none"] = "auto"

    def validate(self) -> None:
        if self.labels is not None:
            self.require(len(self.labels) >= 2, f"objective.labels={self.labels} needs at least two tags")
            self.require(len(set(self.labels)) == len(self.labels), f"objective.labels={self.labels} lists a tag twice")
            self.require(
                self.scheme != "bio" or is_bio(self.labels),
                f"objective.scheme=bio but objective.labels={self.labels} are not all O, B-<type> or I-<type>: "
                "fix the tags or use objective.scheme=none",
            )

    @property
    def num_labels(self) -> int:
        if self.labels is None:
            raise ValueError("TokenClassificationConfig.labels is not resolved yet (train.py fills it from the data)")
        return len(self.labels)

    @property
    def bio(self) -> bool:
        """Whether entity-level metrics apply (the resolved tag set is BIO and ``scheme`` allows it)."""
        return self.scheme != "none" and self.labels is not None and is_bio(self.labels)
