"""Generated atoms under each decoder setting: as many generated as held-out cubes (N_STRUCTURES, --n), decoded the
same way per row.

    OMP_NUM_THREADS=1 python benchmarks/decoder_sweep.py weights/generator_atoms32.pt runs/atoms/heldout
    OMP_NUM_THREADS=1 python benchmarks/decoder_sweep.py runs/atoms_s075/run/last.pt runs/atoms_s075/heldout

The generator (a shipped file or a checkpoint) and a folder of held-out shards made with the same GridParams
(reproduce.py --scale atoms writes one); the density width comes from the shards. Rows: the 6- and 26-neighbour
peak rules (grid_to_atoms' peak_neighbours) at the default threshold (0.6^((spacing/sigma)^2)) and at fixed ones;
columns: the structure report's medians (contacts: mean) and composition, as `structure_targets` compares them.
Real grids decode alike under every row (README, "Generated atoms"); the rows differ in what they make of
generated ones. ~2 min for 64 cubes each on one thread.
"""
import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.ndimage
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mofkit  # noqa: E402
from benchmarks.reproduce import N_STRUCTURES, SCALES  # noqa: E402

SETTINGS = [(6, None), (26, None), (6, 0.6), (26, 0.6), (26, 0.45), (26, 0.3)]  # (peak_neighbours, threshold)


def heldout_draw(heldout_dir, n=N_STRUCTURES, seed=0):
    """The held-out grids reproduce.py's structure report decodes: the first n of its evaluation draw."""
    return mofkit.read_grids(heldout_dir, SCALES["atoms"].n_eval, seed=seed)[0][:n]


def draws(generator, heldout_dir, n=N_STRUCTURES, seed=0, ema=True):
    """(real, generated) grids: the draws reproduce.py's structure report decodes (`heldout_draw`, generated
    ones sampled with seed 2000 + seed; ema=False: a checkpoint's raw generator instead of its moving average)."""
    real = heldout_draw(heldout_dir, n, seed)
    return real, mofkit.sample(generator, len(real), seed=2000 + seed, ema=ema)


def sweep(generator, heldout_dir, n=N_STRUCTURES, seed=0, settings=SETTINGS, ema=True) -> pd.DataFrame:
    """One row per (decoder setting, side): the structure report's medians and the composition, on `draws`."""
    kw = mofkit.ShardDataset(heldout_dir).params.decode_kwargs()
    return decoder_table(*draws(generator, heldout_dir, n, seed, ema), kw, settings)


def decoder_table(real, generated, kw, settings=SETTINGS) -> pd.DataFrame:
    """`sweep` on given grids; kw: the shards' GridParams.decode_kwargs()."""
    rows = []
    for neighbours, threshold in settings:
        for side, grids in (("generated", generated), ("real", real)):
            atoms = [mofkit.grid_to_atoms(g, threshold=threshold, peak_neighbours=neighbours, **kw) for g in grids]
            report = mofkit.structure_report(atoms, classes=kw["classes"])
            medians = report.median(numeric_only=True)
            rows.append({"neighbours": neighbours, "threshold": "default" if threshold is None else threshold,
                         "side": side, "atoms_per_nm3": medians["atoms_per_nm3"],
                         "nn_median_A": medians["nn_median_A"], "bonded_fraction": medians["bonded_fraction"],
                         "contact_fraction": report["contact_fraction"].mean(),
                         **{c: medians[c] for c in ("frac_C", "frac_O", "frac_H", "frac_N", "frac_metal")}})
    return pd.DataFrame(rows)


