"""debug=profiler: Lightning's SimpleProfiler writes its report into the run directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SHAKESPEARE, TINY
from train import train


@pytest.mark.slow
def test_debug_profiler_writes_its_report_in_the_run_directory(compose_cfg, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shakes = [f"data.data_files={SHAKESPEARE}", "data.path=text", "data.tokenizer=char"]
    cfg = compose_cfg("debug=profiler", *TINY, *shakes, "callbacks.text_samples=null", run_dir=run_dir)
    train(cfg)
    report = (run_dir / "fit-profiler.txt").read_text()
    assert report.startswith("FIT Profiler Report")
    assert "Mean duration (s)" in report and "Num calls" in report
    # Rows: | action | mean duration | number of calls | total time | percentage |
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in report.splitlines() if line.startswith("|")]
    rows = {c[0]: int(c[2]) for c in cells if len(c) == 5 and c[2].isdigit()}
    # One row per timed action with its number of calls: 6 optimizer steps (TINY: trainer.max_steps=6).
    steps = [n for name, n in rows.items() if name.endswith("training_step") and "Strategy" in name]
    assert steps == [6], rows
    assert rows["run_training_batch"] == 6
    assert any(name.endswith("validation_step") for name in rows)
