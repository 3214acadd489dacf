"""Tests of the benchmark scripts: benchmarks/reproduce.py (the measured reproduction) and benchmarks/mutation.py
(its mutants must still find their fragment of mofkit.py)."""
import json
import math

import numpy as np
import pytest
import torch

from helpers import REPO  # first: it puts the repository on sys.path
import mofkit  # noqa: E402
from benchmarks import (capacity_fit, decoder_sweep, energy_to_atoms, mutation, nn_spread,  # noqa: E402
                        reproduce)


@pytest.fixture(scope="module")
def coremof_cifs(tmp_path_factory):
    """14 real CoRE MOF structures as CIF files (read from the installed package, no network)."""
    folder = tmp_path_factory.mktemp("cifs")
    for name, atoms in mofkit.iter_coremof(names=mofkit.coremof_names()[5000:5014]):
        atoms.write(folder / f"{name}.cif", format="cif")
    return folder


def test_reproduce_split_keeps_refcode_groups_together_and_skips_what_fails():
    assert mofkit.refcode("FUVDEH12_clean") == mofkit.refcode("FUVDEH_clean") == mofkit.refcode("FUVDEH01_charged") == "FUVDEH"
    assert mofkit.refcode("ja4015666_si_002_clean") == mofkit.refcode("ja4015666_si_003_clean") == "ja4015666"
    assert mofkit.refcode("ABCDEFG_clean") == "ABCDEFG"  # not a CSD refcode: its own group
    names = [f"{code}{suffix}_clean" for code in ("AAAAAA", "BBBBBB", "CCCCCC", "DDDDDD", "EEEEEE", "FFFFFF",
                                                  "GGGGGG", "HHHHHH") for suffix in ("", "01", "02")]
    names += [f"p{k}_si_00{k}_clean" for k in range(6)] + ["bad_clean"]
    rows = mofkit.make_split(names, n_heldout=4, n_train=9, seed=3, parses=lambda n: n != "bad_clean")
    assert rows == mofkit.make_split(names, n_heldout=4, n_train=9, seed=3, parses=lambda n: n != "bad_clean")
    assert rows != mofkit.make_split(names, n_heldout=4, n_train=9, seed=4, parses=lambda n: n != "bad_clean")
    sides = {}
    for name, group, split in rows:
        assert group == mofkit.refcode(name) and name != "bad_clean"
        sides.setdefault(group, set()).add(split)
    assert all(len(s) == 1 for s in sides.values())  # no group straddles train and held-out
    counts = {s: sum(r[2] == s for r in rows) for s in ("heldout", "train")}
    assert 4 <= counts["heldout"] < 4 + 3 and 9 <= counts["train"] < 9 + 3  # stops within one group


