"""Issue 19: independent references for promised values, and direct checks of documented behaviour.

Expected values here never come from the code under test: they come from a second transcription of a table,
from scipy, from a published worked example, from CoRE MOF's own property table, or from formulas written
in the test. Sections follow mofkit.py's pipeline order. benchmarks/mutation.py runs these by name.
"""
import dataclasses
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mofkit  # noqa: E402


# =============================================================================
# 3. Voxelizer
# =============================================================================

# the first structures of the package that read cleanly: K/Pb, Cu, Zn, Co and Yb frameworks, 218-2112 atoms
DENSITY_NAMES = ["ACECIV_ion_b", "ACOCOM_clean", "ACOCUS_clean", "ACODAZ_clean", "ACODUT_clean"]


def test_framework_density_matches_the_coremof_table():
    props = mofkit.coremof_properties()
    structures = dict(mofkit.iter_coremof(names=DENSITY_NAMES))
    assert sorted(structures) == sorted(DENSITY_NAMES)
    for name, atoms in structures.items():
        row = props.loc[name]
        # the table's "cm3_g" column is Zeo++'s density in g/cm^3 (mislabelled): AV_VF / AV_cm3_g gives it back
        assert row["AV_VF"] / row["AV_cm3_g"] == pytest.approx(row["cm3_g"], rel=1e-4)
        assert mofkit.framework_density(atoms) / 1000 == pytest.approx(row["cm3_g"], rel=1e-4), name


def test_probe_energy_of_each_coremof_element_matches_the_reference(uff_reference, brute_force_lj):
    """Every element's own pair term, one atom at a time, against the fixtures' parameters (an error in one
    row of the table moves only that element's energies)."""
    from ase import Atoms
    r = np.array([2.6, 3.1, 3.6, 4.5, 7.0])
    points = np.stack([7.0 + r, np.full_like(r, 7.0), np.full_like(r, 7.0)], 1)
    for element in ["H", "C", "N", "O", "Zn", "Cu", "Cd", "Co", "Eu", "U", "Pu"]:
        atoms = Atoms([element], positions=[[7.0, 7.0, 7.0]], cell=[30.0] * 3, pbc=True)
        np.testing.assert_allclose(mofkit.probe_energy(atoms, points), brute_force_lj(atoms, points), rtol=1e-10,
                                   err_msg=element)
        np.testing.assert_allclose(mofkit.probe_energy(atoms, points, probe="CH4"),
                                   brute_force_lj(atoms, points, probe="CH4"), rtol=1e-10, err_msg=element)


def test_grid_voxels_sit_where_the_frames_say(brute_force_lj):
    """cell frame: voxel [i, j, k] at fractions (i, j, k) / size of the cell; cube frame: at (i, j, k) x spacing.
    Points computed here, energies from the brute-force reference (not from grid_points)."""
    atoms = mofkit.load_coremof("ABAVIJ_clean")
    rng = np.random.default_rng(5)
    for frame, size, to_A in [("cell", 10, lambda ijk: (ijk / 10) @ atoms.cell.array),
                              ("cube", 12, lambda ijk: ijk * 0.8)]:
        grid = mofkit.voxelize(atoms, size, frame, spacing_A=0.8, cap_K=1e9)
        ijk = np.argwhere(grid < 0)
        ijk = ijk[rng.choice(len(ijk), 12, replace=False)]
        ref = brute_force_lj(atoms, to_A(ijk.astype(np.float64)))
        np.testing.assert_allclose(grid[tuple(ijk.T)], ref, rtol=1e-3, atol=1e-2, err_msg=frame)


# =============================================================================
# 4. Isotherms
# =============================================================================

