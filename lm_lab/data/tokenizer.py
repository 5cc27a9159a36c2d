"""Tokenizers: train one from the corpus with HF ``tokenizers``, or load an HF tokenizer.

Kinds: ``bpe`` (GPT-2 style byte-level BPE), ``char`` (one token per character, nanoGPT's
shakespeare_char), ``wordpiece`` (BERT). Any other value is a directory or file holding an HF
tokenizer (``tokenizer.json``) or a hub name. Everything is saved in HF format so
``transformers.AutoTokenizer.from_pretrained(run_dir / "tokenizer")`` loads it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from lm_lab.errors import TokenizerError  # defined there: importable without tokenizers

EOT = "<|endoftext|>"
UNK_CHAR = "<unk>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TRAINED_KINDS = ("bpe", "char", "wordpiece")
# Part of the tokenizer cache key: bumped when training changes what a kind gives for the same corpus.
# 2: WordPiece vocabularies are the same on every run (see _train_wordpiece).
TRAINER_REVISION = 2
# The char tokenizer's pre-tokenizer pattern: every character (newlines included) its own token.
CHAR_PATTERN = r"[\s\S]"


def train_tokenizer(
    kind: str,
    texts: Iterable[str],
    *,
    vocab_size: int,
    lowercase: bool = True,
    strip_accents: bool | None = None,
) -> Tokenizer:
    """Train a ``bpe``, ``char`` or ``wordpiece`` tokenizer on ``texts``."""
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "char":
        return _train_char(texts)
    elif kind == "wordpiece":
        return _train_wordpiece(texts, vocab_size, lowercase, strip_accents)
    else:
        raise TokenizerError(f"unknown tokenizer kind {kind!r}: use bpe, char, wordpiece or a tokenizer directory")
    tok.train_from_iterator(_nonempty(texts), trainer=trainer)
    return tok


def _char_shell(vocab: dict[str, int]) -> Tokenizer:
    """The char tokenizer's pipeline around ``vocab``: every character (newlines included) its own
    token, unknown ones ``<unk>``; decoding concatenates them."""
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK_CHAR))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(CHAR_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def _train_char(texts: Iterable[str]) -> Tokenizer:
    """The char tokenizer ``WordLevelTrainer`` gives (the special tokens, then every character by
    count, most frequent first, ties in code point order), counted by ``collections.Counter``
    instead of the trainer's one string per character: Tiny Shakespeare 0.27 -> 0.04 s, the same
    ``tokenizer.json`` (tests/data/test_pipeline.py checks it against the trainer)."""
    counts: Counter[str] = Counter()
    for text in _nonempty(texts):
        counts.update(text)
    specials = [EOT, UNK_CHAR]
    chars = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    tok = _char_shell({t: i for i, t in enumerate(specials + chars)})
    tok.add_special_tokens(specials)
    return tok


class CharEncoder:
    """Encodes text with a char tokenizer (``is_char_level``) by a table from code point to id:
    the ids ``tok.encode(text, add_special_tokens=False)`` gives, without building a string and an
    offset pair per character (Tiny Shakespeare: 0.60 -> 0.003 s). A text holding an added token
    (``<|endoftext|>``, ``<unk>``: ``tokenizers`` matches those in the raw text) goes to ``tok``."""

    SLICE = 1 << 24  # characters encoded at once (~200 MB of temporaries)

    def __init__(self, tok: Tokenizer) -> None:
        spec = json.loads(tok.to_str())
        vocab: dict[str, int] = spec["model"]["vocab"]
        self.tok = tok
        self.added = [a["content"] for a in spec.get("added_tokens") or []]
        self.unk = vocab.get(spec["model"]["unk_token"], -1)  # -1: none; such a text goes to tok (its error)
        chars = {ord(c): i for c, i in vocab.items() if len(c) == 1}
        self.table = np.full(max(chars, default=0) + 1, self.unk, dtype=np.int64)
        self.table[list(chars)] = list(chars.values())

    def __call__(self, text: str) -> np.ndarray:
        if any(a in text for a in self.added):
            return self._by_tokenizers(text)
        ids = np.empty(len(text), dtype=np.int64)
        for start in range(0, len(text), self.SLICE):  # a long document a slice at a time: bounded temporaries
            try:
                points = np.frombuffer(text[start : start + self.SLICE].encode("utf-32-le"), dtype=np.uint32)
            except UnicodeEncodeError:  # a lone surrogate: tokenizers' own error
                return self._by_tokenizers(text)
            known = points < len(self.table)
            out = ids[start : start + len(points)]
            out[:] = self.unk
            out[known] = self.table[points[known]]
        if self.unk < 0 and (ids < 0).any():
            return self._by_tokenizers(text)
        return ids

    def _by_tokenizers(self, text: str) -> np.ndarray:
        # In newline-ended pieces (the same ids: no added token holds a newline), on every core.
        encs = self.tok.encode_batch(list(char_pieces([text])), add_special_tokens=False)
        return np.asarray([i for e in encs for i in e.ids], dtype=np.int64)


def _wordpiece_shell(vocab: dict[str, int] | None, lowercase: bool, strip_accents: bool | None) -> Tokenizer:
    """BERT's WordPiece pipeline (normalizer, pre-tokenizer, decoder) around ``vocab`` (None: untrained)."""
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _train_wordpiece(texts: Iterable[str], vocab_size: int, lowercase: bool, strip_accents: bool | None) -> Tokenizer:
    """``tokenizers``' WordPieceTrainer, made deterministic.

    The trainer (tokenizers 0.23.3, the pinned version; huggingface/tokenizers#1794) numbers the
    ``##`` continuation characters in hash-map order, which changes from run to run, and breaks ties
    between equally frequent merges by those numbers: the same corpus gave a different vocabulary on every fresh
    cache (4 runs on Tiny Shakespeare, 4 vocabularies). Here those characters are found first (the
    trainer's own normalizer and pre-tokenizer, every character after a word's first) and handed to
    the trainer in sorted order, right after BERT's special tokens, so the trainer creates none
    itself; the tokenizer is then rebuilt with only BERT's five tokens as special.
    """
    if isinstance(texts, Iterator):  # read twice below
        texts = list(texts)
    shell = _wordpiece_shell(None, lowercase, strip_accents)
    normalizer, pre_tokenizer = shell.normalizer, shell.pre_tokenizer
    assert normalizer is not None and pre_tokenizer is not None
    following: set[str] = set()
    for text in _nonempty(texts):
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            following.update(word[1:])
    continuing = sorted("##" + c for c in following)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=BERT_SPECIALS + continuing,
        continuing_subword_prefix="##",
        show_progress=False,
    )
    shell.train_from_iterator(_nonempty(texts), trainer=trainer)
    tok = _wordpiece_shell(shell.get_vocab(with_added_tokens=False), lowercase, strip_accents)
    tok.add_special_tokens(BERT_SPECIALS)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tok


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t


