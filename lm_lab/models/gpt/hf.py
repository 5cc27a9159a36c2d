"""GPT-2 <-> ``transformers.GPT2LMHeadModel``: config and weights in both directions.

The parameter layout mirrors ``GPT2LMHeadModel`` key by key, so the mapping is a copy; HF stores its
``Conv1D`` weights transposed relative to our ``nn.Linear``.
"""

from __future__ import annotations

import typing

import torch

from lm_lab.models.gpt.model import GPT, GPTConfig
from lm_lab.models.heads import HeadLayout
from lm_lab.models.layers import HF_ACTIVATION_NAMES

_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_config_dict(cfg: GPTConfig) -> dict[str, typing.Any]:
    """Keyword arguments for ``transformers.GPT2Config`` describing the same network."""
    return dict(
        model_type="gpt2",
        architectures=["GPT2LMHeadModel"],
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_seq_len,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=4 * cfg.n_embd,
        activation_function=HF_ACTIVATION_NAMES[cfg.activation],
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=cfg.layer_norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=True,
    )


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under GPT2LMHeadModel's names (Conv1D weights transposed, zero biases
    written where ``bias=False`` since HF's GPT-2 always has them)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        out[name] = t.t().contiguous() if name.endswith(_CONV1D_SUFFIXES) else t.clone()
    if not model.config.bias:
        for name, t in list(out.items()):
            if name.endswith(".weight") and ("ln_" in name or "c_" in name):
                bias_name = name[: -len("weight")] + "bias"
                size = t.shape[1] if name.endswith(_CONV1D_SUFFIXES) else t.shape[0]
                out.setdefault(bias_name, torch.zeros(size, dtype=t.dtype))
    out.pop("lm_head.weight", None)  # tied to transformer.wte.weight
    return out


def load_hf_state_dict(model: GPT, sd: typing.Mapping[str, torch.Tensor]) -> None:
    """Load GPT2LMHeadModel weights (HF names) into ``model`` (must have ``bias=True``)."""
    ours = {}
    for name, t in sd.items():
        if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
            continue  # old HF checkpoints store the causal mask as a buffer
        ours[name] = t.t() if name.endswith(_CONV1D_SUFFIXES) else t
    ours.setdefault("lm_head.weight", ours["transformer.wte.weight"])
    model.load_state_dict(ours, strict=True)


def config_from_hf(hf: typing.Mapping[str, typing.Any]) -> GPTConfig:
    """The ``GPTConfig`` of a GPT-2 ``config.json``."""
    act = {v: k for k, v in HF_ACTIVATION_NAMES.items()}.get(hf.get("activation_function", "gelu_new"), "gelu_tanh")
    n_inner = hf.get("n_inner")
    if n_inner not in (None, 4 * hf["n_embd"]):
        raise ValueError(f"n_inner={n_inner} is not 4 * n_embd: lm_lab's GPT has no other MLP width")
    return GPTConfig(
        vocab_size=hf["vocab_size"],
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=hf["n_embd"],
        max_seq_len=hf["n_positions"],
        dropout=hf.get("resid_pdrop", 0.0),  # the training setting: eval() turns it off
        bias=True,
        activation=act,
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        init_std=hf.get("initializer_range", 0.02),
    )


# ---------------------------------------------------------------- task heads (GPT2For*)
HF_HEADS = {
    "sequence_classification": HeadLayout("GPT2ForSequenceClassification", "score", bias=False, dropout=False),
    "token_classification": HeadLayout("GPT2ForTokenClassification", "classifier", bias=True, dropout=True),
}


def to_hf_weights(sd: typing.Mapping[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """Any of our state dicts (LM, classifier, ...) under HF's names: Conv1D weights transposed, zero
    biases added where ``bias=False`` (HF's GPT-2 always has them)."""
    out = {
        n: (t.detach().cpu().t().contiguous() if n.endswith(_CONV1D_SUFFIXES) else t.detach().cpu().clone())
        for n, t in sd.items()
    }
    if not cfg.bias:
        for name, t in list(out.items()):
            if name.endswith(".weight") and ("ln_" in name or ".c_" in name):
                size = t.shape[1] if name.endswith(_CONV1D_SUFFIXES) else t.shape[0]
                out.setdefault(name[: -len("weight")] + "bias", torch.zeros(size, dtype=t.dtype))
    return out


def from_hf_weights(sd: typing.Mapping[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """HF weights under our names: Conv1D transposed back, the causal-mask buffers old checkpoints
    store dropped, and (``bias=False``) the all-zero biases ``to_hf_weights`` wrote dropped."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) and t.dim() != 1:
            continue
        if not cfg.bias and name.endswith(".bias") and ("ln_" in name or ".c_" in name):
            if bool(t.abs().max() > 0):
                raise ValueError(f"{name} is not zero but model.bias=false: use model.bias=true")
            continue
        out[name] = t.t() if name.endswith(_CONV1D_SUFFIXES) else t
    return out
