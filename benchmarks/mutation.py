"""Mutation check: plant single-line bugs in a copy of mofkit.py and see whether the tests notice.

    python3 benchmarks/mutation.py                  # every mutant (one thread, a few minutes on 2 cores)
    python3 benchmarks/mutation.py -m bet se_dof    # only mutants whose name contains one of these words
    python3 benchmarks/mutation.py --list           # the mutants and their test selections

A habit, not a CI step: run it after changing a critical function or its tests. Each mutant replaces ONE
line fragment of mofkit.py (it must occur exactly once, else the mutant is reported "stale" and needs
updating), then runs only the tests its selection names (pytest -k) in a temporary copy of the repository.
"caught" means a selected test failed; "NOT CAUGHT" means every selected test passed with the bug in place.
Before the mutants, each selection is run once on the unmodified code (a selection that fails there would
catch every mutant and prove nothing). To add a mutant, append a Mutant(...) to MUTANTS.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    area: str
    old: str        # a fragment occurring exactly once in mofkit.py
    new: str
    tests: str      # pytest -k expression: the tests that check this behaviour directly


# --- test selections -------------------------------------------------------------------------------------------
LJ = ("uff_and_probe or analytic_lennard or brute_force or energy_of_each_coremof_element or "
      "translation_and_supercell or frames_say")
HENRY = "henry or heat or framework_density or widom"
FIT = ("noiseless or standard_errors or fit_statistics or curve_fit or aic or bet or freundlich or sips or "
       "study_isotherm or fit_isotherm_table")
SHARD_FORMAT = "shard_round_trip or truncated_shard or shard_file_size or grid_count_must_equal"
CHECKPOINT = ("train_resume_is_bit_identical or main_train_on_shards_resumes or max_minutes_stops_at_a_checkpoint "
              "or corrupt_or_mismatched")
ONE_NN = "one_nn or memorisation"
PROPERTIES = "property_comparison"
DENSITY = "density or round_trip or grid_to_atoms"
CLUSTER = "cluster_route"
CLI = "cli_"
GAN = "gan_losses or gan_step_minimises"
DISCRIMINATOR = "gan_step_minimises or r1_step or patch_discriminator or contrast_shared"

MUTANTS = [
    # LJ kernel, force field and periodic images
    Mutant("uff_oxygen_eps_x10", "force field", "O 3.500 0.060", "O 3.500 0.600", LJ),
    Mutant("uff_zinc_sigma", "force field", "Zn 2.763 0.124", "Zn 2.863 0.124", LJ),
    Mutant("kcal_to_K", "force field", "KCAL_PER_MOL_IN_K = 503.22", "KCAL_PER_MOL_IN_K = 500.0", LJ),
    Mutant("probe_h2_sigma", "force field", '"H2": (34.2, 2.96)', '"H2": (34.2, 2.86)', LJ),
    Mutant("mixing_geometric_sigma", "LJ kernel", "sig = np.array([(UFF[s][1] + sig_p) / 2 for s in symbols])",
           "sig = np.array([math.sqrt(UFF[s][1] * sig_p) for s in symbols])", LJ),
    Mutant("lj_attraction_x2", "LJ kernel", "return 4 * eps * sig ** 12, 4 * eps * sig ** 6",
           "return 4 * eps * sig ** 12, 2 * eps * sig ** 6", LJ),
    Mutant("cutoff_mask_dropped", "LJ kernel", "e.sub_(B[nbr][:, None, :]).mul_(inv3).masked_fill_(far, 0.0)",
           "e.sub_(B[nbr][:, None, :]).mul_(inv3)", LJ),
    Mutant("neighbour_radius_dropped", "LJ kernel", "< cutoff_A + radius + 1e-3).nonzero", "< cutoff_A + 1e-3).nonzero",
           LJ),
    Mutant("images_half_reach", "images", "keep = (gap ** 2).sum(1) < reach_A ** 2",
           "keep = (gap ** 2).sum(1) < (reach_A / 2) ** 2", LJ),
    Mutant("images_no_negative_shift", "images", "np.arange(math.floor(fc[:, d].min()) - 1,",
           "np.arange(max(0, math.floor(fc[:, d].min()) - 1),", LJ),
    Mutant("cell_frame_off_by_one", "grid", "return (ijk / size) @ atoms.cell.array",
           "return (ijk / (size - 1)) @ atoms.cell.array", LJ),
    Mutant("cap_ignored", "grid", "    for e in _lj_blocks(jobs, probe, cutoff_A, device, torch.float32, pairs_per_batch):\n"
           "        e = e.clamp_(max=cap_K)", "    for e in _lj_blocks(jobs, probe, cutoff_A, device, torch.float32, "
           "pairs_per_batch):\n        e = e.clamp_(max=2 * cap_K)", LJ),
    # Henry coefficient, heat of adsorption, density
    Mutant("widom_sign", "Henry/Q_st", "    w = np.exp(-e / temperature_K)\n    if cap_K",
           "    w = np.exp(e / temperature_K)\n    if cap_K", HENRY),
    Mutant("henry_without_T", "Henry/Q_st",
           "return widom_factor(grid_K, temperature_K, cap_K) / (R_J_PER_MOL_K * temperature_K * density_kg_m3)",
           "return widom_factor(grid_K, temperature_K, cap_K) / (R_J_PER_MOL_K * density_kg_m3)", HENRY),
    Mutant("heat_without_RT", "Henry/Q_st", "R_J_PER_MOL_K * (temperature_K - (e * w).sum() / w.sum())",
           "R_J_PER_MOL_K * (0.0 - (e * w).sum() / w.sum())", HENRY),
    Mutant("density_units", "Henry/Q_st", "AMU_KG / (atoms.cell.volume * 1e-30))", "AMU_KG / (atoms.cell.volume * 1e-27))",
           HENRY),
    # the isotherm fit core and models
    Mutant("se_dof_m", "fit core", "s2 = np.sum(info[\"fvec\"] ** 2) / (m - k) if m > k else np.nan",
           "s2 = np.sum(info[\"fvec\"] ** 2) / m if m > k else np.nan", FIT),
    Mutant("se_no_delta_method", "fit core", "se = dict(zip(free, values * np.sqrt(var)))",
           "se = dict(zip(free, np.sqrt(var)))", FIT),
    Mutant("aic_counts_fixed", "fit core", "aic = m * math.log(ss_res / m) + 2 * k if",
           "aic = m * math.log(ss_res / m) + 2 * len(spec.params) if", FIT),
    Mutant("rmse_dof", "fit core", "float(r2), math.sqrt(ss_res / m), aic", "float(r2), math.sqrt(ss_res / (m - k)), aic",
           FIT),
    Mutant("log_space_ignored", "fit core", "return (np.log(m) if log_space else m) - target", "return m - q", FIT),
    Mutant("bet_denominator", "models", "(1.0 - x) * (1.0 - x + C * x))", "(1.0 - x) * (1.0 + C * x))", FIT),
    Mutant("sips_power_of_P_only", "models", "x = (K * P) ** (1.0 / n)", "x = K * P ** (1.0 / n)", FIT),
    Mutant("freundlich_power", "models", "return K * P ** (1.0 / n)", "return K * P ** n", FIT),
    # shard format checks
    Mutant("shard_exact_size_dropped", "shards", "if magic != SHARD_MAGIC or size != data_end + footer_bytes + 16:",
           "if magic != SHARD_MAGIC:", SHARD_FORMAT),
    Mutant("shard_names_count_dropped", "shards", "or shape[0] != len(meta[\"names\"]):", "or False:", SHARD_FORMAT),
    Mutant("shard_float16_overflow_allowed", "shards", "if grids16.ndim != 5 or not np.isfinite(grids16).all():",
           "if grids16.ndim != 5:", SHARD_FORMAT),
    Mutant("shard_magic_unchecked", "shards", "if magic != SHARD_MAGIC or size", "if size", SHARD_FORMAT),
    # checkpoint save / restore
    Mutant("resume_rng_not_restored", "checkpoint", "        _set_rng_state(ckpt[\"rng\"][rank])", "        pass",
           CHECKPOINT),
    Mutant("resume_opt_d_not_restored", "checkpoint", "        run.opt_d.load_state_dict(ckpt[\"opt_d\"])",
           "        pass", CHECKPOINT),
    Mutant("resume_position_lost", "checkpoint",
           "ckpt[\"step\"], ckpt[\"epoch\"],\n                       ckpt[\"samples_in_epoch\"],",
           "ckpt[\"step\"], ckpt[\"epoch\"],\n                       0,", CHECKPOINT),
    Mutant("save_without_generator", "checkpoint", "\"generator\": run.G.state_dict(),",
           "\"generator\": _models(config)[0].state_dict(),", CHECKPOINT),
    # 1-NN and the other scores
    Mutant("nn_ties_to_later_block", "1-NN", "better = block_best < best_d[q0:q0 + len(q)]",
           "better = block_best <= best_d[q0:q0 + len(q)]", ONE_NN),
    Mutant("nn_self_not_excluded", "1-NN",
           "dist[qi == torch.arange(r0, r0 + len(r), device=device)[None, :]] = math.inf", "pass", ONE_NN),
    Mutant("nn_no_exact_recheck", "1-NN", "rel_tol = 64 * torch.finfo(dtype).eps", "rel_tol = -1.0", ONE_NN),
    Mutant("nn_labels_inverted", "1-NN", "correct = (labels[nearest] == labels).double()",
           "correct = (labels[nearest] != labels).double()", ONE_NN),
    Mutant("memorisation_threshold_max", "1-NN", "threshold = float(held_d.min())", "threshold = float(held_d.max())",
           ONE_NN),
    Mutant("noise_floor_half_with_itself", "scores", "real[c].iloc[second])}", "real[c].iloc[first])}", PROPERTIES),
    # density decoder and cluster route
    Mutant("density_threshold_0_3", "decoder", "threshold = default_threshold(spacing_A, sigma_A) if",
           "threshold = 0.3 ** ((spacing_A / sigma_A) ** 2) if", DENSITY),
    Mutant("density_outside_peaks_kept", "decoder",
           "inside = np.all((centre > -0.02) & (centre < size - 1 + 0.02), axis=1)",
           "inside = np.all(centre > -1e9, axis=1)", DENSITY),
    Mutant("density_refinement_sign", "decoder", "centre[:, axis] += np.clip(-slope / kappa, -0.5, 0.5)",
           "centre[:, axis] += np.clip(slope / kappa, -0.5, 0.5)", DENSITY),
    Mutant("density_weakest_channel_wins", "decoder", "order = np.argsort(-height, kind=\"stable\")",
           "order = np.argsort(height, kind=\"stable\")", DENSITY),
    Mutant("density_26_neighbours_as_6", "decoder", "(neighbours == 6 and sum(map(abs, offset)) != 1)",
           "(sum(map(abs, offset)) != 1)", DENSITY + " or peak_neighbours"),
    Mutant("density_width_not_built", "decoder", "params.density_sigma_A, params.density_classes)",
           "None, params.density_classes)", "density_width"),
    Mutant("density_sigma_x2", "decoder", "torch.exp(-r2 / (2 * sigma_A ** 2))", "torch.exp(-r2 / (4 * sigma_A ** 2))",
           DENSITY),
    Mutant("cluster_farthest_core", "decoder", "symbols.append(min(elements, key=lambda e: abs(radii[e] - r)))",
           "symbols.append(max(elements, key=lambda e: abs(radii[e] - r)))", CLUSTER),
    # command line
    Mutant("cli_ignores_spacing", "CLI", "frame=args.frame, spacing_A=args.spacing,", "frame=args.frame, spacing_A=0.5,",
           CLI),
    Mutant("cli_ignores_probe", "CLI", "spacing_A=args.spacing, probe=args.probe,\n", "spacing_A=args.spacing,\n", CLI),
    Mutant("cli_sample_ignores_seed", "CLI", "grids = sample(args.checkpoint, args.n, seed=args.seed,",
           "grids = sample(args.checkpoint, args.n, seed=0,", CLI),
    Mutant("cli_evaluate_ignores_n", "CLI", "heldout, _ = read_grids(args.heldout, args.n)",
           "heldout, _ = read_grids(args.heldout, 500)", CLI),
    # GAN objective (issue 13's tests)
    Mutant("d_fake_target_flipped", "GAN loss", "F.mse_loss(d_fake, torch.zeros_like(d_fake)))",
           "F.mse_loss(d_fake, torch.ones_like(d_fake)))", GAN),
    Mutant("g_target_flipped", "GAN loss", "return F.mse_loss(d_gen, torch.ones_like(d_gen))",
           "return F.mse_loss(d_gen, torch.zeros_like(d_gen))", GAN),
    Mutant("hinge_fake_sign", "GAN loss", "F.relu(1 + d_fake).mean()", "F.relu(1 - d_fake).mean()", GAN),
    Mutant("nonsat_g_saturating", "GAN loss", "return F.softplus(-d_gen).mean()", "return -F.softplus(d_gen).mean()",
           GAN),
    # the discriminator's options (patch scores, normalisation) and R1
    Mutant("r1_unscaled_by_interval", "R1", "0.5 * config.r1_gamma * config.r1_every *", "0.5 * config.r1_gamma *",
           DISCRIMINATOR),
    Mutant("r1_patch_sum_not_mean", "R1", "per_grid = sum(part.mean(1)", "per_grid = sum(part.sum(1)",
           DISCRIMINATOR),
    Mutant("patch_loss_dropped", "GAN loss", "zip(_score_parts(d_real), _score_parts(d_fake)))",
           "zip(_score_parts(d_real)[:1], _score_parts(d_fake)[:1]))", DISCRIMINATOR),
    Mutant("joint_g_step_apart", "discriminator norm", "d_gen = run.D_step_for_G(torch.cat([real.detach(), fake])).float()[len(real):]",
           "d_gen = run.D_step_for_G(fake).float()", DISCRIMINATOR),
    Mutant("d_norm_none_keeps_batchnorm", "discriminator norm", '+ ([nn.BatchNorm3d(c_out)] if norm == "batch" else [])',
           "+ [nn.BatchNorm3d(c_out)]", DISCRIMINATOR),
    # the marginal term in G's loss
    Mutant("w2_unsorted_real", "GAN loss", "(a.sort(dim=-1).values - b.sort(dim=-1).values)",
           "(a.sort(dim=-1).values - b)", "marginal or pair"),
    Mutant("marginal_draw_not_random", "GAN loss", "at = torch.randint(x.shape[0] * x.shape[2], (voxels,), device=x.device)",
           "at = torch.arange(voxels, device=x.device) % (x.shape[0] * x.shape[2])", "marginal"),
    Mutant("marginal_density_takes_energy", "GAN loss", 'first = 1 if config.marginal_channels == "density" else 0',
           "first = 0", "marginal"),
    # the pair term in G's loss
    Mutant("pair_one_direction", "GAN loss", "d = directions[torch.randint(len(directions), (voxels,), device=x.device)]",
           "d = directions[torch.zeros(voxels, dtype=torch.long, device=x.device)]", "pair"),
    Mutant("pair_draw_at_the_corner", "GAN loss", "at = low + (torch.rand(voxels, 3, device=x.device) * (high - low)).long()",
           "at = low + 0 * high", "pair"),
    Mutant("pair_max_takes_energy", "GAN loss", "(lambda x: x[:, 1:].amax(1)) if", "(lambda x: x.amax(1)) if", "pair"),
    Mutant("pair_field_ignored", "GAN loss", 'if config.pair_field == "max" else (lambda x: x[:, 1:].sum(1))',
           "if True else None", "pair"),
    # the kit's recipe and the evaluation protocol
    Mutant("ema_weights_swapped", "recipe", "list(run.G.parameters()), 1 - decay)", "list(run.G.parameters()), decay)",
           "moving_average"),
    Mutant("signed_drops_repulsion", "recipe", '{"wells": 0.0, "signed": -1.0}', '{"wells": 0.0, "signed": 0.0}',
           "signed_transform"),
    Mutant("generator_init_shrinks", "recipe", "layers[-2].weight.mul_(math.sqrt(layers[-2].out_channels))",
           "layers[-2].weight.mul_(1.0)", "output_weights_start_the_same"),
    Mutant("density_blur_skipped", "recipe", "if self.density_blur:  # before the activation",
           "if False:  # before the activation", "density_blur"),
    Mutant("density_blur_after_activation", "recipe", "return torch.cat([energy, self.net[-1](density)], 1)",
           "return torch.cat([energy, binomial_blur(self.net[-1](x[:, 1:])) if self.density_blur else "
           "self.net[-1](density)], 1)", "density_blur"),
    Mutant("occupancy_shares_softmax", "recipe", "torch.exp(logits - logits.amax(1, True))",
           "torch.softmax(logits, 1)", "occupancy_head"),
    Mutant("occupancy_blur_skipped", "recipe", "torch.sigmoid(binomial_blur(occupancy) if self.density_blur else "
           "occupancy)", "torch.sigmoid(occupancy)", "occupancy_head"),
    Mutant("dilate_one_axis", "recipe", "for axis in (-3, -2, -1):\n        n, dim",
           "for axis in (-1,):\n        n, dim",
           "gaussian_dilate or atoms_head"),
    Mutant("dilate_one_side", "recipe", "for o in range(-reach, reach + 1):  # voxel i",
           "for o in range(0, reach + 1):  # voxel i",
           "gaussian_dilate or atoms_head"),
    Mutant("dilate_short_window", "recipe", "reach = math.ceil(3 * sigma_voxels * sub)",
           "reach = math.ceil(2 * sigma_voxels * sub)", "gaussian_dilate or atoms_head"),
    Mutant("dilate_wrong_width", "recipe", "math.exp(-(o / sub) ** 2 / (2 * sigma_voxels ** 2))",
           "math.exp(-(o / sub) ** 2 / sigma_voxels ** 2)", "gaussian_dilate or atoms_head"),
    Mutant("dilate_sites_as_voxels", "recipe", "math.exp(-(o / sub) ** 2 /", "math.exp(-o ** 2 /",
           "gaussian_dilate or atoms_head"),
    Mutant("sites_interleaved_wrong", "recipe", "permute(0, 4, 1, 5, 2, 6, 3)", "permute(0, 1, 4, 2, 5, 3, 6)",
           "atoms_head"),
    Mutant("atom_classes_per_voxel", "recipe", "gaussian_dilate(presence * _spread_to_sites(shares, self.subvoxels), "
           "self.sigma_voxels,", "shares * gaussian_dilate(presence, self.sigma_voxels,", "atoms_head"),
    Mutant("atoms_prior_dropped", "recipe", "torch.sigmoid(occupancy + ATOM_PRIOR_LOGIT)", "torch.sigmoid(occupancy)",
           "atoms_head"),
    Mutant("atoms_width_not_architecture", "checkpoint", '"density_sigma_voxels", "atom_subvoxels", "density_upsample",',
           '"atom_subvoxels", "density_upsample",', "atoms_head"),
    Mutant("atom_sites_not_architecture", "checkpoint", '"density_sigma_voxels", "atom_subvoxels", "density_upsample",',
           '"density_sigma_voxels", "density_upsample",', "atoms_head"),
    Mutant("clash_counts_each_site_with_itself", "GAN loss", "if o <= (0, 0, 0) or sum(", "if o < (0, 0, 0) or sum(",
           "clash"),
    Mutant("clash_face_neighbours_only", "GAN loss", "sum(c * c for c in o) > reach * reach",
           "sum(c * c for c in o) > reach", "clash"),
    Mutant("clash_term_dropped", "GAN loss", "if config.clash_weight > 0:", "if False:", "clash"),
    Mutant("pair_count_term_dropped", "GAN loss", "loss_g = loss_g + config.pair_count_weight * pair_count_loss(",
           "loss_g = loss_g + 0 * pair_count_loss(", "pair_count"),
    Mutant("pair_count_no_straight_through", "GAN loss", "is_atom = peak + p - p.detach()", "is_atom = peak",
           "atom_pair_counts"),
    Mutant("pair_count_not_the_decoders_peaks", "GAN loss", "peak_voxels(density.detach(), threshold).any(1)",
           "(density.detach() > threshold).any(1)", "atom_pair_counts"),
    Mutant("pair_count_candidates_by_presence", "GAN loss", "(2 * peak + p.detach()).topk(", "p.detach().topk(",
           "atom_pair_counts"),
    Mutant("pair_count_reference_not_saved", "checkpoint", '"references": state.references}', '"references": {}}',
           "pair_count"),
    Mutant("bond_term_dropped", "GAN loss", "loss_g = loss_g + config.bond_weight * unbonded_atoms(",
           "loss_g = loss_g + 0 * unbonded_atoms(", "pair_count_and_energy_hold"),
    Mutant("pair_atoms_weight_ignored", "GAN loss", "run.pair_reference, config.pair_atoms_weight, config.count_",
           "run.pair_reference, uncrowded=config.count_", "pair_count_and_energy_hold"),
    Mutant("unbonded_counts_itself", "GAN loss", "yield (near * w[None]).sum(1) - near.diagonal() * w,",
           "yield (near * w[None]).sum(1),", "unbonded"),
    Mutant("unbonded_edge_atoms_count", "GAN loss", "inner = ((at.detach() >= edge_voxels) & (at.detach() <= size",
           "inner = ((at.detach() >= 0) & (at.detach() <= size", "unbonded"),
    Mutant("unbonded_one_bond_length", "GAN loss", "limit = limits[c[:, None], c[None]]", "limit = limits[1, 1]",
           "unbonded"),
    Mutant("class_count_term_dropped", "GAN loss", "loss_g = loss_g + config.class_count_weight * class_count_loss(",
           "loss_g = loss_g + 0 * class_count_loss(", "pair_count_and_energy_hold"),
    Mutant("class_count_no_class_gradient", "GAN loss",
           "(w[:, None] * one_hot + w.detach()[:, None] * (v - v.detach())).sum(0)", "(w[:, None] * one_hot).sum(0)",
           "unbonded"),
    Mutant("class_count_density_detached", "GAN loss", "density = from_gan_output(fake, 1.0, config.transform)[:, 1:]",
           "density = from_gan_output(fake.detach(), 1.0, config.transform)[:, 1:]", "pair_count_and_energy_hold"),
    Mutant("unbonded_count_smoothed", "GAN loss", "near = (d2 < limit ** 2).to(w.dtype) + soft - soft.detach()",
           "near = soft", "unbonded"),
    Mutant("unbonded_sites_that_are_no_atoms", "GAN loss", "inner * w.detach(), w  # not itself",
           "inner, w  # not itself", "unbonded"),
    Mutant("crowd_term_dropped", "GAN loss", "loss_g = loss_g + config.crowd_weight * crowded_atoms(",
           "loss_g = loss_g + 0 * crowded_atoms(", "pair_count_and_energy_hold"),
    Mutant("crowd_limits_are_bonds", "GAN loss", "bond_voxels(params.density_classes, params.spacing_A, CROWD_MULT)",
           "bond_voxels(params.density_classes, params.spacing_A)", "pair_count_and_energy_hold"),
    Mutant("crowded_counts_each_neighbour", "GAN loss",
           "near = crowded + crowded * (neighbours - neighbours.detach())", "near = neighbours", "unbonded"),
    Mutant("crowd_gradient_on_uncrowded_pairs", "GAN loss", "near = crowded + crowded * (", "near = crowded + (",
           "unbonded"),
    Mutant("crowded_report_at_bond_length", "structure report", "crowded = _crowded(atoms, crowd_mult)",
           "crowded = _crowded(atoms, bond_mult)", "unbonded"),
    Mutant("uncrowded_count_not_subtracted", "GAN loss",
           "atoms = atoms - crowded_atoms(*drawn, run.crowds[0], -math.inf, share=False)", "atoms = atoms",
           "pair_count_and_energy_hold"),
    Mutant("uncrowded_count_inner_only", "GAN loss", "run.crowds[0], -math.inf, share=False)",
           "*run.crowds, share=False)", "pair_count_and_energy_hold"),
    Mutant("uncrowded_reference_all_atoms", "GAN loss", 'ref_atoms = reference["uncrowded_atoms" if uncrowded else',
           'ref_atoms = reference["atoms" if uncrowded else', "pair_count_and_energy_hold"),
    Mutant("real_uncrowded_at_bond_length", "GAN loss", "uncrowded.append(int((~_crowded(s, CROWD_MULT)).sum()))",
           "uncrowded.append(int((~_crowded(s, BOND_MULT)).sum()))", "unbonded"),
    Mutant("axis_fraction_ignores_its_angle", "structure report", "nn * math.cos(math.radians(axis_deg))",
           "nn * math.cos(math.radians(2 * axis_deg))", "structure_report_of_a_hand_built_cube"),
    Mutant("energy_hold_dropped", "GAN loss", "loss_g = loss_g + config.energy_hold_weight *", "loss_g = loss_g + 0 *",
           "energy_hold"),
    Mutant("energy_hold_draws_from_the_run_rng", "checkpoint", "with torch.random.fork_rng(devices=[]):  # building",
           "with contextlib.nullcontext():  # building", "energy_hold"),
    Mutant("init_energy_channel_not_copied", "recipe", "weights[name][:, :1] = value[:, :1]", "pass", "init_from"),
    Mutant("init_output_layer_whole", "recipe", "weights[name][:, :1] = value[:, :1]",
           "weights[name][:, :] = value[:, :1]", "init_from"),
    Mutant("init_into_raw_generator_only", "recipe", "for G in filter(None, (run.G, run.G_ema)):",
           "for G in filter(None, (run.G,)):", "init_from"),
    Mutant("freeze_energy_channel_trains", "recipe", "keep[:, 0] = 0", "keep[:, 0] = 1", "init_from"),
    Mutant("freeze_trunk_trains", "recipe", "        p.requires_grad_(False)\n", "        pass\n", "init_from"),
    Mutant("freeze_resize_head_too", "recipe", "if G.density_net is not None:  # \"resize\"", "if False:  #",
           "init_from"),
    Mutant("resize_head_not_architecture", "checkpoint", '"atom_subvoxels", "density_upsample", "atom_offsets")',
           '"atom_subvoxels", "atom_offsets")', "init_from or resume"),
    Mutant("offsets_not_architecture", "checkpoint", '"density_upsample", "atom_offsets")', '"density_upsample")',
           "atom_offsets"),
    Mutant("offsets_shift_sign", "recipe", "torch.exp(-(o + here[1]) ** 2", "torch.exp(-(o - here[1]) ** 2",
           "atom_offsets"),
    Mutant("offsets_not_carried", "recipe", "out, rest = torch.where(wins, term, out), [torch.where(wins, a, b) for a, b",
           "out, rest = torch.where(wins, term, out), [b for a, b", "atom_offsets"),
    Mutant("offsets_window_short", "recipe", "reach = math.ceil(3 * sigma_voxels + 0.5)",
           "reach = math.ceil(3 * sigma_voxels - 0.5)", "atom_offsets"),
    Mutant("offsets_unbounded", "recipe", "0.5 * torch.tanh(logits[:, :3])", "torch.tanh(logits[:, :3])",
           "atom_offsets"),
    Mutant("clash_shifts_ignored", "GAN loss", "step = shifts[(..., *there)] - shifts[(..., *here)] +",
           "step = 0 * shifts[(..., *there)] +", "clash"),
    Mutant("init_e_scale_unchecked", "recipe", "if not math.isclose(source.e_scale_K, e_scale_K, rel_tol=1e-6) or",
           "if False and", "init_from"),
    Mutant("atoms_width_unchecked_against_data", "recipe", 'if config.density_head != "atoms" or grid_params is None:',
           "if True:", "atoms_head"),
    Mutant("occupancy_signed_unmapped", "recipe", '2 * density - 1 if self.transform == "signed" else density',
           "density", "occupancy_head"),
    Mutant("generator_channels_ignored", "recipe", "Generator(config.dim, config.latent, config.generator_channels "
           "or config.channels,", "Generator(config.dim, config.latent, config.channels,", "generator_channels"),
    Mutant("generator_channels_not_architecture", "checkpoint", '"channels", "generator_channels", "latent"',
           '"channels", "latent"', "generator_channels"),
    Mutant("blur_kernel_box", "recipe", "k1 = x.new_tensor([1.0, 2.0, 1.0]) / 4", "k1 = x.new_tensor([1.0, 1.0, 1.0]) / 3",
           "binomial_blur"),
    Mutant("cube_symmetry_no_flip", "recipe", "return grid.flip(flips) if flips else grid", "return grid",
           "cube_symmetries"),
    Mutant("evaluate_skips_round_trip", "evaluation", "clip = lambda x: np.asarray(gan_round_trip(x, e_scale_K), "
           "dtype=np.float32)", "clip = lambda x: np.asarray(x, dtype=np.float32)", "both_sides_through"),
]


def _copy_repo(dest):
    """The repository without .git: tests/ copied (they locate mofkit.py through their own path), the rest
    linked; mofkit.py is written per mutant."""
    for entry in REPO.iterdir():
        if entry.name in (".git", "mofkit.py", "tests", "__pycache__", ".pytest_cache"):
            continue
        (dest / entry.name).symlink_to(entry)
    shutil.copytree(REPO / "tests", dest / "tests", ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))


def _run_tests(dest, source, selection, timeout_s):
    (dest / "mofkit.py").write_text(source)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests", "-k", selection]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "timeout", "", time.perf_counter() - start
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.M)
    counts = re.findall(r"(\d+) (passed|failed|error)", done.stdout)
    return done.returncode, (failed[0].split("::")[-1] if failed else " ".join(f"{n} {w}" for n, w in counts)), \
        time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--match", nargs="*", help="run only mutants whose name contains one of these")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--no-baseline", action="store_true", help="skip running each selection on the unmodified code")
    p.add_argument("--timeout-s", type=int, default=600, help="per pytest run")
    args = p.parse_args(argv)
    mutants = [m for m in MUTANTS if not args.match or any(w in m.name for w in args.match)]
    if args.list:
        for m in mutants:
            print(f"{m.name:32s} {m.area:12s} -k {m.tests!r}")
        return
    source = (REPO / "mofkit.py").read_text()
    results = {}
    with tempfile.TemporaryDirectory(prefix="mofkit_mutation_") as tmp:
        dest = Path(tmp)
        _copy_repo(dest)
        if not args.no_baseline:
            for selection in dict.fromkeys(m.tests for m in mutants):
                rc, detail, seconds = _run_tests(dest, source, selection, args.timeout_s)
                print(f"baseline  {'ok' if rc == 0 else 'FAILS'}  ({seconds:.0f} s, {detail})  -k {selection!r}",
                      flush=True)
                if rc != 0:
                    sys.exit(f"the selection {selection!r} fails on the unmodified code: fix that first")
        for m in mutants:
            if source.count(m.old) != 1:
                results[m.name] = "stale"
                print(f"{'stale':11s} {m.name:32s} the fragment occurs {source.count(m.old)} times in mofkit.py",
                      flush=True)
                continue
            rc, detail, seconds = _run_tests(dest, source.replace(m.old, m.new), m.tests, args.timeout_s)
            verdict = {0: "NOT CAUGHT", 1: "caught", 5: "no tests"}.get(rc, "caught" if rc == 2 else str(rc))
            results[m.name] = verdict
            print(f"{verdict:11s} {m.name:32s} {m.area:12s} {seconds:4.0f} s  {detail}", flush=True)
    caught = sum(v == "caught" for v in results.values())
    print(f"\n{caught}/{len(results)} mutants caught" + "".join(
        f"; {sum(v == k for v in results.values())} {k}" for k in ("NOT CAUGHT", "stale", "no tests", "timeout")
        if k in results.values()))
    return results


if __name__ == "__main__":
    main()
