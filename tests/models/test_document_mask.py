"""Document-aware attention in packed blocks (``model.document_mask``, ``model.document_positions``).

"Equal" here: a packed block's logits at each document's positions equal that document run alone,
with the positions it has in the block: 0.. when positions restart at each document, or its
offset in the block (passed as ``position_ids``) when they do not. Float32, atol 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lm_lab.models.gpt import GPT, GPTConfig
from lm_lab.models.gpt.hf import hf_config_dict, hf_state_dict
from lm_lab.models.layers import causal_attention, causal_document_mask, document_ids, document_positions
from lm_lab.models.llama.model import Llama, LlamaConfig
from lm_lab.schema import ConfigError

EOS = 0
V = 61


def _net(kind: str, positions: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=V, n_layer=2, n_head=4, n_embd=32, max_seq_len=64)
    common |= dict(document_mask=True, document_positions=positions)
    if kind == "gpt":
        return GPT(GPTConfig(**common)).eval()
    return Llama(LlamaConfig(n_kv_head=2, **common)).eval()  # grouped-query attention too


def _packed(lengths: list[list[int]], seed: int = 0) -> torch.Tensor:
    """Rows of documents of the given lengths, each ending with EOS (the last one of a row may be cut:
    a row that ends mid-document, as packed blocks do)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for row in lengths:
        ids = []
        for n in row:
            ids += torch.randint(1, V, (n - 1,), generator=g).tolist() + [EOS]
        rows.append(ids)
    t = min(len(r) for r in rows)
    return torch.tensor([r[:t] for r in rows])


def _spans(row: torch.Tensor) -> list[tuple[int, int]]:
    ends = (row == EOS).nonzero().flatten().tolist()
    starts = [0] + [e + 1 for e in ends]
    return [(s, e) for s, e in zip(starts, [e + 1 for e in ends] + [row.numel()], strict=True) if e > s]


def test_document_ids_and_positions_by_hand() -> None:
    ids = torch.tensor([[5, 0, 7, 8, 0, 9], [0, 3, 3, 3, 3, 0]])
    doc = document_ids(ids, EOS)
    assert doc.tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]]
    assert document_positions(doc).tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 1, 2, 3, 4]]


@pytest.mark.parametrize("kind", ["gpt", "llama"])
@pytest.mark.parametrize("positions", [True, False], ids=["restart", "offset"])
def test_packed_block_equals_documents_alone(kind: str, positions: bool) -> None:
    net = _net(kind, positions)
    ids = _packed([[5, 9, 3, 20, 7], [12, 1, 30, 4]])  # two rows with different boundaries; 1 = a lone EOS
    with torch.no_grad():
        packed = net(ids, document_ids=document_ids(ids, EOS))
        plain = net(ids)  # ordinary causal attention over the whole block
        for b in range(ids.size(0)):
            spans = _spans(ids[b])
            assert len(spans) >= 4
            for s, e in spans:
                pos = None if positions else torch.arange(s, e)[None]
                alone = net(ids[b : b + 1, s:e], position_ids=pos)[0]
                torch.testing.assert_close(packed[b, s:e], alone, atol=1e-5, rtol=0)
            # The mask does something: after the first document, plain causal attention differs.
            s, e = spans[1]
            assert (packed[b, s:e] - plain[b, s:e]).abs().max() > 1e-3


def test_positions_matter_for_gpt_but_rope_is_relative() -> None:
    """Without the restart a GPT document sees its absolute offset (learned position embeddings), so
    it differs from the document run at 0; Llama's rotary attention depends only on relative
    positions, so the offset leaves the logits equal up to the rounding of the cos/sin tables."""
    ids = _packed([[9, 14, 20]])
    s, e = _spans(ids[0])[1]
    with torch.no_grad():
        gpt, llama = _net("gpt", False), _net("llama", False)
        g = gpt(ids, document_ids=document_ids(ids, EOS))[0, s:e]
        assert (g - gpt(ids[:, s:e])[0]).abs().max() > 1e-3
        lm = llama(ids, document_ids=document_ids(ids, EOS))[0, s:e]
        torch.testing.assert_close(lm, llama(ids[:, s:e])[0], atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore::UserWarning")  # "flex_attention called without torch.compile": expected on CPU
def test_flex_attention_block_mask_matches_dense_mask_on_cpu() -> None:
    """The GPU path (FlexAttention with a BlockMask) gives what the CPU path (SDPA with a boolean
    mask) gives; flex_attention runs eagerly on CPU with this torch, so it is checked here."""
    torch.manual_seed(0)
    ids = _packed([[40, 50, 60, 30], [100, 80]])  # T = 180: more than one 128-token tile
    doc = document_ids(ids, EOS)
    q = torch.randn(2, 4, ids.size(1), 16)
    k, v = torch.randn(2, 2, 2, ids.size(1), 16).unbind(0)
    dense = causal_attention(q, k, v, mask=causal_document_mask(doc), enable_gqa=True)
    flex = causal_attention(q, k, v, mask=causal_document_mask(doc, flex=True), enable_gqa=True)
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=0)


def test_document_mask_exports_as_plain_gpt2() -> None:
    """The document fields change only which tokens attend to which: the export is a plain GPT-2,
    equal to ours on a single document."""
    net = _net("gpt", True)
    hf_cfg = hf_config_dict(net.config)
    assert not any("document" in k for k in hf_cfg)
    hf = GPT2LMHeadModel(GPT2Config(**hf_cfg, attn_implementation="eager")).eval()
    hf.load_state_dict(hf_state_dict(net), strict=False)
    hf.tie_weights()
    ids = _packed([[24]])  # one document, EOS last
    with torch.no_grad():
        ours = net(ids, document_ids=document_ids(ids, EOS))
        torch.testing.assert_close(hf(ids).logits, ours, atol=1e-4, rtol=0)


def test_document_positions_needs_document_mask() -> None:
    with pytest.raises(ConfigError, match="needs model.document_mask=true"):
        GPTConfig(vocab_size=V, document_positions=True)
