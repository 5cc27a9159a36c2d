"""Instruction fine-tuning: the causal LM loss on the response tokens only, for any decoder.

The step is ``CausalLMTask``'s: cross-entropy over the targets that are not -100 (``SFTDataModule``
masks the prompt's targets and the padding), divided by the target count of the whole optimizer step
(``token_mean``), so every response token of a step weighs the same whatever the examples' lengths.
``val/loss`` and ``test/loss`` are the mean loss per response token (end-of-text included).
"""

from __future__ import annotations

from typing import Any

import torch

from lm_lab.objectives.causal_lm.task import CausalLMTask
from lm_lab.objectives.sft.settings import SFTConfig


class SFTTask(CausalLMTask):
    settings_class = SFTConfig

    def format_prompt(self, prompt: str) -> str:
        """``prompt`` in this run's template (``objective.template``), as the model was trained on it."""
        return self.objective_cfg.format(prompt)

    @torch.no_grad()
    def generate(
        self,
        prompt: str | torch.Tensor,
        max_new_tokens: int = 100,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        raw: bool = False,
    ) -> Any:
        """The answer to ``prompt``: text is put in the template first (``raw=True``: as it is), then
        continued until the end-of-text token or ``max_new_tokens``; token ids are continued as they are."""
        if isinstance(prompt, str) and not raw:
            prompt = self.format_prompt(prompt)
        return super().generate(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
