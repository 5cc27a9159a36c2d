"""Data pipeline on real files and real `datasets`: loading, splits, tokenizers, packing, cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from lm_lab.data.options import DataConfig
from lm_lab.data.packing import tokenize_dataset
from lm_lab.data.sources import DataError, load_corpus
from lm_lab.data.tokenizer import (
    BERT_SPECIALS,
    CHAR_PIECE,
    EOT,
    UNK_CHAR,
    CharEncoder,
    TokenizerError,
    char_pieces,
    is_char_level,
    load_tokenizer,
    save_hf,
    train_tokenizer,
)
from lm_lab.objectives.causal_lm.data import CausalLMDataModule
from tests.conftest import SHAKESPEARE

TEXTS = ["Hello world. The quick brown fox jumps over the lazy dog.", "Größe: naïve café — ünïcödé ✓\nnew line"]


def dm_for(tmp_path: Path, **kw) -> CausalLMDataModule:
    kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return CausalLMDataModule(DataConfig(**kw), seed=0)


# ---------------------------------------------------------------- sources and splits
def test_single_file_split_is_contiguous_like_nanogpt(tmp_path: Path) -> None:
    corpus = load_corpus(DataConfig(path="text", data_files=str(SHAKESPEARE), cache_dir=str(tmp_path)))
    train, val = corpus.train[0]["text"], corpus.validation[0]["text"]
    text = SHAKESPEARE.read_text()
    assert (len(train), len(val)) == (1_003_854, 111_540)  # nanoGPT's prepare.py numbers
    assert train + val == text


def test_jsonl_csv_and_split_dict(tmp_path: Path) -> None:
    rows = [{"body": f"document number {i}. " * 5} for i in range(20)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    corpus = load_corpus(DataConfig(path=None, data_files=str(tmp_path / "a.jsonl"), text_column="body"))
    assert len(corpus.train) == 18 and len(corpus.validation) == 2
    assert corpus.train.column_names == ["text"]
    (tmp_path / "t.csv").write_text("text\n" + "\n".join(f"row {i}" for i in range(10)))
    (tmp_path / "v.csv").write_text("text\nheld out\n")
    corpus = load_corpus(
        DataConfig(path=None, data_files={"train": str(tmp_path / "t.csv"), "validation": str(tmp_path / "v.csv")})
    )
    assert len(corpus.train) == 10 and corpus.validation[0]["text"] == "held out"


def test_multi_document_split_is_deterministic() -> None:
    a = load_corpus(DataConfig())  # built-in corpus
    b = load_corpus(DataConfig())
    assert len(a.train) > 300 and len(a.validation) > 30
    assert a.validation["text"][:5] == b.validation["text"][:5]
    assert a.fingerprint == b.fingerprint


@pytest.mark.parametrize(
    "content,match",
    [
        (None, "data file not found"),
        (b"", "is empty"),
        (b"caf\xe9 au lait\n" * 10, "not UTF-8 text"),
        (b"\x00\x01\x02binary", "not text"),
    ],
)
def test_bad_files_fail_with_the_file_name(tmp_path: Path, content: bytes | None, match: str) -> None:
    f = tmp_path / "corpus.txt"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(DataError, match=match):
        load_corpus(DataConfig(path="text", data_files=str(f)))


def test_hub_dataset_offline_fails_fast_with_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_lab.data import hub

    hub.hub_reachable.cache_clear()
    with pytest.raises(DataError, match=r"Hub is unreachable.*data=files data\.data_files="):
        load_corpus(DataConfig(path="Salesforce/wikitext", name="wikitext-2-raw-v1"))
    hub.hub_reachable.cache_clear()


def test_missing_text_column(tmp_path: Path) -> None:
    """Local files are read when their splits are first used (a run with cached tokens never reads
    them): a bad column is reported then, before any tokenizer is trained on them."""
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n{"body": "y"}\n')
    corpus = load_corpus(DataConfig(path=None, data_files=str(tmp_path / "a.jsonl")))
    assert not corpus.loaded
    with pytest.raises(DataError, match=r"column 'text' not in the dataset.*data\.text_column"):
        _ = corpus.train


# ---------------------------------------------------------------- tokenizers
@pytest.mark.parametrize("kind", ["bpe", "char", "wordpiece"])
def test_tokenizer_round_trip_and_hf_reload(tmp_path: Path, kind: str) -> None:
    corpus = SHAKESPEARE.read_text()[:50_000]
    tok = train_tokenizer(kind, [corpus] + TEXTS, vocab_size=300)
    save_hf(tok, tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = "First Citizen:\nBefore we proceed any further, hear me speak."
    ids = tok.encode(text, add_special_tokens=False).ids
    assert hf(text, add_special_tokens=False)["input_ids"] == ids
    decoded = tok.decode(ids)
    if kind == "wordpiece":
        assert decoded == "first citizen : before we proceed any further, hear me speak.".replace(" ,", ",")
    else:
        assert decoded == text  # byte-level BPE and char are lossless
    assert hf.decode(ids) == decoded
    if kind != "wordpiece":
        assert tok.token_to_id(EOT) is not None and hf.eos_token == EOT
    # An HF tokenizer directory loads back as the same tokenizer.
    assert load_tokenizer(str(tmp_path / "tok")).encode(text).ids == tok.encode(text).ids


def test_bpe_is_lossless_on_unicode() -> None:
    tok = train_tokenizer("bpe", TEXTS * 3, vocab_size=300)
    for t in TEXTS:
        assert tok.decode(tok.encode(t).ids) == t


@pytest.mark.parametrize("kind", ["bpe", "char", "wordpiece"])
def test_trained_tokenizers_are_the_same_on_every_run(kind: str) -> None:
    """The same corpus gives the same tokenizer, ids included, on every fresh cache. tokenizers'
    WordPieceTrainer alone gave 4 different vocabularies in 4 runs on these speeches (the ``##``
    characters numbered in hash-map order, which also breaks ties between merges)."""
    speeches = SHAKESPEARE.read_text().split("\n\n")
    first, *others = (train_tokenizer(kind, iter(speeches), vocab_size=1000).to_str() for _ in range(3))
    assert all(o == first for o in others)
    tok = Tokenizer.from_str(first)
    if kind == "wordpiece":  # only BERT's five are special; the ## characters are ordinary vocabulary
        assert [t.content for t in tok.get_added_tokens_decoder().values()] == BERT_SPECIALS
        assert tok.get_vocab_size() == 1000
        assert tok.encode("Unto the people").tokens == ["[CLS]", "unto", "the", "people", "[SEP]"]


def char_tokenizer_by_trainer(texts: list[str]) -> Tokenizer:
    """The char tokenizer as ``tokenizers``' own WordLevelTrainer trains it, each text in one piece."""
    reference = Tokenizer(models.WordLevel(unk_token=UNK_CHAR))
    reference.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    reference.decoder = decoders.Fuse()
    trainer = trainers.WordLevelTrainer(vocab_size=10**6, special_tokens=[EOT, UNK_CHAR], show_progress=False)
    reference.train_from_iterator(texts, trainer=trainer)
    return reference


