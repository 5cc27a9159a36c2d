"""Load a text corpus the way ``datasets.load_dataset`` does, and carve a validation split.

The result is always ``{"train": ds, "validation": ds}`` with a single ``text`` column, plus a
fingerprint that changes whenever the text changes (used as a cache key): local files are keyed on
a hash of their bytes, not on their names, sizes or timestamps, which a rewrite can leave unchanged.

Local files (not streamed) are read only when their splits are first used: the fingerprint needs
only their bytes and the settings, so a run whose tokens are already cached never reads the text
through ``datasets`` (nor imports it: ~0.5 s of start-up).
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xxhash

from lm_lab.data import cache, pydocs
from lm_lab.data.grouping import GROUPINGS, group_rows
from lm_lab.data.hub import LOCAL_DATA_FIX, hub_offline_message, hub_reachable
from lm_lab.data.options import DataConfig
from lm_lab.errors import DataError  # defined there: importable without datasets

if TYPE_CHECKING:
    import datasets

BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
TEXT_BUILDERS = {"text", "json", "csv"}


class Corpus:
    """A corpus's ``train`` and ``validation`` splits (``datasets.Dataset`` or ``IterableDataset``
    with a ``text`` column), its ``fingerprint`` (a cache key: changes whenever the text or the
    settings that shape the splits change) and a one-line ``description``. Given ``load`` instead
    of the splits, they are read on first use."""

    def __init__(
        self,
        train: Any = None,
        validation: Any = None,
        fingerprint: str = "",
        description: str = "",
        *,
        load: Callable[[], tuple[Any, Any]] | None = None,
    ) -> None:
        self._splits = None if load is not None else (train, validation)
        self._load = load
        self.fingerprint, self.description = fingerprint, description

    @property
    def loaded(self) -> bool:
        return self._splits is not None

    def _get(self) -> tuple[Any, Any]:
        if self._splits is None:
            assert self._load is not None
            self._splits = self._load()
        return self._splits

    @property
    def train(self) -> Any:
        return self._get()[0]

    @property
    def validation(self) -> Any:
        return self._get()[1]


def _file_list(data_files: Any) -> list[str]:
    if data_files is None:
        return []
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [f for v in data_files.values() for f in _file_list(v)]
    return [str(f) for f in data_files]


def resolve_files(data_files: Any) -> list[Path]:
    """Expand globs; fail on missing or empty files with the file's name."""
    out: list[Path] = []
    for pattern in _file_list(data_files):
        if "://" in pattern:
            continue  # remote URLs are datasets' business
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise DataError(
                f"data file not found: {pattern}: check data.data_files (relative paths start "
                f"from the directory you launched from, {os.getcwd()})"
            )
        for m in matches:
            p = Path(m)
            if p.is_dir():
                raise DataError(f"data file {p} is a directory: pass the files inside it (e.g. {p}/*.txt)")
            if p.stat().st_size == 0:
                raise DataError(f"data file {p} is empty: point data.data_files at a file with text in it")
            out.append(p)
    return out


