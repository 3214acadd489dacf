"""Reproduce the kit's measured result: CoRE MOF grids -> a trained 3D GAN -> held-out scores, in one command.

    OMP_NUM_THREADS=1 python benchmarks/reproduce.py --scale cpu --epochs 10 --ship weights/generator_cpu32.pt
    python benchmarks/reproduce.py --scale gpu --chunk-min 9 [--out runs/gpu64]         # repeat until it says done
    OMP_NUM_THREADS=1 python benchmarks/reproduce.py --scale atoms --ship weights/generator_atoms32.pt

(the first line made benchmarks/results_cpu32/ and the shipped weights: ~25 min voxelizing on 2 shared cores,
5 min training, ~4 min scoring; without --epochs the cpu scale trains for --budget-min, default 60 min).

Both scales do the same steps, each resumable (re-running the same command continues where it stopped):
  1. split   CoRE MOF 2019-ASR by CSD refcode (seeded), so near-duplicates (FUVDEH, FUVDEH01, ...) never
             straddle train and held-out; the split is a CSV committed in benchmarks/.
  2. grids   voxelize both sets in the cube frame into shards (`build_shards`; finished shards are skipped).
  3. train   the study's GAN family with LSGAN (`train`), checkpointing every few minutes, until the wall-clock
             budget (cpu) or the epoch target (gpu) is reached.
  4. score   mofkit.evaluate on held-out grids (see below). Writes results.json, one_nn.png, slice montages
             (real vs generated) and the loss curve, and (cpu) the shippable generator weights.

Scales:
  cpu  ~2,000 train + ~500 held-out structures (benchmarks/split_cpu32.csv), 32^3 grids at 1.0 A (the same
       32 A cube as the 64^3 default), dim 32, 64 channels, batch 8, the kit's recipe (TrainConfig defaults,
       chosen by benchmarks/ablation.py), for --budget-min minutes of training; --study 1 trains the study's
       exact recipe instead (TrainConfig.study()).
       On a machine shared with other jobs run it with OMP_NUM_THREADS=1: torch's OpenMP threads spin-wait,
       and with another process holding one of 2 cores, 2 threads voxelized 18x and trained 3-5x slower than
       1 thread (measured on the 2-core dev machine, 2026-11-25).
  atoms the cpu split at 32^3 with 0.5 A voxels (a 16 A cube), energy + atom-density channels
       (METAL_DENSITY_CLASSES, Gaussians 0.75 A wide), 60 epochs of the kit's recipe with the density low-pass
       (TrainConfig.density_blur) for the multi-channel generator and for an energy-only one on the same
       grids' channel 0; both are scored on energy, and 64 generated and 64 held-out
       cubes are decoded to atoms and compared (mofkit.structure_report / structure_targets; README,
       "Generated atoms").
  gpu  every structure that parses (benchmarks/split_gpu64.csv: ~1,200 held-out names, the rest train), 64^3
       at 0.5 A, the study's model (dim 64, 512 channels) with the kit's recipe and TrainConfig.fast_gpu()'s
       speed settings, 48 epochs, voxelized on the GPU. Each call stops after --chunk-min minutes
       (checkpointed); the call after training reached its target evaluates 1,000 generated vs 1,000 held-out.

Scoring is mofkit.evaluate, the kit's one protocol (1-NN in three feature spaces with intervals, the
references, memorisation, property distances; every grid through `gan_round_trip`). log10 K_H uses one
nominal density (the training set's median framework density) for all grids, as `property_comparison`
explains: the Wasserstein distance does not depend on that choice.

A bare GPU machine without network: a stock CUDA PyTorch image has numpy, scipy, pandas, matplotlib, tqdm and
requests, and lacks ase (3.29.0), core-mof (2019.1, 45 MB: the CoRE MOF CIFs; its pymatgen dependency is only
for its own loaders, which mofkit does not use, hence --no-deps) and CoolProp (8.0.0, the equation of state of
the stored adsorption properties; a manylinux wheel). Fetch them where pip works, carry the folder, install:
    pip download --no-deps --only-binary=:all: --python-version 3.12 -d wheels ase==3.29.0 core-mof==2019.1
    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d wheels CoolProp==8.0.0
    pip install --no-index --no-deps --find-links wheels ase core-mof CoolProp
(gdown, beautifulsoup4 and soupsieve only matter for downloading published shards, which this script never
does.) Then, once per session of at most ~10 minutes, until it prints the results:
    python benchmarks/reproduce.py --scale gpu --chunk-min 9 --out runs/gpu64
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import mofkit  # noqa: E402

@dataclass
class Scale:
    """One reproduction setting; every field can be overridden from the command line (tests use tiny ones)."""
    size: int                       # grid edge in voxels
    spacing_A: float                # voxel spacing (size * spacing_A = the 32 A cube)
    n_heldout: int                  # held-out structures (cpu: that parse; gpu: names, failures drop out)
    n_train: int | None             # None: every other structure
    channels: int                   # generator/discriminator channels at the 4^3 bottleneck
    batch_size: int
    epochs: int                     # training target; the cpu run is bounded by --budget-min first
    n_eval: int                     # generated grids (and held-out/train grids) per comparison
    fast_gpu: bool                  # TrainConfig.fast_gpu() (GPU speed settings) instead of eager fp32
    study: bool                     # TrainConfig.study(): the study's exact recipe instead of the kit's
    split_csv: str                  # committed split, relative to the repository root
    atoms: bool = False             # energy + atom-density channels, and an energy-only comparator on channel 0
    density_sigma_A: float = 0.0    # atoms: the density Gaussians' width (0: the voxel spacing)
    density_blur: int = 0           # atoms: TrainConfig.density_blur (1: on)
    density_head: str = "channels"  # atoms: TrainConfig.density_head ("channels", "occupancy" or "atoms": then
                                    # --density-blur 0; its Gaussians' width is the data's)
    generator_channels: int = 0     # TrainConfig.generator_channels (0: channels)
    r1_gamma: float = 0.0           # TrainConfig.r1_gamma (0: no R1 penalty)
    d_norm: str = "batch"           # TrainConfig.d_norm ("batch", "joint" or "none")
    d_patch: int = 0                # TrainConfig.d_patch (1: on)
    marginal_weight: float = 0.0    # TrainConfig.marginal_weight (0: none)
    marginal_channels: str = "all"  # TrainConfig.marginal_channels ("all" or "density")
    pair_weight: float = 0.0        # TrainConfig.pair_weight (0: none)
    pair_field: str = "max"         # TrainConfig.pair_field ("max" or "sum")
    atom_subvoxels: int = 1         # TrainConfig.atom_subvoxels (the "atoms" head's sites per voxel edge)
    density_upsample: str = "transposed"  # TrainConfig.density_upsample ("transposed" or "resize")
    atom_offsets: int = 0           # TrainConfig.atom_offsets (1: the "atoms" head's atoms shifted within voxels)
    clash_weight: float = 0.0       # TrainConfig.clash_weight (0: none; the "atoms" head)
    clash_voxels: float = 1.8       # TrainConfig.clash_voxels (the clash term's reach)
    init_from: str = ""             # TrainConfig.init_from of the run, relative to the repository root (the
                                    # energy-only comparator starts from scratch)
    freeze_trunk: int = 0           # TrainConfig.freeze_trunk (1: on)
    pair_count_weight: float = 0.0  # TrainConfig.pair_count_weight (0: none; the "atoms" head)
    pair_atoms_weight: float = mofkit.PAIR_ATOMS_WEIGHT  # TrainConfig.pair_atoms_weight (in the pair-count term)
    bond_weight: float = 0.0        # TrainConfig.bond_weight (0: none; the "atoms" head)
    class_count_weight: float = 0.0 # TrainConfig.class_count_weight (0: none; the "atoms" head)
    crowd_weight: float = 0.0       # TrainConfig.crowd_weight (0: none; the "atoms" head)
    count_uncrowded: int = 0        # TrainConfig.count_uncrowded (1: on; with pair_count_weight)
    energy_hold_weight: float = 0.0 # TrainConfig.energy_hold_weight (0: none; with init_from)
    output_lr: float = 0.0          # TrainConfig.output_lr (0: the recipe's lr)
    steps: int = 0                  # the run's target in optimizer steps instead of epochs (0: epochs), e.g. a
                                    # fine-tune that probes chose part-way through an epoch
    comparator_epochs: int = 0      # atoms: the energy-only comparator's epochs (0: epochs), e.g. 60 while a run
                                    # that starts from a 60-epoch file (init_from) trains on for 1
    shard_size: int = 100
    checkpoint_every_min: float = 5.0
    seed: int = 0


SCALES = {
    "cpu": Scale(size=32, spacing_A=1.0, n_heldout=500, n_train=2000, channels=64, batch_size=8, epochs=1000,
                 n_eval=500, fast_gpu=False, study=False, split_csv="benchmarks/split_cpu32.csv"),
    "gpu": Scale(size=64, spacing_A=0.5, n_heldout=1200, n_train=None, channels=512, batch_size=64, epochs=48,
                 n_eval=1000, fast_gpu=True, study=False, split_csv="benchmarks/split_gpu64.csv"),
    "atoms": Scale(size=32, spacing_A=0.5, n_heldout=500, n_train=2000, channels=64, batch_size=8, epochs=60,
                   n_eval=500, fast_gpu=False, study=False, split_csv="benchmarks/split_cpu32.csv", atoms=True,
                   density_sigma_A=0.75, density_blur=1),
}
# Generated and held-out grids decoded to atoms for the structure report (atoms scale): 500 = all held-out cubes.
# Real cubes' nearest-neighbour medians are bimodal (H-rich cubes ~0.93 A, others ~1.22 A), so 64 real cubes
# against 64 other real ones miss the 10% nn target about a third of the time (README, "Generated atoms").
N_STRUCTURES = 500


# --- 1. split ----------------------------------------------------------------

def ensure_split(scale: Scale, source=None, check_parses=True):
    """The scale's committed split CSV, made (seeded, deterministic) when it does not exist yet.

    With check_parses (and a train size), only structures that pass read_structure's checks are kept: the
    candidates (the first groups of the seeded order, with 25% spare) are read in one pass over the source.
    """
    path = ROOT / scale.split_csv if not Path(scale.split_csv).is_absolute() else Path(scale.split_csv)
    if not path.exists():
        label = source or mofkit.COREMOF_SOURCE
        names = mofkit.source_names(source)
        parses = None
        if check_parses and scale.n_train is not None:
            spare = int(1.25 * (scale.n_heldout + scale.n_train)) + 1
            candidates = [n for n, _, _ in mofkit.make_split(names, 0, spare, scale.seed)]
            failures = []
            ok = {n for n, _ in mofkit.iter_source(source, candidates, failures)}
            print(f"{len(failures)} of {len(candidates)} candidate structures fail to read, left out")
            parses = ok.__contains__
        rows = mofkit.make_split(names, scale.n_heldout, scale.n_train, scale.seed, parses)
        counts = {s: sum(r[2] == s for r in rows) for s in ("heldout", "train")}
        if counts["heldout"] < scale.n_heldout or (scale.n_train and counts["train"] < scale.n_train):
            raise RuntimeError(f"split {path}: only {counts} structures read; too many failures in {label}")
        mofkit.write_split(path, rows)
    return mofkit.read_split(path)


# --- 2. grids ----------------------------------------------------------------

def shard_params(scale: Scale) -> mofkit.GridParams:
    """The scale's grids. atoms: energy + METAL_DENSITY_CLASSES channels, without the whole-cell properties
    (nothing here reads them, and they cost more than the grids)."""
    if scale.atoms:
        return mofkit.GridParams(size=scale.size, frame="cube", spacing_A=scale.spacing_A,
                                  density_classes=mofkit.METAL_DENSITY_CLASSES, cell_properties=False,
                                  density_sigma_A=scale.density_sigma_A or None)
    return mofkit.GridParams(size=scale.size, frame="cube", spacing_A=scale.spacing_A)


def runs(scale: Scale) -> dict:
    """Training runs of the scale: folder -> the shard channels it trains on (None: all). The atoms scale adds
    an energy-only generator on the same grids' channel 0: the reference its energy channel is scored against."""
    return {"run": None, "run_energy": [0]} if scale.atoms else {"run": None}


