"""Tests for BERT pair construction (lm_lab.objectives.masked_lm.pairs) and MLM masking
(lm_lab.objectives.masked_lm.masking). Real code only, small hand-made corpora, runs in seconds."""

from __future__ import annotations

import random
from collections import Counter
from itertools import islice
from typing import Any

import numpy as np
import pytest
import torch

from lm_lab.objectives.masked_lm.masking import MLMCollator
from lm_lab.objectives.masked_lm.pairs import create_instances, create_pairs, split_sentences
from tests.conftest import SHAKESPEARE

PAD, CLS, SEP, MASK, UNK = 0, 1, 2, 3, 4
SPECIALS = (PAD, CLS, SEP, MASK, UNK)

# Three tiny documents; every token id is unique so instances are traceable.
DOC0 = [[10, 11], [12, 13, 14], [15], [16, 17]]
DOC1 = [[20, 21, 22], [23]]
DOC2 = [[30], [31, 32]]
SMALL_CORPUS = [DOC0, DOC1, DOC2]


def random_corpus(n_docs: int, seed: int, max_sents: int = 8, max_len: int = 12) -> list:
    """Documents of sentences with globally unique, increasing token ids >= 100."""
    r = random.Random(seed)
    next_id = 100
    docs = []
    for _ in range(n_docs):
        doc = []
        for _ in range(r.randint(1, max_sents)):
            n = r.randint(1, max_len)
            doc.append(list(range(next_id, next_id + n)))
            next_id += n
        docs.append(doc)
    return docs


def split_pair(inst: dict) -> tuple[list[int], list[int]]:
    ids = inst["input_ids"]
    first_sep = ids.index(SEP)
    return ids[1:first_sep], ids[first_sep + 1 : -1]


def check_pair_invariants(inst: dict, max_total: int) -> None:
    ids, types = inst["input_ids"], inst["token_type_ids"]
    assert len(ids) == len(types) <= max_total
    assert ids[0] == CLS and ids[-1] == SEP
    assert ids.count(SEP) == 2 and ids.count(CLS) == 1
    a, b = split_pair(inst)
    assert len(a) >= 1 and len(b) >= 1
    assert types == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert inst["next_sentence_label"] in (0, 1)


# --------------------------------------------------------------------------------------
# Pair construction: exact small cases
# --------------------------------------------------------------------------------------


