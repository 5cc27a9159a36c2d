"""Data for causal language modelling: packed fixed-length token blocks (cached memmap or a stream)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from lm_lab.data import cache
from lm_lab.data.datamodule import CACHE_VERSION, TextDataModule
from lm_lab.data.options import DataConfig
from lm_lab.data.packing import PackedBlocks, token_dtype, tokenize_dataset, write_tokens
from lm_lab.data.sources import DataError
from lm_lab.data.streaming import StreamingBlocks
from lm_lab.data.tokenizer import eot_id, tokenizer_hash
from lm_lab.objectives.causal_lm.settings import CausalLMConfig

log = logging.getLogger("lm_lab")


class CausalLMDataModule(TextDataModule):
    """Packed fixed-length blocks for next-token prediction."""

    default_tokenizer = "bpe"

    def __init__(self, cfg: DataConfig, objective: CausalLMConfig | None = None, *, seed: int = 0) -> None:
        super().__init__(cfg, objective or CausalLMConfig(), seed=seed)
        self.train_set: Any = None
        self.val_set: Any = None
        self._verified: Path | None = None  # the token entry this process checked or built

    def data_cache(self) -> Path | None:
        return None if self.cfg.streaming else self.token_cache()

    def token_cache(self) -> Path:
        tok = self.tokenizer
        key = cache.cache_key({"v": CACHE_VERSION, "corpus": self.corpus.fingerprint, "tok": tokenizer_hash(tok)})
        return self.cache_root / "tokens" / key

    def prepare_data(self) -> None:
        if self.cfg.streaming:
            return
        entry = self.token_cache()
        if entry == self._verified:
            return  # checked by this process already (a validate or test after fit)
        with cache.build_lock(entry):  # nodes sharing the cache: the first builds, the others find it
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
            if entry != self._verified:
                with cache.build_lock(entry):
                    if cache.load_entry(entry) is None:
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
