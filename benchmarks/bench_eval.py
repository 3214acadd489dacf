"""Evaluation benchmarks: 1-NN two-sample accuracy timing and the grid -> atoms round trip.

    python benchmarks/bench_eval.py                       # both tables on CPU (small 1-NN sizes, 50 structures)
    python benchmarks/bench_eval.py --device cuda --nn-sizes 500 1000 2000 --structures 0   # the GPU 1-NN claim
    python benchmarks/bench_eval.py --nn-sizes 0 --structures 10                            # a quick round trip

1-NN: leave-one-out accuracy over n real + n generated random 64^3 float32 grids (features="raw"), timed
end to end; the "2,000 + 2,000" row on CPU is extrapolated as time x (2000/n)^2 from the largest n measured.
For comparison, scikit-learn's brute-force NearestNeighbors (n_neighbors=2, self excluded: the same
answer as KNeighborsClassifier(n_neighbors=1) under LeaveOneOut, which refits n times and is far slower)
is timed at the smallest n, on CPU.

Round trip: CoRE MOF 2019-ASR structures (evenly spaced through the name list) -> cube grids (64^3,
0.5 A) -> atoms, scored by mofkit.round_trip_scores against the true non-H atoms in the cube: the density
route (density_channels -> grid_to_atoms(method="density")) on all of them and the study's clustering route
on the H2 energy grid (voxelize -> grid_to_atoms(method="cluster")) at two core thresholds on the first
--cluster-structures (k-means with hundreds of clusters per grid is slow on CPU).
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


def machine(device):
    cpu = platform.processor() or platform.machine()
    gpu = f", GPU {torch.cuda.get_device_name()}" if device.startswith("cuda") else ""
    return f"{platform.node()} ({cpu}, {os.cpu_count()} CPU cores{gpu}), torch {torch.__version__}"


def bench_one_nn(sizes, device, size=64):
    print(f"\n### 1-NN leave-one-out accuracy, n real + n generated {size}^3 float32 grids, device={device}\n")
    print("| n + n | features | seconds | accuracy | note |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    last = None
    for n in sizes:
        real = rng.standard_normal((n, size, size, size), dtype=np.float32)
        gen = rng.standard_normal((n, size, size, size), dtype=np.float32)
        if device.startswith("cuda"):  # resident on the GPU, as a notebook holding 2 x 2,000 grids would have them
            real, gen = torch.from_numpy(real).to(device), torch.from_numpy(gen).to(device)
            mofkit.one_nn_accuracy(real[:8], gen[:8], device=device)  # CUDA context and kernels warm
            torch.cuda.synchronize()
        t = time.perf_counter()
        acc = mofkit.one_nn_accuracy(real, gen, device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        last = (n, time.perf_counter() - t)
        print(f"| {n} + {n} | raw | {last[1]:.2f} | {acc:.3f} | mofkit, measured |")
        if n == sizes[0]:  # scikit-learn brute force, self excluded: the same leave-one-out answer
            from sklearn.neighbors import NearestNeighbors
            X = np.concatenate([np.asarray(x.cpu() if torch.is_tensor(x) else x).reshape(n, -1) for x in (real, gen)])
            y = np.repeat([0, 1], n)
            t = time.perf_counter()
            _, idx = NearestNeighbors(n_neighbors=2, algorithm="brute").fit(X).kneighbors(X)
            nearest = np.where(idx[:, 0] == np.arange(2 * n), idx[:, 1], idx[:, 0])
            print(f"| {n} + {n} | raw | {time.perf_counter() - t:.2f} | {(y[nearest] == y).mean():.3f} | "
                  f"scikit-learn NearestNeighbors brute force, CPU |")
        del real, gen
    if last and last[0] < 2000:
        print(f"| 2000 + 2000 | raw | ~{last[1] * (2000 / last[0]) ** 2:.0f} | | extrapolated (x (2000/{last[0]})^2) |")


def bench_round_trip(count, cluster_count, device, size=64, spacing_A=0.5):
    names = mofkit.coremof_names()
    picked = names[:: max(1, len(names) // count)][:count]
    failures = []
    routes = {"density (6 channels, peaks)": None, "cluster, E >= 0 K (study's scaling)": 0.0,
              "cluster, E >= 4999 K (at the cap)": 4999.0}
    totals = {r: {"structures": 0, "n_true": 0, "n_decoded": 0, "recall": 0.0, "precision": 0.0,
                  "class_recall": 0.0, "class_precision": 0.0, "seconds": 0.0,
                  "worst_recall": 1.0} for r in routes}
    done, t_vox = 0, 0.0
    for name, atoms in mofkit.iter_coremof(names=picked, failures=failures):
        energy = None
        if done < cluster_count:  # the clustering route needs the energy grid and is slow: fewer structures
            t = time.perf_counter()
            energy = mofkit.voxelize(atoms, size, "cube", spacing_A, device=device)
            t_vox += time.perf_counter() - t
        for route, threshold in routes.items():
            if threshold is not None and energy is None:
                continue
            t = time.perf_counter()
            if threshold is None:
                decoded = mofkit.grid_to_atoms(mofkit.density_channels(atoms, size, spacing_A), spacing_A)
            else:
                decoded = mofkit.grid_to_atoms(energy, spacing_A, method="cluster", threshold=threshold)
            s = mofkit.round_trip_scores(decoded, atoms, size, spacing_A)
            tot = totals[route]
            tot["seconds"] += time.perf_counter() - t
            tot["structures"] += 1
            tot["n_true"] += s["n_true"]
            tot["n_decoded"] += s["n_decoded"]
            tot["worst_recall"] = min(tot["worst_recall"], s["recall"])
            for k in ("recall", "class_recall"):
                tot[k] += s[k] * s["n_true"]
            for k in ("precision", "class_precision"):
                tot[k] += s[k] * s["n_decoded"]
        done += 1
        print(f"  {done}/{len(picked)} {name}", file=sys.stderr, flush=True)
    print(f"\n### Round trip structure -> {size}^3 cube grid ({spacing_A} A) -> atoms, CoRE MOF 2019-ASR "
          f"({done} structures loaded, {len(failures)} skipped)\n")
    print("Non-H atoms matched one-to-one within 0.5 A, pooled over structures; class = metal/C/N/O/other.\n")
    print("| route | structures | true atoms | decoded | precision | recall | worst recall | class precision "
          "| class recall | s / structure |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for route, tot in totals.items():
        nt, nd, ns = max(1, tot["n_true"]), max(1, tot["n_decoded"]), max(1, tot["structures"])
        print(f"| {route} | {tot['structures']} | {tot['n_true']} | {tot['n_decoded']} | "
              f"{tot['precision'] / nd:.3f} | {tot['recall'] / nt:.3f} | {tot['worst_recall']:.3f} | "
              f"{tot['class_precision'] / nd:.3f} | {tot['class_recall'] / nt:.3f} | "
              f"{tot['seconds'] / ns:.1f} |")
    print(f"\nvoxelize (H2, cube frame) on {device}: {t_vox / max(1, min(done, cluster_count)):.1f} s / structure")
    for name, reason in failures:
        print(f"- skipped {name}: {reason}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--nn-sizes", type=int, nargs="+", default=[50, 100, 200], help="n per class; 0 skips")
    p.add_argument("--structures", type=int, default=50, help="round-trip structures; 0 skips")
    p.add_argument("--cluster-structures", type=int, default=10, help="of those, how many also take the "
                   "(slow) clustering route")
    args = p.parse_args()
    print(f"# mofkit evaluation benchmark\n\n{datetime.datetime.now():%Y-%m-%d %H:%M}, {machine(args.device)}")
    sizes = [n for n in args.nn_sizes if n > 0]
    if sizes:
        bench_one_nn(sizes, args.device)
    if args.structures > 0:
        bench_round_trip(args.structures, args.cluster_structures, args.device)


if __name__ == "__main__":
    main()