def build_grids(out, split, scale, source=None, device=None, deadline=math.inf, progress=True) -> bool:
    """Voxelize held-out then train structures into out/heldout and out/train (finished shards are kept);
    start no shard after `deadline`. True when every shard exists."""
    for part in ("heldout", "train"):
        minutes = (deadline - time.monotonic()) / 60
        rows = mofkit.build_shards(out / part, source, params=shard_params(scale), shard_size=scale.shard_size,
                                   names=split[part], device=device, progress=progress,
                                   max_minutes=max(minutes, 0) if minutes != math.inf else None)
        if len(rows) < math.ceil(len(split[part]) / scale.shard_size):
            return False
    return True


# --- 3. train ----------------------------------------------------------------

def train_config(scale: Scale, device="auto", **recipe) -> mofkit.TrainConfig:
    """The scale's TrainConfig: the kit's recipe (or the study's with scale.study, batch 2), `recipe` overriding fields."""
    params = shard_params(scale)
    fields = dict(dim=scale.size, channels=scale.channels, epochs=scale.epochs, seed=scale.seed,
                  checkpoint_every_min=scale.checkpoint_every_min, device=device,
                  grid_channels=len(params.channels), density_blur=bool(scale.density_blur),
                  density_head=scale.density_head, generator_channels=scale.generator_channels,
                  density_sigma_voxels=params.density_sigma_A / params.spacing_A
                  if scale.density_head == "atoms" else 0.0,
                  r1_gamma=scale.r1_gamma, d_norm=scale.d_norm, d_patch=bool(scale.d_patch),
                  marginal_weight=scale.marginal_weight, marginal_channels=scale.marginal_channels,
                  pair_weight=scale.pair_weight, pair_field=scale.pair_field,
                  atom_subvoxels=scale.atom_subvoxels, density_upsample=scale.density_upsample,
                  atom_offsets=bool(scale.atom_offsets),
                  clash_weight=scale.clash_weight, clash_voxels=scale.clash_voxels,
                  init_from=str(ROOT / scale.init_from) if scale.init_from else "",
                  freeze_trunk=bool(scale.freeze_trunk), pair_count_weight=scale.pair_count_weight,
                  energy_hold_weight=scale.energy_hold_weight, output_lr=scale.output_lr,
                  pair_atoms_weight=scale.pair_atoms_weight, bond_weight=scale.bond_weight,
                  class_count_weight=scale.class_count_weight, crowd_weight=scale.crowd_weight,
                  count_uncrowded=bool(scale.count_uncrowded))
    if scale.study:
        return mofkit.TrainConfig.study(**{**fields, **recipe})
    preset = mofkit.TrainConfig.fast_gpu if scale.fast_gpu else mofkit.TrainConfig
    return preset(**{**fields, "batch_size": scale.batch_size, **recipe})