def test_reproduce_cpu_pipeline_end_to_end_resumes_and_ships(tmp_path, coremof_cifs):
    out = tmp_path / "out"
    tiny = ["--scale", "cpu", "--source", str(coremof_cifs), "--out", str(out), "--split-csv",
            str(tmp_path / "split.csv"), "--n-train", "8", "--n-heldout", "4", "--size", "16", "--spacing-A", "2.0",
            "--channels", "8", "--batch-size", "2", "--n-eval", "4", "--shard-size", "4", "--no-progress"]
    assert reproduce.main(tiny + ["--chunk-min", "0"]) is None  # a call out of time at once: split written, no grids
    split = mofkit.read_split(tmp_path / "split.csv")
    assert len(split["heldout"]) == 4 and len(split["train"]) == 8 and not (out / "heldout").exists()
    first = reproduce.main(tiny + ["--budget-min", "0.02", "--ship", str(tmp_path / "w" / "g.pt"),
                            "--manifest", str(tmp_path / "m.csv")])
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(first))
    assert {p.name for p in out.glob("*.png")} == {"slices_0.png", "slices_1.png", "loss.png", "one_nn.png"}
    assert first["data"]["train_grids"] == 8 and first["data"]["heldout_grids"] == first["data"]["n_eval"] == 4
    assert first["training"]["train_time_min"] >= 0.02 and first["training"]["steps"] > 0
    ev = first["evaluation"]
    rows = {(r["set"], r["features"]): r for r in ev["one_nn"]}
    assert {s for s, _ in rows} == {"generated (seed 0)", "generated (seed 1)", "generated (seed 2)",
                                    "real train (floor)", "near-blank", "mean train grid + noise",
                                    "untrained generator"}
    assert {f for _, f in rows} == {"raw", "pooled", "histogram"}
    for key, r in rows.items():
        assert r["ci_low"] <= r["accuracy"] <= r["ci_high"], key
    props = ev["properties"]  # an untrained generator barely varies from sample to sample
    assert props["untrained generator"]["spread K"] < 0.5 * props["held-out (reference)"]["spread K"]
    assert rows[("mean train grid + noise", "raw")]["generated_accuracy"] == 1.0  # near-copies find each other
    assert ev["accuracy"] == pytest.approx(np.mean([rows[(f"generated (seed {k})", "raw")]["accuracy"]
                                                    for k in range(3)]))
    assert ev["properties"]["held-out (reference)"]["spread K"] > 0
    weights = first["weights"]
    assert weights["sha256"] == mofkit.sha256_file(tmp_path / "w" / "g.pt") and weights["path"] == "w/g.pt"
    assert mofkit.read_manifest(tmp_path / "m.csv", kind="weights")[0]["sha256"] == weights["sha256"]
    G = mofkit.load_generator(tmp_path / "w" / "g.pt", tmp_path / "m.csv")
    assert mofkit.sample(G, 2).shape == (2, 1, 16, 16, 16)
    # the weights carry the voxelize settings of their training grids, so held-out grids can be made to match
    assert (G.grid_params["size"], G.grid_params["spacing_A"], G.grid_params["frame"]) == (16, 2.0, "cube")
    assert np.array_equal(mofkit.sample(tmp_path / "w" / "g.pt", 2), mofkit.sample(G, 2))  # a path works too

    budget = first["training"]["train_time_min"] + 0.02  # stops at the first log past its budget: may overshoot
    again = reproduce.main(tiny + ["--budget-min", str(budget)])  # a bigger budget continues the same run
    assert again["training"]["steps"] > first["training"]["steps"] and again["training"]["train_time_min"] >= budget
    steps = mofkit.load_history(out / "run")["step"]
    assert steps.is_monotonic_increasing and steps.is_unique
    floor = lambda r: [x for x in r["evaluation"]["one_nn"] if x["set"] == "real train (floor)"]
    assert floor(again) == floor(first)  # same seeded real sets


def test_reproduce_gpu_scale_runs_in_chunks_on_cpu(tmp_path, coremof_cifs):
    """The --scale gpu code path (chunk deadlines, epoch target, evaluation in a later call) with tiny sizes."""
    out = tmp_path / "out"
    tiny = ["--scale", "gpu", "--source", str(coremof_cifs), "--out", str(out), "--split-csv",
            str(tmp_path / "split.csv"), "--n-heldout", "4", "--size", "16", "--spacing-A", "2.0", "--channels", "8",
            "--batch-size", "2", "--n-eval", "4", "--shard-size", "4", "--fast-gpu", "0", "--device", "cpu",
            "--no-progress"]
    times = []  # training time in the checkpoint after each call
    while sum(t > 0 for t in times) < 2:  # 3 s chunks: voxelizing, then training, each call resuming
        assert reproduce.main(tiny + ["--epochs", str(10**6), "--chunk-min", "0.05"]) is None and len(times) < 20
        times.append(reproduce.training_state(out / "run")[1])
    assert times == sorted(times) and times[-1] > times[-2] > 0
    assert len(mofkit.read_split(tmp_path / "split.csv")["train"]) == 10  # gpu scale: every other structure
    results = reproduce.main(tiny + ["--epochs", "1", "--chunk-min", "1"])  # target already reached: evaluates
    assert results["training"]["steps"] == mofkit.load_checkpoint(out / "run" / "last.pt")["step"]
    assert results["data"]["n_eval"] == 4 and (out / "results.json").exists()


def test_every_mutant_finds_its_fragment_once():
    """A mutant whose fragment moved or changed would be reported "stale" and test nothing."""
    source = (REPO / "mofkit.py").read_text()
    assert {m.name: source.count(m.old) for m in mutation.MUTANTS if source.count(m.old) != 1} == {}
    assert len({m.name for m in mutation.MUTANTS}) == len(mutation.MUTANTS)


