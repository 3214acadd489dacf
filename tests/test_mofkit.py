"""Tests for mofkit: no network, CPU only. Sections follow mofkit.py's pipeline order."""
import os
import sys
import json
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mofkit  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"


# =============================================================================
# 1. Downloads
# =============================================================================

def test_atomic_write_replaces_whole_file_or_nothing(tmp_path):
    target = tmp_path / "a" / "file.bin"
    with mofkit.atomic_write(target) as f:
        f.write(b"first")
    with pytest.raises(RuntimeError):
        with mofkit.atomic_write(target) as f:
            f.write(b"half of the second")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]  # no temp left behind
    import hashlib
    assert mofkit.sha256_file(target) == hashlib.sha256(b"first").hexdigest()



# =============================================================================
# 2. Structures
# =============================================================================

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


def make_cif(sites, a=30.0, b=None, c=None, name="test"):
    """A P1 CIF text with (symbol, fx, fy, fz) sites."""
    lines = "\n".join(f"{s}{i} {s} {x} {y} {z}" for i, (s, x, y, z) in enumerate(sites))
    return CIF_TEMPLATE.format(name=name, a=a, b=b or a, c=c or a, sites=lines)


def test_read_structure_from_text_and_file(tmp_path):
    text = make_cif([("Zn", 0.1, 0.2, 0.3), ("O", 0.15, 0.2, 0.3)], a=12.0)
    atoms = mofkit.read_structure(text, name="toy")
    assert atoms.info["name"] == "toy" and atoms.get_chemical_symbols() == ["Zn", "O"]
    np.testing.assert_allclose(atoms.get_scaled_positions()[1], [0.15, 0.2, 0.3])
    path = tmp_path / "toy2.cif"
    path.write_text(text)
    assert mofkit.read_structure(path).info["name"] == "toy2"


def test_read_structure_applies_symmetry_for_non_p1_cifs():
    text = make_cif([("Cu", 0.1, 0.1, 0.1)], a=10.0).replace("'P 1'", "'P -1'")
    text += "loop_\n_symmetry_equiv_pos_as_xyz\n'x, y, z'\n'-x, -y, -z'\n"
    atoms = mofkit.read_structure(text, name="inv")
    assert len(atoms) == 2
    np.testing.assert_allclose(sorted(atoms.get_scaled_positions()[:, 0]), [0.1, 0.9])


@pytest.mark.parametrize("text, reason", [
    ("this is not a CIF\nat all", "malformed CIF"),
    (make_cif([("Zn", 0.1, 0.1, 0.1)]).replace("_cell_length_c 30.0", "_cell_length_c 0"), "zero volume"),
    (make_cif([("Zn", 0.1, 0.1, 0.1), ("Rf", 0.5, 0.5, 0.5)]), "no force-field parameters for element(s) Rf"),
    (make_cif([("C", 0.1, 0.1, 0.1), ("C", 0.105, 0.1, 0.1)]), "overlapping atoms"),
])
def test_bad_structures_raise_clear_errors(text, reason):
    with pytest.raises(mofkit.StructureError, match="broken-one") as err:
        mofkit.read_structure(text, name="broken-one")
    assert reason in str(err.value)


def test_missing_file_is_named():
    with pytest.raises(mofkit.StructureError, match="nowhere.cif"):
        mofkit.read_structure("nowhere.cif")


def test_batch_with_broken_file_returns_the_rest(tmp_path):
    (tmp_path / "a_good.cif").write_text(make_cif([("Zn", 0.1, 0.1, 0.1)], a=10.0))
    (tmp_path / "b_broken.cif").write_text("data_x\n_cell_length_a 10\n garbage")
    (tmp_path / "c_good.cif").write_text(make_cif([("O", 0.3, 0.1, 0.1)], a=10.0))
    failures = []
    names = [n for n, _ in mofkit.iter_cifs(tmp_path, failures)]
    assert names == ["a_good", "c_good"]
    assert [f[0] for f in failures] == ["b_broken"] and "b_broken" in failures[0][1]