def load_tokenizer(source: str) -> Tokenizer:
    """Load ``source``: a directory with ``tokenizer.json``, such a file, or a hub name."""
    path = Path(source).expanduser()
    if path.is_dir():
        file = path / "tokenizer.json"
        if file.is_file():
            return _from_file(file)
        return _from_transformers(str(path))
    if path.is_file():
        return _from_file(path)
    if source.startswith((".", "/", "~")) or source.endswith(".json"):
        raise TokenizerError(f"tokenizer {source} not found: check data.tokenizer (a directory holding tokenizer.json)")
    return _from_transformers(source)


def _from_file(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON or a wrong layout
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TokenizerError(
            f"{path} is not a tokenizers JSON file ({reason}): point data.tokenizer at a directory "
            "holding a valid HF tokenizer.json (e.g. one saved by a run, <run>/tokenizer)"
        ) from e


def _from_transformers(source: str) -> Tokenizer:
    from lm_lab.data.hub import hub_offline_message, hub_reachable

    if not Path(source).exists() and not hub_reachable():
        raise TokenizerError(hub_offline_message(f"tokenizer {source!r}", "data.tokenizer=<local tokenizer directory>"))
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(source)
    except Exception as e:
        raise TokenizerError(f"could not load tokenizer {source!r} ({type(e).__name__}): check data.tokenizer") from e
    if not getattr(hf, "is_fast", False):
        raise TokenizerError(
            f"tokenizer {source!r} has no fast (tokenizers) version: convert it with transformers first"
        )
    return hf.backend_tokenizer


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]


