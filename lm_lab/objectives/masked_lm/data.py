"""BERT data: corpus -> sentences -> token ids -> sentence-pair instances (cached Arrow) -> masked batches.

``prepare_data`` splits every document into sentences (``split_sentences``), tokenizes them with
``datasets.map`` (no special tokens) and builds ``[CLS] A [SEP] B [SEP]`` instances as Google's
``create_pretraining_data.py`` does (``bert_pairs``). Documents are read back from the Arrow file
one window at a time (random-B documents one by one), and the instances are written with
``Dataset.from_generator``, so memory stays flat however large the corpus. The instances are
cached under a hash of (corpus, tokenizer, block size, objective, short_seq_prob, dupe_factor,
seed); masking is *not* cached: ``MLMCollator`` re-masks every epoch, reproducibly per
(seed, epoch, example index).

Decisions:

* One-sentence documents are kept, as in the original: under ``nsp`` they always get a random B
  (label 1); under ``sop`` the sentence is cut at a random token. A corpus where that skews the
  NSP labels is reported in the log with the label balance.
* Validation pairs and masks are fixed: built with seed ``VAL_SEED`` (not the run seed), masked
  with epoch 0, so ``val/*`` numbers compare across runs and seeds.
* ``data.streaming=true`` is refused (GPT-only for now): pairs need random access to other
  documents for the random B segments.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset, Sampler

from lm_lab.data import cache
from lm_lab.data.datamodule import TextDataModule
from lm_lab.data.options import DataConfig
from lm_lab.data.packing import _tokenizer_from_json
from lm_lab.data.sampling import ResumableSampler
from lm_lab.data.sources import DataError
from lm_lab.data.tokenizer import TokenizerError, tokenizer_hash
from lm_lab.objectives.masked_lm.masking import IGNORE_INDEX, MLMCollator
from lm_lab.objectives.masked_lm.pairs import create_instances, split_sentences
from lm_lab.objectives.masked_lm.settings import MaskedLMConfig

log = logging.getLogger("lm_lab")

PAIRS_VERSION = 2  # bump when sentence splitting or pair construction changes
VAL_SEED = 1234
REQUIRED_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]")


def min_block_size(objective: str) -> int:
    """[CLS] A [SEP] B [SEP] needs 3 specials + 1 token per segment; [CLS] x [SEP] needs 3."""
    return 3 if objective == "none" else 5


def default_max_predictions(block_size: int, mlm_probability: float) -> int:
    """The original's cap on masked tokens per sequence: 20 for 128 tokens (ceil(128 * 0.15))."""
    return math.ceil(block_size * mlm_probability)


