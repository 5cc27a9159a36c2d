"""The ``objective=causal_lm`` settings."""

from __future__ import annotations

import typing
from dataclasses import dataclass

from lm_lab.schema import ConfigBase


@dataclass
class CausalLMConfig(ConfigBase):
    """Next-token prediction: every token of a packed block is a target. No settings of its own yet
    (block size and sampling are ``data.*``, shared with every objective that reads token blocks)."""

    _section: typing.ClassVar[str] = "objective"
    objective: typing.ClassVar[str] = "causal_lm"
