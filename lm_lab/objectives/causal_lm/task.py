"""Causal language modelling: next-token cross-entropy, for any decoder in the registry.

The network is whatever ``model=`` names (GPT, Llama, or one registered from outside lm_lab): this
file only assumes ``net(ids) -> logits (B, T, V)`` and ``net.config.max_seq_len``. With
``model.document_mask=true`` it also passes ``document_ids=`` (B, T), numbered from the end-of-text
token that ends each document in a packed block, and the network keeps attention inside each one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lm_lab.models.generation import generate
from lm_lab.models.layers import document_ids
from lm_lab.objectives.base import LMTask, StepOutput
from lm_lab.objectives.causal_lm.settings import CausalLMConfig


class CausalLMTask(LMTask):
    settings_class = CausalLMConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.flops_per_token: float | None = None  # of the training block size; read by the Throughput callback
        self.eos_id: int | None = None  # documents end here in packed blocks (model.document_mask)
        if getattr(self.model_cfg, "document_mask", False):
            from lm_lab.data.tokenizer import eot_id
            from lm_lab.schema import ConfigError

            self.eos_id = eot_id(self.tokenizer_backend) if self.tokenizer_backend is not None else None
            if self.eos_id is None:
                raise ConfigError(
                    "model.document_mask=true splits packed blocks at the end-of-text token, but the tokenizer "
                    "has none (<|endoftext|>, </s>, [SEP] or <eos>): use a tokenizer with one, or model.document_mask=false"
                )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, V) (within each document with ``model.document_mask``)."""
        if self.eos_id is None:
            return self.net(idx)
        return self.net(idx, document_ids=document_ids(idx, self.eos_id))

    def estimate_flops_per_token(self, seq_len: int) -> float | None:
        """Training FLOPs per token at ``seq_len``, as the network counts them (None if it does not)."""
        estimate = getattr(self.net, "estimate_flops_per_token", None)
        return float(estimate(seq_len)) if estimate is not None else None

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> StepOutput:
        if stage == "train" and self.flops_per_token is None:
            self.flops_per_token = self.estimate_flops_per_token(batch["input_ids"].size(1))
        logits = self(batch["input_ids"])
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
        out = generate(
            self.net,
            idx,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=eot,
            generator=gen,
        )
        if was_training:
            self.train()
        if as_text:
            return self.tokenizer_backend.decode(out[0, idx.size(1) :].tolist(), skip_special_tokens=True)
        return out
