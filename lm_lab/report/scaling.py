"""Scaling laws from an IsoFLOP study (Hoffmann et al. 2022, "Training Compute-Optimal LLMs").

* Approach 2: for each budget C, a parabola of the final validation loss in ln N; its minimum is
  N_opt(C), and D_opt = C / (6 N_opt). Then N_opt = k C^a and D_opt = k' C^b by least squares in
  log-log (with D = C / 6N, a + b = 1 exactly).
* Approach 3: L(N, D) = E + A / N^alpha + B / D^beta, fitted by minimising the Huber loss
  (delta = 1e-3) between log L and log of the prediction, written as
  LSE(a - alpha ln N, b - beta ln D, e) with A = e^a, B = e^b, E = e^e, with L-BFGS. The paper
  starts L-BFGS from every point of a grid (alpha, beta in 0..2 step 0.5, e in -1..1 step 0.5,
  a, b in 0..25 step 5: 4,500 starts); here the objective is evaluated on that whole grid and
  L-BFGS starts from its 10 best points only (one L-BFGS run per start, not 4,500).
* Confidence intervals: 95% percentile bootstrap over runs. For approach 2 the runs of each budget
  are resampled with replacement (resamples with fewer than 3 distinct sizes in a budget, or
  with a parabola that opens downwards, are dropped and counted); for approach 3 all runs are
  resampled together and each refit starts from the full fit and the 2 best grid points.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lm_lab.report import ReportError
from lm_lab.report.runs import Run

HUBER_DELTA = 1e-3
# Hoffmann et al. (2022), Table 2 (a, b by approach) and section 3.3 (the fitted L(N, D)).
PUBLISHED = {
    "approach 1": {"a": 0.50, "b": 0.50},
    "approach 2": {"a": 0.49, "b": 0.51},
    "approach 3": {"a": 0.46, "b": 0.54, "E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28},
}


@dataclass(frozen=True)
class Point:
    budget: float  # C, the run's planned FLOPs budget (its group)
    n: float  # parameters
    d: float  # training tokens
    loss: float  # final validation loss


# ---------------------------------------------------------------------- approach 2: IsoFLOP parabolas


def isoflop_minimum(points: list[Point]) -> dict[str, float]:
    """The parabola in ln N through one budget's runs, and its minimum (N_opt, D_opt, loss there)."""
    x = np.log([p.n for p in points])
    y = np.array([p.loss for p in points])
    if len(set(x.tolist())) < 3:
        raise ValueError("a parabola needs runs of at least 3 model sizes")
    c2, c1, c0 = np.polyfit(x, y, 2)
    if c2 <= 0:
        return {"c2": c2, "c1": c1, "c0": c0, "n_opt": math.nan, "d_opt": math.nan, "loss_opt": math.nan}
    x_opt = -c1 / (2 * c2)
    n_opt = math.exp(x_opt)
    budget = points[0].budget
    return {
        "c2": float(c2),
        "c1": float(c1),
        "c0": float(c0),
        "n_opt": n_opt,
        "d_opt": budget / (6 * n_opt),
        "loss_opt": float(c0 - c1**2 / (4 * c2)),
        "inside": bool(x.min() <= x_opt <= x.max()),  # False: the minimum is extrapolated
    }


