"""Causal language modelling (GPT): next-token cross-entropy."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from lm_lab.config import OptimizerConfig, SchedulerConfig
from lm_lab.models.gpt import GPT, GPTConfig
from lm_lab.tasks.base import PretrainTask, StepOutput


class CausalLMTask(PretrainTask):
    family = "gpt"

    def __init__(
        self,
        model_cfg: GPTConfig,
        optimizer: OptimizerConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        super().__init__(model_cfg, optimizer, scheduler, tokenizer)
        self.net = GPT(model_cfg)
        self.flops_per_token: float | None = None  # of the training block size; read by the Throughput callback

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, V)."""
        return self.net(idx)

    def estimate_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (PaLM appendix B): 6N for the weights plus attention's 12*L*C*T,
        with T the length the model is trained at (the data's block size, not model.max_seq_len)."""
        c = self.model_cfg
        return 6 * self.net.num_params() + 12 * c.n_layer * c.n_embd * seq_len

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> StepOutput:
        if stage == "train" and self.flops_per_token is None:
            self.flops_per_token = self.estimate_flops_per_token(batch["input_ids"].size(1))
        logits = self.net(batch["input_ids"])
        labels = batch["labels"].flatten()
        n = (labels != -100).sum()
        # Sum / max(n, 1): a micro-batch without targets (an evaluation padding slot) gives 0, not NaN.
        total = F.cross_entropy(logits.flatten(0, 1).float(), labels, ignore_index=-100, reduction="sum")
        mean = total / n.clamp(min=1)
        return StepOutput(self.token_mean(total, n, batch), {"loss": (mean, n)})

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
    ) -> Any:
        """Continue ``prompt`` (text, or token ids (B, T)); returns text for text, ids for ids."""
        from lm_lab.data.tokenizer import eot_id

        was_training = self.training
        self.eval()
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        as_text = isinstance(prompt, str)
        eot = eot_id(self.tokenizer_backend) if self.tokenizer_backend is not None else None
        if as_text:
            ids = self.tokenizer_backend.encode(prompt, add_special_tokens=False).ids or (
                [eot] if eot is not None else [0]
            )
            idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        else:
            idx = prompt.to(self.device)
        out = self.net.generate(
            idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eot, generator=gen
        )
        if was_training:
            self.train()
        if as_text:
            return self.tokenizer_backend.decode(out[0, idx.size(1) :].tolist(), skip_special_tokens=True)
        return out