FORMULAS = {  # as the models' papers write them
    "freundlich": lambda P, K, n: K * P ** (1 / n),
    "sips": lambda P, g_inf, K, n: g_inf * (K * P) ** (1 / n) / (1 + (K * P) ** (1 / n)),
    "langmuir": lambda P, Q_max, b: Q_max * b * P / (1 + b * P),
    "bet": lambda P, q_m, C, P0: q_m * C * (P / P0) / ((1 - P / P0) * (1 - P / P0 + C * P / P0)),
}

CASES = [  # (model, true parameters, fixed parameters, pressures, fitter kwargs)
    ("freundlich", {"K": 11.4, "n": 2.4}, {}, np.linspace(0.05, 1.0, 12), {}),
    ("sips", {"g_inf": 14.0, "K": 3.9, "n": 1.15}, {}, np.linspace(0.05, 1.0, 12), {}),
    ("sips", {"g_inf": 16.5, "n": 1.33}, {"K": 2.5}, np.linspace(0.05, 1.0, 12), {"fix_K": 2.5}),
    ("langmuir", {"Q_max": 12.8, "b": 4.9}, {}, np.linspace(0.05, 1.0, 12), {}),
    ("bet", {"q_m": 8.0, "C": 80.0}, {"P0": 1.0}, np.linspace(0.05, 0.3, 12), {"p0": 1.0}),
]


@pytest.mark.parametrize("model,true,fixed,P,kwargs", CASES, ids=[f"{c[0]}{'-fixed' if c[2] else ''}" for c in CASES])
def test_isotherm_fit_parameters_and_standard_errors_equal_curve_fit(model, true, fixed, P, kwargs):
    """scipy's curve_fit (its own trust-region solver, its own covariance s^2 (J^T J)^-1 with s^2 = SS/(m - k)
    in the parameters themselves) on 5%-noise data: the same optimum, and standard errors to 2%."""
    from scipy.optimize import curve_fit
    formula = FORMULAS[model]
    names = list(true)
    rng = np.random.default_rng(11)
    for _ in range(3):
        q_true = formula(P, **true, **fixed)
        q = q_true + 0.05 * q_true.max() * rng.standard_normal(P.size)
        fit = mofkit.FITTERS[model](P, q, **kwargs)
        ref, cov = curve_fit(lambda P, *theta: formula(P, **dict(zip(names, theta)), **fixed), P, q,
                             p0=[true[n] for n in names], xtol=1e-14, ftol=1e-14, gtol=1e-14, maxfev=100000)
        np.testing.assert_allclose([fit.params[n] for n in names], ref, rtol=1e-5)
        np.testing.assert_allclose([fit.se[n] for n in names], np.sqrt(np.diag(cov)), rtol=0.02)
        assert all(np.isnan(fit.se[n]) and fit.params[n] == v for n, v in fixed.items())


@pytest.mark.parametrize("model,true,fixed,P,kwargs", CASES, ids=[f"{c[0]}{'-fixed' if c[2] else ''}" for c in CASES])
def test_isotherm_aic_counts_free_parameters_only(model, true, fixed, P, kwargs):
    rng = np.random.default_rng(12)
    q_true = FORMULAS[model](P, **true, **fixed)
    q = q_true * (1 + 0.03 * rng.standard_normal(P.size))
    fit = mofkit.FITTERS[model](P, q, **kwargs)
    ss = np.sum((q - FORMULAS[model](P, **fit.params)) ** 2)
    m, k = P.size, len(true)  # k: the free parameters; P0 of BET and a fixed Sips K are not fitted
    assert fit.aic == pytest.approx(m * np.log(ss / m) + 2 * k, rel=1e-9)
    assert fit.rmse == pytest.approx(np.sqrt(ss / m), rel=1e-9)
    assert fit.r2 == pytest.approx(1 - ss / np.sum((q - q.mean()) ** 2), rel=1e-9)


