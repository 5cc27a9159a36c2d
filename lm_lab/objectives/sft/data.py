"""Data for instruction fine-tuning: prompt/response rows -> templated token sequences whose prompt
targets are masked (cached Arrow) -> right-padded batches.

One example (``mask_targets``, ``encode_example``):

* prompt part: ``objective.template`` with the prompt in place of ``{prompt}``, encoded on its own
  (no special tokens);
* response part: the response encoded on its own, then the end-of-text token (so the model learns
  to stop, and generation stops there);
* the sequence is the prompt part then the response part, cut to ``data.block_size + 1`` tokens
  (inputs plus the one-token-shifted targets);
* per token a *target*: its id where the token is trained as a target, else -100. Masked are the
  tokens of the prompt part, found by its **encoded length** (never by searching the text for the
  template), and the first token of an example (nothing before it predicts it). With
  ``objective.train_on_prompt=true`` the prompt tokens are targets too.

Because the two parts are encoded apart, a BPE merge across their boundary is never formed, at
training as at generation (``SFTTask.generate`` encodes the formatted prompt alone in the same way):
what the model learns to continue is exactly what it is given. A template ending in a newline (the
default) keeps the boundary where a byte-level pre-tokenizer splits anyway.

Examples whose cut leaves no target (a prompt part of ``block_size + 1`` tokens or more) are dropped
and counted in the log. The tokenized splits are cached under a hash of (data, tokenizer, block
size, template, train_on_prompt, packing), so a changed template never reads a stale cache.

``objective.packing=true`` fills training sequences of up to ``block_size + 1`` tokens with
consecutive whole examples (greedily, within each batch of ``PACK_WINDOW`` examples), each keeping its
own mask; attention is not reset between examples (as in TRL's packing without position-id resets).
Validation and test examples are never packed: each is scored on its own, so ``val/loss`` and
``test/loss`` compare between packed and unpacked runs.

Batches are right-padded with the end-of-text token (labels -100, ``attention_mask`` 0) to their
longest sequence. Training order comes from ``TextDataModule``'s resumable sampler, so a resumed run
sees exactly the examples the interrupted one had not trained on; validation and test examples are
scored once each in a fixed order.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc
import torch
from tokenizers import Tokenizer
from torch.utils.data import DataLoader, Dataset

from lm_lab.data import cache
from lm_lab.data.datamodule import TextDataModule
from lm_lab.data.labelled import LabelledSplits, load_labelled
from lm_lab.data.options import DataConfig
from lm_lab.data.packing import _tokenizer_from_json
from lm_lab.data.sources import Corpus, DataError
from lm_lab.data.tokenizer import TokenizerError, eot_id, tokenizer_hash
from lm_lab.objectives.sft.settings import PLACEHOLDER, SFTConfig

log = logging.getLogger("lm_lab")

IGNORE_INDEX = -100
EXAMPLES_VERSION = 1  # bump when encoding, masking or packing changes
EVAL_SEED = 1234  # the fixed order of validation and test examples
PACK_WINDOW = 1000  # examples packed together (a datasets.map batch)
SPLITS = ("train", "validation", "test")


# ---------------------------------------------------------------------- one example
def mask_targets(
    prompt_ids: list[int], response_ids: list[int], *, block_size: int, train_on_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """(ids, targets) of one example: ``prompt_ids + response_ids`` cut to ``block_size + 1`` tokens,
    and per token its id if it is trained as a target, else -100 (the first ``len(prompt_ids)`` tokens,
    or only the very first with ``train_on_prompt``)."""
    ids = (prompt_ids + response_ids)[: block_size + 1]
    first = 1 if train_on_prompt else max(1, len(prompt_ids))
    return ids, [IGNORE_INDEX] * min(first, len(ids)) + ids[first:]


def encode_example(
    tok: Tokenizer, settings: SFTConfig, prompt: str, response: str, *, block_size: int
) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (next-token targets, -100 where ignored) of one prompt/response
    pair, as the training data holds it (unpadded)."""
    eot = eot_id(tok)
    if eot is None:
        raise _no_eot()
    prompt_ids = tok.encode(settings.format(prompt), add_special_tokens=False).ids
    response_ids = tok.encode(response, add_special_tokens=False).ids + [eot]
    ids, targets = mask_targets(
        prompt_ids, response_ids, block_size=block_size, train_on_prompt=settings.train_on_prompt
    )
    return {"input_ids": ids[:-1], "labels": targets[1:]}


