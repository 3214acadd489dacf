"""Convergence of the whole-crystal properties (K_H, Q_st of H2 at 77 K, He void fraction) with grid spacing.

20 CoRE MOF 2019-ASR structures drawn with a fixed seed (14 with every cell length <= 32 A, 6 with one > 32 A),
each on cell grids at several spacings; the reference is the finest. Also the 64^3 x 0.5 A cube window's K_H and
the CoRE table's AV_VF. Writes benchmarks/results_iso/cell_convergence.csv.

    OMP_NUM_THREADS=1 python3 benchmarks/cell_convergence.py
"""
import sys
import time
import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mofkit  # noqa: E402

SPACINGS_A = (0.8, 0.6, 0.5, 0.4, 0.3, 0.2)


def pick(n_small=14, n_large=6, seed=0, max_atoms=600, max_length_A=50.0):
    names = mofkit.coremof_names()
    draw = list(np.random.default_rng(seed).permutation(names)[:400])
    small, large = [], []
    for name, atoms in mofkit.iter_coremof(names=draw):
        lengths = atoms.cell.lengths()
        if len(atoms) > max_atoms or lengths.max() > max_length_A:
            continue
        (large if lengths.max() > 32 else small).append((name, atoms))
    return small[:n_small] + large[:n_large]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).with_name("results_iso") / "cell_convergence.csv"))
    ap.add_argument("--summary-only", action="store_true", help="summarise an existing --out file")
    args = ap.parse_args()
    if args.summary_only:
        return summarize(pd.read_csv(args.out))
    torch.set_num_threads(1)
    rows = []
    for name, atoms in pick():
        rho, T = mofkit.framework_density(atoms), mofkit.PROBE_TEMPERATURE_K["H2"]
        window = mofkit.voxelize(atoms, 64, "cube", 0.5, device="cpu")
        win = mofkit.window_properties(window, rho, T, name=name)
        for s in SPACINGS_A:
            t0 = time.time()
            grid = mofkit.voxelize_cell(atoms, s, "H2", device="cpu")
            log_kh, qst = mofkit._properties(grid, rho, T, 5000.0, name)
            vf = mofkit.void_fraction_He(atoms, s, device="cpu")
            rows.append({"name": name, "n_atoms": len(atoms), "max_cell_A": float(atoms.cell.lengths().max()),
                         "spacing_A": s, "points": grid.size, "log10_KH_mol_kg_Pa": log_kh, "Qst_kJ_mol": qst,
                         "void_fraction_He": vf, **win, "seconds": time.time() - t0})
            print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(exist_ok=True)
    df.to_csv(args.out, index=False)
    summarize(df)


def summarize(df):
    ref = df[df.spacing_A == df.spacing_A.min()].set_index("name")
    out = []
    for s, g in df.groupby("spacing_A"):
        g = g.set_index("name")
        kh = np.abs(10 ** (g.log10_KH_mol_kg_Pa - ref.log10_KH_mol_kg_Pa) - 1)
        q = np.abs(g.Qst_kJ_mol / ref.Qst_kJ_mol - 1)
        vf = np.abs(g.void_fraction_He / ref.void_fraction_He - 1)
        out.append({"spacing_A": s, "max_rel_err_KH": kh.max(), "max_rel_err_Qst": q.max(),
                    "max_rel_err_VF": vf.max(), "median_seconds": g.seconds.median()})
    print(pd.DataFrame(out).to_string(index=False))
    w = 10 ** (ref.window_log10_KH_mol_kg_Pa - ref.log10_KH_mol_kg_Pa)
    print("window/cell K_H: median", w.median(), "range", w.min(), w.max())
    # He void fraction (at 0.3 A) vs CoRE MOF 2019's own AV_VF (Zeo++, geometric)
    from scipy.stats import spearmanr
    j = df[df.spacing_A == 0.3].set_index("name").join(mofkit.coremof_properties()[["AV_VF", "LCD"]])
    r = j.void_fraction_He / j.AV_VF
    print(f"void_fraction_He / AV_VF: median {r.median():.3f}, Spearman "
          f"{spearmanr(j.void_fraction_He, j.AV_VF).statistic:.3f}")
    for label, part in (("LCD >= 5.5 A", r[j.LCD >= 5.5]), ("LCD < 5.5 A", r[j.LCD < 5.5])):
        print(f"  {label}: {len(part)} structures, {part.min():.2f}-{part.max():.2f}, median {part.median():.2f}")


if __name__ == "__main__":
    main()