def test_sop_exact_instances() -> None:
    # Block 10 -> max_num_tokens 7, target 7 (short_seq_prob=0 still consumes one draw).
    # Replaying random.Random(0): short 0.844 (no), a_end=randint(1,3)=2, swap 0.040 (<0.5).
    r = random.Random(0)
    assert r.random() >= 0.0 and r.randint(1, 3) == 2 and r.random() < 0.5
    assert r.random() >= 0.5  # truncation draw: drop from the back
    # DOC0 chunk: 2+3+1+2 = 8 >= 7 tokens -> all four sentences.
    # A = [10 11 | 12 13 14], B = [15 | 16 17], swapped -> A = 15 16 17, B = 10..14
    # (8 > 7 tokens: B is longer, loses its last token 14).
    out = create_pairs(
        SMALL_CORPUS,
        max_num_tokens_total=10,
        cls_id=CLS,
        sep_id=SEP,
        objective="sop",
        short_seq_prob=0.0,
        seed=0,
    )
    assert out == [
        {
            "input_ids": [CLS, 15, 16, 17, SEP, 10, 11, 12, 13, SEP],
            "token_type_ids": [0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
            "next_sentence_label": 1,
        },
        {
            "input_ids": [CLS, 20, 21, 22, SEP, 23, SEP],
            "token_type_ids": [0, 0, 0, 0, 0, 1, 1],
            "next_sentence_label": 0,
        },
        {
            "input_ids": [CLS, 30, SEP, 31, 32, SEP],
            "token_type_ids": [0, 0, 0, 1, 1, 1],
            "next_sentence_label": 0,
        },
    ]


def test_nsp_exact_instances_and_put_back() -> None:
    # Same first draws as above: a_end=2 and 0.040 < 0.5 -> random B for DOC0's
    # first chunk. The unused sentences [15], [16 17] are put back and form the
    # next chunk (one-sentence A = [15], true continuation B = [16 17], label 0).
    # DOC1: chunk [20 21 22],[23] -> random B from DOC0 (from sentence 1, until
    # 7 - 3 = 4 tokens); [23] is put back, alone it always gets a random B.
    out = create_pairs(
        SMALL_CORPUS,
        max_num_tokens_total=10,
        cls_id=CLS,
        sep_id=SEP,
        objective="nsp",
        short_seq_prob=0.0,
        seed=0,
    )
    assert [(o["input_ids"], o["next_sentence_label"]) for o in out] == [
        ([CLS, 10, 11, 12, 13, 14, SEP, 31, 32, SEP], 1),
        ([CLS, 15, SEP, 16, 17, SEP], 0),
        ([CLS, 20, 21, 22, SEP, 12, 13, 14, 15, SEP], 1),
        ([CLS, 23, SEP, 10, 11, 12, 13, 14, 15, SEP], 1),
        ([CLS, 30, SEP, 31, 32, SEP], 0),
    ]
    assert out[0]["token_type_ids"] == [0] * 7 + [1] * 3
    for inst in out:
        check_pair_invariants(inst, 10)


def test_none_objective_packs_whole_sentences() -> None:
    out = create_pairs(SMALL_CORPUS, max_num_tokens_total=10, cls_id=CLS, sep_id=SEP, objective="none", seed=0)
    assert out == [
        {"input_ids": [CLS, 10, 11, 12, 13, 14, 15, 16, 17, SEP], "token_type_ids": [0] * 10},
        {"input_ids": [CLS, 20, 21, 22, 23, SEP], "token_type_ids": [0] * 6},
        {"input_ids": [CLS, 30, 31, 32, SEP], "token_type_ids": [0] * 5},
    ]
    # Sentences are not cut at the block edge: 8 tokens fit, the next sentence moves on.
    out = create_pairs(
        [[[10, 11, 12], [13, 14, 15], [16, 17, 18]]],
        max_num_tokens_total=8,
        cls_id=CLS,
        sep_id=SEP,
        objective="none",
        seed=0,
    )
    assert [o["input_ids"] for o in out] == [
        [CLS, 10, 11, 12, 13, 14, 15, SEP],
        [CLS, 16, 17, 18, SEP],
    ]


def test_none_objective_invariants_and_long_sentence() -> None:
    docs = random_corpus(30, seed=3, max_len=25)
    docs.append([list(range(5000, 5050))])  # one sentence much longer than a block
    out = create_pairs(docs, max_num_tokens_total=16, cls_id=CLS, sep_id=SEP, objective="none", seed=1)
    for inst in out:
        ids = inst["input_ids"]
        assert ids[0] == CLS and ids[-1] == SEP and len(ids) <= 16
        assert inst["token_type_ids"] == [0] * len(ids)
        assert "next_sentence_label" not in inst
    # Nothing is lost or duplicated.
    content = [t for inst in out for t in inst["input_ids"][1:-1]]
    assert content == [t for doc in docs for sent in doc for t in sent]


# --------------------------------------------------------------------------------------
# Pair construction: invariants and statistics
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["nsp", "sop"])
@pytest.mark.parametrize("block", [5, 8, 16, 64])
def test_pair_invariants(objective: str, block: int) -> None:
    docs = random_corpus(40, seed=block)
    out = create_pairs(
        docs,
        max_num_tokens_total=block,
        cls_id=CLS,
        sep_id=SEP,
        objective=objective,
        short_seq_prob=0.2,
        seed=7,
    )
    assert out
    for inst in out:
        check_pair_invariants(inst, block)


def test_truncation_keeps_within_max_and_contiguous() -> None:
    # Long sentences force truncation; tokens are dropped only at segment ends, so
    # each segment is still a contiguous run of the original ids.
    docs = [[list(range(100 * d + 10 * s, 100 * d + 10 * s + 9)) for s in range(4)] for d in range(1, 9)]
    out = create_pairs(docs, max_num_tokens_total=12, cls_id=CLS, sep_id=SEP, objective="nsp", seed=0)
    for inst in out:
        check_pair_invariants(inst, 12)
        assert len(inst["input_ids"]) == 12  # every pair here was longer than 9 tokens
        for seg in split_pair(inst):
            # within one sentence or across the boundary of consecutive sentences
            steps = np.diff(seg)
            assert np.all((steps == 1) | (steps == 2))
    # Both front and back truncation happen: some A segments do not start at a
    # sentence start (x0), some do not end at a sentence end (x8).
    a_segments = [split_pair(inst)[0] for inst in out]
    assert any(a[0] % 10 != 0 for a in a_segments)
    assert any(a[-1] % 10 != 8 for a in a_segments)


