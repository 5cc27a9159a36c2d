"""lm_lab's CPU dropout (``layers.dropout``) and the attention it runs when attention dropout is on:
PyTorch's dropout distribution and SDPA's math, against PyTorch's own functions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lm_lab.models.layers import Dropout, attention, causal_attention, dropout, sdpa


def test_dropout_keeps_1_minus_p_scaled_and_back_propagates_through_the_same_mask() -> None:
    torch.manual_seed(0)
    x = torch.randn(400, 500, requires_grad=True)
    p = 0.3
    y = dropout(x, p)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005  # 200k Bernoulli draws: s.d. 0.001
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.float() / (1 - p))
    assert dropout(x, p, training=False) is x and dropout(x, 0.0) is x


def test_dropout_is_seeded_and_keeps_the_dtype() -> None:
    x = torch.randn(64, 64).bfloat16()
    torch.manual_seed(1)
    a = dropout(x, 0.1)
    torch.manual_seed(1)
    b = dropout(x, 0.1)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    module = Dropout(0.1)
    assert module.eval()(x) is x  # eval: the identity, as nn.Dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_with_dropout_is_sdpas_math(dtype: torch.dtype) -> None:
    """With a dropout so small that nothing is dropped, the CPU path with dropout gives SDPA's result
    without it: the same scaling, masks (padding, causal, grouped heads) and softmax."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, dtype=dtype) for _ in range(3))
    pad = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    pad[0, ..., 11:] = False
    tiny = 1e-12  # kept with probability 1 - 1e-12: no element of 2 x 4 x 16 x 16 is dropped
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=pad).to(dtype)
    torch.testing.assert_close(attention(q, k, v, mask=pad, dropout=tiny), ref, **tol)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(dtype)
    torch.testing.assert_close(causal_attention(q, k, v, dropout=tiny), ref, **tol)
    kv = k[:, :2].float(), v[:, :2].float()  # grouped-query attention: 2 key/value heads for 4 queries
    ref = F.scaled_dot_product_attention(q.float(), *kv, is_causal=True, enable_gqa=True).to(dtype)
    got = sdpa(q, k[:, :2], v[:, :2], is_causal=True, dropout_p=tiny, enable_gqa=True)
    torch.testing.assert_close(got, ref, **tol)


def test_attention_dropout_drops_probabilities_at_rate_p() -> None:
    """Uniform attention (zero queries) over values that are one-hot in their key position: the output
    is the dropped-out probabilities themselves, 1/T kept (scaled by 1/(1-p)) or 0."""
    t, p = 64, 0.25
    q = torch.zeros(4, 2, t, t)
    k = torch.zeros(4, 2, t, t)
    v = torch.eye(t).expand(4, 2, t, t).contiguous()
    torch.manual_seed(0)
    out = attention(q, k, v, dropout=p)
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01  # 32k draws
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / t / (1 - p)))
    assert math.isclose(out.sum(-1).mean().item(), 1.0, rel_tol=0.01)  # expectation preserved
