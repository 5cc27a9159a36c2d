"""One row per run: the settings that differ between the runs, and what each run reached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lm_lab.report.runs import Run


def monitor(run: Run) -> tuple[str, str]:
    """The metric the run's best checkpoint was chosen by, and its mode (``val/loss``, ``min``)."""
    node = ((run.config.get("callbacks") or {}).get("model_checkpoint")) or {}
    metric = node.get("monitor") or "val/loss"
    return str(metric), str(node.get("mode") or "min")


def varying(runs: list[Run]) -> list[str]:
    """Override keys whose values are not the same in every run (in first-seen order)."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run.overrides if k not in keys]
    if len(runs) < 2:
        return []
    return [k for k in keys if len({run.overrides.get(k) for run in runs}) > 1]


def rows(runs: list[Run], root: Path) -> tuple[list[str], list[list[str]]]:
    """The header and one row of text cells per run."""
    params = varying(runs)
    metrics = sorted({m for run in runs for m in run.history if m.startswith("val/")})
    monitored = sorted({monitor(run) for run in runs})
    header = ["run", *params, "status", "steps", "tokens"]
    header += [f"final {m}" for m in metrics]
    header += [f"best {m}" for m, _ in monitored]
    header += ["wall"]
    table = []
    for run in runs:
        cells = [_name(run.path, root)]
        cells += [run.overrides.get(k, "") for k in params]
        tokens = run.last("tokens_seen")
        cells += [run.status, str(run.steps), f"{tokens:,.0f}" if tokens is not None else ""]
        cells += [_num(run.last(m)) for m in metrics]
        cells += [_num(run.best(m, mode)) if (m, mode) == monitor(run) else "" for m, mode in monitored]
        cells += [_duration(run.wall_s)]
        table.append(cells)
    return header, table


def as_text(header: list[str], table: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *table]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def as_markdown(header: list[str], table: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in table)])


def _name(path: Path, root: Path) -> str:
    try:
        name = str(path.relative_to(root))
    except ValueError:
        name = str(path)
    return name if name != "." else path.name


def _num(value: Any) -> str:
    return "" if value is None else f"{value:.4f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
