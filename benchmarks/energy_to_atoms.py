"""Can atoms be read off the energy channel alone? A supervised decoder, energy -> atoms, trained on real pairs.

    OMP_NUM_THREADS=1 python3 benchmarks/energy_to_atoms.py TRAIN_SHARDS HELDOUT_SHARDS [EPOCHS [GENERATOR]]

The atoms scale's shards (energy + density channels). Each cube's atoms are decoded from its density channels
(density route) and put on voxel sites: presence, shift within the voxel, class. A 3-D U-Net (three poolings,
16-128 channels) maps the energy in GAN space (`to_gan_input`, "signed": what a generator's channel 0 holds) to
those per voxel (binary cross-entropy, L1 on the shifts, cross-entropy on the classes of occupied sites), under
random cube symmetries, for EPOCHS (default 2). It decodes the peaks of its presence (>= their 26 neighbours,
no two closer than 0.9 A) above 0.5, or as many as its presences add up to (the calibrated count), for 32
held-out cubes and for 32 cubes of GENERATOR's energy channel (default the shipped atoms32 file), and prints
`structure_report` medians next to the held-out cubes' own atoms. README, "Generated atoms", has the figures.
"""
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mofkit  # noqa: E402
from benchmarks.atoms_head_ceiling import on_sites  # noqa: E402

MIN_SEPARATION_A = 0.9  # the shortest bond, O-H 0.96 A, less a margin


def read_pairs(shards, e_scale_K):
    """(energy in GAN space (N, D, D, D), presence (N, D, D, D), shifts (N, 3, D, D, D), class (N, D, D, D), atoms):
    every cube of `shards`, its atoms from the density route on their voxel sites (class -1: no atom)."""
    params = mofkit.ShardDataset(shards).params
    energy, presence, shifts, cls, atoms = [], [], [], [], []
    for path in sorted(Path(shards).glob("shard_*.npy")):
        for g in mofkit.open_shard(path)[0]:
            g = np.asarray(g, np.float32)
            atoms.append(mofkit.grid_to_atoms(g, **params.decode_kwargs()))
            c, s = on_sites(atoms[-1], params)
            energy.append(mofkit.to_gan_input(g[:1], e_scale_K, "signed")[0])
            presence.append((c >= 0).astype(np.float32)), shifts.append(s.astype(np.float32)), cls.append(c)
    return (torch.from_numpy(np.stack(energy)), torch.from_numpy(np.stack(presence)),
            torch.from_numpy(np.stack(shifts)), torch.from_numpy(np.stack(cls)), atoms)


def conv_block(c_in, c_out):
    return torch.nn.Sequential(*[m for a, b in ((c_in, c_out), (c_out, c_out)) for m in (
        torch.nn.Conv3d(a, b, 3, 1, 1), torch.nn.BatchNorm3d(b), torch.nn.ReLU(inplace=True))])


class UNet(torch.nn.Module):
    """energy (N, 1, D, D, D) -> (N, 1 + 3 + classes, D, D, D): presence logit, shift logits, class logits."""

    def __init__(self, n_classes, width=16):
        super().__init__()
        w = width
        self.down = torch.nn.ModuleList([conv_block(1, w), conv_block(w, 2 * w), conv_block(2 * w, 4 * w),
                                         conv_block(4 * w, 8 * w)])
        self.up = torch.nn.ModuleList([conv_block(12 * w, 4 * w), conv_block(6 * w, 2 * w), conv_block(3 * w, w)])
        self.out = torch.nn.Conv3d(w, 4 + n_classes, 1)
        with torch.no_grad():  # presence starts at the data's rate, 0.7% of voxels
            self.out.bias[0] = np.log(0.007 / 0.993)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(F.max_pool3d(x, 2) if i else x)
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = block(torch.cat([F.interpolate(x, scale_factor=2, mode="trilinear"), skip], 1))
        return self.out(x)


def augment(e, p, s, c, rng):
    """One random cube symmetry for the batch: axes permuted and flipped, the shifts with them."""
    perm, flips = list(rng.permutation(3)), [a for a in range(3) if rng.random() < 0.5]
    e, p, c = (t.permute(0, *(1 + a for a in perm)) for t in (e, p, c))
    s = s.permute(0, 1, *(2 + a for a in perm))[:, perm]
    for a in flips:
        e, p, c, s = e.flip(1 + a), p.flip(1 + a), c.flip(1 + a), s.flip(2 + a)
        s = torch.cat([s[:, :a], -s[:, a:a + 1], s[:, a + 1:]], 1)
    return e, p, s, c


def losses(out, p, s, c):
    occupied = p > 0
    bce = F.binary_cross_entropy_with_logits(out[:, 0], p)
    shift = (0.5 * torch.tanh(out[:, 1:4]) - s).abs().sum(1)[occupied].mean()
    cls = F.cross_entropy(out[:, 4:].permute(0, 2, 3, 4, 1)[occupied], c[occupied])
    return bce, shift, cls