def test_bet_reproduces_the_published_worked_example():
    """Atkins, Physical Chemistry (8th ed.), Example 25.3: N2 on rutile (TiO2) at 75 K, p* = 76.0 kPa.
    The book's linear BET plot of all seven points gives c = 310 and V_mon = 811 mm^3."""
    p_kPa = np.array([0.160, 1.87, 6.11, 11.67, 17.02, 21.92, 27.29])
    V_mm3 = np.array([601, 720, 822, 935, 1046, 1146, 1254.0])
    z = p_kPa / 76.0
    slope, intercept = np.polyfit(z, z / ((1 - z) * V_mm3), 1)  # the book's linearisation, done here
    assert 1 / (slope + intercept) == pytest.approx(811, rel=0.01) and slope / intercept + 1 == pytest.approx(310, rel=0.03)
    fit = mofkit.fit_bet(p_kPa, V_mm3, p0=76.0, p_range=(0.0, 0.4))  # the same seven points, nonlinear in V
    assert fit.n_points == 7 and fit.P0 == 76.0
    assert fit.q_m == pytest.approx(811, rel=0.03)  # V_mon is well determined; c (310 vs ~1350) is not
    assert fit.r2 > 0.97 and fit.C > 100


# =============================================================================
# 5. Shards
# =============================================================================

def _shard(path, n=3, names=None, footer_extra=b""):
    """A valid shard through write_shard, or (names given) one assembled byte by byte with those names, in the
    checksum-free format 1 (still read), so the layout checks are reached rather than the checksums."""
    grids = np.arange(n * 8, dtype=np.float32).reshape(n, 1, 2, 2, 2)
    meta = {"source": "t", "params": {}, "members": [f"m{i}" for i in range(n)], "failures": [],
            "names": [f"m{i}" for i in range(n)], "properties": {"columns": [], "rows": [[]] * n}}
    if names is None:
        mofkit.write_shard(path, grids, meta)
        return path
    import io
    import struct
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, grids.astype(np.float16))
    footer = json.dumps({"format": "mofkit-shard-1", **meta, "names": names}).encode()
    path.write_bytes(buffer.getvalue() + footer + footer_extra + struct.pack("<Q", len(footer)) + b"MOFSHRD1")
    return path


def test_shard_file_size_must_be_exact(tmp_path):
    """Bytes between the footer and its length word: the footer still parses, only the size check sees them."""
    good = _shard(tmp_path / "shard_00000.npy", names=[f"m{i}" for i in range(3)])
    assert mofkit.read_shard_meta(good)["names"] == ["m0", "m1", "m2"]  # the byte-by-byte assembly is a shard
    padded = _shard(tmp_path / "shard_00001.npy", names=[f"m{i}" for i in range(3)], footer_extra=b" " * 7)
    with pytest.raises(mofkit.ShardError, match=r"shard_00001\.npy: \d+ bytes and no footer where one should end"):
        mofkit.read_shard_meta(padded)
    data = good.read_bytes()
    extra = tmp_path / "shard_00002.npy"
    extra.write_bytes(data[:-16] + b"\0" * 8 + data[-16:])  # 8 more bytes before the length word
    with pytest.raises(mofkit.ShardError, match=r"shard_00002\.npy: .*no footer where one should end"):
        mofkit.read_shard_meta(extra)
    other = tmp_path / "shard_00003.npy"  # the right size, another format's magic
    other.write_bytes(data[:-8] + b"MOFSHRD2")
    with pytest.raises(mofkit.ShardError, match=r"shard_00003\.npy: .*no footer where one should end"):
        mofkit.read_shard_meta(other)


@pytest.mark.parametrize("names", [["m0", "m1"], ["m0", "m1", "m2", "m3"]])
def test_shard_grid_count_must_equal_its_names(tmp_path, names):
    path = _shard(tmp_path / "shard_00000.npy", names=names)
    with pytest.raises(mofkit.ShardError, match=r"shard_00000\.npy: unexpected layout .*\(3, 1, 2, 2, 2\)"):
        mofkit.read_shard_meta(path)
    with pytest.raises(mofkit.ShardError, match="shard_00000"):
        mofkit.ShardDataset([path])