def test_nsp_uses_every_sentence_once_thanks_to_put_back() -> None:
    # One-token sentences: chunks and random Bs stop exactly at their targets, so
    # nothing is truncated and each own-document sentence must be used exactly
    # once (in A, or in B when B is the true continuation).
    docs = [[[1000 * d + s] for s in range(20)] for d in range(1, 6)]
    rng = random.Random(5)
    for d, doc in enumerate(docs):
        out = create_instances(
            docs, d, max_num_tokens_total=9, cls_id=CLS, sep_id=SEP, objective="nsp",
            short_seq_prob=0.3, rng=rng,
        )  # fmt: skip
        used: list[int] = []
        for inst in out:
            a, b = split_pair(inst)
            used += a + (b if inst["next_sentence_label"] == 0 else [])
            if inst["next_sentence_label"] == 1:
                assert all(t // 1000 != d + 1 for t in b)  # B really from another doc
        assert sorted(used) == [t for sent in doc for t in sent]


def test_nsp_labels_balanced() -> None:
    # Long documents: one-sentence chunks (document tails, one-sentence documents)
    # always get a random B as in the original, which tilts short documents
    # towards label 1; with many sentences per document the split is near 50/50.
    docs = random_corpus(200, seed=11, max_sents=60, max_len=6)
    out = create_pairs(docs, max_num_tokens_total=32, cls_id=CLS, sep_id=SEP, objective="nsp", seed=0)
    rate = np.mean([inst["next_sentence_label"] for inst in out])
    assert len(out) > 1000
    assert 0.4 <= rate <= 0.6


def test_sop_swaps_order() -> None:
    # Ids increase through each document, so the label is readable from the ids.
    docs = random_corpus(300, seed=2, max_sents=10, max_len=6)
    sentences = {tuple(s) for doc in docs for s in doc}
    out = create_pairs(docs, max_num_tokens_total=24, cls_id=CLS, sep_id=SEP, objective="sop", seed=0)
    random_b = 0
    for inst in out:
        a, b = split_pair(inst)
        if inst["next_sentence_label"] == 0:
            assert max(a) < min(b)
        elif not min(a) > max(b):
            # Not swapped: a one-sentence chunk with a random B from another document (ALBERT).
            assert tuple(a) in sentences
            random_b += 1
    assert 0 < random_b < 0.2 * len(out)
    assert 0.4 <= np.mean([inst["next_sentence_label"] for inst in out]) <= 0.65


def test_sop_never_cuts_a_sentence_in_two() -> None:
    """A one-sentence chunk gets a random B from another document (ALBERT), or, in a one-document
    corpus, is left out: a mid-sentence cut would let "A ends without punctuation" give the label."""
    two_docs = [[[10, 11, 12, 13]], [[20, 21], [22, 23]]]
    out = create_pairs(two_docs, max_num_tokens_total=16, cls_id=CLS, sep_id=SEP, objective="sop", seed=0)
    first = [inst for inst in out if split_pair(inst)[0][0] == 10]
    assert first and all(split_pair(i)[0] == [10, 11, 12, 13] and i["next_sentence_label"] == 1 for i in first)
    for inst in out:
        check_pair_invariants(inst, 16)
    assert (
        create_pairs([[[10, 11, 12, 13]]], max_num_tokens_total=16, cls_id=CLS, sep_id=SEP, objective="sop", seed=0)
        == []
    )
    assert create_pairs([[[10]]], max_num_tokens_total=8, cls_id=CLS, sep_id=SEP, objective="sop", seed=0) == []


def test_single_sentence_documents_get_random_b_for_nsp() -> None:
    docs = [[[10, 11]], [[20, 21, 22]], [[30]]]
    out = create_pairs(docs, max_num_tokens_total=16, cls_id=CLS, sep_id=SEP, objective="nsp", seed=0)
    assert len(out) == 3
    for inst in out:
        check_pair_invariants(inst, 16)
        assert inst["next_sentence_label"] == 1
        a, b = split_pair(inst)
        assert a[0] // 10 != b[0] // 10


def test_random_document_callback_and_determinism() -> None:
    calls = []

    def other(rng: random.Random, doc_index: int) -> list[list[int]]:
        calls.append(doc_index)
        return [[90, 91], [92]]

    rng = random.Random(1)
    out = create_instances(
        SMALL_CORPUS, 0, max_num_tokens_total=10, cls_id=CLS, sep_id=SEP, objective="nsp",
        short_seq_prob=0.0, rng=rng, random_document=other,
    )  # fmt: skip
    assert calls and set(calls) == {0}
    assert any(inst["next_sentence_label"] == 1 and split_pair(inst)[1][0] >= 90 for inst in out)

    docs = random_corpus(50, seed=4)
    kwargs = dict(max_num_tokens_total=20, cls_id=CLS, sep_id=SEP, objective="nsp")
    first = create_pairs(docs, seed=123, **kwargs)
    assert first == create_pairs(docs, seed=123, **kwargs)
    assert first != create_pairs(docs, seed=124, **kwargs)
    # dupe_factor: the first pass is exactly the dupe_factor=1 output.
    twice = create_pairs(docs, seed=123, dupe_factor=2, **kwargs)
    assert twice[: len(first)] == first and len(twice) > len(first)


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"NSP needs at least two documents.*pair_objective=sop"):
        create_pairs([DOC0], max_num_tokens_total=16, cls_id=CLS, sep_id=SEP, objective="nsp", seed=0)
    # Empty documents and empty sentences do not count as documents.
    with pytest.raises(ValueError, match="NSP needs at least two documents"):
        create_pairs(
            [DOC0, [], [[]]],
            max_num_tokens_total=16,
            cls_id=CLS,
            sep_id=SEP,
            objective="nsp",
            seed=0,
        )
    assert create_pairs([DOC0], max_num_tokens_total=16, cls_id=CLS, sep_id=SEP, objective="sop", seed=0)
    with pytest.raises(
        ValueError,
        match=r"data.block_size=4 is too small for \[CLS\] A \[SEP\] B \[SEP\]: use at least 8",
    ):
        create_pairs(SMALL_CORPUS, max_num_tokens_total=4, cls_id=CLS, sep_id=SEP, objective="nsp", seed=0)
    with pytest.raises(ValueError, match="objective.pair_objective"):
        bad: Any = "mlm"
        create_pairs(SMALL_CORPUS, max_num_tokens_total=16, cls_id=CLS, sep_id=SEP, objective=bad, seed=0)


