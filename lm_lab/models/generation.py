"""Sampling from any decoder: ``net(ids) -> logits (B, T, V)`` and ``net.config.max_seq_len``.

A decoder with ``new_kv_cache()`` (GPT, Llama; ``lm_lab.models.layers.KVCache``) reads the prompt
once and then each new token alone, reusing the keys and values of the positions before it, for as
long as the sequence fits ``max_seq_len``. Past that, every step re-reads the last ``max_seq_len``
tokens, as without a cache: the positions of a cropped window are renumbered from 0 (and every key
depends on the tokens before it in the window), so cached keys would no longer be the ones the
window gives.
"""

from __future__ import annotations

import contextlib
import typing

import torch
from torch import nn


@torch.no_grad()
def generate(
    net: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample ``max_new_tokens`` continuations of ``idx`` (B, T) from decoder ``net``.

    ``temperature=0`` is greedy decoding. ``top_k`` keeps the k most likely tokens, ``top_p``
    the smallest set whose probability reaches p (nucleus sampling). Stops early when every
    row has produced ``eos_token_id``.
    """
    window = net.config.max_seq_len
    new_cache = getattr(net, "new_kv_cache", None)
    cache = new_cache() if callable(new_cache) else None
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    with _eager():
        for _ in range(max_new_tokens):
            if cache is not None and idx.size(1) <= window:
                logits = net(idx[:, cache.length :], kv_cache=cache)[:, -1, :].float()  # the prompt, then one token
            else:
                logits = net(idx[:, -window:])[:, -1, :].float()  # (B, V)
            next_id = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            idx = torch.cat([idx, next_id], dim=1)
            if eos_token_id is not None:
                done |= next_id.squeeze(1) == eos_token_id
                if bool(done.all()):
                    break
    return idx


def _eager() -> typing.ContextManager[None]:
    """Eager mode for a compiled network (``compile=true``): every generation step has a new sequence
    length, and compiling a graph for each took ~15 s of a run's first validation sample and ~9 s of
    its final one on a 2-core CPU, where eager sampling takes a fraction of a second."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


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