def test_char_tokenizer_and_its_table_encoder_equal_tokenizers_own_on_odd_text() -> None:
    """lm_lab counts characters itself and encodes char-level text by a table (CharEncoder): the
    tokenizer.json WordLevelTrainer writes, and the ids its tokenizer gives, on texts made to break
    that: counts tied across code point ranges (ASCII, Latin-1, CJK, emoji beyond the BMP), combining
    marks, \r\n, characters unseen in training (<unk>), literal added tokens, empty texts."""
    import datasets

    rng = np.random.default_rng(0)
    alphabet = list("ab \n\r\t<|>é\u0301ß\u4e2d\u00a0") + ["\U0001f600", "\U00010348", "\x00", "\x7f"]
    for trial in range(30):
        size = int(rng.integers(0, 400))
        docs = [
            "".join(rng.choice(alphabet, size=int(rng.integers(0, size + 1)))) for _ in range(int(rng.integers(1, 5)))
        ]
        if trial % 3 == 0:  # ties: every character the same number of times
            docs = ["".join(rng.permutation(alphabet * int(rng.integers(1, 4))))]
        ours, reference = train_tokenizer("char", iter(docs), vocab_size=10), char_tokenizer_by_trainer(docs)
        assert ours.to_str() == reference.to_str(), docs
        unseen = "".join(rng.choice(alphabet + ["z", "\U0001f680", "\u0370"], size=200))
        texts = [*docs, unseen, "", f"x{EOT}y{UNK_CHAR}", unseen[:50] + EOT]
        encoder, in_slices = CharEncoder(ours), CharEncoder(ours)
        in_slices.SLICE = 7  # a long document is encoded a slice at a time: slices of 7 characters here
        for text in texts:
            expected = reference.encode(text, add_special_tokens=False).ids
            assert encoder(text).tolist() == expected == in_slices(text).tolist(), text
        tokenized = tokenize_dataset(datasets.Dataset.from_dict({"text": texts}), ours, eot=0)
        assert tokenized["ids"] == [reference.encode(t, add_special_tokens=False).ids + [0] for t in texts]


