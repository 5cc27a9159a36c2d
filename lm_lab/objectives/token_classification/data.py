"""Words with a tag each -> sub-token ids with aligned labels -> padded batches, for token classification.

Rows come from ``lm_lab.data.labelled`` (train / validation / test): ``data.text_column`` holds a list
of words, ``data.label_column`` a list of tags of the same length. A word becomes one or more
sub-tokens; its tag goes on its first sub-token and the rest get -100 (ignored), as in BERT's CoNLL
fine-tuning (``objective.label_all_subtokens=true`` labels them all). An encoder's WordPiece
tokenizer reads the words pre-tokenized and adds [CLS] / [SEP] (both -100); a decoder's byte-level
BPE encodes each word with a leading space (but the first) and the pieces are concatenated, no
specials. Sequences are cut at ``data.block_size`` sub-tokens (words past the cut are not scored)
and right-padded per batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from tokenizers import Tokenizer

from lm_lab.data.options import DataConfig
from lm_lab.data.sources import DataError
from lm_lab.data.tokenizer import eot_id, is_bert_style
from lm_lab.objectives.supervised import LabelledDataModule
from lm_lab.objectives.token_classification.settings import TokenClassificationConfig, is_bio

log = logging.getLogger("lm_lab")


class EncodedWords(NamedTuple):
    """One row of words as sub-tokens: ids, token types (encoders) and the word of each sub-token
    (None for [CLS], [SEP] and the stand-in of an empty row)."""

    ids: list[int]
    type_ids: list[int] | None
    word_ids: list[int | None]


def encode_words(tok: Tokenizer, rows: Sequence[Sequence[str]], max_len: int) -> list[EncodedWords]:
    """Sub-tokens of each row of words, at most ``max_len`` of them (specials included)."""
    if is_bert_style(tok):
        tok = Tokenizer.from_str(tok.to_str())
        tok.no_padding()
        tok.enable_truncation(max_length=max_len)
        encs = tok.encode_batch([list(words) for words in rows], is_pretokenized=True)
        return [EncodedWords(e.ids, e.type_ids, list(e.word_ids)) for e in encs]
    # Byte-level BPE: " word" is how a word inside running text is tokenized.
    pieces = tok.encode_batch(
        [w if j == 0 else " " + w for words in rows for j, w in enumerate(words)], add_special_tokens=False
    )
    out, k = [], 0
    filler = eot_id(tok)
    for words in rows:
        ids: list[int] = []
        word_ids: list[int | None] = []
        for j in range(len(words)):
            piece = pieces[k + j].ids
            ids += piece
            word_ids += [j] * len(piece)
        k += len(words)
        if not ids:  # no words: one stand-in token, unlabelled
            ids, word_ids = [0 if filler is None else filler], [None]
        out.append(EncodedWords(ids[:max_len], None, word_ids[:max_len]))
    return out


def first_subtokens(word_ids: Sequence[int | None]) -> list[tuple[int, int]]:
    """(position, word index) of each word's first sub-token."""
    out, prev = [], None
    for pos, w in enumerate(word_ids):
        if w is not None and w != prev:
            out.append((pos, w))
        prev = w
    return out


def align_labels(
    word_ids: Sequence[int | None], tags: Sequence[int], continuation: Sequence[int] | None = None
) -> tuple[list[int], list[bool]]:
    """(a label per sub-token, whether it starts a word). A word's first sub-token gets its tag; the
    others -100, or with ``continuation`` (tag index -> index, ``label_all_subtokens``) that tag's
    continuation (``B-X`` -> ``I-X``); specials -100."""
    labels = [-100] * len(word_ids)
    starts = [False] * len(word_ids)
    for pos, w in first_subtokens(word_ids):
        labels[pos], starts[pos] = tags[w], True
    if continuation is not None:
        for pos, w in enumerate(word_ids):
            if w is not None and not starts[pos]:
                labels[pos] = continuation[tags[w]]
    return labels, starts


