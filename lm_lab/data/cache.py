"""On-disk caches that are either complete and verified, or rebuilt.

A cache entry is a directory named by a key (a hash of everything its content depends on, the
corpus's *bytes* included, see ``sources.content_digest``). It is built in a temporary sibling
directory ``<name>.tmp-<host>-<pid>`` and renamed into place only when complete, with a ``meta.json``
written last that records the size and checksum of every file and a checksum of its own content. A killed
build leaves only a ``*.tmp-*`` directory that nobody reads (and that the next lookup removes once
its process is gone); an entry whose files or ``meta.json`` no longer match their checksums is a
miss, reported with a warning, and rebuilt.

Several processes (DDP ranks, nodes sharing the cache) may look up and build the same entry at
once: readers never take a lock; the short step that replaces a directory holds an exclusive
``flock`` so that a valid entry installed by another process is never deleted. A builder looks up and
builds under ``build_lock``, so processes that share the cache directory (the local rank 0 of every
node of a job, when the nodes share a file system) build an entry once: the others wait, then find it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import xxhash

log = logging.getLogger("lm_lab")

META = "meta.json"
DIGEST = "xxh3_128"  # recorded in meta.json, so a future change of algorithm reads as a miss
_CHUNK = 8 << 20  # big reads keep the hash near memory speed (xxh3: ~10 GB/s from the page cache)
_HOST = socket.gethostname()
# <name>.tmp-<host>-<pid> (and <name>.tmp-<pid> from older versions): the pid is last.
_TMP_RE = re.compile(r"\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)$")


def cache_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_digest(path: Path) -> str:
    """xxh3-128 of the file's bytes, read in large chunks into one reused buffer."""
    h = xxhash.xxh3_128()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _meta_digest(meta: dict[str, Any]) -> str:
    return xxhash.xxh3_128(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check(directory: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(meta, None) for a complete entry whose files match; (None, reason) for a damaged one;
    (None, None) when there is no entry."""
    meta_path = directory / META
    if not directory.exists():
        return None, None
    if not meta_path.is_file():
        return None, f"{META} is missing"
    try:
        stored = json.loads(meta_path.read_text())
        if not isinstance(stored, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        return None, f"{META} is unreadable ({type(e).__name__}: {str(e)[:80]})"
    checksum = stored.pop("meta_checksum", None)
    if checksum is None or stored.get("digest") != DIGEST:
        return None, f"{META} has no checksums (written by an older lm_lab)"
    if checksum != _meta_digest(stored):
        return None, f"{META} does not match its checksum (edited or corrupted)"
    for name, want in stored.get("files", {}).items():
        p = directory / name
        try:
            size = p.stat().st_size
            if size != want["size"]:
                return None, f"{name} has {size} bytes, expected {want['size']}"
            if file_digest(p) != want[DIGEST]:
                return None, f"{name} does not match its checksum (overwritten or corrupted)"
        except OSError as e:
            return None, f"{name} is unreadable ({e.strerror or e})"
    return stored, None


def load_entry(directory: Path) -> dict[str, Any] | None:
    """Return the entry's metadata if it is complete and every file matches its checksum, else None.

    A damaged entry is logged as a warning (naming it and what is wrong) and reads as a miss, so the
    caller rebuilds it; ``build_entry`` then replaces it.
    """
    remove_stale_builds(directory.parent)
    meta, problem = _check(directory)
    if problem:
        log.warning("cache entry %s is damaged: %s; rebuilding it", directory, problem)
    return meta


def discard_entry(directory: Path, reason: str) -> None:
    """Remove an entry whose checksums match but whose content the caller cannot use."""
    log.warning("cache entry %s is damaged: %s; rebuilding it", directory, reason)
    with _install_lock(directory):
        _discard(directory)


@contextlib.contextmanager
def build_entry(directory: Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Yield (tmp_dir, meta); on success write meta (with each file's size and checksum) and
    rename into place, replacing a damaged entry but never a valid one another process installed."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(directory.parent)
    tmp = directory.parent / f"{directory.name}.tmp-{_HOST}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta: dict[str, Any] = {}
    try:
        yield tmp, meta
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        meta["files"] = {
            p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, DIGEST: file_digest(p)} for p in files
        }
        meta["digest"] = DIGEST
        record = {**meta, "meta_checksum": _meta_digest(meta)}
        (tmp / META).write_text(json.dumps(record, indent=1, sort_keys=True))
        with _install_lock(directory):
            if directory.exists():
                if _check(directory)[0] is not None:
                    # Another process (e.g. a second DDP rank) finished first: keep its entry.
                    shutil.rmtree(tmp, ignore_errors=True)
                    return
                _discard(directory)
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


def remove_stale_builds(parent: Path) -> None:
    """Delete ``*.tmp-*`` directories left in ``parent`` by builds whose process is gone.

    Only this host's processes can be checked; directories named after another host (a node
    sharing the cache) are left to that host.
    """
    try:
        candidates = [p for p in parent.iterdir() if ".tmp-" in p.name]
    except OSError:
        return
    for p in candidates:
        m = _TMP_RE.search(p.name)
        if not m or m["host"] not in (None, _HOST) or _pid_alive(int(m["pid"])):
            continue
        log.info("removing the unfinished cache build of a process that is gone: %s", p)
        shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or not a pid we can judge: leave it
    return True


def _discard(directory: Path) -> None:
    # Renamed away first, so the entry's name is free at once and never points at a half-deleted tree.
    trash = directory.parent / f"{directory.name}.old.tmp-{_HOST}-{os.getpid()}"
    shutil.rmtree(trash, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.replace(directory, trash)
    shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Exclusive lock for looking ``directory`` up and, on a miss, building it.

    A second builder waits here, then finds the entry complete instead of building its own copy
    (two nodes tokenizing the same corpus into one shared cache). Where the file system has no
    ``flock`` (some cluster file systems) this does nothing: concurrent builds stay safe (see
    ``build_entry``), only duplicated. A separate file from ``_install_lock``'s: ``flock`` locks
    per open file, so one process holding both on one file would wait for itself.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory.parent / f".{directory.name}.build.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _install_lock(directory: Path) -> Iterator[None]:
    """Exclusive lock for replacing ``directory`` (held for a rename, not for a build)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, the rename is still atomic
        yield
        return
    fd = os.open(directory.parent / f".{directory.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