def _no_eot() -> TokenizerError:
    return TokenizerError(
        "objective=sft ends every response with the end-of-text token, and this tokenizer has none "
        "(<|endoftext|>, </s>, [SEP] or <eos>): use data.tokenizer=auto (byte-level BPE) or a tokenizer with one"
    )


def _encode_batch(
    batch: dict[str, list[Any]],
    *,
    tok_json: str,
    prompt_column: str,
    response_column: str,
    template: str,
    train_on_prompt: bool,
    block_size: int,
    eot: int,
) -> dict[str, list[Any]]:
    tok = _tokenizer_from_json(tok_json)
    before, after = template.split(PLACEHOLDER)
    prompts = tok.encode_batch([before + (p or "") + after for p in batch[prompt_column]], add_special_tokens=False)
    responses = tok.encode_batch([r or "" for r in batch[response_column]], add_special_tokens=False)
    out: dict[str, list[Any]] = {"ids": [], "targets": [], "truncated": []}
    for p, r in zip(prompts, responses, strict=True):
        full = len(p.ids) + len(r.ids) + 1
        ids, targets = mask_targets(p.ids, r.ids + [eot], block_size=block_size, train_on_prompt=train_on_prompt)
        if len(ids) <= (1 if train_on_prompt else max(1, len(p.ids))):
            continue  # no target left within the block: dropped (counted by the caller)
        out["ids"].append(ids)
        out["targets"].append(targets)
        out["truncated"].append(full > block_size + 1)
    return out


def _pack_batch(batch: dict[str, list[Any]], *, capacity: int) -> dict[str, list[Any]]:
    """Consecutive examples concatenated into rows of at most ``capacity`` tokens (none is split)."""
    out: dict[str, list[Any]] = {"ids": [], "targets": [], "examples": []}
    ids: list[int] = []
    targets: list[int] = []
    n = 0
    for i, t in zip(batch["ids"], batch["targets"], strict=True):
        if ids and len(ids) + len(i) > capacity:
            out["ids"].append(ids)
            out["targets"].append(targets)
            out["examples"].append(n)
            ids, targets, n = [], [], 0
        ids, targets, n = ids + i, targets + t, n + 1
    if ids:
        out["ids"].append(ids)
        out["targets"].append(targets)
        out["examples"].append(n)
    return out


# ---------------------------------------------------------------------- torch side
class SFTExamples(Dataset):
    """The cached rows (memory-mapped Arrow) as ``{"input_ids", "labels", "index"}``, unpadded."""

    def __init__(self, ds: datasets.Dataset) -> None:
        self.ds = ds.select_columns(["ids", "targets"])

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([i])[0]

    def __getitems__(self, keys: list[int]) -> list[dict[str, Any]]:
        rows = self.ds[[int(k) for k in keys]]  # one Arrow read per batch
        return [
            {"input_ids": ids[:-1], "labels": targets[1:], "index": int(k)}
            for ids, targets, k in zip(rows["ids"], rows["targets"], keys, strict=True)
        ]


