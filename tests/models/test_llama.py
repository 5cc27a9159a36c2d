"""The Llama network: causality, Hugging Face parity and round trips, presets, config checks, overfitting."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM
from transformers import LlamaConfig as HFLlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lm_lab.models.llama import Llama, LlamaConfig, config_from_hf, hf_config_dict, hf_state_dict, load_hf_state_dict
from lm_lab.models.llama.model import RMSNorm
from lm_lab.schema import ConfigError
from tests.conftest import model_preset

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
V = 97

# (n_kv_head, tie_embeddings, rope_theta): GQA, MQA and MHA (None and explicit), tied and untied.
SHAPES = [(2, True, 10000.0), (2, False, 500000.0), (1, True, 10000.0), (None, True, 10000.0), (4, False, 10000.0)]


def tiny(**kw) -> LlamaConfig:
    base = dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48, max_seq_len=64)
    base.update(kw)
    return LlamaConfig(**base)


def hf_model(cfg: LlamaConfig) -> LlamaForCausalLM:
    return LlamaForCausalLM(HFLlamaConfig(**hf_config_dict(cfg), attn_implementation="eager")).eval()


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    # Move every parameter off its init (unit norms especially) so the parity checks cover them.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def test_causality_future_tokens_never_change_past_logits() -> None:
    torch.manual_seed(0)
    model = Llama(tiny()).eval()
    x = torch.randint(0, V, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, V, (2, 8))
    a, b = model(x), model(y)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


@pytest.mark.parametrize("n_kv_head,tie,theta", SHAPES)
def test_hf_parity_ours_to_hf(n_kv_head: int | None, tie: bool, theta: float) -> None:
    torch.manual_seed(0)
    model = Llama(tiny(n_kv_head=n_kv_head, tie_embeddings=tie, rope_theta=theta)).eval()
    _perturb(model)
    hf = hf_model(model.config)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    assert unexpected == [] and set(missing) == ({"lm_head.weight"} if tie else set())
    if tie:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
    x = torch.randint(0, V, (3, 33))
    with torch.no_grad():
        diff = (hf(x).logits - model(x)).abs().max().item()
        hidden = (hf.model(x).last_hidden_state - model.hidden_states(x)).abs().max().item()
    assert diff <= 1e-4 and hidden <= 1e-4, (diff, hidden)


@pytest.mark.parametrize("n_kv_head,tie,theta", SHAPES)
def test_hf_parity_hf_to_ours(n_kv_head: int | None, tie: bool, theta: float) -> None:
    torch.manual_seed(1)
    cfg = tiny(n_kv_head=n_kv_head, tie_embeddings=tie, rope_theta=theta)
    hf = hf_model(cfg)
    _perturb(hf, seed=1)
    model = Llama(cfg).eval()
    load_hf_state_dict(model, hf.state_dict())
    x = torch.randint(0, V, (2, 17))
    with torch.no_grad():
        diff = (hf(x).logits - model(x)).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_style_round_trip(tmp_path: Path, tie: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """config.json + model.safetensors as lm_lab's export writes them load in transformers' Auto classes
    and back into our network with the same logits."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(2)
    model = Llama(tiny(tie_embeddings=tie, rope_theta=20000.0)).eval()
    _perturb(model, seed=2)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(model.config), indent=2, sort_keys=True))
    sd = hf_state_dict(model)
    assert ("lm_head.weight" in sd) != tie
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert isinstance(hf, LlamaForCausalLM)
    assert hf.config.rope_parameters["rope_theta"] == 20000.0
    x = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() <= 1e-4

    back = Llama(config_from_hf(json.loads((tmp_path / "config.json").read_text()))).eval()
    load_hf_state_dict(back, load_file(str(tmp_path / "model.safetensors")))
    assert back.config == model.config
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