def comparator_config(scale: Scale, device="auto") -> mofkit.TrainConfig:
    """The energy-only comparator's TrainConfig: the scale's recipe on channel 0, from scratch, without the terms
    that act on atoms (they need density channels) and for its own epochs."""
    return train_config(scale, device, grid_channels=1, init_from="", freeze_trunk=False, marginal_weight=0.0,
                        marginal_channels="all", pair_weight=0.0, clash_weight=0.0, pair_count_weight=0.0,
                        energy_hold_weight=0.0, output_lr=0.0, bond_weight=0.0, class_count_weight=0.0,
                        crowd_weight=0.0, count_uncrowded=False, pair_atoms_weight=mofkit.PAIR_ATOMS_WEIGHT,
                        epochs=run_epochs(scale, "run_energy"))


def training_state(run_dir):
    """(epoch, time_s, step) of the run's checkpoint, (0, 0.0, 0) before the first one."""
    last = Path(run_dir) / "last.pt"
    if not last.exists():
        return 0, 0.0, 0
    ckpt = mofkit.load_checkpoint(last)
    return ckpt["epoch"], ckpt["time_s"], ckpt["step"]


def run_epochs(scale, name) -> int:
    """The epoch target of one of the scale's runs (`runs`)."""
    return scale.comparator_epochs if name == "run_energy" and scale.comparator_epochs else scale.epochs


