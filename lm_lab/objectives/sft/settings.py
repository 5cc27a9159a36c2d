"""The ``objective=sft`` settings: the prompt template, packing, and whether prompts are targets."""

from __future__ import annotations

import typing
from dataclasses import dataclass

from lm_lab.schema import ConfigBase

PLACEHOLDER = "{prompt}"
DEFAULT_TEMPLATE = "### Question:\n{prompt}\n\n### Answer:\n"


@dataclass
class SFTConfig(ConfigBase):
    """Instruction fine-tuning of a decoder on prompt/response pairs.

    Each example is ``template`` with the prompt in place of ``{prompt}``, followed by the response
    and the end-of-text token. The two parts are tokenized separately and concatenated, and the loss
    covers the response tokens and the end-of-text token only (the prompt's targets are masked by its
    encoded length), unless ``train_on_prompt``. ``{prompt}`` is the only placeholder: any other brace
    in the template is literal text. End the template with a newline (or a space): the prompt part and
    the response are never merged into one BPE token across that boundary, at training or at generation.

    ``packing=true`` fills each training sequence of ``data.block_size`` tokens with as many whole
    examples as fit (each keeps its own label mask; attention is not reset between them); ``false``
    (the default) gives every example a sequence of its own, right-padded in the batch. Validation and
    test examples are always scored one by one.
    """

    _section: typing.ClassVar[str] = "objective"
    objective: typing.ClassVar[str] = "sft"
    template: str = DEFAULT_TEMPLATE
    packing: bool = False
    train_on_prompt: bool = False

    def validate(self) -> None:
        n = self.template.count(PLACEHOLDER)
        self.require(
            n == 1,
            f"objective.template={self.template!r} must contain {PLACEHOLDER} exactly once (found {n}): "
            "it marks where each example's prompt goes",
        )

    def format(self, prompt: str) -> str:
        """The template with ``prompt`` in place of ``{prompt}`` (other braces stay as they are)."""
        before, after = self.template.split(PLACEHOLDER)
        return before + prompt + after
