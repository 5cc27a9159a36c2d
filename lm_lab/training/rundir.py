"""The run directory: one training process at a time (a lock), and Hydra's ``.hydra/`` record written
only once a run has passed its checks (so a refused launch leaves an existing run as it was)."""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("lm_lab")

LOCK_NAME = ".lock"
HYDRA_SUBDIR = ".hydra"
# Set by torchrun, Lightning's launcher (in the processes it starts), SLURM's srun and jsrun: a
# non-zero value means "not the process that launched the job".
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


class RunDirInUseError(ValueError):
    """Another live process is training into the same run directory."""


def is_launching_process() -> bool:
    """True unless this process is a non-zero rank of a distributed job.

    Lightning's DDP launcher re-runs ``train.py`` for ranks 1..N-1 with ``LOCAL_RANK`` set; those
    share the launching process's run directory and must not take its lock.
    """
    for key in RANK_VARIABLES:
        value = os.environ.get(key, "").strip()
        if value.isdigit() and int(value) != 0:
            return False
    return True


@contextlib.contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` (``<run_dir>/.lock``) for the length of the block.

    ``flock`` is released by the kernel when its holder dies, so a killed run never blocks the next
    one; the file names the holder (pid, host, start time) for the message of a refused second run.
    The file is removed on release, so a run that was refused leaves the directory as it found it.
    Non-zero ranks of a distributed job do nothing here (the launching process holds the lock).
    """
    if not is_launching_process():
        yield
        return
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = _acquire(path)
    try:
        yield
    finally:
        if fd is not None:
            # Unlinked before it is unlocked: a process that opens the old file after this finds it
            # gone from the directory (see _acquire) and retries on a new one.
            path.unlink(missing_ok=True)
            os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only when empty: a run refused before writing anything leaves no directory


def _acquire(path: Path) -> int | None:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunDirInUseError(
                f"run directory {path.parent} is in use by {holder}: wait for it or choose another hydra.run.dir"
            ) from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                # Some cluster file systems (e.g. Lustre without -o flock) have no flock at all.
                log.warning(
                    "cannot lock the run directory %s (%s): a second run into it would not be stopped", path.parent, e
                )
                return None
            raise
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the previous holder removed the file between our open and flock: lock the new one
    os.ftruncate(fd, 0)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} (started {stamp})\n".encode())
    return fd


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text.splitlines()[0] if text else "another process"


def write_hydra_record(cfg: Any, run_dir: Path) -> None:
    """Write ``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` as Hydra's ``run_job`` would.

    ``conf/hydra/default.yaml`` sets ``hydra.output_subdir: null``: Hydra would otherwise write these
    before ``train()`` runs, replacing an existing run's record even when the launch is then refused
    (a resume with other settings, a run directory in use). ``train()`` calls this once its checks pass.
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    out = run_dir / HYDRA_SUBDIR
    out.mkdir(parents=True, exist_ok=True)
    task_cfg = copy.deepcopy(cfg)
    if "hydra" in task_cfg:  # a config composed with return_hydra_config=True (tests, the compose API)
        with open_dict(task_cfg):
            del task_cfg["hydra"]
    files = {"config.yaml": task_cfg}
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.instance().cfg
        files["hydra.yaml"] = hydra_cfg
        files["overrides.yaml"] = hydra_cfg.hydra.overrides.task
    for name, node in files.items():
        (out / name).write_text(OmegaConf.to_yaml(node), encoding="utf-8")


def is_fresh(run_dir: Path) -> bool:
    """True when ``run_dir`` holds only what Hydra put there for this launch (an empty log file,
    ``.hydra/``): a run that fails before training may then remove the directory."""
    if not run_dir.is_dir():
        return True
    for entry in run_dir.iterdir():
        if entry.name == HYDRA_SUBDIR and entry.is_dir():
            continue
        if entry.suffix == ".log" and entry.is_file() and entry.stat().st_size == 0:
            continue
        return False
    return True
