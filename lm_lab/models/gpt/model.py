"""GPT-2: a decoder-only Transformer for causal language modelling.

The parameter layout mirrors Hugging Face ``GPT2LMHeadModel`` key by key
(``transformer.wte``, ``transformer.h.{i}.attn.c_attn`` ...), so export is a rename-free copy;
the only difference is that HF stores its ``Conv1D`` weights transposed relative to our
``nn.Linear`` (handled in ``hf_state_dict`` / ``load_hf_state_dict``).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lm_lab.models.generation import generate
from lm_lab.models.layers import (
    ACTIVATIONS,
    AttentionMask,
    Dropout,
    KVCache,
    LayerKV,
    cached_causal_attention,
    causal_attention,
    causal_document_mask,
    document_positions,
    init_normal_,
    merge_heads,
    residual_std,
    split_heads,
    use_flex,
)
from lm_lab.schema import RESUME_FREE, ConfigBase


@dataclass
class GPTConfig(ConfigBase):
    """Architecture of a GPT. ``vocab_size`` is normally resolved from the tokenizer."""

    _section: typing.ClassVar[str] = "model"
    network: typing.ClassVar[str] = "gpt"
    vocab_size: int | None = None  # None: taken from the tokenizer in train()
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    max_seq_len: int = 1024
    dropout: float = field(default=0.0, metadata=RESUME_FREE)
    bias: bool = True
    activation: str = "gelu_tanh"
    layer_norm_eps: float = 1e-5
    init_std: float = field(default=0.02, metadata=RESUME_FREE)
    # Packed blocks: attend only within each document (documents end with the EOS token; the
    # objective passes their ids to forward as ``document_ids``), and optionally restart positions.
    document_mask: bool = False
    document_positions: bool = False

    def validate(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "max_seq_len"):
            value = getattr(self, name)
            self.require(value is None or value > 0, f"model.{name}={value} must be > 0")
        self.require(
            self.n_embd % self.n_head == 0,
            f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
            f"choose n_embd a multiple of n_head (e.g. model.n_embd={self.n_head * max(1, self.n_embd // self.n_head)})",
        )
        self.require(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")
        self.require(
            self.activation in ACTIVATIONS,
            f"model.activation={self.activation!r} is unknown: use one of {sorted(ACTIVATIONS)}",
        )
        self.require(
            self.document_mask or not self.document_positions,
            "model.document_positions=true restarts positions at each document of a packed block: "
            "it needs model.document_mask=true",
        )


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        # One matmul for q, k and v (HF's c_attn), then the output projection.
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, mask: AttentionMask | None = None, cache: LayerKV | None = None, past: int = 0
    ) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(x.size(-1), dim=2)  # 3 x (B, T, C)
        q, k, v = (split_heads(t, self.n_head) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:  # generation: x holds the positions after the `past` cached ones
            y = cached_causal_attention(q, *cache.append(k, v), past)
        else:
            y = causal_attention(q, k, v, mask=mask, dropout=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(merge_heads(y)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.activation]
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, mask: AttentionMask | None = None, cache: LayerKV | None = None, past: int = 0
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache, past)
        return x + self.mlp(self.ln_2(x))


class GPTBackbone(nn.Module):
    """Token and position embeddings, the blocks and the final LayerNorm: HF's ``GPT2Model``
    (``GPT.transformer``). The plain network that task heads read."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.n_embd)
        self.drop = Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        document_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        **_: typing.Any,
    ) -> torch.Tensor:
        """(B, T) ids -> (B, T, C) hidden states. Causal: right padding needs no mask (a position
        never sees the padding after it); ``attention_mask``/``token_type_ids`` are accepted and ignored.

        ``document_ids`` (B, T) (``layers.document_ids``): attend only within each document, with
        positions restarting per document when ``config.document_positions``. ``position_ids``
        (B, T) or (T,): explicit positions (default 0..T-1). ``kv_cache`` (``new_kv_cache()``,
        generation): the tokens follow the cached positions, whose keys and values are reused."""
        t = input_ids.size(1)
        if kv_cache is not None:
            return self._cached_forward(input_ids, kv_cache, document_ids, position_ids)
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds model.max_seq_len={self.config.max_seq_len}")
        mask = None
        if document_ids is not None:
            flex = use_flex(input_ids.device, self.config.dropout if self.training else 0.0)
            mask = causal_document_mask(document_ids, flex=flex)
            if position_ids is None and self.config.document_positions:
                position_ids = document_positions(document_ids)
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device)
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))  # (B, T, C)
        for block in self.h:
            x = block(x, mask)
        return self.ln_f(x)

    def _cached_forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        document_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        t = input_ids.size(1)
        past = cache.check(t, self.config.max_seq_len, document_ids, position_ids)
        x = self.drop(self.wte(input_ids) + self.wpe(cache.positions(t, input_ids.device)))
        for block, layer_cache in zip(self.h, cache.layers, strict=True):
            x = block(x, None, layer_cache, past)
        cache.length += t
        return self.ln_f(x)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("GPTConfig.vocab_size is None: set it (train() takes it from the tokenizer)")
        self.config = cfg
        self.transformer = GPTBackbone(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # Tied input/output embeddings (GPT-2): one matrix, two uses.
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(lambda m: init_normal_(m, cfg.init_std))
        # Projections that add into the residual stream get a smaller init so the stream's
        # variance does not grow with depth (GPT-2 paper, section 2.3).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=residual_std(cfg.init_std, cfg.n_layer))

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx: torch.Tensor, **kwargs: typing.Any) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V); ``document_ids=``/``position_ids=`` as in ``GPTBackbone``."""
        return self.lm_head(self.hidden_states(idx, **kwargs))

    def hidden_states(self, idx: torch.Tensor, **kwargs: typing.Any) -> torch.Tensor:
        return self.transformer(idx, **kwargs)

    def estimate_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (PaLM appendix B): 6N for the weights plus attention's 12*L*C*T,
        with T the length the model is trained at (the data's block size, not model.max_seq_len)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * seq_len

    def new_kv_cache(self) -> KVCache:
        """An empty key/value cache for ``forward(..., kv_cache=)`` (used by ``generate``)."""
        return KVCache(self.config.n_layer)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs: typing.Any) -> torch.Tensor:
        """Sample continuations of ``idx`` (B, T); see ``lm_lab.models.generation.generate``."""
        return generate(self, idx, max_new_tokens, **kwargs)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy; ``targets`` (B, T), -100 ignored."""
        logits = self(idx)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def backbone(cfg: GPTConfig) -> GPTBackbone:
    """The plain network, initialised exactly as inside ``GPT`` (the LM head is dropped)."""
    return GPT(cfg).transformer
