"""Isotherm fitting and grid-isotherm estimate throughput (CPU, numpy/scipy).

    python benchmarks/bench_isotherms.py [--grids 5] [--isotherms 200]

Prints a markdown table with the machine and date. The fits are compared, in the same run, with the
study's way of fitting (scipy curve_fit, default tolerances, Sips with K fixed at 2.5) on the same data.
"""
import argparse
import os
import platform
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mofkit  # noqa: E402


def timed(fn, repeat):
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grids", type=int, default=5, help="64^3 grids to estimate isotherms for")
    ap.add_argument("--isotherms", type=int, default=200, help="synthetic 12-point isotherms to fit")
    args = ap.parse_args()
    from scipy.optimize import curve_fit
    import pandas as pd

    rng = np.random.default_rng(0)
    P = np.geomspace(0.017, 1.0, 12)
    curves = [mofkit._sips(P, 16.5, 2.5, 1.33) * (1 + 0.02 * rng.standard_normal(12)) for _ in range(args.isotherms)]
    table = pd.DataFrame({"pressure_bar": [P.tolist()] * len(curves), "adsorption_mmol_g": [c.tolist() for c in curves],
                          "note": ""})
    rows = []
    for model, kw in (("sips", {"fix_K": 2.5}), ("sips", {}), ("freundlich", {}), ("langmuir", {})):
        t = timed(lambda: mofkit.fit_isotherm_table(table, model, progress=False, **kw), 1) / len(curves)
        rows.append((f"fit_isotherm_table {model} {kw or ''}".strip(), f"{t * 1e3:.2f} ms/isotherm"))

    def study_fit():  # the study's procedure: curve_fit on g_inf, n with K = 2.5, default tolerances
        for c in curves:
            curve_fit(lambda P, g, n: mofkit._sips(P, g, 2.5, n), P, c, p0=(10.0, 1.0))
    rows.append(("study: curve_fit Sips K=2.5 (default tol)", f"{timed(study_fit, 1) / len(curves) * 1e3:.2f} ms/isotherm"))

    grid = rng.uniform(-1200.0, 3000.0, (64, 64, 64)).astype(np.float32)
    grid[rng.random(grid.shape) < 0.4] = 5000.0
    pressures = np.geomspace(0.01, 100.0, 30)
    start = time.perf_counter()
    import CoolProp.CoolProp  # noqa: F401  (imported once, on the first grid_isotherm call)
    rows.append(("import CoolProp (once per process)", f"{(time.perf_counter() - start) * 1e3:.0f} ms"))
    t = timed(lambda: mofkit.grid_isotherm(grid, 77.0, pressures, density_kg_m3=900.0), args.grids)
    rows.append(("grid_isotherm (LDA, CoolProp) 64^3, 30 pressures", f"{t * 1e3:.0f} ms/grid"))
    t = timed(lambda: mofkit.lattice_gas_isotherm(grid, 77.0, pressures, density_kg_m3=900.0), args.grids)
    rows.append(("lattice_gas_isotherm 64^3, 30 pressures", f"{t * 1e3:.0f} ms/grid"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = timed(lambda: mofkit.grid_freundlich(grid, 77.0, density_kg_m3=900.0), args.grids)
    rows.append(("grid_freundlich 64^3, 12 pressures + fit", f"{t * 1e3:.0f} ms/grid"))

    print(f"Isotherms benchmark — {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, {date.today()}\n")
    print("| what | time |\n|---|---|")
    for what, value in rows:
        print(f"| {what} | {value} |")


if __name__ == "__main__":
    main()