# =============================================================================
# 8. Scoring
# =============================================================================

def test_one_nn_exact_ties_across_blocks_go_to_the_lowest_index():
    """Exact ties (integer coordinates, exact in float32) between rows in different distance blocks (chunk=2)."""
    rows = [np.full(4, 1000.0 * (k + 1)) for k in range(8)]  # far from everything, then 6 rows placed:
    rows[5] = [0, 0, 0, 0]       # generated 1: rows 1 and 6 both at squared distance 9, in the blocks before
    rows[1] = [3, 0, 0, 0]       #   and after its own
    rows[6] = [-3, 0, 0, 0]
    rows[0] = [0, 0, 7, 0]       # real 0: rows 3, 5 and 7 all at 49, in three later blocks
    rows[3] = [0, 0, 14, 0]
    rows[7] = [0, 0, 7, 7]
    rows = np.array(rows, dtype=np.float32).reshape(8, 1, 1, 4)
    real, generated = rows[:4], rows[4:]
    details = mofkit.one_nn_accuracy(real, generated, return_details=True, chunk=2)
    assert details["nearest"][5] == 1 and details["nearest"][0] == 3
    details = mofkit.one_nn_accuracy(real, generated, return_details=True, chunk=1)
    assert details["nearest"][5] == 1 and details["nearest"][0] == 3
    # the same for scikit-learn (its brute-force 1-NN keeps the lowest index of tied neighbours)
    from sklearn.neighbors import NearestNeighbors
    flat = rows.reshape(8, -1).astype(np.float64)
    _, idx = NearestNeighbors(n_neighbors=2, algorithm="brute").fit(flat).kneighbors(flat)
    assert idx[5, 1] == 1 and idx[0, 1] == 3


def test_one_nn_feature_rows_have_the_promised_values():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(5, 8, 8, 8)), rng.normal(size=(4, 8, 8, 8))
    parts = [torch.as_tensor(a), torch.as_tensor(b)]
    cpu = torch.device("cpu")
    raw = mofkit._features(parts, "raw", cpu, 2)
    np.testing.assert_array_equal(raw[1].numpy(), b.reshape(4, -1))
    down = mofkit._features(parts, "downsampled", cpu, 2, downsample=2)
    np.testing.assert_allclose(down[0].numpy(), a.reshape(5, 4, 2, 4, 2, 4, 2).mean(axis=(2, 4, 6)).reshape(5, -1),
                               atol=1e-6)  # float32 pooling
    hist = mofkit._features(parts, "histogram", cpu, 2, bins=10)
    edges = np.linspace(min(a.min(), b.min()), max(a.max(), b.max()), 11)
    for got, grids in zip(hist, (a, b)):  # shared bins over both sets, fractions of each grid's voxels
        expected = np.array([np.histogram(g, edges)[0] / g.size for g in grids])
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-7)


def _uniform_grids(energies_K):
    return np.array([np.full((4, 4, 4), e, dtype=np.float32) for e in energies_K])


def test_property_comparison_noise_floor_compares_two_disjoint_halves():
    from scipy.stats import wasserstein_distance
    T = 77.0
    two = mofkit.property_comparison(_uniform_grids([-100.0, -400.0]), _uniform_grids([-50.0, -60.0]))
    # two real grids: the halves are one grid each, so the floor is the distance between their two values
    assert two.loc["log10_widom", "wasserstein_real_halves"] == pytest.approx(300 / T / np.log(10), rel=1e-9)
    # uniform grids: Q_st = R (T - E), so the heats differ by R x 300 K
    assert two.loc["heat_kJ_mol", "wasserstein_real_halves"] == pytest.approx(8.314462618 * 300 / 1000, rel=1e-9)
    # five real grids: the floor is the distance between some 2 | 3 split into disjoint halves
    energies = np.array([-100.0, -220.0, -370.0, -510.0, -800.0])
    table = mofkit.property_comparison(_uniform_grids(energies), _uniform_grids([-50.0] * 3), seed=3)
    values = energies / -T / np.log(10)
    splits = {round(wasserstein_distance(values[list(s)], np.delete(values, list(s))), 9)
              for s in itertools.combinations(range(5), 2)}
    assert round(table.loc["log10_widom", "wasserstein_real_halves"], 9) in splits
    assert table.loc["log10_widom", "wasserstein_real_halves"] > 0
    assert table.loc["log10_widom", "wasserstein"] == pytest.approx(
        wasserstein_distance(values, [50 / T / np.log(10)] * 3), rel=1e-9)