def test_char_level_corpus_in_pieces_gives_the_whole_documents_ids() -> None:
    """A char tokenizer trains on and encodes a long document in newline-ended pieces (both cores
    busy): the same tokenizer, and ids equal to encoding each document whole, even with a literal
    <|endoftext|> (an added token, matched in the raw text) right at a piece's end."""
    import datasets

    text = SHAKESPEARE.read_text()
    reference = char_tokenizer_by_trainer([text])
    assert len(list(char_pieces([text]))) > 10
    tok = train_tokenizer("char", iter([text]), vocab_size=100)
    assert tok.to_str() == reference.to_str()
    assert is_char_level(tok) and not is_char_level(train_tokenizer("bpe", TEXTS, vocab_size=300))
    cut = text.rfind("\n", 0, CHAR_PIECE)
    docs = [text, text[: cut - 3] + EOT + text[cut - 3 :], "", "short\n"]
    tokenized = tokenize_dataset(datasets.Dataset.from_dict({"text": docs}), tok, eot=0)
    for doc, ids in zip(docs, tokenized["ids"], strict=True):
        assert ids == reference.encode(doc, add_special_tokens=False).ids + [0]
    assert tokenized["ids"][1].count(reference.token_to_id(EOT)) == 2  # the literal one, and the separator


def test_missing_tokenizer_directory() -> None:
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer("./no/such/tokenizer")


# ---------------------------------------------------------------- packing and cache
def test_packing_hand_written_documents(tmp_path: Path) -> None:
    docs = ["abc", "de", "fghij"]
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"text": d}) for d in docs + ["zz"] * 1))
    dm = dm_for(
        tmp_path,
        path="json",
        data_files={"train": str(f), "validation": str(f)},
        tokenizer="char",
        block_size=4,
        batch_size=1,
        val_split="validation",
    )
    dm.prepare_data()
    dm.setup()
    tok = dm.tokenizer
    eot = tok.token_to_id(EOT)
    stream = np.load(dm.token_cache() / "train.npy")
    expected = []
    for d in docs + ["zz"]:
        expected += [tok.token_to_id(c) for c in d] + [eot]
    assert stream.tolist() == expected  # documents joined by EOT, nothing dropped or padded
    # Blocks of 4 inputs, targets shifted by one, consecutive blocks share one boundary token.
    assert len(dm.train_set) == (len(expected) - 1) // 4
    first, second = dm.train_set[0], dm.train_set[1]
    assert first["input_ids"].tolist() == expected[0:4] and first["labels"].tolist() == expected[1:5]
    assert second["input_ids"].tolist() == expected[4:8]
    assert tok.decode(first["input_ids"].tolist(), skip_special_tokens=False) == "abc" + EOT


