"""What the "atoms" head can draw at best: held-out real cubes redrawn by it, with and without atom_offsets.

    OMP_NUM_THREADS=1 python3 benchmarks/atoms_head_ceiling.py HELDOUT_SHARDS [N]

The atoms of N held-out cubes (default 32; `read_grids(seed=0)`), decoded by the density route, are put on the
head's sites: each on its nearest voxel centre with presence 1 in its class, and with atom_offsets the rest of
its position as the site's shift. `gaussian_dilate` draws the channels; they are decoded again, and how far each
real atom's nearest decoded atom lies and the `structure_report` medians are compared with the real cubes'.
Without shifts every atom moves to a voxel centre (up to 0.43 A at 0.5 A voxels); with them only where the head's
per-axis max picks another site than the exact max would (`gaussian_dilate`).
"""
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mofkit  # noqa: E402


def on_sites(atoms, params):
    """(class index (D, D, D), -1 where no atom; shift (3, D, D, D) in voxels): each atom on its nearest voxel
    centre, the atoms head's site, with the rest of its position as the site's shift (two on one site: the
    first)."""
    size, classes = params.size, list(params.density_classes)
    voxels = atoms.positions.reshape(-1, 3) / params.spacing_A
    sites = np.clip(np.rint(voxels).astype(int), 0, size - 1)
    first = np.unique(np.ravel_multi_index(tuple(sites.T), (size,) * 3), return_index=True)[1]
    cls, shift = np.full((size,) * 3, -1, np.int64), np.zeros((3,) + (size,) * 3)
    cls[tuple(sites[first].T)] = [classes.index(c) for c in atoms.arrays["density_class"][first]]
    shift[(slice(None), *sites[first].T)] = (voxels[first] - sites[first]).T
    return cls, shift


def redraw(atoms, params, shifted):
    """(C, D, D, D) density channels of `atoms` as the atoms head draws them."""
    cls, shift = on_sites(atoms, params)
    heights = torch.zeros(1, len(params.density_classes), *cls.shape, dtype=torch.float64)
    present = np.nonzero(cls >= 0)
    heights[(0, cls[present], *present)] = 1.0
    sigma = params.density_sigma_A / params.spacing_A
    return mofkit.gaussian_dilate(heights, sigma, 1, torch.from_numpy(shift)[None] if shifted else None)[0].numpy()


def main(argv):
    torch.set_num_threads(1)
    shards, n = Path(argv[0]), int(argv[1]) if len(argv) > 1 else 32
    params = mofkit.ShardDataset(shards).params
    grids = mofkit.read_grids(shards, n, seed=0)[0]
    kw = params.decode_kwargs()
    real = [mofkit.grid_to_atoms(g, **kw) for g in grids]
    rows = {"real": mofkit.structure_report(real)}  # the atoms decoded above: the same report, decoded once
    for shifted in (False, True):
        redecoded, moved, lost = [], [], 0
        for atoms in real:
            channels = redraw(atoms, params, shifted)
            decoded = mofkit.grid_to_atoms(channels.astype(np.float32), **kw)
            redecoded.append(decoded)
            d, _ = cKDTree(decoded.positions).query(atoms.positions) if len(decoded) else (np.full(len(atoms), 9.0),
                                                                                            None)
            moved += list(d)
            lost += int(np.sum(d > 0.5))
        name = "atoms head, shifted" if shifted else "atoms head, voxel centres"
        rows[name] = mofkit.structure_report(redecoded)
        print(f"{name}: atoms moved median {np.median(moved):.3f} A, 99th pct {np.percentile(moved, 99):.3f} A, "
              f"lost {lost} of {len(moved)}")
    print(f"{'':<28} {'atoms/nm3':>9} {'nn A':>6} {'bonded':>6} {'contacts':>8}")
    for name, rep in rows.items():
        m = rep.median(numeric_only=True)
        print(f"{name:<28} {m.atoms_per_nm3:9.1f} {m.nn_median_A:6.2f} {m.bonded_fraction:6.2f} "
              f"{100 * rep.contact_fraction.mean():7.1f}%")


if __name__ == "__main__":
    main(sys.argv[1:])
