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
import warnings
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



# =============================================================================
# 3. Voxelizer: force field, probe energies, grids, Henry coefficient
# =============================================================================



# =============================================================================
# 4. Isotherms: Freundlich, Sips, Langmuir and BET fits; grid isotherm estimate
# =============================================================================

# Every model is fitted by one least-squares core (`_fit_model`). Parameters are all positive, so the
# core fits their logarithms: K > 0, n > 0 ... hold by construction and Levenberg-Marquardt runs
# unconstrained. Standard errors come from the Jacobian at the optimum, s^2 (J^T J)^-1, mapped back
# by the delta method (exact for this change of variables: se(K) = K se(ln K)). R^2, RMSE and AIC
# are always computed in linear adsorption units so different models (and log-space fits) compare.
# The study summarised isotherms as "Freundlich K, n" but its one published row (H2 on Cu3(BTC)2,
# 77 K: g_inf 16.466949, K 2.5, n 1.328632, R^2 0.996919) is a Sips fit with K held at 2.5:
# `fit_sips(P, q, fix_K=2.5)` reproduces it; `fit_freundlich` is the true Freundlich fit.

GAS_CONSTANT_J_MOL_K = 8.314462618  # CODATA 2018 (exact)
CM3_STP_PER_MMOL = 22.414  # ideal-gas molar volume at 273.15 K and 1 atm

# Probe liquids: molar mass (g/mol) and saturated-liquid density (kg/m^3) at the normal boiling point
# (CO2: at its triple point, 216.59 K; it has no liquid at 1 atm). Densities from the reference
# equations of state as implemented in NIST REFPROP / CoolProp 8.0: H2 Leachman et al. 2009 (normal
# hydrogen), N2 Span et al. 2000, Ar Tegeler et al. 1999, CH4 Setzmann & Wagner 1991, Kr and Xe
# Lemmon & Span 2006, CO2 Span & Wagner 1996. Molar masses: IUPAC standard atomic weights.
PROBE_LIQUIDS = {
    "H2": (2.01588, 70.85),
    "N2": (28.0134, 806.08),
    "Ar": (39.948, 1395.40),
    "CH4": (16.0428, 422.36),
    "Kr": (83.798, 2416.6),
    "Xe": (131.293, 2942.0),
    "CO2": (44.0095, 1178.5),
}

# BET needs the saturation pressure P0. Known here near the normal boiling point Tb (P0 = 1 atm) as
# ln P0 = ln(1 atm) - (L/R)(1/T - 1/Tb), with L = R dln P0/d(1/T) at Tb taken from the reference
# equations of state above (an effective enthalpy of vaporisation, kJ/mol): within 0.4% of those
# equations for |T - Tb| <= 5 K. CO2 sublimes at 1 atm: 194.686 K with the enthalpy of sublimation
# 25.23 kJ/mol (Giauque & Egan 1937), not checked against an equation of state. Else pass p0.
_BOILING_POINTS = {  # name -> (Tb in K, L in kJ/mol)
    "N2": (77.355, 5.8646),
    "Ar": (87.302, 6.6925),
    "CH4": (111.667, 8.539),
    "Kr": (119.735, 9.3092),
    "Xe": (165.051, 13.0016),
    "CO2": (194.686, 25.23),
}
_ADSORBATE_ALIASES = {"hydrogen": "H2", "nitrogen": "N2", "argon": "Ar", "methane": "CH4",
                      "krypton": "Kr", "xenon": "Xe", "carbon dioxide": "CO2"}


def _adsorbate_key(adsorbate):
    """'Nitrogen', 'n2', 'N2' -> 'N2' (ISODB spells adsorbates out in words)."""
    name = str(adsorbate).strip()
    by_lower = {k.lower(): k for k in PROBE_LIQUIDS}
    return _ADSORBATE_ALIASES.get(name.lower()) or by_lower.get(name.lower()) or name


