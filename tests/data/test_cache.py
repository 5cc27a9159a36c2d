"""The data cache trusts nothing it finds: content-keyed, checksummed, rebuilt (with a warning) when damaged."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lm_lab.data import cache
from lm_lab.data.options import DataConfig
from lm_lab.data.sources import load_corpus
from lm_lab.objectives.causal_lm.data import CausalLMDataModule
from lm_lab.objectives.masked_lm.data import MaskedLMDataModule

OLD = "the quick brown fox jumps over the lazy dog.\n" * 40
NEW = "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!\n" * 40  # same length, other characters
BLOCK = 16


def gpt_dm(corpus: Path, cache_dir: Path) -> CausalLMDataModule:
    cfg = DataConfig(
        path="text", data_files=str(corpus), tokenizer="char", block_size=BLOCK, batch_size=2, cache_dir=str(cache_dir)
    )
    return CausalLMDataModule(cfg, seed=0)


def first_block(dm: CausalLMDataModule) -> str:
    dm.prepare_data()
    dm.setup()
    return dm.tokenizer.decode(dm.train_set[0]["input_ids"].tolist(), skip_special_tokens=False)


def rewrite_keeping_size_and_mtime(path: Path, text: str) -> None:
    st = path.stat()
    path.write_text(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (st.st_size, st.st_mtime_ns)


def warnings_about(caplog: pytest.LogCaptureFixture, entry: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and str(entry) in r.getMessage()]


# ---------------------------------------------------------------------- keyed on content


def test_file_digest_and_corpus_key_change_after_a_same_size_same_mtime_edit(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(OLD)
    cfg = DataConfig(path="text", data_files=str(corpus), cache_dir=str(tmp_path / "cache"))
    digest, key = cache.file_digest(corpus), load_corpus(cfg).fingerprint
    rewrite_keeping_size_and_mtime(corpus, NEW)
    assert cache.file_digest(corpus) != digest
    assert load_corpus(cfg).fingerprint != key
    corpus.write_text(OLD)  # the same bytes again: the same key (names and times do not count)
    assert cache.file_digest(corpus) == digest and load_corpus(cfg).fingerprint == key


def test_corpus_rewritten_with_same_size_and_mtime_is_retokenized(tmp_path: Path) -> None:
    corpus, cache_dir = tmp_path / "corpus.txt", tmp_path / "cache"
    corpus.write_text(OLD)
    assert first_block(gpt_dm(corpus, cache_dir)) == OLD[:BLOCK]
    rewrite_keeping_size_and_mtime(corpus, NEW)
    dm = gpt_dm(corpus, cache_dir)
    assert first_block(dm) == NEW[:BLOCK]  # a new tokenizer (new characters) and new tokens
    assert dm.tokenizer.token_to_id("Q") is not None and dm.tokenizer.token_to_id("q") is None


# ---------------------------------------------------------------------- verified when loaded


def test_cached_tokens_overwritten_in_place_warn_and_are_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corpus, cache_dir = tmp_path / "corpus.txt", tmp_path / "cache"
    corpus.write_text(OLD)
    dm = gpt_dm(corpus, cache_dir)
    first_block(dm)
    entry = dm.token_cache()
    tokens = entry / "train.npy"
    st = tokens.stat()
    with open(tokens, "r+b") as f:  # same size, valid .npy header, garbage tokens
        f.seek(st.st_size // 2)
        f.write(b"\x07" * (st.st_size - st.st_size // 2))
    os.utime(tokens, ns=(st.st_atime_ns, st.st_mtime_ns))
    with caplog.at_level(logging.WARNING, logger="lm_lab"):
        dm2 = gpt_dm(corpus, cache_dir)
        assert first_block(dm2) == OLD[:BLOCK]
    assert any("train.npy does not match its checksum" in m for m in warnings_about(caplog, entry))
    n = len(dm2.train_set)
    last = dm2.train_set[n - 1]["input_ids"].tolist()
    assert dm2.tokenizer.decode(last, skip_special_tokens=False) == OLD[(n - 1) * BLOCK : n * BLOCK]
    assert cache.load_entry(entry) is not None


@pytest.mark.parametrize(
    "damage",
    ["truncated", "not an object", "edited value"],
)
def test_corrupt_meta_json_is_a_miss_with_a_warning(
    damage: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corpus, cache_dir = tmp_path / "corpus.txt", tmp_path / "cache"
    corpus.write_text(OLD)
    dm = gpt_dm(corpus, cache_dir)
    first_block(dm)
    meta_path = dm.token_cache() / "meta.json"
    text = meta_path.read_text()
    if damage == "truncated":
        meta_path.write_bytes(text.encode()[:25] + b"\xff\xfe")
    elif damage == "not an object":
        meta_path.write_text("[1, 2, 3]")
    else:
        meta = json.loads(text)
        meta["train_tokens"] = "many"
        meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="lm_lab"):
        assert first_block(gpt_dm(corpus, cache_dir)) == OLD[:BLOCK]
    (warning,) = warnings_about(caplog, dm.token_cache())
    assert "meta.json" in warning and "rebuilding" in warning
    assert cache.load_entry(dm.token_cache())["train_tokens"] > 0


def test_corrupt_cached_tokenizer_is_retrained(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    corpus, cache_dir = tmp_path / "corpus.txt", tmp_path / "cache"
    corpus.write_text(OLD)
    first_block(gpt_dm(corpus, cache_dir))
    (entry,) = (cache_dir / "tokenizers").glob("char-*")
    tok_file = entry / "tokenizer.json"
    tok_file.write_bytes(b"{" * tok_file.stat().st_size)  # same size, not JSON
    with caplog.at_level(logging.WARNING, logger="lm_lab"):
        assert first_block(gpt_dm(corpus, cache_dir)) == OLD[:BLOCK]
    assert any("tokenizer.json does not match its checksum" in m for m in warnings_about(caplog, entry))

    # An entry whose checksums match but whose tokenizer.json does not load is replaced too.
    shutil.rmtree(entry)
    with cache.build_entry(entry) as (tmp, meta):
        (tmp / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lm_lab"):
        assert first_block(gpt_dm(corpus, cache_dir)) == OLD[:BLOCK]
    assert any("tokenizer.json does not load" in m for m in warnings_about(caplog, entry))
    assert json.loads((entry / "tokenizer.json").read_text())["model"]["type"] == "WordLevel"


def test_bert_pairs_arrow_files_are_verified(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i} starts here. It has a second sentence too." for i in range(60)))
    cfg = DataConfig(
        path="text",
        data_files=str(corpus),
        sample_by="paragraph",
        tokenizer="wordpiece",
        vocab_size=200,
        block_size=32,
        batch_size=2,
        cache_dir=str(tmp_path / "cache"),
    )
    dm = MaskedLMDataModule(cfg, seed=0)
    dm.prepare_data()
    dm.setup()
    expected = [dm.train_set[i]["input_ids"].tolist() for i in range(len(dm.train_set))]
    entry = dm.pairs_cache()
    (arrow,) = (entry / "train").glob("*.arrow")
    data = bytearray(arrow.read_bytes())
    data[-200:-8] = bytes(192)  # same size: zeroed ids near the end of the table
    arrow.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="lm_lab"):
        dm2 = MaskedLMDataModule(cfg, seed=0)
        dm2.setup()
    assert any(f"train/{arrow.name} does not match its checksum" in m for m in warnings_about(caplog, entry))
    assert [dm2.train_set[i]["input_ids"].tolist() for i in range(len(dm2.train_set))] == expected


# ---------------------------------------------------------------------- leftovers of killed builds


def test_stale_tmp_dirs_of_dead_processes_are_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    corpus, cache_dir = tmp_path / "corpus.txt", tmp_path / "cache"
    corpus.write_text(OLD)
    dm = gpt_dm(corpus, cache_dir)
    first_block(dm)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: its pid names no process now
    tokens = dm.token_cache().parent
    host = socket.gethostname()
    dead = [tokens / f"abc.tmp-{host}-{proc.pid}", tokens / f"abc.tmp-{proc.pid}"]  # the latter: older lm_lab
    kept = [tokens / f"def.tmp-{host}-{os.getpid()}", tokens / f"ghi.tmp-other-node-{proc.pid}"]
    for d in dead + kept:
        (d / "partial").mkdir(parents=True)
    with caplog.at_level(logging.INFO, logger="lm_lab"):
        gpt_dm(corpus, cache_dir).prepare_data()  # a lookup in that directory
    assert [d for d in dead + kept if d.exists()] == kept  # alive here, or another host's to judge
    removed = [r.getMessage() for r in caplog.records if "unfinished cache build" in r.getMessage()]
    assert sorted(removed) == sorted(
        f"removing the unfinished cache build of a process that is gone: {d}" for d in dead
    )
