"""After each validation, a short generated text (decoders) or the fill-mask predictions for a prompt
(encoders), so progress can be read, not just plotted."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

log = logging.getLogger("lm_lab")


class TextSamples(L.Callback):
    """After validation, continue ``prompt`` with a decoder, or predict the ``[MASK]`` of
    ``mask_prompt`` with an encoder, and log it: a W&B table with a row per validation so far,
    TensorBoard text, and the console log. A failure here is a warning, never a failed run.
    ``prompt=None`` (``sample_prompt=null``): no decoder samples."""

    def __init__(
        self,
        prompt: str | None = "\n",
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_k: int | None = 50,
        seed: int = 0,
        mask_prompt: str = "Return the [MASK] of the list.",
        mask_top_k: int = 5,
    ) -> None:
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed
        self.mask_prompt, self.mask_top_k = mask_prompt, mask_top_k
        self.history: list[tuple[int, str]] = []
        self.mask_history: list[list[Any]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        if getattr(pl_module, "tokenizer_backend", None) is None:
            return
        if callable(getattr(pl_module, "fill_mask", None)):
            self._fill_mask(trainer, pl_module)
            return
        if not hasattr(pl_module, "generate") or self.prompt is None:  # sample_prompt=null: no samples
            return
        if self.history and self.history[-1][0] == trainer.global_step:
            return  # these weights were sampled already (final_val_batches validates them again)
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
                if hasattr(logger, "log_table"):  # WandbLogger: a wandb.Table, a row per validation so far
                    logger.log_table(key="samples", columns=["step", "text"], data=[[s, t] for s, t in self.history])
                elif hasattr(getattr(logger, "experiment", None), "add_text"):  # TensorBoard
                    logger.experiment.add_text("samples", self.prompt + text, step)
            except Exception as e:
                log.warning("logging the sample to %s failed: %s", type(logger).__name__, e)

    def _fill_mask(self, trainer: L.Trainer, pl_module: Any) -> None:
        step = trainer.global_step
        if self.mask_history and self.mask_history[-1][0] == step:
            return  # these weights were sampled already
        try:
            slots = pl_module.fill_mask(self.mask_prompt, top_k=self.mask_top_k)
        except Exception as e:  # e.g. a prompt without [MASK]: a warning, never a failed run
            log.warning("fill-mask sample failed at step %d: %s", step, e)
            return
        shown = " | ".join(", ".join(f"{tok} ({p:.2f})" for tok, p in slot) for slot in slots)
        self.mask_history.append([step, self.mask_prompt, shown])
        log.info("fill-mask at step %d: %s -> %s", step, self.mask_prompt, shown)
        for logger in trainer.loggers:
            try:
                if hasattr(logger, "log_table"):  # WandbLogger
                    logger.log_table(key="fill_mask", columns=["step", "prompt", "predictions"], data=self.mask_history)
                elif hasattr(getattr(logger, "experiment", None), "add_text"):  # TensorBoard
                    logger.experiment.add_text("fill_mask", f"{self.mask_prompt} -> {shown}", step)
            except Exception as e:
                log.warning("logging the fill-mask sample to %s failed: %s", type(logger).__name__, e)