def saturation_pressure_bar(adsorbate, temperature_K, window_K=5.0) -> float:
    """Saturation (vapour) pressure P0 of `adsorbate` near its normal boiling point, in bar."""
    key = _adsorbate_key(adsorbate)
    if key not in _BOILING_POINTS:
        raise ValueError(f"no saturation pressure known for adsorbate {adsorbate!r}; pass p0 explicitly")
    tb_K, dh_kJ_mol = _BOILING_POINTS[key]
    if abs(temperature_K - tb_K) > window_K:
        raise ValueError(f"P0 of {key} is known here only within {window_K} K of {tb_K} K, "
                         f"not at {temperature_K} K; pass p0 explicitly")
    return 1.01325 * math.exp(-dh_kJ_mol * 1e3 / GAS_CONSTANT_J_MOL_K * (1 / temperature_K - 1 / tb_K))


def _freundlich(P, K, n):
    return K * P ** (1.0 / n)


def _sips(P, g_inf, K, n):
    x = (K * P) ** (1.0 / n)
    return g_inf * x / (1.0 + x)


def _langmuir(P, Q_max, b):
    return Q_max * b * P / (1.0 + b * P)


def _bet(P, q_m, C, P0):
    x = P / P0
    return q_m * C * x / ((1.0 - x) * (1.0 - x + C * x))


def _line(x, y):
    """Least-squares line y = a + s x -> (a, s) through the finite points (zero uptakes give inf)."""
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return math.nan, math.nan
    s, a = np.polyfit(x[ok], y[ok], 1)
    return a, s


def _start_freundlich(P, q, fixed):
    with np.errstate(divide="ignore"):
        a, s = _line(np.log(P), np.log(q))  # ln q = ln K + (1/n) ln P
    return {"K": math.exp(a) if math.isfinite(a) else q.max(), "n": 1.0 / s if s > 0 else 1.0}


def _start_langmuir(P, q, fixed):
    with np.errstate(divide="ignore", invalid="ignore"):
        a, s = _line(P, P / q)  # P/q = 1/(Q b) + P/Q
    if a > 0 and s > 0:
        return {"Q_max": 1.0 / s, "b": s / a}
    return {"Q_max": 1.5 * q.max(), "b": 1.0 / np.median(P)}  # linearisation useless: a rough guess


def _start_sips(P, q, fixed):
    start = _start_langmuir(P, q, fixed)  # Sips with n = 1 is Langmuir
    return {"g_inf": start["Q_max"], "K": start["b"], "n": 1.0}


def _start_bet(P, q, fixed):
    x = P / fixed["P0"]
    with np.errstate(divide="ignore", invalid="ignore"):
        a, s = _line(x, x / (q * (1.0 - x)))  # x/(q(1-x)) = 1/(q_m C) + (C-1)/(q_m C) x
    if a > 0 and s > -a:
        return {"q_m": 1.0 / (a + s), "C": max(s / a + 1.0, 1e-3)}
    return {"q_m": float(np.median(q)), "C": 10.0}


@dataclass(frozen=True)
class _Model:
    params: tuple  # parameter names, all positive, in the order `func` takes them
    func: object  # q = func(P, *params)
    start: object  # (P, q, fixed) -> starting values from a linearised fit
    power_law: bool  # P^(1/n): zero pressure carries no information and is dropped


_MODELS = {
    "freundlich": _Model(("K", "n"), _freundlich, _start_freundlich, True),
    "sips": _Model(("g_inf", "K", "n"), _sips, _start_sips, True),
    "langmuir": _Model(("Q_max", "b"), _langmuir, _start_langmuir, False),
    "bet": _Model(("q_m", "C", "P0"), _bet, _start_bet, False),
}