# --------------------------------------------------------------------------------------
# Sentence splitting
# --------------------------------------------------------------------------------------


def test_split_sentences() -> None:
    assert split_sentences("Hello world. This is a test! Is it? 3 apples fell.") == [
        "Hello world.",
        "This is a test!",
        "Is it?",
        "3 apples fell.",
    ]
    assert split_sentences("Mr. Smith met Dr. Jones, e.g. at noon. They talked.") == [
        "Mr. Smith met Dr. Jones, e.g. at noon.",
        "They talked.",
    ]
    assert split_sentences('He said "Stop." "Why?" she asked. J. R. R. Tolkien agreed.') == [
        'He said "Stop."',
        '"Why?" she asked.',
        "J. R. R. Tolkien agreed.",
    ]
    # Lowercase after a period is not a new sentence; newlines and blank lines are breaks.
    assert split_sentences("version 2. it works\nSecond line\n\n\n  Third paragraph.  ") == [
        "version 2. it works",
        "Second line",
        "Third paragraph.",
    ]
    assert split_sentences("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.") == [
        "First Citizen:",
        "Before we proceed any further, hear me speak.",
        "All:",
        "Speak, speak.",
    ]
    assert split_sentences("") == [] and split_sentences(" \n\n ") == []


# --------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------


def make_collator(**kw) -> MLMCollator:
    args = dict(vocab_size=1000, mask_id=MASK, pad_id=PAD, special_ids=SPECIALS, seed=0)
    args.update(kw)
    return MLMCollator(**args)


def random_examples(n: int, seed: int, min_len: int = 20, max_len: int = 120) -> list[dict]:
    r = np.random.default_rng(seed)
    out = []
    for i in range(n):
        body = r.integers(5, 1000, r.integers(min_len, max_len)).tolist()
        cut = len(body) // 2
        ids = [CLS, *body[:cut], SEP, *body[cut:], SEP]
        types = [0] * (cut + 2) + [1] * (len(body) - cut + 1)
        out.append({"input_ids": ids, "token_type_ids": types, "next_sentence_label": i % 2, "index": i})
    return out