# =============================================================================
# 10. Inverse
# =============================================================================

def _one_atom(symbol, position_A, cell_A=20.0):
    from ase import Atoms
    return Atoms([symbol], positions=[position_A], cell=[cell_A] * 3, pbc=True)


def test_density_threshold_drops_an_image_beyond_a_face_and_keeps_an_atom_just_inside():
    size, spacing = 16, 0.5  # the cube [0, 7.5] A; 20 A cells: no other image comes near it
    # an image 0.55 A beyond the x = 0 face (the atom sits at 19.45 A): its face voxel stays below 0.6
    beyond = mofkit.density_channels(_one_atom("C", [19.45, 3.0, 4.0]), size, spacing)
    assert beyond[1].max() == pytest.approx(np.exp(-0.55 ** 2 / (2 * 0.5 ** 2)), rel=1e-6)  # 0.546
    assert len(mofkit.grid_to_atoms(beyond, spacing)) == 0
    # an atom 0.05 A inside the same face: kept, on the face, where it is
    inside = mofkit.grid_to_atoms(mofkit.density_channels(_one_atom("C", [0.05, 3.1, 4.2]), size, spacing), spacing)
    assert inside.get_chemical_symbols() == ["C"]
    np.testing.assert_allclose(inside.positions[0], [0.05, 3.1, 4.2], atol=0.02)
    # an image only 0.3 A beyond the face passes the threshold (0.84 on the face) but its peak, refined, lies
    # outside the cube: an image, dropped
    near = mofkit.density_channels(_one_atom("C", [19.7, 3.0, 4.0]), size, spacing)
    assert near[1].max() > 0.8 and len(mofkit.grid_to_atoms(near, spacing)) == 0
    # the far face (x = 7.5 A) alike
    beyond = mofkit.density_channels(_one_atom("O", [8.05, 3.0, 4.0]), size, spacing)
    assert len(mofkit.grid_to_atoms(beyond, spacing)) == 0
    inside = mofkit.grid_to_atoms(mofkit.density_channels(_one_atom("O", [7.45, 3.1, 4.2]), size, spacing), spacing)
    np.testing.assert_allclose(inside.positions, [[7.45, 3.1, 4.2]], atol=0.02)


def test_density_default_threshold_is_0_6():
    """Peaks of height 0.55 and 0.65 (as a generator may make them): only the higher is an atom by default."""
    size, spacing = 16, 0.5
    channels = np.zeros((6, size, size, size), np.float32)
    atom = mofkit.density_channels(_one_atom("C", [2.0, 2.0, 2.0]), size, spacing)[1]
    channels[1] = 0.65 * atom + 0.55 * np.roll(atom, 8, axis=0)  # a second bump 4 A further along x
    found = mofkit.grid_to_atoms(channels, spacing)
    np.testing.assert_allclose(found.positions, [[2.0, 2.0, 2.0]], atol=0.02)
    assert len(mofkit.grid_to_atoms(channels, spacing, threshold=0.5)) == 2


