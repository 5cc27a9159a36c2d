"""Task heads on any network's plain forward (the registry's ``backbone``), laid out as
``transformers``' ``*ForSequenceClassification`` / ``*ForTokenClassification``: the backbone under
the network's Hugging Face prefix (``bert``, ``transformer``, ``model``) and the head under the name
and with the bias that network's HF class uses (``HeadLayout``, in ``models/<network>/hf.py``), so
export is a rename-free copy.

Encoders read the pooled [CLS] output (sequence) or every hidden state (token); decoders read the
hidden state of the last real token (sequence; right padding, which a causal network never sees)
or every hidden state (token). Plain PyTorch: no Lightning, no Hydra.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class HeadLayout:
    """How a network's HF task class names its head: ``hf_class`` (e.g. ``BertForSequenceClassification``),
    the head's attribute ``name`` (``classifier`` / ``score``), whether it has a ``bias``, and whether
    HF applies dropout before it (``dropout``: the network's hidden dropout)."""

    hf_class: str
    name: str
    bias: bool
    dropout: bool


class _Head(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        prefix: str,
        layout: HeadLayout,
        hidden: int,
        num_labels: int,
        dropout: float,
        *,
        encoder: bool,
    ) -> None:
        super().__init__()
        self.prefix, self.head_name, self.encoder = prefix, layout.name, encoder
        self.add_module(prefix, backbone)
        self.dropout = nn.Dropout(dropout if layout.dropout else 0.0)
        head = nn.Linear(hidden, num_labels, bias=layout.bias)
        nn.init.normal_(head.weight, std=0.02)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
        self.add_module(layout.name, head)

    @property
    def backbone(self) -> nn.Module:
        return getattr(self, self.prefix)

    @property
    def head(self) -> nn.Linear:
        return getattr(self, self.head_name)

    def hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        pooled: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states (B, T, C), pooled output (B, C) or None) from the backbone."""
        if self.encoder:  # Bert(input_ids, token_type_ids, attention_mask, pooled) -> EncoderOutput
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            out = self.backbone(input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask, pooled=pooled)
        else:  # a decoder: (B, T) -> (B, T, C); causal, so right padding needs no mask
            out = self.backbone(input_ids)
        if isinstance(out, torch.Tensor):
            return out, None
        return out.hidden_states, out.pooled_output


class SequenceClassifier(_Head):
    """Logits (B, num_labels) for whole sequences (``num_labels=1``: regression)."""

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.encoder:
            _, pooled = self.hidden(input_ids, attention_mask, token_type_ids, pooled=True)
            assert pooled is not None
            return self.head(self.dropout(pooled))
        h, _ = self.hidden(input_ids, attention_mask, None, pooled=False)  # (B, T, C)
        if attention_mask is None:
            last = torch.full((h.size(0),), h.size(1) - 1, device=h.device)
        else:
            last = attention_mask.long().sum(1).clamp(min=1) - 1  # right padding: the last real token
        pooled = h[torch.arange(h.size(0), device=h.device), last]  # (B, C)
        return self.head(self.dropout(pooled))


class TokenClassifier(_Head):
    """Logits (B, T, num_labels) for every token."""

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h, _ = self.hidden(input_ids, attention_mask, token_type_ids, pooled=False)
        return self.head(self.dropout(h))