def test_masking_proportions() -> None:
    collator = make_collator()
    examples = random_examples(300, seed=0)
    n_masked = n_random = n_kept = n_pred = n_cand = 0
    for start in range(0, len(examples), 32):
        chunk = examples[start : start + 32]
        batch = collator(chunk)
        for row, ex in enumerate(chunk):
            n = len(ex["input_ids"])
            original = torch.tensor(ex["input_ids"])
            labels = batch["labels"][row, :n]
            sel = labels != -100
            cands = n - 3
            # Exact budget, as in the original: round(candidates * p).
            assert int(sel.sum()) == max(1, round(cands * 0.15))
            assert torch.equal(labels[sel], original[sel])
            got = batch["input_ids"][row, :n][sel]
            n_masked += int((got == MASK).sum())
            n_kept += int((got == original[sel]).sum())
            n_random += int(((got != MASK) & (got != original[sel])).sum())
            n_pred += int(sel.sum())
            n_cand += cands
    assert abs(n_pred / n_cand - 0.15) < 0.01
    assert abs(n_masked / n_pred - 0.8) < 0.03
    # a random replacement equal to the original counts as "kept" (p ~ 1/995)
    assert abs(n_random / n_pred - 0.1) < 0.025
    assert abs(n_kept / n_pred - 0.1) < 0.025


def test_specials_and_padding_never_masked_and_dynamic_padding() -> None:
    collator = make_collator(mlm_probability=0.9)
    examples = random_examples(8, seed=1, min_len=3, max_len=30)
    for ex in examples:  # sprinkle [UNK] inside, which is special too
        ex["input_ids"][2] = UNK
    longest = max(len(ex["input_ids"]) for ex in examples)
    batch = collator(examples)
    assert set(batch) == {
        "input_ids",
        "token_type_ids",
        "attention_mask",
        "labels",
        "next_sentence_label",
        "index",
    }
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].shape == (8, longest)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        original = torch.tensor(ex["input_ids"])
        special = torch.isin(original, torch.tensor(SPECIALS))
        assert torch.all(batch["labels"][row, :n][special] == -100)
        assert torch.equal(batch["input_ids"][row, :n][special], original[special])
        assert torch.all(batch["input_ids"][row, n:] == PAD)
        assert torch.all(batch["labels"][row, n:] == -100)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (longest - n)
        assert batch["token_type_ids"][row].tolist() == ex["token_type_ids"] + [0] * (longest - n)
        # Random replacements never produce special ids (only [MASK] itself).
        changed = batch["input_ids"][row, :n] != original
        assert not torch.any(torch.isin(batch["input_ids"][row, :n][changed], torch.tensor([PAD, CLS, SEP, UNK])))
    assert batch["next_sentence_label"].tolist() == [i % 2 for i in range(8)]
    # Shorter batch -> shorter padding; label column only when every example has one.
    del examples[0]["next_sentence_label"]
    small = collator([examples[0], examples[1]])
    assert small["input_ids"].shape[1] == max(len(examples[0]["input_ids"]), len(examples[1]["input_ids"]))
    assert "next_sentence_label" not in small
    # token_type_ids may be absent (the `none` objective) -> zeros
    plain = collator([{"input_ids": [CLS, 7, 8, 9, SEP], "index": 0}])
    assert plain["token_type_ids"].tolist() == [[0] * 5]


def test_masks_reproducible_per_seed_epoch_index() -> None:
    examples = random_examples(16, seed=2)
    collator = make_collator(seed=42)
    full = collator(examples)
    # Same examples in other batches / orders (e.g. other worker split): same masks.
    for order in ([3, 7, 1], [1, 3], [7]):
        part = collator([examples[i] for i in order])
        for row, i in enumerate(order):
            n = len(examples[i]["input_ids"])
            assert torch.equal(part["input_ids"][row, :n], full["input_ids"][i, :n])
            assert torch.equal(part["labels"][row, :n], full["labels"][i, :n])
    # A fresh collator with the same seed (e.g. after resume) agrees too.
    assert torch.equal(make_collator(seed=42)(examples)["labels"], full["labels"])
    collator.set_epoch(1)
    other_epoch = collator(examples)
    assert not torch.equal(other_epoch["labels"], full["labels"])
    collator.set_epoch(0)
    assert torch.equal(collator(examples)["input_ids"], full["input_ids"])
    assert not torch.equal(make_collator(seed=43)(examples)["labels"], full["labels"])
    # The index (not the content) seeds the mask: same ids, different index -> different mask.
    twin = [dict(examples[0], index=0), dict(examples[0], index=1)]
    b = collator(twin)
    assert not torch.equal(b["labels"][0], b["labels"][1])


