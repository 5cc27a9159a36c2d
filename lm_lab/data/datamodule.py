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
from torch.utils.data import DataLoader

from lm_lab.data import cache
from lm_lab.data.options import DataConfig
from lm_lab.data.sampling import EvalPadding, EvalSampler, ResumableSampler
from lm_lab.data.sources import Corpus, DataError, load_corpus
from lm_lab.data.streaming import StreamingBlocks
from lm_lab.data.tokenizer import TRAINED_KINDS, TRAINER_REVISION, describe, load_tokenizer, train_tokenizer

log = logging.getLogger("lm_lab")
CACHE_VERSION = 1


class TextDataModule(L.LightningDataModule):
    """What every objective's DataModule shares: corpus loading, the tokenizer and its cache, batch
    sizes, the resumable data position. An objective's subclass (``lm_lab/objectives/<name>/data.py``)
    turns the corpus into its batches.

    ``train.py`` builds it from the ``data`` and ``objective`` settings and then binds what is only
    known later, once, through ``connect`` (the tokenizer of a resumed run, the micro-batch size and
    accumulation derived from the number of devices).
    """

    default_tokenizer = "bpe"  # what data.tokenizer=auto trains
    follows_network = False  # True: data.tokenizer=auto follows the network kind (see connect)

    def __init__(self, cfg: DataConfig, objective: Any = None, *, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.objective_cfg = objective
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

    def data_cache(self) -> Path | None:
        """The cache entry holding this data tokenized (its name is a hash of corpus, tokenizer and
        settings), for the run's lineage; None when nothing is cached (streaming, labelled rows)."""
        return None

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
                "trainer": TRAINER_REVISION,
            }
        )
        entry = self.cache_root / "tokenizers" / f"{kind}-{key}"
        # Every process of a torchrun/SLURM job gets here at once: one trains, the others wait and load.
        with cache.build_lock(entry):
            return self._load_or_train_tokenizer(entry, kind)

    def _load_or_train_tokenizer(self, entry: Path, kind: str) -> Tokenizer:
        c = self.cfg
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

    # ------------------------------------------------------------------ what the data decides
    def complete_settings(self, objective: Any) -> Any:
        """The objective's settings completed from the data (e.g. a classifier's label set), called
        once by ``train.py`` before the task is built; by default unchanged."""
        return objective

    def has_test(self) -> bool:
        """Whether there is a test split to evaluate the best checkpoint on after training."""
        return False

    # ------------------------------------------------------------------ late binding
    def connect(
        self,
        *,
        tokenizer: Tokenizer | None = None,
        micro_batch_size: int | None = None,
        accumulate: int = 1,
        network_kind: str | None = None,
    ) -> None:
        """Bind what is known only once the run is planned: a ``tokenizer`` to use instead of training
        or loading one (a resumed run's, or ``init_from``'s, stored in its checkpoint), the per-device
        ``micro_batch_size`` and the micro-batches per optimizer step (``DataConfig.micro_batch``), and
        the kind of network trained (``encoder``: ``data.tokenizer=auto`` trains WordPiece with BERT's
        specials; objectives that fix the kind ignore it)."""
        if tokenizer is not None:
            self._tokenizer = tokenizer
        if network_kind is not None and self.follows_network:
            self.default_tokenizer = "wordpiece" if network_kind == "encoder" else "bpe"
        if micro_batch_size is not None:
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


def _distributed_world() -> int:
    """The world size of a running (or about to start) torch.distributed job, else 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))
