"""BERT's pretraining heads (masked LM, next-sentence prediction) on top of the plain encoder.

``BertForPreTraining`` is the module the ``masked_lm`` objective trains: ``bert`` (the plain
``Bert`` encoder) plus ``cls`` (the heads), so its ``state_dict`` has exactly the keys of
``transformers.BertForPreTraining``. A classification head reads ``Bert``'s output instead and
needs none of this.
"""

from __future__ import annotations

import typing

import torch
from torch import nn

from lm_lab.models.bert.model import Bert, BertConfig
from lm_lab.models.layers import ACTIVATIONS, init_normal_


class BertOutput(typing.NamedTuple):
    """``mlm_logits`` is (B, T, V), or (N_masked, V) when ``mlm_positions`` was given."""

    mlm_logits: torch.Tensor
    nsp_logits: torch.Tensor | None  # (B, 2); None when not asked for (``pair_logits=False``)
    hidden_states: torch.Tensor  # (B, T, C), output of the last encoder layer


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


class BertForPreTraining(nn.Module):
    """BERT with MLM and NSP heads; parameter names equal ``transformers.BertForPreTraining``'s."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.bert = Bert(cfg)  # initialises itself
        self.config = cfg
        self.cls = BertPreTrainingHeads(cfg, self.bert.embeddings.word_embeddings)
        # HF BERT init for the heads (the MLM bias is created as zeros). The decoder is skipped
        # because its weight *is* the word embedding: re-initialising it would undo the zeroed pad row.
        decoder = self.cls.predictions.decoder
        for module in self.cls.modules():
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
        h = self.bert(input_ids, token_type_ids, attention_mask, pooled=False).hidden_states  # (B, T, C)

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