def test_max_predictions_cap() -> None:
    collator = make_collator(mlm_probability=0.5, max_predictions=3)
    batch = collator(random_examples(20, seed=3))
    assert ((batch["labels"] != -100).sum(dim=1) == 3).all()
    # At least one prediction even for a tiny sequence.
    one = make_collator()([{"input_ids": [CLS, 50, 51, SEP], "index": 0}])
    assert int((one["labels"] != -100).sum()) == 1


def test_whole_word_masking_synthetic() -> None:
    # Ids 5..99 start a word, 100..199 continue it (like "##" WordPieces).
    cont = range(100, 200)
    r = np.random.default_rng(4)
    examples = []
    for i in range(200):
        ids = [CLS]
        for _ in range(r.integers(5, 40)):
            ids.append(int(r.integers(5, 100)))
            ids += r.integers(100, 200, r.integers(0, 4)).tolist()
        ids.append(SEP)
        ids.insert(len(ids) // 2, SEP)
        examples.append({"input_ids": ids, "index": i})
    collator = make_collator(whole_word_masking=True, continuation_ids=cont, seed=1)
    batch = collator(examples)
    total_pred = total_cand = 0
    for row, ex in enumerate(examples):
        ids = ex["input_ids"]
        labelled = (batch["labels"][row, : len(ids)] != -100).tolist()
        # rebuild words the obvious way and require all-or-nothing
        words: list[list[int]] = []
        for pos, tok in enumerate(ids):
            if tok in SPECIALS:
                continue
            if tok in cont and words and words[-1][-1] == pos - 1:
                words[-1].append(pos)
            else:
                words.append([pos])
        for word in words:
            assert len({labelled[p] for p in word}) == 1, (ids, word)
        budget = max(1, round(sum(map(len, words)) * 0.15))
        assert 1 <= sum(labelled) <= budget
        total_pred += sum(labelled)
        total_cand += sum(map(len, words))
    assert 0.12 < total_pred / total_cand <= 0.15
    # Multi-piece words were actually masked as units (the test is not vacuous).
    assert any(
        batch["labels"][row, p] != -100 and ex["input_ids"][p] in cont
        for row, ex in enumerate(examples)
        for p in range(len(ex["input_ids"]))
    )


def test_whole_word_masking_with_real_wordpiece() -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from tokenizers.trainers import WordPieceTrainer

    with SHAKESPEARE.open(encoding="utf-8") as f:
        lines = [line.strip() for line in islice(f, 400) if line.strip()][:80]

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    tok.normalizer = BertNormalizer(lowercase=True)
    tok.pre_tokenizer = BertPreTokenizer()
    # A small vocabulary so that many words are split into several pieces.
    tok.train_from_iterator(lines, WordPieceTrainer(vocab_size=200, special_tokens=specials))
    vocab = tok.get_vocab()
    special_ids = [vocab[s] for s in specials]
    continuation_ids = {i for t, i in vocab.items() if t.startswith("##")}
    assert continuation_ids

    collator = MLMCollator(
        vocab_size=tok.get_vocab_size(), mask_id=vocab["[MASK]"], pad_id=vocab["[PAD]"],
        special_ids=special_ids, mlm_probability=0.3, whole_word_masking=True,
        continuation_ids=continuation_ids, seed=0,
    )  # fmt: skip
    encodings = [tok.encode(line) for line in lines]
    examples = [
        {"input_ids": [vocab["[CLS]"], *enc.ids, vocab["[SEP]"]], "index": i} for i, enc in enumerate(encodings)
    ]
    batch = collator(examples)
    multi_piece_masked = 0
    for row, (line, enc) in enumerate(zip(lines, encodings, strict=True)):
        labels = batch["labels"][row, 1 : len(enc.ids) + 1].tolist()  # skip [CLS]
        by_word: dict[int, list[int]] = {}
        for pos, word_id in enumerate(enc.word_ids):
            by_word.setdefault(word_id, []).append(pos)
        for positions in by_word.values():
            chosen = [labels[p] != -100 for p in positions]
            assert all(chosen) or not any(chosen), (line, [enc.tokens[p] for p in positions])
            if all(chosen) and vocab["[UNK]"] not in [enc.ids[p] for p in positions]:
                # The labels decode back to the complete (lower-cased) word.
                pieces = [tok.id_to_token(labels[p]) for p in positions]
                word = "".join(piece.removeprefix("##") for piece in pieces)
                start, end = enc.offsets[positions[0]][0], enc.offsets[positions[-1]][1]
                assert word == line[start:end].lower()
                multi_piece_masked += len(positions) > 1
    assert multi_piece_masked > 0


def test_collator_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"tokenizer has no \[MASK\] token"):
        MLMCollator(vocab_size=100, mask_id=None, pad_id=PAD, special_ids=SPECIALS)
    with pytest.raises(ValueError, match=r"tokenizer has no \[PAD\] token"):
        MLMCollator(vocab_size=100, mask_id=MASK, pad_id=None, special_ids=SPECIALS)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        MLMCollator(vocab_size=100, mask_id=100, pad_id=PAD, special_ids=SPECIALS)
    with pytest.raises(ValueError, match="mlm_probability"):
        MLMCollator(vocab_size=100, mask_id=MASK, pad_id=PAD, special_ids=SPECIALS, mlm_probability=0.0)
    with pytest.raises(ValueError, match="continuation_ids"):
        MLMCollator(vocab_size=100, mask_id=MASK, pad_id=PAD, special_ids=SPECIALS, whole_word_masking=True)
    with pytest.raises(ValueError, match="'index'"):
        make_collator()([{"input_ids": [CLS, 9, SEP]}])