def run_steps(scale, name) -> int | None:
    """The step target of one of the scale's runs (None: its epochs); the comparator always trains by epochs."""
    return scale.steps if scale.steps and name == "run" else None


def training_done(run_dir, scale, budget_min) -> bool:
    epoch, time_s, step = training_state(run_dir)
    name = Path(run_dir).name
    # train() stops at the first logged step past its deadline, so a finished budget reads >= budget_min
    done = step >= run_steps(scale, name) if run_steps(scale, name) else epoch >= run_epochs(scale, name)
    return done or (budget_min is not None and time_s >= 60 * budget_min)


def train_chunk(out, scale, budget_min=None, deadline=math.inf, device="auto", progress=True):
    """Train each of the scale's runs in turn (resuming out/<run>/last.pt) until the epoch target, the total
    training budget or the call's deadline, whichever comes first."""
    for name, channels in runs(scale).items():
        run_dir = out / name
        if training_done(run_dir, scale, budget_min):
            continue
        _, time_s, _ = training_state(run_dir)
        minutes = (deadline - time.monotonic()) / 60
        if budget_min is not None:
            minutes = min(minutes, budget_min - time_s / 60)
        if minutes <= 0:
            return
        config = comparator_config(scale, device) if channels else train_config(scale, device)
        dataset = mofkit.ShardDataset(out / "train", seed=scale.seed, batch_size=config.batch_size, channels=channels)
        mofkit.train(config, dataset, run_dir, resume=True, progress=progress, max_minutes=minutes,
                     max_steps=run_steps(scale, name))