def test_coremof_reads_package_members_and_records_failures():
    names = mofkit.coremof_names()
    assert len(names) == 12020 and "ABAVIJ_clean" in names
    props = mofkit.coremof_properties()
    assert {"LCD", "PLD", "AV_VF"} <= set(props.columns) and props.loc["ABAVIJ_clean", "LCD"] > 0
    failures = []
    wanted = ["ABAVIJ_clean", "1499489-acs.cgd.6b01265_1499490_clean", "NOT_A_MOF"]
    got = dict(mofkit.iter_coremof(names=wanted, failures=failures))
    assert list(got) == ["ABAVIJ_clean"] and len(got["ABAVIJ_clean"]) == 108
    reasons = dict(failures)
    assert "overlapping atoms" in reasons["1499489-acs.cgd.6b01265_1499490_clean"]
    assert "not in CoRE MOF" in reasons["NOT_A_MOF"]
    assert len(mofkit.load_coremof("ABAVIJ_clean")) == 108



# =============================================================================
# 3. Voxelizer
# =============================================================================

def brute_force_energy(atoms, points, probe="H2", cutoff_A=12.8):
    """Independent float64 reference: explicit loop over every image within the cutoff, no neighbour lists."""
    import itertools
    eps_p, sig_p = mofkit.PROBES[probe]
    eps = np.array([np.sqrt(mofkit.UFF[s][0] * eps_p) for s in atoms.get_chemical_symbols()])
    sig = np.array([(mofkit.UFF[s][1] + sig_p) / 2 for s in atoms.get_chemical_symbols()])
    cell, pos = atoms.cell.array, atoms.get_positions()
    widths = abs(np.linalg.det(cell)) / np.linalg.norm(np.cross(np.roll(cell, -1, 0), np.roll(cell, -2, 0)), axis=1)
    frac_pts, frac_atoms = points @ np.linalg.inv(cell), pos @ np.linalg.inv(cell)
    lo = np.floor(frac_pts.min(0) - frac_atoms.max(0) - cutoff_A / widths) - 1
    hi = np.ceil(frac_pts.max(0) - frac_atoms.min(0) + cutoff_A / widths) + 1
    total = np.zeros(len(points))
    for shift in itertools.product(*[range(int(l), int(h) + 1) for l, h in zip(lo, hi)]):
        r = np.linalg.norm(points[:, None, :] - (pos + np.array(shift) @ cell)[None], axis=-1)
        sr6 = (sig / r) ** 6
        total += np.where(r < cutoff_A, 4 * eps * (sr6 ** 2 - sr6), 0.0).sum(1)
    return total


def test_uff_and_probe_tables():
    eps, sig = mofkit.UFF["C"]
    assert eps == pytest.approx(0.105 * 503.22) and sig == pytest.approx(3.851 / 2 ** (1 / 6))
    assert mofkit.PROBES["H2"] == (34.2, 2.96) and mofkit.PROBES["CH4"] == (148.0, 3.73)
    # every element that occurs in CoRE MOF 2019 has parameters (UFF covers H..Lr)
    assert len(mofkit.UFF) == 103


def test_single_atom_reproduces_analytic_lennard_jones():
    atoms = mofkit.read_structure(make_cif([("C", 0.5, 0.5, 0.5)], a=32.0))   # atom at (16,16,16) A
    eps = np.sqrt(mofkit.UFF["C"][0] * 34.2)
    sig = (mofkit.UFF["C"][1] + 2.96) / 2
    r = np.array([2.5, 3.0, 3.5, 4.0, 6.0, 10.0, 12.5, 13.0])
    exact = np.where(r < 12.8, 4 * eps * ((sig / r) ** 12 - (sig / r) ** 6), 0.0)
    pts = np.stack([16 + r, np.full_like(r, 16.0), np.full_like(r, 16.0)], 1)
    np.testing.assert_allclose(mofkit.probe_energy(atoms, pts), exact, rtol=1e-12, atol=1e-12)
    grid = mofkit.voxelize(atoms, size=64, frame="cube", spacing_A=0.5, cap_K=1e9)
    assert grid.dtype == np.float32 and grid.shape == (64, 64, 64)
    np.testing.assert_allclose(grid[(32 + 2 * r).astype(int), 32, 32], exact, rtol=2e-5, atol=1e-4)
    assert grid.min() == pytest.approx(-eps, rel=1e-3)   # the well depth, on the sphere r = 2^(1/6) sigma


