"""BERT: a bidirectional Transformer encoder (the heads that pretrain it are in ``heads.py``).

The module tree mirrors Hugging Face ``BertModel`` name by name (``embeddings.word_embeddings``,
``encoder.layer.{i}.attention.self.query`` ...), so ``Bert().state_dict()`` has exactly HF's keys.
Plain PyTorch: no Lightning, no Hydra.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

import torch
from torch import nn

from lm_lab.models.layers import (
    ACTIVATIONS,
    Dropout,
    attention,
    init_normal_,
    merge_heads,
    split_heads,
)
from lm_lab.schema import RESUME_FREE, ConfigBase


@dataclass
class BertConfig(ConfigBase):
    """Architecture of a BERT. Field names match ``GPTConfig`` where they mean the same thing."""

    _section: typing.ClassVar[str] = "model"
    network: typing.ClassVar[str] = "bert"
    vocab_size: int | None = 30522  # None: taken from the tokenizer in train()
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    intermediate_size: int | None = None  # None -> 4 * n_embd (see d_ff)
    max_seq_len: int = 512
    type_vocab_size: int = 2
    dropout: float = field(default=0.1, metadata=RESUME_FREE)  # hidden dropout: embeddings and both residual branches
    attn_dropout: float = field(default=0.1, metadata=RESUME_FREE)  # on the attention probabilities
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    init_std: float = field(default=0.02, metadata=RESUME_FREE)
    activation: str = "gelu"

    @property
    def d_ff(self) -> int:
        """Width of the feed-forward layer."""
        return 4 * self.n_embd if self.intermediate_size is None else self.intermediate_size

    def validate(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "max_seq_len", "type_vocab_size"):
            value = getattr(self, name)
            self.require(value is None or value > 0, f"model.{name}={value} must be > 0")  # None: vocab only
        self.require(
            self.intermediate_size is None or self.intermediate_size > 0,
            f"model.intermediate_size={self.intermediate_size} must be > 0 (or null for 4 * n_embd)",
        )
        self.require(
            self.n_embd % self.n_head == 0,
            f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
            "choose n_embd a multiple of n_head "
            f"(e.g. model.n_embd={self.n_head * max(1, self.n_embd // self.n_head)})",
        )
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            self.require(0.0 <= value < 1.0, f"model.{name}={value} must be in [0, 1)")
        self.require(self.layer_norm_eps > 0, f"model.layer_norm_eps={self.layer_norm_eps} must be > 0")
        self.require(self.init_std > 0, f"model.init_std={self.init_std} must be > 0")
        self.require(
            self.pad_token_id >= 0 and (self.vocab_size is None or self.pad_token_id < self.vocab_size),
            f"model.pad_token_id={self.pad_token_id} must be in [0, model.vocab_size={self.vocab_size})",
        )
        self.require(
            self.activation in ACTIVATIONS,
            f"model.activation={self.activation!r} is unknown: use one of {sorted(ACTIVATIONS)}",
        )


# ---------------------------------------------------------------- encoder


class Unpadded(typing.NamedTuple):
    """Where the real (non-padding) tokens of a (B, T) batch are, for running the encoder on them alone.

    Padding is ~25% of a batch of BERT sentence pairs (they end before the block does), and every
    linear layer, LayerNorm and GELU would compute it for nothing; as MosaicBERT does, those run on
    the N real tokens, (N, C), and only attention puts them back in (B, T) form, with zeros at the
    padding, which its mask hides. The real tokens' results are the padded computation's (HF parity
    holds to 1e-4, tested); the hidden states come back padded, zeros at the padding.
    """

    index: torch.Tensor  # (N,): the real tokens' positions in the flattened (B * T)
    batch: int
    length: int

    @classmethod
    def of(cls, attention_mask: torch.Tensor | None) -> Unpadded | None:
        """None (run padded) without a mask, without padding, or while compiling (its shapes are data-dependent)."""
        if attention_mask is None or torch.compiler.is_compiling():
            return None
        real = attention_mask.flatten().bool()
        if bool(real.all()):
            return None
        b, t = attention_mask.shape
        return cls(real.nonzero().squeeze(1), b, t)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (N, C)."""
        return x.reshape(self.batch * self.length, -1).index_select(0, self.index)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (B, T, C), zeros at the padding."""
        flat = x.new_zeros(self.batch * self.length, x.size(-1)).index_copy(0, self.index, x)
        return flat.view(self.batch, self.length, -1)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        # padding_idx keeps the pad row at zero and out of the gradient, as in HF.
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.n_embd, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_seq_len, cfg.n_embd)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)
        self.LayerNorm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.size(1), device=input_ids.device)  # (T,)
        x = (
            self.word_embeddings(input_ids)  # (B, T, C)
            + self.position_embeddings(pos)  # (T, C), broadcast over B
            + self.token_type_embeddings(token_type_ids)
        )
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Separate q/k/v projections (HF's layout), fused SDPA in between."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.attn_dropout = cfg.attn_dropout
        self.query = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.key = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.value = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, unpadded: Unpadded | None = None) -> torch.Tensor:
        # (B, T, C), or (N, C) real tokens padded back here -> 3 x (B, nh, T, hs)
        qkv = (proj(x) for proj in (self.query, self.key, self.value))
        q, k, v = (split_heads(unpadded.pad(t) if unpadded is not None else t, self.n_head) for t in qkv)
        y = merge_heads(attention(q, k, v, mask=mask, dropout=self.attn_dropout if self.training else 0.0))
        return unpadded.unpad(y) if unpadded is not None else y  # the layout x came in


class AddNorm(nn.Module):
    """Post-LN residual: LayerNorm(residual + dropout(dense(h))). HF's BertSelfOutput / BertOutput."""

    def __init__(self, d_in: int, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.n_embd)
        self.LayerNorm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(h)))


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)  # the odd name is HF's key: attention.self.query
        self.output = AddNorm(cfg.n_embd, cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, unpadded: Unpadded | None = None) -> torch.Tensor:
        return self.output(self.self(x, mask, unpadded), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.n_embd, cfg.d_ff)
        self.act = ACTIVATIONS[cfg.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))  # (B, T, d_ff)


