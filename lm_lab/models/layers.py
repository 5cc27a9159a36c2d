"""Pieces shared by the model families: head splitting, SDPA attention, document masks, activations.

Plain PyTorch; no Lightning or Hydra here.
"""

from __future__ import annotations

import functools
import math
import typing

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


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
    return sdpa(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)


# Under CPU autocast, attention over at most this many positions runs as plain math with bf16
# matmuls (``_cpu_attention_math``): faster than PyTorch's fused kernel in fp32 at short lengths,
# slower past it (forward + backward, bf16 math / fp32 fused: 0.88x at 64 positions (causal), 0.69x at
# 128 (padding mask), 1.52x at 256, 1.60x at 512; ``bench/cpu_levers.py --attention``, docs/benchmarks.md).
CPU_BF16_MATH_ATTENTION_MAX_LEN = 128


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: typing.Any) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, with lm_lab's CPU paths for mixed precision and dropout.

    PyTorch's fused CPU attention kernel is slower in bf16 than in fp32 (its backward 2-5x at these
    models' shapes: ``bench/cpu_levers.py``), which undid most of what CPU mixed precision gains in
    the matmuls (bf16 matmuls run ~2x fp32's rate on AVX512-BF16 CPUs). So under CPU autocast:
    sequences of up to ``CPU_BF16_MATH_ATTENTION_MAX_LEN`` positions are attended as plain math with
    bf16 matmuls and an fp32 softmax (what SDPA's own math path does with bf16 inputs, and faster than
    either fused kernel at these lengths); longer ones by the fused kernel in fp32, cast back to bf16.
    With attention dropout (no fused CPU kernel) the math runs with ``dropout``'s faster mask (bf16
    matmuls under the same rule, fp32 otherwise). Elsewhere (GPUs, fp32 on CPU without dropout) SDPA
    is called as is.
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    short_bf16 = q.dtype == torch.bfloat16 and max(q.size(-2), k.size(-2)) <= CPU_BF16_MATH_ATTENTION_MAX_LEN
    if short_bf16 or kwargs.get("dropout_p", 0.0) > 0.0:
        return _cpu_attention_math(q, k, v, matmul_dtype=torch.bfloat16 if short_bf16 else torch.float32, **kwargs)
    if q.dtype in (torch.bfloat16, torch.float16):
        mask = kwargs.get("attn_mask")
        if mask is not None and mask.is_floating_point():
            kwargs["attn_mask"] = mask.float()
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _cpu_attention_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    enable_gqa: bool = False,
    matmul_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """SDPA's math path (scores, mask, softmax, dropout, values): matmuls in ``matmul_dtype``, the
    scaling, mask and softmax in fp32; returns ``q``'s dtype.

    With attention dropout SDPA has no fused CPU kernel and runs this same computation in C++, but
    its dropout draws the mask with ``bernoulli_``, half the speed of ``dropout`` below: on BERT-Mini's
    (32, 4, 128, 128) probabilities 15 ms forward + backward against 8.5 ms (``bench/bert_speed.py``).
    """
    dtype = q.dtype
    with torch.autocast("cpu", enabled=False):
        q, k, v = q.to(matmul_dtype), k.to(matmul_dtype), v.to(matmul_dtype)
        if enable_gqa and k.size(-3) != q.size(-3):
            k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)
            v = v.repeat_interleave(q.size(-3) // v.size(-3), dim=-3)
        scale = 1.0 / math.sqrt(q.size(-1))
        scores = torch.matmul(q, k.transpose(-2, -1))
        if is_causal:
            attn_mask = _causal_bias(scores.size(-2), scores.size(-1), q.device)
        elif attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, device=q.device).masked_fill_(~attn_mask, float("-inf"))
        # With a mask, one op: fp32 bias + scale * scores (bf16 scores promoted to fp32).
        scores = scores.float().mul_(scale) if attn_mask is None else torch.add(attn_mask.float(), scores, alpha=scale)
        probs = dropout(torch.softmax(scores, dim=-1), dropout_p)
        return torch.matmul(probs.to(matmul_dtype), v).to(dtype)


@functools.lru_cache(maxsize=8)
def _causal_bias(t: int, s: int, device: torch.device) -> torch.Tensor:
    """(t, s) fp32: 0 where query i may see key j (j <= i, SDPA's ``is_causal``), -inf elsewhere."""
    return torch.full((t, s), float("-inf"), device=device).triu_(1)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout``; on CPU the mask is ``torch.rand(...) >= p``, scaled by ``1 / (1 - p)``.

    The same distribution as PyTorch's (each element kept with probability ``1 - p``, kept ones
    scaled), drawn from the same generator, but ``bernoulli_``, which ``F.dropout`` uses on CPU,
    is about half as fast as ``torch.rand``: forward + backward 3.3 ms against 5.8 ms on BERT-Mini's
    (3027, 256) hidden states, 8.5 against 15.1 ms on its attention probabilities (2 threads).
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not 0.0 < p < 1.0:
        return F.dropout(x, p, training=True)
    mask = torch.rand(x.shape, device=x.device).ge_(p).mul_(1.0 / (1.0 - p))
    return x * (mask if x.dtype == mask.dtype else mask.to(x.dtype))


