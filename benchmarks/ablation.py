"""Ablation of the training recipe at the CPU scale: each ingredient's effect on held-out 1-NN and properties.

    OMP_NUM_THREADS=1 python benchmarks/ablation.py --variant ema --epochs 15          # one run (resumable)
    python benchmarks/ablation.py --table                                             # the README table

Every variant trains the same dim-32, 64-channel GAN (benchmarks/reproduce.py's cpu scale: the same
2,000 training grids of benchmarks/split_cpu32.csv, batch 8 unless the recipe says otherwise) for the same
number of epochs (samples seen, not wall-clock time: the machine is shared) on one thread, then is scored by mofkit.evaluate against 500 held-out grids (one sampling
seed; the references -- real floor, near-blank, mean grid + noise -- are measured once, in the table call).
Run two variants side by side on a 2-core machine (one thread each). Results: runs/cpu32/ablation/<variant>/.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import mofkit  # noqa: E402
import reproduce  # noqa: E402

# Each variant changes the TrainConfig of the cpu scale; "lsgan" is the first round's recipe (LSGAN on D's
# raw score, the study's "wells" transform, no EMA), "study" the study's exact one (Sigmoid D + MSE, batch 2).
VARIANTS = {
    "study": {"study": True},
    "lsgan": {"ema": 0.0},
    "ema": {"ema": 0.999},
    "ema+r1": {"ema": 0.999, "r1_gamma": 1.0},
    "ema+signed": {"ema": 0.999, "transform": "signed"},
    "ema+augment": {"ema": 0.999, "augment": True},
    "ema+hinge": {"ema": 0.999, "loss": "hinge"},
    "ema+nonsat": {"ema": 0.999, "loss": "nonsat"},
}


def config_for(variant, scale, epochs, seed=0):
    recipe = dict(VARIANTS[variant])
    study = recipe.pop("study", False)
    scale = reproduce.dataclasses.replace(scale, study=study, seed=seed, epochs=epochs, checkpoint_every_min=3.0)
    return reproduce.train_config(scale, "cpu", **recipe)


def run_variant(variant, out, scale, epochs, seed=0, progress=False):
    """Train (resuming) for `epochs` epochs, then score; writes result.json."""
    run_dir = out / "ablation" / (variant if seed == 0 else f"{variant}_seed{seed}")
    config = config_for(variant, scale, epochs, seed)
    dataset = mofkit.ShardDataset(out / "train", seed=seed, batch_size=config.batch_size)
    mofkit.train(config, dataset, run_dir, resume=True, progress=progress)
    heldout, _ = mofkit.read_grids(out / "heldout", scale.n_eval, seed=scale.seed)
    train_real, meta = mofkit.read_grids(out / "train", scale.n_eval, seed=scale.seed)
    density = float(np.median(meta["density_kg_m3"]))
    report = mofkit.evaluate(run_dir / "last.pt", heldout, train_real, sampling_seeds=(0,), baselines=False,
                             density_kg_m3=density, seed=scale.seed)
    ckpt = mofkit.load_checkpoint(run_dir / "last.pt")
    history = mofkit.load_history(run_dir)
    result = {"variant": variant, "seed": seed, "recipe": VARIANTS[variant], "config": ckpt["config"],
              "train_min": ckpt["time_s"] / 60, "steps": ckpt["step"],
              "epochs": ckpt["epoch"] + ckpt["samples_in_epoch"] / 2000,
              "d_fake_last": float(history["d_fake"].tail(20).mean()),
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "evaluation": reproduce.report_dict(report)}
    with mofkit.atomic_write(run_dir / "result.json", "w") as f:
        json.dump(result, f, indent=2)
    print(report)
    return result


def references(out, scale):
    heldout, _ = mofkit.read_grids(out / "heldout", scale.n_eval, seed=scale.seed)
    train_real, meta = mofkit.read_grids(out / "train", scale.n_eval, seed=scale.seed)
    e_scale = float(mofkit.pick_e_scale(train_real))
    report = mofkit.evaluate(train_real, heldout, train_real, e_scale_K=e_scale,
                             density_kg_m3=float(np.median(meta["density_kg_m3"])), seed=scale.seed)
    return report


def table(out, scale):
    """Markdown rows: variant, seed, minutes, epochs, 1-NN raw/pooled/histogram (generated class), W1, core, rough."""
    rows = []
    for path in sorted((out / "ablation").glob("*/result.json")):
        r = json.loads(path.read_text())
        acc = {(x["features"], x["set"].startswith("generated")): x for x in r["evaluation"]["one_nn"]}
        props = r["evaluation"]["properties"]
        gen = next(k for k in props if k.startswith("generated"))
        ref = props["held-out (reference)"]
        cells = [f"{100 * acc[(f, True)]['accuracy']:.1f} ({100 * acc[(f, True)]['generated_accuracy']:.0f})"
                 for f in mofkit.FEATURES]
        log_key = next(k for k in props[gen] if k.startswith("W1 log10"))
        rows.append(f"| {r['variant']} | {r['seed']} | {r['train_min']:.0f} | {r['epochs']:.1f} | " + " | ".join(cells)
                    + f" | {props[gen][log_key]:.3f} | {props[gen]['core fraction']:.3f} ({ref['core fraction']:.3f})"
                    f" | {props[gen]['roughness K']:.0f} ({ref['roughness K']:.0f}) |")
    head = ("| variant | seed | min | epochs | 1-NN raw % (gen. class) | pooled | histogram | W1 log10 K_H | "
            "core fraction (real) | roughness K (real) |\n|---|---|---|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", choices=VARIANTS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=15, help="training epochs (the same for every variant)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "cpu32")
    p.add_argument("--table", action="store_true", help="print the table of finished variants and the references")
    args = p.parse_args(argv)
    scale = reproduce.SCALES["cpu"]
    if args.variant:
        run_variant(args.variant, args.out, scale, args.epochs, args.seed)
    if args.table:
        print(references(args.out, scale))
        print(table(args.out, scale))


if __name__ == "__main__":
    main()