def power_law(c: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(exponent, coefficient) of y = coefficient * c^exponent, least squares in log-log."""
    slope, intercept = np.polyfit(np.log(c), np.log(y), 1)
    return float(slope), float(math.exp(intercept))


def approach2(points: list[Point]) -> dict[str, Any]:
    budgets = sorted({p.budget for p in points})
    per = {c: isoflop_minimum([p for p in points if p.budget == c]) for c in budgets}
    # Only minima inside the sizes that were run: an extrapolated one says "smaller (or larger) than
    # every size here", not where the optimum is.
    good = [c for c in budgets if math.isfinite(per[c]["n_opt"]) and per[c]["inside"]]
    if len(good) < 2:  # the power laws need two minima; the parabolas are still reported
        return {"budgets": per, "a": None, "k_n": None, "b": None, "k_d": None}
    a, ka = power_law(np.array(good), np.array([per[c]["n_opt"] for c in good]))
    b, kb = power_law(np.array(good), np.array([per[c]["d_opt"] for c in good]))
    return {"budgets": per, "a": a, "k_n": ka, "b": b, "k_d": kb}


# ---------------------------------------------------------------------- approach 3: parametric L(N, D)


def _objective(theta: np.ndarray, ln_n: np.ndarray, ln_d: np.ndarray, ln_l: np.ndarray) -> tuple[float, np.ndarray]:
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * ln_n, b - beta * ln_d, np.full_like(ln_n, e)])  # (3, runs)
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    lse = top + np.log(total)
    weights /= total  # d lse / d terms
    r = lse - ln_l
    huber = np.where(np.abs(r) <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA))
    dr = np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # huber'(r)
    grad = np.array(
        [
            (dr * weights[0]).sum(),
            (dr * weights[1]).sum(),
            (dr * weights[2]).sum(),
            (dr * weights[0] * -ln_n).sum(),
            (dr * weights[1] * -ln_d).sum(),
        ]
    )
    return float(huber.sum()), grad


def _grid() -> np.ndarray:
    alphas = np.arange(0.0, 2.01, 0.5)
    es = np.arange(-1.0, 1.01, 0.5)
    abs_ = np.arange(0.0, 25.1, 5.0)
    return np.array([(a, b, e, al, be) for a, b, e, al, be in itertools.product(abs_, abs_, es, alphas, alphas)])


def _grid_values(grid: np.ndarray, ln_n: np.ndarray, ln_d: np.ndarray, ln_l: np.ndarray) -> np.ndarray:
    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))  # (starts, 1) against (runs,)
    lse = np.logaddexp(np.logaddexp(a - alpha * ln_n, b - beta * ln_d), e)
    r = np.abs(lse - ln_l)
    return np.where(r <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (r - 0.5 * HUBER_DELTA)).sum(axis=1)


def fit_parametric(
    n: np.ndarray, d: np.ndarray, loss: np.ndarray, starts: int = 10, extra: list[np.ndarray] | None = None
) -> dict[str, float]:
    """E, A, B, alpha, beta of L(N, D) = E + A/N^alpha + B/D^beta (Huber on log-loss, L-BFGS)."""
    from scipy.optimize import minimize

    ln_n, ln_d, ln_l = np.log(n), np.log(d), np.log(loss)
    grid = _grid()
    order = np.argsort(_grid_values(grid, ln_n, ln_d, ln_l))[:starts]
    inits = [grid[i] for i in order] + list(extra or [])
    best = None
    for x0 in inits:
        res = minimize(_objective, x0, args=(ln_n, ln_d, ln_l), jac=True, method="L-BFGS-B")
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = best.x
    return {
        "E": math.exp(e),
        "A": math.exp(a),
        "B": math.exp(b),
        "alpha": float(alpha),
        "beta": float(beta),
        "huber": float(best.fun),
        "_theta": best.x,
    }


# ---------------------------------------------------------------------- bootstrap and the whole fit


def fit_all(points: list[Point], resamples: int = 200, parametric_resamples: int = 50, seed: int = 0) -> dict[str, Any]:
    """Both approaches with 95% bootstrap intervals (see the module docstring)."""
    rng = np.random.default_rng(seed)
    a2 = approach2(points)
    n, d, loss = (np.array([getattr(p, k) for p in points]) for k in ("n", "d", "loss"))
    a3 = fit_parametric(n, d, loss)
    # With the fitted law, the compute-optimal N grows as C^(beta / (alpha + beta)).
    a3_a = a3["beta"] / (a3["alpha"] + a3["beta"])

    budgets = sorted({p.budget for p in points})
    by_budget = {c: [p for p in points if p.budget == c] for c in budgets}
    samples2: dict[str, list[float]] = {"a": [], "b": []}
    dropped2 = 0
    for _ in range(resamples):
        sample = [by_budget[c][i] for c in budgets for i in rng.integers(0, len(by_budget[c]), len(by_budget[c]))]
        if a2["a"] is None:
            break
        try:
            fit = approach2(sample)
        except (ValueError, np.linalg.LinAlgError):
            dropped2 += 1
            continue
        if fit["a"] is None:
            dropped2 += 1
            continue
        samples2["a"].append(fit["a"])
        samples2["b"].append(fit["b"])
    samples3: dict[str, list[float]] = {k: [] for k in ("E", "A", "B", "alpha", "beta")}
    for _ in range(parametric_resamples):
        idx = rng.integers(0, len(points), len(points))
        fit = fit_parametric(n[idx], d[idx], loss[idx], starts=2, extra=[a3["_theta"]])
        for k in samples3:
            samples3[k].append(fit[k])

    def ci(values: list[float]) -> list[float] | None:
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else None

    return {
        "runs": len(points),
        "approach2": {
            # None: fewer than 2 budgets have a minimum inside the sizes run
            "a": {"value": a2["a"], "ci95": ci(samples2["a"])} if a2["a"] is not None else None,
            "b": {"value": a2["b"], "ci95": ci(samples2["b"])} if a2["b"] is not None else None,
            "k_n": a2["k_n"],
            "k_d": a2["k_d"],
            "budgets": [
                {"C": c, "sizes": len({p.n for p in by_budget[c]}), **{k: v for k, v in a2["budgets"][c].items()}}
                for c in budgets
            ],
            "bootstrap": {"resamples": resamples, "kept": len(samples2["a"]), "dropped": dropped2},
        },
        "approach3": {
            **{k: {"value": a3[k], "ci95": ci(samples3[k])} for k in ("E", "A", "B", "alpha", "beta")},
            "a": a3_a,
            "b": 1 - a3_a,
            "huber": a3["huber"],
            "bootstrap": {"resamples": parametric_resamples},
        },
        "published": PUBLISHED,
    }


def points_of(runs: list[Run], metric: str) -> list[Point]:
    points = []
    for run in runs:
        loss = run.last(metric)
        if run.scaling is None or run.status != "finished" or loss is None:
            continue
        s = run.scaling
        points.append(Point(budget=float(s["budget"]), n=float(s["n_params"]), d=float(s["tokens"]), loss=loss))
    return points


def write_scaling(runs: list[Run], out: Path, metric: str, resamples: int = 200, parametric_resamples: int = 50) -> str:
    """Fit, write ``scaling_fit.json``, ``scaling_fit.md``, ``isoflops.png``, ``optimal_n_d.png``; return the summary."""
    points = points_of(runs, metric)
    if not points:
        raise ReportError(
            "--scaling: no finished run here has a scaling.json (written by experiment=scaling_cpu / scaling_gpu)"
        )
    budgets = sorted({p.budget for p in points})
    thin = [c for c in budgets if len({p.n for p in points if p.budget == c}) < 3]
    if len(budgets) - len(thin) < 2:
        raise ReportError(
            f"--scaling: {len(budgets)} budget(s) with finished runs, {len(thin)} of them with fewer than 3 model "
            "sizes: a fit needs at least 2 budgets of at least 3 sizes each (finish or rerun the sweep)"
        )
    points = [p for p in points if p.budget not in thin]
    try:
        fit = fit_all(points, resamples=resamples, parametric_resamples=parametric_resamples)
    except ValueError as e:
        raise ReportError(f"--scaling: {e}") from None
    _plots(points, fit, out)
    (out / "scaling_fit.json").write_text(json.dumps(fit, indent=1) + "\n", encoding="utf-8")
    summary = _markdown(fit, metric, thin)
    (out / "scaling_fit.md").write_text(summary + "\n", encoding="utf-8")
    return summary


def _fmt(entry: dict[str, Any]) -> str:
    ci = entry.get("ci95")
    return f"{entry['value']:.3g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")


def _markdown(fit: dict[str, Any], metric: str, thin: list[float]) -> str:
    a2, a3 = fit["approach2"], fit["approach3"]
    lines = [
        f"# Scaling fit ({fit['runs']} runs, final {metric})",
        "",
        "| C (FLOPs) | sizes | N_opt | D_opt | loss at N_opt | minimum inside the sizes run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for b in a2["budgets"]:
        lines.append(
            f"| {b['C']:.3g} | {b['sizes']} | {b['n_opt']:.3g} | {b['d_opt']:.3g} | {b['loss_opt']:.4f} | "
            f"{'yes' if b.get('inside') else 'no (extrapolated)'} |"
            if math.isfinite(b["n_opt"])
            else f"| {b['C']:.3g} | {b['sizes']} | no minimum (parabola opens downwards) | | | |"
        )
    boot = a2["bootstrap"]
    lines += [
        "",
        "Approach 2 (IsoFLOP parabolas"
        + (
            f"; 95% CI: bootstrap over runs within each budget, {boot['kept']} of {boot['resamples']} resamples usable):"
            if a2["a"]
            else "):"
        ),
        f"- N_opt ∝ C^a: a = {_fmt(a2['a'])} (Hoffmann et al. 2022: 0.49)"
        if a2["a"]
        else "- no power law: fewer than 2 budgets have a loss minimum inside the sizes run (add sizes or budgets)",
        f"- D_opt ∝ C^b: b = {_fmt(a2['b'])} (Hoffmann et al. 2022: 0.51)" if a2["b"] else "",
        "",
        f"Approach 3 (L(N, D) = E + A/N^alpha + B/D^beta, Huber delta={HUBER_DELTA} on log-loss, L-BFGS; "
        f"95% CI: bootstrap over runs, {a3['bootstrap']['resamples']} resamples):",
        f"- E = {_fmt(a3['E'])}, A = {_fmt(a3['A'])}, B = {_fmt(a3['B'])}",
        f"- alpha = {_fmt(a3['alpha'])}, beta = {_fmt(a3['beta'])} (Hoffmann et al.: 0.34, 0.28)",
        f"- implied a = beta/(alpha+beta) = {a3['a']:.3g}, b = {a3['b']:.3g} (Hoffmann et al.: 0.46, 0.54)",
    ]
    if thin:
        lines += ["", f"Left out: budget(s) {', '.join(f'{c:.3g}' for c in thin)} (fewer than 3 finished sizes)."]
    return "\n".join(lines)


def _plots(points: list[Point], fit: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = fit["approach2"]["budgets"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, b in enumerate(budgets):
        color = f"C{i}"
        pts = sorted((p.n, p.loss) for p in points if p.budget == b["C"])
        ax.scatter([n for n, _ in pts], [y for _, y in pts], color=color, label=f"C = {b['C']:.2g}")
        x = np.linspace(math.log(pts[0][0]) - 0.3, math.log(pts[-1][0]) + 0.3, 100)
        ax.plot(np.exp(x), b["c2"] * x**2 + b["c1"] * x + b["c0"], color=color, alpha=0.6)
        if math.isfinite(b["n_opt"]) and b.get("inside"):  # an extrapolated minimum is not drawn
            ax.scatter([b["n_opt"]], [b["loss_opt"]], color=color, marker="*", s=150, edgecolor="k")
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("final validation loss")
    ax.set_title("IsoFLOP curves (star: the fitted minimum, when inside the sizes run)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "isoflops.png", dpi=110)
    plt.close(fig)

    good = [b for b in budgets if math.isfinite(b["n_opt"]) and b["inside"]]
    if fit["approach2"]["a"] is None:
        return
    c = np.array([b["C"] for b in good])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    a2 = fit["approach2"]
    for ax, key, exp_key, k_key, name in (
        (axes[0], "n_opt", "a", "k_n", "N_opt"),
        (axes[1], "d_opt", "b", "k_d", "D_opt"),
    ):
        ax.scatter(c, [b[key] for b in good], color="C0", zorder=3)
        line = np.geomspace(c.min() / 2, c.max() * 2, 50)
        ax.plot(
            line, a2[k_key] * line ** a2[exp_key]["value"], color="C1", label=f"{name} ∝ C^{a2[exp_key]['value']:.2f}"
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("compute C (FLOPs)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "optimal_n_d.png", dpi=110)
    plt.close(fig)
