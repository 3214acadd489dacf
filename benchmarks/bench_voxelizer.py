"""Voxelizer speed: seconds per 64^3 grid on CPU, grids/s on GPU, against the study's per-point Python loop.

    python benchmarks/bench_voxelizer.py                 # CPU (all cores torch sees)
    python benchmarks/bench_voxelizer.py --device cuda   # GPU grids/s
    python benchmarks/bench_voxelizer.py --threads 1     # one core, like GRIDAY's single thread

20 fixed CoRE MOF 2019-ASR structures of mixed sizes and cell shapes. The peer figure, GRIDAY (MOFTransformer's
C++ tool, one thread, 64^3 cell-frame CH4 grid of a CoRE MOF), is 1.8-4.4 s on these 2-core machines.
"""
import argparse
import datetime
import math
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mofkit  # noqa: E402

STRUCTURES = [
    "ABAVIJ_clean", "ABAYIO_clean", "ABEFUL_clean", "ABETIN_clean", "ABEXEN_clean", "ABIXOZ_clean",
    "ABIYIV_clean", "ABULOB_clean", "ABUWOJ_clean", "ACAJIY_clean", "ACAJIZ_clean", "ACAKUM_clean",
    "ACECIV_ion_b", "ACIBIY_clean", "ACIBOE_clean", "ACOCOM_clean", "ACOLEL_clean", "ACUBAB_clean",
    "ACUFEK_clean", "ACUJOZ_manual",
]


def study_loop_energy(atoms, point, probe="CH4", cutoff_A=12.8):
    """The study's approach: a pure-Python loop over atoms and the 27 neighbouring cells for one grid point."""
    eps_p, sig_p = mofkit.PROBES[probe]
    cell = atoms.cell.array.tolist()
    total = 0.0
    for sym, (x, y, z) in zip(atoms.get_chemical_symbols(), atoms.get_positions().tolist()):
        eps = math.sqrt(mofkit.UFF[sym][0] * eps_p)
        sig = (mofkit.UFF[sym][1] + sig_p) / 2
        for i in (-1, 0, 1):
            for j in (-1, 0, 1):
                for k in (-1, 0, 1):
                    dx = x + i * cell[0][0] + j * cell[1][0] + k * cell[2][0] - point[0]
                    dy = y + i * cell[0][1] + j * cell[1][1] + k * cell[2][1] - point[1]
                    dz = z + i * cell[0][2] + j * cell[1][2] + k * cell[2][2] - point[2]
                    r = math.sqrt(dx * dx + dy * dy + dz * dz)
                    if r < cutoff_A:
                        sr6 = (sig / r) ** 6
                        total += 4 * eps * (sr6 * sr6 - sr6)
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--study-points", type=int, default=20, help="grid points timed with the study's loop per structure")
    ap.add_argument("--structures", type=int, default=len(STRUCTURES))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = STRUCTURES[: args.structures]
    structures = dict(mofkit.iter_coremof(names=names))
    mofkit.voxelize(structures[names[0]], size=16, device=device)  # warm-up (allocations, CUDA context)

    rows = []
    for name in names:
        atoms = structures[name]
        timings = {}
        for label, kw in [("cell CH4", dict(frame="cell", probe="CH4")), ("cube H2", dict(frame="cube", probe="H2"))]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            mofkit.voxelize(atoms, size=args.size, device=device, **kw)
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings[label] = time.perf_counter() - t
        pts = mofkit.grid_points(atoms, args.size, "cell").reshape(-1, 3)
        sample = pts[np.random.default_rng(0).choice(len(pts), args.study_points, replace=False)]
        t = time.perf_counter()
        for p in sample:
            study_loop_energy(atoms, p)
        study_s = (time.perf_counter() - t) / args.study_points * len(pts)
        rows.append((name, len(atoms), "%.1f %.1f %.1f / %.0f %.0f %.0f" % tuple(atoms.cell.cellpar()),
                     timings["cell CH4"], timings["cube H2"], study_s))
        print(f"  {name}: {timings['cell CH4']:.2f} s cell CH4, {timings['cube H2']:.2f} s cube H2", file=sys.stderr)

    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    print(f"\n### Voxelizer, {args.size}^3 grids — {dev}, {datetime.date.today()}, torch {torch.__version__}\n")
    print("| structure | atoms | cell (A / deg) | mofkit cell-frame CH4 (s) | mofkit cube-frame H2 (s) | study's Python loop (s, extrapolated) |")
    print("|---|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.0f} |")
    med = [statistics.median(r[i] for r in rows) for i in (3, 4, 5)]
    print(f"| **median** | | | **{med[0]:.2f}** | **{med[1]:.2f}** | **{med[2]:.0f}** ({med[2] / 3600:.2f} h) |")
    if device.type == "cuda":
        # what build_shards does on a GPU: many structures share padded batches (voxelize_many)
        batch = [structures[n] for n in names]
        torch.cuda.synchronize()
        t = time.perf_counter()
        mofkit.voxelize_many(batch, size=args.size, device=device)
        torch.cuda.synchronize()
        print(f"\nGPU throughput: {1 / med[0]:.0f} cell-frame grids/s, {1 / med[1]:.0f} cube-frame grids/s one at a time "
              f"(median structure); {len(batch) / (time.perf_counter() - t):.0f} cube-frame grids/s batched over "
              f"{len(batch)} structures; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"\nSpeed-up over the study's loop (median): {med[2] / med[0]:.0f}x. Peer: GRIDAY 1.8-4.4 s per cell-frame CH4 grid "
          f"(one thread). Peak host RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB.")


if __name__ == "__main__":
    main()
