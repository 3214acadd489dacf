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


def _lj_blocks(jobs, probe, cutoff_A, device, dtype, pairs_per_batch):
    """Lennard-Jones energies (K) at points grouped in spatially compact blocks, for several structures at once.

    jobs: list of (blocks_A (nb, P, 3), atoms) -> list of (nb, P) energy tensors.
    Each block only sees the atom images within cutoff + its own radius of its centre, so the work is
    ~ points x atoms-in-cutoff rather than points x all images. Blocks of all structures are sorted by
    neighbour count and batched with padding (a far-away dummy atom with zero coefficients), so a GPU gets
    a few large kernels; pairs beyond the cutoff are masked (truncated, not shifted). Coordinates are taken
    relative to each block's centre, so float32 keeps ~1e-6 relative precision.
    """
    centres, blocks, pos, A, B, nbr_block, nbr_atom = [], [], [], [], [], [], []
    n_blocks = n_atoms = 0
    for blocks_A, atoms in jobs:
        b = torch.as_tensor(blocks_A, dtype=torch.float64)
        c = b.mean(1)
        radius = float((b - c[:, None]).norm(dim=-1).max())
        flat = b.reshape(-1, 3)
        p, idx = periodic_images(atoms, flat.min(0).values.numpy(), flat.max(0).values.numpy(), cutoff_A)
        a, bb = pair_coefficients(atoms.get_chemical_symbols(), probe)
        p = torch.as_tensor(p, device=device)
        # neighbour lists: every image within reach of the block centre (1e-3 A of slack covers float32 rounding)
        c_dev = c.to(device)
        for part, c_part in zip(torch.split(torch.arange(len(c), device=device), max(1, 4_000_000 // max(len(p), 1))),
                                torch.split(c_dev, max(1, 4_000_000 // max(len(p), 1)))):
            rows, cols = (torch.cdist(c_part.float(), p.float()) < cutoff_A + radius + 1e-3).nonzero(as_tuple=True)
            nbr_block.append(part[rows] + n_blocks)
            nbr_atom.append(cols + n_atoms)
        centres.append(c_dev)
        blocks.append(b.to(device))
        pos.append(p)
        A.append(torch.as_tensor(a[idx], dtype=dtype, device=device))
        B.append(torch.as_tensor(bb[idx], dtype=dtype, device=device))
        n_blocks, n_atoms = n_blocks + len(b), n_atoms + len(p)
    # index n_atoms is the dummy atom: far away, zero coefficients
    pos = torch.cat(pos + [torch.full((1, 3), 1e6, dtype=torch.float64, device=device)])
    A = torch.cat(A + [torch.zeros(1, dtype=dtype, device=device)])
    B = torch.cat(B + [torch.zeros(1, dtype=dtype, device=device)])
    centres, blocks = torch.cat(centres), torch.cat(blocks)
    nbr_block, nbr_atom = torch.cat(nbr_block), torch.cat(nbr_atom)      # CSR: sorted by block
    counts = torch.bincount(nbr_block, minlength=n_blocks)
    ptr = torch.cumsum(counts, 0) - counts
    order = torch.argsort(counts)                                        # similar counts together: little padding
    counts_sorted = counts[order].cpu()
    P = blocks.shape[1]
    rc_inv2 = 1.0 / cutoff_A ** 2
    out = torch.empty(n_blocks, P, dtype=dtype, device=device)
    start = 0
    while start < n_blocks:
        g = max(1, pairs_per_batch // (P * max(int(counts_sorted[start]), 1)))
        sel = order[start:start + g]
        kmax = max(int(counts_sorted[start:start + g].max()), 1)
        # padded neighbour matrix (g, kmax), gathered from the CSR lists without a Python loop
        n_sel = counts[sel]
        row = torch.repeat_interleave(torch.arange(len(sel), device=device), n_sel)
        col = torch.arange(len(row), device=device) - torch.repeat_interleave(torch.cumsum(n_sel, 0) - n_sel, n_sel)
        nbr = torch.full((len(sel), kmax), n_atoms, dtype=torch.long, device=device)
        nbr[row, col] = nbr_atom[torch.repeat_interleave(ptr[sel], n_sel) + col]
        c = centres[sel]
        pts = (blocks[sel] - c[:, None]).to(dtype)                               # (g, P, 3)
        nb_pos = (pos[nbr] - c[:, None]).to(dtype)                               # (g, K, 3)
        r2 = torch.baddbmm((pts * pts).sum(-1)[:, :, None] + (nb_pos * nb_pos).sum(-1)[:, None, :],
                           pts, nb_pos.transpose(1, 2), alpha=-2.0)
        inv = r2.clamp_(min=1e-6).reciprocal_()                                  # 1/r^2
        far = inv < rc_inv2
        inv3 = inv.pow_(3)                                                       # 1/r^6
        e = inv3 * A[nbr][:, None, :]
        e.sub_(B[nbr][:, None, :]).mul_(inv3).masked_fill_(far, 0.0)
        out[sel] = e.sum(-1)
        start += len(sel)
    return list(torch.split(out, [len(b) for b, _ in jobs]))


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
    P, n = 256, len(flat)
    padded = np.concatenate([flat[order], np.repeat(flat[order[-1:]], (-n) % P, 0)])
    (e,) = _lj_blocks([(padded.reshape(-1, P, 3), atoms)], probe, cutoff_A, _default_device(device), dtype, 4_000_000)
    out = np.empty(n)
    out[order] = e.reshape(-1)[:n].double().cpu().numpy()
    return out.reshape(pts.shape[:-1])


def voxelize_many(structures, size=64, frame="cube", spacing_A=0.5, probe="H2", cutoff_A=12.8, cap_K=5000.0,
                  device=None, block=8, pairs_per_batch=None):
    """Energy grids for several structures in one batched pass (what a GPU wants): list of float32 arrays."""
    device = _default_device(device)
    nblk = -(-size // block)
    n = nblk * block
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64)] * 3, indexing="ij"), -1)
    jobs = []
    for atoms in structures:
        # the grid is padded up to whole blocks and cropped afterwards
        pts = ijk * spacing_A if frame == "cube" else (ijk / size) @ atoms.cell.array if frame == "cell" else None
        if pts is None:
            raise ValueError(f"unknown frame {frame!r}: use 'cube' or 'cell'")
        # (X, Y, Z, 3) -> (nblk^3 blocks, block^3 points, 3)
        jobs.append((pts.reshape(nblk, block, nblk, block, nblk, block, 3).transpose(0, 2, 4, 1, 3, 5, 6)
                     .reshape(-1, block ** 3, 3), atoms))
    if pairs_per_batch is None:
        pairs_per_batch = 64_000_000 if device.type == "cuda" else 1_000_000
    grids = []
    for e in _lj_blocks(jobs, probe, cutoff_A, device, torch.float32, pairs_per_batch):
        e = e.clamp_(max=cap_K).nan_to_num_(nan=cap_K).cpu().numpy()
        e = e.reshape(nblk, nblk, nblk, block, block, block).transpose(0, 3, 1, 4, 2, 5).reshape(n, n, n)
        grids.append(np.ascontiguousarray(e[:size, :size, :size]))
    return grids


def voxelize(atoms, size=64, frame="cube", spacing_A=0.5, probe="H2", cutoff_A=12.8, cap_K=5000.0, device=None,
             block=8, pairs_per_batch=None):
    """Energy grid (size, size, size) of float32 kelvin: probe-framework LJ 12-6, periodic, capped at cap_K.

    Grid points as in grid_points(). Points are processed in block^3 cubes of neighbouring voxels so each
    block only visits the atoms within its reach (see _lj_blocks). CPU or CUDA (device=None picks CUDA if any).
    """
    return voxelize_many([atoms], size, frame, spacing_A, probe, cutoff_A, cap_K, device, block, pairs_per_batch)[0]


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



# =============================================================================
# 9. Pictures: CT-style slice montages, loss curves, histograms
# =============================================================================



# =============================================================================
# 10. Inverse: grid -> atoms -> XYZ
# =============================================================================



# =============================================================================
# 11. Command line
# =============================================================================


