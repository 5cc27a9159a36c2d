"""Labelled datasets for fine-tuning and evaluation: train / validation / test splits of rows with
named columns (text, text pair, label; words and tags; prompt and response), loaded with
``datasets.load_dataset`` from local files (or the Hub, online), checked column by column.

    data=files data.data_files='{train: a.jsonl, validation: b.jsonl, test: c.jsonl}'

A missing validation split is carved from train (``data.val_fraction``, seeded shuffle); a missing
test split is simply absent. Errors are one line naming the column or split and the fix.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import datasets

from lm_lab.data.hub import LOCAL_DATA_FIX, hub_offline_message, hub_reachable
from lm_lab.data.options import DataConfig
from lm_lab.data.sources import DataError, check_utf8, content_digest, infer_builder, resolve_files

# Column kinds a recipe asks for: "text" (strings), "words" (lists of strings), "label" (ints,
# strings or floats), "tags" (lists of ints or strings).
KINDS = ("text", "words", "label", "tags")


@dataclass
class LabelledSplits:
    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset | None
    fingerprint: str
    description: str


def load_labelled(
    cfg: DataConfig, columns: dict[str, str], *, seed: int = 0, keys: dict[str, str] | None = None
) -> LabelledSplits:
    """The splits of ``cfg`` with only ``columns`` ({column name: kind}), renamed to nothing: the
    caller reads them by the names it asked for. ``keys`` ({column name: config key}) names the
    setting an error about a column tells the user to change (by default the kind's usual key)."""
    if cfg.path == "pydocs" and cfg.data_files is None:
        raise DataError(
            "this objective needs a labelled dataset: use data=files "
            "data.data_files='{train: train.jsonl, validation: validation.jsonl, test: test.jsonl}' "
            "(e.g. ../shared/data/sentence_polarity/) or a hub preset"
        )
    if cfg.streaming:
        raise DataError(
            "data.streaming=true is for pretraining corpora: labelled sets are loaded whole (data.streaming=false)"
        )
    files = resolve_files(cfg.data_files)
    builder = cfg.path
    if builder in (None, "auto", "text"):
        builder = infer_builder(files) if files else builder
    if builder == "text":
        raise DataError("labelled data needs columns: use JSON lines, CSV or Parquet files (data.path=null infers it)")
    for p in files:
        if p.suffix in (".jsonl", ".json", ".csv", ".tsv", ".txt"):
            check_utf8(p)
    if not files and not hub_reachable():
        raise DataError(hub_offline_message(f"dataset {builder!r}", LOCAL_DATA_FIX))
    # datasets keys its Arrow copy of local files on path and mtime: a file rewritten in place could
    # be served stale. A cache directory per content (as lm_lab.data.sources does) makes it rebuild.
    content = content_digest(cfg.data_files) if files else None
    kwargs: dict[str, str] = {}
    if content is not None:
        kwargs["cache_dir"] = str(Path(datasets.config.HF_DATASETS_CACHE) / "lm_lab" / content[:20])
    try:
        loaded = datasets.load_dataset(builder, cfg.name, data_files=cfg.data_files, **kwargs)
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DataError(
            f"could not load dataset {builder!r}: {str(e).splitlines()[0]}; offline, use {LOCAL_DATA_FIX}"
        ) from e
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e
        raise DataError(
            f"could not read data files {', '.join(map(str, files)) or builder}: {type(cause).__name__}: "
            f"{str(cause).splitlines()[0] if str(cause) else ''}; check the files' format"
        ) from e
    splits = list(loaded.keys())
    if cfg.split not in splits:
        raise DataError(
            f"the dataset has no split {cfg.split!r} (it has {splits}): set data.split or name the files by split"
        )
    source = ", ".join(str(p) for p in files) or builder
    train = _columns(loaded[cfg.split], columns, f"{source} [{cfg.split}]", keys)
    if content is None:
        content = getattr(loaded[cfg.split], "_fingerprint", None)
    key = {"builder": builder, "name": cfg.name, "content": content, "columns": columns, "split": cfg.split}
    if cfg.val_split and cfg.val_split in splits:
        validation = _columns(loaded[cfg.val_split], columns, f"{source} [{cfg.val_split}]", keys)
    else:
        n_val = max(1, int(round(len(train) * cfg.val_fraction)))
        if len(train) < 2:
            raise DataError(f"the {cfg.split} split has {len(train)} row(s): it needs at least 2 (one for validation)")
        parts = train.train_test_split(test_size=n_val, seed=1234, shuffle=True)
        train, validation = parts["train"], parts["test"]
        key["val_fraction"] = cfg.val_fraction
    test_split = getattr(cfg, "test_split", "test")
    test = _columns(loaded[test_split], columns, f"{source} [{test_split}]", keys) if test_split in splits else None
    for name, ds in (("training", train), ("validation", validation), ("test", test)):
        if ds is not None and len(ds) == 0:
            raise DataError(f"the {name} split is empty: check data.data_files")
    fp = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    desc = (
        f"{builder}"
        + (f" ({len(files)} file(s))" if files else "")
        + f": {len(train)} / {len(validation)} / {len(test) if test is not None else 0} rows"
    )
    return LabelledSplits(train, validation, test, fp, desc)


def _columns(
    ds: datasets.Dataset, columns: dict[str, str], source: str, keys: dict[str, str] | None = None
) -> datasets.Dataset:
    have = ds.column_names
    for col, kind in columns.items():
        if col not in have:
            key = (keys or {}).get(col) or {
                "text": "data.text_column",
                "words": "data.text_column",
                "label": "data.label_column",
                "tags": "data.label_column",
            }[kind]
            raise DataError(f"column {col!r} not in {source} (columns: {have}): set {key}")
        _check_kind(ds, col, kind, source)
    return ds.select_columns(list(columns))


def _check_kind(ds: datasets.Dataset, col: str, kind: str, source: str) -> None:
    feature = ds.features[col]
    dtype = getattr(feature, "dtype", None)
    inner = getattr(getattr(feature, "feature", None), "dtype", None)  # a Sequence's element
    if isinstance(feature, list) and feature:  # datasets >= 3 may give List features as a list
        inner = getattr(feature[0], "dtype", None)
    is_list = inner is not None or type(feature).__name__ in ("Sequence", "List", "LargeList")
    text = ("string", "large_string")
    ok = {
        "text": dtype in text,
        "words": is_list and inner in text,
        "label": dtype is not None and not is_list,
        "tags": is_list,
    }[kind]
    if not ok:
        want = {
            "text": "text",
            "words": "lists of words",
            "label": "labels (ints, strings or numbers)",
            "tags": "lists of tags",
        }[kind]
        found = f"lists of {inner}" if is_list else (dtype or type(feature).__name__)
        raise DataError(
            f"column {col!r} of {source} holds {found}, not {want}: set the data.*_column keys to the right columns"
        )


def labelled_files(directory: str | Path) -> dict[str, str]:
    """``{split: path}`` for the ``train/validation/test.jsonl`` files in ``directory`` (a helper for tests and bench)."""
    d = Path(directory)
    return {s: str(d / f"{s}.jsonl") for s in ("train", "validation", "test") if (d / f"{s}.jsonl").is_file()}