def test_cache_is_reused_and_keyed(tmp_path: Path) -> None:
    kw = dict(path="text", data_files=str(SHAKESPEARE), tokenizer="char", block_size=64, batch_size=4)
    dm = dm_for(tmp_path, **kw)
    dm.prepare_data()
    entry = dm.token_cache()
    stamp = (entry / "train.npy").stat().st_mtime_ns
    dm2 = dm_for(tmp_path, **kw)
    dm2.prepare_data()
    assert dm2.token_cache() == entry and (entry / "train.npy").stat().st_mtime_ns == stamp
    # block_size is applied when reading, so it shares the cache; a new tokenizer does not.
    assert dm_for(tmp_path, **{**kw, "block_size": 32}).token_cache() == entry
    assert dm_for(tmp_path, **{**kw, "tokenizer": "bpe", "vocab_size": 300}).token_cache() != entry
    assert not list(entry.parent.glob("*.tmp-*"))


CACHED_RUN = """
import sys
from lm_lab.data.options import DataConfig
from lm_lab.objectives.causal_lm.data import CausalLMDataModule

cfg = DataConfig(path="text", data_files=sys.argv[1], cache_dir=sys.argv[2], tokenizer="char", block_size=64)
dm = CausalLMDataModule(cfg, seed=0)
dm.prepare_data()
dm.setup("fit")
print(len(dm.train_set), len(dm.val_set), dm.corpus.loaded, "datasets" in sys.modules)
"""


