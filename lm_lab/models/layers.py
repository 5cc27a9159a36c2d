"""Pieces shared by the model families: head splitting, SDPA attention, activations.

Plain PyTorch; no Lightning or Hydra here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, T, C) -> (B, nh, T, hs)."""
    b, t, c = x.shape
    return x.view(b, t, n_head, c // n_head).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, nh, T, hs) -> (B, T, C)."""
    b, nh, t, hs = x.shape
    return x.transpose(1, 2).reshape(b, t, nh * hs)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Scaled dot-product attention on (B, nh, T, hs) tensors.

    ``mask`` is a boolean (B, 1, 1, T) or broadcastable tensor, True where a key may be
    attended to (padding keys are False). SDPA picks the fused kernel (flash / memory-efficient
    on GPU, the fused CPU kernel here).
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)


ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

# Names Hugging Face configs use for the same functions (for export).
HF_ACTIVATION_NAMES = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


def init_normal_(module: nn.Module, std: float) -> None:
    """GPT-2 / BERT initialisation: N(0, std) weights, zero biases, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def residual_std(std: float, n_layer: int) -> float:
    """GPT-2's scaled init for projections that write into the residual stream."""
    return std / math.sqrt(2 * n_layer)
