"""Generate a short text sample after each validation, so progress can be read, not just plotted."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

log = logging.getLogger("lm_lab")


class TextSamples(L.Callback):
    """After validation, continue ``prompt`` with the model and log the text (W&B table, TensorBoard
    text, or the console log). A failure here is a warning, never a failed run."""

    def __init__(
        self,
        prompt: str = "\n",
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_k: int | None = 50,
        seed: int = 0,
    ) -> None:
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.history: list[tuple[int, str]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not hasattr(pl_module, "generate"):
            return
        if getattr(pl_module, "tokenizer_backend", None) is None:
            return
        try:
            text = pl_module.generate(
                self.prompt, self.max_new_tokens, temperature=self.temperature, top_k=self.top_k, seed=self.seed
            )
        except Exception as e:  # a sampling failure must never stop training
            log.warning("sample generation failed at step %d: %s", trainer.global_step, e)
            return
        step = trainer.global_step
        self.history.append((step, text))
        log.info("sample at step %d: %r", step, self.prompt + text)
        for logger in trainer.loggers:
            try:
                if hasattr(logger, "log_text"):  # WandbLogger
                    logger.log_text(key="samples", columns=["step", "text"], data=[[s, t] for s, t in self.history])
                elif hasattr(getattr(logger, "experiment", None), "add_text"):  # TensorBoard
                    logger.experiment.add_text("samples", self.prompt + text, step)
            except Exception as e:
                log.warning("logging the sample to %s failed: %s", type(logger).__name__, e)
