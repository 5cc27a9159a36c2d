"""``python -m lm_lab.report DIR [--out OUT] [--scaling]``: a table of the runs under DIR and PNG plots.

DIR is a run directory, a multirun (sweep) directory or a whole ``logs/`` folder. The table is
printed and written with the plots to OUT (default ``DIR/report``): ``runs.md``, ``runs.csv``,
``loss_curves.png`` and, when some override differs between runs, ``sweep.png`` (each such
parameter against the final validation metric). ``--scaling`` also fits the scaling laws of an
IsoFLOP study (``experiment=scaling_*``): ``scaling_fit.json``, ``scaling_fit.md``,
``isoflops.png``, ``optimal_n_d.png`` (see ``lm_lab.report.scaling``).
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import sys
import tempfile
from pathlib import Path

from lm_lab.report import ReportError, plots
from lm_lab.report.runs import load_runs
from lm_lab.report.table import as_markdown, as_text, monitor, rows, varying


def build_report(root: Path, out: Path, scaling: bool = False) -> str:
    """Write the report of the runs under ``root`` into ``out``; return the table as text.

    Everything is written to a temporary folder first and moved into ``out`` at the end: a failure
    leaves no half-written report."""
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory: give a run, multirun or logs/ directory")
    runs = load_runs(root)
    if not runs:
        raise ReportError(
            f"no runs under {root}: a run directory holds .hydra/config.yaml (train.py writes it); "
            "point at logs/, a multirun directory or a run directory"
        )
    header, table = rows(runs, root)
    text = as_text(header, table)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "runs.md").write_text(as_markdown(header, table) + "\n", encoding="utf-8")
        buf = io.StringIO()
        csv.writer(buf).writerows([header, *table])
        (tmp / "runs.csv").write_text(buf.getvalue(), encoding="utf-8")
        metric = monitor(runs[0])[0]
        params = varying(runs)
        labels = [
            " ".join(f"{k}={run.overrides.get(k, '')}" for k in params) or row[0]
            for run, row in zip(runs, table, strict=True)
        ]
        plots.loss_curves(runs, labels, metric, tmp / "loss_curves.png")
        if params:
            plots.sweep(runs, params, metric, tmp / "sweep.png")
        if scaling:
            from lm_lab.report.scaling import write_scaling

            text += "\n\n" + write_scaling(runs, tmp, metric)
        out.mkdir(parents=True, exist_ok=True)
        for item in tmp.iterdir():
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lm-lab-report", description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="a run, a multirun or a logs/ directory")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: DIR/report)")
    parser.add_argument("--scaling", action="store_true", help="fit the scaling laws of an IsoFLOP study")
    args = parser.parse_args(argv)
    out = args.out or args.dir / "report"
    try:
        text = build_report(args.dir, out, scaling=args.scaling)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(text)
    print(f"\nreport written to {out}")