def decode(out, classes, spacing_A, threshold):
    """ase.Atoms from one output (1 + 3 + C, D, D, D): presence peaks >= threshold ("count": the sum of the
    presences, strongest first), greedily no two closer than MIN_SEPARATION_A."""
    from ase import Atoms
    from scipy.spatial import cKDTree
    prob = torch.sigmoid(out[0])
    idx = (prob == F.max_pool3d(prob[None], 3, 1, 1)[0]).nonzero()
    strength = prob[idx[:, 0], idx[:, 1], idx[:, 2]]
    chosen = (strength.argsort(descending=True)[:int(round(prob.sum().item()))] if threshold == "count"
              else strength >= threshold)
    idx, score = idx[chosen], strength[chosen].numpy()
    positions = ((idx + 0.5 * torch.tanh(out[1:4, idx[:, 0], idx[:, 1], idx[:, 2]]).T) * spacing_A).numpy()
    kind = out[4:, idx[:, 0], idx[:, 1], idx[:, 2]].argmax(0).numpy()
    tree, taken, keep = cKDTree(positions.reshape(-1, 3)), np.zeros(len(positions), bool), []
    for i in np.argsort(-score):
        if not taken[i]:
            keep.append(i)
            taken[tree.query_ball_point(positions[i], MIN_SEPARATION_A)] = True
    names = [classes[k] for k in kind[keep]]
    return Atoms([mofkit.class_symbol(n, classes) for n in names], positions=positions[keep].reshape(-1, 3),
                 cell=[out.shape[-1] * spacing_A] * 3, pbc=False)


def report_row(name, atoms):
    rep = mofkit.structure_report(atoms)
    m = rep.median(numeric_only=True)
    print(f"{name:<36} {m.atoms_per_nm3:9.1f} {m.nn_median_A:6.2f} {m.bonded_fraction:6.2f} "
          f"{100 * rep.contact_fraction.mean():7.1f}%", flush=True)


def main(argv):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    train_dir, heldout_dir = Path(argv[0]), Path(argv[1])
    epochs = int(argv[2]) if len(argv) > 2 else 2
    root = Path(__file__).resolve().parents[1]
    G = mofkit.load_generator(argv[3] if len(argv) > 3 else root / "weights" / "generator_atoms32.pt")
    params = mofkit.ShardDataset(heldout_dir).params
    classes = params.density_classes
    train, heldout = read_pairs(train_dir, G.e_scale_K), read_pairs(heldout_dir, G.e_scale_K)
    model, rng = UNet(len(classes)), np.random.default_rng(0)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    n, batch = len(train[0]), 8
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * (n // batch), pct_start=0.1)
    for epoch in range(epochs):
        order = rng.permutation(n)
        for b in mofkit.tqdm(range(n // batch), desc=f"epoch {epoch}", mininterval=30):
            pick = torch.from_numpy(np.sort(order[b * batch:(b + 1) * batch]))
            e, p, s, c = augment(*(t[pick] for t in train[:4]), rng)
            bce, shift, cls = losses(model(e[:, None]), p, s, c)
            opt.zero_grad()
            (100 * bce + shift + 0.1 * cls).backward()
            opt.step()
            sched.step()
    model.eval()
    rate = heldout[1].mean().item()
    with torch.no_grad():
        out = torch.cat([model(heldout[0][i:i + 8, None]) for i in range(0, 64, 8)])
        bce, shift, cls = losses(out, heldout[1][:64], heldout[2][:64], heldout[3][:64])
        generated = torch.from_numpy(mofkit.to_gan_input(mofkit.sample(G, 32, seed=2000)[:, :1], G.e_scale_K,
                                                         "signed"))
        out_gen = torch.cat([model(generated[i:i + 8]) for i in range(0, 32, 8)])
    print(f"held-out (64 cubes): presence BCE {bce:.4f} (the rate alone: "
          f"{-(rate * np.log(rate) + (1 - rate) * np.log(1 - rate)):.4f}), shift |error| {shift:.3f} voxel "
          f"(sum of 3 axes; none learned: 0.75), class cross-entropy {cls:.3f}")
    print(f"{'32 cubes':<36} {'atoms/nm3':>9} {'nn A':>6} {'bonded':>6} {'contacts':>8}")
    report_row("held-out, their own atoms", heldout[4][:32])
    for threshold in (0.5, "count"):
        report_row(f"held-out energy, decoded ({threshold})",
                   [decode(o, classes, params.spacing_A, threshold) for o in out[:32]])
        report_row(f"generated energy, decoded ({threshold})",
                   [decode(o, classes, params.spacing_A, threshold) for o in out_gen])


if __name__ == "__main__":
    main(sys.argv[1:])
