"""Hugging Face ``LlamaForCausalLM`` interop: config and weights, both directions.

Our parameter names are HF's, so weights are copied as they are. Only the config needs mapping.
Rotary settings: transformers 5 keeps them in ``rope_parameters`` (``{"rope_type": "default",
"rope_theta": ...}``) and turns a top-level ``rope_theta`` into that on load; transformers 4 reads
the top-level ``rope_theta``. The export writes both (they agree), the import accepts either.

No transformers import here: the config is a plain dict (what ``config.json`` holds).
"""

from __future__ import annotations

import typing
from collections.abc import Mapping

import torch

from lm_lab.models.heads import HeadLayout
from lm_lab.models.llama.model import Llama, LlamaConfig

# transformers.LlamaConfig's defaults, for keys a config.json leaves out.
_HF_DEFAULTS: dict[str, typing.Any] = {
    "num_key_value_heads": None,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
}
_ROPE_KEYS = {"rope_type", "type", "rope_theta"}


def hf_config_dict(cfg: LlamaConfig) -> dict[str, typing.Any]:
    """Keyword arguments for ``transformers.LlamaConfig`` (and the ``config.json`` of an export)."""
    if cfg.vocab_size is None:
        raise ValueError(
            "LlamaConfig.vocab_size is None: set it before exporting (train() takes it from the tokenizer)"
        )
    return dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,  # read by transformers 4
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},  # read by transformers 5
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=cfg.dropout,
        initializer_range=cfg.init_std,
    )


def _rope_theta(hf: Mapping[str, typing.Any]) -> float:
    """The rotary base from a Llama config dict, refusing scaled or partial rotary variants."""
    scaling = hf.get("rope_scaling")
    params = hf.get("rope_parameters")
    for name, value in (("rope_scaling", scaling), ("rope_parameters", params)):
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise ValueError(f"{name}={value!r} is not a dict: only plain rotary embeddings are supported")
        kind = value.get("rope_type", value.get("type", "default"))
        extra = sorted(set(value) - _ROPE_KEYS)
        if kind != "default" or extra:
            raise ValueError(
                f"{name}={dict(value)!r} is not supported: only plain rotary embeddings (rope_type 'default') are implemented"
            )
    partial = hf.get("partial_rotary_factor")
    if partial not in (None, 1, 1.0):
        raise ValueError(
            f"partial_rotary_factor={partial} is not supported: only full-width rotary embeddings are implemented"
        )
    theta = None
    if params is not None:
        theta = params.get("rope_theta")
    if theta is None and scaling is not None:
        theta = scaling.get("rope_theta")
    if theta is None:
        theta = hf.get("rope_theta", 10000.0)
    top = hf.get("rope_theta")
    if top is not None and float(top) != float(theta):
        raise ValueError(f"rope_theta={top} disagrees with rope_parameters.rope_theta={theta}")
    return float(theta)


def config_from_hf(hf: Mapping[str, typing.Any]) -> LlamaConfig:
    """The ``LlamaConfig`` of a ``LlamaForCausalLM`` ``config.json`` dict.

    Refuses, with a one-line ``ValueError``, what this network does not implement: rope scaling
    (linear, dynamic, yarn, llama3 ...), partial rotary, biases, a ``head_dim`` other than
    hidden_size / num_attention_heads, activations other than SiLU. Sizes are taken as stated
    (``n_kv_head`` and ``intermediate_size`` come back as numbers, not None).
    """
    hf = {**_HF_DEFAULTS, **{k: v for k, v in hf.items() if v is not None or k not in _HF_DEFAULTS}}
    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"model_type={model_type!r} is not 'llama': only LlamaForCausalLM configs are supported")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"{key}=true is not supported: this network has no biases")
    if hf["hidden_act"] != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported: only 'silu' (SwiGLU) is implemented")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        raise ValueError(
            f"head_dim={head_dim} != hidden_size/num_attention_heads={hidden}/{heads}: decoupled head sizes are not supported"
        )
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=heads,
        n_kv_head=hf["num_key_value_heads"] if hf["num_key_value_heads"] is not None else heads,
        n_embd=hidden,
        intermediate_size=hf["intermediate_size"],
        max_seq_len=hf["max_position_embeddings"],
        rope_theta=_rope_theta(hf),
        rms_norm_eps=float(hf["rms_norm_eps"]),
        tie_embeddings=bool(hf["tie_word_embeddings"]),
        dropout=float(hf["attention_dropout"]),
        init_std=float(hf["initializer_range"]),
    )


def hf_state_dict(net: Llama) -> dict[str, torch.Tensor]:
    """Our weights under LlamaForCausalLM's names (detached CPU copies).

    ``lm_head.weight`` is left out when it is tied to the embedding, as ``save_pretrained`` does.
    """
    out = {name: t.detach().cpu().clone() for name, t in net.state_dict().items()}
    if net.config.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def load_hf_state_dict(net: Llama, sd: Mapping[str, torch.Tensor]) -> None:
    """Load LlamaForCausalLM weights (HF names) into ``net``, strictly.

    With tied embeddings ``lm_head.weight`` may be absent (``save_pretrained`` drops it) or equal to
    the embedding; a different one is refused. ``rotary_emb.inv_freq`` buffers, which older
    checkpoints store, are ignored (the rotary tables are recomputed).
    """
    ours = {name: t for name, t in sd.items() if not name.endswith("rotary_emb.inv_freq")}
    if net.config.tie_embeddings:
        emb = ours.get("model.embed_tokens.weight")
        head = ours.pop("lm_head.weight", None)
        if head is not None and emb is not None and not torch.equal(head, emb):
            raise ValueError(
                "checkpoint has an lm_head.weight different from model.embed_tokens.weight: set model.tie_embeddings=false"
            )
        if emb is not None:
            ours["lm_head.weight"] = emb
    net.load_state_dict(ours, strict=True)


__all__ = ["config_from_hf", "hf_config_dict", "hf_state_dict", "load_hf_state_dict"]


# ---------------------------------------------------------------- task heads (LlamaFor*)
HF_HEADS = {
    "sequence_classification": HeadLayout("LlamaForSequenceClassification", "score", bias=False, dropout=False),
    "token_classification": HeadLayout("LlamaForTokenClassification", "score", bias=True, dropout=True),
}


def to_hf_weights(sd: Mapping[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Any of our state dicts under HF's names (they are the same names)."""
    return {n: t.detach().cpu().clone() for n, t in sd.items()}


def from_hf_weights(sd: Mapping[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """HF weights under our names, without the ``rotary_emb.inv_freq`` buffers old checkpoints store."""
    return {n: t for n, t in sd.items() if not n.endswith("rotary_emb.inv_freq")}