@pytest.mark.parametrize("name", ["ABAVIJ_clean", "ABIXOZ_clean", "ACUBAB_clean"])  # triclinic; 8.9 A thin hexagonal
def test_energies_match_float64_brute_force_on_coremof_cells(name):
    atoms = mofkit.load_coremof(name)
    rng = np.random.default_rng(0)
    pts = rng.uniform(-3.0, 20.0, size=(150, 3))
    ref = brute_force_energy(atoms, pts)
    np.testing.assert_allclose(mofkit.probe_energy(atoms, pts), ref, rtol=1e-9, atol=1e-9)
    for frame in ("cube", "cell"):
        grid = mofkit.voxelize(atoms, size=32, frame=frame, spacing_A=0.7)
        gp = mofkit.grid_points(atoms, 32, frame, 0.7).reshape(-1, 3)
        # mostly points in the pores (where the physics is), some anywhere (capped cores)
        idx = np.concatenate([rng.choice(np.flatnonzero(grid.reshape(-1) < 0), 100, replace=False),
                              rng.choice(len(gp), 50, replace=False)])
        ref = brute_force_energy(atoms, gp[idx])
        below = ref < 5000
        assert below.sum() >= 100
        rel = np.abs(grid.reshape(-1)[idx][below] - ref[below]) / np.maximum(np.abs(ref[below]), 1.0)
        assert rel.max() < 1e-3, (frame, rel.max())
        assert np.all(grid.reshape(-1)[idx][~below] == 5000.0)