class MaskedLMDataModule(TextDataModule):
    """Sentence pairs with dynamic MLM masking for BERT (``[CLS] A [SEP] B [SEP]``)."""

    default_tokenizer = "wordpiece"

    def __init__(self, cfg: DataConfig, objective: MaskedLMConfig | None = None, *, seed: int = 0) -> None:
        super().__init__(cfg, objective or MaskedLMConfig(), seed=seed)
        self._check_config()
        self.train_set: PairDataset | None = None
        self.val_set: PairDataset | None = None
        self.train_collate: EpochMaskedCollate | None = None
        self.val_collate: EpochMaskedCollate | None = None
        self._verified: Path | None = None  # the pairs entry this process checked or built

    # ------------------------------------------------------------------ checks (fail before heavy work)
    def _check_config(self) -> None:
        c = self.cfg
        if c.streaming:
            raise DataError(
                "data.streaming=true is GPT-only for now: BERT pairs need random access to other "
                "documents; set data.streaming=false (the corpus is then downloaded and cached once)"
            )
        need = min_block_size(self.objective_cfg.pair_objective)
        if c.block_size < need:
            shape = "[CLS] tokens [SEP]" if self.objective_cfg.pair_objective == "none" else "[CLS] A [SEP] B [SEP]"
            raise DataError(
                f"data.block_size={c.block_size} is too small for {shape} (at least {need} tokens): "
                f"use data.block_size=128 (BERT's phase 1) or at least 32"
            )
        if c.tokenizer in ("bpe", "char"):
            raise TokenizerError(
                f"data.tokenizer={c.tokenizer} has no [MASK]/[CLS]/[SEP] tokens, which BERT needs: "
                "use data.tokenizer=auto (WordPiece) or an HF BERT tokenizer directory"
            )

    def _check_documents(self, n_docs: int, split: str) -> None:
        if self.objective_cfg.pair_objective == "nsp" and n_docs < 2:
            hint = (
                "data.sample_by=paragraph (one document per blank-line-separated paragraph)"
                if self.cfg.path in ("text", None)
                else "a corpus with more documents"
            )
            more = " or raise data.val_fraction" if split == "validation" else ""
            raise DataError(
                f"the {split} split has {n_docs} non-empty document(s), but next-sentence prediction "
                f"draws random B segments from other documents: use {hint}{more}, "
                "or objective.pair_objective=sop (or none)"
            )

    def _make_tokenizer(self) -> Tokenizer:
        self._check_documents(len(self.corpus.train), "train")  # before training a tokenizer for nothing
        tok = super()._make_tokenizer()
        special_ids(tok)  # raises if [MASK] & co. are missing
        return tok

    # ------------------------------------------------------------------ cache of pair instances
    def data_cache(self) -> Path | None:
        return self.pairs_cache()

    def pairs_cache(self) -> Path:
        c = self.cfg
        key = cache.cache_key(
            {
                "v": PAIRS_VERSION,
                "corpus": self.corpus.fingerprint,
                "tok": tokenizer_hash(self.tokenizer),
                "block": c.block_size,
                "objective": self.objective_cfg.pair_objective,
                "short": self.objective_cfg.short_seq_prob,
                "dupe": self.objective_cfg.dupe_factor,
                "seed": self.seed,
            }
        )
        return self.cache_root / "bert_pairs" / key

    def prepare_data(self) -> None:
        entry = self.pairs_cache()
        if entry == self._verified:
            return  # checked by this process already (a validate or test after fit)
        with cache.build_lock(entry):  # nodes sharing the cache: the first builds, the others find it
            meta = cache.load_entry(entry)
            if meta is not None:
                log.info(
                    "sentence pairs found in cache: %s (%s train / %s val instances)",
                    entry,
                    f"{meta['train']['instances']:,}",
                    f"{meta['validation']['instances']:,}",
                )
                self._verified = entry
                return
            self._build_pairs(entry)

    def _build_pairs(self, entry: Path) -> None:
        tok = self.tokenizer
        ids = special_ids(tok)
        c = self.cfg
        with cache.build_entry(entry) as (tmp, meta):
            for split, ds, seed, dupe in (
                ("train", self.corpus.train, self.seed, self.objective_cfg.dupe_factor),
                ("validation", self.corpus.validation, VAL_SEED, 1),
            ):
                docs = tokenize_documents(ds, tok, tmp / f"_sentences-{split}" / "data.arrow", num_proc=c.num_proc)
                self._check_documents(len(docs), split)
                pairs = build_pairs(
                    docs,
                    max_num_tokens_total=c.block_size,
                    cls_id=ids["[CLS]"],
                    sep_id=ids["[SEP]"],
                    objective=self.objective_cfg.pair_objective,
                    short_seq_prob=self.objective_cfg.short_seq_prob,
                    seed=seed,
                    dupe_factor=dupe,
                    cache_dir=tmp / f"_gen-{split}",
                    fingerprint=f"{entry.name}-{split}",
                )
                pairs.save_to_disk(str(tmp / split))
                meta[split] = {"documents": len(docs), **pair_stats(pairs)}
                del docs, pairs
                shutil.rmtree(tmp / f"_sentences-{split}", ignore_errors=True)
                shutil.rmtree(tmp / f"_gen-{split}", ignore_errors=True)
            meta.update(
                tokenizer=tokenizer_hash(tok), block_size=c.block_size, objective=self.objective_cfg.pair_objective
            )
        self._verified = entry
        for split in ("train", "validation"):
            s = meta[split]
            balance = f", {s['random_b']:.0%} with label 1 (random/swapped B)" if "random_b" in s else ""
            log.info(
                "%s: %s documents -> %s instances, mean length %.1f tokens%s",
                split,
                f"{s['documents']:,}",
                f"{s['instances']:,}",
                s["mean_length"],
                balance,
            )
        if self.objective_cfg.pair_objective == "nsp" and meta["train"].get("random_b", 0.5) > 0.7:
            log.warning(
                "%.0f%% of NSP pairs have a random B (one-sentence documents always do): the NSP task is "
                "unbalanced; consider objective.pair_objective=sop or longer documents",
                100 * meta["train"]["random_b"],
            )

    # ------------------------------------------------------------------ setup and loaders
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        entry = self.pairs_cache()
        # Checksums are read once per process: skipped when prepare_data just did it (rank 0).
        if entry != self._verified:
            with cache.build_lock(entry):
                if cache.load_entry(entry) is None:
                    self._build_pairs(entry)
        self.train_set = PairDataset(datasets.load_from_disk(str(entry / "train")))
        self.val_set = PairDataset(datasets.load_from_disk(str(entry / "validation")))
        if len(self.train_set) < self.global_batch_size():
            raise DataError(
                f"the training split has {len(self.train_set)} sentence-pair instances, fewer than one batch of "
                f"{self.global_batch_size()}: use a longer corpus or lower data.batch_size"
            )
        if len(self.val_set) == 0:
            raise DataError("the validation split has no sentence-pair instances: raise data.val_fraction")
        self.train_collate = EpochMaskedCollate(self._collator(seed=self.seed))
        self.val_collate = EpochMaskedCollate(self._collator(seed=VAL_SEED))
        self.log_sample()

    def _collator(self, seed: int) -> MLMCollator:
        c, tok = self.cfg, self.tokenizer
        ids = special_ids(tok)
        continuation: list[int] = []
        if self.objective_cfg.whole_word_masking:
            prefix = continuation_prefix(tok)
            continuation = [i for t, i in tok.get_vocab().items() if prefix and t.startswith(prefix)]
            if not continuation:
                raise TokenizerError(
                    "objective.whole_word_masking=true needs a WordPiece tokenizer (word pieces starting "
                    "with ##): use data.tokenizer=auto or set objective.whole_word_masking=false"
                )
        max_pred = self.objective_cfg.max_predictions or default_max_predictions(
            c.block_size, self.objective_cfg.mlm_probability
        )
        return MLMCollator(
            vocab_size=tok.get_vocab_size(),
            mask_id=ids["[MASK]"],
            pad_id=ids["[PAD]"],
            special_ids=list(ids.values()),
            mlm_probability=self.objective_cfg.mlm_probability,
            max_predictions=max_pred,
            whole_word_masking=self.objective_cfg.whole_word_masking,
            continuation_ids=continuation,
            seed=seed,
            max_ngram=self.objective_cfg.max_ngram,
        )

    def log_sample(self) -> None:
        assert self.train_set is not None and self.train_collate is not None
        batch = self.train_collate([self.train_set[0]])
        ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        pieces = [
            self.tokenizer.id_to_token(i) + (f"({self.tokenizer.id_to_token(lab)})" if lab != IGNORE_INDEX else "")
            for i, lab in zip(ids, labels, strict=True)
        ]
        label = batch.get("next_sentence_label")
        about = f" with next_sentence_label={int(label[0])} (0 = B follows A)" if label is not None else ""
        log.info("sample of the training data%s; masked positions show (original): %s", about, " ".join(pieces))

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        sampler = EpochTaggedSampler(self._make_train_sampler(len(self.train_set)))
        return self._loader(self.train_set, sampler=sampler, collate_fn=self.train_collate, step_group=self.accumulate)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        # Fixed seeded order (a spread-out sample under limit_val_batches) and fixed masks (epoch 0).
        return self._eval_loader(self.val_set, seed=VAL_SEED, collate_fn=self.val_collate)