def all_trained(out, scale, budget_min) -> bool:
    return all(training_done(out / name, scale, budget_min) for name in runs(scale))


# --- 4. score ----------------------------------------------------------------

def report_dict(report) -> dict:
    """An EvalReport as JSON-ready dicts (the tables keep every number; results.json holds them)."""
    return {"accuracy": report.accuracy, "n": report.n, "e_scale_K": report.e_scale_K,
            "sampling_seeds": list(report.sampling_seeds),
            "one_nn": report.one_nn.to_dict(orient="records"),
            "properties": {k: {c: float(v) for c, v in row.items()} for k, row in report.properties.iterrows()},
            "memorisation": report.memorisation}


def evaluate(out, scale, sampling_seeds=(0, 1, 2), device=None, run_dir=None) -> dict:
    """Score a run's last.pt against the held-out grids by mofkit.evaluate; write results.json and pictures."""
    run_dir = Path(run_dir or out / "run")
    ckpt_path = run_dir / "last.pt"
    ckpt = mofkit.load_checkpoint(ckpt_path)
    heldout, _ = mofkit.read_grids(out / "heldout", scale.n_eval, seed=scale.seed)
    train_real, train_meta = mofkit.read_grids(out / "train", scale.n_eval, seed=scale.seed)
    n = min(len(heldout), len(train_real), scale.n_eval)
    density = float(np.median(train_meta["density_kg_m3"]))  # one nominal density: see the docstring
    energy = (0,) if scale.atoms else None  # the atoms scale scores its energy channel against run_energy's
    score = lambda path: mofkit.evaluate(path, heldout, train_real, n=n, sampling_seeds=sampling_seeds,
                                         density_kg_m3=density, seed=scale.seed, device=device, channels=energy)
    report = score(ckpt_path)
    history = mofkit.load_history(run_dir)
    n_train = mofkit.ShardDataset(out / "train").num_grids
    results = {
        "scale": dataclasses.asdict(scale),
        "command": " ".join(["python", "benchmarks/reproduce.py"] + sys.argv[1:]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": _cpus(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "data": {"train_grids": n_train, "heldout_grids": mofkit.ShardDataset(out / "heldout").num_grids,
                 "n_eval": n, "nominal_density_kg_m3": density, "e_scale_K": ckpt["e_scale_K"]},
        "training": training_summary(ckpt, history, n_train),
        "evaluation": report_dict(report),
    }
    print(report)
    if scale.atoms:
        energy_only = out / "run_energy" / "last.pt"
        results["training_energy_only"] = training_summary(mofkit.load_checkpoint(energy_only),
                                                           mofkit.load_history(energy_only.parent), n_train)
        results["evaluation_energy_only"] = report_dict(score(energy_only))
        results["structures"] = structure_results(out, ckpt_path, heldout, train_real, ckpt["e_scale_K"],
                                                  seed=scale.seed)
    clip = lambda x: mofkit.gan_round_trip(x, ckpt["e_scale_K"])
    write_pictures(out, clip(heldout), clip(mofkit.sample(ckpt_path, 2, seed=1000)), history, report)
    with mofkit.atomic_write(out / "results.json", "w") as f:
        json.dump(results, f, indent=2)
    return results


