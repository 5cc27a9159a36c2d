"""Labelled texts (or text pairs) -> token ids -> padded batches, for sequence classification.

Rows come from ``lm_lab.data.labelled`` (train / validation / test). An encoder's tokenizer adds its
own specials (``[CLS] a [SEP] b [SEP]``, token types); a decoder's text is encoded as is, a pair
joined by the end-of-text token. Sequences are cut at ``data.block_size`` tokens and right-padded
per batch. Labels are mapped to indices by the objective's label set (``objective.labels``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader

from lm_lab.data.datamodule import TextDataModule
from lm_lab.data.labelled import LabelledSplits, load_labelled
from lm_lab.data.options import DataConfig
from lm_lab.data.sources import DataError
from lm_lab.data.tokenizer import eot_id, is_bert_style
from lm_lab.objectives.classification.settings import ClassificationConfig

log = logging.getLogger("lm_lab")


class ClassificationDataModule(TextDataModule):
    default_tokenizer = "bpe"
    follows_network = True  # data.tokenizer=auto: WordPiece for an encoder trained from scratch

    def __init__(self, cfg: DataConfig, objective: ClassificationConfig | None = None, *, seed: int = 0) -> None:
        super().__init__(cfg, objective or ClassificationConfig(), seed=seed)
        self._splits: LabelledSplits | None = None
        self.train_set: list[dict[str, Any]] | None = None
        self.val_set: list[dict[str, Any]] | None = None
        self.test_set: list[dict[str, Any]] | None = None

    # ------------------------------------------------------------------ rows and labels
    @property
    def columns(self) -> dict[str, str]:
        c = self.cfg
        cols = {c.text_column: "text", c.label_column: "label"}
        if c.text_pair_column:
            cols[c.text_pair_column] = "text"
        return cols

    @property
    def splits(self) -> LabelledSplits:
        if self._splits is None:
            self._splits = load_labelled(self.cfg, self.columns, seed=self.seed)
            log.info("labelled data: %s", self._splits.description)
        return self._splits

    def corpus_fingerprint(self) -> str | None:
        return self._splits.fingerprint if self._splits is not None else None

    def _training_texts(self) -> Any:
        """A tokenizer trained from scratch learns the training split's texts (and pairs)."""
        c, train = self.cfg, self.splits.train
        for row in train:
            yield row[c.text_column]
            if c.text_pair_column:
                yield row[c.text_pair_column]

    @property
    def corpus(self) -> Any:  # the tokenizer cache keys on the corpus fingerprint
        return _CorpusKey(self.splits.fingerprint)

    def complete_settings(self, objective: ClassificationConfig) -> ClassificationConfig:
        """Resolve ``problem_type`` (auto: numbers that are not all integers mean regression) and the
        label set (the training split's labels, sorted), and check every split against them."""
        c, splits = self.cfg, self.splits
        values = splits.train[c.label_column]
        problem = objective.problem_type
        if problem == "auto":
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            problem = "regression" if numeric and any(float(v) != int(v) for v in values) else "single_label"
        if problem == "regression":
            for name, ds in self._named_splits():
                bad = next(
                    (v for v in ds[c.label_column] if not isinstance(v, (int, float)) or not math.isfinite(v)), None
                )
                if bad is not None:
                    raise DataError(
                        f"the {name} split has label {bad!r} in column {c.label_column!r}, but regression needs "
                        "finite numbers: fix the data or use objective.problem_type=single_label"
                    )
            self.objective_cfg = dataclasses.replace(objective, problem_type="regression", labels=None)
            return self.objective_cfg
        labels = objective.labels
        if labels is None:
            seen = sorted(set(values), key=lambda v: (isinstance(v, str), v))
            labels = [str(v) for v in seen]
            if len(labels) < 2:
                raise DataError(
                    f"the training split has a single label ({labels[0] if labels else 'none'}) in column "
                    f"{c.label_column!r}: a classifier needs at least two"
                )
        index = {name: i for i, name in enumerate(labels)}
        for name, ds in self._named_splits():
            unknown = sorted({str(v) for v in ds[c.label_column]} - index.keys())
            if unknown:
                raise DataError(
                    f"the {name} split has label(s) {', '.join(unknown[:5])} outside the label set {labels}: "
                    "fix the data or list every label in objective.labels"
                )
        self.objective_cfg = dataclasses.replace(objective, problem_type="single_label", labels=labels)
        log.info("labels (%d): %s", len(labels), ", ".join(labels))
        return self.objective_cfg

    def _named_splits(self) -> list[tuple[str, Any]]:
        s = self.splits
        return [
            (n, d) for n, d in (("training", s.train), ("validation", s.validation), ("test", s.test)) if d is not None
        ]

    def has_test(self) -> bool:
        return self.splits.test is not None

    # ------------------------------------------------------------------ tokens
    def prepare_data(self) -> None:
        self.splits  # noqa: B018  (loads and checks the files once, before the Trainer's setup)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.objective_cfg.problem_type == "auto" or (
            self.objective_cfg.problem_type == "single_label" and self.objective_cfg.labels is None
        ):
            self.complete_settings(self.objective_cfg)
        s = self.splits
        self.train_set = self._encode(s.train)
        self.val_set = self._encode(s.validation)
        self.test_set = self._encode(s.test) if s.test is not None else None
        longest = max(len(r["input_ids"]) for r in self.train_set)
        log.info(
            "tokenized %d training rows (longest %d tokens, cut at data.block_size=%d)",
            len(self.train_set),
            longest,
            self.cfg.block_size,
        )
        if len(self.train_set) < self.global_batch_size():
            raise DataError(
                f"the training split has {len(self.train_set)} rows, fewer than one batch of "
                f"{self.global_batch_size()} (data.batch_size): use a smaller data.batch_size"
            )

    def _encode(self, ds: Any) -> list[dict[str, Any]]:
        c, o, tok = self.cfg, self.objective_cfg, self.tokenizer
        texts = ds[c.text_column]
        pairs = ds[c.text_pair_column] if c.text_pair_column else None
        for name, column in ((c.text_column, texts), (c.text_pair_column, pairs)):
            if column is not None and any(not isinstance(t, str) for t in column):
                raise DataError(f"column {name!r} holds a value that is not text (e.g. null): fix the data")
        encoder = is_bert_style(tok)
        if encoder:
            tok = Tokenizer.from_str(tok.to_str())
            tok.enable_truncation(max_length=c.block_size)
            encoded = tok.encode_batch(list(zip(texts, pairs, strict=True)) if pairs else texts)
            rows = [{"input_ids": e.ids, "token_type_ids": e.type_ids} for e in encoded]
        else:
            sep = eot_id(tok)
            first = tok.encode_batch(texts, add_special_tokens=False)
            second = tok.encode_batch(pairs, add_special_tokens=False) if pairs else None
            rows = []
            for i, e in enumerate(first):
                ids = e.ids + ([sep] + second[i].ids if second is not None and sep is not None else [])
                rows.append({"input_ids": (ids or [sep if sep is not None else 0])[: c.block_size]})
        index = {name: i for i, name in enumerate(o.labels or [])}
        for row, label in zip(rows, ds[c.label_column], strict=True):
            row["labels"] = float(label) if o.problem_type == "regression" else index[str(label)]
        return rows

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        pad = tok.token_to_id("[PAD]")
        if pad is None:
            pad = eot_id(tok)
        return 0 if pad is None else pad

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest row of the batch."""
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long) if "token_type_ids" in rows[0] else None
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
            if types is not None:
                types[i, :n] = torch.tensor(r["token_type_ids"])
        regression = self.objective_cfg.problem_type == "regression"
        labels = torch.tensor([r["labels"] for r in rows], dtype=torch.float32 if regression else torch.long)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if types is not None:
            batch["token_type_ids"] = types
        return batch

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        sampler = self._make_train_sampler(len(self.train_set))
        return self._loader(self.train_set, sampler=sampler, collate_fn=self.collate, step_group=self.accumulate)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set, seed=1234, collate_fn=self.collate)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise DataError("there is no test split: name one in data.data_files (test: file)")
        return self._eval_loader(self.test_set, seed=1234, collate_fn=self.collate)


@dataclasses.dataclass
class _CorpusKey:
    """What the tokenizer cache and resume checks read of a corpus: its fingerprint."""

    fingerprint: str
