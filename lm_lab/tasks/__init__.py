"""Training recipes (LightningModules), one per objective."""

from __future__ import annotations

from typing import Any


def task_for(family: str) -> Any:
    """The LightningModule class for a model family (``gpt`` or ``bert``)."""
    if family == "gpt":
        from lm_lab.tasks.causal_lm import CausalLMTask

        return CausalLMTask
    if family == "bert":
        from lm_lab.tasks.masked_lm import MaskedLMTask

        return MaskedLMTask
    raise ValueError(f"unknown model family {family!r}: use gpt or bert")