def eot_id(tok: Tokenizer) -> int | None:
    """The end-of-text separator for causal LM: <|endoftext|>, else </s> or [SEP]."""
    for name in (EOT, "</s>", "[SEP]", "<eos>"):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return None


# A character-level tokenizer sees one character at a time, so a document cut between characters
# gives the same tokens. Cut into pieces of about this many characters, a one-document corpus (Tiny
# Shakespeare: 1.1M characters) is encoded by ``tokenizers`` on every core instead of one (1.57 ->
# 0.74 s on 2 cores). Only texts CharEncoder's table cannot encode (those holding an added token)
# still go that way.
CHAR_PIECE = 1 << 16


def char_pieces(texts: Iterable[str]) -> Iterator[str]:
    """Each text in pieces of about ``CHAR_PIECE`` characters, each ending at a newline (added tokens
    such as ``<|endoftext|>`` are matched in the raw text, and none holds a newline: ``is_char_level``),
    so that no piece boundary cuts one; a text without newlines stays whole. For character-level
    tokenizers only."""
    for t in texts:
        start = 0
        while len(t) - start > CHAR_PIECE:
            cut = t.rfind("\n", start, start + CHAR_PIECE)
            if cut < start:
                cut = t.find("\n", start + CHAR_PIECE)
                if cut < 0:
                    break
            yield t[start : cut + 1]
            start = cut + 1
        if start < len(t) or not t:
            yield t[start:]


def is_char_level(tok: Tokenizer) -> bool:
    """Whether ``tok`` is lm_lab's ``char`` tokenizer (trained here or loaded from a run): every
    character its own token and no added token holding a newline, so texts may be encoded by
    ``CharEncoder`` or in ``char_pieces``."""
    spec = json.loads(tok.to_str())
    return (
        spec["model"]["type"] == "WordLevel"
        and (spec.get("pre_tokenizer") or {}).get("type") == "Split"
        and spec["pre_tokenizer"].get("pattern") == {"Regex": CHAR_PATTERN}
        and spec["pre_tokenizer"].get("behavior") == "Isolated"
        and not spec.get("normalizer")
        and not any("\n" in a["content"] for a in spec.get("added_tokens") or [])
    )


def is_bert_style(tok: Tokenizer) -> bool:
    """A WordPiece-style vocabulary with BERT's [CLS] and [MASK] (segment pairs, masking)."""
    return tok.token_to_id("[CLS]") is not None and tok.token_to_id("[MASK]") is not None


def special_token_map(tok: Tokenizer) -> dict[str, str]:
    """Special-token roles for ``PreTrainedTokenizerFast`` (only those the vocabulary has): BERT's
    [PAD]/[UNK]/[CLS]/[SEP]/[MASK] when it has them, else the end-of-text token as BOS and EOS."""
    if is_bert_style(tok):
        wanted = {
            "pad_token": "[PAD]",
            "unk_token": "[UNK]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "mask_token": "[MASK]",
        }
    else:
        eot = next((n for n in (EOT, "</s>", "<eos>") if tok.token_to_id(n) is not None), None)
        wanted = {"bos_token": eot, "eos_token": eot}
        if tok.token_to_id(UNK_CHAR) is not None:
            wanted["unk_token"] = UNK_CHAR
    return {k: v for k, v in wanted.items() if v is not None and tok.token_to_id(v) is not None}


def to_hf(tok: Tokenizer) -> Any:
    """Wrap as ``transformers.PreTrainedTokenizerFast`` with the right special tokens."""
    from transformers import PreTrainedTokenizerFast

    kwargs: dict[str, Any] = dict(special_token_map(tok))
    if is_bert_style(tok):
        kwargs["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    hf = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tok.to_str()), clean_up_tokenization_spaces=False, **kwargs
    )
    return hf


def save_hf(tok: Tokenizer, directory: str | Path) -> Path:
    """Save in HF format (``tokenizer.json`` + ``tokenizer_config.json``)."""
    directory = Path(directory)
    to_hf(tok).save_pretrained(str(directory))
    return directory


def describe(tok: Tokenizer) -> str:
    model = json.loads(tok.to_str())["model"]["type"]
    return f"{model} tokenizer, {tok.get_vocab_size()} tokens"
