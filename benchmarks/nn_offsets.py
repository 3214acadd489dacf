"""Which voxel sub-lattices decoded atoms sit on: nearest-neighbour offsets in voxels, by parity.

    OMP_NUM_THREADS=1 python3 benchmarks/nn_offsets.py HELDOUT_SHARDS real CHECKPOINT_OR_GENERATOR...

16 cubes each (held-out: the shards' first by `read_grids(seed=0)`; generated: `sample(seed=2000)`), decoded by the
density route with the shards' own settings. For every atom >= 3 A inside its cube, the offset to its nearest
neighbour is rounded to whole voxels and classed by how many of its three components are odd: "eee" (all even),
"eeo", "eoo", "ooo". Real atoms sit anywhere (README, "Generated atoms": 13 / 41 / 37 / 8%); a generator whose
atoms keep to one sub-lattice of every other voxel has only "eee" (then its distances are 1, sqrt 2, sqrt 3 times
two voxels).
"""
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mofkit  # noqa: E402

EDGE_A, CUBES = 3.0, 16


def offset_classes(grids, params):
    """(percent of nearest-neighbour offsets per parity class, their distances in angstrom)."""
    counts, distances = dict.fromkeys(("eee", "eeo", "eoo", "ooo"), 0), []
    edge = params.size * params.spacing_A
    for grid in grids:
        positions = mofkit.grid_to_atoms(np.asarray(grid), **params.decode_kwargs()).positions
        if len(positions) < 2:
            continue
        d, i = cKDTree(positions).query(positions, k=2)
        inner = ((positions >= EDGE_A) & (positions <= edge - EDGE_A)).all(1)
        offsets = np.rint((positions[i[inner, 1]] - positions[inner]) / params.spacing_A).astype(int)
        for odd in (offsets % 2).sum(1):
            counts["e" * (3 - odd) + "o" * odd] += 1
        distances += list(d[inner, 1])
    n = max(sum(counts.values()), 1)
    return {k: 100 * v / n for k, v in counts.items()}, np.array(distances)


def main(argv):
    torch.set_num_threads(1)
    shards, sources = Path(argv[0]), argv[1:]
    params = mofkit.ShardDataset(shards).params
    print(f"{'source':<40} {'eee':>5} {'eeo':>5} {'eoo':>5} {'ooo':>5}  {'neighbour median':>16}")
    for source in sources:
        grids = mofkit.read_grids(shards, CUBES, seed=0)[0] if source == "real" else mofkit.sample(source, CUBES,
                                                                                                   seed=2000)
        shares, distances = offset_classes(grids, params)
        print(f"{source:<40} " + " ".join(f"{shares[k]:4.0f}%" for k in ("eee", "eeo", "eoo", "ooo")) +
              f"  {np.median(distances):14.2f} A", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
