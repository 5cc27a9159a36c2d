"""On-disk caches that are either complete or absent.

A cache entry is a directory named by a key (a hash of everything its content depends on). It is
built in a temporary sibling directory and renamed into place only when complete, with a
``meta.json`` written last; a killed build leaves only a ``*.tmp-*`` directory that nobody reads.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

META = "meta.json"


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def load_entry(directory: Path) -> dict[str, Any] | None:
    """Return the entry's metadata if it is complete and its files match, else None."""
    meta_path = directory / META
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    for name, size in meta.get("files", {}).items():
        p = directory / name
        if not p.is_file() or p.stat().st_size != size:
            return None
    return meta


@contextlib.contextmanager
def build_entry(directory: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield (tmp_dir, meta); on success write meta (with file sizes) and rename into place."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f"{directory.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta: dict[str, Any] = {}
    try:
        yield tmp, meta
        meta["files"] = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if directory.exists():
            # Another process (e.g. a second DDP rank) finished first, or an old broken entry.
            if load_entry(directory) is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return
            shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            from lm_lab.data.sources import DataError

            raise DataError(
                f"disk full while writing the data cache {directory} (nothing was kept): free space "
                "there or set paths.cache_dir (or LM_LAB_CACHE) to a disk with room"
            ) from None
        raise