def test_cached_tokens_are_served_without_reading_the_text_again(tmp_path: Path) -> None:
    """With its tokens cached, a corpus of local files is keyed on its bytes alone and never read
    through datasets, which a fresh process does not even import (~0.5 s of a run's start-up); a
    rewritten file is read again, and gives its own blocks."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:200_000])
    kw = dict(path="text", data_files=str(corpus), tokenizer="char", block_size=64)
    dm = dm_for(tmp_path, **kw)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.corpus.loaded
    r = subprocess.run(
        [sys.executable, "-c", CACHED_RUN, str(corpus), str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [str(len(dm.train_set)), str(len(dm.val_set)), "False", "False"]
    corpus.write_text(SHAKESPEARE.read_text()[:100_000])
    rewritten = dm_for(tmp_path, **kw)
    rewritten.prepare_data()
    rewritten.setup("fit")
    assert rewritten.corpus.loaded and len(rewritten.train_set) < len(dm.train_set)


def test_interrupted_cache_build_is_not_trusted(tmp_path: Path) -> None:
    kw = dict(path="text", data_files=str(SHAKESPEARE), tokenizer="char", block_size=64, batch_size=4)
    dm = dm_for(tmp_path, **kw)
    dm.prepare_data()
    entry = dm.token_cache()
    with open(entry / "train.npy", "r+b") as fh:  # simulate a torn write
        fh.truncate(1000)
    dm2 = dm_for(tmp_path, **kw)
    dm2.prepare_data()
    dm2.setup()
    assert len(dm2.train_set) == (1_003_854 + 1 - 1) // 64  # rebuilt in full (+1 for the EOT)


def test_corpus_too_short_for_one_block(tmp_path: Path) -> None:
    f = tmp_path / "short.txt"
    f.write_text("just a few words here\n")
    dm = dm_for(tmp_path, path="text", data_files=str(f), tokenizer="char", block_size=64, batch_size=1)
    with pytest.raises(DataError, match=r"too short for one block of data\.block_size=64"):
        dm.setup()


def test_streaming_reads_lazily_and_packs_blocks(tmp_path: Path) -> None:
    lines = SHAKESPEARE.read_text().split("\n\n")[:400]
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in lines))
    dm = dm_for(
        tmp_path,
        path="json",
        data_files=str(f),
        streaming=True,
        streaming_val_docs=20,
        tokenizer="char",
        block_size=16,
        batch_size=2,
    )
    from datasets import IterableDataset

    assert isinstance(dm.corpus.train, IterableDataset)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 16)
    assert torch_equal_shifted(batch)
    # Validation is the first 20 documents, held in memory, same every time.
    tok = dm.tokenizer
    first_val = tok.decode(dm.val_set[0]["input_ids"].tolist(), skip_special_tokens=False)
    assert first_val == (lines[0] + EOT)[:16]
    # Training starts after the held-out documents.
    first_train = tok.decode(batch["input_ids"][0].tolist(), skip_special_tokens=False)
    assert first_train == (lines[20] + EOT + lines[21])[:16]


def torch_equal_shifted(batch: dict) -> bool:
    return bool((batch["input_ids"][:, 1:] == batch["labels"][:, :-1]).all())


def test_window_sampling_like_nanogpt(tmp_path: Path) -> None:
    kw = dict(
        path="text", data_files=str(SHAKESPEARE), tokenizer="char", block_size=64, batch_size=4, sampling="windows"
    )
    dm = dm_for(tmp_path, **kw)
    dm.setup()
    loader = dm.train_dataloader()
    sampler = loader.sampler
    starts = list(iter(sampler))
    # One epoch = as many windows as blocks, cut to whole optimizer steps (batches of 4).
    assert len(dm.train_set) == (1_003_855 - 1) // 64
    assert len(starts) == len(dm.train_set) // 4 * 4
    assert any(s % 64 for s in starts[:50])  # arbitrary offsets, not block boundaries
    assert max(starts) <= dm.train_set.n_tokens - 65
    again = list(iter(sampler))
    assert again == starts  # same seed and epoch: same windows
    sampler.set_epoch(1)
    assert list(iter(sampler))[:20] != starts[:20]
    item = dm.train_set[starts[0]]
    tokens = np.load(dm.token_cache() / "train.npy")
    assert item["input_ids"].tolist() == tokens[starts[0] : starts[0] + 64].tolist()
    # The DataLoader fetches a batch with one gather (__getitems__): the per-sample items, stacked.
    sampler.set_epoch(0)
    batch = next(iter(loader))
    for row, start in enumerate(starts[:4]):
        one = dm.train_set[start]
        assert batch["index"][row] == start
        assert torch.equal(batch["input_ids"][row], one["input_ids"]) and torch.equal(
            batch["labels"][row], one["labels"]
        )


def test_batched_fetch_of_blocks_equals_one_by_one(tmp_path: Path) -> None:
    dm = dm_for(tmp_path, path="text", data_files=str(SHAKESPEARE), tokenizer="char", block_size=32, batch_size=3)
    dm.setup()
    ds = dm.train_set
    indices = [0, 7, len(ds) - 1]
    for got, i in zip(ds.__getitems__(indices), indices, strict=True):
        one = ds[i]
        assert got["index"] == i and got["input_ids"].dtype == one["input_ids"].dtype == torch.int64
        assert torch.equal(got["input_ids"], one["input_ids"]) and torch.equal(got["labels"], one["labels"])


WIKITEXT_ROWS = [
    "",
    " = Valkyria Chronicles III = \n",
    "",
    " Senjō no Valkyria 3 is a tactical role @-@ playing video game . It was released in 2011 .\n",
    " The game began development in 2010 .\n",
    "",
    " = = Gameplay = = \n",
    "",
    " As with previous games , the player controls a squad .\n",
    "",
    " = Tower Building of the Little Rock Arsenal = \n",
    "",
    " The Tower Building is a building in Little Rock .\n",
]


@pytest.mark.parametrize(("sample_by", "docs"), [("document", 13), ("paragraph", 6), ("article", 2)])
def test_rows_of_a_dataset_are_grouped_into_documents(tmp_path: Path, sample_by: str, docs: int) -> None:
    """WikiText's Hub rows are lines: data.sample_by=article joins them from one top-level heading to
    the next (sections stay inside), paragraph up to a blank row; document keeps the rows."""
    path = tmp_path / "wikitext.jsonl"
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in WIKITEXT_ROWS))
    files = {"train": str(path), "validation": str(path)}
    corpus = load_corpus(DataConfig(path="json", data_files=files, sample_by=sample_by))
    texts = corpus.train["text"]
    assert len(texts) == docs
    if sample_by == "article":
        assert texts[0].startswith(" = Valkyria Chronicles III =") and "the player controls a squad" in texts[0]
        assert "Gameplay" in texts[0] and texts[1].startswith(" = Tower Building")
    if sample_by == "paragraph":
        assert texts[1].count("\n") == 1  # two lines of one paragraph


def test_wikitext_presets_read_articles(compose_cfg) -> None:
    for preset in ("wikitext2", "wikitext103"):
        assert compose_cfg(f"data={preset}").data.sample_by == "article"