def test_density_class_is_the_strongest_channel():
    """One atom seen in two channels (as a generator may smear it): one atom, of the stronger channel's class."""
    size, spacing = 16, 0.5
    atom = mofkit.density_channels(_one_atom("C", [3.2, 3.9, 4.1]), size, spacing)[1]
    for strong, weak, symbol in [(1, 2, "C"), (2, 1, "N"), (0, 3, "Zn")]:
        channels = np.zeros((6, size, size, size), np.float32)
        channels[strong], channels[weak] = atom, 0.8 * atom
        decoded = mofkit.grid_to_atoms(channels, spacing)
        assert decoded.get_chemical_symbols() == [symbol]
        np.testing.assert_allclose(decoded.positions, [[3.2, 3.9, 4.1]], atol=0.02)


@pytest.mark.parametrize("symbol, other", [("O", "Zn"), ("Zn", "O")])
def test_cluster_route_picks_the_element_with_the_nearest_core_size(symbol, other):
    """One isolated atom: its core (E >= 4999 K) is that element's own; O (sigma 3.12 A) and Zn (2.46 A)
    differ by ~0.3 A in core radius, far more than the voxel-volume estimate's error."""
    atoms = _one_atom(symbol, [6.1, 5.9, 6.2], cell_A=12.5)
    energy = mofkit.voxelize(atoms, 24, "cube", 0.5)
    decoded = mofkit.grid_to_atoms(energy, 0.5, method="cluster", threshold=4999.0, elements=(other, symbol))
    assert decoded.get_chemical_symbols() == [symbol]
    np.testing.assert_allclose(decoded.positions[0], [6.1, 5.9, 6.2], atol=0.3)


# =============================================================================
# 11. Command line
# =============================================================================

class _Spy:
    """Records the calls of a replaced function and returns `result(*args, **kwargs)`."""
    def __init__(self, result=None):
        self.calls, self.result = [], result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result(*args, **kwargs) if callable(self.result) else self.result


def _voxelize_args(args, kwargs):
    """The settings a voxelize call ends up with: its GridParams (params=), overridden by loose arguments."""
    names = ["atoms", "size", "frame", "spacing_A", "probe", "cutoff_A", "cap_K", "device"]
    call = {**dict(zip(names, args)), **kwargs}
    params = call.pop("params", None)
    return {**(params.voxelize_kwargs() if params else {}), **{k: v for k, v in call.items() if v is not None}}


def test_cli_voxelize_every_option_reaches_voxelize(tmp_path, monkeypatch, capsys):
    spy = _Spy(lambda atoms, *a, **k: np.zeros((2, 2, 2), np.float32) - 100.0)
    monkeypatch.setattr(mofkit, "voxelize", spy)
    mofkit.main(["voxelize", "ABAVIJ_clean", "--size", "6", "--frame", "cell", "--spacing", "0.9", "--probe", "CH4",
                 "--device", "cpu", "--out", str(tmp_path / "o")])
    call = _voxelize_args(*spy.calls[0])
    assert (call["size"], call["frame"], call["spacing_A"], call["probe"], str(call["device"])) == (
        6, "cell", 0.9, "CH4", "cpu")
    assert call["atoms"].info["name"] == "ABAVIJ_clean" and len(call["atoms"]) == 108
    assert (tmp_path / "o" / "ABAVIJ_clean.npy").exists()
    mofkit.main(["voxelize", "ABAVIJ_clean", "--out", str(tmp_path)])  # the defaults
    call = _voxelize_args(*spy.calls[1])
    assert (call["size"], call["frame"], call["spacing_A"], call["probe"]) == (64, "cube", 0.5, "H2")


