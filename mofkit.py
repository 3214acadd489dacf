"""mofkit: MOF crystal structures -> periodic Lennard-Jones energy grids -> a 3D GAN that makes new ones.

One flat module, in pipeline order:

  1. Downloads        verified HTTP / Google Drive files, NIST-ARPA-E ISODB and MOFX-DB clients
  2. Structures       CIF files and the embedded CoRE MOF 2019 dataset as ase.Atoms
  3. Voxelizer        UFF + probe Lennard-Jones 12-6 energies on 3D grids, Henry coefficient, heat of adsorption
  4. Isotherms        Freundlich / Sips / Langmuir / BET fits, isotherm tables, grid isotherm estimate
  5. Shards           sharded grid datasets, data_manifest.csv, streaming torch dataset
  6. Models           the study's 3D GAN generator and discriminator
  7. Training         LSGAN training with checkpoints that resume exactly, AMP, DDP
  8. Scoring          1-NN two-sample accuracy, memorisation, adsorption-property distances
  9. Pictures         CT-style slice montages, loss curves, property histograms
 10. Inverse          energy / density grid -> atoms -> XYZ
 11. Command line     python mofkit.py ...

Units are in names: energies in kelvin (E/k_B, `_K`), lengths in angstrom (`_A`), pressures in bar.
"""
from __future__ import annotations

import os
import sys
import math
import json
import hashlib
import tempfile
import contextlib
from dataclasses import dataclass, field, asdict
from pathlib import Path

import numpy as np
import torch


# =============================================================================
# 1. Downloads: verified files over HTTP / Google Drive, NIST ISODB, MOFX-DB
# =============================================================================

@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temp file beside `path` and rename it into place on success.

    Readers (and a Colab session that dies mid-write) never see half a file: either the old
    file or the complete new one is there. On any error the temp file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def sha256_file(path, chunk_bytes=1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large shards never sit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            h.update(block)
    return h.hexdigest()




# =============================================================================
# 2. Structures: CIF files and the embedded CoRE MOF 2019 dataset
# =============================================================================

class StructureError(ValueError):
    """A structure that cannot become an energy grid; the message names the structure and the reason."""


def _coremof_archive(dataset):
    """Path of the tar.xz of CIFs that the `core-mof` package ships for `dataset`."""
    from importlib import resources
    import CoRE_MOF
    if dataset not in CoRE_MOF.list_datasets():
        raise KeyError(f"unknown CoRE MOF dataset {dataset!r}; choose from {CoRE_MOF.list_datasets()}")
    return resources.files(CoRE_MOF.data) / f"{dataset}.tar.xz"


def check_structure(atoms, name, min_distance_A=0.5):
    """Raise StructureError unless `atoms` is a 3D-periodic cell with known elements and no overlaps."""
    if len(atoms) == 0:
        raise StructureError(f"{name}: no atoms")
    if not atoms.pbc.all() or abs(atoms.cell.volume) < 1e-6:
        raise StructureError(f"{name}: cell has zero volume or is not periodic in 3D (cell={atoms.cell.cellpar().round(3).tolist()})")
    unknown = sorted(set(atoms.get_chemical_symbols()) - set(UFF))
    if unknown:
        raise StructureError(f"{name}: no force-field parameters for element(s) {', '.join(unknown)}")
    from ase.neighborlist import neighbor_list
    i, j, d = neighbor_list("ijd", atoms, min_distance_A)
    if len(d):
        k = int(np.argmin(d))
        raise StructureError(f"{name}: overlapping atoms {atoms[i[k]].symbol}{i[k]} and {atoms[j[k]].symbol}{j[k]} "
                             f"only {d[k]:.3f} A apart (< {min_distance_A} A)")


def read_structure(source, name=None, min_distance_A=0.5):
    """A CIF (file path, CIF text or bytes) as a checked P1 ase.Atoms with atoms.info["name"] set.

    ase applies the CIF's symmetry operations, so the result always holds every atom of the cell.
    """
    import io
    import warnings
    from ase.io.cif import parse_cif
    if isinstance(source, bytes):
        text = source.decode("utf-8", errors="replace")
    elif isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and not source.lstrip().startswith("data_")):
        path = Path(source)
        if not path.is_file():
            raise StructureError(f"{source}: no such CIF file")
        text, name = path.read_text(errors="replace"), name or path.stem
    else:
        text = source
    name = name or "structure"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ase warns on every CIF without occupancies/spacegroup tags
            block = next(b for b in parse_cif(io.StringIO(text)) if b.has_structure())
            # P1 files (all of CoRE MOF) skip ase's O(N^2) symmetry expansion: 15 s -> 0.05 s for 2,000 atoms
            p1 = block.get_spacegroup(True).no == 1
            atoms = block.get_unsymmetrized_structure() if p1 else block.get_atoms()
    except StopIteration:
        raise StructureError(f"{name}: malformed CIF (no cell and atom sites found)") from None
    except Exception as err:
        raise StructureError(f"{name}: malformed CIF ({type(err).__name__}: {err})") from None
    atoms.pbc = True
    check_structure(atoms, name, min_distance_A)
    atoms.info["name"] = name
    return atoms


def iter_cifs(source, failures=None, min_distance_A=0.5):
    """Yield (name, atoms) for a folder of *.cif files (sorted by name) or an iterable of CIF paths.

    Broken files are skipped; (name, reason) is appended to `failures` if given, so one bad file never
    stops a batch.
    """
    paths = sorted(Path(source).glob("*.cif")) if isinstance(source, (str, Path)) else [Path(p) for p in source]
    for path in paths:
        try:
            yield path.stem, read_structure(path, path.stem, min_distance_A)
        except StructureError as err:
            if failures is not None:
                failures.append((path.stem, str(err)))


def coremof_names(dataset="2019-ASR"):
    """Names of the structures in a CoRE MOF dataset (2019-ASR: 12,020 experimental MOFs, CC BY 4.0)."""
    import CoRE_MOF
    return list(CoRE_MOF.list_structures(dataset))


def coremof_properties(dataset="2019-ASR"):
    """The dataset's own property table (LCD, PLD, void fraction AV_VF, surface areas, metals, ...) by name."""
    import CoRE_MOF
    df = CoRE_MOF.get_properties(dataset)
    df = df.loc[:, [c for c in df.columns if not str(c).startswith("Unnamed")]]
    return df.set_index("filename")


