"""The scaling-law fitter recovers a known law (Hoffmann et al.'s fitted L(N, D)) from noisy IsoFLOP losses."""

from __future__ import annotations

import numpy as np
import pytest

from lm_lab.report.scaling import Point, fit_all, isoflop_minimum

E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28


def law(n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray | float:
    return E + A / n**ALPHA + B / d**BETA


def isoflop_grid(noise: float, seed: int = 1) -> list[Point]:
    """4 budgets x 7 sizes from N_opt/8 to 8 N_opt, losses times exp(N(0, noise))."""
    rng = np.random.default_rng(seed)
    points = []
    for c in (1e18, 1e19, 1e20, 1e21):
        ns = np.geomspace(1e6, 1e12, 20001)
        n_opt = ns[np.argmin(law(ns, c / (6 * ns)))]
        for n in n_opt * np.geomspace(1 / 8, 8, 7):
            d = c / (6 * n)
            points.append(Point(c, n, d, float(law(n, d) * np.exp(rng.normal(0, noise)))))
    return points


def test_fits_recover_the_exponents_of_a_known_law() -> None:
    fit = fit_all(isoflop_grid(noise=0.002), resamples=50, parametric_resamples=2)
    a_true = BETA / (ALPHA + BETA)  # N_opt ∝ C^(beta / (alpha + beta)) for this law: 0.4516
    a2, a3 = fit["approach2"], fit["approach3"]
    assert a2["a"]["value"] == pytest.approx(a_true, abs=0.02)
    assert a2["b"]["value"] == pytest.approx(1 - a_true, abs=0.02)
    lo, hi = a2["a"]["ci95"]
    assert lo <= a2["a"]["value"] <= hi and hi - lo < 0.1
    assert a3["alpha"]["value"] == pytest.approx(ALPHA, abs=0.02)
    assert a3["beta"]["value"] == pytest.approx(BETA, abs=0.02)
    assert a3["E"]["value"] == pytest.approx(E, abs=0.03)
    assert a3["a"] == pytest.approx(a_true, abs=0.02)
    assert all(b["inside"] for b in a2["budgets"])


def test_isoflop_parabola_without_a_minimum_says_so() -> None:
    # Loss falling with N over the whole range: a parabola opening downwards has no minimum.
    points = [Point(1e15, n, 1e15 / (6 * n), 3.0 - 0.01 * np.log(n) ** 2) for n in (1e5, 1e6, 1e7)]
    fit = isoflop_minimum(points)
    assert np.isnan(fit["n_opt"])
