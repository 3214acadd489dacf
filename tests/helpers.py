"""Helpers and data shared by the test files: tiny grids, configs, CIFs, shard folders and fixtures' paths.

Kept apart from conftest.py (pytest's hooks and the HTTP-server fixture): tests import what they use by name,
`from helpers import tiny_config, random_grids`.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import mofkit  # noqa: E402
from conftest import ranged  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FAST = dict(timeout_s=0.5, retries=2, backoff_s=0.01, progress=False)  # tiny timeouts and backoff keep tests fast
PAYLOAD = np.random.default_rng(0).bytes(300_000)  # several chunks; random, so a wrong offset shows
DRIVE_ID = "1AbCdEfGhIjKlMnOpQrStUvWxYz012345"
ISODB = FIXTURES / "isodb"
MOFXDB = FIXTURES / "mofxdb"
ISODB_FILES = sorted(p.stem for p in ISODB.glob("10.*.json"))
CIF_TEMPLATE = """data_{name}
_cell_length_a {a}
_cell_length_b {b}
_cell_length_c {c}
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_space_group_name_H-M 'P 1'
loop_
_atom_site_label
_atom_site_type_symbol
_atom_site_fract_x
_atom_site_fract_y
_atom_site_fract_z
{sites}
"""
STUDY_ISOTHERM = FIXTURES / "isodb" / "10.1002adem.200500223.isotherm1.json"
H2_LIQUID_MOL_M3 = 70.85 / 2.01588e-3  # liquid H2 at 20.4 K, mol/m^3
TINY = mofkit.GridParams(size=8, spacing_A=1.0, cutoff_A=6.0)  # 8^3 grids and a short cutoff keep builds fast


def sha256_hex(data):
    import hashlib
    return hashlib.sha256(data).hexdigest()


def isodb_records():
    return [json.loads((ISODB / f"{name}.json").read_text()) for name in ISODB_FILES]


def serve_isodb(server):
    """The five real isotherm records, plus list endpoints in the API's shape derived from them.

    The list endpoints carry the fields fetch_isodb relies on (isotherms.json: filename, DOI, adsorbent
    hashkey, adsorbate InChIKeys, temperature; materials.json / gases.json: name, synonyms and the key).
    """
    records = isodb_records()
    for record in records:
        server.route(f"/isodb/api/isotherm/{record['filename']}.json", record)
    server.route("/isodb/api/isotherms.json", [
        {k: r[k] for k in ("filename", "DOI", "adsorbent", "temperature")}
        | {"adsorbates": [{"InChIKey": a["InChIKey"]} for a in r["adsorbates"]]} for r in records])
    materials = {r["adsorbent"]["hashkey"]: r["adsorbent"]["name"] for r in records}
    server.route("/matdb/api/materials.json", [
        {"hashkey": k, "name": n, "synonyms": ["HKUST-1"] if n == "CuBTC" else []} for k, n in materials.items()])
    gases = {a["InChIKey"]: a["name"] for r in records for a in r["adsorbates"]}
    server.route("/isodb/api/gases.json", [{"InChIKey": k, "name": n, "synonyms": []} for k, n in gases.items()])
    server.route("/isodb/api/biblio/10.1002adem.200500223.json",
                 json.loads((ISODB / "biblio.10.1002adem.200500223.json").read_text()))


def mofxdb_pages():
    """The real 3-MOF page cut into pages of one MOF each, to exercise paging ('pages' says 3)."""
    results = json.loads((MOFXDB / "mofs.page1.sample.json").read_text())["results"]

    def answer(request):
        page = int(request.query.get("page", 1))
        return {"results": [results[page - 1]], "page": page, "pages": len(results)}
    return results, answer


def make_cif(sites, a=30.0, b=None, c=None, name="test"):
    """A P1 CIF text with (symbol, fx, fy, fz) sites."""
    lines = "\n".join(f"{s}{i} {s} {x} {y} {z}" for i, (s, x, y, z) in enumerate(sites))
    return CIF_TEMPLATE.format(name=name, a=a, b=b or a, c=c or a, sites=lines)


def study_points():
    """H2 on Cu3(BTC)2 at 77 K as the study used it: bar, cm3(STP)/g / 22.4 -> mmol/g."""
    record = json.loads(STUDY_ISOTHERM.read_text())
    assert record["pressureUnits"] == "bar" and record["adsorptionUnits"] == "cm3(STP)/g"
    P = np.array([p["pressure"] for p in record["isotherm_data"]])
    q = np.array([p["total_adsorption"] for p in record["isotherm_data"]]) / 22.4
    return P, q


def random_grid(seed=0, size=12, capped=0.3):
    rng = np.random.default_rng(seed)
    grid = rng.uniform(-1200.0, 3000.0, (size, size, size))
    grid[rng.random(grid.shape) < capped] = 5000.0  # inside atoms, as the voxelizer caps them
    return grid.astype(np.float32)


# Independent references: CoolProp's own PT density, and the density at a given fugacity found by root-finding
# CoolProp's fugacity in P (no table, no interpolation).
def coolprop_density(fluid, T, P_Pa):
    import CoolProp.CoolProp as CP
    state = CP.AbstractState("HEOS", fluid)
    state.update(CP.PT_INPUTS, P_Pa, T)
    return state.rhomolar() * state.gas_constant() / mofkit.R_J_PER_MOL_K, state.fugacity(0)


def density_at_fugacity(fluid, T, f_Pa):
    import CoolProp.CoolProp as CP
    from scipy.optimize import brentq
    state = CP.AbstractState("HEOS", fluid)

    def gap(ln_p):
        state.update(CP.PT_INPUTS, np.exp(ln_p), T)
        return np.log(state.fugacity(0) / f_Pa)
    ln_p = brentq(gap, np.log(f_Pa) - 12, min(np.log(f_Pa) + 3, np.log(4e8)), xtol=1e-14)  # 4e8 Pa: below H2's
    # melting line at 77 K
    return coolprop_density(fluid, T, np.exp(ln_p))[0]


def synthetic_shards(folder, counts, channels=1, size=4):
    """Shards whose grids are filled with their global id (exact in float16), named s<id>."""
    paths, start = [], 0
    for k, n in enumerate(counts):
        ids = np.arange(start, start + n)
        grids = np.broadcast_to(ids[:, None, None, None, None], (n, channels, size, size, size)).copy()
        grids[:, 1:] *= -1  # further channels differ from channel 0
        names = [f"s{i}" for i in ids]
        meta = {"source": "synthetic", "params": {}, "members": names, "names": names, "failures": [],
                "properties": {"columns": ["id"], "rows": [[int(i)] for i in ids]}}
        paths.append(folder / f"shard_{k:05d}.npy")
        mofkit.write_shard(paths[-1], grids, meta)
        start += n
    return paths


def dataset_ids(dataset):
    return [int(x[0, 0, 0, 0]) for x in dataset]


def tag_with_worker(x):
    """Adds 1000 x (DataLoader worker id + 1) to a grid (exact in float32 for small ids)."""
    return x + 1000 * (torch.utils.data.get_worker_info().id + 1)


def cif_folder(folder):
    """Five small porous cells mof0..mof4; mof2 is broken."""
    folder.mkdir()
    for i in range(5):
        text = make_cif([("Zn", 0.1, 0.1, 0.1), ("O", 0.1 + 0.02 * i, 0.3, 0.1)], a=8.0 + i)
        (folder / f"mof{i}.cif").write_text("garbage\n" if i == 2 else text)
    return folder


def counting_voxelize(monkeypatch, interrupt_at=None):
    calls, real = [], mofkit.voxelize_many

    def voxelize_many(structures, **kwargs):
        for atoms in structures:
            calls.append(atoms.info["name"])
            if len(calls) == interrupt_at:
                raise KeyboardInterrupt  # a Colab session stopped mid-shard
        return real(structures, **kwargs)

    monkeypatch.setattr(mofkit, "voxelize_many", voxelize_many)
    return calls


def published_shards(tmp_path, http_server):
    """Shards built into pub/ and served over HTTP; returns the manifest path and the files' bytes."""
    rows = mofkit.build_shards(tmp_path / "pub", cif_folder(tmp_path / "cifs"), params=TINY, shard_size=2,
                               progress=False)
    files = {r["file"]: (tmp_path / "pub" / r["file"]).read_bytes() for r in rows}
    for r in rows:
        http_server.route(f"/{r['file']}", ranged(files[r["file"]]))
        r["url"] = f"{http_server.url}/{r['file']}"
    manifest = tmp_path / "data_manifest.csv"
    mofkit.write_manifest(manifest, rows)
    return manifest, files