def test_cli_voxelize_spacing_changes_the_grid_and_the_printed_properties(tmp_path, capsys):
    atoms = mofkit.load_coremof("ABAVIJ_clean")
    printed = []
    for spacing in ("2", "3"):
        mofkit.main(["voxelize", "ABAVIJ_clean", "--size", "8", "--spacing", spacing, "--out", str(tmp_path / spacing),
                     "--device", "cpu"])
        grid = np.load(tmp_path / spacing / "ABAVIJ_clean.npy")
        expected = mofkit.voxelize(atoms, 8, "cube", float(spacing), device="cpu")
        np.testing.assert_array_equal(grid, expected)
        printed.append(capsys.readouterr().out)
        window = math.log10(mofkit.henry_coefficient(expected, mofkit.framework_density(atoms)))
        assert f"(window): log10 K_H = {window:.3f}" in printed[-1]  # H2's default 77 K on this very grid
    assert not np.array_equal(np.load(tmp_path / "2" / "ABAVIJ_clean.npy"), np.load(tmp_path / "3" / "ABAVIJ_clean.npy"))


def test_cli_shards_sample_and_notebook_options_reach_their_functions(tmp_path, monkeypatch, capsys):
    build = _Spy([{"n_members": 7, "n_grids": 7}])
    monkeypatch.setattr(mofkit, "build_shards", build)
    mofkit.main(["shards", str(tmp_path / "s"), "--source", str(tmp_path), "--limit", "7", "--shard-size", "3",
                 "--size", "12", "--frame", "cell", "--spacing", "0.8", "--probe", "Xe", "--device", "cpu"])
    (out_dir, source), kwargs = build.calls[0]
    assert (out_dir, source) == (str(tmp_path / "s"), str(tmp_path))
    assert (kwargs["limit"], kwargs["shard_size"], kwargs["device"]) == (7, 3, "cpu")
    assert kwargs["params"] == mofkit.GridParams(size=12, frame="cell", spacing_A=0.8, probe="Xe")

    sample = _Spy(lambda path, n, **k: np.zeros((n, 1, 4, 4, 4), np.float32) - 5.0)
    monkeypatch.setattr(mofkit, "sample", sample)
    monkeypatch.setattr(mofkit, "plot_slices", _Spy())
    mofkit.main(["sample", "run/last.pt", "--n", "3", "--seed", "11", "--device", "cpu", "--out", str(tmp_path / "g")])
    (path, n), kwargs = sample.calls[0]
    assert (path, n, kwargs["seed"], kwargs["device"]) == ("run/last.pt", 3, 11, "cpu")
    assert np.load(tmp_path / "g" / "generated.npy").shape == (3, 1, 4, 4, 4)

    notebook = _Spy("executed.ipynb")
    monkeypatch.setattr(mofkit, "run_notebook", notebook)
    mofkit.main(["notebook", "--mode", "quick", "--out", str(tmp_path / "nb")])
    assert notebook.calls[0][1] == {"out_dir": str(tmp_path / "nb"), "mode": "quick", "timeout_s": None}
    mofkit.main(["notebook", "--mode", "gpu", "--out", str(tmp_path / "nb"), "--timeout", "120"])
    assert notebook.calls[1][1] == {"out_dir": str(tmp_path / "nb"), "mode": "gpu", "timeout_s": 120}


def test_cli_evaluate_options_reach_read_grids_evaluate_and_the_plot(tmp_path, monkeypatch, capsys):
    sets = {"held": np.full((5, 1, 4, 4, 4), -1.0), "trn": np.full((6, 1, 4, 4, 4), -2.0)}
    read = _Spy(lambda folder, n: (sets[folder][:n], {"density_kg_m3": np.array([900.0, 1100.0, 1500.0])}))
    evaluate, plot = _Spy("REPORT"), _Spy()
    for name, spy in [("read_grids", read), ("evaluate", evaluate), ("plot_evaluation", plot)]:
        monkeypatch.setattr(mofkit, name, spy)
    mofkit.main(["evaluate", "g.pt", "--heldout", "held", "--train", "trn", "--n", "4", "--plot", "p.png"])
    assert [c[0] for c in read.calls] == [("held", 4), ("trn", 4)]
    (generator, heldout, train), kwargs = evaluate.calls[0]
    assert generator == "g.pt" and (heldout == -1).all() and (train == -2).all() and len(heldout) == 4
    assert kwargs == {"n": 4, "density_kg_m3": 1100.0}  # the training shards' median density
    assert plot.calls[0] == (("REPORT",), {"path": "p.png"}) and "REPORT" in capsys.readouterr().out