def iter_coremof(dataset="2019-ASR", names=None, failures=None, min_distance_A=0.5):
    """Yield (name, atoms) for CoRE MOF structures, read one member at a time from the package's tar.xz.

    The archive is streamed (nothing is unpacked to disk). `names` restricts the set (archive order is kept).
    Structures that fail to parse or check are skipped; (name, reason) is appended to `failures` if given.
    """
    import tarfile
    wanted = None if names is None else set(names)
    seen = set()
    with _coremof_archive(dataset).open("rb") as raw, tarfile.open(fileobj=raw, mode="r|xz") as tar:
        for member in tar:
            name = member.name.rsplit("/", 1)[-1].removesuffix(".cif")
            if not member.isfile() or not member.name.endswith(".cif") or name.startswith("."):
                continue
            if wanted is not None and name not in wanted:
                continue
            seen.add(name)
            try:
                atoms = read_structure(tar.extractfile(member).read(), name, min_distance_A)
            except StructureError as err:
                if failures is not None:
                    failures.append((name, str(err)))
                continue
            yield name, atoms
            if wanted is not None and len(seen) == len(wanted):
                return
    if failures is not None and wanted is not None:
        failures.extend((n, f"{n}: not in CoRE MOF {dataset}") for n in sorted(wanted - seen))


def load_coremof(name, dataset="2019-ASR"):
    """One CoRE MOF structure by name, e.g. load_coremof("ABAVIJ_clean")."""
    failures = []
    for _, atoms in iter_coremof(dataset, [name], failures):
        return atoms
    raise StructureError(failures[0][1])




# =============================================================================
# 3. Voxelizer: force field, probe energies, grids, Henry coefficient
# =============================================================================

# UFF van der Waals parameters (Rappe et al., J. Am. Chem. Soc. 114, 10024 (1992)): element, x_i (A), D_i (kcal/mol).
_UFF_TABLE = """
H 2.886 0.044  He 2.362 0.056  Li 2.451 0.025  Be 2.745 0.085  B 4.083 0.180  C 3.851 0.105  N 3.660 0.069
O 3.500 0.060  F 3.364 0.050  Ne 3.243 0.042  Na 2.983 0.030  Mg 3.021 0.111  Al 4.499 0.505  Si 4.295 0.402
P 4.147 0.305  S 4.035 0.274  Cl 3.947 0.227  Ar 3.868 0.185  K 3.812 0.035  Ca 3.399 0.238  Sc 3.295 0.019
Ti 3.175 0.017  V 3.144 0.016  Cr 3.023 0.015  Mn 2.961 0.013  Fe 2.912 0.013  Co 2.872 0.014  Ni 2.834 0.015
Cu 3.495 0.005  Zn 2.763 0.124  Ga 4.383 0.415  Ge 4.280 0.379  As 4.230 0.309  Se 4.205 0.291  Br 4.189 0.251
Kr 4.141 0.220  Rb 4.114 0.040  Sr 3.641 0.235  Y 3.345 0.072  Zr 3.124 0.069  Nb 3.165 0.059  Mo 3.052 0.056
Tc 2.998 0.048  Ru 2.963 0.056  Rh 2.929 0.053  Pd 2.899 0.048  Ag 3.148 0.036  Cd 2.848 0.228  In 4.463 0.599
Sn 4.392 0.567  Sb 4.420 0.449  Te 4.470 0.398  I 4.500 0.339  Xe 4.404 0.332  Cs 4.517 0.045  Ba 3.703 0.364
La 3.522 0.017  Ce 3.556 0.013  Pr 3.606 0.010  Nd 3.575 0.010  Pm 3.547 0.009  Sm 3.520 0.008  Eu 3.493 0.008
Gd 3.368 0.009  Tb 3.451 0.007  Dy 3.428 0.007  Ho 3.409 0.007  Er 3.391 0.007  Tm 3.374 0.006  Yb 3.355 0.228
Lu 3.640 0.041  Hf 3.141 0.072  Ta 3.170 0.081  W 3.069 0.067  Re 2.954 0.066  Os 3.120 0.037  Ir 2.840 0.073
Pt 2.754 0.080  Au 3.293 0.039  Hg 2.705 0.385  Tl 4.347 0.680  Pb 4.297 0.663  Bi 4.370 0.518  Po 4.709 0.325
At 4.750 0.284  Rn 4.765 0.248  Fr 4.900 0.050  Ra 3.677 0.404  Ac 3.478 0.033  Th 3.396 0.026  Pa 3.424 0.022
U 3.395 0.022  Np 3.424 0.019  Pu 3.424 0.016  Am 3.381 0.014  Cm 3.326 0.013  Bk 3.339 0.013  Cf 3.313 0.013
Es 3.299 0.012  Fm 3.286 0.012  Md 3.274 0.011  No 3.248 0.011  Lr 3.236 0.011
"""
KCAL_PER_MOL_IN_K = 503.22            # 1 kcal/mol / k_B, as the issue and RASPA-style UFF tables use
_t = _UFF_TABLE.split()
# element -> (epsilon_K, sigma_A): epsilon = D_i in kelvin, sigma = x_i / 2^(1/6) (x_i is the LJ minimum distance)
UFF = {el: (float(d) * KCAL_PER_MOL_IN_K, float(x) / 2 ** (1 / 6)) for el, x, d in zip(_t[0::3], _t[1::3], _t[2::3])}
del _t

# Single-site probes: name -> (epsilon_K, sigma_A)
PROBES = {
    "H2": (34.2, 2.96),     # Buch, J. Chem. Phys. 100, 7610 (1994): the usual single-site H2 for GCMC at 77 K
    "CH4": (148.0, 3.73),   # TraPPE united atom (Martin & Siepmann 1998)
    "Ar": (119.8, 3.405),   # Michels et al. / Rowley; common GCMC argon
    "Kr": (166.4, 3.636),   # as in Sikora et al., Chem. Sci. 3, 2217 (2012) Xe/Kr screening
    "Xe": (221.0, 4.10),    # as in Sikora et al. 2012
    "He": (10.9, 2.64),     # Hirschfelder; the probe of helium void fractions (Talu & Myers 2001)
}
R_J_PER_MOL_K = 8.314462618
AMU_KG = 1.66053906660e-27


def pair_coefficients(symbols, probe="H2"):
    """Per-atom (A, B) in K*A^12 and K*A^6 with E = A/r^12 - B/r^6, by Lorentz-Berthelot mixing with the probe."""
    eps_p, sig_p = PROBES[probe] if isinstance(probe, str) else probe
    eps = np.array([math.sqrt(UFF[s][0] * eps_p) for s in symbols])
    sig = np.array([(UFF[s][1] + sig_p) / 2 for s in symbols])
    return 4 * eps * sig ** 12, 4 * eps * sig ** 6


