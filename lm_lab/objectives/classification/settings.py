"""The ``objective=classification`` settings."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from lm_lab.schema import ConfigBase


@dataclass
class ClassificationConfig(ConfigBase):
    """Sequence classification (a label per text or text pair) or regression (a number per text).

    ``labels``: the label set in index order; null = the sorted labels of the training split, filled
    in before training (``ClassificationDataModule.complete_settings``) and recorded in the checkpoint
    and in an export's ``id2label``. ``freeze_backbone``: train the head only (a linear probe).
    """

    _section: typing.ClassVar[str] = "objective"
    objective: typing.ClassVar[str] = "classification"
    problem_type: Literal["auto", "single_label", "regression"] = "auto"
    labels: list[str] | None = None
    freeze_backbone: bool = False

    def validate(self) -> None:
        if self.labels is not None:
            self.require(len(self.labels) >= 2, f"objective.labels={self.labels} needs at least two labels")
            self.require(
                len(set(self.labels)) == len(self.labels), f"objective.labels={self.labels} lists a label twice"
            )

    @property
    def num_labels(self) -> int:
        if self.problem_type == "regression":
            return 1
        if self.labels is None:
            raise ValueError("ClassificationConfig.labels is not resolved yet (train.py fills it from the data)")
        return len(self.labels)
