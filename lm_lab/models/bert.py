"""BERT: a bidirectional Transformer encoder pretrained with masked-LM and next-sentence heads.

The module tree mirrors Hugging Face ``BertForPreTraining`` name by name
(``bert.embeddings.word_embeddings``, ``bert.encoder.layer.{i}.attention.self.query`` ...,
``cls.predictions.decoder``), so ``model.state_dict()`` has exactly HF's keys and export is a
plain copy. Two HF quirks are reproduced on purpose:

* ``cls.predictions.decoder.weight`` is the word-embedding matrix (tied), and
  ``cls.predictions.decoder.bias`` is the same Parameter as ``cls.predictions.bias``; HF lists
  both aliases in its state_dict, so we do too. ``hf_state_dict`` drops them by default (like
  ``save_pretrained`` does, and safetensors refuses shared tensors); ``load_hf_state_dict``
  re-creates them from their sources.
* HF registers ``position_ids`` / ``token_type_ids`` buffers; they are non-persistent in HF 5.x
  (not in its state_dict), so we build positions on the fly and only *ignore* those keys when an
  older checkpoint carries them.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch
from torch import nn

from lm_lab.config import ConfigBase
from lm_lab.models.layers import (
    ACTIVATIONS,
    HF_ACTIVATION_NAMES,
    attention,
    init_normal_,
    merge_heads,
    split_heads,
)


@dataclass
class BertConfig(ConfigBase):
    """Architecture of a BERT. Field names match ``GPTConfig`` where they mean the same thing."""

    _section: typing.ClassVar[str] = "model"
    family: str = "bert"
    vocab_size: int | None = 30522  # None: taken from the tokenizer in train()
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    intermediate_size: int | None = None  # None -> 4 * n_embd (see d_ff)
    max_seq_len: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1  # hidden dropout: embeddings and both residual branches
    attn_dropout: float = 0.1  # on the attention probabilities
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    init_std: float = 0.02
    activation: str = "gelu"

    @property
    def d_ff(self) -> int:
        """Width of the feed-forward layer."""
        return 4 * self.n_embd if self.intermediate_size is None else self.intermediate_size

    def validate(self) -> None:
        self.require(self.family == "bert", f"model.family={self.family!r} must be 'bert' for BertConfig")
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


class BertOutput(typing.NamedTuple):
    """``mlm_logits`` is (B, T, V), or (N_masked, V) when ``mlm_positions`` was given."""

    mlm_logits: torch.Tensor
    nsp_logits: torch.Tensor | None  # (B, 2); None when not asked for (``pair_logits=False``)
    hidden_states: torch.Tensor  # (B, T, C), output of the last encoder layer


# ---------------------------------------------------------------- encoder


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        # padding_idx keeps the pad row at zero and out of the gradient, as in HF.
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.n_embd, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_seq_len, cfg.n_embd)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.n_embd)
        self.LayerNorm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # (B, T, C) -> 3 x (B, nh, T, hs)
        q, k, v = (split_heads(proj(x), self.n_head) for proj in (self.query, self.key, self.value))
        y = attention(q, k, v, mask=mask, dropout=self.attn_dropout if self.training else 0.0)
        return merge_heads(y)  # (B, T, C)


class AddNorm(nn.Module):
    """Post-LN residual: LayerNorm(residual + dropout(dense(h))). HF's BertSelfOutput / BertOutput."""

    def __init__(self, d_in: int, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.n_embd)
        self.LayerNorm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dropout(self.dense(h)))


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)  # the odd name is HF's key: attention.self.query
        self.output = AddNorm(cfg.n_embd, cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


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

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.n_layer))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class BertPooler(nn.Module):
    """tanh(dense(h[:, 0])): the [CLS] summary the NSP head reads."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h[:, 0]))  # (B, C)


class BertBackbone(nn.Module):
    """Embeddings + encoder + pooler: HF's ``BertModel`` (lives under the ``bert.`` prefix)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg)


# ---------------------------------------------------------------- pretraining heads


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.act = ACTIVATIONS[cfg.activation]
        self.LayerNorm = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(h)))


class BertLMPredictionHead(nn.Module):
    """dense -> act -> LayerNorm -> tied decoder + per-token bias."""

    def __init__(self, cfg: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        # Tie: one (V, C) matrix embeds tokens and scores them. Aliasing the bias as
        # decoder.bias reproduces HF's state_dict, which lists both names.
        self.decoder.weight = word_embeddings.weight
        self.decoder.bias = self.bias

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(h))  # (..., V)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, cfg: BertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg, word_embeddings)
        self.seq_relationship = nn.Linear(cfg.n_embd, 2)  # NSP: is-next / random


