"""experiment=scaling_cpu end to end: a tiny IsoFLOP grid as one Hydra multirun, then report --scaling."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SHAKESPEARE

# 2 budgets x 3 sizes; 128 tokens per step, so xs trains 16 and 47 steps, m 4 and 13.
GRID = [
    "experiment=scaling_cpu",
    f"data.data_files={SHAKESPEARE}",
    "data.batch_size=4",
    "data.block_size=32",
    "scaling.budget=2e8,6e8",
    "scaling.size=xs,s,m",
    "trainer.limit_val_batches=2",
    "hydra.sweep.dir=logs/grid",
]
PNG = b"\x89PNG\r\n\x1a\n"


def _run(args: list[str], cwd: Path, cache: Path, module: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module] if module else [sys.executable, str(REPO / "train.py")]
    env = {**os.environ, "LM_LAB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_scaling_size_must_name_a_shape(tmp_path: Path, shared_cache: Path) -> None:
    r = _run([*GRID[:4], "scaling.size=huge", "scaling.budget=2e8", "hydra.mode=RUN"], tmp_path, shared_cache)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: scaling.size='huge' is not a shape of scaling.shapes: choose one of xs, s, m, l, xl"
    ]
    assert not list(tmp_path.glob("logs/*/runs/*"))


@pytest.mark.slow
def test_isoflop_grid_trains_as_one_multirun_and_report_fits_it(tmp_path: Path, shared_cache: Path) -> None:
    r = _run(GRID, tmp_path, shared_cache)
    assert r.returncode == 0, r.stderr[-3000:]
    grid = tmp_path / "logs" / "grid"
    plans = [json.loads((grid / str(i) / "scaling.json").read_text()) for i in range(6)]
    assert [(p["budget"], p["size"]) for p in plans] == [(c, s) for c in (2e8, 6e8) for s in ("xs", "s", "m")]
    for i, p in enumerate(plans):
        # D = C / 6N rounded to whole steps of 128 tokens; the run trained exactly that many steps.
        assert p["tokens"] == p["max_steps"] * 128
        assert abs(p["flops"] - p["budget"]) <= 6 * p["n_params"] * 128 / 2
        with open(grid / str(i) / "metrics.csv", newline="") as f:
            steps = [int(row["step"]) for row in csv.DictReader(f)]
        assert max(steps) == p["max_steps"]
    sizes = [p["n_params"] for p in plans[:3]]
    assert sizes == sorted(sizes) and len(set(sizes)) == 3  # N counted from each built network

    r = _run([str(grid), "--scaling"], tmp_path, shared_cache, module="lm_lab.report")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Approach 3" in r.stdout
    out = grid / "report"
    fit = json.loads((out / "scaling_fit.json").read_text())
    assert fit["runs"] == 6
    assert [b["C"] for b in fit["approach2"]["budgets"]] == [2e8, 6e8]
    for key in ("E", "A", "B", "alpha", "beta"):
        value = fit["approach3"][key]["value"]
        lo, hi = fit["approach3"][key]["ci95"]
        assert value > 0 and lo <= hi
    if fit["approach2"]["a"] is not None:  # needs a loss minimum inside the sizes of both budgets
        assert fit["approach2"]["a"]["value"] + fit["approach2"]["b"]["value"] == pytest.approx(1)
        assert (out / "optimal_n_d.png").read_bytes()[:8] == PNG
    for name in ("isoflops.png", "loss_curves.png", "sweep.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000
    assert (out / "scaling_fit.md").read_text().startswith("# Scaling fit (6 runs, final val/loss)")