@dataclass(frozen=True)
class IsothermFit:
    """A fitted isotherm model: q = model(P; params).

    Parameters read as attributes (`fit.K`, `fit.n`, `fit.g_inf`, ...) and their standard errors as
    `fit.K_se` (NaN for parameters held fixed). r2 = 1 - SS_res/SS_tot, rmse and aic = m ln(SS_res/m)
    + 2 k (k free parameters) are in linear adsorption units over the n_points used; AIC compares
    models only when fitted to the same points. pressure_range is (min, max) of the pressures used.
    """
    model: str
    params: dict
    se: dict
    r2: float
    rmse: float
    aic: float
    n_points: int
    pressure_range: tuple
    fixed: tuple = ()
    log_space: bool = False

    def __getattr__(self, name):
        params, se = self.__dict__.get("params", {}), self.__dict__.get("se", {})
        if name in params:
            return params[name]
        if name.endswith("_se") and name[:-3] in se:
            return se[name[:-3]]
        raise AttributeError(name)

    def predict(self, pressure):
        """Model adsorption at `pressure` (same units as the fitted data)."""
        return _MODELS[self.model].func(np.asarray(pressure, dtype=np.float64), **self.params)


def _isotherm_points(pressure, adsorption, drop_zero_pressure=False, drop_zero_adsorption=False,
                     why=""):
    """Validated float64 (P, q); ValueError naming the bad input, a warning for each dropped point."""
    P = np.asarray(pressure, dtype=np.float64)
    q = np.asarray(adsorption, dtype=np.float64)
    if P.ndim != 1 or q.ndim != 1:
        raise ValueError(f"pressure and adsorption must be 1-D, got shapes {P.shape} and {q.shape}")
    if P.size != q.size:
        raise ValueError(f"pressure has {P.size} points but adsorption has {q.size}")
    for name, a in (("pressure", P), ("adsorption", q)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has NaN/inf at index {np.flatnonzero(~np.isfinite(a)).tolist()}")
        if (a < 0).any():
            raise ValueError(f"{name} has negative values at index {np.flatnonzero(a < 0).tolist()}")
    if P.size and not q.any():
        raise ValueError("adsorption is zero at every point: nothing to fit")
    keep = np.ones(P.size, dtype=bool)
    for name, a, drop in (("pressure", P, drop_zero_pressure), ("adsorption", q, drop_zero_adsorption)):
        zero = drop & (a == 0) & keep
        if zero.any():
            warnings.warn(f"dropped {int(zero.sum())} zero-{name} point(s) at index "
                          f"{np.flatnonzero(zero).tolist()}: {why}", stacklevel=3)
            keep &= ~zero
    if keep.sum() < 3:
        raise ValueError(f"only {int(keep.sum())} usable points; at least 3 are needed")
    return P[keep], q[keep]


def _fit_model(model, P, q, fixed=None, log_space=False) -> IsothermFit:
    """The one fitting core: least squares over ln(free parameters), from linearised starting values."""
    from scipy.optimize import least_squares
    spec = _MODELS[model]
    fixed = {k: float(v) for k, v in (fixed or {}).items() if v is not None}
    for k, v in fixed.items():
        if k not in spec.params or not (math.isfinite(v) and v > 0):
            raise ValueError(f"fixed {model} parameter {k}={v} must be one of {spec.params} and > 0")
    free = [p for p in spec.params if p not in fixed]
    if not free or len(q) < len(free):
        raise ValueError(f"{len(q)} points cannot determine {model} parameters {free}")
    start = {**spec.start(P, q, fixed), **fixed}
    target = np.log(q) if log_space else q

    def predict(theta):
        return spec.func(P, **fixed, **dict(zip(free, np.exp(theta))))

    def residual(theta):
        m = predict(theta)
        return (np.log(m) if log_space else m) - target

    with np.errstate(all="ignore"):  # trial steps may overflow; LM rejects them
        res = least_squares(residual, np.log([start[p] for p in free]), method="lm",
                            xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=20000)
    if res.status <= 0 or not np.isfinite(res.x).all():
        raise RuntimeError(f"{model} fit did not converge: {res.message}")
    values = np.exp(res.x)
    m, k = len(q), len(free)
    s2 = 2.0 * res.cost / (m - k) if m > k else np.nan
    cov = s2 * np.linalg.pinv(res.jac.T @ res.jac)
    se = dict(zip(free, values * np.sqrt(np.diag(cov))))
    q_hat = predict(res.x)
    ss_res = float(np.sum((q - q_hat) ** 2))
    with np.errstate(divide="ignore", invalid="ignore"):  # exact data: ss_res = 0, aic = -inf
        r2 = 1.0 - ss_res / float(np.sum((q - q.mean()) ** 2))
        aic = m * math.log(ss_res / m) + 2 * k if ss_res > 0 else -math.inf
    params = {p: (fixed[p] if p in fixed else float(values[free.index(p)])) for p in spec.params}
    return IsothermFit(model, params, {p: float(se.get(p, np.nan)) for p in spec.params},
                       float(r2), math.sqrt(ss_res / m), aic, m, (float(P.min()), float(P.max())),
                       tuple(fixed), log_space)


def fit_freundlich(pressure, adsorption, log_space=False) -> IsothermFit:
    """Freundlich q = K P^(1/n) by nonlinear least squares, started from the log-log line.

    log_space=True fits ln q instead (right for relative, i.e. multiplicative, errors). Zero-pressure
    points (and zero adsorption in log space) are dropped with a warning. K is in adsorption units
    per (pressure unit)^(1/n).
    """
    P, q = _isotherm_points(pressure, adsorption, drop_zero_pressure=True, drop_zero_adsorption=log_space,
                            why="Freundlich is a power law in P")
    return _fit_model("freundlich", P, q, log_space=log_space)


def fit_sips(pressure, adsorption, fix_K=None, fix_n=None, fix_g_inf=None, log_space=False) -> IsothermFit:
    """Sips (Langmuir-Freundlich) q = g_inf (K P)^(1/n) / (1 + (K P)^(1/n)), any parameter fixable.

    The study's published "Freundlich" numbers are this model with K fixed at 2.5 (1/bar), g_inf and n
    fitted in linear space: `fit_sips(P_bar, q_mmol_g, fix_K=2.5)`. Zero-pressure points are dropped
    with a warning. K is in 1/(pressure unit), g_inf in adsorption units.
    """
    P, q = _isotherm_points(pressure, adsorption, drop_zero_pressure=True, drop_zero_adsorption=log_space,
                            why="Sips is a power law in P")
    return _fit_model("sips", P, q, {"g_inf": fix_g_inf, "K": fix_K, "n": fix_n}, log_space)


def fit_langmuir(pressure, adsorption, log_space=False) -> IsothermFit:
    """Langmuir q = Q_max b P / (1 + b P); b in 1/(pressure unit), Q_max in adsorption units."""
    P, q = _isotherm_points(pressure, adsorption, drop_zero_pressure=log_space,
                            drop_zero_adsorption=log_space, why="log-space fit")
    return _fit_model("langmuir", P, q, log_space=log_space)


def fit_bet(pressure, adsorption, p0=None, adsorbate=None, temperature_K=None,
            p_range=(0.05, 0.30)) -> IsothermFit:
    """Multilayer BET q = q_m C x / ((1 - x)(1 - x + C x)), x = P/P0, fitted over its validity range.

    P0 is `p0` (same units as pressure) or, if None, `saturation_pressure_bar(adsorbate,
    temperature_K)` with pressure in bar; it appears as a fixed parameter of the result. p_range is
    the relative-pressure window (default 0.05-0.30, the classical BET range) or "rouquerol": from the
    lowest point up to the maximum of q (1 - x) (Rouquerol criterion 1), with a warning when the
    monolayer point x_m = 1/(sqrt(C) + 1) falls outside the points used (criterion 3). q_m is the
    monolayer capacity in adsorption units; C > 0 is enforced.
    """
    if p0 is None:
        if adsorbate is None or temperature_K is None:
            raise ValueError("BET needs p0, or adsorbate and temperature_K to look it up")
        p0 = saturation_pressure_bar(adsorbate, temperature_K)
    if not (math.isfinite(p0) and p0 > 0):
        raise ValueError(f"p0={p0} must be a positive finite pressure")
    P, q = _isotherm_points(pressure, adsorption)
    x = P / p0
    if p_range == "rouquerol":
        inside = (x > 0) & (x < 1)
        order = np.argsort(x[inside])
        Pi, qi, xi = P[inside][order], q[inside][order], x[inside][order]
        last = int(np.argmax(qi * (1.0 - xi)))
        use = np.zeros(P.size, dtype=bool)
        use[np.flatnonzero(inside)[order[:last + 1]]] = True
    else:
        lo, hi = p_range
        if not 0 <= lo < hi < 1:
            raise ValueError(f"p_range={p_range} must be a relative-pressure window inside (0, 1) or 'rouquerol'")
        use = (x >= lo) & (x <= hi) & (x > 0)
    if use.sum() < 3 or not q[use].any():
        raise ValueError(f"only {int(use.sum())} nonzero points with P/P0 in BET range {p_range}; "
                         "at least 3 are needed")
    fit = _fit_model("bet", P[use], q[use], {"P0": p0})
    x_m = 1.0 / (math.sqrt(fit.C) + 1.0)
    if p_range == "rouquerol" and not x[use].min() <= x_m <= x[use].max():
        warnings.warn(f"BET monolayer point P/P0 = {x_m:.3g} lies outside the fitted range "
                      f"{x[use].min():.3g}-{x[use].max():.3g} (Rouquerol criterion 3)", stacklevel=2)
    return fit


FITTERS = {"freundlich": fit_freundlich, "sips": fit_sips, "langmuir": fit_langmuir, "bet": fit_bet}


def _cell_points(cell):
    """A table cell holding an isotherm's points: list/array, or JSON text as a CSV reads it back."""
    if isinstance(cell, str):
        cell = json.loads(cell)
    if cell is None:
        raise ValueError("no points (cell is empty)")
    return cell


def fit_isotherm_table(df, model="freundlich", progress=True, **fit_kwargs):
    """Fit `model` to every isotherm in a table; rows that cannot be fitted stay, with the reason.

    Accepted layouts (pressure in bar and adsorption in mmol/g if the columns say so, else the user's):
      * the ISODB tidy table of `isodb_table`: one row per isotherm, lists in pressure_bar and
        adsorption_mmol_g; a non-empty `note` (unit not convertible, mixture, null totals) is the
        reason a row is not fitted;
      * one row per isotherm with `pressure`/`adsorption` cells holding lists, or JSON text such as
        "[0.1, 0.5]" as a CSV reads back;
      * one row per point with scalar `pressure`/`adsorption` (or `pressure_bar`/`adsorption_mmol_g`)
        columns, grouped into isotherms by `filename` (or `isotherm`), else one isotherm.
    Returns a new table, one row per isotherm, with columns <param> and <param>_se for the model's
    parameters, r2, rmse, aic, n_points and fit_error ('' when fitted). fit_kwargs go to the fitter,
    e.g. `fit_isotherm_table(df, "sips", fix_K=2.5)` for the study's own table.
    """
    import pandas as pd
    from tqdm.auto import tqdm
    if model not in FITTERS:
        raise ValueError(f"model {model!r} is not one of {sorted(FITTERS)}")
    columns = next((c for c in (("pressure_bar", "adsorption_mmol_g"), ("pressure", "adsorption"))
                    if set(c) <= set(df.columns)), None)
    if columns is None:
        raise ValueError(f"table needs pressure_bar/adsorption_mmol_g or pressure/adsorption columns, "
                         f"has {list(df.columns)}")
    p_col, q_col = columns
    if pd.api.types.is_numeric_dtype(df[p_col]):  # one row per point: gather each isotherm's points
        key = next((c for c in ("filename", "isotherm") if c in df.columns), None)
        groups = df.groupby(key, sort=False) if key else [(None, df)]
        df = pd.DataFrame([{**g.iloc[0].to_dict(), p_col: g[p_col].tolist(), q_col: g[q_col].tolist()}
                           for _, g in groups])
    names = _MODELS[model].params
    rows = []
    for _, row in tqdm(df.iterrows(), total=len(df), disable=not progress, desc=f"fit {model}"):
        out = dict.fromkeys([c for p in names for c in (p, f"{p}_se")] + ["r2", "rmse", "aic"], np.nan)
        out.update(n_points=0, fit_error=str(row.get("note") or ""))
        if not out["fit_error"]:
            try:
                fit = FITTERS[model](_cell_points(row[p_col]), _cell_points(row[q_col]), **fit_kwargs)
                out.update({**fit.params, **{f"{p}_se": s for p, s in fit.se.items()}},
                           r2=fit.r2, rmse=fit.rmse, aic=fit.aic, n_points=fit.n_points)
            except (ValueError, TypeError, RuntimeError) as e:
                out["fit_error"] = f"{type(e).__name__}: {e}"
        rows.append(out)
    result = df.reset_index(drop=True).copy()
    for col, values in pd.DataFrame(rows).items():
        result[col] = values
    return result


def plot_isotherm_fits(pressure_bar, q_mmol_g, fits, path=None, title=None):
    """Measured points with each fitted curve beside a parameter table -> (figure, table DataFrame).

    fits: {label: IsothermFit}, e.g. the study's Sips (K fixed), free Sips and Freundlich.
    The figure is written atomically to `path` (format from its suffix) when given.
    """
    import pandas as pd
    import matplotlib.pyplot as plt
    P, q = np.asarray(pressure_bar, dtype=np.float64), np.asarray(q_mmol_g, dtype=np.float64)
    table = pd.DataFrame({label: {"model": f.model, **{p: f"{v:.6g}" + ("" if p in f.fixed else
                                  f" ± {f.se[p]:.2g}") for p, v in f.params.items()},
                                  "R²": f"{f.r2:.6f}", "AIC": f"{f.aic:.2f}"}
                          for label, f in fits.items()}).T.fillna("")
    fig, (ax, ax_table) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.2]})
    ax.plot(P, q, "ko", label="measured")
    P_fine = np.linspace(P.min(), P.max(), 200)
    for label, f in fits.items():
        ax.plot(P_fine, f.predict(P_fine), label=f"{label} (R² {f.r2:.4f})")
    ax.set(xlabel="pressure (bar)", ylabel="adsorption (mmol/g)", title=title or "")
    ax.legend(fontsize=8)
    ax_table.axis("off")
    cell_table = ax_table.table(cellText=table.values, rowLabels=table.index, colLabels=table.columns,
                                loc="center")
    cell_table.auto_set_font_size(False)
    cell_table.set_fontsize(7)
    fig.tight_layout()
    if path is not None:
        with atomic_write(path) as f:
            fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png", dpi=150)
    return fig, table