def periodic_images(atoms, lo_A, hi_A, reach_A):
    """Positions and atom indices of every periodic image within reach_A of the axis-aligned box [lo_A, hi_A].

    Works for any triclinic cell, including cells thinner than twice the cutoff: the translation range comes
    from the box corners (widened by reach_A) in fractional coordinates.
    """
    cell = atoms.cell.array
    frac = atoms.get_scaled_positions(wrap=True)
    lo, hi = np.asarray(lo_A, float) - reach_A, np.asarray(hi_A, float) + reach_A
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    fc = corners @ np.linalg.inv(cell)
    ranges = [np.arange(math.floor(fc[:, d].min()) - 1, math.ceil(fc[:, d].max()) + 1) for d in range(3)]
    shifts = np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, 3)
    pos, idx = [], []
    for chunk in np.array_split(shifts, max(1, len(shifts) * len(atoms) // 2_000_000)):
        p = ((frac[None, :, :] + chunk[:, None, :]) @ cell).reshape(-1, 3)
        gap = np.maximum(np.maximum(lo_A - p, p - np.asarray(hi_A, float)), 0)
        keep = (gap ** 2).sum(1) < reach_A ** 2
        pos.append(p[keep])
        idx.append(np.tile(np.arange(len(atoms)), len(chunk))[keep])
    return np.concatenate(pos), np.concatenate(idx)


def _lj_blocks(blocks_A, atoms, probe, cutoff_A, device, dtype, pairs_per_batch):
    """Lennard-Jones energies (K) at points grouped in spatially compact blocks: (nb, P, 3) -> (nb, P).

    Each block only sees the atom images within cutoff + its own radius of its centre, so the work is
    ~ points x atoms-in-cutoff rather than points x all images. Blocks are batched with padding (a far-away
    dummy atom) so a GPU gets large kernels; pairs beyond the cutoff are masked (truncated, not shifted).
    """
    blocks = torch.as_tensor(blocks_A, dtype=torch.float64)
    nb, P, _ = blocks.shape
    centres = blocks.mean(1)
    radius = float((blocks - centres[:, None]).norm(dim=-1).max())
    flat = blocks.reshape(-1, 3)
    pos, idx = periodic_images(atoms, flat.min(0).values.numpy(), flat.max(0).values.numpy(), cutoff_A)
    A, B = pair_coefficients(np.array(atoms.get_chemical_symbols())[idx], probe)
    # index M is the dummy atom: far away, zero coefficients
    pos = torch.cat([torch.as_tensor(pos), torch.full((1, 3), 1e6, dtype=torch.float64)])
    A = torch.as_tensor(np.append(A, 0.0), dtype=dtype, device=device)
    B = torch.as_tensor(np.append(B, 0.0), dtype=dtype, device=device)
    M = len(pos) - 1
    # neighbour lists per block (float64 on the host: exact membership, cheap next to the energies)
    reach2 = (cutoff_A + radius) ** 2
    members = []
    for c in torch.split(centres, max(1, 2_000_000 // max(M, 1))):
        near = torch.cdist(c, pos[:M]) ** 2 < reach2
        members.extend(torch.nonzero(row).squeeze(1) for row in near)
    counts = torch.tensor([len(m) for m in members])
    order = torch.argsort(counts)                       # similar counts together: little padding
    rc_inv2 = 1.0 / cutoff_A ** 2
    out = torch.empty(nb, P, dtype=dtype, device=device)
    start = 0
    while start < nb:
        kmax = max(int(counts[order[start]]), 1)
        g = max(1, pairs_per_batch // (P * max(kmax, 1)))
        sel = order[start:start + g]
        kmax = max(int(counts[sel].max()), 1)
        nbr = torch.full((len(sel), kmax), M, dtype=torch.long)
        for row, b in enumerate(sel.tolist()):
            nbr[row, :counts[b]] = members[b]
        c = centres[sel]
        pts = (blocks[sel] - c[:, None]).to(device=device, dtype=dtype)          # (g, P, 3), relative: small numbers
        nb_pos = (pos[nbr] - c[:, None]).to(device=device, dtype=dtype)          # (g, K, 3)
        nbr = nbr.to(device)
        r2 = torch.baddbmm((pts * pts).sum(-1)[:, :, None] + (nb_pos * nb_pos).sum(-1)[:, None, :],
                           pts, nb_pos.transpose(1, 2), alpha=-2.0)
        inv = r2.clamp_(min=1e-6).reciprocal_()                                  # 1/r^2
        far = inv < rc_inv2
        inv3 = inv.pow_(3)                                                       # 1/r^6
        e = inv3 * A[nbr][:, None, :]
        e.sub_(B[nbr][:, None, :]).mul_(inv3).masked_fill_(far, 0.0)
        out[sel.to(device)] = e.sum(-1)
        start += len(sel)
    return out


def grid_points(atoms, size=64, frame="cube", spacing_A=0.5):
    """Cartesian points (size, size, size, 3) in A of a grid.

    frame="cube": an axis-aligned cube from the origin, point [i,j,k] at (i,j,k)*spacing_A; periodic images fill
    it, so every voxel is spacing_A wide whatever the cell (generated grids decode back to atoms in A).
    frame="cell": the study's fractional grid over the unit cell, point [i,j,k] at (i,j,k)/size in fractions.
    """
    i = np.arange(size, dtype=np.float64)
    ijk = np.stack(np.meshgrid(i, i, i, indexing="ij"), -1)
    if frame == "cube":
        return ijk * spacing_A
    if frame == "cell":
        return (ijk / size) @ atoms.cell.array
    raise ValueError(f"unknown frame {frame!r}: use 'cube' or 'cell'")


def _default_device(device):
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def probe_energy(atoms, points_A, probe="H2", cutoff_A=12.8, device=None, dtype=torch.float64):
    """Probe-framework LJ energy (K, uncapped) at arbitrary Cartesian points (..., 3), summed over all images.

    Float64 by default: this is the reference the grids are checked against.
    """
    pts = np.asarray(points_A, dtype=np.float64)
    flat = pts.reshape(-1, 3)
    # sort points into 4 A cells so each block of 256 is spatially compact
    key = np.floor((flat - flat.min(0)) / 4.0).astype(np.int64)
    order = np.lexsort(key.T[::-1])
    P = 256
    n = len(flat)
    padded = np.concatenate([flat[order], np.repeat(flat[order[-1:]], (-n) % P, 0)])
    e = _lj_blocks(padded.reshape(-1, P, 3), atoms, probe, cutoff_A, _default_device(device), dtype, 4_000_000)
    out = np.empty(n)
    out[order] = e.reshape(-1)[:n].double().cpu().numpy()
    return out.reshape(pts.shape[:-1])


def voxelize(atoms, size=64, frame="cube", spacing_A=0.5, probe="H2", cutoff_A=12.8, cap_K=5000.0, device=None,
             block=8, pairs_per_batch=None):
    """Energy grid (size, size, size) of float32 kelvin: probe-framework LJ 12-6, periodic, capped at cap_K.

    Grid points as in grid_points(). Points are processed in block^3 cubes of neighbouring voxels so each
    block only visits the atoms within its reach (see _lj_blocks).
    """
    device = _default_device(device)
    nblk = -(-size // block)
    pts = grid_points(atoms, nblk * block, frame, spacing_A) if frame == "cube" else \
        (np.stack(np.meshgrid(*[np.arange(nblk * block)] * 3, indexing="ij"), -1) / size) @ atoms.cell.array
    # (X, Y, Z, 3) -> (nblk^3 blocks, block^3 points, 3)
    blocks = pts.reshape(nblk, block, nblk, block, nblk, block, 3).transpose(0, 2, 4, 1, 3, 5, 6).reshape(-1, block ** 3, 3)
    if pairs_per_batch is None:
        pairs_per_batch = 64_000_000 if device.type == "cuda" else 1_000_000
    e = _lj_blocks(blocks, atoms, probe, cutoff_A, device, torch.float32, pairs_per_batch)
    e = e.clamp_(max=cap_K).nan_to_num_(nan=cap_K).cpu().numpy()
    e = e.reshape(nblk, nblk, nblk, block, block, block).transpose(0, 3, 1, 4, 2, 5).reshape((nblk * block,) * 3)
    return np.ascontiguousarray(e[:size, :size, :size])


def framework_density(atoms):
    """Crystal density in kg/m^3."""
    return float(atoms.get_masses().sum() * AMU_KG / (atoms.cell.volume * 1e-30))


def widom_factor(grid_K, temperature_K=77.0):
    """<exp(-E/kT)> over the grid: the dimensionless Henry factor (Widom insertion on the grid)."""
    e = np.asarray(grid_K, dtype=np.float64)
    return float(np.mean(np.exp(-e / temperature_K)))


def henry_coefficient(grid_K, density_kg_m3, temperature_K=77.0):
    """Henry coefficient K_H in mol kg^-1 Pa^-1: <exp(-E/kT)> / (R T rho_framework)."""
    return widom_factor(grid_K, temperature_K) / (R_J_PER_MOL_K * temperature_K * density_kg_m3)


def heat_of_adsorption(grid_K, temperature_K=77.0):
    """Isosteric heat at infinite dilution in kJ/mol: R (T - <E exp(-E/kT)> / <exp(-E/kT)>)."""
    e = np.asarray(grid_K, dtype=np.float64).ravel()
    w = np.exp(-(e - e.min()) / temperature_K)   # shifted by the minimum: no overflow in deep wells
    return float(R_J_PER_MOL_K * (temperature_K - (e * w).sum() / w.sum()) / 1000.0)




# =============================================================================
# 4. Isotherms: Freundlich, Sips, Langmuir and BET fits; grid isotherm estimate
# =============================================================================



# =============================================================================
# 5. Shards: sharded grid datasets, data_manifest.csv, streaming dataset
# =============================================================================



# =============================================================================
# 6. Models: the study's 3D GAN (after Wu et al. 2016)
# =============================================================================



# =============================================================================
# 7. Training: LSGAN with exact-resume checkpoints, mixed precision, DDP
# =============================================================================



# =============================================================================
# 8. Scoring: 1-NN two-sample accuracy, memorisation, property distances
# =============================================================================

def _resolve_device(device) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def _as_samples(x, name) -> torch.Tensor:
    """(n, ...) samples (numpy array, torch tensor or list of grids) as a float tensor, shared not copied."""
    t = torch.stack([torch.as_tensor(g) for g in x]) if isinstance(x, (list, tuple)) else torch.as_tensor(x)
    if t.ndim < 2 or len(t) == 0:
        raise ValueError(f"{name}: expected (n, ...) samples with n >= 1, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.float()
    for start in range(0, len(t), 256):  # in blocks: a 2,000-grid batch never gets a full-size mask
        if not torch.isfinite(t[start:start + 256]).all():
            raise ValueError(f"{name}: contains NaN or Inf (sample block starting at {start})")
    return t


def _features(parts, mode, device, chunk, downsample=4, bins=64) -> list[torch.Tensor]:
    """(n, d) feature rows for each part: raw values, grids average-pooled by `downsample`, or value histograms.

    Histograms share `bins` equal bins over the min..max of all parts together, normalised to fractions,
    so they compare the distribution of energies and ignore where in the grid they sit.
    """
    if mode == "raw":
        return [p.reshape(len(p), -1) for p in parts]
    if mode == "downsampled":
        for p in parts:
            if p.ndim not in (4, 5):
                raise ValueError(f"features='downsampled' needs (n, D, D, D) or (n, C, D, D, D) grids, "
                                 f"got shape {tuple(p.shape)}")
        pool = lambda x: torch.nn.functional.avg_pool3d(x if x.ndim == 5 else x[:, None], downsample,
                                                        ceil_mode=True).flatten(1)
        return [torch.cat([pool(p[s:s + chunk].to(device, torch.float32)) for s in range(0, len(p), chunk)])
                for p in parts]
    if mode == "histogram":
        lo = min(float(p.min()) for p in parts)
        hi = max(float(p.max()) for p in parts)
        inner_edges = torch.linspace(lo, hi, bins + 1, device=device)[1:-1]

        def histogram(x):
            x = x.to(device, torch.float32).flatten(1)
            counts = torch.zeros(len(x), bins, device=device)
            counts.scatter_add_(1, torch.bucketize(x, inner_edges), torch.ones_like(x))
            return counts / x.shape[1]

        return [torch.cat([histogram(p[s:s + chunk]) for s in range(0, len(p), chunk)]) for p in parts]
    raise ValueError(f"features={mode!r}: expected 'raw', 'downsampled' or 'histogram'")


def _nearest(queries, refs, same, device, dtype=torch.float32, chunk=512):
    """Index of, and float64-exact squared Euclidean distance to, the nearest ref row of every query row.

    `queries` and `refs` are lists of (n, d) tensors (read as one concatenated set each, never copied whole).
    Candidates come from chunked |a|^2 + |b|^2 - 2 a.b in `dtype` (the fast part: one matmul per block
    pair, on GPU if asked), with rows centred on the refs' mean so the cancellation stays small. Every
    candidate within the rounding bound of a query's best in a block is then re-measured as sum((a-b)^2)
    in float64: near-ties are decided exactly, exact ties go to the lowest ref index, and with `same`
    (queries are refs: leave-one-out) a row never picks itself.
    """
    def blocks(parts):
        offset = 0
        for p in parts:
            for s in range(0, len(p), chunk):
                yield offset + s, p[s:s + chunk]
            offset += len(p)

    nq, nr, d = sum(len(p) for p in queries), sum(len(p) for p in refs), refs[0].shape[1]
    if same and nr < 2:
        raise ValueError(f"leave-one-out needs at least 2 samples, got {nr}")
    mean = sum(r.to(device, torch.float64).sum(0) for _, r in blocks(refs)) / nr
    mean = mean.to(dtype)
    # rounding of the matmul form, relative to |a|^2 + |b|^2: measured <= 2 eps (blocked BLAS sums) for
    # d = 4096..262144; 64 eps leaves a wide margin and still rechecks only genuine near-ties
    rel_tol = 64 * torch.finfo(dtype).eps
    best_d = torch.full((nq,), math.inf, dtype=torch.float64, device=device)
    best_i = torch.full((nq,), -1, dtype=torch.long, device=device)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # TF32's 10-bit mantissa would make the bound meaningless
    try:
        for q0, q in blocks(queries):
            q = q.to(device)
            a = q.to(dtype) - mean
            a2 = (a * a).sum(1)
            for r0, r in blocks(refs):
                r = r.to(device)
                b = r.to(dtype) - mean
                b2 = (b * b).sum(1)
                dist = a2[:, None] + b2[None, :] - 2 * (a @ b.T)
                if same:
                    qi = torch.arange(q0, q0 + len(q), device=device)[:, None]
                    dist[qi == torch.arange(r0, r0 + len(r), device=device)[None, :]] = math.inf
                tol = rel_tol * (a2 + b2.max())
                local = dist.min(1).values
                candidate = (dist <= (local + tol)[:, None]) & (dist < math.inf)
                iq, ir = torch.nonzero(candidate, as_tuple=True)  # row-major: ir ascending within a row
                if len(iq) == 0:  # a block holding only the query itself
                    continue
                exact = torch.cat([((q[iq[s:s + 64]].double() - r[ir[s:s + 64]].double()) ** 2).sum(1)
                                   for s in range(0, len(iq), 64)])
                block_best = torch.full((len(q),), math.inf, dtype=torch.float64, device=device)
                block_best.scatter_reduce_(0, iq, exact, "amin")
                wins = exact == block_best[iq]
                block_arg = torch.full((len(q),), nr, dtype=torch.long, device=device)
                block_arg.scatter_reduce_(0, iq[wins], ir[wins] + r0, "amin")
                better = block_best < best_d[q0:q0 + len(q)]  # strict: earlier (lower-index) blocks win ties
                best_d[q0:q0 + len(q)][better] = block_best[better]
                best_i[q0:q0 + len(q)][better] = block_arg[better]
    finally:
        torch.set_float32_matmul_precision(precision)
    return best_i.cpu(), best_d.cpu()


def one_nn_accuracy(real, generated, features="raw", device=None, return_details=False,
                    dtype=torch.float32, chunk=512, downsample=4, bins=64):
    """Leave-one-out 1-nearest-neighbour accuracy of telling real from generated samples.

    Every sample of the union (n real + n generated) is labelled by its nearest other sample (squared
    Euclidean distance on `features`: "raw" voxels, "downsampled" (avg-pooled by `downsample`) or
    "histogram" (value distribution, `bins` bins)). 0.5 means indistinguishable (with equal n), 1.0 means
    perfectly separated; well below 0.5 means generated samples sit on top of real ones (copies).
    Equals scikit-learn's KNeighborsClassifier(n_neighbors=1) under LeaveOneOut. Distances are computed
    in blocks of `chunk` rows, so 2,000 + 2,000 64^3 grids never need more than a few blocks in memory;
    pass CUDA tensors (or device="cuda") to run on a GPU.
    Returns the accuracy, or with `return_details` a dict that adds the per-class accuracies
    ("real_accuracy", "generated_accuracy"), the counts and each sample's nearest neighbour index.
    """
    device = _resolve_device(device)
    real, generated = _as_samples(real, "real"), _as_samples(generated, "generated")
    if real.shape[1:] != generated.shape[1:]:
        raise ValueError(f"real samples have shape {tuple(real.shape[1:])} but generated ones "
                         f"{tuple(generated.shape[1:])}")
    parts = _features([real, generated], features, device, chunk, downsample, bins)
    nearest, _ = _nearest(parts, parts, same=True, device=device, dtype=dtype, chunk=chunk)
    labels = torch.cat([torch.zeros(len(real), dtype=torch.bool), torch.ones(len(generated), dtype=torch.bool)])
    correct = (labels[nearest] == labels).double()
    accuracy = correct.mean().item()
    if not return_details:
        return accuracy
    return {"accuracy": accuracy, "real_accuracy": correct[:len(real)].mean().item(),
            "generated_accuracy": correct[len(real):].mean().item(), "n_real": len(real),
            "n_generated": len(generated), "nearest": nearest.numpy()}


def memorisation(generated, train, heldout, features="raw", device=None, dtype=torch.float32, chunk=512,
                 downsample=4, bins=64) -> dict:
    """Do generated samples sit closer to the training set than unseen real samples do?

    d_gen[i] is the Euclidean distance (on `features`, as in one_nn_accuracy) from generated sample i to
    its nearest training sample; d_held[j] the same for held-out real sample j, which the GAN never saw.
    "fraction_closer" is the fraction of generated samples with d_gen < min_j d_held: closer to the
    training data than any held-out sample is. Copies of training samples score 1.0; a generator that
    draws fresh samples from the training distribution scores about 1/(n_heldout + 1).
    Also returned: "threshold" (min d_held), both distance arrays and each generated sample's nearest
    training index.
    """
    device = _resolve_device(device)
    sets = {"generated": generated, "train": train, "heldout": heldout}
    sets = {name: _as_samples(x, name) for name, x in sets.items()}
    shapes = {name: tuple(x.shape[1:]) for name, x in sets.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"sample shapes differ: {shapes}")
    gen, tr, held = _features(list(sets.values()), features, device, chunk, downsample, bins)
    nearest, gen_d2 = _nearest([gen], [tr], same=False, device=device, dtype=dtype, chunk=chunk)
    _, held_d2 = _nearest([held], [tr], same=False, device=device, dtype=dtype, chunk=chunk)
    gen_d, held_d = gen_d2.sqrt().numpy(), held_d2.sqrt().numpy()
    threshold = float(held_d.min())
    return {"fraction_closer": float((gen_d < threshold).mean()), "threshold": threshold,
            "generated_to_train": gen_d, "heldout_to_train": held_d, "nearest_train": nearest.numpy()}


def grid_properties(grids_K, temperature_K=77.0, density_kg_m3=None):
    """Widom factor, log10 of it (or of K_H when a density is given) and isosteric heat for each grid.

    Grids are (n, D, D, D) kelvin, or (n, C, D, D, D) with energy in channel 0. Returns a pandas
    DataFrame with one row per grid.
    """
    import pandas as pd
    grids = _as_samples(grids_K, "grids_K")
    if grids.ndim == 5:
        grids = grids[:, 0]
    rows = []
    for g in grids.numpy():
        widom = widom_factor(g, temperature_K)
        row = {"widom": widom, "log10_widom": math.log10(widom),
               "heat_kJ_mol": heat_of_adsorption(g, temperature_K)}
        if density_kg_m3 is not None:
            row["log10_henry"] = math.log10(henry_coefficient(g, density_kg_m3, temperature_K))
        rows.append(row)
    return pd.DataFrame(rows)


def property_comparison(real_grids_K, generated_grids_K, temperature_K=77.0, density_kg_m3=None, seed=0):
    """Adsorption properties of real vs generated kelvin grids: medians and Wasserstein distances.

    Generated grids have no framework, hence no density: with `density_kg_m3=None` the comparison uses
    log10 of the dimensionless Widom factor <exp(-E/kT)>; with a nominal density it reports log10 K_H
    (mol kg^-1 Pa^-1). One shared density shifts every log10 K_H by the same amount, so the Wasserstein
    distance is the same either way; only the medians change. The noise floor is the same distance
    between two random halves of the real grids ("wasserstein_real_halves"; halves are smaller than the
    full sets, so it slightly overstates the floor). Returns a DataFrame indexed by property.
    """
    import pandas as pd
    from scipy.stats import wasserstein_distance
    real = grid_properties(real_grids_K, temperature_K, density_kg_m3)
    gen = grid_properties(generated_grids_K, temperature_K, density_kg_m3)
    if len(real) < 2:
        raise ValueError(f"real_grids_K: need at least 2 grids to split into halves, got {len(real)}")
    half = np.random.default_rng(seed).permutation(len(real))
    first, second = half[:len(real) // 2], half[len(real) // 2:]
    columns = ["log10_widom" if density_kg_m3 is None else "log10_henry", "heat_kJ_mol"]
    return pd.DataFrame({c: {"median_real": real[c].median(), "median_generated": gen[c].median(),
                             "wasserstein": wasserstein_distance(real[c], gen[c]),
                             "wasserstein_real_halves": wasserstein_distance(real[c].iloc[first],
                                                                             real[c].iloc[second])}
                         for c in columns}).T



# =============================================================================
# 9. Pictures: CT-style slice montages, loss curves, histograms
# =============================================================================

def _save_figure(fig, path):
    """Write `fig` atomically when a path is given (format from the suffix, PNG by default); return it."""
    if path is not None:
        with atomic_write(path) as f:
            fig.savefig(f, format=Path(path).suffix.lstrip(".").lower() or "png", dpi=fig.dpi)
    return fig


def _energy_volume(grid, channel) -> np.ndarray:
    g = np.asarray(grid.detach().cpu() if torch.is_tensor(grid) else grid, dtype=np.float32)
    g = g[channel] if g.ndim == 4 else g
    if g.ndim != 3:
        raise ValueError(f"grid: expected (D, D, D) or (C, D, D, D), got shape {np.shape(grid)}")
    return g


def plot_slices(grid, titles=None, axis=0, channel=0, linthresh_K=10.0, cmap="RdBu_r", panel_in=0.9, path=None):
    """CT-style montage of every slice of a kelvin grid (64 slices -> an 8 x 8 panel); a list of grids
    (e.g. [real, generated]) gives montages side by side with one shared colour scale.

    Colours use a symmetric-log scale (linear within +-linthresh_K, logarithmic beyond) centred on 0 K:
    adsorption wells (E < 0, a few hundred K deep) show blue and repulsive cores (up to the +5000 K cap)
    red, both legible at once, which a linear scale (dominated by the cap) cannot do.
    Returns the matplotlib Figure (shown inline in a notebook); saves it when `path` is given.
    """
    from matplotlib.figure import Figure
    from matplotlib.colors import SymLogNorm
    volumes = [_energy_volume(g, channel) for g in (grid if isinstance(grid, (list, tuple)) else [grid])]
    titles = list(titles) if titles is not None else [None] * len(volumes)
    if len(titles) != len(volumes):
        raise ValueError(f"titles: {len(titles)} given for {len(volumes)} grids")
    n = volumes[0].shape[axis]
    ncols = math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    vmax = max(linthresh_K, max(float(np.abs(v).max()) for v in volumes))
    norm = SymLogNorm(linthresh=linthresh_K, vmin=-vmax, vmax=vmax, base=10)
    fig = Figure(figsize=(len(volumes) * ncols * panel_in + 1.2, nrows * panel_in + 0.5))
    outer = fig.add_gridspec(1, len(volumes) + 1, width_ratios=[ncols] * len(volumes) + [0.25],
                             left=0.02, right=0.9, bottom=0.02, top=0.93, wspace=0.08)
    for m, (volume, title) in enumerate(zip(volumes, titles)):
        if volume.shape[axis] != n:
            raise ValueError(f"grid {m} has {volume.shape[axis]} slices along axis {axis}, grid 0 has {n}")
        panels = outer[0, m].subgridspec(nrows, ncols, wspace=0.04, hspace=0.04).subplots(squeeze=False)
        for k, ax in enumerate(panels.flat):
            ax.set_axis_off()
            if k < n:
                image = ax.imshow(np.take(volume, k, axis=axis).T, origin="lower", cmap=cmap, norm=norm,
                                  interpolation="nearest")
        if title:
            panels[0, 0].set_title(title, loc="left", fontsize=11)
    fig.colorbar(image, cax=fig.add_subplot(outer[0, -1]), label="E / k$_B$ (K)")
    return _save_figure(fig, path)


def plot_history(history, path=None):
    """Training curves from the GAN history (DataFrame, list of dicts or CSV path): loss_* columns on
    the left, discriminator scores (columns naming D(real) / D(fake)) on the right, against `step`."""
    import pandas as pd
    from matplotlib.figure import Figure
    df = pd.read_csv(history) if isinstance(history, (str, Path)) else pd.DataFrame(history)
    losses = [c for c in df.columns if c.lower().startswith("loss")]
    scores = [c for c in df.columns if c.lower().startswith(("d_", "d(")) and ("real" in c or "fake" in c)]
    if not losses and not scores:
        raise ValueError(f"history: no loss_* or D(real)/D(fake) columns among {list(df.columns)}")
    x = df["step"] if "step" in df.columns else df.index
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    for ax, columns, ylabel in zip(fig.subplots(1, 2), (losses, scores), ("loss", "discriminator output")):
        for c in columns:
            ax.plot(x, df[c], label=c, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if columns:
            ax.legend()
    return _save_figure(fig, path)


def plot_property_histograms(real_vals, gen_vals, label="value", bins=30, path=None):
    """Overlaid histograms of a property for real and generated samples. Arrays give one panel;
    dicts or DataFrames give one panel per shared key (e.g. property_comparison's grid_properties)."""
    from matplotlib.figure import Figure
    if isinstance(real_vals, dict) or hasattr(real_vals, "columns"):
        keys = [k for k in real_vals.keys() if k in gen_vals.keys()]
        pairs = [(k, np.asarray(real_vals[k], float), np.asarray(gen_vals[k], float)) for k in keys]
    else:
        pairs = [(label, np.asarray(real_vals, float).ravel(), np.asarray(gen_vals, float).ravel())]
    if not pairs:
        raise ValueError("real_vals and gen_vals share no property")
    fig = Figure(figsize=(4.2 * len(pairs), 3.4), layout="constrained")
    for ax, (name, real, gen) in zip(np.atleast_1d(fig.subplots(1, len(pairs))), pairs):
        edges = np.histogram_bin_edges(np.concatenate([real, gen]), bins=bins)
        ax.hist(real, edges, alpha=0.55, density=True, label=f"real (n={len(real)})")
        ax.hist(gen, edges, alpha=0.55, density=True, label=f"generated (n={len(gen)})")
        ax.set_xlabel(name)
        ax.legend()
    return _save_figure(fig, path)



# =============================================================================
# 10. Inverse: grid -> atoms -> XYZ
# =============================================================================

DENSITY_CLASSES = ("metal", "C", "N", "O", "H", "other")
# Element written for a decoded atom of each class: the density channels do not say which metal it is
# ("Zn" is a placeholder) and "other" becomes ASE's dummy atom X.
CLASS_SYMBOLS = {"metal": "Zn", "other": "X"}
_NON_METALS = {"X", "H", "He", "B", "C", "N", "O", "F", "Ne", "Si", "P", "S", "Cl", "Ar", "Ge", "As", "Se",
               "Br", "Kr", "Sb", "Te", "I", "Xe", "At", "Rn"}


def element_class(symbol, classes=DENSITY_CLASSES) -> str:
    """Density class of an element: itself if it is a class, else "metal" for metals, else "other"."""
    if symbol in classes:
        return symbol
    return "metal" if "metal" in classes and symbol not in _NON_METALS else "other"


def _cube_images(atoms, size, spacing_A, margin_A):
    """(symbols, positions) of the periodic images within margin_A (> 0) of the sampled cube
    [0, (size-1)*spacing_A]^3: the frame of grid_points(atoms, size, "cube", spacing_A)."""
    positions, index = periodic_images(atoms, [0.0] * 3, [(size - 1) * spacing_A] * 3, margin_A)
    return np.array(atoms.get_chemical_symbols())[index], positions


def density_channels(atoms, size=64, spacing_A=0.5, sigma_A=0.5, classes=DENSITY_CLASSES) -> np.ndarray:
    """Gaussian-smeared atom densities per element class on the cube-frame grid, float32 (C, D, D, D).

    Same frame as voxelize(atoms, size, "cube", spacing_A), so these stack onto the energy grid as extra
    GAN channels. Each voxel holds the max (not the sum) over atoms of exp(-r^2 / 2 sigma^2): values
    stay in [0, 1], peak exactly 1 at an atom centre, and every atom's nearest voxel stays a local
    maximum however close its neighbours are, which is what grid_to_atoms(method="density") relies on.
    """
    if sigma_A <= 0 or spacing_A <= 0:
        raise ValueError(f"sigma_A and spacing_A must be positive, got {sigma_A}, {spacing_A}")
    reach = math.ceil(3 * sigma_A / spacing_A)  # exp(-4.5) = 0.011 at the window edge
    symbols, positions = _cube_images(atoms, size, spacing_A, (reach + 1) * spacing_A)
    channel = torch.tensor([classes.index(element_class(s, classes)) for s in symbols], dtype=torch.long)
    pos = torch.as_tensor(positions / spacing_A)  # in voxels
    window = torch.arange(-reach, reach + 1)
    window = torch.stack(torch.meshgrid(window, window, window, indexing="ij"), -1).reshape(-1, 3)
    out = torch.zeros(len(classes) * size ** 3, dtype=torch.float32)
    for s in range(0, len(pos), 4096):  # bounded memory for big cells
        voxel = pos[s:s + 4096].round().long()[:, None, :] + window[None]
        r2 = ((voxel - pos[s:s + 4096, None, :]) ** 2).sum(-1) * spacing_A ** 2
        keep = ((voxel >= 0) & (voxel < size)).all(-1)
        flat = ((channel[s:s + 4096, None] * size + voxel[..., 0]) * size + voxel[..., 1]) * size + voxel[..., 2]
        out.scatter_reduce_(0, flat[keep], torch.exp(-r2 / (2 * sigma_A ** 2))[keep].float(), "amax")
    return out.reshape(len(classes), size, size, size).numpy()


def _density_peaks(channels, threshold, spacing_A, sigma_A, min_separation_A):
    """(positions_A, class index, height) of atoms found as peaks in per-class density channels.

    A peak is a voxel above `threshold` and >= its 6 face neighbours (strictly > the lower-index one,
    so a flat top of two equal voxels gives one peak; cube faces may peak). It is refined to sub-voxel
    along each axis by the parabola through the log values of the peak and its neighbour(s) whose
    curvature is the known Gaussian's, -(spacing/sigma)^2 per voxel^2: exact for an isolated atom, and
    on a cube face it needs only the one inner neighbour. The shift stays within the peak voxel's cell
    (a neighbour lifted by another atom cannot drag it further); peaks that land outside the cube are
    images beyond it and dropped. Peaks of different channels closer than min_separation_A are one atom
    whose class is the strongest channel's.
    """
    from scipy.spatial import cKDTree
    size = channels.shape[-1]
    v = channels.astype(np.float64)
    padded = np.pad(v, [(0, 0)] + [(1, 1)] * 3, constant_values=-1.0)
    inner = (slice(None),) + (slice(1, -1),) * 3
    peak = v > threshold
    for axis in (1, 2, 3):
        peak &= v > np.roll(padded, 1, axis)[inner]
        peak &= v >= np.roll(padded, -1, axis)[inner]
    c, *ijk = np.nonzero(peak)
    ijk = np.stack(ijk, 1)
    height = v[c, ijk[:, 0], ijk[:, 1], ijk[:, 2]]
    kappa = -(spacing_A / sigma_A) ** 2
    log = lambda shift, axis: np.log(np.maximum(
        v[(c,) + tuple(np.clip(ijk[:, a] + (shift if a == axis else 0), 0, size - 1) for a in range(3))], 1e-12))
    centre = ijk.astype(np.float64)
    for axis in range(3):
        lm, l0, lp = log(-1, axis), log(0, axis), log(1, axis)
        low, high = ijk[:, axis] == 0, ijk[:, axis] == size - 1
        slope = np.where(low, lp - l0 - kappa / 2, np.where(high, l0 - lm + kappa / 2, (lp - lm) / 2))
        centre[:, axis] += np.clip(-slope / kappa, -0.5, 0.5)
    inside = np.all((centre > -1e-6) & (centre < size - 1 + 1e-6), axis=1)  # atoms on a face (often at 0) stay
    positions, c, height = np.clip(centre[inside], 0, size - 1) * spacing_A, c[inside], height[inside]
    order = np.argsort(-height, kind="stable")
    keep = np.ones(len(order), bool)
    tree = cKDTree(positions)
    for p in order:  # strongest first: weaker peaks of other channels near it are the same atom
        if keep[p]:
            near = tree.query_ball_point(positions[p], min_separation_A)
            keep[[q for q in near if q != p]] = False
    kept = order[keep[order]]
    return positions[kept], c[kept], height[kept]


def _core_radius_A(element, probe, threshold_K):
    """Distance (A) at which the element-probe pair energy A/r^12 - B/r^6 falls to threshold_K >= 0."""
    (a,), (b,) = pair_coefficients([element], probe)
    return ((b + math.sqrt(b * b + 4 * a * threshold_K)) / (2 * a)) ** (-1 / 6)


def _cluster_atoms(energy_K, spacing_A, threshold_K, probe, elements, seed):
    """The study's route: cluster the repulsive-core voxels (E >= threshold_K) into atoms.

    Connected cores are split by k-means into k = core volume / (one carbon core's volume) atoms; each
    cluster's element is the one (among `elements`) whose single-atom core radius is nearest the
    cluster's equivalent-sphere radius.
    """
    from scipy import ndimage
    from sklearn.cluster import KMeans
    voxel_A3 = spacing_A ** 3
    radii = {e: _core_radius_A(e, probe, threshold_K) for e in elements}
    atom_A3 = 4 / 3 * math.pi * _core_radius_A("C", probe, threshold_K) ** 3
    labels, _ = ndimage.label(energy_K >= threshold_K)
    symbols, positions = [], []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        corner = np.array([s.start for s in box])
        points = (np.argwhere(labels[box] == index) + corner).astype(np.float64) * spacing_A
        k = min(len(points), max(1, round(len(points) * voxel_A3 / atom_A3)))
        km = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(points)
        for c in range(k):
            r = (3 * np.count_nonzero(km.labels_ == c) * voxel_A3 / (4 * math.pi)) ** (1 / 3)
            symbols.append(min(elements, key=lambda e: abs(radii[e] - r)))
            positions.append(km.cluster_centers_[c])
    return symbols, np.array(positions).reshape(-1, 3)


def grid_to_atoms(grid, spacing_A=0.5, method="density", threshold=None, classes=DENSITY_CLASSES,
                  sigma_A=0.5, min_separation_A=0.5, probe="H2", elements=("H", "C", "N", "O", "Zn"), seed=0):
    """Decode a cube-frame grid into atoms: ase.Atoms with positions in angstrom inside the cube.

    method="density": `grid` holds density_channels (C, D, D, D), optionally after an energy channel 0
    (C + 1 channels, as stacked for training); atoms are peaks above `threshold` (default 0.6: a clean
    atom's nearest voxel is >= 0.69 at the default sigma 0.5 A, spacing 0.5 A, while an image more
    than 0.5 A beyond a cube face stays below 0.6 there) with the class from the strongest channel;
    `sigma_A` must be the one the channels were made with (it fixes the sub-voxel fit's curvature).
    Symbols: the class's element, or CLASS_SYMBOLS for "metal" (a placeholder) and "other".
    method="cluster": the study's route for energy-only grids (kelvin, channel 0 if several): k-means
    clusters of repulsive-core voxels (E >= threshold, default 0 K: the study's clip(-E, 0, E_scale)
    scaling keeps nothing above 0 K) with elements guessed from the core size. It cannot see hydrogen as
    separate from its neighbour's core, cannot tell C/N/O apart (their cores differ by ~0.1 A, less than
    a voxel), and merged cores of bonded atoms (core radius ~3 A vs bonds of ~1.4 A) make the atom count
    a volume estimate: on CoRE MOFs it recovers ~1-2% of non-H atoms within 0.5 A, against 100% for the
    density route (benchmarks/bench_eval.py).
    Cell = the cube (size * spacing_A), pbc False (the cube is not periodic).
    """
    from ase import Atoms
    g = np.asarray(grid.detach().cpu() if torch.is_tensor(grid) else grid, dtype=np.float32)
    if g.ndim not in (3, 4) or len(set(g.shape[-3:])) != 1:
        raise ValueError(f"grid: expected a cube (D, D, D) or (C, D, D, D), got shape {g.shape}")
    if method == "density":
        if g.ndim != 4 or g.shape[0] not in (len(classes), len(classes) + 1):
            raise ValueError(f"grid: method='density' needs {len(classes)} density channels {classes} "
                             f"(or energy + those), got shape {g.shape}")
        positions, cls, _ = _density_peaks(g[-len(classes):], 0.6 if threshold is None else threshold,
                                           spacing_A, sigma_A, min_separation_A)
        symbols = [CLASS_SYMBOLS.get(classes[c], classes[c]) for c in cls]
    elif method == "cluster":
        symbols, positions = _cluster_atoms(g[0] if g.ndim == 4 else g, spacing_A,
                                            0.0 if threshold is None else threshold, probe, elements, seed)
    else:
        raise ValueError(f"method={method!r}: expected 'density' or 'cluster'")
    return Atoms(symbols=symbols, positions=positions, cell=[g.shape[-1] * spacing_A] * 3, pbc=False)


def _write_atoms(atoms, path, fmt, mode):
    import ase.io
    with atomic_write(path, mode) as f:
        ase.io.write(f, atoms, format=fmt)
    return Path(path)


def write_xyz(atoms, path) -> Path:
    """Atomically write extended XYZ (plain XYZ plus the cell on the comment line; any XYZ reader works)."""
    return _write_atoms(atoms, path, "extxyz", "w")


def write_cif(atoms, path) -> Path:
    """Atomically write a P1 CIF of the atoms in their cell (for decoded atoms: the cube)."""
    return _write_atoms(atoms, path, "cif", "wb")


def contact_count(atoms, min_A=0.7) -> int:
    """Number of atom pairs closer than min_A (physically impossible contacts), periodic if atoms.pbc."""
    from ase.neighborlist import neighbor_list
    return len(neighbor_list("i", atoms, min_A)) // 2


def round_trip_scores(decoded, atoms, size=64, spacing_A=0.5, tol_A=0.5, classes=DENSITY_CLASSES) -> dict:
    """Compare decoded atoms with the true non-hydrogen atoms of `atoms` in the cube frame.

    Decoded and true atoms are paired one-to-one (Hungarian, maximising the number of pairs within
    tol_A). recall = paired true atoms / true non-H atoms inside the sampled cube [0, (size-1)*spacing]^3;
    precision = paired decoded / decoded non-H atoms (true images just outside the cube may pair, so
    a correct peak on a face is not a false positive). The class_* figures pair only atoms of the same
    element class. Also: counts and impossible contacts (< 0.7 A) among the decoded atoms.
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist
    true_symbols, true_pos = _cube_images(atoms, size, spacing_A, tol_A)
    heavy = true_symbols != "H"
    true_cls, true_pos = np.array([element_class(s, classes) for s in true_symbols[heavy]]), true_pos[heavy]
    inside = np.all((true_pos >= 0) & (true_pos <= (size - 1) * spacing_A), axis=1)
    dec_cls = np.array([element_class(s, classes) for s in decoded.get_chemical_symbols()], dtype=object)
    dec_pos = decoded.positions[dec_cls != "H"]
    dec_cls = dec_cls[dec_cls != "H"]
    scores = {"n_true": int(inside.sum()), "n_decoded": len(dec_pos), "contacts": contact_count(decoded)}
    for prefix, same_class in (("", False), ("class_", True)):
        cost = cdist(dec_pos, true_pos)
        if same_class:
            cost[dec_cls[:, None] != true_cls[None, :]] = np.inf
        within = cost <= tol_A
        rows, cols = linear_sum_assignment(np.where(within, cost, tol_A * (len(cost) + 1) + 1))
        hit = within[rows, cols]
        scores[prefix + "recall"] = float(inside[cols[hit]].sum() / max(1, inside.sum()))
        scores[prefix + "precision"] = float(hit.sum() / max(1, len(dec_pos)))
    return scores



# =============================================================================
# 11. Command line
# =============================================================================


