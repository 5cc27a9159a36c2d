"""Sentence-pair instances for BERT-style pretraining.

This follows the logic of Google's original ``create_pretraining_data.py``
(``create_instances_from_document`` and ``truncate_seq_pair``), re-implemented on
token ids instead of token strings, plus two variants:

* ``nsp``  - Next Sentence Prediction (original BERT): B is the true continuation
  of A, or (50%) a span from a random other document.
* ``sop``  - Sentence Order Prediction (ALBERT): B is the true continuation, and
  50% of the time A and B are swapped; a one-sentence chunk gets a random B
  (label 1), as in ALBERT's script.
* ``none`` - MLM only (RoBERTa-like "DOC-SENTENCES"): one segment
  ``[CLS] tokens [SEP]`` packed with whole consecutive sentences of one document.

Masking is deliberately *not* done here (the original did it once, offline): see
``lm_lab.objectives.masked_lm.masking.MLMCollator``, which re-masks every epoch.

Label convention (``next_sentence_label``) is the transformers one:
``0`` = B follows A (in order), ``1`` = B is random (nsp) / A and B are swapped (sop).
Instances of the ``none`` objective carry no ``next_sentence_label`` key at all, so
a collator/model sees "no sentence-level task" instead of a dummy label that would
have to be ignored downstream.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import Literal

__all__ = ["Objective", "create_instances", "create_pairs", "split_sentences"]

Objective = Literal["nsp", "sop", "none"]
_OBJECTIVES = ("nsp", "sop", "none")

Document = Sequence[Sequence[int]]

# --------------------------------------------------------------------------------------
# Sentence splitting
# --------------------------------------------------------------------------------------

# Words that usually end with a period without ending the sentence. Kept small on
# purpose: a wrong "no split" only makes one training sentence longer, whereas
# "etc." or "No." end sentences too often to be listed here.
_ABBREVIATIONS = frozenset(
    {
        "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "cf", "al",
        "fig", "gen", "col", "capt", "lt", "sgt", "rev", "hon", "inc", "ltd", "corp",
        "approx", "dept", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep",
        "sept", "oct", "nov", "dec",
    }
)  # fmt: skip

# A candidate boundary: terminal punctuation (possibly repeated, "?!", "..."),
# optional closing quotes/brackets that belong to the finished sentence, then
# whitespace *within a line* (newlines are handled separately as hard breaks).
_BOUNDARY = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*[ \t\f\v]+")
# Quotes/brackets that may open a sentence.
_OPENERS = "\"'\u201c\u2018(["
_LINE_BREAK = re.compile(r"\s*\n\s*")


def _is_abbreviation(text_before_period: str) -> bool:
    """True if the word right before a '.' looks like an abbreviation.

    ``text_before_period`` is everything up to (not including) the period.
    """
    words = text_before_period.split()
    if not words:
        return False
    word = words[-1].lstrip(_OPENERS)
    if not word:
        return False
    # Single capital initial ("J. R. R. Tolkien"; not the pronoun "I", which often
    # ends a sentence) or dotted abbreviation such as "e.g", "i.e", "U.S" (the
    # final period is the one being examined).
    if (len(word) == 1 and word.isupper() and word != "I") or "." in word:
        return True
    return word.lower() in _ABBREVIATIONS


def _split_line(line: str) -> list[str]:
    pieces: list[str] = []
    start = 0
    for match in _BOUNDARY.finditer(line):
        nxt = line[match.end() : match.end() + 1]
        # Only split when the next sentence visibly starts: uppercase letter,
        # digit or an opening quote/bracket. "e.g. the" never splits.
        if not nxt or not (nxt.isupper() or nxt.isdigit() or nxt in _OPENERS):
            continue
        terminator = match.group(0).rstrip()
        # "!" / "?" always end a sentence; a lone "." may belong to an abbreviation.
        if terminator.rstrip("\"'\u201d\u2019)]") == "." and _is_abbreviation(line[start : match.start()]):
            continue
        pieces.append(line[start : match.end()])
        start = match.end()
    pieces.append(line[start:])
    return pieces


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences with a small, predictable rule set (no nltk).

    Rules:

    1. Every newline is a hard break (blank lines included). This matches the
       input format of BERT's original script (one sentence or paragraph per
       line) and keeps verse/dialogue lines separate.
    2. Within a line, split after ``.``, ``!`` or ``?`` (optionally followed by
       closing quotes/brackets) when whitespace follows and the next character is
       an uppercase letter, a digit or an opening quote/bracket.
    3. A ``.`` does not split after a known abbreviation ("Mr.", "Dr.", "vs.",
       ...), a single capital initial ("J. Smith") or a dotted abbreviation
       ("e.g.", "i.e.", "U.S.").

    Pieces are stripped; empty pieces are dropped.
    """
    sentences: list[str] = []
    for line in _LINE_BREAK.split(text):
        for piece in _split_line(line):
            piece = piece.strip()
            if piece:
                sentences.append(piece)
    return sentences


