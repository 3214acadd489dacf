"""Can the generator draw atoms at all? Fit it to real cubes directly and decode the fits.

    OMP_NUM_THREADS=1 python benchmarks/capacity_fit.py runs/atoms/heldout --n 8 --steps 2000

The generator of the atoms scale (the kit's "signed" transform; width and low-pass as given) and one free latent per
cube are fitted to N held-out cubes by mean squared error in GAN space (Adam) -- no discriminator, no sampling:
the generator is told every voxel. The fits are then decoded with the default decoder and compared with the cubes
themselves, by the structure report, the peak anatomy and the occupancy of `decoder_sweep.py`. If the fits decode
like the cubes, the architecture (its last layer, the low-pass, the Tanh) can draw atoms, and what a GAN trained
with it lacks is the signal to do so; if they do not, the architecture is the limit. E_scale is picked from the N
cubes (it scales the energy channel only; the density channels and the decoder do not depend on it).
"""
import argparse
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mofkit  # noqa: E402
from benchmarks.decoder_sweep import decoder_table, heldout_draw, occupancy, peak_anatomy  # noqa: E402
from benchmarks.reproduce import SCALES  # noqa: E402

SETTINGS = [(6, None), (26, 0.6)]  # (peak_neighbours, threshold): the default decoder and decoder_sweep's 26 / 0.6


def fit(real_K, steps, generator_channels=64, density_blur=True, lr=1e-3, seed=0, log_every=0):
    """Fit Generator(dim, latent 200, generator_channels, 1 + classes, "signed") and one latent per cube to real_K
    (N, C, D, D, D; kelvin and densities) by MSE in GAN space, all N cubes in every step. Returns (fitted grids in
    kelvin and densities, the MSE of every step)."""
    torch.manual_seed(seed)
    e_scale_K = mofkit.pick_e_scale(real_K)
    target = torch.as_tensor(mofkit.to_gan_input(real_K, e_scale_K, "signed"))
    G = mofkit.Generator(real_K.shape[-1], 200, generator_channels, real_K.shape[1], "signed",
                         density_blur=density_blur)
    z = torch.nn.Parameter(torch.randn(len(real_K), G.latent))
    opt = torch.optim.Adam([*G.parameters(), z], lr=lr)
    mse, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        loss = (G(z) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mse.append(loss.item())
        if log_every and step % log_every == 0:
            print(f"step {step}: MSE {mse[-1]:.5f} ({time.perf_counter() - start:.0f} s)", flush=True)
    with torch.no_grad():  # training-mode BatchNorm on the same N latents: the fit as it was optimised
        fitted = mofkit.from_gan_output(G(z).numpy(), e_scale_K, "signed")
    return fitted, mse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("heldout", type=Path, help="folder of held-out atoms-scale shards (reproduce.py --scale atoms)")
    p.add_argument("--n", type=int, default=8, help="cubes fitted (the first of the structure report's draw)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--generator-channels", type=int, default=SCALES["atoms"].channels)
    p.add_argument("--density-blur", type=int, default=SCALES["atoms"].density_blur, choices=(0, 1))
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*placeholder.*")
    torch.set_num_threads(1)
    params = mofkit.ShardDataset(args.heldout).params
    kw = params.decode_kwargs()
    real = heldout_draw(args.heldout, args.n)
    start = time.perf_counter()
    fitted, mse = fit(real, args.steps, args.generator_channels, bool(args.density_blur), args.lr, args.seed,
                      log_every=max(1, args.steps // 10))
    print(f"{args.n} cubes, {args.steps} steps, generator width {args.generator_channels}, low-pass "
          f"{'on' if args.density_blur else 'off'}: MSE {mse[0]:.4f} -> {mse[-1]:.5f} in "
          f"{time.perf_counter() - start:.0f} s; decoded:")
    table = decoder_table(real, fitted, kw, SETTINGS).replace({"side": {"generated": "fit"}})
    print(table.round(3).to_string(index=False))
    n_classes = len(params.density_classes)
    grids = {"real": real, "fit": fitted}
    print("peaks of the density summed over classes (> 0.5), medians; occupancy over all voxels:")
    print(pd.DataFrame({side: {**peak_anatomy(g, n_classes), **occupancy(g, n_classes)}
                        for side, g in grids.items()}).T.round(4).to_string())
    return table, mse


if __name__ == "__main__":
    main()
