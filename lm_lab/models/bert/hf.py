"""BERT <-> ``transformers.BertForPreTraining``: config and weights in both directions.

Our module tree has HF's names, so weights map one to one. Two HF quirks are reproduced on purpose:
``cls.predictions.decoder.weight`` is the word-embedding matrix (tied), and
``cls.predictions.decoder.bias`` is the same Parameter as ``cls.predictions.bias``; HF lists both
aliases in its state_dict, so we do too. ``hf_state_dict`` drops them by default (like
``save_pretrained`` does, and safetensors refuses shared tensors); ``load_hf_state_dict``
re-creates them. HF's ``position_ids`` / ``token_type_ids`` buffers are non-persistent in HF 5.x;
older checkpoints carry them and they are ignored.
"""

from __future__ import annotations

import typing

import torch

from lm_lab.models.bert.heads import BertForPreTraining
from lm_lab.models.bert.model import BertConfig
from lm_lab.models.heads import HeadLayout
from lm_lab.models.layers import HF_ACTIVATION_NAMES

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


def hf_state_dict(model: BertForPreTraining, *, include_tied: bool = False) -> dict[str, torch.Tensor]:
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


def load_hf_state_dict(model: BertForPreTraining, sd: typing.Mapping[str, torch.Tensor]) -> None:
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


def config_from_hf(hf: typing.Mapping[str, typing.Any]) -> BertConfig:
    """The ``BertConfig`` of a BERT ``config.json``."""
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"position_embedding_type={hf['position_embedding_type']!r}: lm_lab's BERT has absolute positions only"
        )
    act = {v: k for k, v in HF_ACTIVATION_NAMES.items()}.get(hf.get("hidden_act", "gelu"), "gelu")
    return BertConfig(
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        n_embd=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        type_vocab_size=hf.get("type_vocab_size", 2),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        pad_token_id=hf.get("pad_token_id") or 0,
        activation=act,
        dropout=hf.get("hidden_dropout_prob", 0.1),  # the training settings: eval() turns them off
        attn_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        init_std=hf.get("initializer_range", 0.02),
    )


# ---------------------------------------------------------------- task heads (BertFor*)
HF_HEADS = {
    "sequence_classification": HeadLayout("BertForSequenceClassification", "classifier", bias=True, dropout=True),
    "token_classification": HeadLayout("BertForTokenClassification", "classifier", bias=True, dropout=True),
}


def to_hf_weights(sd: typing.Mapping[str, torch.Tensor], cfg: BertConfig) -> dict[str, torch.Tensor]:
    """Any of our state dicts under HF's names (the same names), without the tied aliases."""
    return {n: t.detach().cpu().clone() for n, t in sd.items() if n not in HF_TIED_KEYS}


def from_hf_weights(sd: typing.Mapping[str, torch.Tensor], cfg: BertConfig) -> dict[str, torch.Tensor]:
    """HF weights under our names, without the position/token-type buffers old checkpoints store."""
    return {n: t for n, t in sd.items() if not n.endswith(("embeddings.position_ids", "embeddings.token_type_ids"))}