# --------------------------------------------------------------------------------------
# Pair instances
# --------------------------------------------------------------------------------------


def _check_args(max_num_tokens_total: int, objective: str, short_seq_prob: float) -> None:
    if objective not in _OBJECTIVES:
        raise ValueError(f"unknown pair objective {objective!r}: set objective.pair_objective to one of {_OBJECTIVES}")
    if objective == "none":
        if max_num_tokens_total < 3:
            raise ValueError(
                f"data.block_size={max_num_tokens_total} is too small for [CLS] tokens [SEP]: use at least 8"
            )
    elif max_num_tokens_total < 5:
        # [CLS] A [SEP] B [SEP] with A and B at least one token each; below this the
        # original's rng.randint(2, max_num_tokens) is not even defined.
        raise ValueError(
            f"data.block_size={max_num_tokens_total} is too small for [CLS] A [SEP] B [SEP]: use at least 8"
        )
    if not 0.0 <= short_seq_prob <= 1.0:
        raise ValueError(f"short_seq_prob={short_seq_prob} must be in [0, 1]")


def _truncate_seq_pair(tokens_a: list[int], tokens_b: list[int], max_num_tokens: int, rng: random.Random) -> None:
    """In place: drop tokens from the longer side until the pair fits.

    Like the original, the side is A only if strictly longer (ties trim B), and
    each dropped token comes from the front or the back with probability 0.5 so
    that the model does not learn that segments always end cleanly.
    """
    while len(tokens_a) + len(tokens_b) > max_num_tokens:
        trunc = tokens_a if len(tokens_a) > len(tokens_b) else tokens_b
        # Total > max_num_tokens >= 2 implies the longer side has >= 2 tokens, so
        # neither side can become empty here.
        if rng.random() < 0.5:
            del trunc[0]
        else:
            trunc.pop()


def _pair_instance(tokens_a: list[int], tokens_b: list[int], label: int, cls_id: int, sep_id: int) -> dict:
    return {
        "input_ids": [cls_id, *tokens_a, sep_id, *tokens_b, sep_id],
        # Segment 0 covers [CLS] A [SEP]; segment 1 covers B [SEP].
        "token_type_ids": [0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1),
        "next_sentence_label": label,
    }


def _clean(document: Document) -> list[Sequence[int]]:
    # Empty sentences would allow empty A/B segments; they carry no tokens anyway.
    return [sentence for sentence in document if len(sentence) > 0]


def _default_random_document(
    documents: Sequence[Document],
) -> Callable[[random.Random, int], Document]:
    def pick(rng: random.Random, doc_index: int) -> Document:
        # As in the original: up to 10 draws to avoid the current document. The
        # original then silently used whatever came last (possibly the same
        # document); we additionally reject empty documents and, if 10 draws were
        # unlucky (1 in 1024 with two documents), fall back to a
        # uniform choice among the valid ones so a "random" B never comes from A's
        # own document.
        for _ in range(10):
            j = rng.randint(0, len(documents) - 1)
            if j != doc_index and _clean(documents[j]):
                return documents[j]
        valid = [k for k in range(len(documents)) if k != doc_index and _clean(documents[k])]
        if not valid:
            raise ValueError(
                "NSP needs at least two non-empty documents to draw a random B: "
                "add documents or set objective.pair_objective=sop or none"
            )
        return documents[rng.choice(valid)]

    return pick