class PadCollate:
    """Right-pads a batch to its longest sequence: ``pad_id`` in ``input_ids``, -100 in ``labels``,
    0 in ``attention_mask`` (which counts the real tokens, ``tokens_seen``)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n, width = len(examples), max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for row, e in enumerate(examples):
            k = len(e["input_ids"])
            input_ids[row, :k] = torch.as_tensor(e["input_ids"], dtype=torch.long)
            labels[row, :k] = torch.as_tensor(e["labels"], dtype=torch.long)
            mask[row, :k] = 1
        index = torch.tensor([int(e.get("index", -1)) for e in examples], dtype=torch.long)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "index": index}


# ---------------------------------------------------------------------- the DataModule
class SFTDataModule(TextDataModule):
    """Prompt/response pairs (``data.prompt_column``, ``data.response_column``) from labelled splits
    (``lm_lab.data.labelled``: train, validation carved from train when absent, optional test)."""

    default_tokenizer = "bpe"

    def __init__(self, cfg: DataConfig, objective: SFTConfig | None = None, *, seed: int = 0) -> None:
        super().__init__(cfg, objective or SFTConfig(), seed=seed)
        self._check_config()
        self._splits: LabelledSplits | None = None
        self.train_set: SFTExamples | None = None
        self.val_set: SFTExamples | None = None
        self.test_set: SFTExamples | None = None
        self.collate: PadCollate | None = None
        self._verified: Path | None = None  # the examples entry this process checked or built

    def _check_config(self) -> None:
        c = self.cfg
        if c.prompt_column == c.response_column:
            raise DataError(
                f"data.prompt_column and data.response_column are both {c.prompt_column!r}: "
                "name the prompt and the response columns"
            )
        if c.sampling == "windows":
            raise DataError(
                "data.sampling=windows draws windows at random offsets of one token stream; objective=sft "
                "trains on whole examples: use data.sampling=blocks"
            )

    # ------------------------------------------------------------------ data and tokenizer
    @property
    def columns(self) -> dict[str, str]:
        return {self.cfg.prompt_column: "text", self.cfg.response_column: "text"}

    @property
    def splits(self) -> LabelledSplits:
        if self._splits is None:
            c = self.cfg
            keys = {c.prompt_column: "data.prompt_column", c.response_column: "data.response_column"}
            self._splits = load_labelled(c, self.columns, seed=self.seed, keys=keys)
            log.info("prompt/response data: %s", self._splits.description)
        return self._splits

    @property
    def corpus(self) -> Corpus:
        """The labelled train and validation splits (prompt and response columns) with their
        fingerprint, which resume checks and cache keys read."""
        if self._corpus is None:
            s = self.splits
            self._corpus = Corpus(s.train, s.validation, s.fingerprint, s.description)
        return self._corpus

    def _training_texts(self) -> Any:
        """What a tokenizer trained here learns from: each training prompt and response, one text."""
        train = self.splits.train
        limit = self.cfg.tokenizer_train_docs
        if limit is not None and limit < len(train):
            train = train.select(range(limit))
        p, r = self.cfg.prompt_column, self.cfg.response_column
        return (
            f"{a or ''}\n{b or ''}"
            for batch in train.iter(batch_size=1000)
            for a, b in zip(batch[p], batch[r], strict=True)
        )

    def has_test(self) -> bool:
        return self.splits.test is not None

    # ------------------------------------------------------------------ cache of encoded examples
    def data_cache(self) -> Path | None:
        return self.examples_cache()

    def examples_cache(self) -> Path:
        c, o = self.cfg, self.objective_cfg
        key = cache.cache_key(
            {
                "v": EXAMPLES_VERSION,
                "corpus": self.corpus.fingerprint,
                "columns": [c.prompt_column, c.response_column],
                "splits": [c.split, c.val_split, c.test_split],
                "tok": tokenizer_hash(self.tokenizer),
                "block": c.block_size,
                "template": o.template,
                "train_on_prompt": o.train_on_prompt,
                "packing": o.packing,
            }
        )
        return self.cache_root / "sft_examples" / key

    def prepare_data(self) -> None:
        entry = self.examples_cache()
        if entry == self._verified:
            return  # checked by this process already (a validate or test after fit)
        with cache.build_lock(entry):  # nodes sharing the cache: the first builds, the others find it
            if cache.load_entry(entry) is not None:
                log.info("encoded examples found in cache: %s", entry)
                self._verified = entry
                return
            self._build_examples(entry)

    def _build_examples(self, entry: Path) -> None:
        tok, c, o = self.tokenizer, self.cfg, self.objective_cfg
        eot = eot_id(tok)
        if eot is None:
            raise _no_eot()
        s = self.splits
        with cache.build_entry(entry) as (tmp, meta):
            for split, ds in zip(SPLITS, (s.train, s.validation, s.test), strict=True):
                if ds is None:
                    continue
                work = tmp / f"_work-{split}"
                work.mkdir()
                kwargs: dict[str, Any] = {}
                if c.num_proc and c.num_proc > 1 and len(ds) >= c.num_proc:
                    kwargs["num_proc"] = c.num_proc
                encoded = ds.map(
                    _encode_batch,
                    batched=True,
                    fn_kwargs={
                        "tok_json": tok.to_str(),
                        "prompt_column": c.prompt_column,
                        "response_column": c.response_column,
                        "template": o.template,
                        "train_on_prompt": o.train_on_prompt,
                        "block_size": c.block_size,
                        "eot": eot,
                    },
                    remove_columns=ds.column_names,
                    features=datasets.Features(
                        {
                            "ids": datasets.List(datasets.Value("int32")),
                            "targets": datasets.List(datasets.Value("int32")),
                            "truncated": datasets.Value("bool"),
                        }
                    ),
                    cache_file_name=str(work / "encoded.arrow"),
                    desc=f"encoding {split} examples",
                    **kwargs,
                )
                if len(encoded) == 0:
                    raise DataError(
                        f"none of the {len(ds)} {split} examples keeps a response token within "
                        f"data.block_size={c.block_size} tokens: raise data.block_size or shorten objective.template"
                    )
                stats = {
                    "examples": len(ds),
                    "dropped": len(ds) - len(encoded),
                    "truncated": int(pc.sum(encoded.data.column("truncated")).as_py() or 0),
                    "targets": _count_targets(encoded),
                }
                rows = encoded.remove_columns("truncated")
                if o.packing and split == "train":
                    rows = rows.map(
                        _pack_batch,
                        batched=True,
                        batch_size=PACK_WINDOW,
                        fn_kwargs={"capacity": c.block_size + 1},
                        remove_columns=rows.column_names,
                        cache_file_name=str(work / "packed.arrow"),
                        desc=f"packing {split} examples",
                    )
                stats["rows"] = len(rows)
                rows.save_to_disk(str(tmp / split))
                meta[split] = stats
                del encoded, rows
                shutil.rmtree(work, ignore_errors=True)
            meta.update(tokenizer=tokenizer_hash(tok), block_size=c.block_size, template=o.template)
        self._verified = entry
        for split in SPLITS:
            st = meta.get(split)
            if st:
                log.info(
                    "%s: %s examples -> %s sequences%s; %s cut at data.block_size=%d, %s dropped "
                    "(no response token within it); %s target tokens",
                    split,
                    f"{st['examples']:,}",
                    f"{st['rows']:,}",
                    " (packed)" if o.packing and split == "train" else "",
                    f"{st['truncated']:,}",
                    c.block_size,
                    f"{st['dropped']:,}",
                    f"{st['targets']:,}",
                )

    # ------------------------------------------------------------------ setup and loaders
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        entry = self.examples_cache()
        # Checksums are read once per process: skipped when prepare_data just did it (rank 0).
        if entry != self._verified:
            with cache.build_lock(entry):
                if cache.load_entry(entry) is None:
                    self._build_examples(entry)
        self.train_set = SFTExamples(datasets.load_from_disk(str(entry / "train")))
        self.val_set = SFTExamples(datasets.load_from_disk(str(entry / "validation")))
        if (entry / "test").is_dir():
            self.test_set = SFTExamples(datasets.load_from_disk(str(entry / "test")))
        eot = eot_id(self.tokenizer)
        if eot is None:
            raise _no_eot()
        self.collate = PadCollate(pad_id=eot)
        self.log_sample()

    def log_sample(self) -> None:
        assert self.train_set is not None
        ex = self.train_set[0]
        ids, labels = ex["input_ids"], ex["labels"]
        first = next((j for j, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
        context = self.tokenizer.decode(ids[: first + 1], skip_special_tokens=False)
        targets = self.tokenizer.decode([t for t in labels[first:] if t != IGNORE_INDEX], skip_special_tokens=False)
        log.info("sample of the training data: context %r -> targets %r", context, targets)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        sampler = self._make_train_sampler(len(self.train_set))
        return self._loader(self.train_set, sampler=sampler, collate_fn=self.collate, step_group=self.accumulate)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return self._eval_loader(self.val_set, seed=EVAL_SEED, collate_fn=self.collate)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise DataError(
                f"there is no test split {self.cfg.test_split!r}: name a test file in data.data_files "
                "(e.g. '{train: train.jsonl, test: test.jsonl}') or set data.test_split"
            )
        return self._eval_loader(self.test_set, seed=EVAL_SEED, collate_fn=self.collate)


def _count_targets(ds: datasets.Dataset) -> int:
    flat = pc.list_flatten(ds.data.column("targets"))
    return int(pc.sum(pc.not_equal(flat, IGNORE_INDEX)).as_py() or 0)
