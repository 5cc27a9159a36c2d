"""GPT: a decoder-only Transformer for causal language modelling.

The parameter layout mirrors Hugging Face ``GPT2LMHeadModel`` key by key
(``transformer.wte``, ``transformer.h.{i}.attn.c_attn`` ...), so export is a rename-free copy;
the only difference is that HF stores its ``Conv1D`` weights transposed relative to our
``nn.Linear`` (handled in ``hf_state_dict`` / ``load_hf_state_dict``).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lm_lab.config import ConfigBase
from lm_lab.models.layers import (
    ACTIVATIONS,
    HF_ACTIVATION_NAMES,
    attention,
    init_normal_,
    merge_heads,
    residual_std,
    split_heads,
)


@dataclass
class GPTConfig(ConfigBase):
    """Architecture of a GPT. ``vocab_size`` is normally resolved from the tokenizer."""

    _section: typing.ClassVar[str] = "model"
    family: str = "gpt"
    vocab_size: int | None = None  # None: taken from the tokenizer in train()
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    max_seq_len: int = 1024
    dropout: float = 0.0
    bias: bool = True
    activation: str = "gelu_tanh"
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02

    def validate(self) -> None:
        self.require(self.family == "gpt", f"model.family={self.family!r} must be 'gpt' for GPTConfig")
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


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        # One matmul for q, k and v (HF's c_attn), then the output projection.
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(x.size(-1), dim=2)  # 3 x (B, T, C)
        q, k, v = (split_heads(t, self.n_head) for t in (q, k, v))  # (B, nh, T, hs)
        y = attention(q, k, v, causal=True, dropout=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(merge_heads(y)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.activation]
        self.dropout = nn.Dropout(cfg.dropout)

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("GPTConfig.vocab_size is None: set it (train() takes it from the tokenizer)")
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.max_seq_len, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps, bias=cfg.bias),
            )
        )
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

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V)."""
        return self.lm_head(self.hidden_states(idx))

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds model.max_seq_len={self.config.max_seq_len}")
        pos = torch.arange(t, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy; ``targets`` (B, T), -100 ignored."""
        logits = self(idx)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` continuations of ``idx`` (B, T).

        ``temperature=0`` is greedy decoding. ``top_k`` keeps the k most likely tokens, ``top_p``
        the smallest set whose probability reaches p (nucleus sampling). Stops early when every
        row has produced ``eos_token_id``.
        """
        done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.max_seq_len :]
            logits = self(context)[:, -1, :].float()  # (B, V)
            next_id = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
            if eos_token_id is not None:
                done |= next_id.squeeze(1) == eos_token_id
                if bool(done.all()):
                    break
        return idx


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from (B, V) logits; returns (B, 1)."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


# ---------------------------------------------------------------- Hugging Face interop
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


__all__ = ["GPT", "GPTConfig", "hf_config_dict", "hf_state_dict", "load_hf_state_dict", "sample_next"]