def random_grids(n, dim=16, channels=1, seed=0, fill=None):
    """Kelvin grids with wells and repulsive walls, like the voxelizer's output."""
    g = torch.Generator().manual_seed(seed)
    grids = [torch.rand(channels, dim, dim, dim, generator=g) * 1500 - 1000 for _ in range(n)]
    if channels > 1:
        for x in grids:
            x[1:] = x[1:].abs() / 1000
    if fill is not None:
        for x in grids:
            x.fill_(fill)
    return grids


def tiny_config(**kw):
    base = dict(dim=16, channels=8, latent=8, batch_size=2, e_scale_K=800.0, log_every=1, device="cpu",
                checkpoint_every_steps=1000)
    return mofkit.TrainConfig(**{**base, **kw})


def blob_grids(n, dim=16, seed=0):
    """Kelvin grids like the voxelizer's: repulsive (+2000 K) everywhere but a few Gaussian wells (to -600 K)."""
    rng = np.random.default_rng(seed)
    ax = np.arange(dim)
    out = []
    for _ in range(n):
        e = np.full((dim,) * 3, 2000.0)
        for _ in range(rng.integers(2, 5)):
            c, r = rng.uniform(3, dim - 3, 3), rng.uniform(2, 4)
            d2 = (ax[:, None, None] - c[0]) ** 2 + (ax[None, :, None] - c[1]) ** 2 + (ax[None, None, :] - c[2]) ** 2
            e = np.minimum(e, np.where(d2 < (2 * r) ** 2, -600.0 * np.exp(-d2 / r ** 2), 2000.0))
        out.append(torch.from_numpy(e[None].astype(np.float32)))
    return out