def training_summary(ckpt, history, n_train) -> dict:
    return {"steps": ckpt["step"], "epochs": ckpt["epoch"] + ckpt["samples_in_epoch"] / n_train,
            "train_time_min": ckpt["time_s"] / 60,
            "samples_per_s": float(np.median(history["samples_per_s"])) if len(history) else None,
            "config": ckpt["config"]}


def structure_results(out, checkpoint, heldout, train_real, e_scale_K, n=N_STRUCTURES, seed=0) -> dict:
    """Generated and held-out grids decoded to atoms the same way (density route) and compared by
    mofkit.structure_report / structure_targets; writes two generated structures as XYZ and a picture.
    "real_vs_real" holds the same targets for as many real training cubes against the held-out ones: what the
    figures' sampling noise allows real structures."""
    params = mofkit.ShardDataset(out / "heldout").params
    kw = dict(params.decode_kwargs(), e_scale_K=e_scale_K)
    real = heldout[:n]
    generated = mofkit.sample(checkpoint, len(real), seed=2000 + seed)
    tables = {"generated": mofkit.structure_report(generated, **kw), "real": mofkit.structure_report(real, **kw),
              "real_train": mofkit.structure_report(train_real[:len(real)], **kw)}
    targets = mofkit.structure_targets(tables["generated"], tables["real"])
    real_vs_real = mofkit.structure_targets(tables["real_train"], tables["real"])
    print(targets, "\nreal training cubes vs held-out:\n", real_vs_real, sep="")
    decode = lambda g: mofkit.grid_to_atoms(g, **params.decode_kwargs())
    for k in range(2):
        mofkit.write_xyz(decode(generated[k]), out / f"generated_{k}.xyz")
    write_atoms_picture(decode(real[0]), decode(generated[0]), out / "atoms.png")
    as_json = lambda frame: json.loads(frame.to_json(orient="records"))  # numpy types and NaN -> JSON
    return {"n": len(real), "targets": as_json(targets.reset_index()),
            "real_vs_real": as_json(real_vs_real.reset_index()),
            "medians": {name: as_json(t.median(numeric_only=True).to_frame().T)[0] for name, t in tables.items()}}


