"""Find the runs under a directory and read each into one record, merging the attempts of a run.

A run directory is one that holds ``.hydra/config.yaml`` (``train()`` writes it). A run resumed into
its own directory (``ckpt_path=last hydra.run.dir=<dir>``) appends to its ``metrics.csv`` and
``status.json``; one resumed into a new directory (``ckpt_path=<old dir>/checkpoints/...``) records
that checkpoint in ``status.json`` and is merged here with the run it continues. Either way a
step logged by two attempts counts once: the later attempt's row wins.
"""

from __future__ import annotations

import csv
import math
import os
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lm_lab.training.rundir import HYDRA_SUBDIR, LOCK_NAME
from lm_lab.training.status import read_status

# Overrides that say how a run was launched or resumed, not what it trains.
NOT_SETTINGS = ("ckpt_path", "allow_data_change", "hydra.")


@dataclass
class Run:
    path: Path  # the first attempt's directory: the run's name in the table
    config: dict[str, Any]
    overrides: dict[str, str]
    history: dict[str, dict[int, float]]  # metric -> step -> value
    status: str  # finished | interrupted | failed | running | unknown
    wall_s: float | None
    attempts: int
    dirs: list[Path] = field(default_factory=list)
    scaling: dict[str, Any] | None = None  # scaling.json of an IsoFLOP run

    @property
    def steps(self) -> int:
        return max((max(s) for s in self.history.values() if s), default=0)

    def last(self, metric: str) -> float | None:
        series = self.history.get(metric)
        return series[max(series)] if series else None

    def best(self, metric: str, mode: str = "min") -> float | None:
        series = self.history.get(metric)
        if not series:
            return None
        return (min if mode == "min" else max)(series.values())


def find_run_dirs(root: Path) -> list[Path]:
    """Every run directory under ``root`` (``root`` itself included), in path order."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if (here / HYDRA_SUBDIR / "config.yaml").is_file():
            found.append(here)
            dirnames.clear()  # nothing below a run directory is another run (checkpoints, wandb, ...)
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found, key=_natural)


def _natural(path: Path) -> list[Any]:
    """Sort key: multirun job 10 after job 9, not after job 1."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def load_runs(root: Path) -> list[Run]:
    """The runs under ``root``, each run's attempts merged into one record."""
    dirs = find_run_dirs(root)
    chains = _chains(dirs)
    return [_read_run(chain) for chain in chains]


def _chains(dirs: list[Path]) -> list[list[Path]]:
    """Group directories into runs: a directory whose first attempt resumed from a checkpoint inside
    another run directory continues that run."""
    resolved = {d.resolve(): d for d in dirs}
    parent: dict[Path, Path] = {}
    for d in dirs:
        status = read_status(d)
        first = status["attempts"][0] if status and status["attempts"] else {}
        source = first.get("resumed_from")
        if not source:
            continue
        for ancestor in Path(source).parents:
            if ancestor in resolved and resolved[ancestor] != d:
                parent[d] = resolved[ancestor]
                break
    chains = []
    for d in dirs:
        if d in parent:
            continue
        chain, current = [d], d
        while True:
            children = sorted(c for c, p in parent.items() if p == current)
            if not children:
                break
            current = children[0]
            chain.append(current)
        chains.append(chain)
    return chains


def _read_run(chain: list[Path]) -> Run:
    history: dict[str, dict[int, float]] = {}
    for d in chain:  # oldest first: a step that a later attempt logged again takes the later value
        for metric, series in _read_metrics(d / "metrics.csv").items():
            history.setdefault(metric, {}).update(series)
    config = _yaml(chain[0] / HYDRA_SUBDIR / "config.yaml") or {}
    overrides = _overrides(chain[0])
    attempts: list[dict[str, Any]] = []
    for d in chain:
        status = read_status(d)
        attempts += [{**a, "_dir": d} for a in status["attempts"]] if status else []
    status, wall = _status_and_wall(chain, attempts, config, history)
    plan = None
    for d in chain:
        plan = _json(d / "scaling.json") or plan
    return Run(
        path=chain[0],
        config=config,
        overrides=overrides,
        history=history,
        status=status,
        wall_s=wall,
        attempts=max(len(attempts), len(chain)),
        dirs=chain,
        scaling=plan,
    )


def _read_metrics(path: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    if not path.is_file():
        return out
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or not value:
                    continue
                try:
                    number = float(value)
                except ValueError:
                    continue
                if math.isfinite(number):
                    out.setdefault(key, {})[int(float(step))] = number
    return out


def _overrides(run_dir: Path) -> dict[str, str]:
    """The run's command-line settings (``key=value``), without launch-only keys."""
    items = _yaml(run_dir / HYDRA_SUBDIR / "overrides.yaml") or []
    out = {}
    for item in items:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if not key.startswith(NOT_SETTINGS):
            out[key] = value
    return out


def _status_and_wall(
    chain: list[Path], attempts: list[dict[str, Any]], config: dict[str, Any], history: dict[str, dict[int, float]]
) -> tuple[str, float | None]:
    if not attempts:  # a run from before status.json: finished when it reached its step budget
        if _lock_alive(chain[-1]):
            return "running", None
        max_steps = (config.get("trainer") or {}).get("max_steps")
        steps = max((max(s) for s in history.values() if s), default=0)
        if isinstance(max_steps, int) and max_steps > 0:
            return ("finished" if steps >= max_steps else "failed"), None
        return "unknown", None
    wall = 0.0
    for a in attempts:
        end = a.get("ended")
        if end is None:  # still running, or killed: until now, or until its directory was last written
            end = time.time() if _alive(a) else _last_write(a["_dir"])
        wall += max(0.0, float(end) - float(a["started"]))
    last = attempts[-1]
    status = last.get("status", "unknown")
    if status == "running" and not _alive(last):
        status = "failed"  # its process died without closing the attempt (kill -9, a lost node)
    return status, wall


def _alive(attempt: dict[str, Any]) -> bool:
    """Whether the attempt's process still runs. On another host this cannot be checked: its
    lock file (removed when a run ends normally) is taken as the answer."""
    if attempt.get("host") != socket.gethostname():
        return (attempt["_dir"] / LOCK_NAME).exists()
    try:
        os.kill(int(attempt["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return (attempt["_dir"] / LOCK_NAME).exists()


def _lock_alive(run_dir: Path) -> bool:
    lock = run_dir / LOCK_NAME
    try:
        words = lock.read_text().split()
    except OSError:
        return False
    # "pid <pid> on host <host> (started ...)", written by lm_lab.training.rundir
    if len(words) >= 5 and words[0] == "pid" and words[4] == socket.gethostname():
        return _alive({"pid": words[1], "host": words[4], "_dir": run_dir})
    return True


def _last_write(run_dir: Path) -> float:
    times = [p.stat().st_mtime for p in (run_dir / "metrics.csv", run_dir / "train.log") if p.exists()]
    return max(times) if times else run_dir.stat().st_mtime


def _yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def _json(path: Path) -> dict[str, Any] | None:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