# ---------------------------------------------------------------------- tokenizer helpers


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """Ids of [PAD] [CLS] [SEP] [MASK]; raises ``TokenizerError`` naming the missing ones."""
    ids = {t: tok.token_to_id(t) for t in REQUIRED_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise TokenizerError(
            f"the tokenizer has no {' '.join(missing)} token(s), which BERT needs: use "
            "data.tokenizer=auto (WordPiece trained on the corpus) or an HF BERT tokenizer directory"
        )
    return ids  # type: ignore[return-value]


def continuation_prefix(tok: Tokenizer) -> str | None:
    return getattr(tok.model, "continuing_subword_prefix", None)


# ---------------------------------------------------------------------- documents -> pairs


def _split_and_encode(batch: dict[str, list[str]], tok_json: str) -> dict[str, list[Any]]:
    tok = _tokenizer_from_json(tok_json)
    per_doc = [split_sentences(text or "") for text in batch["text"]]
    flat = [s for sents in per_doc for s in sents]
    encoded = iter(tok.encode_batch(flat, add_special_tokens=False) if flat else [])
    docs: list[list[list[int]]] = []
    for sents in per_doc:
        ids = (next(encoded).ids for _ in sents)
        docs.append([s for s in ids if s])  # a sentence of only spaces/controls encodes to nothing
    return {"sentences": docs, "n": [len(d) for d in docs]}


def tokenize_documents(ds: Any, tok: Tokenizer, cache_file: Path, *, num_proc: int | None = None) -> ArrowDocuments:
    """Documents as lists of tokenized sentences, on disk; empty documents are dropped."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    features = datasets.Features(
        {"sentences": datasets.List(datasets.List(datasets.Value("int32"))), "n": datasets.Value("int32")}
    )
    kwargs: dict[str, Any] = {}
    if num_proc and num_proc > 1 and len(ds) >= num_proc:
        kwargs["num_proc"] = num_proc
    docs = ds.map(
        _split_and_encode,
        batched=True,
        batch_size=256,
        fn_kwargs={"tok_json": tok.to_str()},
        remove_columns=ds.column_names,
        features=features,
        cache_file_name=str(cache_file),
        desc="splitting and tokenizing sentences",
        **kwargs,
    )
    n = docs.with_format("numpy")["n"]
    keep = np.flatnonzero(np.asarray(n) > 0)
    if len(keep) < len(docs):
        docs = docs.select(keep, indices_cache_file_name=str(cache_file.with_suffix(".indices.arrow")))
    return ArrowDocuments(docs)


class ArrowDocuments(Sequence):
    """Read-only ``Sequence`` of tokenized documents (lists of sentences) backed by Arrow.

    ``window(start, size)`` loads the documents a sequential scan is about to visit in one read;
    anything else (random-B documents) is read on demand, one document at a time.
    """

    def __init__(self, ds: Any) -> None:
        self.ds = ds.select_columns(["sentences"])
        self._start, self._block = 0, []

    def __len__(self) -> int:
        return len(self.ds)

    def window(self, start: int, size: int) -> None:
        self._start, self._block = start, self.ds[start : start + size]["sentences"]

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        if self._start <= i < self._start + len(self._block):
            return self._block[i - self._start]
        return self.ds[int(i)]["sentences"]


def iter_pairs(docs: Sequence, *, seed: int, dupe_factor: int = 1, window: int = 512, **kwargs: Any) -> Iterator[dict]:
    """The instances of ``create_pairs(docs, seed=seed, dupe_factor=...)``, identical and in the same order,
    produced one document at a time (``docs`` must hold only non-empty documents)."""
    rng = random.Random(seed)
    n = len(docs)
    for _ in range(dupe_factor):
        for start in range(0, n, window):
            if isinstance(docs, ArrowDocuments):
                docs.window(start, window)
            for i in range(start, min(n, start + window)):
                yield from create_instances(docs, i, rng=rng, **kwargs)


def build_pairs(
    docs: ArrowDocuments,
    *,
    seed: int,
    dupe_factor: int,
    cache_dir: Path,
    fingerprint: str,
    objective: str,
    **kwargs: Any,
) -> datasets.Dataset:
    """Write the pair instances of ``docs`` to an Arrow dataset (never all in memory)."""
    cols: dict[str, Any] = {
        "input_ids": datasets.List(datasets.Value("int32")),
        "token_type_ids": datasets.List(datasets.Value("int8")),
    }
    if objective != "none":
        cols["next_sentence_label"] = datasets.Value("int8")

    def gen() -> Iterator[dict]:
        yield from iter_pairs(docs, seed=seed, dupe_factor=dupe_factor, objective=objective, **kwargs)

    return datasets.Dataset.from_generator(
        gen, features=datasets.Features(cols), cache_dir=str(cache_dir), fingerprint=fingerprint
    )


def pair_stats(pairs: datasets.Dataset) -> dict[str, float]:
    table = pairs.data
    n = len(pairs)
    out: dict[str, float] = {"instances": n, "mean_length": 0.0}
    if n:
        out["mean_length"] = pc.mean(pc.list_value_length(table.column("input_ids"))).as_py()
        if "next_sentence_label" in pairs.column_names:
            out["random_b"] = pc.mean(table.column("next_sentence_label")).as_py()
    return out


# ---------------------------------------------------------------------- torch side


class PairDataset(Dataset):
    """The cached instances (memory-mapped Arrow) plus each example's ``index`` (and ``epoch``).

    Keys are dataset positions or ``(epoch, position)`` tuples from ``EpochTaggedSampler``; the
    collator masks each example by (seed, epoch, index).
    """

    def __init__(self, ds: datasets.Dataset) -> None:
        self.ds = ds.with_format("numpy")

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[Any]) -> list[dict[str, Any]]:
        # One Arrow read per batch instead of one per example.
        tagged = [k if isinstance(k, tuple) else (0, k) for k in keys]
        rows = self.ds[[int(i) for _, i in tagged]]
        return [
            {**{col: values[j] for col, values in rows.items()}, "index": int(i), "epoch": int(e)}
            for j, (e, i) in enumerate(tagged)
        ]


class EpochTaggedSampler(Sampler):
    """Yields ``(epoch, index)``: the epoch travels with each example to the collate function, so masks
    change every epoch even in persistent DataLoader workers (whose collator copy never sees set_epoch)."""

    def __init__(self, sampler: ResumableSampler) -> None:
        self.sampler = sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.sampler.epoch
        for i in self.sampler:
            yield epoch, i

    def __len__(self) -> int:
        return len(self.sampler)


class EpochMaskedCollate:
    """``MLMCollator`` whose epoch is read from the examples (all of a batch share it)."""

    def __init__(self, collator: MLMCollator) -> None:
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        self.collator.set_epoch(examples[0].get("epoch", 0))
        return self.collator(examples)