def test_reproduce_atoms_head_takes_its_width_from_the_scale():
    import dataclasses
    scale = dataclasses.replace(reproduce.SCALES["atoms"], density_head="atoms", density_blur=0)
    config = reproduce.train_config(scale, "cpu")
    assert (config.density_head, config.density_sigma_voxels, config.grid_channels) == ("atoms", 1.5, 11)
    assert reproduce.train_config(reproduce.SCALES["atoms"], "cpu").density_sigma_voxels == 0.0
    with pytest.raises(ValueError, match="density_blur must be off"):
        reproduce.train_config(dataclasses.replace(scale, density_blur=1), "cpu")
    held = dataclasses.replace(scale, atom_offsets=1, pair_count_weight=3.0, energy_hold_weight=1000.0,
                               output_lr=2e-3, init_from="weights/generator_atoms32.pt", pair_atoms_weight=50.0,
                               bond_weight=20.0, class_count_weight=10.0, crowd_weight=30.0, count_uncrowded=1)
    config = reproduce.train_config(held, "cpu")
    assert (config.pair_count_weight, config.energy_hold_weight, config.output_lr) == (3.0, 1000.0, 2e-3)
    assert (config.pair_atoms_weight, config.bond_weight, config.class_count_weight) == (50.0, 20.0, 10.0)
    assert config.crowd_weight == 30.0 and config.count_uncrowded is True
    assert config.init_from == str(reproduce.ROOT / "weights" / "generator_atoms32.pt")
    # the energy-only comparator: the recipe on channel 0, from scratch, no atom terms, its own epochs
    held = dataclasses.replace(held, marginal_weight=300.0, marginal_channels="density", clash_weight=0.1, epochs=1,
                               comparator_epochs=60)
    comparator = reproduce.comparator_config(held, "cpu")
    assert comparator == reproduce.train_config(reproduce.SCALES["atoms"], "cpu", grid_channels=1, epochs=60,
                                                density_blur=False, density_head="atoms", density_sigma_voxels=1.5,
                                                atom_offsets=True)
    assert reproduce.run_epochs(held, "run") == 1 and reproduce.run_epochs(held, "run_energy") == 60


