"""Dynamic masked-language-model collation for BERT-style pretraining.

Google's original ``create_pretraining_data.py`` masked every instance once,
offline (``dupe_factor`` copies gave a few different masks). Here masking happens
in the collate function, like RoBERTa's dynamic masking, but it stays exactly
reproducible: the mask of an example depends only on ``(seed, epoch, index)``
where ``index`` is the example's position in the dataset. Batch composition,
number of DataLoader workers and resuming mid-epoch therefore do not change it.

Selection follows ``create_masked_lm_predictions``:

* candidates are all tokens except special tokens and padding;
* ``num_to_predict = min(max_predictions, max(1, round(n_candidates * p)))``
  (the original multiplied the full length including [CLS]/[SEP]; counting only
  candidates makes ``mlm_probability`` mean what it says);
* candidate *words* are visited in random order; with whole-word masking a word
  is a start token plus the directly following continuation tokens (e.g. ``##``
  WordPieces) and a word that would overflow the budget is skipped;
* every chosen token independently becomes ``[MASK]`` (80%), a random token
  (10%) or stays unchanged (10%). Random tokens are drawn uniformly from the
  vocabulary *minus special ids* (the original could draw e.g. ``[CLS]``, which
  only adds noise).

``max_ngram > 1`` is ALBERT's n-gram masking (``create_pretraining_data.py`` of
google-research/albert): from each randomly ordered start, a span of ``n``
consecutive units (tokens, or whole words) is masked, ``n`` drawn with
probability proportional to ``1/n`` (for 3: 6/11, 3/11, 2/11) and shortened while
it would overflow the budget; spans never overlap.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["IGNORE_INDEX", "MLMCollator"]

# Label value ignored by torch.nn.CrossEntropyLoss (and by transformers' models).
IGNORE_INDEX = -100


class MLMCollator:
    """``collate_fn`` that pads a batch dynamically and applies MLM masking.

    Each example is a dict with ``input_ids`` (unpadded, special tokens already
    in place), optional ``token_type_ids``, optional ``next_sentence_label`` and
    an integer ``index`` (its position in the dataset; e.g. add it with
    ``dataset.map(lambda ex, i: {"index": i}, with_indices=True)``).

    Returns ``input_ids`` (masked), ``token_type_ids``, ``attention_mask`` and
    ``labels`` (original id at predicted positions, -100 elsewhere), plus
    ``next_sentence_label`` when *every* example has one; all ``torch.long``.

    Call :meth:`set_epoch` at the start of each epoch to get fresh masks. With
    ``persistent_workers=True`` the workers keep the copy made when they
    started, so the epoch must then be set before the workers are created (or
    masks repeat across epochs).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        mask_id: int | None,
        pad_id: int | None,
        special_ids: Sequence[int],
        mlm_probability: float = 0.15,
        max_predictions: int | None = None,
        whole_word_masking: bool = False,
        continuation_ids: Collection[int] = (),
        seed: int = 0,
        max_ngram: int = 1,
    ) -> None:
        # mask_id/pad_id accept None so that callers can pass
        # `tokenizer.token_to_id("[MASK]")` straight through and get a clear error.
        if mask_id is None:
            raise ValueError(
                "tokenizer has no [MASK] token: MLM needs one; add '[MASK]' to the "
                "tokenizer's special tokens and retrain or extend it"
            )
        if pad_id is None:
            raise ValueError(
                "tokenizer has no [PAD] token: dynamic padding needs one; add '[PAD]' to the tokenizer's special tokens"
            )
        if vocab_size <= 0:
            raise ValueError(f"vocab_size={vocab_size} must be positive")
        for name, value in (("mask_id", mask_id), ("pad_id", pad_id)):
            if not 0 <= value < vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary [0, {vocab_size})")
        if not 0.0 < mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability={mlm_probability} must be in (0, 1]: BERT uses 0.15")
        if max_predictions is not None and max_predictions < 1:
            raise ValueError(
                f"max_predictions={max_predictions} must be >= 1 or None (no cap); BERT used 20 for 128-token sequences"
            )
        if whole_word_masking and not continuation_ids:
            raise ValueError(
                "whole_word_masking=True needs continuation_ids (ids of word-continuation "
                "pieces, e.g. WordPiece tokens starting with '##'): pass them or disable it"
            )
        if seed < 0:
            raise ValueError(f"seed={seed} must be non-negative")
        if max_ngram < 1:
            raise ValueError(f"max_ngram={max_ngram} must be >= 1 (1: single tokens/words; ALBERT used 3)")

        self.vocab_size = vocab_size
        self.mask_id = mask_id
        self.pad_id = pad_id
        self.mlm_probability = mlm_probability
        self.max_predictions = max_predictions
        self.whole_word_masking = whole_word_masking
        self.seed = seed
        self.max_ngram = max_ngram
        weights = 1.0 / np.arange(1, max_ngram + 1)
        self._ngram_p = weights / weights.sum()
        self.epoch = 0
        # Padding and [MASK] are never prediction targets, whether or not the
        # caller listed them.
        self.special_ids = np.unique(np.asarray([*special_ids, mask_id, pad_id], dtype=np.int64))
        self.continuation_ids = np.unique(np.asarray(list(continuation_ids), dtype=np.int64))
        self._random_pool = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), self.special_ids)
        if self._random_pool.size == 0:
            raise ValueError("vocabulary has only special tokens: nothing to predict")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose masks the following batches get."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be non-negative")
        self.epoch = int(epoch)

    # ----------------------------------------------------------------------------------

    def _words(self, ids: np.ndarray) -> list[np.ndarray]:
        """Group candidate positions into maskable units (tokens or whole words)."""
        candidate = ~np.isin(ids, self.special_ids)
        positions = np.flatnonzero(candidate)
        if not self.whole_word_masking:
            return [positions[k : k + 1] for k in range(positions.size)]
        words: list[list[int]] = []
        continues = np.isin(ids, self.continuation_ids)
        for pos in positions.tolist():
            # A continuation piece joins the previous word only if it directly
            # follows it; after [SEP] or at the start it begins a word of its own.
            if words and continues[pos] and words[-1][-1] == pos - 1:
                words[-1].append(pos)
            else:
                words.append([pos])
        return [np.asarray(w, dtype=np.int64) for w in words]

    def _choose(self, words: list[np.ndarray], budget: int, rng: np.random.Generator) -> list[np.ndarray]:
        """The units to predict: whole units in random order, never past ``budget`` tokens."""
        chosen: list[np.ndarray] = []
        n_chosen = 0
        if self.max_ngram == 1:
            for k in rng.permutation(len(words)):
                if n_chosen >= budget:
                    break
                word = words[k]
                # Like the original: never split a word to hit the budget exactly.
                if n_chosen + word.size > budget:
                    continue
                chosen.append(word)
                n_chosen += word.size
            return chosen
        covered = np.zeros(len(words), dtype=bool)
        for start in rng.permutation(len(words)):
            if n_chosen >= budget:
                break
            if covered[start]:
                continue
            longest = min(self.max_ngram, len(words) - start)
            p = self._ngram_p[:longest] / self._ngram_p[:longest].sum()
            n = int(rng.choice(np.arange(1, longest + 1), p=p))
            # Shorten the span while it would overflow the budget (ALBERT's loop).
            while n > 0 and n_chosen + sum(w.size for w in words[start : start + n]) > budget:
                n -= 1
            if n == 0 or covered[start : start + n].any():
                continue
            covered[start : start + n] = True
            chosen.extend(words[start : start + n])
            n_chosen += sum(w.size for w in words[start : start + n])
        return chosen

    def mask_one(self, ids: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Mask one unpadded sequence; returns ``(masked_ids, labels)``.

        Deterministic in ``(seed, epoch, index)``.
        """
        rng = np.random.default_rng([self.seed, self.epoch, index])
        words = self._words(ids)
        n_candidates = sum(w.size for w in words)
        labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
        masked = ids.copy()
        if n_candidates == 0:
            return masked, labels

        num_to_predict = max(1, int(round(n_candidates * self.mlm_probability)))
        if self.max_predictions is not None:
            num_to_predict = min(num_to_predict, self.max_predictions)

        chosen = self._choose(words, num_to_predict, rng)
        if not chosen:
            return masked, labels
        positions = np.sort(np.concatenate(chosen))

        labels[positions] = ids[positions]
        # Per token (as in the original, also under whole-word masking):
        # u < 0.8 -> [MASK], 0.8 <= u < 0.9 -> random token, else unchanged.
        u = rng.random(positions.size)
        random_ids = self._random_pool[rng.integers(0, self._random_pool.size, positions.size)]
        masked[positions] = np.where(u < 0.8, self.mask_id, np.where(u < 0.9, random_ids, ids[positions]))
        return masked, labels

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("MLMCollator got an empty batch")
        batch_size = len(examples)
        seqs = [np.asarray(ex["input_ids"], dtype=np.int64).reshape(-1) for ex in examples]
        # Dynamic padding: only as long as the longest sequence of this batch.
        length = max(s.size for s in seqs)

        input_ids = np.full((batch_size, length), self.pad_id, dtype=np.int64)
        labels = np.full((batch_size, length), IGNORE_INDEX, dtype=np.int64)
        attention_mask = np.zeros((batch_size, length), dtype=np.int64)
        token_type_ids = np.zeros((batch_size, length), dtype=np.int64)

        for row, (ex, ids) in enumerate(zip(examples, seqs, strict=True)):
            if "index" not in ex:
                raise ValueError(
                    "MLMCollator needs an integer 'index' per example (its dataset position) to "
                    "seed masking: add it with dataset.map(..., with_indices=True)"
                )
            masked, lab = self.mask_one(ids, int(ex["index"]))
            n = ids.size
            input_ids[row, :n] = masked
            labels[row, :n] = lab
            attention_mask[row, :n] = 1
            if ex.get("token_type_ids") is not None:
                token_type_ids[row, :n] = np.asarray(ex["token_type_ids"], dtype=np.int64)

        out = {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(token_type_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
            # Dataset positions, for records of what was trained on (debug=data_trace).
            "index": torch.tensor([int(ex["index"]) for ex in examples], dtype=torch.long),
        }
        # Only when every example has a sentence-level label (nsp/sop); the
        # `none` objective has none, and a partial label column would be a bug.
        if all(ex.get("next_sentence_label") is not None for ex in examples):
            out["next_sentence_label"] = torch.tensor(
                [int(ex["next_sentence_label"]) for ex in examples], dtype=torch.long
            )
        return out