def test_lattice_translation_and_supercell_give_the_same_grid():
    atoms = mofkit.load_coremof("ABAVIJ_clean")
    base = mofkit.voxelize(atoms, size=16, frame="cube", spacing_A=1.0)
    shifted = atoms.copy()
    shifted.positions += atoms.cell[0] - 2 * atoms.cell[2]
    np.testing.assert_allclose(mofkit.voxelize(shifted, size=16, frame="cube", spacing_A=1.0), base, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(mofkit.voxelize(atoms.repeat((2, 1, 3)), size=16, frame="cube", spacing_A=1.0),
                               base, rtol=1e-4, atol=1e-3)


def test_gpu_style_batching_matches_small_batches():
    """The large padded batches a GPU gets are exercised here on the CPU and must agree with the default."""
    atoms = mofkit.load_coremof("ABAVIJ_clean")
    small = mofkit.voxelize(atoms, size=24, frame="cell", block=4)
    big = mofkit.voxelize(atoms, size=24, frame="cell", block=8, pairs_per_batch=50_000_000)
    np.testing.assert_allclose(big, small, rtol=1e-4, atol=1e-3)


def test_henry_coefficient_and_heat_on_analytic_grids():
    T, rho = 77.0, 1000.0
    uniform = np.full((8, 8, 8), -300.0, dtype=np.float32)
    assert mofkit.widom_factor(uniform, T) == pytest.approx(np.exp(300 / T))
    assert mofkit.henry_coefficient(uniform, rho, T) == pytest.approx(np.exp(300 / T) / (8.314462618 * T * rho))
    assert mofkit.heat_of_adsorption(uniform, T) == pytest.approx(8.314462618 * (T + 300) / 1000)
    two = np.zeros((2, 4, 4), dtype=np.float32)
    two[0] = -500.0                       # half the sites at -500 K, half at 0 K
    w0, w1 = np.exp(500 / T), 1.0
    assert mofkit.widom_factor(two, T) == pytest.approx((w0 + w1) / 2)
    assert mofkit.heat_of_adsorption(two, T) == pytest.approx(8.314462618 * (T + 500 * w0 / (w0 + w1)) / 1000)
    atoms = mofkit.load_coremof("ABAVIJ_clean")
    assert mofkit.framework_density(atoms) == pytest.approx(atoms.get_masses().sum() * 1.66053906660e-27 / (atoms.cell.volume * 1e-30))



# =============================================================================
# 4. Isotherms
# =============================================================================



# =============================================================================
# 5. Shards
# =============================================================================



# =============================================================================
# 6. Models
# =============================================================================



# =============================================================================
# 7. Training
# =============================================================================


# =============================================================================
# 8. Scoring
# =============================================================================

def _sklearn_loo_1nn(features):
    from sklearn.model_selection import LeaveOneOut, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier
    X = np.concatenate([f.reshape(len(f), -1) for f in features]).astype(np.float64)
    y = np.repeat([0, 1], [len(f) for f in features])
    return (cross_val_predict(KNeighborsClassifier(n_neighbors=1), X, y, cv=LeaveOneOut()) == y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_nn_accuracy_equals_sklearn_leave_one_out(dtype):
    rng = np.random.default_rng(0)
    real = rng.normal(size=(23, 6, 6, 6)).astype(np.float32)
    generated = rng.normal(0.2, 1.1, size=(19, 6, 6, 6)).astype(np.float32)
    correct = _sklearn_loo_1nn([real, generated])
    # chunk=5 splits both sets across blocks, so block edges and the self-exclusion are exercised
    details = mofkit.one_nn_accuracy(real, generated, return_details=True, dtype=dtype, chunk=5)
    assert details["accuracy"] == pytest.approx(correct.mean(), abs=1e-12)
    assert details["real_accuracy"] == pytest.approx(correct[:23].mean(), abs=1e-12)
    assert details["generated_accuracy"] == pytest.approx(correct[23:].mean(), abs=1e-12)
    assert mofkit.one_nn_accuracy(real, generated, dtype=dtype, chunk=5) == details["accuracy"]
    assert 0.2 < details["accuracy"] < 0.9  # not a degenerate case where any classifier agrees


def test_one_nn_accuracy_downsampled_equals_sklearn_on_pooled_grids():
    rng = np.random.default_rng(1)
    real, generated = rng.normal(size=(20, 8, 8, 8)), rng.normal(0.1, 1.0, size=(20, 8, 8, 8))
    pool = lambda g: g.reshape(len(g), 4, 2, 4, 2, 4, 2).mean(axis=(2, 4, 6))
    expected = _sklearn_loo_1nn([pool(real), pool(generated)]).mean()
    assert mofkit.one_nn_accuracy(real, generated, "downsampled", downsample=2, chunk=6) == pytest.approx(expected)


@pytest.mark.parametrize("features", ["raw", "downsampled", "histogram"])
def test_one_nn_accuracy_is_half_for_one_distribution_and_one_for_separated(features):
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(60, 8, 8, 8)), rng.normal(size=(60, 8, 8, 8))
    assert 0.3 < mofkit.one_nn_accuracy(a, b, features, downsample=2, bins=16) < 0.7
    shapes = {"raw": 512, "downsampled": 64, "histogram": 16}
    rows = mofkit._features([torch.as_tensor(a)], features, torch.device("cpu"), 16, downsample=2, bins=16)[0]
    assert rows.shape == (60, shapes[features])
    far = rng.normal(3.0, 2.0, size=(60, 8, 8, 8))  # shifted mean and wider: separable by every feature
    assert mofkit.one_nn_accuracy(a, far, features, downsample=2, bins=16) == 1.0


def test_one_nn_accuracy_copies_score_zero_and_ties_never_pick_self():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(10, 4, 4, 4))
    details = mofkit.one_nn_accuracy(real, real.copy(), return_details=True, chunk=3)
    assert details["accuracy"] == 0.0  # each sample's nearest other sample is its copy
    np.testing.assert_array_equal(details["nearest"], np.r_[np.arange(10, 20), np.arange(10)])


def test_one_nn_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="generated"):
        mofkit.one_nn_accuracy(np.zeros((3, 4, 4, 4)), np.full((3, 4, 4, 4), np.nan))
    with pytest.raises(ValueError, match="shape"):
        mofkit.one_nn_accuracy(np.zeros((3, 4, 4, 4)), np.zeros((3, 5, 5, 5)))
    with pytest.raises(ValueError, match="features"):
        mofkit.one_nn_accuracy(np.zeros((3, 4)), np.ones((3, 4)), features="pca")


