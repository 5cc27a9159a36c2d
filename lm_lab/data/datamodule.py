"""LightningDataModules: corpus -> tokenizer -> cached token file -> batches."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, IterableDataset

from lm_lab.data import cache
from lm_lab.data.config import DataConfig
from lm_lab.data.packing import PackedBlocks, token_dtype, tokenize_dataset, write_tokens
from lm_lab.data.sampling import ResumableSampler
from lm_lab.data.sources import Corpus, DataError, load_corpus
from lm_lab.data.streaming import StreamingBlocks
from lm_lab.data.tokenizer import TRAINED_KINDS, describe, eot_id, load_tokenizer, tokenizer_hash, train_tokenizer

log = logging.getLogger("lm_lab")
CACHE_VERSION = 1


class TextDataModule(L.LightningDataModule):
    """What every objective shares: corpus loading, the tokenizer and its cache, batch sizes."""

    family = "gpt"
    default_tokenizer = "bpe"

    def __init__(self, cfg: DataConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.micro_batch_size = cfg.batch_size
        self._corpus: Corpus | None = None
        self._tokenizer: Tokenizer | None = None
        self._consumed = 0  # micro-batches of the current epoch already trained on
        self._consumed_epoch = 0
        self.train_sampler: ResumableSampler | None = None

    # ------------------------------------------------------------------ corpus and tokenizer
    @property
    def corpus(self) -> Corpus:
        if self._corpus is None:
            self._corpus = load_corpus(self.cfg, seed=self.seed)
            log.info("corpus: %s", self._corpus.description)
        return self._corpus

    @property
    def cache_root(self) -> Path:
        return Path(self.cfg.cache_dir).expanduser()

    @property
    def tokenizer_kind(self) -> str:
        return self.default_tokenizer if self.cfg.tokenizer == "auto" else self.cfg.tokenizer

    @property
    def tokenizer(self) -> Tokenizer:
        """Train (once, cached) or load the tokenizer."""
        if self._tokenizer is None:
            self._tokenizer = self._make_tokenizer()
            log.info("tokenizer: %s", describe(self._tokenizer))
        return self._tokenizer

    def _make_tokenizer(self) -> Tokenizer:
        kind = self.tokenizer_kind
        if kind not in TRAINED_KINDS:
            return load_tokenizer(kind)
        c = self.cfg
        key = cache.cache_key(
            {
                "v": CACHE_VERSION,
                "corpus": self.corpus.fingerprint,
                "kind": kind,
                "vocab": c.vocab_size,
                "lower": c.lowercase,
                "accents": c.strip_accents,
                "docs": c.tokenizer_train_docs,
            }
        )
        entry = self.cache_root / "tokenizers" / f"{kind}-{key}"
        if cache.load_entry(entry) is not None:
            return Tokenizer.from_file(str(entry / "tokenizer.json"))
        log.info("training a %s tokenizer (vocab %d) on the training split", kind, c.vocab_size)
        tok = train_tokenizer(
            kind, self._training_texts(), vocab_size=c.vocab_size, lowercase=c.lowercase, strip_accents=c.strip_accents
        )
        with cache.build_entry(entry) as (tmp, meta):
            tok.save(str(tmp / "tokenizer.json"))
            meta.update(kind=kind, vocab_size=tok.get_vocab_size())
        return tok

    def _training_texts(self) -> Any:
        train = self.corpus.train
        limit = self.cfg.tokenizer_train_docs or (10_000 if self.cfg.streaming else None)
        if self.cfg.streaming:
            train = train.take(limit)
            return (row["text"] for row in train)
        if limit is not None and limit < len(train):
            train = train.select(range(limit))
        return (t for batch in train.iter(batch_size=1000) for t in batch["text"])

    # ------------------------------------------------------------------ batching
    def configure_batching(self, micro_batch_size: int) -> None:
        self.micro_batch_size = micro_batch_size

    def _rank_world(self) -> tuple[int, int]:
        trainer = self._trainer if hasattr(self, "_trainer") else None
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(
        self, dataset: Any, sampler: Any = None, collate_fn: Any = None, num_workers: int | None = None
    ) -> DataLoader:
        workers = self.cfg.num_workers if num_workers is None else num_workers
        return ResumableLoader(
            dataset,
            batch_size=self.micro_batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=collate_fn,
        )

    # ------------------------------------------------------------------ exact mid-epoch resume
    def on_train_batch_consumed(self, epoch: int | None = None) -> None:
        """Called by the task as each training micro-batch *starts*; counts the data position.

        Counted at the start because ModelCheckpoint saves in its ``on_train_batch_end``, which
        Lightning calls before the LightningModule's: a count at the end would miss the batch just
        trained, and the resumed run would train on it a second time.
        """
        if epoch is None:
            epoch = self.train_sampler.epoch if self.train_sampler is not None else self._consumed_epoch
        if epoch != self._consumed_epoch:
            self._consumed, self._consumed_epoch = 0, epoch
        self._consumed += 1
        train_set = getattr(self, "train_set", None)
        if isinstance(train_set, StreamingBlocks):
            train_set.mark_consumed(self._consumed * self.micro_batch_size)

    def state_dict(self) -> dict[str, Any]:
        """The data position (saved by Lightning in every checkpoint) and the settings that decide it."""
        consumed = self._consumed * self.micro_batch_size  # samples of this epoch, per rank
        state: dict[str, Any] = {
            "epoch": self._consumed_epoch,
            "consumed": consumed,
            "seed": self.seed,
            "data": dataclasses.asdict(self.cfg),
        }
        fingerprint = self.corpus_fingerprint()
        if fingerprint is not None:  # a resume on other data (e.g. a file edited in place) is refused
            state["corpus"] = fingerprint
        if self.train_sampler is not None:
            state["sampler"] = self.train_sampler.state_dict(consumed)
        train_set = getattr(self, "train_set", None)
        if isinstance(train_set, StreamingBlocks):
            state["stream"] = self._gather(train_set.state_dict(consumed))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Applied when the train loader is built (after this hook, before the first batch).
        self._resume_state = state

    def corpus_fingerprint(self) -> str | None:
        """The fingerprint of the corpus trained on, or None before it is loaded."""
        return self._corpus.fingerprint if self._corpus is not None else None

    def _gather(self, local: Any) -> list[Any]:
        """Every rank's ``local`` on every rank (rank 0 writes the checkpoint)."""
        import torch.distributed as dist

        _, world = self._rank_world()
        if world == 1 or not (dist.is_available() and dist.is_initialized()):
            return [local]
        out: list[Any] = [None] * world
        dist.all_gather_object(out, local)
        return out

    def _make_train_sampler(self, n: int, with_replacement: int | None = None) -> ResumableSampler:
        rank, world = self._rank_world()
        sampler = ResumableSampler(
            n, shuffle=True, seed=self.seed, rank=rank, world_size=world, with_replacement=with_replacement
        )
        state = getattr(self, "_resume_state", None) or {}
        resume = state.get("sampler")
        if resume:
            if resume.get("n") != n:
                raise DataError(
                    f"the training split has {n} samples but the checkpoint's run had {resume.get('n')}: "
                    "resume with the same data and data.* settings (or start a new run with init_from=)"
                )
            sampler.load_state_dict(resume)
            self._consumed = sampler.skip // self.micro_batch_size
            self._consumed_epoch = sampler.epoch
            self._resume_state = None
        self.train_sampler = sampler
        return sampler

    def _resume_stream(self, stream: StreamingBlocks) -> None:
        state = getattr(self, "_resume_state", None) or {}
        per_rank = state.get("stream")
        if not per_rank:
            return
        rank, world = self._rank_world()
        if len(per_rank) != world:
            raise DataError(
                f"the checkpoint's streaming position was saved by {len(per_rank)} processes, this run has "
                f"{world}: resume a streaming run on the same number of devices"
            )
        stream.load_state_dict(per_rank[rank])
        self._consumed = int(state["consumed"]) // self.micro_batch_size
        self._consumed_epoch = int(state["epoch"])
        self._resume_state = None


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning treats as resumable mid-epoch (it has ``state_dict`` and
    ``load_state_dict``). The position itself is saved and restored by the DataModule
    (``TextDataModule.state_dict``), which knows how far training got, not how far prefetching got."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class CausalLMDataModule(TextDataModule):
    """Packed fixed-length blocks for next-token prediction."""

    family = "gpt"
    default_tokenizer = "bpe"

    def __init__(self, cfg: DataConfig, *, seed: int = 0) -> None:
        super().__init__(cfg, seed=seed)
        self.train_set: Any = None
        self.val_set: Any = None

    def token_cache(self) -> Path:
        tok = self.tokenizer
        key = cache.cache_key({"v": CACHE_VERSION, "corpus": self.corpus.fingerprint, "tok": tokenizer_hash(tok)})
        return self.cache_root / "tokens" / key

    def prepare_data(self) -> None:
        if self.cfg.streaming:
            return
        entry = self.token_cache()
        meta = cache.load_entry(entry)
        if meta is not None:
            log.info("tokenized corpus found in cache: %s (%s train tokens)", entry, f"{meta['train_tokens']:,}")
            return
        tok = self.tokenizer
        dtype = token_dtype(tok.get_vocab_size())
        eot = eot_id(tok)
        with cache.build_entry(entry) as (tmp, meta):
            for split, ds in (("train", self.corpus.train), ("val", self.corpus.validation)):
                tokenized = tokenize_dataset(ds, tok, eot=eot, num_proc=self.cfg.num_proc)
                meta[f"{split}_tokens"] = write_tokens(tokenized, tmp / f"{split}.npy", dtype)
            meta.update(dtype=dtype.name, vocab_size=tok.get_vocab_size(), tokenizer=tokenizer_hash(tok))
        log.info(
            "tokenized corpus cached at %s: %s train / %s val tokens",
            entry,
            f"{meta['train_tokens']:,}",
            f"{meta['val_tokens']:,}",
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        bs = self.cfg.block_size
        if self.cfg.streaming:
            from lm_lab.data.streaming import StreamingBlocks, materialize_blocks

            rank, world = self._rank_world()
            self.train_set = StreamingBlocks(self.corpus.train, self.tokenizer, bs, rank=rank, world_size=world)
            self.val_set = materialize_blocks(self.corpus.validation, self.tokenizer, bs)
        else:
            entry = self.token_cache()
            if cache.load_entry(entry) is None:
                self.prepare_data()
            self.train_set = PackedBlocks(entry / "train.npy", bs, windows=self.cfg.sampling == "windows")
            self.val_set = PackedBlocks(entry / "val.npy", bs)
        for name, ds in (("training", self.train_set), ("validation", self.val_set)):
            if not isinstance(ds, IterableDataset) and len(ds) == 0:
                raise DataError(
                    f"the {name} split has {ds.n_tokens} tokens, too short for one block of "
                    f"data.block_size={bs}: use a longer corpus or a smaller data.block_size"
                )
        if not isinstance(self.train_set, IterableDataset) and len(self.train_set) < self.micro_batch_size:
            raise DataError(
                f"the training split has {len(self.train_set)} blocks of {bs} tokens, fewer than one "
                f"batch of {self.micro_batch_size}: use a longer corpus or smaller data.batch_size/block_size"
            )
        self.log_sample()

    def log_sample(self) -> None:
        if isinstance(self.train_set, PackedBlocks):
            ids = self.train_set[0]["input_ids"][:64].tolist()
            log.info("sample of the training data: %r", self.tokenizer.decode(ids, skip_special_tokens=False))

    def train_dataloader(self) -> DataLoader:
        if isinstance(self.train_set, StreamingBlocks):
            self._resume_stream(self.train_set)
            if self.cfg.num_workers:
                log.info(
                    "data.streaming: the training stream is read in the main process (num_workers=0) so that "
                    "it can resume mid-pass"
                )
            return self._loader(self.train_set, num_workers=0)
        ds = self.train_set
        if isinstance(ds, PackedBlocks) and ds.windows:
            return self._loader(ds, sampler=self._make_train_sampler(ds.n_windows, with_replacement=len(ds)))
        return self._loader(ds, sampler=self._make_train_sampler(len(ds)))

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        # A fixed seeded order, so a limited number of validation batches (limit_val_batches)
        # is a spread-out sample of the split, and the same sample at every evaluation.
        sampler = ResumableSampler(len(self.val_set), shuffle=True, seed=1234, rank=rank, world_size=world)
        sampler.set_epoch = lambda epoch: None  # type: ignore[method-assign]
        loader = self._loader(self.val_set, sampler=sampler)
        if len(loader) == 0:
            raise DataError(
                f"the validation split has {len(self.val_set)} blocks, fewer than one batch of "
                f"{self.micro_batch_size}: raise data.val_fraction or lower data.batch_size"
            )
        return loader


def datamodule_for(family: str) -> type[TextDataModule]:
    if family == "gpt":
        return CausalLMDataModule
    if family == "bert":
        from lm_lab.data.bert_datamodule import MaskedLMDataModule

        return MaskedLMDataModule
    raise ValueError(f"unknown model family {family!r}")