def peak_anatomy(grids, n_classes, floor=0.5) -> dict:
    """Where the decoder's per-class peaks come from: local maxima (26 neighbours) of the density summed over
    classes above `floor`, per cube, and at them the summed density and the strongest channel's share of it
    (medians). In real cubes each atom is one class, so the strongest channel at a peak is near 1 (the share is
    lower only where bonded neighbours of other classes add to the sum); a generator that puts density where atoms
    are but splits it over classes scores a lower share, and its per-class peaks miss the decoder's threshold."""
    density = np.asarray(grids)[:, -n_classes:]
    total = density.sum(1)
    peaks = (total == scipy.ndimage.maximum_filter(total, size=(1, 3, 3, 3))) & (total > floor)
    strongest = density.max(1)[peaks]
    return {"peaks_per_cube": peaks.sum() / len(density), "sum_at_peaks": float(np.median(total[peaks])),
            "strongest_at_peaks": float(np.median(strongest)),
            "strongest_share": float(np.median(strongest / total[peaks]))}


def occupancy(grids, n_classes) -> dict:
    """The occupancy -- the largest class density at each voxel, what `density_channels` (a max of Gaussians) puts
    there and what Generator(density_head="occupancy") outputs directly -- over every voxel of the cubes: the
    shares of voxels below 0.1 (empty space) and above 0.5 and 0.8 (atom cores; 0.8 is the default decoder's
    threshold at density width 0.75 A), and its 99th percentile."""
    occ = np.asarray(grids)[:, -n_classes:].max(1)
    return {"below_0.1": float(np.mean(occ < 0.1)), "above_0.5": float(np.mean(occ > 0.5)),
            "above_0.8": float(np.mean(occ > 0.8)), "q99": float(np.quantile(occ, 0.99))}


def contact_pairs(atoms_list, spacing_A, contact_A=0.7) -> pd.Series:
    """Pairs of decoded atoms closer than contact_A, counted by their two classes and by the voxel offset between
    them (sorted |rounded offset|: (0, 1, 1) = face-diagonal voxels): two tops of one blob, or two atoms."""
    from scipy.spatial import cKDTree
    counts = {}
    for atoms in atoms_list:
        cls, pos = atoms.arrays["density_class"], atoms.positions
        for i, j in (cKDTree(pos).query_pairs(contact_A) if len(atoms) > 1 else ()):
            offset = tuple(sorted(np.abs(np.round((pos[i] - pos[j]) / spacing_A)).astype(int).tolist()))
            key = ("-".join(sorted((str(cls[i]), str(cls[j])))), str(offset))
            counts[key] = counts.get(key, 0) + 1
    return pd.Series(counts, dtype=int).sort_values(ascending=False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("generator", help="generator file or training checkpoint")
    p.add_argument("heldout", type=Path, help="folder of held-out shards made with the generator's GridParams")
    p.add_argument("--n", type=int, default=N_STRUCTURES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="a checkpoint's raw generator instead of its moving average")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*placeholder.*")
    torch.set_num_threads(1)
    params = mofkit.ShardDataset(args.heldout).params
    kw = params.decode_kwargs()
    grids = draws(args.generator, args.heldout, args.n, args.seed, ema=not args.raw)
    table = decoder_table(*grids, kw)
    print(f"density width {params.density_sigma_A} A; {args.n} generated ({'raw' if args.raw else 'moving-average'} "
          f"weights) vs {args.n} held-out cubes")
    print(table.round(3).to_string(index=False))
    n_classes = len(params.density_classes)
    anatomy = pd.DataFrame({side: peak_anatomy(g, n_classes) for side, g in zip(("real", "generated"), grids)}).T
    print("peaks of the density summed over classes (> 0.5), medians:")
    print(anatomy.round(3).to_string())
    print("occupancy (the largest class density at each voxel), over all voxels:")
    print(pd.DataFrame({side: occupancy(g, n_classes) for side, g in zip(("real", "generated"), grids)}).T
          .round(4).to_string())
    pairs = contact_pairs([mofkit.grid_to_atoms(g, **kw) for g in grids[1]], kw["spacing_A"])
    print(f"contact pairs (< 0.7 A) of the generated cubes, default decoder: {pairs.sum()}, the most common:")
    print(pairs.head(5).to_string())
    return table


if __name__ == "__main__":
    main()