def check_utf8(path: Path, limit: int = 1 << 20) -> None:
    """Fail early (with the file's name) on binary or non-UTF-8 files."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        chunk = f.read(limit)
    if b"\x00" in chunk:
        raise DataError(f"data file {path} is not text (it contains NUL bytes): pass UTF-8 text, JSON, CSV or Parquet")
    try:
        decoder.decode(chunk, final=len(chunk) < limit)
    except UnicodeDecodeError as e:
        raise DataError(
            f"data file {path} is not UTF-8 text (byte {e.start}): convert it with "
            f"`iconv -t utf-8` or pass a UTF-8 file"
        ) from e


def infer_builder(files: list[Path]) -> str:
    exts = {BUILDERS.get(p.suffix.lower()) for p in files}
    if len(exts) != 1 or None in exts:
        names = ", ".join(sorted({p.suffix or p.name for p in files}))
        raise DataError(f"cannot tell the format of data files ({names}): set data.path to text, json, csv or parquet")
    return exts.pop()  # type: ignore[return-value]


def content_digest(data_files: Any) -> str | None:
    """xxh3-128 of the local data files' bytes, in order and by split when ``data_files`` is a dict
    (moving a file from one split to another changes it); None when there is no local file."""
    groups = data_files if isinstance(data_files, dict) else {"": data_files}
    seen: dict[Path, str] = {}  # a file listed under two splits is read once
    parts: dict[str, list[str]] = {}
    for split, group in groups.items():
        paths = resolve_files(group)
        for p in paths:
            if p not in seen:
                seen[p] = cache.file_digest(p)
        parts[str(split)] = [seen[p] for p in paths]
    if not seen:
        return None
    return xxhash.xxh3_128(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def load_corpus(cfg: DataConfig, seed: int = 0) -> Corpus:
    if cfg.path == "pydocs" and cfg.data_files is None:
        ds, fingerprint = _pydocs_dataset(cfg)
        return _carve(
            ds,
            cfg,
            fingerprint=f"pydocs-{fingerprint}-val{cfg.val_fraction}",
            description="built-in corpus: Python's own documentation",
            contiguous=False,
        )

    files = resolve_files(cfg.data_files)
    builder = cfg.path
    if builder in (None, "auto"):
        builder = infer_builder(files)
    local = bool(files) or Path(builder).exists() or builder in BUILDERS.values()
    if builder in TEXT_BUILDERS:
        for p in files:
            check_utf8(p)
    if not local and not hub_reachable():
        raise DataError(hub_offline_message(f"dataset {builder!r}", LOCAL_DATA_FIX))
    # Read every byte (about 0.1-0.2 s per GB from the page cache): a rewrite that keeps the size and
    # modification time must still change the key.
    content = content_digest(cfg.data_files)
    kwargs: dict[str, Any] = {}
    # Rows to be grouped into documents here (lm_lab.data.grouping), or split by datasets' text loader.
    regroup = _regroup(cfg, builder)
    if regroup and cfg.streaming:
        raise DataError(
            f"data.sample_by={cfg.sample_by} groups rows into documents, which needs the whole split: "
            "use data.streaming=false, or data.sample_by=document"
        )
    if builder == "text":
        kwargs["sample_by"] = "line" if regroup else cfg.sample_by
    fp_parts = {
        "builder": builder,
        "name": cfg.name,
        "content": content,
        "split": cfg.split,
        "text_column": cfg.text_column,
        "sample_by": cfg.sample_by,
    }
    desc = f"{builder}" + (f"/{cfg.name}" if cfg.name else "") + (f" ({len(files)} file(s))" if files else "")
    if files and builder in BUILDERS.values() and not cfg.streaming:
        # Local files: datasets names the splits after data_files' keys ("train" for a file or a
        # list), so the key needs no reading; the text is read when the splits are first used.
        splits = [str(k) for k in cfg.data_files] if isinstance(cfg.data_files, dict) else ["train"]
        _check_split(cfg, splits)
        fp = _fingerprint(fp_parts, cfg, splits)

        def load() -> tuple[Any, Any]:
            loaded = _load_dataset(builder, cfg, files, content, kwargs)
            if sorted(loaded.keys()) != sorted(splits):  # the key above assumed these split names
                raise DataError(
                    f"datasets read splits {sorted(loaded.keys())} from data.data_files, not {sorted(splits)}: "
                    "name the splits with a dict (data.data_files={train: ..., validation: ...})"
                )
            corpus = _splits_of(loaded, cfg, files, builder, fp_parts, fp, desc)
            return corpus.train, corpus.validation

        return Corpus(fingerprint=fp, description=desc, load=load)
    loaded = _load_dataset(builder, cfg, files, content, kwargs)
    _check_split(cfg, list(loaded.keys()))
    if not files:
        fp_parts["hub_fingerprint"] = getattr(loaded[cfg.split], "_fingerprint", None)
    return _splits_of(loaded, cfg, files, builder, fp_parts, _fingerprint(fp_parts, cfg, list(loaded.keys())), desc)


def _regroup(cfg: DataConfig, builder: str) -> str | None:
    """How rows are grouped into documents here (lm_lab.data.grouping); None: as datasets' loader
    gives them (its text loader reads whole files, paragraphs or lines itself)."""
    return cfg.sample_by if cfg.sample_by in GROUPINGS and (builder != "text" or cfg.sample_by == "article") else None


def _check_split(cfg: DataConfig, splits: list[str]) -> None:
    if cfg.split not in splits:
        raise DataError(f"dataset has no split {cfg.split!r} (it has {splits}): set data.split")


def _fingerprint(fp_parts: dict[str, Any], cfg: DataConfig, splits: list[str]) -> str:
    """The corpus's cache key: its source (``fp_parts``) and how validation is made: a split of its
    own, the first ``streaming_val_docs`` documents of a stream, or ``val_fraction`` carved off."""
    if cfg.val_split and cfg.val_split in splits:
        return hashlib.sha256(json.dumps({**fp_parts, "val": cfg.val_split}, sort_keys=True).encode()).hexdigest()[:16]
    fp = hashlib.sha256(json.dumps(fp_parts, sort_keys=True).encode()).hexdigest()[:16]
    return f"{fp}-stream{cfg.streaming_val_docs}" if cfg.streaming else f"{fp}-val{cfg.val_fraction}"


def _load_dataset(builder: str, cfg: DataConfig, files: list[Path], content: str | None, kwargs: dict[str, Any]) -> Any:
    import datasets

    if content is not None:
        # datasets keys its own Arrow copy of local files on path and mtime, so it too would serve
        # the old text after such a rewrite; a cache directory per content makes it rebuild.
        kwargs = {**kwargs, "cache_dir": str(Path(datasets.config.HF_DATASETS_CACHE) / "lm_lab" / content[:20])}
    try:
        return datasets.load_dataset(builder, cfg.name, data_files=cfg.data_files, streaming=cfg.streaming, **kwargs)
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DataError(
            f"could not load dataset {builder!r}: {str(e).splitlines()[0]}; offline, use {LOCAL_DATA_FIX}"
        ) from e
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e
        raise DataError(
            f"could not read data files {', '.join(map(str, files)) or builder}: "
            f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}; "
            "check the files' format matches data.path"
        ) from e
    except UnicodeDecodeError as e:
        raise DataError(f"data files are not UTF-8 text ({e.reason}): convert them to UTF-8") from e


def _splits_of(
    loaded: Any, cfg: DataConfig, files: list[Path], builder: str, fp_parts: dict[str, Any], fp: str, desc: str
) -> Corpus:
    """The train and validation splits of what ``datasets`` loaded: text only, rows grouped into
    documents where ``data.sample_by`` asks, validation its own split or carved off."""
    rows_key = hashlib.sha256(json.dumps(fp_parts, sort_keys=True).encode()).hexdigest()[:16]
    regroup = _regroup(cfg, builder)
    source = ", ".join(map(str, files)) or builder
    train = _text_only(loaded[cfg.split], cfg, source)
    if regroup:
        train = group_rows(train, regroup, f"lm_lab-{rows_key}-{cfg.split}")
    if cfg.val_split and cfg.val_split in loaded:
        val = _text_only(loaded[cfg.val_split], cfg, source)
        if regroup:
            val = group_rows(val, regroup, f"lm_lab-{rows_key}-{cfg.val_split}")
        return Corpus(train, val, fp, desc)
    return _carve(train, cfg, fingerprint=fp, description=desc, contiguous=len(files) == 1)


def _pydocs_dataset(cfg: DataConfig) -> tuple[datasets.Dataset, str]:
    """The built-in corpus and a hash of its text (it is generated here, so the text is the key)."""
    import datasets

    texts = [d["text"] for d in pydocs.build_documents()]
    h = xxhash.xxh3_128()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return datasets.Dataset.from_dict({"text": texts}), h.hexdigest()[:16]


def _text_only(ds: Any, cfg: DataConfig, source: str) -> Any:
    cols = ds.column_names
    if cols is not None and cfg.text_column not in cols:
        raise DataError(f"column {cfg.text_column!r} not in the dataset (columns: {cols}): set data.text_column")
    feature = (ds.features or {}).get(cfg.text_column)
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
        # Numbers (or lists, structs) would otherwise fail deep inside tokenizer training.
        kind = getattr(feature, "dtype", None) or type(feature).__name__
        texts = [c for c in cols or [] if getattr(ds.features[c], "dtype", None) in ("string", "large_string")]
        hint = f" (text columns: {texts})" if texts else ""
        raise DataError(
            f"column {cfg.text_column!r} of {source} holds {kind} values, not text: set "
            f"data.text_column to a column of strings{hint}"
        )
    if cols is not None and cols != ["text"]:
        ds = ds.select_columns([cfg.text_column])
        if cfg.text_column != "text":
            ds = ds.rename_column(cfg.text_column, "text")
    return ds


def _carve(ds: Any, cfg: DataConfig, *, fingerprint: str, description: str, contiguous: bool) -> Corpus:
    """Split off ``val_fraction`` for validation, deterministically. ``fingerprint`` is the corpus's
    key as ``_fingerprint`` made it (with its ``-val`` / ``-stream`` suffix).

    A single-file corpus is split contiguously at the end of its text (nanoGPT's convention:
    a one-document file is cut at character ``len * (1 - val_fraction)``); a multi-document corpus
    is split by a seeded shuffle of documents. Streaming corpora hold out their first
    ``streaming_val_docs`` documents.
    """
    import datasets

    if isinstance(ds, datasets.IterableDataset):
        n = cfg.streaming_val_docs
        return Corpus(ds.skip(n), ds.take(n), fingerprint, description)
    n = len(ds)
    if n == 0:
        raise DataError("the corpus has no documents: check data.data_files / data.split")
    if n == 1:
        text = ds[0]["text"] or ""
        cut = int(len(text) * (1 - cfg.val_fraction))
        train = datasets.Dataset.from_dict({"text": [text[:cut]]})
        val = datasets.Dataset.from_dict({"text": [text[cut:]]})
        return Corpus(train, val, fingerprint, description)
    n_val = max(1, int(round(n * cfg.val_fraction)))
    if contiguous:
        return Corpus(ds.select(range(n - n_val)), ds.select(range(n - n_val, n)), fingerprint, description)
    parts = ds.train_test_split(test_size=n_val, seed=1234, shuffle=True)
    return Corpus(parts["train"], parts["test"], fingerprint, description)