def test_pairs_through_collator() -> None:
    pairs = create_pairs(
        random_corpus(20, seed=9),
        max_num_tokens_total=32,
        cls_id=CLS,
        sep_id=SEP,
        objective="nsp",
        seed=0,
    )
    examples = [dict(p, index=i) for i, p in enumerate(pairs)]
    batch = make_collator()(examples[:16])
    assert batch["input_ids"].shape == (16, max(len(p["input_ids"]) for p in pairs[:16]))
    assert batch["next_sentence_label"].tolist() == [p["next_sentence_label"] for p in pairs[:16]]
    assert Counter(batch["token_type_ids"].flatten().tolist()).keys() <= {0, 1}


def test_albert_ngram_masking_spans_and_length_distribution() -> None:
    """max_ngram=3: masked positions come in runs of 1-3 consecutive candidates, with lengths drawn
    ~ 1/n (6/11, 3/11, 2/11 before budget cuts), within the budget, never overlapping."""
    collator = make_collator(max_ngram=3, mlm_probability=0.15)
    lengths: Counter = Counter()
    for ex in random_examples(400, seed=3, min_len=100, max_len=120):
        ids = np.asarray(ex["input_ids"])
        words = collator._words(ids)
        budget = max(1, round(sum(w.size for w in words) * 0.15))
        chosen = collator._choose(words, budget, np.random.default_rng(ex["index"]))
        flat = np.concatenate(chosen)
        assert flat.size == len(set(flat.tolist())) <= budget
        # Recover the spans: runs of consecutive word indices among the chosen words.
        idx = sorted(int(np.flatnonzero([w[0] == c[0] for w in words])[0]) for c in chosen)
        run = 1
        for a, b in zip(idx, idx[1:] + [None], strict=True):
            if b == a + 1:
                run += 1
            else:
                lengths[run] += 1
                run = 1
    total = sum(lengths.values())
    # 1/n gives 0.55 / 0.27 / 0.18; adjacent spans merge into a few longer runs.
    assert 0.45 < lengths[1] / total < 0.62 and 0.2 < lengths[2] / total < 0.35 and 0.1 < lengths[3] / total < 0.25
    assert sum(n * c for n, c in lengths.items()) / total > 1.3  # mean span well above BERT's 1


def test_ngram_masking_of_one_is_bert_masking() -> None:
    examples = random_examples(16, seed=4)
    a, b = make_collator()(examples), make_collator(max_ngram=1)(examples)
    assert all(torch.equal(a[k], b[k]) for k in a)