def test_memorisation_flags_copies_and_not_fresh_samples():
    rng = np.random.default_rng(4)
    train, heldout = rng.normal(size=(80, 5, 5, 5)), rng.normal(size=(40, 5, 5, 5))
    copies = mofkit.memorisation(train[:20] + 1e-3, train, heldout, chunk=16)
    assert copies["fraction_closer"] == 1.0
    np.testing.assert_array_equal(copies["nearest_train"], np.arange(20))
    expected = np.sqrt(((heldout[:, None] - train[None]) ** 2).sum(axis=(2, 3, 4))).min(1)
    np.testing.assert_allclose(copies["heldout_to_train"], expected, rtol=1e-12)
    assert copies["threshold"] == pytest.approx(expected.min())
    fresh = mofkit.memorisation(rng.normal(size=(40, 5, 5, 5)), train, heldout, chunk=16)
    assert fresh["fraction_closer"] <= 0.1  # about 1 / (40 + 1) expected


def test_property_comparison_on_synthetic_grids():
    rng = np.random.default_rng(5)
    wells = lambda depth_K, n: np.where(rng.random((n, 8, 8, 8)) < 0.3, -depth_K[:, None, None, None], 5000.0)
    real = wells(rng.uniform(400, 600, 40), 40).astype(np.float32)
    same = wells(rng.uniform(400, 600, 40), 40).astype(np.float32)
    shallow = wells(rng.uniform(100, 200, 40), 40).astype(np.float32)
    near, far = mofkit.property_comparison(real, same), mofkit.property_comparison(real, shallow)
    assert list(far.index) == ["log10_widom", "heat_kJ_mol"]
    assert far.loc["log10_widom", "wasserstein"] > 5 * far.loc["log10_widom", "wasserstein_real_halves"]
    assert near.loc["log10_widom", "wasserstein"] < far.loc["log10_widom", "wasserstein"] / 5
    assert far.loc["heat_kJ_mol", "median_real"] > far.loc["heat_kJ_mol", "median_generated"] > 0
    widom = np.array([mofkit.widom_factor(g, 77.0) for g in real])
    assert far.loc["log10_widom", "median_real"] == pytest.approx(np.median(np.log10(widom)))
    with_density = mofkit.property_comparison(real, shallow, density_kg_m3=1000.0)
    assert with_density.loc["log10_henry", "wasserstein"] == pytest.approx(far.loc["log10_widom", "wasserstein"])


# =============================================================================
# 9. Pictures
# =============================================================================

def _image_axes(fig):
    return [ax for ax in fig.axes if ax.images]


