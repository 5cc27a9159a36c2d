"""BERT model: Hugging Face parity (both directions), MLM speed trick, padding, config, overfit."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import BertConfig as HFBertConfig
from transformers import BertForPreTraining

from lm_lab.models.bert import BertConfig
from lm_lab.models.bert import BertForPreTraining as BertModel
from lm_lab.models.bert.hf import HF_TIED_KEYS, hf_config_dict, hf_state_dict, load_hf_state_dict
from lm_lab.schema import ConfigError

TINY = dict(vocab_size=99, n_layer=2, n_head=4, n_embd=32, intermediate_size=37, max_seq_len=64)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def tiny_config(**overrides) -> BertConfig:
    return BertConfig(**{**TINY, **overrides})


def perturb_(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Move every parameter off its init (zero biases, unit LN) so parity checks cover them."""
    with torch.no_grad():
        for p in model.parameters():  # tied parameters appear once
            p.add_(scale * torch.randn_like(p))


def hf_model(cfg: BertConfig, attn_implementation: str = "eager") -> BertForPreTraining:
    hf_cfg = HFBertConfig(**hf_config_dict(cfg), attn_implementation=attn_implementation)
    model = BertForPreTraining(hf_cfg).eval()
    assert model.config._attn_implementation == attn_implementation
    return model


def padded_batch(cfg: BertConfig, lengths=(16, 11, 5)) -> dict[str, torch.Tensor]:
    b, t = len(lengths), max(lengths)
    input_ids = torch.randint(1, cfg.vocab_size, (b, t))
    attention_mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, cfg.pad_token_id)
    # Segment A then segment B, like an NSP pair; padding keeps type 0 as tokenizers do.
    second = torch.arange(t)[None, :] >= torch.tensor(lengths)[:, None] // 2
    token_type_ids = (second & (attention_mask == 1)).long()
    return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


def assert_parity(ours: BertModel, hf: BertForPreTraining, batch: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        out = ours(**batch)
        ref = hf(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out.mlm_logits[real], ref.prediction_logits[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.nsp_logits, ref.seq_relationship_logits, atol=1e-4, rtol=0)


def test_parameter_names_equal_hf_state_dict_keys() -> None:
    cfg = tiny_config()
    ours, hf = BertModel(cfg), hf_model(cfg)
    ours_sd, hf_sd = ours.state_dict(), hf.state_dict()
    assert list(ours_sd) == list(hf_sd)
    for name, tensor in hf_sd.items():
        assert ours_sd[name].shape == tensor.shape, name
    # Our alias table is HF's own tie table.
    assert dict(BertForPreTraining._tied_weights_keys) == HF_TIED_KEYS


def test_init_ties_and_pad_row() -> None:
    cfg = tiny_config(pad_token_id=3)
    model = BertModel(cfg)
    emb = model.bert.embeddings.word_embeddings.weight
    head = model.cls.predictions
    assert head.decoder.weight is emb and head.decoder.bias is head.bias
    assert torch.count_nonzero(emb[3]) == 0 and torch.count_nonzero(head.bias) == 0
    assert 0.015 < emb.std().item() < 0.025
    names = [n for n, _ in model.named_parameters()]
    assert "cls.predictions.decoder.weight" not in names and "cls.predictions.decoder.bias" not in names


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_ours_to_hf_parity(attn_implementation: str) -> None:
    cfg = tiny_config()
    ours = BertModel(cfg).eval()
    perturb_(ours)
    hf = hf_model(cfg, attn_implementation)
    hf.load_state_dict(hf_state_dict(ours, include_tied=True), strict=True)
    assert_parity(ours, hf, padded_batch(cfg))


def test_hf_to_ours_parity() -> None:
    cfg = tiny_config()
    hf = hf_model(cfg)
    perturb_(hf)
    ours = BertModel(cfg).eval()
    load_hf_state_dict(ours, hf.state_dict())
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    assert_parity(ours, hf, padded_batch(cfg))


def test_load_accepts_checkpoints_without_aliases_and_with_old_buffers() -> None:
    cfg = tiny_config()
    hf = hf_model(cfg)
    perturb_(hf)
    sd = {k: v for k, v in hf.state_dict().items() if k not in HF_TIED_KEYS}  # save_pretrained style
    sd["bert.embeddings.position_ids"] = torch.arange(cfg.max_seq_len)[None]  # HF < 4.31 style
    ours = BertModel(cfg).eval()
    load_hf_state_dict(ours, sd)
    assert_parity(ours, hf, padded_batch(cfg))

    untied = dict(hf.state_dict())
    untied["cls.predictions.decoder.bias"] = untied["cls.predictions.bias"] + 1
    with pytest.raises(ValueError, match="cls.predictions.decoder.bias"):
        load_hf_state_dict(ours, untied)


def test_export_loads_with_from_pretrained(tmp_path) -> None:
    cfg = tiny_config()
    ours = BertModel(cfg).eval()
    perturb_(ours)
    save_file(hf_state_dict(ours), str(tmp_path / "model.safetensors"))  # fails on shared tensors
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(cfg)))
    hf = BertForPreTraining.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert_parity(ours, hf, padded_batch(cfg))


def test_masked_only_head_equals_full_head_at_mask() -> None:
    cfg = tiny_config()
    model = BertModel(cfg).eval()
    perturb_(model)
    batch = padded_batch(cfg)
    positions = (torch.rand(batch["input_ids"].shape) < 0.3) & batch["attention_mask"].bool()
    with torch.no_grad():
        full = model(**batch)
        masked = model(**batch, mlm_positions=positions)
    assert full.mlm_logits.shape == (*batch["input_ids"].shape, cfg.vocab_size)
    assert masked.mlm_logits.shape == (int(positions.sum()), cfg.vocab_size)
    torch.testing.assert_close(masked.mlm_logits, full.mlm_logits[positions], atol=1e-6, rtol=0)
    torch.testing.assert_close(masked.nsp_logits, full.nsp_logits)
    with pytest.raises(ValueError, match="mlm_positions"):
        model(**batch, mlm_positions=positions.long())


