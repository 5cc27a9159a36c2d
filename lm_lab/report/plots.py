"""The report's figures (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from lm_lab.report.runs import Run  # noqa: E402


def loss_curves(runs: list[Run], labels: list[str], metric: str, path: Path) -> None:
    """``train/loss`` and ``metric`` (the monitored validation metric) against the step, every run on one figure."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, name in zip(axes, ("train/loss", metric), strict=True):
        for run, label in zip(runs, labels, strict=True):
            series = run.history.get(name) or {}
            if series:
                steps = sorted(series)
                ax.plot(steps, [series[s] for s in steps], marker="." if len(steps) < 30 else None, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(alpha=0.3)
    if len(runs) <= 20:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep(runs: list[Run], params: list[str], metric: str, path: Path) -> None:
    """For each swept parameter, its value against the run's final ``metric`` (one panel each)."""
    fig, axes = plt.subplots(1, len(params), figsize=(4.5 * len(params), 4), squeeze=False)
    for ax, param in zip(axes[0], params, strict=True):
        points = [(_value(run.overrides.get(param)), run.last(metric)) for run in runs]
        points = [(x, y) for x, y in points if y is not None and x is not None]
        if points and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _ in points):
            xs = [float(x) for x, _ in points]
            ax.scatter(xs, [y for _, y in points])
            if min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
        else:
            names = list(dict.fromkeys(str(x) for x, _ in points))  # first-seen order (the sweep's)
            ax.scatter([names.index(str(x)) for x, _ in points], [y for _, y in points])
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_xlabel(param)
        ax.set_ylabel(f"final {metric}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _value(text: str | None) -> object:
    """An override's value as YAML reads it (``1e-3`` -> 0.001, ``gpt_tiny`` -> a string)."""
    if text is None:
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        except ValueError:
            return value
    return value
