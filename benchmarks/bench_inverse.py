"""Atoms from density channels: the real round trip per resolution, metal naming, and the structure report.

    OMP_NUM_THREADS=1 python benchmarks/bench_inverse.py                      # the README tables (~10 min, 1 core)
    OMP_NUM_THREADS=1 python benchmarks/bench_inverse.py --structures 5 --report 3 --gan-steps 0   # quick look
    OMP_NUM_THREADS=1 python benchmarks/bench_inverse.py --structures 0                          # GAN table only

1. GAN: one training step's throughput at 32^3 and 64^3 (48 is no GAN size: the models need 4 * 2^n) with the
   energy channel alone, + DENSITY_CLASSES, + METAL_DENSITY_CLASSES.
2. Round trip: seeded CoRE MOF 2019-ASR structures -> density_channels (METAL_DENSITY_CLASSES, sigma = spacing,
   rounded to float16 as shards store them) -> grid_to_atoms(method="density") -> round_trip_scores against the
   true non-H atoms in the cube, per resolution: the same 32 A cube at 32^3/1.0 A, 48^3/0.667 A, 64^3/0.5 A,
   and a 16 A cube at 32^3/0.5 A. Pooled over structures; "worst" = the lowest structure's figure.
3. Metals: the share of true metal atoms decoded at their place with their own element, for one "metal"
   channel (DENSITY_CLASSES: every metal is written as the stand-in Zn) vs the 4 commonest metals named
   (METAL_DENSITY_CLASSES), at the --report resolution.
4. Structure report (mofkit.structure_report) of real grids (energy + density channels, as a shard holds them)
   decoded the same way, beside the report of the true atoms in the cube: the reference for generated samples.
"""
import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mofkit  # noqa: E402

RESOLUTIONS = {"32^3, 1.0 A (32 A cube)": (32, 1.0), "48^3, 0.667 A (32 A cube)": (48, 32 / 48),
               "64^3, 0.5 A (32 A cube)": (64, 0.5), "32^3, 0.5 A (16 A cube)": (32, 0.5)}


def machine():
    return (f"{platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
            f"{torch.get_num_threads()} torch thread(s)), torch {torch.__version__}")


def seeded_structures(count, seed):
    names = mofkit.coremof_names()
    picked = sorted(np.random.default_rng(seed).choice(len(names), count, replace=False))
    failures = []
    structures = list(mofkit.iter_coremof(names=[names[i] for i in picked], failures=failures))
    return structures, failures


def gan_table(steps, repeats=3):
    """One LSGAN step's throughput (dim 32/64, 64 features, batch 8, one thread) per channel count, best of
    `repeats` rounds that alternate the settings (the machine is shared: the best round is the least disturbed)."""
    settings = [(dim, c) for dim in (32, 64) for c in (1, 1 + len(mofkit.DENSITY_CLASSES),
                                                       1 + len(mofkit.METAL_DENSITY_CLASSES))]
    runs, best = {}, {}
    for dim, c in settings:
        config = mofkit.TrainConfig(dim=dim, channels=64, batch_size=8, grid_channels=c, d_sigmoid=False, device="cpu")
        runs[dim, c] = (mofkit._build_run(config, torch.device("cpu")), torch.rand(8, c, dim, dim, dim))
        mofkit._gan_step(*runs[dim, c])  # warm-up
    for _ in range(repeats):
        for key, (run, real) in runs.items():
            t = time.perf_counter()
            for _ in range(steps):
                mofkit._gan_step(run, real)
            best[key] = max(best.get(key, 0.0), 8 * steps / (time.perf_counter() - t))
    print("\n### GAN training step (LSGAN, 64 features at the bottleneck, batch 8, one thread; best of "
          f"{repeats} x {steps} steps)\n")
    print("| grid | channels | samples/s | vs energy only |")
    print("|---|---|---|---|")
    for dim, c in settings:
        print(f"| {dim}^3 | {c} | {best[dim, c]:.1f} | {best[dim, c] / best[dim, 1]:.2f} |")


def decode(atoms, size, spacing_A, classes):
    dens = mofkit.density_channels(atoms, size, spacing_A, classes=classes).astype(np.float16)  # as shards store
    return mofkit.grid_to_atoms(dens.astype(np.float32), spacing_A, classes=classes)


def close_share(atoms, size, spacing_A):
    """Share of the true non-H atoms in the cube with another non-H atom closer than 0.7 A (disorder in the CIF)."""
    from scipy.spatial import cKDTree
    symbols, positions = mofkit._cube_images(atoms, size, spacing_A, 1e-9)
    heavy = positions[symbols != "H"]
    return float((cKDTree(heavy).query(heavy, k=2)[0][:, 1] < 0.7).mean())


