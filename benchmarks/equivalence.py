"""Same results before and after a change that should not alter behaviour (a restructure): fingerprints of the
voxelizer, whole-cell properties, isotherm fits, grid isotherm, shards, a few training epochs (weights compared
bit for bit), sampling, the evaluation protocol, decoding and the structure report, from two revisions' mofkit.py.

    OMP_NUM_THREADS=1 python benchmarks/equivalence.py c43de56 HEAD      # two git revisions
    OMP_NUM_THREADS=1 python benchmarks/equivalence.py HEAD              # HEAD against the working tree

Each revision runs in its own process on the same inputs (CoRE MOF 2019 structures, the bundled ISODB record);
~1 min per revision on one thread. Exit status 1 when any fingerprint differs.
"""
import argparse
import hashlib
import importlib.util
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(path):
    spec = importlib.util.spec_from_file_location("mofkit", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mofkit"] = module
    spec.loader.exec_module(module)
    return module


def fingerprints(mofkit, tmp_dir) -> dict:
    """What the module computes, as hashes and rounded numbers (only APIs both sides of the restructure have)."""
    h = lambda a: hashlib.sha256(np.ascontiguousarray(np.asarray(a)).tobytes()).hexdigest()[:16]
    floats = lambda t: h(torch.cat([p.flatten() for p in t.values() if torch.is_floating_point(p)]).numpy())
    out = {}
    structs = {n: mofkit.load_coremof(n) for n in ("ABAVIJ_clean", "FIQCEN_clean", "ACOLIP_clean")}
    for n, a in structs.items():
        out[f"vox cube H2 {n}"] = h(mofkit.voxelize(a, size=32, frame="cube", spacing_A=1.0))
        out[f"vox cell CH4 {n}"] = h(mofkit.voxelize(a, size=24, frame="cell", probe="CH4"))
    a = structs["ABAVIJ_clean"]
    out["cell_properties"] = {k: round(float(v), 10) for k, v in mofkit.cell_properties(a, spacing_A=0.6).items()}
    iso = json.loads((ROOT / "tests/fixtures/isodb/10.1002adem.200500223.isotherm1.json").read_text())
    row = mofkit.isodb_table([iso]).iloc[0]
    P, q = np.array(row.pressure_bar), np.array(row.adsorption_mmol_g)
    for name, fit in {"sips_K2.5": mofkit.fit_sips(P, q, fix_K=2.5), "sips": mofkit.fit_sips(P, q),
                      "freundlich": mofkit.fit_freundlich(P, q), "langmuir": mofkit.fit_langmuir(P, q)}.items():
        out["fit " + name] = {k: round(float(v), 10) for k, v in fit.params.items()} | {"r2": round(fit.r2, 12)}
    g = mofkit.voxelize(a, size=32, frame="cube", spacing_A=1.0)
    est = mofkit.grid_isotherm(g, 77.0, [0.1, 1, 10, 100], density_kg_m3=mofkit.framework_density(a))
    out["grid_isotherm"] = [round(float(x), 8) for x in est.absolute_mmol_g]
    out["grid_properties"] = mofkit.grid_properties(g[None, None]).round(8).to_dict(orient="records")
    tmp = Path(tmp_dir)
    params = mofkit.ShardParams(size=16, spacing_A=1.0, cutoff_A=8.0)
    cifs = tmp / "cifs"
    cifs.mkdir()
    for n in ("ABAVIJ_clean", "ACOLIP_clean", "ABEFUL_clean", "ABETIN_clean", "ABEXEM_clean", "ABEXIQ_clean"):
        mofkit.load_coremof(n).write(cifs / f"{n}.cif")
    mofkit.build_shards(tmp / "shards", str(cifs), params=params, shard_size=3, progress=False)
    ds = mofkit.ShardDataset(tmp / "shards", seed=0, batch_size=2)
    shards = sorted((tmp / "shards").glob("shard_*.npy"))
    grids = np.concatenate([np.load(p, mmap_mode="r") for p in shards])
    out["shard grids"] = h(grids)
    meta = mofkit.read_shard_meta(shards[0])
    out["shard properties"] = json.dumps(meta.get("properties"), sort_keys=True)[:2000]
    config = mofkit.TrainConfig(dim=16, channels=8, latent=8, batch_size=2, log_every=1, device="cpu", epochs=3,
                                checkpoint_every_steps=1000)
    mofkit.train(config, ds, tmp / "run", progress=False)
    ck = mofkit.load_checkpoint(tmp / "run" / "last.pt")
    out["train G"], out["train D"] = floats(ck["generator"]), floats(ck["discriminator"])
    hist = mofkit.load_history(tmp / "run")
    out["history losses"] = hist[["step", "loss_d", "loss_g"]].round(8).values.tolist()
    out["sample"] = h(mofkit.sample(tmp / "run" / "last.pt", 4, seed=1))
    heldout, train = grids[:3].astype(np.float32), grids[3:6].astype(np.float32)
    rep = mofkit.evaluate(tmp / "run" / "last.pt", heldout, train, n=3, sampling_seeds=(0,), n_boot=50)
    out["evaluate"] = rep.one_nn.round(8).to_dict(orient="records")
    out["evaluate props"] = rep.properties.round(6).to_dict()
    dens = mofkit.density_channels(structs["FIQCEN_clean"], 32, 0.5, classes=mofkit.METAL_DENSITY_CLASSES)
    dec = mofkit.grid_to_atoms(dens, 0.5, classes=mofkit.METAL_DENSITY_CLASSES)
    out["decode"] = [dec.get_chemical_formula(), h(dec.positions)]
    out["report"] = mofkit.structure_report([dec]).round(8).to_dict(orient="records")
    return out


def module_at(revision, folder) -> Path:
    """mofkit.py of a git revision (None: the working tree) as a file in folder."""
    if revision is None:
        return ROOT / "mofkit.py"
    path = Path(folder) / f"mofkit_{revision.replace('/', '_')}.py"
    path.write_bytes(subprocess.run(["git", "show", f"{revision}:mofkit.py"], cwd=ROOT, check=True,
                                    capture_output=True).stdout)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("before", help="git revision")
    p.add_argument("after", nargs="?", default=None, help="git revision (default: the working tree)")
    p.add_argument("--one", type=Path, default=None, help=argparse.SUPPRESS)  # internal: fingerprint this module
    p.add_argument("--json", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        warnings.filterwarnings("ignore")
        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as tmp:
            args.json.write_text(json.dumps(fingerprints(load(args.one), tmp), sort_keys=True, default=str))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for label, revision in (("before", args.before), ("after", args.after)):
            out = Path(tmp) / f"{label}.json"
            subprocess.run([sys.executable, __file__, args.before, "--one", str(module_at(revision, tmp)),
                            "--json", str(out)], check=True)
            results[label] = json.loads(out.read_text())
    differ = [k for k in results["before"] if results["before"][k] != results["after"].get(k)]
    for key in results["before"]:
        print(f"{'DIFFERS' if key in differ else 'same':8s} {key}")
    print(f"{len(results['before']) - len(differ)} of {len(results['before'])} fingerprints the same "
          f"({args.before} vs {args.after or 'working tree'})")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