def test_reproduce_atoms_scale_trains_both_generators_and_reports_structures(tmp_path, coremof_cifs):
    """--scale atoms: energy + density shards without cell properties, the multi-channel run and the energy-only
    comparator on channel 0, energy 1-NN for both by the same protocol, the structure report and targets."""
    rp, out = reproduce, tmp_path / "out"
    tiny = ["--scale", "atoms", "--source", str(coremof_cifs), "--out", str(out), "--split-csv",
            str(tmp_path / "split.csv"), "--n-train", "8", "--n-heldout", "4", "--size", "16", "--spacing-A", "1.0",
            "--channels", "8", "--batch-size", "2", "--n-eval", "4", "--shard-size", "4", "--epochs", "1",
            "--steps", "3", "--density-sigma-A", "1.5", "--density-head", "occupancy", "--d-norm", "joint", "--d-patch", "1", "--no-progress", "--ship", str(tmp_path / "w" / "atoms.pt"),
            "--manifest", str(tmp_path / "m.csv")]
    results = rp.main(tiny)
    params = mofkit.ShardDataset(out / "train").params
    assert params.density_classes == mofkit.METAL_DENSITY_CLASSES and not params.cell_properties
    assert params.density_sigma_A == 1.5
    multi, energy = (mofkit.load_checkpoint(out / run / "last.pt") for run in ("run", "run_energy"))
    assert multi["config"]["grid_channels"] == 1 + len(params.density_classes)
    assert (multi["config"]["d_norm"], multi["config"]["d_patch"]) == ("joint", True)
    assert energy["config"]["grid_channels"] == 1 and energy["grid_params"]["size"] == 16
    assert "density_classes" not in energy["grid_params"] and multi["grid_params"] == params.to_dict()
    # the run stops at its step target (3 of an epoch's 4), the comparator at its epochs
    assert multi["step"] == results["training"]["steps"] == 3 and results["training_energy_only"]["epochs"] >= 1
    for key in ("evaluation", "evaluation_energy_only"):
        sets = {r["set"] for r in results[key]["one_nn"]}
        assert "generated (seed 0)" in sets and "real train (floor)" in sets, key
    floor = lambda k: [r for r in results[k]["one_nn"] if r["set"] == "real train (floor)"]
    assert floor("evaluation") == floor("evaluation_energy_only")  # the same real energies on both sides
    targets = {row["figure"]: row for row in results["structures"]["targets"]}
    assert {"atoms_per_nm3", "nn_median_A", "bonded_fraction", "contact_fraction", "energy_r"} <= set(targets)
    assert results["structures"]["n"] == 4 and targets["atoms_per_nm3"]["real"] > 0
    check = {row["figure"]: row for row in results["structures"]["real_vs_real"]}
    assert check["atoms_per_nm3"]["real"] == targets["atoms_per_nm3"]["real"]  # the same held-out cubes
    assert set(check) == set(targets) and check["atoms_per_nm3"]["generated"] != targets["atoms_per_nm3"]["generated"]
    assert (out / "generated_0.xyz").exists() and (out / "atoms.png").exists()
    G = mofkit.load_generator(tmp_path / "w" / "atoms.pt", tmp_path / "m.csv")
    assert G.out_channels == 1 + len(params.density_classes) and G.density_blur and multi["config"]["density_blur"]
    assert G.density_head == "occupancy" and energy["config"]["density_head"] == "occupancy"  # a no-op there
    # the decoder sweep decodes the same draws: its default row is the structure report above
    table = decoder_sweep.sweep(out / "run" / "last.pt", out / "heldout", n=4, settings=[(6, None), (26, 0.3)])
    assert len(table) == 4 and list(table.side) == ["generated", "real"] * 2
    real, generated = decoder_sweep.draws(out / "run" / "last.pt", out / "heldout", n=4)
    n_classes = len(mofkit.ShardDataset(out / "heldout").params.density_classes)
    anatomy = decoder_sweep.peak_anatomy(real, n_classes)
    assert 0 < anatomy["strongest_share"] <= 1 and anatomy["peaks_per_cube"] > 10
    total = real[:, -n_classes:].sum(1)
    single, hedged = real.copy(), real.copy()
    single[:, -n_classes:], hedged[:, -n_classes:] = 0, 0
    single[:, -1] = total  # every atom's density in one channel: share 1 at every peak
    hedged[:, -1] = hedged[:, -2] = total / 2  # split evenly over two classes: share 1/2, same peaks
    assert decoder_sweep.peak_anatomy(single, n_classes)["strongest_share"] == 1
    split = decoder_sweep.peak_anatomy(hedged, n_classes)
    assert split["strongest_share"] == pytest.approx(0.5) and split["sum_at_peaks"] == pytest.approx(anatomy["sum_at_peaks"])
    occupied = decoder_sweep.occupancy(single, n_classes)  # one channel: its values are the occupancy
    voxels = total.ravel()
    assert occupied == pytest.approx({"below_0.1": np.mean(voxels < 0.1), "above_0.5": np.mean(voxels > 0.5),
                                      "above_0.8": np.mean(voxels > 0.8), "q99": np.quantile(voxels, 0.99)})
    assert decoder_sweep.occupancy(hedged, n_classes)["q99"] == pytest.approx(occupied["q99"] / 2)
    assert 0 < occupied["above_0.8"] < occupied["above_0.5"] < 1 - occupied["below_0.1"]
    from ase import Atoms
    pair = Atoms("CCH", positions=[[2.0, 2.0, 2.0], [2.0, 2.5, 2.5], [5.0, 5.0, 5.0]])  # C-C 0.71 A: not a contact
    pair.new_array("density_class", np.array(["C", "C", "H"]))
    assert decoder_sweep.contact_pairs([pair], 0.5).empty
    pair.positions[1] = [2.0, 2.45, 2.45]  # 0.64 A apart on face-diagonal voxels
    assert decoder_sweep.contact_pairs([pair, pair], 0.5).to_dict() == {("C-C", "(0, 1, 1)"): 2}
    default = table[(table.neighbours == 6) & (table.side == "real")].iloc[0]
    assert default.atoms_per_nm3 == pytest.approx(targets["atoms_per_nm3"]["real"])
    # the capacity check: a generator fitted to real cubes directly, each through its own latent
    fit_table, mse = capacity_fit.main([str(out / "heldout"), "--n", "2", "--steps", "60", "--generator-channels", "8"])
    assert mse[-1] < 0.3 * mse[0] and list(fit_table.side) == ["fit", "real"] * 2
    fitted, _ = capacity_fit.fit(real[:2], 60, generator_channels=8)
    gap = lambda a, b: float(np.abs(a[:, 1:] - b[:, 1:]).mean())  # density channels
    assert gap(fitted[0:1], real[0:1]) < gap(fitted[0:1], real[1:2])
    assert gap(fitted[1:2], real[1:2]) < gap(fitted[1:2], real[0:1])


