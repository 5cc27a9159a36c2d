"""Llama: a decoder-only Transformer with RMSNorm, rotary positions, grouped-query attention and SwiGLU.

The parameter layout mirrors Hugging Face ``LlamaForCausalLM`` key by key (``model.embed_tokens``,
``model.layers.{i}.self_attn.q_proj`` ... ``model.norm``, ``lm_head``), and every weight is an
``nn.Linear`` / ``nn.Embedding`` / RMSNorm vector stored as HF stores it, so import and export
(``lm_lab.models.llama.hf``) are plain copies. No biases anywhere; no position embeddings (the
rotary tables are non-persistent buffers, so they are not in ``state_dict``).

Plain PyTorch: no Lightning or Hydra here.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lm_lab.models.generation import generate
from lm_lab.models.layers import (
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

# SwiGLU's hidden width when ``intermediate_size`` is None: 2/3 of the usual 4 * n_embd (so the three
# matrices cost what GPT's two do), rounded up to a multiple of this, as in Meta's reference code.
FFN_MULTIPLE_OF = 256


@dataclass
class LlamaConfig(ConfigBase):
    """Architecture of a Llama-style decoder. ``vocab_size`` is normally resolved from the tokenizer.

    ``n_kv_head`` is the number of key/value heads: None (or ``n_head``) is ordinary multi-head
    attention, a divisor of ``n_head`` below it is grouped-query attention (GQA), 1 is multi-query.
    ``intermediate_size`` is the SwiGLU hidden width; None means ``int(2/3 * 4 * n_embd)`` rounded
    up to a multiple of 256 (Meta's rule: 2048 for n_embd=768, 1536 for 576, 256 for 64).
    ``dropout`` is applied, as in the GPT network here, to the embeddings, the attention
    probabilities and each residual branch; Llama checkpoints are trained without it.
    """

    _section: typing.ClassVar[str] = "model"
    network: typing.ClassVar[str] = "llama"
    vocab_size: int | None = None  # None: taken from the tokenizer in train()
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # None: n_head (multi-head attention); fewer: grouped-query attention
    n_embd: int = 768
    intermediate_size: int | None = None  # None: 2/3 * 4 * n_embd rounded up to a multiple of 256
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = field(default=0.0, metadata=RESUME_FREE)
    init_std: float = field(default=0.02, metadata=RESUME_FREE)
    # Packed blocks: attend only within each document (documents end with the EOS token; the
    # objective passes their ids to forward as ``document_ids``), and optionally restart positions.
    document_mask: bool = False
    document_positions: bool = False

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (``n_kv_head``, or ``n_head`` when that is None)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def d_ff(self) -> int:
        """SwiGLU hidden width (``intermediate_size`` or the 2/3 * 4 * n_embd rule)."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        hidden = 8 * self.n_embd // 3
        return FFN_MULTIPLE_OF * -(-hidden // FFN_MULTIPLE_OF)

    def validate(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "max_seq_len"):
            value = getattr(self, name)
            self.require(value is None or value > 0, f"model.{name}={value} must be > 0")
        self.require(
            self.n_embd % self.n_head == 0,
            f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}: "
            f"choose n_embd a multiple of n_head (e.g. model.n_embd={self.n_head * max(1, self.n_embd // self.n_head)})",
        )
        self.require(
            self.n_head % self.kv_heads == 0,
            f"model.n_head={self.n_head} is not divisible by model.n_kv_head={self.n_kv_head}: "
            f"choose n_kv_head a divisor of n_head (or null for one key/value head per query head)",
        )
        self.require(
            self.head_dim % 2 == 0,
            f"model.n_embd / model.n_head = {self.n_embd}/{self.n_head} = {self.head_dim} is odd: rotary embeddings "
            f"rotate pairs of dimensions, choose model.n_embd and model.n_head so the head size is even",
        )
        self.require(self.rope_theta > 0, f"model.rope_theta={self.rope_theta} must be > 0")
        self.require(self.rms_norm_eps > 0, f"model.rms_norm_eps={self.rms_norm_eps} must be > 0")
        self.require(0.0 <= self.dropout < 1.0, f"model.dropout={self.dropout} must be in [0, 1)")
        self.require(self.init_std > 0, f"model.init_std={self.init_std} must be > 0")
        self.require(
            self.document_mask or not self.document_positions,
            "model.document_positions=true restarts positions at each document of a packed block: "
            "it needs model.document_mask=true",
        )


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain and no bias (HF ``LlamaRMSNorm``).

    Normalises in float32 and casts back to the input dtype before the gain, exactly as HF does,
    so bf16 runs match HF's numerics.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings, HF's non-interleaved (``rotate_half``) layout.

    The tables cover ``max_seq_len`` positions and are computed in float32 like HF's; they are
    non-persistent buffers (not in ``state_dict``). After building on the meta device and
    ``to_empty()``, call ``reset_tables()`` to fill them.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim), persistent=False)
        self.reset_tables()

    @torch.no_grad()
    def reset_tables(self) -> None:
        device = self.cos.device
        if device.type == "meta":
            return
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device) / self.head_dim)
        )
        freqs = torch.arange(self.max_seq_len, device=device).float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs): the same frequency for dims i and i + hs/2
        self.cos.copy_(emb.cos())
        self.sin.copy_(emb.sin())

    def forward(
        self, t: int, dtype: torch.dtype, position_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (T, hs) in ``dtype``, for positions 0..t-1; with ``position_ids`` (B, T)
        each (B, 1, T, hs), for those positions."""
        if position_ids is None:
            return self.cos[:t].to(dtype), self.sin[:t].to(dtype)
        return self.cos[position_ids].unsqueeze(1).to(dtype), self.sin[position_ids].unsqueeze(1).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, nh, T, hs) queries or keys by their positions' angles (cos/sin (T, hs) or (B, 1, T, hs))."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Causal self-attention with rotary positions and grouped-query key/value heads.

    GQA goes through SDPA's ``enable_gqa=True`` rather than repeating the key/value heads first.
    Measured on a 2-core CPU (torch 2.13, median of 200): attention forward+backward for the
    llama_tiny shape (B=8, nh=4, nkv=2, T=256, hs=16) took 5.1-5.2 ms with ``enable_gqa`` against
    5.3-5.4 ms with ``repeat_interleave`` or HF's expand+reshape (32 vs 33 ms at T=512, hs=32); a
    whole llama_tiny training step was within noise (~41 ms either way). The fused path also
    allocates no repeated k/v copies. Both pair query head h with key/value head
    h // (n_head / n_kv_head), HF's ``repeat_kv`` order.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, self.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, self.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.resid_dropout = Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask | None = None,
        cache: LayerKV | None = None,
        past: int = 0,
    ) -> torch.Tensor:
        q = apply_rotary(split_heads(self.q_proj(x), self.n_head), cos, sin)  # (B, nh, T, hs)
        k = apply_rotary(split_heads(self.k_proj(x), self.n_kv_head), cos, sin)  # (B, nkv, T, hs)
        v = split_heads(self.v_proj(x), self.n_kv_head)
        gqa = self.n_kv_head != self.n_head
        if cache is not None:  # generation: x holds the positions after the `past` cached ones
            y = cached_causal_attention(q, *cache.append(k, v), past, enable_gqa=gqa)
        else:
            y = causal_attention(q, k, v, mask=mask, dropout=self.dropout if self.training else 0.0, enable_gqa=gqa)
        return self.resid_dropout(self.o_proj(merge_heads(y)))


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.n_embd, bias=False)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(rms(x)), then x + mlp(rms(x))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttentionMask | None = None,
        cache: LayerKV | None = None,
        past: int = 0,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, past)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """Embeddings, decoder layers and the final norm (HF ``LlamaModel``; ``Llama.model``)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        assert cfg.vocab_size is not None
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.drop = Dropout(cfg.dropout)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.config = cfg

    def forward(
        self,
        idx: torch.Tensor,
        document_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        **_: typing.Any,
    ) -> torch.Tensor:
        """(B, T) ids -> (B, T, C) hidden states. Causal: right padding needs no mask;
        ``attention_mask``/``token_type_ids`` are accepted and ignored.

        ``document_ids`` (B, T) (``layers.document_ids``): attend only within each document, with
        positions restarting per document when ``config.document_positions``. ``position_ids``
        (B, T): explicit positions (default 0..T-1). ``kv_cache`` (``Llama.new_kv_cache()``,
        generation): the tokens follow the cached positions, whose keys and values are reused."""
        if kv_cache is not None:
            return self._cached_forward(idx, kv_cache, document_ids, position_ids)
        mask = None
        if document_ids is not None:
            flex = use_flex(idx.device, self.config.dropout if self.training else 0.0)
            mask = causal_document_mask(document_ids, flex=flex)
            if position_ids is None and self.config.document_positions:
                position_ids = document_positions(document_ids)
        x = self.drop(self.embed_tokens(idx))  # (B, T, C)
        cos, sin = self.rotary_emb(idx.size(1), x.dtype, position_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)

    def _cached_forward(
        self,
        idx: torch.Tensor,
        cache: KVCache,
        document_ids: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        t = idx.size(1)
        past = cache.check(t, self.config.max_seq_len, document_ids, position_ids)
        x = self.drop(self.embed_tokens(idx))
        cos, sin = self.rotary_emb(t, x.dtype, cache.positions(t, idx.device))
        for layer, layer_cache in zip(self.layers, cache.layers, strict=True):
            x = layer(x, cos, sin, None, layer_cache, past)
        cache.length += t
        return self.norm(x)


class Llama(nn.Module):
    """Llama-style causal language model.

    Initialisation: N(0, ``init_std``) for every linear layer and the embedding (HF's
    ``initializer_range``), ones for the RMSNorm gains, and GPT-2's scaled residual init,
    N(0, ``init_std / sqrt(2 * n_layer)``), for ``o_proj`` and ``down_proj``, the two projections
    that add into the residual stream (so its variance does not grow with depth). With
    ``tie_embeddings`` the output head is the embedding matrix itself (one ``Parameter``).
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("LlamaConfig.vocab_size is None: set it (train() takes it from the tokenizer)")
        self.config = cfg
        self.model = LlamaBody(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(lambda m: init_normal_(m, cfg.init_std))
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std(cfg.init_std, cfg.n_layer))

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count, a tied embedding/head matrix counted once.

        nanoGPT's ``non_embedding`` count leaves out the position embeddings; Llama has none (the
        rotary tables are buffers), so both settings return the total. The argument is kept so
        the network is interchangeable with the GPT one.
        """
        del non_embedding
        return sum(p.numel() for p in self.parameters())

    def estimate_flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (PaLM appendix B): 6N + 12 * n_layer * n_embd * seq_len.

        ``seq_len`` is the length trained at (the data's block size). N counts the weights that
        multiply: an untied input embedding is a lookup and is left out; a tied one is the output
        head's matrix and stays. Grouped-query attention does not change the attention term:
        every query head still scores ``seq_len`` keys.
        """
        c = self.config
        n = self.num_params()
        if not c.tie_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_embd * seq_len

    def forward(self, idx: torch.Tensor, **kwargs: typing.Any) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, V); ``document_ids=``/``position_ids=`` as in ``LlamaBody``."""
        return self.lm_head(self.hidden_states(idx, **kwargs))

    def hidden_states(self, idx: torch.Tensor, **kwargs: typing.Any) -> torch.Tensor:
        """idx (B, T) -> final-norm hidden states (B, T, C)."""
        t = idx.size(1)
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds model.max_seq_len={self.config.max_seq_len}")
        return self.model(idx, **kwargs)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy; ``targets`` (B, T), -100 ignored."""
        logits = self(idx)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    def new_kv_cache(self) -> KVCache:
        """An empty key/value cache for ``forward(..., kv_cache=)`` (used by ``generate``)."""
        return KVCache(self.config.n_layer)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs: typing.Any) -> torch.Tensor:
        """Sample continuations of ``idx`` (B, T); see ``lm_lab.models.generation.generate``."""
        return generate(self, idx, max_new_tokens, **kwargs)


__all__ = ["Llama", "LlamaConfig", "RMSNorm", "RotaryEmbedding", "apply_rotary", "rotate_half"]


def backbone(cfg: LlamaConfig) -> LlamaBody:
    """The plain network (HF's ``LlamaModel``), initialised exactly as inside ``Llama``."""
    return Llama(cfg).model
