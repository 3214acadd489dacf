"""How steady the structure report's medians are on real cubes: the spread of the nearest-neighbour median over
cubes, and how often real training cubes miss the generation targets against held-out ones, by sample size.

    OMP_NUM_THREADS=1 python benchmarks/nn_spread.py runs/atoms_s075/train runs/atoms_s075/heldout

Two folders of shards made with the same GridParams (reproduce.py --scale atoms writes them). Each side's first
--n cubes (read_grids, seed 0) are decoded once by the density route; samples of each size are then drawn with
replacement from each side, --draws times, and compared by `structure_targets`. Picks N_STRUCTURES in
reproduce.py (README, "The neighbour distance needs 500 cubes"). ~1 min on one thread.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mofkit  # noqa: E402


def report(shards, n):
    grids, _ = mofkit.read_grids(shards, n, seed=0)
    return mofkit.structure_report(grids, **mofkit.ShardDataset(shards).params.decode_kwargs())


def miss_rates(train, heldout, sizes, draws, seed=0) -> pd.DataFrame:
    """Per sample size: the share of draws in which each target is missed, real training vs held-out cubes."""
    rng = np.random.default_rng(seed)
    rows = []
    for size in sizes:
        missed = []
        for _ in range(draws):
            pick = lambda t: t.iloc[rng.integers(len(t), size=size)].reset_index(drop=True)
            targets = mofkit.structure_targets(pick(train), pick(heldout))
            missed.append(~targets["met"].dropna().astype(bool))
        rows.append(pd.concat(missed, axis=1).mean(axis=1).rename(size))
    return pd.DataFrame(rows).rename_axis("cubes per side")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train", type=Path)
    p.add_argument("heldout", type=Path)
    p.add_argument("--n", type=int, default=500, help="cubes decoded per side")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 500])
    p.add_argument("--draws", type=int, default=2000)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    train, heldout = report(args.train, args.n), report(args.heldout, args.n)
    for name, table in (("training", train), ("held-out", heldout)):
        nn = table.nn_median_A.dropna()
        print(f"{name}: {len(table)} cubes, per-cube nn median percentiles 10/25/50/75/90 (A):",
              np.percentile(nn, [10, 25, 50, 75, 90]).round(3))
        counts = np.histogram(nn, bins=np.arange(0.8, 1.85, 0.1))[0]
        print("  cubes per 0.1 A bin from 0.8 A:", counts.tolist())
    print("\nshare of draws in which real training cubes miss each target against held-out ones:")
    print(miss_rates(train, heldout, args.sizes, args.draws).round(3).to_string())


if __name__ == "__main__":
    main()