@pytest.mark.parametrize(
    "cfg",
    [tiny(), tiny(n_kv_head=1, tie_embeddings=False, rope_theta=5e5, rms_norm_eps=1e-6, init_std=0.01, dropout=0.1)],
)
def test_config_round_trip(cfg: LlamaConfig) -> None:
    assert config_from_hf(hf_config_dict(cfg)) == cfg
    # transformers 5 serialises rope_theta inside rope_parameters only ...
    hf_dict = HFLlamaConfig(**hf_config_dict(cfg)).to_dict()
    assert "rope_theta" not in hf_dict and hf_dict["rope_parameters"]["rope_theta"] == cfg.rope_theta
    assert config_from_hf(hf_dict) == cfg
    # ... transformers 4 at the top level, with rope_scaling null.
    legacy = {k: v for k, v in hf_config_dict(cfg).items() if k not in ("rope_parameters", "head_dim")}
    assert config_from_hf({**legacy, "rope_scaling": None}) == cfg


def test_config_round_trip_resolves_defaults() -> None:
    """None fields come back as the numbers they stand for (the checkpoint states them)."""
    cfg = tiny(n_kv_head=None, intermediate_size=None)
    assert config_from_hf(hf_config_dict(cfg)) == dataclasses.replace(cfg, n_kv_head=4, intermediate_size=256)


def test_config_from_hf_refuses_what_is_not_implemented() -> None:
    base = hf_config_dict(tiny())
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    with pytest.raises(ValueError, match="rope_scaling=.*not supported"):
        config_from_hf({**base, "rope_parameters": None, "rope_scaling": llama3})
    with pytest.raises(ValueError, match="rope_parameters=.*not supported"):
        config_from_hf({**base, "rope_parameters": {**llama3, "rope_theta": 5e5}})
    with pytest.raises(ValueError, match="attention_bias=true"):
        config_from_hf({**base, "attention_bias": True})
    with pytest.raises(ValueError, match="mlp_bias=true"):
        config_from_hf({**base, "mlp_bias": True})
    with pytest.raises(ValueError, match="head_dim=16"):
        config_from_hf({**base, "head_dim": 16})
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        config_from_hf({**base, "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="model_type='mistral'"):
        config_from_hf({**base, "model_type": "mistral"})


def test_load_hf_state_dict_tied_and_legacy_keys() -> None:
    torch.manual_seed(3)
    src = Llama(tiny())
    sd = hf_state_dict(src)
    dst = Llama(tiny())
    # With lm_head.weight (as state_dict() has it), and with old checkpoints' rotary buffers.
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4), "model.rotary_emb.inv_freq": torch.ones(4)}
    load_hf_state_dict(dst, {**sd, "lm_head.weight": sd["model.embed_tokens.weight"], **extra})
    assert dst.lm_head.weight is dst.model.embed_tokens.weight
    assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), src.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="tie_embeddings=false"):
        load_hf_state_dict(dst, {**sd, "lm_head.weight": torch.zeros_like(sd["model.embed_tokens.weight"])})
    with pytest.raises(RuntimeError, match="lm_head.weight"):
        load_hf_state_dict(Llama(tiny(tie_embeddings=False)), sd)  # untied needs its head