class TokenClassificationDataModule(LabelledDataModule):
    def __init__(self, cfg: DataConfig, objective: TokenClassificationConfig | None = None, *, seed: int = 0) -> None:
        super().__init__(cfg, objective or TokenClassificationConfig(), seed=seed)
        self._rows: dict[str, tuple[list[list[str]], list[list[str]]]] = {}
        self._completed = False

    # ------------------------------------------------------------------ rows and tags
    @property
    def columns(self) -> dict[str, str]:
        return {self.cfg.text_column: "words", self.cfg.label_column: "tags"}

    def rows(self, split: str) -> tuple[list[list[str]], list[list[str]]]:
        """(words, tags) of every row of ``split`` (training / validation / test), checked: lists of
        words, lists of tags (as text; a ``ClassLabel`` tag column by its names) of the same length."""
        if split not in self._rows:
            c = self.cfg
            ds = dict(self._named_splits())[split]
            words, tags = ds[c.text_column], ds[c.label_column]
            names = _tag_names(ds.features[c.label_column])
            for i, (w, t) in enumerate(zip(words, tags, strict=True)):
                if not isinstance(w, list) or not all(isinstance(x, str) for x in w):
                    raise DataError(
                        f"row {i} of the {split} split: column {c.text_column!r} holds {_shown(w)}, not a list of "
                        "words: fix the data or set data.text_column"
                    )
                if not isinstance(t, list) or any(x is None for x in t):
                    raise DataError(
                        f"row {i} of the {split} split: column {c.label_column!r} holds {_shown(t)}, not a list of "
                        "tags: fix the data or set data.label_column"
                    )
                if len(w) != len(t):
                    raise DataError(
                        f"row {i} of the {split} split has {len(w)} words ({c.text_column!r}) but {len(t)} tags "
                        f"({c.label_column!r}): every word needs exactly one tag"
                    )
            self._rows[split] = (words, [[names[x] if names else str(x) for x in t] for t in tags])
        return self._rows[split]

    def _training_texts(self) -> Any:
        """A tokenizer trained from scratch learns the training split's words, a row per text."""
        for words in self.rows("training")[0]:
            yield " ".join(words)

    def complete_settings(self, objective: TokenClassificationConfig) -> TokenClassificationConfig:
        """Resolve the tag set (the training split's tags, sorted) and check every split against it.
        ``scheme`` stays as given (``auto`` is read against the tags when metrics are made), so a
        resumed run's settings compare equal."""
        c = self.cfg
        labels = objective.labels
        if labels is None:
            ds = self.splits.train
            names = _tag_names(ds.features[c.label_column])
            raw = {x for t in ds[c.label_column] for x in (t or []) if x is not None}
            seen = sorted(raw, key=lambda v: (isinstance(v, str), v))
            labels = [names[x] if names else str(x) for x in seen]
            if len(labels) < 2:
                raise DataError(
                    f"the training split has a single tag ({labels[0] if labels else 'none'}) in column "
                    f"{c.label_column!r}: a tagger needs at least two"
                )
        known = set(labels)
        for name, _ in self._named_splits():
            unknown = sorted({x for t in self.rows(name)[1] for x in t} - known)
            if unknown:
                raise DataError(
                    f"the {name} split has tag(s) {', '.join(unknown[:5])} outside the tag set "
                    f"({len(labels)} tags: {', '.join(labels[:10])}{', ...' if len(labels) > 10 else ''}): "
                    "fix the data or list every tag in objective.labels"
                )
        if objective.scheme == "bio" and not is_bio(labels):
            raise DataError(
                f"objective.scheme=bio but the tags ({', '.join(labels[:10])}) are not all O, B-<type> or "
                "I-<type>: use objective.scheme=auto or none"
            )
        self.objective_cfg = dataclasses.replace(objective, labels=labels)
        self._completed = True
        log.info(
            "tags (%d%s): %s",
            len(labels),
            ", BIO: entity-level F1 reported" if self.objective_cfg.bio else "",
            ", ".join(labels),
        )
        return self.objective_cfg

    # ------------------------------------------------------------------ tokens
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self._completed:
            self.complete_settings(self.objective_cfg)
        self.train_set = self._encode("training")
        self.val_set = self._encode("validation")
        self.test_set = self._encode("test") if self.splits.test is not None else None
        self.check_batch()

    def _encode(self, split: str) -> list[dict[str, Any]]:
        c, o = self.cfg, self.objective_cfg
        words, tags = self.rows(split)
        index = {name: i for i, name in enumerate(o.labels or [])}
        continuation = None
        if o.label_all_subtokens:
            continuation = [
                index.get("I-" + name[2:], i) if o.bio and name.startswith("B-") else i
                for i, name in enumerate(o.labels or [])
            ]
        encoded = encode_words(self.tokenizer, words, c.block_size)
        rows, cut = [], 0
        for enc, row_words, row_tags in zip(encoded, words, tags, strict=True):
            labels, starts = align_labels(enc.word_ids, [index[t] for t in row_tags], continuation)
            cut += sum(starts) < len(row_words)
            row: dict[str, Any] = {"input_ids": enc.ids, "labels": labels, "word_starts": starts}
            if enc.type_ids is not None:
                row["token_type_ids"] = enc.type_ids
            rows.append(row)
        longest = max(len(r["input_ids"]) for r in rows)
        log.info(
            "tokenized the %s split: %d rows, longest %d sub-tokens%s",
            split,
            len(rows),
            longest,
            f"; {cut} row(s) lose words past data.block_size={c.block_size} (or words with no sub-token), "
            "which are not scored"
            if cut
            else "",
        )
        return rows

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest row of the batch (labels with -100)."""
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        starts = torch.zeros((len(rows), width), dtype=torch.bool)
        types = torch.zeros((len(rows), width), dtype=torch.long) if "token_type_ids" in rows[0] else None
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(r["labels"])
            starts[i, :n] = torch.tensor(r["word_starts"])
            if types is not None:
                types[i, :n] = torch.tensor(r["token_type_ids"])
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "word_starts": starts}
        if types is not None:
            batch["token_type_ids"] = types
        return batch


def _tag_names(feature: Any) -> list[str] | None:
    """The names of a ``Sequence(ClassLabel)`` tag column, else None."""
    inner = getattr(feature, "feature", None)
    if isinstance(feature, list) and feature:
        inner = feature[0]
    names = getattr(inner, "names", None)
    return list(names) if names else None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