def _train_value(field):
    """A valid non-default value for a TrainConfig field, or None where none is known."""
    known = {"device": "cpu", "precision": "bf16", "transform": "wells", "loss": "lsgan",  # lsgan: d_sigmoid both ways
             "density_head": "atoms",  # what clash_weight needs
             "density_upsample": "resize",
             "init_from": "g.pt",  # what freeze_trunk needs (train is a spy here: the file is never read)
             "density_blur": None,  # the atoms head draws smooth Gaussians itself: the flag is checked on its own
             "atom_offsets": None}  # shifts voxel-centred sites, not atom_subvoxels=2's: checked on its own
    if field.name in known:
        return known[field.name]
    default = field.default
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return 2 * default if default else 3  # doubling keeps widths divisible
    if default is None or isinstance(default, float):
        return 0.375 if default is None else default * 0.5 + 0.125
    return None


def test_cli_train_every_config_flag_reaches_train(tmp_path, monkeypatch, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    # energy + one density channel: options on the density channels (pair_weight) need one
    mofkit.write_shard(shards / "shard_00000.npy", np.zeros((2, 2, 8, 8, 8)),
                       {"source": "t", "params": {}, "members": ["a", "b"], "names": ["a", "b"], "failures": [],
                        "properties": {"columns": [], "rows": [[], []]}})
    train = _Spy(lambda config, dataset, out, **k: mofkit.TrainResult(None, None, Path(out) / "last.pt", []))
    monkeypatch.setattr(mofkit, "train", train)
    with pytest.raises(SystemExit):
        mofkit.main(["train", "--help"])
    help_text = capsys.readouterr().out
    argv, expected = ["train", str(shards), "--out", str(tmp_path / "run"), "--max-steps", "5", "--no-progress"], {}
    for field in dataclasses.fields(mofkit.TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if flag not in help_text:  # the grid size and channels come from the shards; betas is a pair
            assert field.name in ("dim", "grid_channels", "betas"), f"TrainConfig.{field.name} has no CLI flag"
            continue
        value = _train_value(field)
        if value is None:
            continue
        expected[field.name] = value
        argv += [flag if value is True else f"--no-{flag[2:]}"] if isinstance(value, bool) else [flag, str(value)]
    mofkit.main(argv)
    (config, dataset, out), kwargs = train.calls[0]
    assert {k: getattr(config, k) for k in expected} == expected
    assert (config.dim, config.grid_channels) == (8, 2)  # from the shards
    assert out == str(tmp_path / "run") and kwargs["max_steps"] == 5 and kwargs["progress"] is False
    assert len(expected) >= 15
    mofkit.main(["train", str(shards), "--fast-gpu", "--lr", "0.001"])
    config = train.calls[1][0][0]
    preset = mofkit.TrainConfig.fast_gpu(lr=0.001)
    assert dataclasses.replace(config, dim=preset.dim, grid_channels=preset.grid_channels) == preset
    assert train.calls[1][1]["progress"] is True and train.calls[1][0][2] == "mofkit_run"
    mofkit.main(["train", str(shards), "--study", "--epochs", "2"])
    config = train.calls[2][0][0]
    preset = mofkit.TrainConfig.study(epochs=2)
    assert dataclasses.replace(config, dim=preset.dim, grid_channels=preset.grid_channels) == preset
    mofkit.main(["train", str(shards), "--density-blur"])
    assert train.calls[3][0][0].density_blur is True
    mofkit.main(["train", str(shards), "--density-head", "atoms", "--density-sigma-voxels", "1.5", "--atom-offsets"])
    assert train.calls[4][0][0].atom_offsets is True