def test_layout_names_init_and_counts() -> None:
    cfg = tiny(n_layer=8)
    model = Llama(cfg)
    with torch.device("meta"):
        hf = LlamaForCausalLM(HFLlamaConfig(**hf_config_dict(cfg)))
    hf_shapes = {k: v.shape for k, v in hf.state_dict().items() if "rotary_emb" not in k}
    assert {k: v.shape for k, v in model.state_dict().items()} == hf_shapes
    assert not any(name.endswith(".bias") for name, _ in model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert Llama(tiny(tie_embeddings=False)).lm_head.weight is not Llama(tiny()).model.embed_tokens.weight
    layer = model.model.layers[0]
    q = layer.self_attn.q_proj.weight.std().item()
    for residual in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
        assert residual.std().item() < q * 0.5  # 0.02 / sqrt(16) vs 0.02
    assert torch.equal(layer.input_layernorm.weight, torch.ones(32))
    n = sum(p.numel() for p in hf.parameters())
    assert model.num_params() == model.num_params(non_embedding=False) == n
    assert model.estimate_flops_per_token(40) == 6 * n + 12 * 8 * 32 * 40
    assert model.hidden_states(torch.zeros(2, 5, dtype=torch.long)).shape == (2, 5, 32)


def test_rmsnorm_matches_hf_in_bf16() -> None:
    torch.manual_seed(4)
    ours, theirs = RMSNorm(32, 1e-5), LlamaRMSNorm(32, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
    ours, theirs = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
    x = torch.randn(3, 7, 32, dtype=torch.bfloat16) * 3
    assert torch.equal(ours(x), theirs(x))


def test_intermediate_size_default_rule() -> None:
    assert LlamaConfig(n_embd=768).d_ff == 2048
    assert LlamaConfig(n_embd=576, n_head=9).d_ff == 1536
    assert LlamaConfig(n_embd=64, n_head=4).d_ff == 256
    assert LlamaConfig(n_embd=4096, n_head=32).d_ff == 11008  # Llama-1/2 7B
    assert LlamaConfig(n_embd=64, n_head=4, intermediate_size=100).d_ff == 100


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.n_head=4 is not divisible by model\.n_kv_head=3"):
        tiny(n_kv_head=3)
    with pytest.raises(ConfigError, match=r"model\.n_embd / model\.n_head = 12/4 = 3 is odd"):
        tiny(n_embd=12, n_head=4)
    with pytest.raises(ConfigError, match=r"model\.n_embd=30 is not divisible by model\.n_head=4"):
        tiny(n_embd=30)
    with pytest.raises(ConfigError, match=r"model\.n_kv_head=0 must be > 0"):
        tiny(n_kv_head=0)
    with pytest.raises(ConfigError, match=r"model\.dropout"):
        tiny(dropout=1.0)
    with pytest.raises(ConfigError, match=r"model\.rms_norm_eps"):
        tiny(rms_norm_eps=0.0)
    with pytest.raises(ConfigError, match=r"unknown config key model\.family"):
        LlamaConfig.from_dict({"family": "llama"})
    with pytest.raises(ConfigError, match=r"model\.n_layer='two' has the wrong type"):
        tiny(n_layer="two")
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        Llama(tiny(max_seq_len=8))(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("name", ["llama_tiny", "llama_mini", "smollm_135m"])
def test_presets_instantiate(name: str) -> None:
    cfg = instantiate(model_preset(name))
    assert isinstance(cfg, LlamaConfig) and cfg.vocab_size is None and cfg.kv_heads < cfg.n_head
    assert config_from_hf(hf_config_dict(dataclasses.replace(cfg, vocab_size=V))) == dataclasses.replace(
        cfg, vocab_size=V
    )
    if name == "llama_tiny":
        model = Llama(dataclasses.replace(cfg, vocab_size=V))
        assert model(torch.zeros(1, cfg.max_seq_len, dtype=torch.long)).shape == (1, cfg.max_seq_len, V)
    if name == "llama_mini":
        # Each block holds gpt_mini's 12 * n_embd^2 weights (4 C^2 attention + 8 C^2 MLP there).
        c, kv = cfg.n_embd, cfg.kv_heads * cfg.head_dim
        assert 2 * c * c + 2 * c * kv + 3 * c * cfg.d_ff == 12 * c * c


def test_smollm_135m_preset_has_smollm_parameter_count() -> None:
    cfg = dataclasses.replace(instantiate(model_preset("smollm_135m")), vocab_size=49152)
    with torch.device("meta"):
        hf = LlamaForCausalLM(HFLlamaConfig(**hf_config_dict(cfg)))
        ours = Llama(cfg)
    assert sum(p.numel() for p in hf.parameters()) == 134_515_008
    assert ours.num_params() == 134_515_008


def test_overfits_one_batch() -> None:
    torch.manual_seed(0)
    model = Llama(tiny())
    x = torch.randint(0, V, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model.loss(x[:, :-1], x[:, 1:]).item()
    for _ in range(40):
        loss = model.loss(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 4.0 and loss.item() < 0.1 * first, (first, loss.item())


def test_generate_greedy_is_deterministic() -> None:
    torch.manual_seed(0)
    model = Llama(tiny()).eval()
    prompt = torch.randint(0, V, (1, 5))
    a = model.generate(prompt, 10, temperature=0)
    b = model.generate(prompt, 10, temperature=0)
    assert a.shape == (1, 15) and torch.equal(a, b) and torch.equal(a[:, :5], prompt)
