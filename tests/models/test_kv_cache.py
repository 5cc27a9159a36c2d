"""Generation with a key/value cache (GPT and Llama) against generation without one and against
Hugging Face's own cached decoding."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM
from transformers import LlamaConfig as HFLlamaConfig

from lm_lab.models.generation import generate, sample_next
from lm_lab.models.gpt import GPT, GPTConfig
from lm_lab.models.gpt.hf import hf_config_dict as gpt_hf_config
from lm_lab.models.gpt.hf import hf_state_dict as gpt_hf_state
from lm_lab.models.llama import Llama, LlamaConfig
from lm_lab.models.llama import hf_config_dict as llama_hf_config
from lm_lab.models.llama import hf_state_dict as llama_hf_state

V, WINDOW = 97, 24


def network(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt":
        net = GPT(GPTConfig(vocab_size=V, n_layer=2, n_head=4, n_embd=32, max_seq_len=WINDOW, bias=True))
    else:  # grouped-query attention: 4 query heads share 2 key/value heads
        net = Llama(
            LlamaConfig(
                vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48, max_seq_len=WINDOW
            )
        )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the init (zero biases, unit norms), so every parameter matters
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net.eval()


def without_cache(net: torch.nn.Module, idx: torch.Tensor, n: int, **kw) -> torch.Tensor:
    """The reference: every step re-reads the last ``max_seq_len`` tokens (nanoGPT's sampling loop)."""
    for _ in range(n):
        logits = net(idx[:, -WINDOW:])[:, -1, :].float()
        idx = torch.cat([idx, sample_next(logits, **kw)], dim=1)
    return idx


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_cached_forward_gives_the_full_forward_logits(kind: str) -> None:
    """The prompt in chunks (5 tokens, then 4 after 5 cached: the masked path), then one at a time."""
    net = network(kind)
    x = torch.randint(0, V, (2, WINDOW))
    with torch.no_grad():
        full = net(x)
        cache = net.new_kv_cache()
        parts = [net(x[:, :5], kv_cache=cache), net(x[:, 5:9], kv_cache=cache)]
        parts += [net(x[:, i : i + 1], kv_cache=cache) for i in range(9, WINDOW)]
    assert cache.length == WINDOW
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_cached_generation_equals_uncached_within_and_past_the_window(kind: str) -> None:
    """Greedy and seeded sampling, 2 prompts, 40 new tokens from 6: the cache serves the first 18, the
    window is re-read after that."""
    net = network(kind)
    prompt = torch.randint(0, V, (2, 6))
    for kw in ({"temperature": 0.0}, {"temperature": 1.0, "top_k": 20}, {"temperature": 0.8, "top_p": 0.9}):
        seeded = {"generator": torch.Generator().manual_seed(7)} if kw["temperature"] else {}
        ours = generate(net, prompt, 40, **kw, **seeded)
        seeded = {"generator": torch.Generator().manual_seed(7)} if kw["temperature"] else {}
        with torch.no_grad():
            reference = without_cache(net, prompt, 40, **kw, **seeded)
        assert torch.equal(ours, reference), kw
    # A prompt longer than the window: the cache is never used, the window is read at every step.
    long_prompt = torch.randint(0, V, (1, WINDOW + 3))
    with torch.no_grad():
        assert torch.equal(
            generate(net, long_prompt, 5, temperature=0.0), without_cache(net, long_prompt, 5, temperature=0.0)
        )


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_greedy_generation_matches_transformers_cached_decoding(kind: str) -> None:
    net = network(kind)
    if kind == "gpt":
        hf = GPT2LMHeadModel(GPT2Config(**gpt_hf_config(net.config), attn_implementation="eager"))
        hf.load_state_dict(gpt_hf_state(net), strict=False)
        hf.tie_weights()
    else:
        hf = LlamaForCausalLM(HFLlamaConfig(**llama_hf_config(net.config), attn_implementation="eager"))
        hf.load_state_dict(llama_hf_state(net), strict=False)
        hf.tie_weights()
    prompt = torch.randint(0, V, (1, 5))
    theirs = hf.eval().generate(
        prompt, max_new_tokens=WINDOW - 5, do_sample=False, use_cache=True, pad_token_id=0, attention_mask=None
    )
    assert torch.equal(generate(net, prompt, WINDOW - 5, temperature=0.0), theirs)


def test_cache_refuses_document_masks_and_positions_past_max_seq_len() -> None:
    net = network("gpt")
    cache = net.new_kv_cache()
    with pytest.raises(ValueError, match="no document_ids"):
        net(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache, document_ids=torch.zeros(1, 3, dtype=torch.long))
    net(torch.zeros(1, WINDOW - 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match=f"{WINDOW - 1} cached \\+ 2 new tokens exceed model.max_seq_len={WINDOW}"):
        net(torch.zeros(1, 2, dtype=torch.long), kv_cache=cache)


def test_cached_attention_under_cpu_bf16_autocast_matches_the_full_forward() -> None:
    """The path a bf16-mixed run's validation samples take (lm_lab's CPU bf16 attention)."""
    net = network("gpt")
    x = torch.randint(0, V, (1, WINDOW))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = net(x).float()
        cache = net.new_kv_cache()
        steps = [net(x[:, :4], kv_cache=cache)] + [net(x[:, i : i + 1], kv_cache=cache) for i in range(4, WINDOW)]
    # bf16 rounding of activations computed in other groupings: within bf16's resolution of the logits.
    assert (torch.cat(steps, dim=1).float() - full).abs().max().item() <= 0.05


def test_generation_runs_a_compiled_network_eagerly() -> None:
    """compile=true compiles the network for training; sampling (a new length at every step) runs it
    eagerly (``torch.compiler.set_stance("force_eager")``) instead of compiling a graph per length."""
    from torch._dynamo.utils import counters

    net = network("gpt")
    compiled = copy.deepcopy(net)
    compiled.compile(backend="eager")
    prompt = torch.randint(0, V, (1, 3))
    torch._dynamo.reset()
    counters.clear()
    out = generate(compiled, prompt, 10, temperature=0.0)
    assert sum(counters["frames"].values()) == 0, dict(counters["frames"])
    assert torch.equal(out, generate(net, prompt, 10, temperature=0.0))
    with torch.no_grad():
        compiled(prompt)  # outside generation the compiled module does compile: the counter sees it
    assert sum(counters["frames"].values()) > 0
