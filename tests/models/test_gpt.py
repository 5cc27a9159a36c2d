"""The GPT network: causality, Hugging Face parity, overfitting, sampling, config checks."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lm_lab.models.generation import sample_next
from lm_lab.models.gpt import GPT, GPTConfig
from lm_lab.models.gpt.hf import hf_config_dict, hf_state_dict, load_hf_state_dict
from lm_lab.schema import ConfigError


def tiny(**kw) -> GPTConfig:
    base = dict(vocab_size=97, n_layer=2, n_head=4, n_embd=32, max_seq_len=64)
    base.update(kw)
    return GPTConfig(**base)


def _perturb(model: torch.nn.Module) -> None:
    # Move every parameter off its init (zero biases, unit norms) so parity checks cover them.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_causality_future_tokens_never_change_past_logits() -> None:
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    a, b = model(x), model(y)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


@pytest.mark.parametrize("bias,activation", [(True, "gelu_tanh"), (False, "gelu")])
def test_hf_parity_ours_to_hf(bias: bool, activation: str) -> None:
    torch.manual_seed(0)
    model = GPT(tiny(bias=bias, activation=activation)).eval()
    _perturb(model)
    hf = GPT2LMHeadModel(GPT2Config(**hf_config_dict(model.config), attn_implementation="eager")).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    x = torch.randint(0, 97, (3, 33))
    diff = (hf(x).logits - model(x)).abs().max().item()
    assert diff <= 1e-4, diff


def test_hf_parity_hf_to_ours() -> None:
    torch.manual_seed(1)
    cfg = tiny()
    hf = GPT2LMHeadModel(GPT2Config(**hf_config_dict(cfg))).eval()
    _perturb(hf)
    hf.tie_weights()
    model = GPT(cfg).eval()
    load_hf_state_dict(model, hf.state_dict())
    x = torch.randint(0, 97, (2, 17))
    assert (hf(x).logits - model(x)).abs().max().item() <= 1e-4


def test_tied_embeddings_and_scaled_init() -> None:
    model = GPT(tiny(n_layer=8))
    assert model.lm_head.weight is model.transformer.wte.weight
    proj = model.transformer.h[0].attn.c_proj.weight.std().item()
    fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert proj < fc * 0.5  # 0.02 / sqrt(16) vs 0.02


def test_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = GPT(tiny(dropout=0.0))
    x = torch.randint(0, 97, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model.loss(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_generate_greedy_top_k_top_p() -> None:
    torch.manual_seed(0)
    model = GPT(tiny()).eval()
    prompt = torch.randint(0, 97, (1, 5))
    a = model.generate(prompt, 10, temperature=0)
    b = model.generate(prompt, 10, temperature=0)
    assert a.shape == (1, 15) and torch.equal(a, b) and torch.equal(a[:, :5], prompt)
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, temperature=1.0, top_k=2, generator=g)) for _ in range(200)}
    assert picks == {2, 3}
    # top_p=0.5: token 2 alone holds ~0.93 of the mass.
    picks = {int(sample_next(logits, temperature=1.0, top_p=0.5, generator=g)) for _ in range(100)}
    assert picks == {2}
    assert int(sample_next(logits, temperature=0)) == 2


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.n_embd=100 is not divisible by model\.n_head=3"):
        tiny(n_embd=100, n_head=3)
    with pytest.raises(ConfigError, match=r"unknown config key model\.n_layers"):
        GPTConfig.from_dict({"n_layers": 2})
    with pytest.raises(ConfigError, match=r"model\.n_layer='two' has the wrong type"):
        tiny(n_layer="two")
    with pytest.raises(ConfigError, match=r"model\.dropout"):
        tiny(dropout=1.5)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        GPT(tiny(max_seq_len=8))(torch.zeros(1, 9, dtype=torch.long))


def test_flops_per_token_counts_the_training_block_not_max_seq_len() -> None:
    """PaLM's 6N + 12 L C T with T the block the model trains on (here 64 of max_seq_len 1024),
    N the non-embedding-position parameters, hand-counted for a 2-layer, 32-wide GPT."""
    from lm_lab.objectives.causal_lm.task import CausalLMTask

    L, C, V = 2, 32, 100
    task = CausalLMTask(GPTConfig(vocab_size=V, n_layer=L, n_head=4, n_embd=C, max_seq_len=1024))
    per_layer = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C)
    n = V * C + L * per_layer + 2 * C  # tied embedding, blocks, final LayerNorm
    assert task.estimate_flops_per_token(64) == 6 * n + 12 * L * C * 64