@dataclass(frozen=True)
class GridIsotherm:
    """ESTIMATE of an isotherm from an energy grid (ideal lattice gas), never a measurement."""
    probe: str
    temperature_K: float
    pressure_bar: np.ndarray
    q_mmol_g: np.ndarray
    q_cm3_stp_g: np.ndarray
    henry_mmol_g_bar: float  # low-pressure slope: Widom <exp(-E/kT)> / (R T rho) over accessible voxels
    saturation_mmol_g: float  # P -> infinity: accessible pore volume x liquid density / framework density
    accessible_fraction: float  # voxels with E < cap_K


def grid_isotherm(grid_K, temperature_K, pressures_bar, probe="H2", *, density_kg_m3, cap_K=5000.0,
                  liquid_density_kg_m3=None, molar_mass_g_mol=None) -> GridIsotherm:
    """ESTIMATE of an adsorption isotherm from a probe energy grid (kelvin): ideal lattice gas.

    Each voxel is an independent Langmuir site holding at most the probe's liquid density times its
    volume, with occupancy b P / (1 + b P), b = exp(-E/kT) / (R T c_liq) (c_liq: liquid molar density).
    At low pressure this is exactly the Widom Henry law q/P = <exp(-E/kT)> / (R T rho); at high pressure
    it saturates at accessible pore volume x liquid density. "Accessible" voxels are those below cap_K
    (the voxelizer's cap: voxels at the cap are inside atoms and hold nothing); their Henry weight
    exp(-cap_K/T) is dropped, < 1e-28 relative at 77 K with the 5000 K cap. For GAN output, whose
    repulsive voxels were clipped to 0 K, pass cap_K=0.0. Voxels are equal-volume, so the grid
    spacing cancels. No adsorbate-adsorbate attraction, no packing beyond the liquid: an estimate.
    """
    from scipy.special import expit
    E = np.asarray(grid_K, dtype=np.float64).ravel()
    P_bar = np.atleast_1d(np.asarray(pressures_bar, dtype=np.float64))
    key = _adsorbate_key(probe)
    if (liquid_density_kg_m3 is None or molar_mass_g_mol is None) and key not in PROBE_LIQUIDS:
        raise ValueError(f"no liquid density known for probe {probe!r}; pass liquid_density_kg_m3 "
                         f"and molar_mass_g_mol (known: {sorted(PROBE_LIQUIDS)})")
    molar_mass_g_mol = molar_mass_g_mol or PROBE_LIQUIDS[key][0]
    liquid_density_kg_m3 = liquid_density_kg_m3 or PROBE_LIQUIDS[key][1]
    if E.size == 0 or not (E > -np.inf).all():
        raise ValueError(f"grid_K must be a non-empty grid without NaN or -inf (size {E.size})")
    if not (density_kg_m3 > 0 and temperature_K > 0) or not np.isfinite(P_bar).all() or (P_bar < 0).any():
        raise ValueError(f"need density_kg_m3 > 0 (got {density_kg_m3}), temperature_K > 0 "
                         f"(got {temperature_K}) and finite pressures >= 0")
    c_liq_mol_m3 = liquid_density_kg_m3 / (molar_mass_g_mol * 1e-3)
    rtc_Pa = GAS_CONSTANT_J_MOL_K * temperature_K * c_liq_mol_m3
    E_acc = E[E < cap_K]
    q_sat_mol_kg = c_liq_mol_m3 / density_kg_m3 * E_acc.size / E.size
    # occupancy b P/(1 + b P) = expit(ln(P/RTc) - E/T): no overflow for deep sites or huge P
    with np.errstate(divide="ignore"):
        log_p = np.log(P_bar * 1e5 / rtc_Pa)
    theta = np.array([expit(lp - E_acc / temperature_K).sum() / E_acc.size if E_acc.size else 0.0
                      for lp in log_p])
    q = q_sat_mol_kg * theta  # mol/kg = mmol/g
    henry = np.exp(-E_acc / temperature_K).sum() / E.size / (GAS_CONSTANT_J_MOL_K * temperature_K
                                                             * density_kg_m3) * 1e5
    return GridIsotherm(key, float(temperature_K), P_bar, q, q * CM3_STP_PER_MMOL, float(henry),
                        float(q_sat_mol_kg), E_acc.size / E.size)


def grid_freundlich(grid_K, temperature_K=77.0, pressures_bar=None, probe="H2", *, density_kg_m3,
                    cap_K=5000.0) -> IsothermFit:
    """Freundlich (K in mmol/g/bar^(1/n), n) of a grid's ESTIMATED isotherm (`grid_isotherm`).

    Lets real and generated grids be compared in the study's own terms. Default pressures: 12 points
    from 0.01 to 1 bar, log-spaced, like the study's 77 K H2 measurements (0.017-1 bar).
    """
    pressures_bar = np.geomspace(0.01, 1.0, 12) if pressures_bar is None else pressures_bar
    iso = grid_isotherm(grid_K, temperature_K, pressures_bar, probe, density_kg_m3=density_kg_m3, cap_K=cap_K)
    return fit_freundlich(iso.pressure_bar, iso.q_mmol_g)



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