def write_atoms_picture(real, generated, path):
    """Held-out and generated cubes decoded to atoms, side by side (ase's plot_atoms, looking down z)."""
    import matplotlib
    import matplotlib.pyplot as plt
    from ase.visualize.plot import plot_atoms
    matplotlib.use("Agg")
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, atoms, title in zip(axes, (real, generated), ("held-out, decoded", "generated, decoded")):
        if len(atoms):
            plot_atoms(atoms, ax, radii=0.4)
        else:  # ase cannot draw an empty structure
            ax.text(0.5, 0.5, "no atom decoded", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{title}: {len(atoms)} atoms in a {atoms.cell[0, 0]:.0f} Å cube")
        ax.set_xlabel("x (Å)")
        ax.set_ylabel("y (Å)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cpus():
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def write_pictures(out, real, generated, history, report=None, pairs=2):
    for k in range(min(pairs, len(real), len(generated))):
        mofkit.plot_slices([real[k, 0], generated[k, 0]], titles=["held-out (clipped to GAN range)", "generated"],
                           path=out / f"slices_{k}.png")
    if len(history):
        mofkit.plot_history(history, path=out / "loss.png")
    if report is not None:
        mofkit.plot_evaluation(report, path=out / "one_nn.png")


# --- ship ---------------------------------------------------------------------

def ship(checkpoint, path, manifest_csv, command) -> dict:
    """Export the generator for `sample` (see mofkit.export_generator) and record its sha256 and size in the
    manifest as a "weights" row, so mofkit.load_generator refuses any other file under that name."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    row = mofkit.record_weights(mofkit.export_generator(checkpoint, path), manifest_csv, source=command)
    return {"path": row["file"], "bytes": row["bytes"], "sha256": row["sha256"]}


# --- command line ------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scale", choices=SCALES, default="cpu")
    p.add_argument("--out", type=Path, default=None, help="work folder (shards, run, results); default runs/<scale>")
    p.add_argument("--budget-min", type=float, default=None,
                   help="total training wall-clock budget in minutes (cpu default 60; gpu: the epoch target)")
    p.add_argument("--chunk-min", type=float, default=None,
                   help="stop this call after this many minutes (checkpointed); run again to continue (gpu default 9)")
    p.add_argument("--device", default=None, help="voxelizer/training/scoring device (default: cuda if available)")
    p.add_argument("--source", default=None, help="a folder of .cif files instead of CoRE MOF 2019-ASR (tests)")
    p.add_argument("--ship", type=Path, default=None,
                   help="also export the trained generator to this file and record its sha256 in --manifest")
    p.add_argument("--manifest", type=Path, default=ROOT / "data_manifest.csv")
    p.add_argument("--no-progress", action="store_true")
    for f in dataclasses.fields(Scale):  # tiny settings for tests, or another channel count
        p.add_argument("--" + f.name.replace("_", "-"), type=str if f.type in ("str", str) else
                       (float if f.type in ("float", float) else int), default=None)
    args = p.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Scale) if getattr(args, f.name) is not None}
    scale = dataclasses.replace(SCALES[args.scale], **overrides)
    out = args.out or ROOT / "runs" / args.scale
    budget_min = args.budget_min if args.budget_min is not None else (60.0 if args.scale == "cpu" else None)
    chunk_min = args.chunk_min if args.chunk_min is not None else (9.0 if args.scale == "gpu" else None)
    deadline = time.monotonic() + 60 * chunk_min if chunk_min is not None else math.inf
    # of a chunk, keep 30 s for the last checkpoint, and evaluate only with 2 min left (else the next call
    # does); both capped at a fraction of the chunk so tiny test chunks work the same way
    checkpoint_s, evaluate_s = (min(30.0, 6 * chunk_min), min(120.0, 12 * chunk_min)) if chunk_min else (0, 0)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    progress = not args.no_progress
    out.mkdir(parents=True, exist_ok=True)

    split = ensure_split(scale, args.source)
    print(f"split {scale.split_csv}: {len(split['train'])} train, {len(split['heldout'])} held-out structures")
    if not build_grids(out, split, scale, args.source, device, deadline, progress):
        print(f"stopped after {chunk_min} min while voxelizing: run the same command again to continue")
        return None
    if not all_trained(out, scale, budget_min):
        train_chunk(out, scale, budget_min, deadline - checkpoint_s, device, progress)
    epoch, time_s, _ = training_state(out / "run")
    if not all_trained(out, scale, budget_min):
        print(f"trained {time_s / 60:.1f} min, {epoch} epochs so far: run the same command again to continue")
        return None
    if deadline - time.monotonic() < evaluate_s:
        print(f"training finished ({epoch} epochs): run the same command again to evaluate")
        return None
    results = evaluate(out, scale, device=device)
    if args.ship is not None:
        results["weights"] = ship(out / "run" / "last.pt", args.ship, args.manifest, results["command"])
        with mofkit.atomic_write(out / "results.json", "w") as f:
            json.dump(results, f, indent=2)
    print(f"1-NN (raw voxels) {100 * results['evaluation']['accuracy']:.1f}% -> {out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