def _create_unpaired(document: list[Sequence[int]], max_num_tokens_total: int, cls_id: int, sep_id: int) -> list[dict]:
    """``none`` objective: pack whole consecutive sentences into ``[CLS] ... [SEP]``.

    Like RoBERTa we do not inject short sequences (short_seq_prob is unused) and
    there is no sentence-level label. A single sentence longer than the block is
    cut into block-sized pieces instead of being truncated, so no text is lost.
    """
    max_tokens = max_num_tokens_total - 2  # room for [CLS] and [SEP]
    instances: list[dict] = []
    current: list[int] = []

    def flush() -> None:
        if current:
            instances.append(
                {
                    "input_ids": [cls_id, *current, sep_id],
                    "token_type_ids": [0] * (len(current) + 2),
                }
            )
            current.clear()

    for sentence in document:
        if len(current) + len(sentence) > max_tokens:
            flush()
        if len(sentence) > max_tokens:
            pieces = [sentence[k : k + max_tokens] for k in range(0, len(sentence), max_tokens)]
            for piece in pieces[:-1]:
                current.extend(piece)
                flush()
            current.extend(pieces[-1])
        else:
            current.extend(sentence)
    flush()
    return instances


def create_instances(
    documents: Sequence[Sequence[Sequence[int]]],
    doc_index: int,
    *,
    max_num_tokens_total: int,
    cls_id: int,
    sep_id: int,
    objective: Objective,
    short_seq_prob: float,
    rng: random.Random,
    random_document: Callable[[random.Random, int], Sequence[Sequence[int]]] | None = None,
) -> list[dict]:
    """Build the pretraining instances for ``documents[doc_index]``.

    A document is a list of tokenized sentences (lists of token ids, without
    special tokens). ``max_num_tokens_total`` is the full sequence length
    including ``[CLS]``/``[SEP]`` (i.e. ``data.block_size``).

    Returns dicts with ``input_ids`` (``[CLS] A [SEP] B [SEP]``),
    ``token_type_ids`` and, for ``nsp``/``sop``, ``next_sentence_label``
    (0 = in order, 1 = random B / swapped). For ``none`` the instance is
    ``[CLS] tokens [SEP]`` with all-zero ``token_type_ids`` and no label key.

    ``random_document(rng, doc_index)`` supplies the sentences of some *other*
    document for random NSP B-segments (useful when the corpus is not held in
    memory); by default one is drawn from ``documents`` as in the original.

    Behaviour for short chunks (a chunk is the run of sentences that fills one
    instance):

    * ``nsp``: a one-sentence chunk (e.g. a one-sentence document) always gets a
      random B (label 1), exactly like the original.
    * ``sop``: as in ALBERT's ``create_pretraining_data.py``, a one-sentence chunk
      gets a random B from another document (label 1, "not in order"); in a corpus
      of one document it is left out. A sentence is never cut in two: a mid-sentence
      cut is a shortcut (an A that does not end in punctuation is the swapped one;
      the audit measured 92% accuracy from that alone).
    """
    _check_args(max_num_tokens_total, objective, short_seq_prob)
    document = _clean(documents[doc_index])
    if not document:
        return []
    if objective == "none":
        return _create_unpaired(document, max_num_tokens_total, cls_id, sep_id)
    pick_other = random_document
    if pick_other is None and len(documents) >= 2:
        pick_other = _default_random_document(documents)
    if objective == "nsp" and pick_other is None:
        raise ValueError(
            "NSP needs at least two documents to draw a random B: add documents or set objective.pair_objective=sop or none"
        )

    # Account for [CLS], [SEP], [SEP].
    max_num_tokens = max_num_tokens_total - 3

    # Usually fill the whole block (it is padded/compute-bound anyway), but
    # sometimes aim shorter so pretraining also sees the short inputs typical of
    # fine-tuning. The target is soft; max_num_tokens is the hard limit.
    target_seq_length = max_num_tokens
    if rng.random() < short_seq_prob:
        target_seq_length = rng.randint(2, max_num_tokens)

    # Split A/B on real sentence boundaries (not at an arbitrary token), otherwise
    # NSP becomes trivially solvable from the mid-sentence cut.
    instances: list[dict] = []
    chunk: list[Sequence[int]] = []
    chunk_len = 0
    i = 0
    while i < len(document):
        chunk.append(document[i])
        chunk_len += len(document[i])
        if i == len(document) - 1 or chunk_len >= target_seq_length:
            # How many sentences of the chunk go into A.
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            tokens_a = [t for sentence in chunk[:a_end] for t in sentence]
            tokens_b: list[int] = []

            if len(chunk) == 1 and objective == "sop" and pick_other is None:
                # One sentence in a one-document corpus: no order to predict without cutting the
                # sentence, and a mid-sentence cut is a shortcut ("A ends without punctuation ->
                # swapped"), so the chunk is left out.
                chunk, chunk_len = [], 0
                i += 1
                continue
            if len(chunk) == 1 or (objective == "nsp" and rng.random() < 0.5):
                # A random B from another document (label 1): NSP's negative, and, as in ALBERT's
                # create_pretraining_data.py, also SOP's handling of a one-sentence chunk.
                assert pick_other is not None
                label = 1
                target_b_length = target_seq_length - len(tokens_a)
                other = _clean(pick_other(rng, doc_index))
                if not other:
                    raise ValueError(
                        "random_document returned an empty document: "
                        "it must return the sentences of a non-empty other document"
                    )
                start = rng.randint(0, len(other) - 1)
                for sentence in other[start:]:
                    tokens_b.extend(sentence)
                    if len(tokens_b) >= target_b_length:
                        break
                # The chunk's sentences after A were not used: "put them back"
                # so they start the next chunk instead of being wasted.
                i -= len(chunk) - a_end
            else:
                label = 0
                tokens_b = [t for sentence in chunk[a_end:] for t in sentence]
                if objective == "sop" and rng.random() < 0.5:
                    tokens_a, tokens_b = tokens_b, tokens_a
                    label = 1

            _truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
            instances.append(_pair_instance(tokens_a, tokens_b, label, cls_id, sep_id))
            chunk, chunk_len = [], 0
        i += 1
    return instances


