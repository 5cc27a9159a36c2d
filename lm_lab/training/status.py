"""``status.json`` in a run directory: one entry per attempt (launch or resume) of the run.

``train()`` opens an attempt once the run's checks have passed (so a refused launch leaves an
existing run's record alone) and closes it with how it ended: ``finished``, ``interrupted``
(SIGTERM or Ctrl-C: resumable with ``ckpt_path=last``) or ``failed``. An attempt that is still open
is ``running`` while its process lives; one whose process died without closing it (``kill -9``, a
lost node) was killed: ``lm_lab.report`` shows it as ``failed``. Each attempt also records the
checkpoint it resumed from, which is how the report merges a run resumed into a new directory
with the run it continues.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

STATUS_NAME = "status.json"


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The run's record, or None when it has none (a run from before this file existed) or it is unreadable."""
    try:
        data = json.loads((Path(run_dir) / STATUS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("attempts"), list) else None


def start_attempt(run_dir: Path, resumed_from: Path | None) -> None:
    """Record that this process now trains in ``run_dir`` (rank 0 only)."""
    record = read_status(run_dir) or {"attempts": []}
    record["attempts"].append(
        {
            "status": "running",
            "started": time.time(),
            "ended": None,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "resumed_from": str(Path(resumed_from).resolve()) if resumed_from else None,
        }
    )
    _write(run_dir, record)


def end_attempt(run_dir: Path, status: str, error: str | None = None) -> None:
    """Close this process's open attempt in ``run_dir``; nothing when it opened none (a refused launch)."""
    record = read_status(run_dir)
    if not record or not record["attempts"]:
        return
    last = record["attempts"][-1]
    if last.get("ended") is not None or last.get("pid") != os.getpid() or last.get("host") != socket.gethostname():
        return
    last.update(status=status, ended=time.time())
    if error:
        last["error"] = error
    _write(run_dir, record)


def _write(run_dir: Path, record: dict[str, Any]) -> None:
    path = Path(run_dir) / STATUS_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a file