def round_trip_table(structures):
    classes = mofkit.METAL_DENSITY_CLASSES
    low = []
    print(f"\n### Round trip: density channels ({len(classes)}: {', '.join(classes)}; sigma = spacing, float16) "
          f"-> atoms, {len(structures)} CoRE MOF structures\n")
    print("Non-H atoms paired one-to-one within 0.5 A (round_trip_scores); class = the channel's class.\n")
    print("| grid | true atoms | decoded | precision | recall | worst precision | worst recall | class recall "
          "| s / structure |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, (size, spacing) in RESOLUTIONS.items():
        tot = dict(n_true=0, n_decoded=0, recall=0.0, precision=0.0, class_recall=0.0, seconds=0.0,
                   worst_p=1.0, worst_r=1.0)
        for name, atoms in structures:
            t = time.perf_counter()
            s = mofkit.round_trip_scores(decode(atoms, size, spacing, classes), atoms, size, spacing, classes=classes)
            tot["seconds"] += time.perf_counter() - t
            for k in ("n_true", "n_decoded"):
                tot[k] += s[k]
            tot["recall"] += s["recall"] * s["n_true"]
            tot["class_recall"] += s["class_recall"] * s["n_true"]
            tot["precision"] += s["precision"] * s["n_decoded"]
            tot["worst_p"], tot["worst_r"] = min(tot["worst_p"], s["precision"]), min(tot["worst_r"], s["recall"])
            if s["recall"] < 0.95:
                low.append(f"{name} at {label}: recall {s['recall']:.3f}; {close_share(atoms, size, spacing):.0%} "
                           f"of its non-H atoms in the cube have another closer than 0.7 A in the CIF")
        nt, nd = max(1, tot["n_true"]), max(1, tot["n_decoded"])
        print(f"| {label} | {tot['n_true']} | {tot['n_decoded']} | {tot['precision'] / nd:.3f} | "
              f"{tot['recall'] / nt:.3f} | {tot['worst_p']:.3f} | {tot['worst_r']:.3f} | "
              f"{tot['class_recall'] / nt:.3f} | {tot['seconds'] / len(structures):.2f} |",
              flush=True)
    print()
    for line in low:
        print(f"- {line}")


def metal_table(structures, size, spacing):
    print(f"\n### Metals: true metal atoms decoded at their place with their own element ({size}^3, {spacing} A)\n")
    print("| classes | channels | metal atoms | with their element | share |")
    print("|---|---|---|---|---|")
    for label, classes in (("DENSITY_CLASSES (one 'metal' channel)", mofkit.DENSITY_CLASSES),
                           ("METAL_DENSITY_CLASSES (Zn, Cu, Cd, Co + 'metal')", mofkit.METAL_DENSITY_CLASSES)):
        metals = right = 0
        for _, atoms in structures:
            s = mofkit.round_trip_scores(decode(atoms, size, spacing, classes), atoms, size, spacing, classes=classes)
            symbols, positions = mofkit._cube_images(atoms, size, spacing, 1e-9)
            n = sum(sym not in mofkit._NON_METALS for sym in symbols)
            metals += n
            right += 0 if n == 0 else s["metal_element_recall"] * n
        print(f"| {label} | {len(classes)} | {metals} | {right:.0f} | {right / max(1, metals):.3f} |")


def report_table(structures, size, spacing, cutoff_A):
    from ase import Atoms
    classes = mofkit.METAL_DENSITY_CLASSES
    grids, truth, names = [], [], []
    t = time.perf_counter()
    for name, atoms in structures:
        energy = mofkit.voxelize(atoms, size, "cube", spacing, device="cpu")
        dens = mofkit.density_channels(atoms, size, spacing, classes=classes)
        grids.append(np.concatenate([energy[None], dens]).astype(np.float16).astype(np.float32))  # a shard's grid
        symbols, positions = mofkit._cube_images(atoms, size, spacing, 1e-9)
        truth.append(Atoms(symbols, positions, cell=[size * spacing] * 3, pbc=False))
        names.append(name)
    t_vox = time.perf_counter() - t
    grids = np.stack(grids)
    e_scale = mofkit.pick_e_scale(grids)
    t = time.perf_counter()
    cutoff_A = min(size * spacing / 4, 12.8) if cutoff_A is None else cutoff_A
    decoded = mofkit.structure_report(grids, spacing_A=spacing, classes=classes, names=names, cutoff_A=cutoff_A,
                                      e_scale_K=e_scale)
    t_report = time.perf_counter() - t
    true = mofkit.structure_report(truth, grids, names=names, cutoff_A=cutoff_A, e_scale_K=e_scale)
    print(f"\n### Structure report, {len(names)} real grids ({size}^3, {spacing} A; energy clipped to "
          f"[-{e_scale:.0f}, 0] K, E_scale from pick_e_scale)\n")
    print(f"Energy-atoms consistency: probe energy from the atoms with a {cutoff_A} A cutoff (+ uniform tail to "
          f"12.8 A) on the voxels >= {cutoff_A} A inside every face.\n")
    print("| atoms | statistic | " + " | ".join(decoded.columns) + " |")
    print("|---|---|" + "---|" * len(decoded.columns))
    for label, table in (("decoded from the grids", decoded), ("true atoms in the cube", true)):
        for stat in ("median", "min", "max"):
            values = getattr(table, stat)(numeric_only=True)
            print(f"| {label} | {stat} | " + " | ".join(f"{v:.3g}" for v in values) + " |")
    print(f"\nvoxelize + density channels {t_vox / len(names):.1f} s / structure; structure_report "
          f"{t_report / len(names):.2f} s / structure (decoding included)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--structures", type=int, default=30, help="seeded CoRE MOF structures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gan-steps", type=int, default=3, help="GAN steps timed per grid size; 0 skips")
    p.add_argument("--report", type=int, default=20, help="structures in the metal and report tables; 0 skips")
    p.add_argument("--report-size", type=int, default=32)
    p.add_argument("--report-spacing", type=float, default=0.5)
    p.add_argument("--cutoff", type=float, default=None, help="energy-atoms consistency cutoff (A); default: "
                   "structure_report's (a quarter of the cube's edge)")
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"# mofkit inverse benchmark\n\n{datetime.datetime.now():%Y-%m-%d %H:%M}, {machine()}")
    if args.gan_steps:
        gan_table(args.gan_steps)
    if not args.structures:
        return
    structures, failures = seeded_structures(args.structures, args.seed)
    for name, reason in failures:
        print(f"- skipped {name}: {reason}")
    round_trip_table(structures)
    if args.report:
        metal_table(structures[:args.report], args.report_size, args.report_spacing)
        report_table(structures[:args.report], args.report_size, args.report_spacing, args.cutoff)


if __name__ == "__main__":
    main()