def test_padding_does_not_change_real_tokens() -> None:
    cfg = tiny_config()
    model = BertModel(cfg).eval()
    perturb_(model)
    b, t, extra = 2, 10, 6
    ids = torch.randint(1, cfg.vocab_size, (b, t))
    types = torch.randint(0, 2, (b, t))
    with torch.no_grad():
        short = model(ids, types, torch.ones(b, t, dtype=torch.long))
        pad = torch.full((b, extra), cfg.pad_token_id)
        long = model(
            torch.cat([ids, pad], 1),
            torch.cat([types, torch.zeros_like(pad)], 1),
            torch.cat([torch.ones(b, t, dtype=torch.long), torch.zeros_like(pad)], 1),
        )
    torch.testing.assert_close(long.mlm_logits[:, :t], short.mlm_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(long.nsp_logits, short.nsp_logits, atol=1e-5, rtol=0)


def test_defaults_and_too_long_input() -> None:
    cfg = tiny_config(intermediate_size=None, max_seq_len=8)
    assert cfg.d_ff == 4 * cfg.n_embd
    model = BertModel(cfg).eval()
    ids = torch.randint(1, cfg.vocab_size, (2, 8))
    with torch.no_grad():
        implicit = model(ids)
        explicit = model(ids, torch.zeros_like(ids), torch.ones_like(ids))
    torch.testing.assert_close(implicit.mlm_logits, explicit.mlm_logits)
    assert implicit.hidden_states.shape == (2, 8, cfg.n_embd) and implicit.nsp_logits.shape == (2, 2)
    with pytest.raises(ValueError, match="model.max_seq_len=8"):
        model(torch.randint(1, cfg.vocab_size, (1, 9)))


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.n_embd=100 is not divisible by model\.n_head=3"):
        BertConfig(n_embd=100, n_head=3)
    with pytest.raises(ConfigError, match=r"model\.n_layers"):
        BertConfig.from_dict({**TINY, "n_layers": 2})
    with pytest.raises(ConfigError, match=r"model\.n_layer='two' has the wrong type"):
        BertConfig(n_layer="two")
    with pytest.raises(ConfigError, match=r"model\.dropout"):
        BertConfig(dropout=1.0)
    with pytest.raises(ConfigError, match=r"model\.activation"):
        BertConfig(activation="swish")
    with pytest.raises(ConfigError, match=r"model\.vocab_size"):
        BertConfig(vocab_size=0)
    with pytest.raises(TypeError, match="family"):  # the network is the config class now
        BertConfig(family="gpt")
    assert BertConfig.from_dict(TINY).to_dict()["n_layer"] == 2


def test_overfits_one_masked_batch() -> None:
    cfg = tiny_config(vocab_size=50, n_layer=1, dropout=0.0, attn_dropout=0.0, intermediate_size=None)
    model = BertModel(cfg)
    batch = padded_batch(cfg, lengths=(12, 12, 9, 7))
    positions = (torch.rand(batch["input_ids"].shape) < 0.25) & batch["attention_mask"].bool()
    positions[:, 1] = True  # at least one masked token per row
    labels = batch["input_ids"][positions]  # (N_masked,)
    inputs = dict(batch, input_ids=batch["input_ids"].masked_fill(positions, 1))  # 1 plays [MASK]
    nsp_labels = torch.tensor([0, 1, 1, 0])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _step in range(200):
        out = model(**inputs, mlm_positions=positions)
        loss = F.cross_entropy(out.mlm_logits, labels) + F.cross_entropy(out.nsp_logits, nsp_labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 0.1:
            break
    assert loss.item() < 0.1, f"loss {loss.item():.3f} after 200 steps"


def test_unpadded_encoder_equals_the_padded_one_at_real_tokens() -> None:
    """The encoder runs a padded batch on its real tokens alone (``Unpadded``): the hidden states of
    the real tokens and every gradient equal the padded computation's; padding comes back as zeros."""
    from lm_lab.models.bert.model import Unpadded

    cfg = tiny_config(dropout=0.0, attn_dropout=0.0)  # training mode, without random masks to compare
    model = BertModel(cfg).train()
    perturb_(model)
    batch = padded_batch(cfg, lengths=(16, 11, 5))
    real = batch["attention_mask"].bool()
    unpadded = Unpadded.of(batch["attention_mask"])
    assert unpadded is not None and unpadded.index.numel() == int(real.sum()) == 32
    assert Unpadded.of(torch.ones(2, 7, dtype=torch.long)) is None  # nothing to leave out
    bert = model.bert
    mask = real[:, None, None, :]
    results = []
    for how in (unpadded, None):
        bert.zero_grad(set_to_none=True)
        x = bert.embeddings(batch["input_ids"], batch["token_type_ids"])
        h = bert.encoder(x, mask, how)
        (h[real] ** 2).sum().backward()  # a loss on the real tokens only, as every head's
        grads = {n: p.grad.clone() for n, p in bert.named_parameters() if p.grad is not None}
        results.append((h.detach(), grads))
    (h_unpad, g_unpad), (h_pad, g_pad) = results
    torch.testing.assert_close(h_unpad[real], h_pad[real], atol=1e-5, rtol=1e-5)
    assert h_unpad[~real].abs().max() == 0
    assert g_unpad.keys() == g_pad.keys() and len(g_pad) > 10
    for name in g_pad:
        torch.testing.assert_close(g_unpad[name], g_pad[name], atol=1e-5, rtol=1e-4, msg=name)
