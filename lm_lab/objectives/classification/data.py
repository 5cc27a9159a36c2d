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

from lm_lab.data.options import DataConfig
from lm_lab.data.sources import DataError
from lm_lab.data.tokenizer import eot_id, is_bert_style
from lm_lab.objectives.classification.settings import ClassificationConfig
from lm_lab.objectives.supervised import LabelledDataModule

log = logging.getLogger("lm_lab")


class ClassificationDataModule(LabelledDataModule):
    def __init__(self, cfg: DataConfig, objective: ClassificationConfig | None = None, *, seed: int = 0) -> None:
        super().__init__(cfg, objective or ClassificationConfig(), seed=seed)

    # ------------------------------------------------------------------ rows and labels
    @property
    def columns(self) -> dict[str, str]:
        c = self.cfg
        cols = {c.text_column: "text", c.label_column: "label"}
        if c.text_pair_column:
            cols[c.text_pair_column] = "text"
        return cols

    def _training_texts(self) -> Any:
        """A tokenizer trained from scratch learns the training split's texts (and pairs)."""
        c, train = self.cfg, self.splits.train
        for row in train:
            yield row[c.text_column]
            if c.text_pair_column:
                yield row[c.text_pair_column]

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

    # ------------------------------------------------------------------ tokens
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
        self.check_batch()

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