def create_pairs(
    documents: Sequence[Sequence[Sequence[int]]],
    *,
    max_num_tokens_total: int,
    cls_id: int,
    sep_id: int,
    objective: Objective,
    short_seq_prob: float = 0.1,
    seed: int,
    dupe_factor: int = 1,
) -> list[dict]:
    """Instances for a whole corpus, deterministic for a given ``seed``.

    Runs :func:`create_instances` over every non-empty document, ``dupe_factor``
    times (each pass draws different cuts, random Bs and truncations, as in the
    original). Empty sentences and empty documents are dropped first.

    Unlike the original, neither documents nor instances are shuffled: the
    output stays in corpus order (pass-major) and the DataLoader sampler does
    the shuffling.

    One-sentence documents are kept: they pair with a random B (label 1), under
    ``nsp`` as in BERT and under ``sop`` as in ALBERT; in a one-document corpus
    ``sop`` leaves one-sentence chunks out (see :func:`create_instances`). NSP on a
    corpus of a single document is an error.
    """
    _check_args(max_num_tokens_total, objective, short_seq_prob)
    if dupe_factor < 1:
        raise ValueError(f"dupe_factor={dupe_factor} must be >= 1")
    cleaned = [doc for doc in (_clean(d) for d in documents) if doc]
    if objective == "nsp" and len(cleaned) < 2:
        raise ValueError(
            f"NSP needs at least two documents to draw random B segments, got {len(cleaned)}: "
            "add documents or set objective.pair_objective=sop or none"
        )
    rng = random.Random(seed)
    instances: list[dict] = []
    for _ in range(dupe_factor):
        for doc_index in range(len(cleaned)):
            instances.extend(
                create_instances(
                    cleaned,
                    doc_index,
                    max_num_tokens_total=max_num_tokens_total,
                    cls_id=cls_id,
                    sep_id=sep_id,
                    objective=objective,
                    short_seq_prob=short_seq_prob,
                    rng=rng,
                )
            )
    return instances