def test_energy_to_atoms_moves_energy_and_atoms_together_and_decodes_a_perfect_output():
    """The supervised decoder's data and read-out (benchmarks/energy_to_atoms.py): under any cube symmetry the
    energy stays the field of the atoms its targets hold (sites + shifts), classes included; an output equal to
    its targets decodes to those atoms, and a weaker peak nearer than MIN_SEPARATION_A is dropped."""
    size, classes = 8, ("C", "O", "H")
    atoms_vox = np.array([[1.2, 2.0, 3.3], [5.0, 5.4, 1.0], [3.0, 6.2, 5.8]])
    axis = torch.arange(size, dtype=torch.float32)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1)
    field = lambda vox: sum(torch.exp(-((points - torch.tensor(v, dtype=torch.float32)) ** 2).sum(-1) / 2)
                            for v in vox)[None]
    p, s = torch.zeros(1, size, size, size), torch.zeros(1, 3, size, size, size)
    c = torch.full((1, size, size, size), -1)
    for k, v in enumerate(atoms_vox):
        site = tuple(np.rint(v).astype(int))
        p[(0, *site)], c[(0, *site)] = 1, k
        s[(0, slice(None), *site)] = torch.tensor(v - np.rint(v), dtype=torch.float32)
    placements = set()
    for seed in range(8):
        e2, p2, s2, c2 = energy_to_atoms.augment(field(atoms_vox), p, s, c, np.random.default_rng(seed))
        sites = p2[0].nonzero()
        moved = sites.float() + s2[0][:, sites[:, 0], sites[:, 1], sites[:, 2]].T
        assert torch.allclose(e2, field(moved.numpy()), atol=1e-5)  # the atoms are where the energy says
        assert sorted(c2[0][tuple(sites.T)].tolist()) == [0, 1, 2] and int((c2 >= 0).sum()) == 3
        placements.add(tuple(map(tuple, sites.tolist())))
    assert len(placements) > 3  # the symmetries do move atoms
    out = torch.full((4 + len(classes), size, size, size), -20.0)
    out[0][p[0] > 0] = 20.0
    out[1:4] = torch.atanh(2 * s[0].clamp(-0.49, 0.49))
    for k in range(len(classes)):
        out[4 + k][c[0] == k] = 20.0
    # a weaker peak of its own two sites along z, shifted back to 0.63 A from the first atom: dropped
    near = tuple(np.rint(atoms_vox[0]).astype(int) + [0, 0, 2])
    out[(0, *near)], out[(1, *near)], out[(2, *near)], out[(3, *near)] = 10.0, 0.0, 0.0, math.atanh(-0.9)
    for threshold in (0.5, "count"):
        decoded = energy_to_atoms.decode(out, classes, 0.5, threshold)
        order = np.argsort(decoded.positions[:, 0])
        assert [decoded.get_chemical_symbols()[i] for i in order] == ["C", "H", "O"], threshold
        assert np.allclose(decoded.positions[order], 0.5 * atoms_vox[[0, 2, 1]], atol=1e-5)


def test_nn_spread_counts_the_draws_in_which_real_cubes_miss_a_target():
    import pandas as pd
    rng = np.random.default_rng(0)
    # per-cube medians in two modes, as real cubes' (H bonds or C-C bonds): small samples straddle them
    nn = np.where(rng.random(400) < 0.5, 0.93, 1.25)
    table = lambda x: pd.DataFrame({"atoms_per_nm3": 55.0, "nn_median_A": x, "bonded_fraction": 1.0,
                                    "contact_fraction": 0.0, "crowded_fraction": 0.03})
    rates = nn_spread.miss_rates(table(nn[:200]), table(nn[200:]), sizes=[4, 200], draws=200)
    assert list(rates.columns) == ["atoms_per_nm3", "nn_median_A", "bonded_fraction", "contact_fraction"]
    assert (rates[["atoms_per_nm3", "bonded_fraction", "contact_fraction"]] == 0).all().all()
    assert rates.loc[4, "nn_median_A"] > 0.2 and rates.loc[4, "nn_median_A"] > 2 * rates.loc[200, "nn_median_A"]
    assert nn_spread.miss_rates(table(np.full(9, 1.0)), table(np.full(9, 1.2)), [5], 20).loc[5, "nn_median_A"] == 1