class Dropout(nn.Dropout):
    """``nn.Dropout`` through ``dropout`` above (its faster CPU mask); the same module otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


# ------------------------------------------------------------------ documents in packed blocks
def document_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) token ids -> (B, T) document index within each row (0, 1, ...).

    Packed blocks hold documents each followed by ``eos_id`` (``data.packing``); the separator
    belongs to the document it ends, so a new document starts right after each ``eos_id``. A block
    that starts mid-document counts that fragment as document 0.
    """
    ends = (input_ids == eos_id).long()
    return ends.cumsum(1) - ends


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids (non-decreasing along T) -> (B, T) positions restarting at 0 in each document."""
    t = doc_ids.size(1)
    idx = torch.arange(t, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(1).values  # start of each token's document
    return idx - first


AttentionMask = torch.Tensor | BlockMask


def use_flex(device: torch.device, dropout: float) -> bool:
    """FlexAttention where it has a fused kernel (CUDA) and no attention dropout is asked for (it has none)."""
    return device.type == "cuda" and dropout == 0.0


def causal_document_mask(doc_ids: torch.Tensor, *, flex: bool = False) -> AttentionMask:
    """The mask of causal attention inside each document, built once per forward and shared by every layer.

    With ``flex`` (``use_flex``: on CUDA) a FlexAttention ``BlockMask``: its kernel skips the tiles
    where two documents do not meet, so the cost falls with the number of documents. Otherwise a
    boolean (B, 1, T, T) tensor for SDPA (True = may attend): a dense mask per row, which also rules
    out SDPA's flash kernel (its cost on CPU: ``bench/document_mask.py``).
    """
    b, t = doc_ids.shape
    if flex:

        def same_document_causal(b_: torch.Tensor, h_: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return (doc_ids[b_, q] == doc_ids[b_, kv]) & (q >= kv)

        return create_block_mask(same_document_causal, b, None, t, t, device=doc_ids.device)
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    return (doc_ids[:, None, :, None] == doc_ids[:, None, None, :]) & causal  # (B, 1, T, T)


_compiled_flex: typing.Callable[..., torch.Tensor] | None = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, enable_gqa: bool) -> torch.Tensor:
    # Eager flex_attention is a reference implementation over the materialised scores; the fused
    # kernel comes from torch.compile, so on CUDA it is compiled once here (as torchtitan does),
    # whether or not the whole network is.
    global _compiled_flex
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: AttentionMask | None = None,
    dropout: float = 0.0,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Causal attention on (B, nh, T, hs) queries and (B, nkv, T, hs) keys/values.

    ``mask`` None: plain causal SDPA (its fused kernels). A boolean tensor from
    ``causal_document_mask``: SDPA with that mask (causality is inside it). A ``BlockMask``:
    FlexAttention, which has no attention dropout (``use_flex`` keeps such runs on SDPA).
    """
    if mask is None:
        return sdpa(q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=enable_gqa)
    if isinstance(mask, BlockMask):
        if dropout:
            raise ValueError("FlexAttention has no attention dropout: build a boolean mask (flex=False) instead")
        return _flex(q, k, v, mask, enable_gqa)
    return sdpa(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=enable_gqa)


class LayerKV:
    """One layer's cached keys and values, (B, nkv, S, hs) each."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions' keys and values; returns all of them, the new ones last."""
        if self.k is not None and self.v is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


class KVCache:
    """The keys and values of every position a decoder has read, per layer, for generation.

    A forward pass given the cache reads its ``T`` tokens as positions ``length .. length + T - 1``
    (attending to all ``length`` cached ones and causally among themselves), appends their keys and
    values, and advances ``length``. ``lm_lab.models.generation.generate`` then runs each new token
    through the network alone instead of re-reading the whole window. Inference only: no document
    masks, no dropout.
    """

    def __init__(self, n_layer: int) -> None:
        self.layers = [LayerKV() for _ in range(n_layer)]
        self.length = 0

    def check(
        self, t: int, max_seq_len: int, document_ids: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> int:
        """Whether a network may read ``t`` more tokens through the cache (plain positions, at most
        ``max_seq_len`` in all); returns the number of cached positions."""
        if document_ids is not None or position_ids is not None:
            raise ValueError("kv_cache reads plain positions after the cached ones: no document_ids/position_ids")
        if self.length + t > max_seq_len:
            raise ValueError(f"{self.length} cached + {t} new tokens exceed model.max_seq_len={max_seq_len}")
        return self.length

    def positions(self, t: int, device: torch.device) -> torch.Tensor:
        """(1, t): the positions of ``t`` tokens that follow the cached ones."""
        return torch.arange(self.length, self.length + t, device=device)[None]


def cached_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, *, enable_gqa: bool = False
) -> torch.Tensor:
    """Attention of ``T`` new queries (positions ``past .. past + T - 1``) over ``past + T`` keys (the
    cached ones first): each query sees every cached key and the new keys up to its own position."""
    t = q.size(-2)
    if past == 0:
        return sdpa(q, k, v, is_causal=True, enable_gqa=enable_gqa)
    if t == 1:
        return sdpa(q, k, v, enable_gqa=enable_gqa)
    mask = torch.ones(t, past + t, dtype=torch.bool, device=q.device).tril_(diagonal=past)
    return sdpa(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


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