class BertLayer(nn.Module):
    """Post-LN block (original BERT): x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = AddNorm(cfg.d_ff, cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, unpadded: Unpadded | None = None) -> torch.Tensor:
        """x: (B, T, C), or the real tokens (N, C) with ``unpadded``."""
        x = self.attention(x, mask, unpadded)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.n_layer))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, unpadded: Unpadded | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with ``unpadded`` the layers run on the real tokens alone."""
        if unpadded is not None:
            x = unpadded.unpad(x)
        for layer in self.layer:
            x = layer(x, mask, unpadded)
        return unpadded.pad(x) if unpadded is not None else x


class BertPooler(nn.Module):
    """tanh(dense(h[:, 0])): the [CLS] summary the NSP head reads."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))  # (B, C)


class EncoderOutput(typing.NamedTuple):
    hidden_states: torch.Tensor  # (B, T, C): the last encoder layer's output
    pooled_output: torch.Tensor | None  # (B, C): the pooler's [CLS] summary; None when not asked for


class Bert(nn.Module):
    """The plain encoder, HF's ``BertModel``: embeddings + encoder + pooler, no task head.

    ``forward`` returns the hidden states and the pooled [CLS] output that any head reads: the
    pretraining heads (``lm_lab.models.bert.heads``) and, later, classification heads.
    """

    def __init__(self, cfg: BertConfig, add_pooling_layer: bool = True) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("BertConfig.vocab_size is None: set it (train() takes it from the tokenizer)")
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        # Token classification reads no pooled output and HF's *ForTokenClassification has no pooler.
        self.pooler = BertPooler(cfg) if add_pooling_layer else None
        # HF BERT init: N(0, init_std) for Linear/Embedding, zero biases, LN = (1, 0), zero pad row.
        for module in self.modules():
            init_normal_(module, cfg.init_std)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pooled: bool = True,
    ) -> EncoderOutput:
        """input_ids (B, T); token_type_ids (B, T), default all 0; attention_mask (B, T) with 1 for
        real tokens and 0 for padding, default all 1; ``pooled=False`` skips the pooler."""
        t = input_ids.size(1)
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds model.max_seq_len={self.config.max_seq_len}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # (B, T) of 1/0 -> (B, 1, 1, T) boolean, True = this key may be attended to; it
        # broadcasts over heads and query positions. None lets SDPA take its unmasked kernel.
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        # Padding is left out of everything but attention (Unpadded); the result is padded again.
        h = self.encoder(self.embeddings(input_ids, token_type_ids), mask, Unpadded.of(attention_mask))  # (B, T, C)
        return EncoderOutput(h, self.pooler(h) if pooled and self.pooler is not None else None)


__all__ = ["Bert", "BertConfig", "EncoderOutput", "Unpadded"]