class BertModel(nn.Module):
    """BERT with MLM and NSP heads; parameter names equal ``transformers.BertForPreTraining``'s."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("BertConfig.vocab_size is None: set it (train() takes it from the tokenizer)")
        self.config = cfg
        self.bert = BertBackbone(cfg)
        self.cls = BertPreTrainingHeads(cfg, self.bert.embeddings.word_embeddings)
        # HF BERT init: N(0, init_std) for Linear/Embedding, zero biases (incl. the MLM bias,
        # created as zeros), LN = (1, 0), zero pad row. The decoder is skipped because its weight
        # *is* the word embedding: re-initialising it would undo the zeroed pad row.
        decoder = self.cls.predictions.decoder
        for module in self.modules():
            if module is not decoder:
                init_normal_(module, cfg.init_std)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mlm_positions: torch.Tensor | None = None,
        pair_logits: bool = True,
    ) -> BertOutput:
        """input_ids (B, T); token_type_ids (B, T), default all 0; attention_mask (B, T) with 1
        for real tokens and 0 for padding, default all 1; mlm_positions: boolean (B, T) where
        the MLM logits are wanted (they come back flattened, (N_masked, V), in row-major order,
        i.e. aligned with ``labels[mlm_positions]``); ``pair_logits=False`` skips the pooler and
        the NSP head (training without a sentence-pair objective)."""
        b, t = input_ids.shape
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds model.max_seq_len={self.config.max_seq_len}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # (B, T) of 1/0 -> (B, 1, 1, T) boolean, True = this key may be attended to; it
        # broadcasts over heads and query positions. None lets SDPA take its unmasked kernel.
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]

        x = self.bert.embeddings(input_ids, token_type_ids)  # (B, T, C)
        h = self.bert.encoder(x, mask)  # (B, T, C)

        if mlm_positions is not None:
            if mlm_positions.dtype != torch.bool or mlm_positions.shape != (b, t):
                raise ValueError(
                    f"mlm_positions must be a boolean (B, T)=({b}, {t}) tensor, "
                    f"got {mlm_positions.dtype} {tuple(mlm_positions.shape)}"
                )
            # The (C -> V) matmul dominates the cost and only ~15% of tokens are masked:
            # gather them first so the head runs on (N_masked, C) instead of (B, T, C).
            mlm_logits = self.cls.predictions(h[mlm_positions])  # (N_masked, V)
        else:
            mlm_logits = self.cls.predictions(h)  # (B, T, V)
        nsp_logits = self.cls.seq_relationship(self.bert.pooler(h)) if pair_logits else None  # (B, 2)
        return BertOutput(mlm_logits=mlm_logits, nsp_logits=nsp_logits, hidden_states=h)


# ---------------------------------------------------------------- Hugging Face interop

# Keys HF's state_dict lists that are aliases of another key (HF's ``_tied_weights_keys``).
HF_TIED_KEYS: dict[str, str] = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}
# Buffers that older HF checkpoints saved as persistent; we compute them on the fly.
_HF_BUFFER_KEYS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")


def hf_config_dict(cfg: BertConfig) -> dict[str, typing.Any]:
    """Keyword arguments for ``transformers.BertConfig`` describing the same network."""
    return dict(
        model_type="bert",
        architectures=["BertForPreTraining"],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        intermediate_size=cfg.d_ff,
        max_position_embeddings=cfg.max_seq_len,
        type_vocab_size=cfg.type_vocab_size,
        hidden_act=HF_ACTIVATION_NAMES[cfg.activation],
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attn_dropout,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=cfg.pad_token_id,
        initializer_range=cfg.init_std,
        tie_word_embeddings=True,
    )


def hf_state_dict(model: BertModel, *, include_tied: bool = False) -> dict[str, torch.Tensor]:
    """Our weights under BertForPreTraining's names (identical to ours), detached CPU copies.

    By default the tied aliases in ``HF_TIED_KEYS`` are left out, as ``save_pretrained`` does
    and as safetensors requires (it rejects shared tensors); ``from_pretrained`` re-ties them.
    ``include_tied=True`` keeps them so ``BertForPreTraining.load_state_dict(strict=True)`` works.
    """
    out = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
    if not include_tied:
        for name in HF_TIED_KEYS:
            out.pop(name)
    return out


def load_hf_state_dict(model: BertModel, sd: typing.Mapping[str, torch.Tensor]) -> None:
    """Load BertForPreTraining weights (HF names) into ``model``, strictly.

    Accepts state dicts with or without the tied aliases and ignores the position/token-type
    buffers old checkpoints saved. A present alias must equal its source (otherwise the
    checkpoint is not tied and would silently lose one of the two tensors).
    """
    ours = {name: t for name, t in sd.items() if name not in _HF_BUFFER_KEYS}
    for alias, source in HF_TIED_KEYS.items():
        if alias in ours and source in ours and not torch.equal(ours[alias], ours[source]):
            raise ValueError(f"{alias} differs from {source}: this model requires them tied")
        if source in ours:
            ours[alias] = ours[source]
    model.load_state_dict(ours, strict=True)


__all__ = [
    "HF_TIED_KEYS",
    "BertConfig",
    "BertModel",
    "BertOutput",
    "hf_config_dict",
    "hf_state_dict",
    "load_hf_state_dict",
]