def test_plot_slices_montage_panels_and_png(tmp_path):
    grid = np.linspace(-800, 5000, 16 ** 3, dtype=np.float32).reshape(16, 16, 16)
    fig = mofkit.plot_slices(grid, path=tmp_path / "slices.png")
    assert len(_image_axes(fig)) == 16 and len(fig.axes) == 16 + 1  # 4 x 4 panels + colour bar
    assert (tmp_path / "slices.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pair = mofkit.plot_slices([grid, grid[None]], titles=["real", "generated"], path=tmp_path / "pair.png")
    assert len(_image_axes(pair)) == 32
    ct = mofkit.plot_slices(np.zeros((64, 4, 4), np.float32) - 100.0)  # the study's 64 slices -> 8 x 8
    assert len(_image_axes(ct)) == 64 and len(ct.axes) == 64 + 1
    odd = mofkit.plot_slices(grid[:10], axis=0)  # 10 slices -> 4 x 3 panel, 2 blank
    assert len(_image_axes(odd)) == 10 and len(odd.axes) == 12 + 1
    with pytest.raises(ValueError, match="grid"):
        mofkit.plot_slices(np.zeros((4, 4)))


def test_plot_history_and_property_histograms(tmp_path):
    import pandas as pd
    history = pd.DataFrame({"step": range(5), "loss_d": np.linspace(1, 0.2, 5), "loss_g": np.linspace(0.5, 1, 5),
                            "d_real": np.linspace(0.5, 0.9, 5), "d_fake": np.linspace(0.5, 0.1, 5)})
    history.to_csv(tmp_path / "history.csv", index=False)
    fig = mofkit.plot_history(tmp_path / "history.csv", path=tmp_path / "history.png")
    assert [len(ax.lines) for ax in fig.axes] == [2, 2]
    assert (tmp_path / "history.png").stat().st_size > 1000
    rng = np.random.default_rng(6)
    fig = mofkit.plot_property_histograms({"a": rng.normal(size=50), "b": rng.normal(size=50)},
                                          {"a": rng.normal(size=40), "b": rng.normal(size=40)},
                                          path=tmp_path / "hist.png")
    assert len(fig.axes) == 2 and (tmp_path / "hist.png").exists()
    assert len(mofkit.plot_property_histograms(rng.normal(size=9), rng.normal(size=9)).axes) == 1


# =============================================================================
# 10. Inverse
# =============================================================================

def _small_framework():
    from ase import Atoms
    # a cubic cell with one of each class, off-grid positions, two C atoms 1.4 A apart on a diagonal
    return Atoms(["Zn", "C", "C", "N", "O", "H", "S"],
                 positions=[[1.13, 2.07, 3.31], [4.21, 4.77, 1.62], [5.02, 5.58, 2.43], [2.38, 6.11, 5.29],
                            [6.74, 1.41, 6.02], [3.5, 3.2, 7.1], [7.3, 7.45, 4.4]],
                 cell=[8.3, 8.3, 8.3], pbc=True)


def test_density_channels_frame_and_values():
    atoms = _small_framework()
    channels = mofkit.density_channels(atoms, size=24, spacing_A=0.5)
    assert channels.shape == (6, 24, 24, 24) and channels.dtype == np.float32
    assert channels.min() >= 0 and channels.max() <= 1
    # the C atom at (4.21, 4.77, 1.62) A: voxel (8, 10, 3) at (4.0, 5.0, 1.5) A holds exp(-r^2 / 2 sigma^2)
    r2 = (4.21 - 4.0) ** 2 + (4.77 - 5.0) ** 2 + (1.62 - 1.5) ** 2
    assert channels[1, 8, 10, 3] == pytest.approx(np.exp(-r2 / (2 * 0.5 ** 2)), rel=1e-6)
    # periodic image: Zn + one cell edge along x = (9.43, 2.07, 3.31) A is inside the 11.5 A cube too
    assert channels[0, 19, 4, 7] > 0.6
    assert channels[4].max() > 0.6 and channels[5].max() > 0.6  # H and "other" (S) have their own channels


def test_density_round_trip_recovers_every_atom(tmp_path):
    atoms = _small_framework()
    size, spacing = 24, 0.5
    decoded = mofkit.grid_to_atoms(mofkit.density_channels(atoms, size, spacing), spacing, method="density")
    scores = mofkit.round_trip_scores(decoded, atoms, size, spacing)
    assert scores["recall"] == 1.0 and scores["precision"] == 1.0
    assert scores["class_recall"] == 1.0 and scores["class_precision"] == 1.0
    assert scores["contacts"] == 0
    from scipy.spatial.distance import cdist
    symbols, truth = mofkit._cube_images(atoms, size, spacing, 1e-9)
    d = cdist(decoded.positions, truth)
    assert np.all(d.min(0) < 0.1)  # every true atom in the cube, found within 0.1 A
    interior = np.all((decoded.positions > 0.5) & (decoded.positions < (size - 2) * spacing), axis=1)
    assert interior.sum() >= 10 and np.all(d[interior].min(1) < 0.1)  # (face peaks may be images just outside)
    nearest = d[interior].argmin(1)
    expected = [mofkit.CLASS_SYMBOLS.get(mofkit.element_class(s), s) for s in symbols[nearest]]
    assert list(np.array(decoded.get_chemical_symbols())[interior]) == expected
    # an energy channel in front (as stacked for training) is skipped
    stacked = np.concatenate([np.zeros((1, size, size, size), np.float32),
                              mofkit.density_channels(atoms, size, spacing)])
    assert len(mofkit.grid_to_atoms(stacked, spacing)) == len(decoded)


def test_round_trip_scores_count_misses_and_wrong_classes():
    from ase import Atoms
    from scipy.spatial.distance import cdist
    atoms = _small_framework()
    symbols, positions = mofkit._cube_images(atoms, 24, 0.5, 1e-9)
    heavy = symbols != "H"
    symbols, positions = list(symbols[heavy]), positions[heavy]
    n = len(symbols)
    probe = np.stack(np.meshgrid(*[np.arange(0, 11.5, 0.5)] * 3, indexing="ij"), -1).reshape(-1, 3)
    empty = probe[cdist(probe, mofkit._cube_images(atoms, 24, 0.5, 1.0)[1]).min(1).argmax()]
    wrong = "N" if symbols[1] != "N" else "C"
    decoded = Atoms(symbols[2:] + [wrong, "C", "H"], positions=np.vstack([positions[2:], positions[1], empty, empty]))
    scores = mofkit.round_trip_scores(decoded, atoms, 24, 0.5)
    assert (scores["n_true"], scores["n_decoded"]) == (n, n)  # the decoded H is not scored
    assert scores["recall"] == pytest.approx((n - 1) / n) and scores["precision"] == pytest.approx((n - 1) / n)
    assert scores["class_recall"] == pytest.approx((n - 2) / n)
    assert scores["class_precision"] == pytest.approx((n - 2) / n)
    assert scores["contacts"] == 1  # the C and H placed on one spot


def test_cluster_route_finds_isolated_atoms_in_an_energy_grid():
    from ase import Atoms
    atoms = Atoms(["C", "O"], positions=[[1.3, 1.7, 2.1], [5.6, 5.2, 6.0]], cell=[8.6] * 3, pbc=True)
    energy = mofkit.voxelize(atoms, 32, "cube", 0.5)
    decoded = mofkit.grid_to_atoms(energy, 0.5, method="cluster", threshold=4999.0)  # cores at the cap
    scores = mofkit.round_trip_scores(decoded, atoms, 32, 0.5)
    assert scores["recall"] == 1.0 and scores["precision"] == 1.0
    symbols, truth = mofkit._cube_images(atoms, 32, 0.5, 0.5)
    from scipy.spatial.distance import cdist
    interior = np.all((decoded.positions > 2.5) & (decoded.positions < 13.0), axis=1)  # cores not cut by a face
    assert interior.sum() >= 2 and np.all(cdist(decoded.positions[interior], truth).min(1) < 0.3)
    assert set(decoded.get_chemical_symbols()) <= {"H", "C", "N", "O", "Zn"}
    # at 0 K (all the study's scaling keeps) the cores of these 6.8 A-apart atoms already touch
    assert len(mofkit.grid_to_atoms(energy, 0.5, method="cluster")) >= 1


def test_write_xyz_cif_and_contact_count(tmp_path):
    import ase.io
    from ase import Atoms
    atoms = Atoms(["C", "O", "X"], positions=[[0, 0, 0], [0.5, 0, 0], [3, 3, 3]], cell=[10] * 3, pbc=False)
    assert mofkit.contact_count(atoms) == 1 and mofkit.contact_count(atoms, min_A=0.4) == 0
    back = ase.io.read(mofkit.write_xyz(atoms, tmp_path / "out.xyz"))
    assert back.get_chemical_symbols() == ["C", "O", "X"]
    np.testing.assert_allclose(back.positions, atoms.positions, atol=1e-6)
    cif = ase.io.read(mofkit.write_cif(atoms[:2], tmp_path / "out.cif"))
    assert cif.get_chemical_formula() == "CO"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.cif", "out.xyz"]


def test_grid_to_atoms_rejects_bad_grids():
    with pytest.raises(ValueError, match="density channels"):
        mofkit.grid_to_atoms(np.zeros((3, 8, 8, 8)))
    with pytest.raises(ValueError, match="method"):
        mofkit.grid_to_atoms(np.zeros((8, 8, 8)), method="magic")
    with pytest.raises(ValueError, match="cube"):
        mofkit.grid_to_atoms(np.zeros((8, 8, 9)), method="cluster")


# =============================================================================
# 11. Command line and notebook
# =============================================================================