DDP_CHILD = """
import os, sys, torch
sys.path.insert(0, {root!r})
import mofkit
torch.set_num_threads(1)
torch.distributed.init_process_group("gloo")  # as a user script under torchrun may; train() then reuses it
rank = int(os.environ["RANK"])
g = torch.Generator().manual_seed(0)
data = [torch.rand(1, 16, 16, 16, generator=g) * 1500 - 1000 for _ in range(8)]
cfg = mofkit.TrainConfig(dim=16, channels=8, latent=8, batch_size=2, e_scale_K=800.0, log_every=1, device="cpu",
                         epochs=1)
for run, dataset, steps in [("list", data, 2), ("stream", mofkit._Reiterable(data[:8 - 2 * rank]), None)]:
    res = mofkit.train(cfg, dataset, {out!r} + "/" + run, max_steps=steps, progress=False)
    torch.save([p.detach() for m in (res.generator, res.discriminator) for p in m.parameters()],
               {out!r} + f"/{{run}}/params{{rank}}.pt")
# The script made the group, so it ends it, both ranks together, and then leaves without the interpreter's
# teardown: torch's at-exit teardown after a gloo run sometimes aborts a rank ("terminate called without an
# active exception", exit -6) after all its work is saved -- twice in CI, 1 of 40 pairs here without
# OMP_NUM_THREADS, even with the group destroyed; with this ending 0 of 130 (2026-12-06).
torch.distributed.barrier()
torch.distributed.destroy_process_group()
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
"""


def sklearn_loo_1nn(features):
    from sklearn.model_selection import LeaveOneOut, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier
    X = np.concatenate([f.reshape(len(f), -1) for f in features]).astype(np.float64)
    y = np.repeat([0, 1], [len(f) for f in features])
    return (cross_val_predict(KNeighborsClassifier(n_neighbors=1), X, y, cv=LeaveOneOut()) == y)


def image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def small_framework():
    from ase import Atoms
    # a cubic cell with one of each class, off-grid positions, two C atoms 1.4 A apart on a diagonal
    return Atoms(["Zn", "C", "C", "N", "O", "H", "S"],
                 positions=[[1.13, 2.07, 3.31], [4.21, 4.77, 1.62], [5.02, 5.58, 2.43], [2.38, 6.11, 5.29],
                            [6.74, 1.41, 6.02], [3.5, 3.2, 7.1], [7.3, 7.45, 4.4]],
                 cell=[8.3, 8.3, 8.3], pbc=True)


def params_from_json(params):
    return mofkit.GridParams(**json.loads(params.to_json()))


def colab_stand_in(folder):
    """A stand-in google.colab imported at kernel start, as Colab's kernels do (an IPython startup file);
    drive.mount only records its calls in folder/mounts.txt. -> environment variables for the kernel."""
    package = folder / "site" / "google" / "colab"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "drive.py").write_text("def mount(mountpoint, **kwargs):\n"
                                      f"    with open({str(folder / 'mounts.txt')!r}, 'a') as f:\n"
                                      "        f.write(mountpoint + '\\n')\n")
    startup = folder / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-colab.py").write_text("import google.colab\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder / "site"), os.environ.get("PYTHONPATH")])),
            "IPYTHONDIR": str(folder / "ipython")}


def local_repository(folder):
    """This working tree's tracked files (as they are now) committed to a fresh git repository at folder."""
    import shutil
    import subprocess
    git = lambda *args, cwd: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                                            check=True, capture_output=True)
    tracked = git("ls-files", "-z", cwd=REPO).stdout.decode().split("\0")
    for name in filter(None, tracked):
        if (REPO / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, folder / name)
    git("init", "-q", cwd=folder)
    git("add", "-A", cwd=folder)
    git("commit", "-q", "-m", "snapshot", cwd=folder)
    return folder


def notebook_outputs(nb, pattern):
    """Text of every stream/result output of the executed notebook that matches `pattern` (a regex)."""
    import re
    texts = [o.get("text") or o.get("data", {}).get("text/plain", "") for c in nb.cells if c.cell_type == "code"
             for o in c.outputs]
    return [m for t in texts for m in re.findall(pattern, t)]
