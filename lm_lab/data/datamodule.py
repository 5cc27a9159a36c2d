"""LightningDataModules: corpus -> tokenizer -> cached token file -> batches."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, IterableDataset

from lm_lab.data import cache
from lm_lab.data.config import DataConfig
from lm_lab.data.packing import PackedBlocks, token_dtype, tokenize_dataset, write_tokens
from lm_lab.data.sampling import EvalPadding, EvalSampler, ResumableSampler
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
        self.accumulate = 1
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
            try:
                return Tokenizer.from_file(str(entry / "tokenizer.json"))
            except Exception as e:  # tokenizers raises a bare Exception; a cache must not stop the run
                cache.discard_entry(
                    entry, f"tokenizer.json does not load ({str(e).splitlines()[0] if str(e) else e!r})"
                )
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
            if next(iter(train), None) is None:
                raise DataError(
                    f"data.streaming: the training stream is empty: the corpus has no more documents than "
                    f"data.streaming_val_docs={self.cfg.streaming_val_docs}, which go to validation (a .txt file "
                    "read by document is one document): use data.sample_by=paragraph or line, a smaller "
                    "data.streaming_val_docs, or data.streaming=false"
                )
            return (row["text"] for row in train)
        if limit is not None and limit < len(train):
            train = train.select(range(limit))
        return (t for batch in train.iter(batch_size=1000) for t in batch["text"])

    # ------------------------------------------------------------------ batching
    def configure_batching(self, micro_batch_size: int, accumulate: int = 1) -> None:
        """Per-device micro-batch size and micro-batches per optimizer step (``DataConfig.micro_batch``)."""
        self.micro_batch_size = micro_batch_size
        self.accumulate = accumulate

    def global_batch_size(self) -> int:
        """Sequences per optimizer step over all ranks (``data.batch_size``)."""
        return self.micro_batch_size * self.accumulate * self._rank_world()[1]

    def _rank_world(self) -> tuple[int, int]:
        """(global rank, world size) from the Trainer this DataModule is attached to.

        Outside a Trainer (a DataModule used on its own) it is (0, 1) -- but never silently in a
        distributed job: there every process would believe it is rank 0 and draw the same shard.
        """
        trainer = self.trainer  # set by Lightning (trainer.fit(..., datamodule=dm))
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if _distributed_world() > 1:
            raise RuntimeError(
                f"{type(self).__name__} is used in a distributed job without a Trainer, so it cannot tell "
                "its rank: attach it with trainer.fit(model, datamodule=dm)"
            )
        return 0, 1

    def _loader(
        self,
        dataset: Any,
        sampler: Any = None,
        collate_fn: Any = None,
        num_workers: int | None = None,
        drop_last: bool = True,
        step_group: int = 1,
        batch_size: int | None = None,
    ) -> DataLoader:
        workers = self.cfg.num_workers if num_workers is None else num_workers
        return ResumableLoader(
            step_group,
            dataset,
            batch_size=batch_size or self.micro_batch_size,
            sampler=sampler,
            drop_last=drop_last,
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
        _, world = self._rank_world()
        state: dict[str, Any] = {
            "epoch": self._consumed_epoch,
            "consumed": consumed,
            "world_size": world,
            "seed": self.seed,
            "data": dataclasses.asdict(self.cfg),
        }
        fingerprint = self.corpus_fingerprint()
        if fingerprint is not None:  # a resume on other data (e.g. a file edited in place) is refused
            state["corpus"] = fingerprint
        if self.train_sampler is not None:
            # All ranks draw in step, so this is the position of the whole job (see ResumableSampler).
            state["sampler"] = self.train_sampler.state_dict(consumed * world)
        train_set = getattr(self, "train_set", None)
        if isinstance(train_set, StreamingBlocks):
            state["stream"] = self._gather(train_set.state_dict(consumed))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Applied when the train loader is built (after this hook, before the first batch).
        self._resume_state = state

    def _eval_loader(self, dataset: Any, *, seed: int, collate_fn: Any = None) -> DataLoader:
        """Every sample of ``dataset`` scored once over all ranks (``EvalSampler``), last batch kept."""
        rank, world = self._rank_world()
        if len(dataset) == 0:
            raise DataError("the validation split is empty: raise data.val_fraction or use a longer corpus")
        padded = EvalPadding(dataset, collate_fn)
        sampler = EvalSampler(len(dataset), seed=seed, rank=rank, world_size=world)
        # Batches of data.batch_size / world (no gradients to hold, so no accumulation): a
        # trainer.limit_val_batches then covers the same samples on any number of devices.
        return self._loader(
            padded,
            sampler=sampler,
            collate_fn=padded.collate,
            drop_last=False,
            batch_size=self.micro_batch_size * self.accumulate,
        )

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
        step_samples = self.global_batch_size()
        if (with_replacement or n) < step_samples:
            raise DataError(
                f"the training split has {n} samples, fewer than one batch of {step_samples} "
                "(data.batch_size): use a longer corpus or a smaller data.batch_size"
            )
        sampler = ResumableSampler(
            n,
            shuffle=True,
            seed=self.seed,
            rank=rank,
            world_size=world,
            with_replacement=with_replacement,
            step_samples=step_samples,
        )
        state = getattr(self, "_resume_state", None) or {}
        resume = state.get("sampler")
        if resume:
            if resume.get("n") != n:
                raise DataError(
                    f"the training split has {n} samples but the checkpoint's run had {resume.get('n')}: "
                    "resume with the same data and data.* settings (or start a new run with init_from=)"
                )
            saved_world = int(resume.get("world_size", state.get("world_size", world)))
            if saved_world != world:
                log.info(
                    "resuming on %d processes a run saved on %d: continuing from the same global data position",
                    world,
                    saved_world,
                )
            # The position is global (all ranks together), so any world size continues from it.
            sampler.load_state_dict(resume)
            self._consumed = sampler.skip // (self.micro_batch_size * world)
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
    (``TextDataModule.state_dict``), which knows how far training got, not how far prefetching got.

    With ``step_group`` > 1 (training with gradient accumulation) it reads the micro-batches of
    one optimizer step ahead and gives each the number of targets (labels other than -100) of the
    whole step on this rank, ``step_targets``: the task normalizes token losses by the step's
    total over all ranks, so every target token weighs the same (``PretrainTask.token_mean``).
    """

    def __init__(self, step_group: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_group = step_group

    def __iter__(self) -> Any:
        return with_step_targets(super().__iter__(), self.step_group)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def with_step_targets(batches: Iterator[dict[str, Any]], group: int) -> Iterator[dict[str, Any]]:
    """Yield ``batches`` in groups of ``group`` (the last may be shorter), each batch carrying
    ``step_targets``: the number of its group's labels that are not -100."""
    while True:
        chunk = list(itertools.islice(batches, group))
        if not chunk:
            return
        n = torch.zeros((), dtype=torch.long)
        for batch in chunk:
            n = n + (batch["labels"] != -100).sum()
        for batch in chunk:
            batch["step_targets"] = n
            yield batch


class CausalLMDataModule(TextDataModule):
    """Packed fixed-length blocks for next-token prediction."""

    family = "gpt"
    default_tokenizer = "bpe"

    def __init__(self, cfg: DataConfig, *, seed: int = 0) -> None:
        super().__init__(cfg, seed=seed)
        self.train_set: Any = None
        self.val_set: Any = None
        self._verified: Path | None = None  # the token entry this process checked or built

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
            self._verified = entry
            return
        self._build_tokens(entry)

    def _build_tokens(self, entry: Path) -> None:
        tok = self.tokenizer
        dtype = token_dtype(tok.get_vocab_size())
        eot = eot_id(tok)
        with cache.build_entry(entry) as (tmp, meta):
            for split, ds in (("train", self.corpus.train), ("val", self.corpus.validation)):
                tokenized = tokenize_dataset(ds, tok, eot=eot, num_proc=self.cfg.num_proc)
                meta[f"{split}_tokens"] = write_tokens(tokenized, tmp / f"{split}.npy", dtype)
            meta.update(dtype=dtype.name, vocab_size=tok.get_vocab_size(), tokenizer=tokenizer_hash(tok))
        self._verified = entry
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
            self._check_stream(self.train_set, rank, world)
        else:
            entry = self.token_cache()
            # Checksums are read once per process: skipped when prepare_data just did it (rank 0).
            if entry != self._verified and cache.load_entry(entry) is None:
                self._build_tokens(entry)
            self.train_set = PackedBlocks(entry / "train.npy", bs, windows=self.cfg.sampling == "windows")
            self.val_set = PackedBlocks(entry / "val.npy", bs)
        for name, ds in (("training", self.train_set), ("validation", self.val_set)):
            if not isinstance(ds, IterableDataset) and len(ds) == 0:
                raise DataError(
                    f"the {name} split has {ds.n_tokens} tokens, too short for one block of "
                    f"data.block_size={bs}: use a longer corpus or a smaller data.block_size"
                )
        batch = self.global_batch_size()
        if not isinstance(self.train_set, IterableDataset) and len(self.train_set) < batch:
            raise DataError(
                f"the training split has {len(self.train_set)} blocks of {bs} tokens, fewer than one "
                f"batch of {batch}: use a longer corpus or smaller data.batch_size/block_size"
            )
        self.log_sample()

    def _check_stream(self, stream: StreamingBlocks, rank: int, world: int) -> None:
        """Refuse, before training, a stream in which some rank has not one batch: Lightning would
        otherwise loop over empty epochs forever (and no step boundary would ever see SIGTERM)."""
        short = torch.tensor(float(not stream.has_blocks(self.micro_batch_size)))
        trainer = self.trainer
        if world > 1 and trainer is not None:
            short = trainer.strategy.reduce(short.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        if float(short) > 0:
            c = self.cfg
            where = "the training stream" if world == 1 else f"the training stream of at least one of the {world} ranks"
            raise DataError(
                f"data.streaming: {where} holds less than one batch ({self.micro_batch_size} blocks of "
                f"{c.block_size} tokens) after the first data.streaming_val_docs={c.streaming_val_docs} documents "
                "went to validation (a .txt file read by document is one document): use data.sample_by=paragraph "
                "or line, a smaller data.streaming_val_docs, more data, or data.streaming=false"
            )
        if world > 1 and trainer is not None and (trainer.max_steps is None or trainer.max_steps < 0):
            raise DataError(
                "data.streaming on several processes needs trainer.max_steps: each rank reads its own shard, and "
                "shards end at different steps, so an epoch count cannot end all ranks together"
            )

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
            return self._loader(self.train_set, num_workers=0, step_group=self.accumulate)
        ds = self.train_set
        if isinstance(ds, PackedBlocks) and ds.windows:
            sampler = self._make_train_sampler(ds.n_windows, with_replacement=len(ds))
        else:
            sampler = self._make_train_sampler(len(ds))
        return self._loader(ds, sampler=sampler, step_group=self.accumulate)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set, seed=1234)


def _distributed_world() -> int:
    """The world size of a running (or about to start) torch.distributed job, else 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def datamodule_for(family: str) -> type[TextDataModule]:
    if family == "gpt":
        return CausalLMDataModule
    if family == "bert":
        from lm_lab.data.bert_datamodule import MaskedLMDataModule

        return MaskedLMDataModule
    raise ValueError(f"unknown model family {family!r}")
