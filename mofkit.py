"""mofkit: MOF crystal structures -> periodic Lennard-Jones energy grids -> a 3D GAN that makes new ones.

One flat module, in pipeline order, after a preamble of units, constants, gas data and kit-wide utilities
(atomic writes, checksums, CSV tables, progress bars):

  1. Downloads        verified HTTP / Google Drive files, NIST-ARPA-E ISODB and MOFX-DB clients
  2. Structures       CIF files and the embedded CoRE MOF 2019 dataset as ase.Atoms
  3. Voxelizer        UFF + probe Lennard-Jones 12-6 energies on 3D grids, Henry coefficient, heat of adsorption
  4. Isotherms        Freundlich / Sips / Langmuir / BET fits, isotherm tables, grid isotherm estimate
  5. Shards           sharded grid datasets, data_manifest.csv, streaming torch dataset
  6. Models           the study's 3D GAN generator and discriminator
  7. Training         GAN training (the kit's recipe or the study's) with checkpoints that resume exactly, AMP,
                      DDP; sampling trained generators
  8. Scoring          1-NN two-sample accuracy, memorisation, adsorption-property distances
  9. Pictures         CT-style slice montages, loss curves, property histograms, isotherm fits
 10. Inverse          energy / density grid -> atoms -> XYZ
 11. Command line     python mofkit.py ...

Units are in names: energies in kelvin (E/k_B, `_K`), lengths in angstrom (`_A`), pressures in bar.
"""
from __future__ import annotations

import os
import gc
import re
import sys
import csv
import math
import json
import time
import shutil
import struct
import warnings
import hashlib
import inspect
import itertools
import tempfile
import contextlib
import dataclasses
import urllib.parse
from dataclasses import dataclass, asdict, field
from pathlib import Path

import numpy as np
import torch
from tqdm.std import tqdm as _text_tqdm


# =============================================================================
# Units, constants, gas data and kit-wide utilities (used by every section below)
# =============================================================================

R_J_PER_MOL_K = 8.314462618
AMU_KG = 1.66053906660e-27
ATM_BAR = 1.01325
CM3_STP_PER_MMOL = 22.414       # ideal-gas molar volume at 273.15 K and 1 atm
STUDY_CM3_STP_PER_MMOL = 22.4   # the study's, for reading measured cm3(STP)/g exactly as it did

# Molar masses (g/mol) of common adsorbates, to turn mg/g and wt% into mmol/g; keyed by formula, with the
# names ISODB and MOFX-DB use.
GASES = {
    "H2": ("Hydrogen", 2.01588), "He": ("Helium", 4.002602), "CH4": ("Methane", 16.04246),
    "N2": ("Nitrogen", 28.0134), "CO": ("Carbon monoxide", 28.0101), "O2": ("Oxygen", 31.9988),
    "Ar": ("Argon", 39.948), "CO2": ("Carbon dioxide", 44.0095), "Kr": ("Krypton", 83.798),
    "Xe": ("Xenon", 131.293),
}
PRESSURE_TO_BAR = {"bar": 1.0, "pa": 1e-5, "kpa": 1e-2, "mpa": 10.0, "mbar": 1e-3, "atm": ATM_BAR,
                   "torr": ATM_BAR / 760, "mmhg": ATM_BAR / 760, "psi": 0.0689475729}
# Amount-based adsorption units -> mmol/g. Measured cm3(STP)/g are read with the study's 22.4 cm3(STP)/mmol (the
# 0.06% from the ideal gas's 22.414 is below digitisation error); grid isotherms report with the ideal gas's.
AMOUNT_TO_MMOL_G = {"mmol/g": 1.0, "mol/kg": 1.0, "mol/g": 1000.0, "mmol/kg": 1e-3,
                    "cm3(stp)/g": 1 / STUDY_CM3_STP_PER_MMOL}
# Mass-based units -> mg of adsorbate per g of adsorbent (then / molar mass). wt% is read as g per 100 g of
# adsorbent, as ISODB's other units are per gram of adsorbent; some H2-storage papers mean per 100 g of
# adsorbent plus H2, which differs by the wt% value itself in relative terms (1% at 1 wt%).
MASS_TO_MG_G = {"mg/g": 1.0, "g/g": 1000.0, "wt%": 10.0}


def _gas(name):
    """(formula, name, molar mass g/mol) for a formula or name in GASES (any case), else None."""
    for formula, (gas_name, molar_mass) in GASES.items():
        if name.casefold() in (formula.casefold(), gas_name.casefold()):
            return formula, gas_name, molar_mass
    return None


# Saturated-liquid density of each probe (kg/m^3) at its normal boiling point (CO2: at its triple point,
# 216.59 K; it has no liquid at 1 atm), from the reference equations of state as implemented in NIST
# REFPROP / CoolProp 8.0: H2 Leachman et al. 2009 (normal hydrogen), N2 Span et al. 2000, Ar Tegeler et
# al. 1999, CH4 Setzmann & Wagner 1991, Kr and Xe Lemmon & Span 2006, CO2 Span & Wagner 1996.
# Molar masses come from GASES.
LIQUID_DENSITY_KG_M3 = {"H2": 70.85, "N2": 806.08, "Ar": 1395.40, "CH4": 422.36, "Kr": 2416.6, "Xe": 2942.0,
                        "CO2": 1178.5}

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


def _formula(adsorbate):
    """'Nitrogen', 'n2', 'N2' -> 'N2' via GASES (ISODB spells adsorbates out in words)."""
    gas = _gas(str(adsorbate).strip())
    return gas[0] if gas else str(adsorbate)


# Critical constants and acentric factors of the bulk fluids (grid isotherms' equations of state): CoolProp
# 8.0's own (tested against it).
_CRITICAL = {  # formula -> (Tc K, Pc Pa, acentric factor)
    "H2": (33.145, 1.2964e6, -0.219), "He": (5.1953, 2.2832e5, -0.38354), "CH4": (190.564, 4.5992e6, 0.01142),
    "N2": (126.192, 3.3958e6, 0.0372), "Ar": (150.687, 4.8630e6, -0.00219), "Kr": (209.48, 5.5254e6, -0.00089),
    "Xe": (289.733, 5.8419e6, 0.00363), "CO2": (304.128, 7.3773e6, 0.22394), "CO": (132.86, 3.4982e6, 0.0497),
    "O2": (154.599, 5.0464e6, 0.0222)}
_COOLPROP_NAMES = {"H2": "Hydrogen", "He": "Helium", "CH4": "Methane", "N2": "Nitrogen", "Ar": "Argon",
                   "Kr": "Krypton", "Xe": "Xenon", "CO2": "CarbonDioxide", "CO": "CarbonMonoxide", "O2": "Oxygen"}


# --- files, tables and progress bars ------------------------------------------------------------------------

def _pid_alive(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # another user's live process
    except (OverflowError, ValueError):
        return False  # a number no process can have
    return True


def remove_orphans(path, suffix=".tmp", min_age_s=60.0) -> list:
    """Delete the leftovers of killed writers of `path`: `.NAME.PID.*.tmp` files (atomic_write) or
    `.NAME.PID.*.part` folders (download) whose process is gone and which nobody touched for min_age_s (a writer
    on another machine sharing the folder keeps its file fresh); leftovers without a PID (older versions) after
    an hour. Returns what was removed. Called by atomic_write and download for their own target."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:(\d+)\.)?[^/]*{re.escape(suffix)}$")
    removed, now = [], time.time()
    with contextlib.suppress(FileNotFoundError):
        for p in path.parent.iterdir():
            match = pattern.match(p.name)
            if match is None:
                continue
            with contextlib.suppress(FileNotFoundError):
                age_s = now - p.stat().st_mtime
                pid = match.group(1)
                if (pid is None and age_s > 3600) or (pid is not None and int(pid) != os.getpid()
                                                      and age_s > min_age_s and not _pid_alive(int(pid))):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
                    removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temp file beside `path` and rename it into place on success.

    Readers (and a Colab session that dies mid-write) never see half a file: either the old
    file or the complete new one is there. On any error the temp file is removed; the temp files of writers that
    were killed (a kill skips that cleanup) are removed by the next write (see `remove_orphans`).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; give a file path to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path, ".tmp")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes owner-only files; published files should be readable
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


def _finite_number(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _json_value(v):
    """A table cell as JSON: numpy scalars as Python numbers, NaN/inf as null."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)


def _write_csv(path, columns, rows):
    """Write rows (dicts) as CSV atomically."""
    import io
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path) as f:
        f.write(text.getvalue().encode())


def _merge_csv(path, columns, rows, keys):
    """Rewrite `path` with `rows` replacing its old rows whose first column is in `keys`; sorted by that column."""
    old = []
    if Path(path).exists():
        with open(path, newline="") as f:
            old = [r for r in csv.DictReader(f) if r[columns[0]] not in keys]
    _write_csv(path, columns, sorted(old + rows, key=lambda r: r[columns[0]]))


class _TextBar(_text_tqdm):
    """Text progress bars that stay readable in a saved notebook: inner bars (leave=False) are not drawn, since
    nesting needs cursor-moving escape codes that a saved stream keeps as garbage, and redraws come at most
    every few seconds."""

    def __init__(self, *args, **kwargs):
        if kwargs.get("leave") is False:
            kwargs["disable"] = True
        kwargs.setdefault("mininterval", 5.0)
        super().__init__(*args, **kwargs)


def _progress_class():
    """tqdm.auto (widgets in a notebook front end, text in a terminal), except in a kernel nobody watches
    (run_notebook sets MOFKIT_PROGRESS=text) or one without ipywidgets (tqdm.auto would warn "IProgress not
    found" on every bar): there _TextBar."""
    import importlib.util
    no_widgets = "ipykernel" in sys.modules and importlib.util.find_spec("ipywidgets") is None
    if os.environ.get("MOFKIT_PROGRESS") == "text" or no_widgets:
        return _TextBar
    from tqdm.auto import tqdm as auto
    return auto


tqdm = _progress_class()


# =============================================================================
# 1. Downloads: verified files over HTTP / Google Drive, NIST ISODB, MOFX-DB
# =============================================================================

class DownloadError(RuntimeError):
    """A file or API document could not be fetched or failed verification (the message says what to do)."""


class _Transient(Exception):
    """A failure worth retrying: HTTP 5xx / 429, or a body cut short."""


def _with_retries(attempt, what, hint, retries, backoff_s):
    """Call `attempt()` until it succeeds.

    Connection errors, timeouts, 5xx answers and cut-off bodies are retried after backoff_s, 2*backoff_s,
    4*backoff_s... seconds; anything else (404, a checksum mismatch) is final and raised at once.
    """
    import requests
    transient = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, _Transient)
    bad_url = (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema)
    for i in range(retries + 1):
        try:
            return attempt()
        except requests.TooManyRedirects as e:
            raise DownloadError(f"{what}: the server redirects in a loop ({e}); check the URL. {hint}") from None
        except bad_url as e:
            raise DownloadError(f"{what}: not a usable URL ({type(e).__name__}: {e})") from None
        except transient as e:
            if i == retries:
                raise DownloadError(f"{what}: failed after {retries + 1} attempts; last error: {e}. {hint}") from e
            time.sleep(backoff_s * 2 ** i)


def _drive_file_id(url):
    """The file id of a Google Drive link (.../file/d/ID/view, open?id=ID, uc?id=ID), or None for other URLs."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname not in ("drive.google.com", "docs.google.com"):
        return None
    match = re.match(r"/file/(?:u/\d+/)?d/([-\w]+)", parts.path)
    ids = urllib.parse.parse_qs(parts.query).get("id")
    if match is None and not ids:
        raise DownloadError(f"{url}: a Google Drive link without a file id (a folder?); share the file itself")
    return match.group(1) if match else ids[0]


def download(url, dest, sha256=None, *, timeout_s=30.0, retries=4, backoff_s=1.0, progress=True) -> Path:
    """Fetch `url` into `dest` and return `dest`; nothing but a complete, verified file is ever left there.

    Google Drive links go through gdown; other http(s) URLs are streamed with requests, retried with backoff on
    connection errors, timeouts and 5xx, and resumed with HTTP Range (206) after a dropped connection. The body
    must match its Content-Length and, when given, `sha256`. A `dest` that already has that sha256 is kept as is.
    Partial bytes live in a temp folder beside `dest` that is removed on success and failure alike. `timeout_s`
    is how long the server may stay silent (connecting, or between bytes) before a try counts as failed.
    """
    dest = Path(dest)
    parts = urllib.parse.urlsplit(str(url))
    if parts.scheme not in ("http", "https"):
        raise DownloadError(f"{url}: only http(s) URLs (Google Drive links included) can be downloaded")
    if not parts.hostname:
        raise DownloadError(f"{url}: no host name in the URL")
    if dest.is_dir():
        raise DownloadError(f"{dest}: is a folder; give the file path to download {url} to")
    if sha256 is not None and dest.is_file() and sha256_file(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(dest, ".part")  # what killed downloads left behind
    # Same folder as dest, so the final rename is atomic; gdown also puts its own partial files in here.
    work = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.{os.getpid()}.", suffix=".part"))
    try:
        tmp = work / dest.name
        retry = dict(what=f"downloading {url} to {dest}", retries=retries, backoff_s=backoff_s,
                     hint=f"Nothing was kept in {dest.parent}; check the connection or the server and rerun.")
        file_id = _drive_file_id(url)
        if file_id is None:
            _http_to_file(url, tmp, dest, timeout_s, progress, retry)
        else:
            _drive_to_file(url, file_id, tmp, dest, timeout_s, progress, retry)
        if sha256 is not None and (actual := sha256_file(tmp)) != sha256:
            raise DownloadError(
                f"{url}: the downloaded file for {dest} has sha256 {actual}, expected {sha256}; it was discarded. "
                "The published file is corrupt or has changed: rerun to fetch it again, rebuild it locally, or, "
                "if you trust the new file, update the expected sha256 (e.g. in data_manifest.csv).")
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def _http_to_file(url, path, dest, timeout_s, progress, retry):
    """Stream an http(s) URL into `path`, resuming from the bytes already there when the server allows (206)."""
    import requests
    path.touch()
    bar = tqdm(desc=dest.name, unit="B", unit_scale=True, disable=not progress)

    def attempt():
        have = path.stat().st_size
        # identity: Content-Length and Range offsets must count the bytes on disk, not a gzip stream.
        headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
        with requests.get(url, headers=headers, stream=True, timeout=timeout_s) as r:
            if r.status_code >= 500 or r.status_code == 429:
                raise _Transient(f"HTTP {r.status_code} {r.reason}")
            if r.status_code not in (200, 206):
                raise DownloadError(f"{url}: HTTP {r.status_code} {r.reason} (for {dest}); check the URL.")
            if r.status_code == 206 and not r.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
                raise DownloadError(f"{url}: asked for bytes {have}- but got {r.headers.get('Content-Range')!r}.")
            # A server may compress anyway: Content-Length then counts the encoded bytes on the wire, which
            # Range offsets cannot address, so such a body is checked by its wire size and never resumed.
            encoded = r.headers.get("Content-Encoding", "identity").strip().lower() not in ("identity", "")
            if encoded and r.status_code == 206:
                path.write_bytes(b"")
                raise _Transient("a compressed partial body cannot be resumed; starting over")
            start = have if r.status_code == 206 else 0  # a 200 is the whole body: start over
            length = r.headers.get("Content-Length")
            total = start + int(length) if length is not None else None
            bar.reset(total=total)
            bar.update(start)
            with open(path, "r+b") as f:
                f.seek(start)
                f.truncate()
                try:
                    for chunk in r.iter_content(1 << 16):  # a cut connection loses at most this chunk
                        f.write(chunk)
                        bar.update(len(chunk))
                except requests.exceptions.ChunkedEncodingError:
                    if total is None:  # no Content-Length to say how much is missing: report it as it is
                        raise
                size = r.raw.tell() if encoded else f.tell()
        if encoded and total is not None and size != total:
            path.write_bytes(b"")
        if total is not None and size != total:
            raise _Transient(f"truncated body: {size} of the {total} bytes announced by Content-Length arrived")

    with bar:
        _with_retries(attempt, **retry)


def _drive_to_file(url, file_id, path, dest, timeout_s, progress, retry):
    """Fetch a Google Drive file with gdown, which knows Drive's confirmation pages; Drive's refusals (quota,
    permissions) become a DownloadError that says what to do, and are not retried."""
    import gdown
    from gdown.exceptions import FileURLRetrievalError
    # Only gdown >= 6 takes a timeout; older versions wait on a stalled connection as long as the OS lets them.
    timeout = {"timeout": timeout_s} if "timeout" in inspect.signature(gdown.download).parameters else {}
    refused = (f"Google Drive would not serve {url} (for {dest}). This is usually Drive's download quota "
               "('too many users have viewed or downloaded this file') or a file not shared as 'anyone with the "
               "link'. Fall back to building the file locally, retry in a few hours, or download it in a browser "
               f"and put it at {dest}.")

    def attempt():
        try:
            gdown.download(id=file_id, output=str(path), quiet=not progress, use_cookies=False, **timeout)
        except FileURLRetrievalError as e:
            raise DownloadError(f"{refused} gdown said: {' '.join(str(e).split())}") from e
        if not path.is_file():  # gdown 5 prints some failures (e.g. a proxy error) and returns None
            raise DownloadError(f"gdown returned without a file (its message is above). {refused}")

    _with_retries(attempt, **retry)


# --- JSON APIs: NIST/ARPA-E ISODB and MOFX-DB ---------------------------------------------------------------

ISODB_URL = "https://adsorption.nist.gov"        # /isodb/api/... and /matdb/api/...
MOFXDB_URL = "https://mof.tech.northwestern.edu"  # /mofs.json?...
CACHE_DIR = Path("~/.cache/mofkit").expanduser()

def fetch_json(url, params=None, *, cache_dir=None, timeout_s=30.0, retries=4, backoff_s=1.0, expect=None):
    """GET a JSON document with timeouts and retries; with `cache_dir`, a copy on disk answers later calls.

    The cache file name is a hash of the full URL (query included) plus its last path part; only documents
    that parsed as JSON and passed `expect` are cached, written atomically. Delete the folder to refresh.
    `expect(data)` returns None for the document wanted, else why not (e.g. a 200 answer holding an error
    document): a DownloadError naming the URL, and nothing cached (a cached copy that fails is deleted).
    """
    import requests
    full_url = requests.Request("GET", url, params=params).prepare().url
    name = urllib.parse.urlsplit(full_url).path.rsplit("/", 1)[-1]
    cache = None if cache_dir is None else (
        Path(cache_dir).expanduser() / f"{hashlib.sha256(full_url.encode()).hexdigest()[:16]}-{name}")
    if cache is not None and cache.is_file():
        data = _parse_json(cache.read_bytes(), cache)
        if expect is None or expect(data) is None:
            return data
        cache.unlink()  # an error document cached by an older version: fetch it again

    def attempt():
        r = requests.get(full_url, timeout=timeout_s)
        if r.status_code >= 500 or r.status_code == 429:
            raise _Transient(f"HTTP {r.status_code} {r.reason}")
        if r.status_code != 200:
            raise DownloadError(f"{full_url}: HTTP {r.status_code} {r.reason}; check the name or query.")
        return r.content

    body = _with_retries(attempt, f"fetching {full_url}", "The service may be down: retry later.", retries, backoff_s)
    data = _parse_json(body, full_url)
    if expect is not None and (problem := expect(data)) is not None:
        raise DownloadError(f"{full_url}: not the document expected ({problem}); it starts with {body[:120]!r}. "
                            "Check the name or query; nothing was cached")
    if cache is not None:
        with atomic_write(cache) as f:
            f.write(body)
    return data


def _parse_json(body, source):
    try:
        return json.loads(body)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise DownloadError(f"{source}: malformed JSON ({e}); it starts with {body[:80]!r}. The service may "
                            "have answered with an error page: retry later, or delete a cached copy.") from e


def _parse_record(parse, record, kind):
    """parse(record), or a ValueError that shows the record when it is not in the expected schema."""
    try:
        return parse(record)
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{kind} record not in the expected schema ({type(e).__name__}: {e}): "
                         f"{str(record)[:200]}") from None


def _parse_records(parse, records, kind, failures):
    """[parse(r) for r in records], skipping the records not in the expected schema: (label, reason) goes to
    `failures` if a list is given, and a warning counts them, so one malformed record never fails a table."""
    rows, bad = [], []
    for i, record in enumerate(records):
        try:
            rows.append(_parse_record(parse, record, kind))
        except ValueError as e:
            label = (record.get("filename") or record.get("name")) if isinstance(record, dict) else None
            bad.append((str(label or f"record {i}"), str(e)))
    if bad:
        warnings.warn(f"skipped {len(bad)} malformed {kind} record(s), first: {bad[0][1]}", stacklevel=3)
        if failures is not None:
            failures.extend(bad)
    return rows


def _is_isotherm(doc):
    ok = isinstance(doc, dict) and isinstance(doc.get("isotherm_data"), list)
    return None if ok else "no isotherm_data list: an error document?"


def _is_list(doc):
    return None if isinstance(doc, list) else f"a JSON {type(doc).__name__}, not a list"


def _is_mofxdb_page(doc):
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        return "no 'results' list: not a MOF-X-DB page"
    pages = doc.get("pages")
    return None if isinstance(pages, int) and not isinstance(pages, bool) and pages >= 0 else f"pages={pages!r}"


def _isotherm_fields(record):
    """Tidy fields of one isotherm in the ISODB schema (MOFX-DB shares it), in bar and mmol/g where possible.

    Conversions that the units do not allow are left as None and explained in `note` ('' when all converted).
    """
    adsorbates = [a["name"] for a in record["adsorbates"]]
    p_units, q_units = record["pressureUnits"], record["adsorptionUnits"]
    pressure = [point["pressure"] for point in record["isotherm_data"]]
    adsorption = [point["total_adsorption"] for point in record["isotherm_data"]]
    notes = []
    p_factor = PRESSURE_TO_BAR.get(p_units.casefold())
    if p_factor is None:
        notes.append(f"pressure unit {p_units!r} not convertible to bar")
    q_factor, unit = None, q_units.casefold()
    if len(adsorbates) != 1:
        notes.append(f"mixture of {len(adsorbates)} adsorbates")
    elif unit in AMOUNT_TO_MMOL_G:
        q_factor = AMOUNT_TO_MMOL_G[unit]
    elif unit in MASS_TO_MG_G:
        gas = _gas(adsorbates[0])
        if gas is None:
            notes.append(f"unit {q_units!r} needs the molar mass of {adsorbates[0]!r}, which is not in mofkit.GASES")
        else:
            q_factor = MASS_TO_MG_G[unit] / gas[2]
    else:
        notes.append(f"unit {q_units!r} not convertible to mmol/g")
    if any(q is None for q in adsorption):
        notes.append("null total_adsorption")
        q_factor = None
    return {
        "adsorbate": " + ".join(adsorbates),
        "temperature_K": float(record["temperature"]),
        "pressure_units": p_units,
        "adsorption_units": q_units,
        "pressure": pressure,
        "adsorption": adsorption,
        "pressure_bar": None if p_factor is None else [p * p_factor for p in pressure],
        "adsorption_mmol_g": None if q_factor is None else [q * q_factor for q in adsorption],
        "note": "; ".join(notes),
    }


def isodb_table(records, failures=None):
    """ISODB isotherm records (parsed JSON) -> a tidy pandas table, one row per isotherm, as in the study.

    Columns: filename, doi, adsorbent, adsorbate, temperature_K, pressure_units, adsorption_units, pressure and
    adsorption (raw lists; adsorption is total_adsorption), pressure_bar and adsorption_mmol_g (lists, or None
    where the units do not allow it), note ('' when converted, else why not). Records not in the ISODB schema are
    skipped with a warning; (filename, reason) goes to `failures` if a list is given.
    """
    import pandas as pd

    def parse(r):
        return {"filename": r["filename"], "doi": r["DOI"], "adsorbent": r["adsorbent"]["name"], **_isotherm_fields(r)}

    rows = _parse_records(parse, records, "ISODB isotherm", failures)
    return pd.DataFrame(rows, columns=["filename", "doi", "adsorbent", "adsorbate", "temperature_K",
                                       "pressure_units", "adsorption_units", "pressure", "adsorption",
                                       "pressure_bar", "adsorption_mmol_g", "note"])


def _named(entry, query):
    """Whether an ISODB material/gas entry has `query` as its name or one of its synonyms (any case)."""
    names = [entry.get("name") or ""] + list(entry.get("synonyms") or [])
    return query.casefold() in {n.casefold() for n in names}


def fetch_isodb(adsorbent=None, adsorbate=None, temperature_K=None, *, doi=None, filenames=None,
                base_url=ISODB_URL, cache_dir=CACHE_DIR / "isodb", progress=True, failures=None, **http):
    """List and fetch NIST/ARPA-E ISODB isotherms; returns `isodb_table` of them.

    Either give `filenames` (e.g. "10.1002adem.200500223.isotherm1"), or filter the isotherm index by
    `adsorbent` (material name or synonym, e.g. "CuBTC" or "HKUST-1"), `adsorbate` (gas name, synonym or a
    formula from GASES), `temperature_K` (within 0.5 K) and `doi`. `http` takes fetch_json's timeout_s, retries
    and backoff_s. Everything fetched is cached under `cache_dir` (None: no cache), except answers that are not
    the document asked for (an error document served with HTTP 200): those raise DownloadError. Malformed
    isotherm records are skipped and recorded as in `isodb_table` (`failures`).
    """

    def get(path, expect=_is_list):
        return fetch_json(f"{base_url}{path}", cache_dir=cache_dir, expect=expect, **http)

    if filenames is None:
        if adsorbent is None and adsorbate is None and temperature_K is None and doi is None:
            raise ValueError("fetch_isodb: give filenames or at least one filter (adsorbent, adsorbate, "
                             "temperature_K, doi); fetching all ~40,000 isotherms is almost never intended")
        index = get("/isodb/api/isotherms.json")
        if adsorbent is not None:
            hashkeys = {m["hashkey"] for m in get("/matdb/api/materials.json") if _named(m, adsorbent)}
            if not hashkeys:
                raise ValueError(f"fetch_isodb: adsorbent {adsorbent!r} is not a material name or synonym in ISODB")
            index = [e for e in index if e["adsorbent"]["hashkey"] in hashkeys]
        if adsorbate is not None:
            gas = _gas(adsorbate)  # a formula such as "H2" matches the gas's name ("Hydrogen") too
            queries = {adsorbate, gas[1]} if gas else {adsorbate}
            inchikeys = {g["InChIKey"] for g in get("/isodb/api/gases.json") if any(_named(g, q) for q in queries)}
            if not inchikeys:
                raise ValueError(f"fetch_isodb: adsorbate {adsorbate!r} is not a gas name or synonym in ISODB")
            index = [e for e in index if any(a["InChIKey"] in inchikeys for a in e["adsorbates"])]
        if temperature_K is not None:
            index = [e for e in index if abs(float(e["temperature"]) - temperature_K) <= 0.5]
        if doi is not None:
            index = [e for e in index if e["DOI"].casefold() == doi.casefold()]
        filenames = [e["filename"] for e in index]
    records = [get(f"/isodb/api/isotherm/{name}.json", _is_isotherm)
               for name in tqdm(filenames, desc="ISODB isotherms", disable=not progress)]
    return isodb_table(records, failures)


def isodb_doi_stub(doi):
    """The DOI stub ISODB uses in file names and URLs (10.1007/s10450-011-9337-3 -> 10.1007s1045001193373)."""
    stub = doi.replace("/", "-").replace("(", "").replace(")", "").replace(":", "").replace(" ", "")
    return stub.replace("+", "plus").replace("-", "")


def isodb_biblio(doi, *, base_url=ISODB_URL, cache_dir=CACHE_DIR / "isodb", **http):
    """The ISODB bibliography record of an article (title, authors, its isotherms' filenames...)."""
    return fetch_json(f"{base_url}/isodb/api/biblio/{isodb_doi_stub(doi)}.json", cache_dir=cache_dir,
                      expect=lambda d: None if isinstance(d, dict) and "DOI" in d else "no DOI: an error document?",
                      **http)


def mofxdb_table(results, failures=None):
    """MOFX-DB results (entries of mofs.json pages) -> a tidy pandas table, one row per (MOF, isotherm).

    Columns: name, mofkey, database, then the isotherm columns of `isodb_table` (adsorbate ... note), then cif
    (the entry's CIF text). A MOF without isotherms keeps one row, with note 'no isotherms', so its CIF is
    not lost. Entries not in the MOFX-DB schema are skipped with a warning ((name, reason) to `failures`).
    """
    import pandas as pd

    def parse(mof):
        head = {"name": mof["name"], "mofkey": mof["mofkey"], "database": mof["database"]}
        isotherms = [_isotherm_fields(iso) for iso in mof["isotherms"]] or [{"note": "no isotherms"}]
        return [{**head, **iso, "cif": mof["cif"]} for iso in isotherms]

    rows = [row for mof_rows in _parse_records(parse, results, "MOFX-DB MOF", failures) for row in mof_rows]
    return pd.DataFrame(rows, columns=["name", "mofkey", "database", "adsorbate", "temperature_K",
                                       "pressure_units", "adsorption_units", "pressure", "adsorption",
                                       "pressure_bar", "adsorption_mmol_g", "note", "cif"])


def fetch_mofxdb(name=None, mofkey=None, database=None, *, base_url=MOFXDB_URL, cache_dir=CACHE_DIR / "mofxdb",
                 max_pages=None, progress=True, failures=None, **http):
    """Query MOFX-DB (mofs.json: by MOF name, MOFkey and/or database such as "CoREMOF 2019"), following its
    pages up to `max_pages` (a whole number >= 1; None: 20 with a warning when more exist, and a filter is
    required); returns `mofxdb_table` of the MOFs with their CIFs and computed isotherms.

    `http` takes fetch_json's timeout_s, retries and backoff_s; pages are cached under `cache_dir`. A page that
    is not a MOFX-DB page raises DownloadError; malformed entries are skipped and recorded (`failures`).
    """
    params = {k: v for k, v in {"name": name, "mofkey": mofkey, "database": database}.items() if v is not None}
    if not params and max_pages is None:
        raise ValueError("fetch_mofxdb: give name, mofkey or database, or max_pages; the whole database is "
                         "over 100,000 MOFs with CIFs")
    by_default = max_pages is None
    max_pages = 20 if by_default else max_pages  # a server that keeps raising 'pages' is not followed far
    if isinstance(max_pages, bool) or not isinstance(max_pages, (int, np.integer)) or max_pages < 1:
        raise ValueError(f"fetch_mofxdb: max_pages={max_pages!r} must be a whole number >= 1")
    results, page, pages = [], 1, 1
    with tqdm(desc="MOFX-DB pages", disable=not progress) as bar:
        while page <= min(pages, max_pages):
            doc = fetch_json(f"{base_url}/mofs.json", {**params, "page": page}, cache_dir=cache_dir,
                             expect=_is_mofxdb_page, **http)
            results += doc["results"]
            pages = doc["pages"]
            bar.total = min(pages, max_pages)
            bar.update(1)
            page += 1
    if pages > max_pages and by_default:
        warnings.warn(f"fetch_mofxdb: fetched {max_pages} of {pages} pages ({len(results)} MOFs); pass a larger "
                      f"max_pages for more", stacklevel=2)
    return mofxdb_table(results, failures)


def mofxdb_structures(table, failures=None):
    """{name: ase.Atoms} from the CIFs of a `mofxdb_table` (one per MOF), read with `read_structure`.

    A CIF that does not parse is skipped and `(name, reason)` appended to `failures` if a list is given.
    """
    structures = {}
    for name, cif in table.drop_duplicates("name")[["name", "cif"]].itertuples(index=False):
        atoms = _read_or_record(lambda: read_structure(cif if isinstance(cif, (str, bytes)) else "", name=name),
                                name, failures)
        if atoms is not None:
            structures[name] = atoms
    return structures




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


def _cell_problem(cellpar) -> str | None:
    """Why six cell parameters (a, b, c in A; alpha, beta, gamma in degrees) make no 3D cell, or None.

    Checked before ase builds the cell: ase takes |a| of a negative length and 360 - alpha of an angle above
    180, and an all-NaN or flat cell sends the overlap check into unbounded work.
    """
    tags = ("a", "b", "c", "alpha", "beta", "gamma")
    values = []
    for tag, v in zip(tags, cellpar):
        try:
            values.append(float(v))
        except (TypeError, ValueError):
            return f"cell {tag} is {v!r}, not a number"
        if not math.isfinite(values[-1]):
            return f"cell {tag} is {v!r}, not a finite number"
    lengths, angles = values[:3], values[3:]
    for tag, v in zip(tags, lengths):
        if v <= 0:
            return f"cell length {tag} = {v:g} A must be positive" + (" (zero volume)" if v == 0 else "")
    for tag, v in zip(tags[3:], angles):
        if not 0 < v < 180:
            return f"cell angle {tag} = {v:g} deg must lie strictly between 0 and 180"
    al, be, ga = angles
    # Three lattice vectors span a volume only if each angle is below the sum of the other two and all three
    # sum below 360 (the spherical triangle inequalities); on the boundary the cell is flat.
    if not (al < be + ga and be < al + ga and ga < al + be and al + be + ga < 360):
        return (f"cell angles {al:g}/{be:g}/{ga:g} deg cannot form a 3D cell (each must be below the sum of the "
                f"other two, and all three below 360)")
    return None


def check_structure(atoms, name, min_distance_A=0.5):
    """Raise StructureError unless `atoms` is a 3D-periodic cell with finite positions, known elements and no
    overlaps (closer than min_distance_A, periodic images included).

    The work is bounded whatever the cell: a cell too small to hold its atoms min_distance_A apart is refused
    from its volume, and the neighbour search runs on the Minkowski-reduced cell (the same lattice, with the
    shortest basis), so a nearly flat cell never multiplies the periodic images to search.
    """
    if len(atoms) == 0:
        raise StructureError(f"{name}: no atoms")
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    if not np.isfinite(cell).all():
        raise StructureError(f"{name}: cell is not finite ({cell.tolist()})")
    bad = np.flatnonzero(~np.isfinite(atoms.positions).all(1))
    if len(bad):
        raise StructureError(f"{name}: atom(s) {bad[:5].tolist()} have non-finite coordinates")
    volume = abs(float(np.linalg.det(cell)))
    if not atoms.pbc.all() or volume < 1e-6:
        raise StructureError(f"{name}: cell has zero volume or is not periodic in 3D "
                             f"(cell={atoms.cell.cellpar().round(3).tolist()}, volume {volume:.3g} A^3)")
    unknown = sorted(set(atoms.get_chemical_symbols()) - set(UFF))
    if unknown:
        raise StructureError(f"{name}: no force-field parameters for element(s) {', '.join(unknown)}")
    if min_distance_A <= 0:
        return
    # Balls of diameter min_distance_A fill at most pi/sqrt(18) = 0.7405 of space (Kepler): more atoms than that
    # in the cell means some pair is closer, whatever the positions.
    ball_A3 = math.pi / 6 * min_distance_A ** 3
    if len(atoms) * ball_A3 > 0.7405 * volume:
        raise StructureError(f"{name}: {len(atoms)} atoms cannot fit in a cell of {volume:.3g} A^3 at least "
                             f"{min_distance_A} A apart (cell {atoms.cell.cellpar().round(3).tolist()}: nearly flat?)")
    from ase.geometry import minkowski_reduce
    from ase.neighborlist import neighbor_list
    reduced = minkowski_reduce(cell)[0]
    shortest = float(np.linalg.norm(reduced, axis=1).min())
    if shortest < min_distance_A:
        raise StructureError(f"{name}: every atom overlaps its own periodic image (shortest lattice vector "
                             f"{shortest:.3g} A < {min_distance_A} A)")
    probe = atoms.copy()
    probe.set_cell(reduced, scale_atoms=False)
    i, j, d = neighbor_list("ijd", probe, min_distance_A)
    if len(d):
        k = int(np.argmin(d))
        raise StructureError(f"{name}: overlapping atoms {atoms[i[k]].symbol}{i[k]} and {atoms[j[k]].symbol}{j[k]} "
                             f"only {d[k]:.3f} A apart (< {min_distance_A} A)")


def _formula_counts(formula) -> dict:
    """'C24 H12 Cu3 O15' -> {'C': 24.0, ...} (a CIF's _chemical_formula_sum)."""
    counts = {}
    for symbol, n in re.findall(r"([A-Z][a-z]?)\s*(\d*\.?\d*)", str(formula)):
        counts[symbol] = counts.get(symbol, 0.0) + (float(n) if n else 1.0)
    return counts


def _declared_content_problem(block, atoms) -> str | None:
    """Why the atoms read disagree with what the CIF itself declares about its content, or None.

    Checked where declared: _chemical_formula_sum (times _cell_formula_units_Z when given, else up to a common
    factor) and the _atom_type_number_in_cell loop. A CIF that declares neither (all of CoRE MOF 2019) cannot
    show a file cut at a line end inside its atom loop, or a deleted atom row: CIF has no end marker or count.
    """
    have = {}
    for s in atoms.get_chemical_symbols():
        have[s] = have.get(s, 0) + 1
    declared = None
    types, in_cell = block.get("_atom_type_symbol"), block.get("_atom_type_number_in_cell")
    if isinstance(types, list) and isinstance(in_cell, list) and len(types) == len(in_cell):
        try:
            declared = {re.match(r"[A-Z][a-z]?", str(t)).group(0): float(n) for t, n in zip(types, in_cell)}
            where = "_atom_type_number_in_cell"
        except (AttributeError, TypeError, ValueError):
            declared = None  # '?' entries: nothing declared
    formula = block.get("_chemical_formula_sum")
    if declared is None and isinstance(formula, str) and _formula_counts(formula):
        declared, where = _formula_counts(formula), f"_chemical_formula_sum '{formula}'"
        z = block.get("_cell_formula_units_z")
        if isinstance(z, (int, float)) and z > 0:
            declared, where = {k: v * z for k, v in declared.items()}, f"{where} x Z={z:g}"
        elif set(declared) == set(have):  # no Z: the cell holds a whole multiple of the formula
            factor = have[next(iter(have))] / declared[next(iter(have))]
            declared, where = {k: v * factor for k, v in declared.items()}, f"{where} (x{factor:g})"
    if declared is None:
        return None
    if set(declared) != set(have) or any(abs(have[k] - v) > 0.01 * v + 1e-9 for k, v in declared.items()):
        diff = {k: (have.get(k, 0), round(declared.get(k, 0), 2)) for k in sorted(set(declared) | set(have))
                if abs(have.get(k, 0) - declared.get(k, 0)) > 0.01 * declared.get(k, 0) + 1e-9}
        return (f"the atoms read disagree with the declared {where}: (read, declared) per element {diff} "
                f"(file truncated, rows missing, or partial occupancy?)")
    return None


def _is_identity_only(sitesym) -> bool:
    return sitesym is None or all(re.sub(r"[\s']", "", str(op)).lower() in ("x,y,z", "+x,+y,+z") for op in
                                  ([sitesym] if isinstance(sitesym, str) else sitesym))


def read_structure(source, name=None, min_distance_A=0.5):
    """A CIF (file path, CIF text or bytes) as a checked P1 ase.Atoms with atoms.info["name"] set.

    ase applies the CIF's symmetry operations, so the result always holds every atom of the cell. Before any
    expensive step the cell parameters and coordinates are validated, and the file is refused (StructureError
    naming it and why) when it holds more than one structure, a loop row with missing or extra values, or atoms
    that disagree with a formula or cell content the CIF declares; see `_declared_content_problem` for what
    cannot be detected.
    """
    import io
    from ase.io.cif import parse_cif
    if isinstance(source, bytes):
        text = source.decode("utf-8", errors="replace")
    elif isinstance(source, Path) or (isinstance(source, str) and "\n" not in source
                                      and (Path(source).is_file() or not source.lstrip().startswith("data_"))):
        path = Path(source)   # a one-line string is a path when such a file exists ("data_mof.cif"), else CIF text
        if path.is_dir():
            raise StructureError(f"{source}: is a folder, not a CIF file (use iter_cifs for a folder)")
        if not path.is_file():
            raise StructureError(f"{source}: no such CIF file")
        text, name = path.read_text(errors="replace"), name or path.stem
    else:
        text = source
    name = name or "structure"
    if not re.search(r"^\s*data_", text, re.M | re.I):
        raise StructureError(f"{name}: malformed CIF (no 'data_' block header, so not a CIF; it starts with "
                             f"{text[:40]!r})")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # ase warns on every CIF without occupancies/spacegroup tags
            blocks = [b for b in parse_cif(io.StringIO(text)) if b.has_structure()]
            rows = [str(w.message) for w in caught if str(w.message).startswith("Wrong number")]
            if rows:  # ase drops such rows and the rest of the loop with them
                raise StructureError(f"{name}: a loop row has missing or extra values ({rows[0][:160]}); "
                                     f"{len(rows)} row(s) affected")
            if not blocks:
                raise StructureError(f"{name}: malformed CIF (no cell and atom sites found)")
            if len(blocks) > 1:
                raise StructureError(f"{name}: {len(blocks)} data blocks with atoms "
                                     f"({', '.join('data_' + b.name for b in blocks[:4])}); give one structure "
                                     f"per file")
            block = blocks[0]
            cellpar = block.get_cellpar()
            if cellpar is None:
                raise StructureError(f"{name}: no cell (_cell_length_a/b/c and _cell_angle_alpha/beta/gamma)")
            if (problem := _cell_problem(cellpar)) is not None:
                raise StructureError(f"{name}: {problem}")
            coords = block._get_site_coordinates()[1]
            bad = [str(v) for v in np.ravel(coords) if not _finite_number(v)]
            if bad:
                raise StructureError(f"{name}: atom coordinates that are not finite numbers: {sorted(set(bad))[:5]}")
            # P1 files (all of CoRE MOF) skip ase's O(N^2) symmetry expansion (README, "Voxelizer").
            # The operations listed decide, as in ase.io.read: a 'P 1' label over more operations is expanded.
            p1 = block.get_spacegroup(True).no == 1 and _is_identity_only(block._get_sitesym())
            atoms = block.get_unsymmetrized_structure() if p1 else block.get_atoms()
    except StructureError:
        raise
    except Exception as err:
        reason = str(err) or "the CIF parser's own consistency check failed"
        raise StructureError(f"{name}: malformed CIF ({type(err).__name__}: {reason})") from None
    atoms.pbc = True
    if (problem := _declared_content_problem(block, atoms)) is not None:
        raise StructureError(f"{name}: {problem}")
    check_structure(atoms, name, min_distance_A)
    atoms.info["name"] = name
    return atoms


def _cif_paths(folder) -> list:
    """The *.cif files of a folder (any case of the suffix: *.CIF too), sorted; ValueError for a missing or empty
    folder, so a typo never reads as '0 structures'."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder of CIF files")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".cif" and p.is_file())
    if not paths:
        raise ValueError(f"{folder}: no *.cif files in this folder")
    return paths


def _read_or_record(read, name, failures):
    """read() or, when it fails, None with (name, reason) appended to failures: the one place where batch loops
    catch, so one bad structure never stops a batch (anything but a StructureError keeps its type name)."""
    try:
        return read()
    except Exception as err:
        if failures is not None:
            reason = str(err) if isinstance(err, StructureError) else f"{name}: {type(err).__name__}: {err}"
            failures.append((name, reason))
        return None


def iter_cifs(source, failures=None, min_distance_A=0.5):
    """Yield (name, atoms) for a folder of *.cif files (any case, sorted by name) or an iterable of CIF paths.

    Broken files are skipped; (name, reason) is appended to `failures` if given, so one bad file never
    stops a batch. Two files with the same name (a.cif, a.CIF) keep the first; the second is recorded.
    """
    paths = _cif_paths(source) if isinstance(source, (str, Path)) else [Path(p) for p in source]
    seen = set()
    for path in paths:
        if path.stem in seen:
            if failures is not None:
                failures.append((path.stem, f"{path}: a second file named {path.stem!r} (skipped)"))
            continue
        seen.add(path.stem)
        atoms = _read_or_record(lambda: read_structure(path, path.stem, min_distance_A), path.stem, failures)
        if atoms is not None:
            yield path.stem, atoms


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
            atoms = _read_or_record(lambda: read_structure(tar.extractfile(member).read(), name, min_distance_A),
                                    name, failures)
            if atoms is not None:
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
KCAL_PER_MOL_IN_K = 503.22            # 1 kcal/mol / k_B, as RASPA-style UFF tables use
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


# Property temperature per probe when none is given: H2 at 77 K (liquid-nitrogen storage, the study's and
# MOFX-DB's H2 condition); CH4, Kr, Xe at 298 K (ambient storage and Xe/Kr separation, the conditions of the
# DOE methane target and of Sikora et al. 2012); Ar at 87 K (its boiling point, the standard characterisation
# isotherm); He at 298 K (the helium void-fraction convention of GCMC codes).
PROBE_TEMPERATURE_K = {"H2": 77.0, "CH4": 298.0, "Kr": 298.0, "Xe": 298.0, "Ar": 87.0, "He": 298.0}


def _check_grid_settings(size, frame, spacing_A, cutoff_A, cap_K):
    """ValueError naming the setting unless the grid is non-empty and its spacing, cutoff and cap positive
    (spacing 0 puts every voxel on one point; size 0 makes an empty grid)."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size={size!r}: the grid edge must be a whole number of voxels >= 1")
    if frame not in ("cube", "cell"):
        raise ValueError(f"unknown frame {frame!r}: use 'cube' or 'cell'")
    for setting, value in (("spacing_A", spacing_A), ("cutoff_A", cutoff_A), ("cap_K", cap_K)):
        if not (_finite_number(value) and float(value) > 0):
            raise ValueError(f"{setting}={value!r}: must be a positive finite number")


@dataclass(frozen=True)
class GridParams:
    """A grid's parameters: the `voxelize` settings, the temperature of its stored properties and its atom-density
    channels. Shards store them (their hash names a dataset) and generators record the ones they were trained
    on; `voxelize(atoms, params=...)` makes a grid with them. DEFAULT_GRID holds the defaults every function of
    the kit takes."""
    size: int = 64
    frame: str = "cube"
    spacing_A: float = 0.5
    probe: str = "H2"
    cutoff_A: float = 12.8
    cap_K: float = 5000.0
    temperature_K: float = None  # of the stored K_H and Q_st; None: PROBE_TEMPERATURE_K[probe] (H2: 77 K)
    density_classes: tuple = ()  # atom-density channels after the energy (density_channels)
    # Width of the channels' Gaussians; None: spacing_A. Decoding real grids does not depend on it (max, not sum, of
    # Gaussians: every atom stays a peak), so it is chosen for the generator (README, "Generated atoms").
    density_sigma_A: float = None
    # The whole crystal's K_H, Q_st and He void fraction in the footer. They cost more than the cube grid itself
    # (grids over the full cell at 0.3 A; README, "Properties of the whole crystal"); False stores NaN for them
    # (density and window columns stay), for datasets made only to train on.
    cell_properties: bool = True

    def __post_init__(self):
        if self.temperature_K is None:
            object.__setattr__(self, "temperature_K", PROBE_TEMPERATURE_K[self.probe])
        if self.density_sigma_A is None:
            object.__setattr__(self, "density_sigma_A", self.spacing_A)
        for f in dataclasses.fields(self):  # 5000 and 5000.0 must give the same parameters hash
            object.__setattr__(self, f.name, (float if f.default is None else type(f.default))(getattr(self, f.name)))
        _check_grid_settings(self.size, self.frame, self.spacing_A, self.cutoff_A, self.cap_K)
        if not (math.isfinite(self.temperature_K) and self.temperature_K > 0):
            raise ValueError(f"temperature_K={self.temperature_K}: must be a positive finite temperature")
        if not 0 < self.cap_K <= 60000:
            raise ValueError(f"cap_K={self.cap_K}: shards store float16 (largest value 65504); use 0 < cap_K <= 60000")
        if self.density_classes:
            check_density_classes(self.density_classes)
            if self.frame != "cube":
                raise ValueError(f"density_classes need frame='cube' (density_channels' frame), got {self.frame!r}")
        if not (math.isfinite(self.density_sigma_A) and self.density_sigma_A > 0):
            raise ValueError(f"density_sigma_A={self.density_sigma_A}: must be a positive width in angstrom")

    @property
    def channels(self) -> list:
        """What each stored channel is: "energy_K", then "density:<class>" per density class."""
        return ["energy_K"] + [f"density:{c}" for c in self.density_classes]

    def voxelize_kwargs(self) -> dict:
        """The `voxelize` keywords (size, frame, spacing_A, probe, cutoff_A, cap_K)."""
        return {k: v for k, v in asdict(self).items() if k not in ("temperature_K", "density_classes",
                                                                   "density_sigma_A", "cell_properties")}

    def decode_kwargs(self) -> dict:
        """The keywords grid_to_atoms and structure_report need to read these grids' density channels."""
        return {"spacing_A": self.spacing_A, "classes": self.density_classes, "sigma_A": self.density_sigma_A}

    def to_dict(self) -> dict:
        """The fields; at the defaults of density_classes, density_sigma_A and cell_properties exactly those (and so
        the hash) of the parameters before these fields existed. Without density channels their width is moot."""
        fields = asdict(self)
        if not self.density_classes:
            del fields["density_classes"]
        if not self.density_classes or self.density_sigma_A == self.spacing_A:
            del fields["density_sigma_A"]
        if self.cell_properties:
            del fields["cell_properties"]
        return fields

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


ShardParams = GridParams  # the name before GridParams (shards and published code use it); the same class
DEFAULT_GRID = GridParams()  # 64^3 at 0.5 A, H2 probe, 12.8 A cutoff, capped at 5000 K; properties at 77 K


def _grid_settings(params, size=None, frame=None, spacing_A=None, probe=None, cutoff_A=None, cap_K=None) -> tuple:
    """(size, frame, spacing_A, probe, cutoff_A, cap_K): those of `params` (None: DEFAULT_GRID), each replaced by
    the keyword given for it (not None)."""
    base = (params or DEFAULT_GRID).voxelize_kwargs()
    given = dict(size=size, frame=frame, spacing_A=spacing_A, probe=probe, cutoff_A=cutoff_A, cap_K=cap_K)
    return tuple(base[k] if v is None else v for k, v in given.items())


def pair_coefficients(symbols, probe=DEFAULT_GRID.probe):
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


def grid_points(atoms, size=None, frame=None, spacing_A=None, count=None, *, params=None):
    """Cartesian points (size, size, size, 3) in A of a grid (settings: `params`, default DEFAULT_GRID, each
    replaced by the keyword given for it).

    frame="cube": an axis-aligned cube from the origin, point [i,j,k] at (i,j,k)*spacing_A; periodic images fill
    it, so every voxel is spacing_A wide whatever the cell (generated grids decode back to atoms in A).
    frame="cell": the study's fractional grid over the unit cell, point [i,j,k] at (i,j,k)/size in fractions.
    count > size continues the same lattice past the grid (voxelize pads to whole blocks, then crops).
    """
    size, frame, spacing_A = _grid_settings(params, size, frame, spacing_A)[:3]
    i = np.arange(size if count is None else count, dtype=np.float64)
    ijk = np.stack(np.meshgrid(i, i, i, indexing="ij"), -1)
    if frame == "cube":
        return ijk * spacing_A
    if frame == "cell":
        return (ijk / size) @ atoms.cell.array
    raise ValueError(f"unknown frame {frame!r}: use 'cube' or 'cell'")


def _default_device(device):
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def probe_energy(atoms, points_A, probe=DEFAULT_GRID.probe, cutoff_A=DEFAULT_GRID.cutoff_A, device=None,
                 dtype=torch.float64):
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


def voxelize_many(structures, size=None, frame=None, spacing_A=None, probe=None, cutoff_A=None, cap_K=None,
                  device=None, block=8, pairs_per_batch=None, *, params=None):
    """Energy grids for several structures in one batched pass (what a GPU wants): list of float32 arrays.
    Settings as in `voxelize`."""
    size, frame, spacing_A, probe, cutoff_A, cap_K = _grid_settings(params, size, frame, spacing_A, probe, cutoff_A,
                                                                    cap_K)
    _check_grid_settings(size, frame, spacing_A, cutoff_A, cap_K)
    device = _default_device(device)
    nblk = -(-size // block)
    n = nblk * block
    jobs = []
    for atoms in structures:
        pts = grid_points(atoms, size, frame, spacing_A, count=n)   # padded to whole blocks, cropped afterwards
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


def voxelize(atoms, size=None, frame=None, spacing_A=None, probe=None, cutoff_A=None, cap_K=None, device=None,
             block=8, pairs_per_batch=None, *, params=None):
    """Energy grid (size, size, size) of float32 kelvin: probe-framework LJ 12-6, periodic, capped at cap_K.

    Settings: `params` (a GridParams, default DEFAULT_GRID: 64^3 at 0.5 A, H2, 12.8 A cutoff, 5000 K cap), each
    replaced by the keyword given for it. Grid points as in grid_points(). Points are processed in block^3 cubes of
    neighbouring voxels so each block only visits the atoms within its reach (see _lj_blocks). CPU or CUDA
    (device=None picks CUDA if any).
    """
    return voxelize_many([atoms], size, frame, spacing_A, probe, cutoff_A, cap_K, device, block, pairs_per_batch,
                         params=params)[0]


def framework_density(atoms):
    """Crystal density in kg/m^3."""
    return float(atoms.get_masses().sum() * AMU_KG / (atoms.cell.volume * 1e-30))


def _boltzmann(grid_K, temperature_K, cap_K):
    """(E, exp(-E/kT)) in float64; with cap_K, voxels at or above it (inside atoms) weigh 0: their true energy is
    above the cap, so dropping them is closer than counting them at the cap's exp(-cap_K/T)."""
    e = np.asarray(grid_K, dtype=np.float64).ravel()
    w = np.exp(-e / temperature_K)
    if cap_K is not None:
        w[e >= cap_K] = 0.0
    return e, w


def widom_factor(grid_K, temperature_K=DEFAULT_GRID.temperature_K, cap_K=None):
    """<exp(-E/kT)> over the grid: the dimensionless Henry factor (Widom insertion on the grid).
    cap_K: voxels at or above it count as inside atoms (weight 0)."""
    return float(np.mean(_boltzmann(grid_K, temperature_K, cap_K)[1]))


def henry_coefficient(grid_K, density_kg_m3, temperature_K=DEFAULT_GRID.temperature_K, cap_K=None):
    """Henry coefficient K_H in mol kg^-1 Pa^-1: <exp(-E/kT)> / (R T rho_framework)."""
    return widom_factor(grid_K, temperature_K, cap_K) / (R_J_PER_MOL_K * temperature_K * density_kg_m3)


def heat_of_adsorption(grid_K, temperature_K=DEFAULT_GRID.temperature_K, cap_K=None):
    """Isosteric heat at infinite dilution in kJ/mol: R (T - <E exp(-E/kT)> / <exp(-E/kT)>).

    With cap_K, only voxels below it count; if there are none the heat is NaN, with a warning (a grid at the
    cap everywhere would otherwise give R (T - cap_K), e.g. -40.9 kJ/mol at 77 K).
    """
    e = np.asarray(grid_K, dtype=np.float64).ravel()
    if cap_K is not None:
        e = e[e < cap_K]
        if e.size == 0:
            warnings.warn(f"no accessible voxel (every energy >= cap_K={cap_K} K): heat of adsorption is NaN",
                          stacklevel=2)
            return math.nan
    w = np.exp(-(e - e.min()) / temperature_K)   # shifted by the minimum: no overflow in deep wells
    return float(R_J_PER_MOL_K * (temperature_K - (e * w).sum() / w.sum()) / 1000.0)


# Cell-property grid spacing: K_H, Q_st and void_fraction_He within 0.1% of a 0.2 A grid on 20 CoRE MOFs (0.5 A:
# 1.5%; README, "Properties of the whole crystal").
CELL_SPACING_A = 0.3
VOID_FRACTION_SPACING_A = 0.5   # void_fraction_He converges faster: within 0.22% of 0.2 A on the same 20
VOID_FRACTION_T_K = 298.0


def cell_grid_counts(atoms, spacing_A=CELL_SPACING_A, block=8):
    """Points along each cell vector for a cell grid at most spacing_A apart: whole blocks of `block`."""
    lengths = atoms.cell.lengths()
    return tuple(int(block * max(1, math.ceil(length / (spacing_A * block)))) for length in lengths)


def voxelize_cell(atoms, spacing_A=CELL_SPACING_A, probe=DEFAULT_GRID.probe, cutoff_A=DEFAULT_GRID.cutoff_A,
                  cap_K=DEFAULT_GRID.cap_K, device=None, block=8):
    """Energy grid (n1, n2, n3) in kelvin over the whole periodic cell, float32, capped at cap_K.

    Point [i,j,k] sits at fractions (i/n1, j/n2, k/n3), n_d = cell_grid_counts(): a uniform grid of a periodic
    function, so its mean is the periodic trapezoidal rule, which converges fast with spacing (unlike a window
    of the crystal, whose mean depends on where the window falls).
    """
    counts = cell_grid_counts(atoms, spacing_A, block)
    axes = [np.arange(n, dtype=np.float64) / n for n in counts]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1) @ atoms.cell.array
    nb = [n // block for n in counts]
    blocks = (pts.reshape(nb[0], block, nb[1], block, nb[2], block, 3).transpose(0, 2, 4, 1, 3, 5, 6)
              .reshape(-1, block ** 3, 3))
    device = _default_device(device)
    pairs = 64_000_000 if device.type == "cuda" else 1_000_000
    (e,) = _lj_blocks([(blocks, atoms)], probe, cutoff_A, device, torch.float32, pairs)
    e = e.clamp_(max=cap_K).nan_to_num_(nan=cap_K).cpu().numpy()
    return np.ascontiguousarray(e.reshape(*nb, block, block, block).transpose(0, 3, 1, 4, 2, 5).reshape(counts))


def void_fraction_He(atoms, spacing_A=VOID_FRACTION_SPACING_A, cutoff_A=DEFAULT_GRID.cutoff_A,
                     temperature_K=VOID_FRACTION_T_K, device=None):
    """Helium void fraction: <exp(-E_He/kT)> over the cell at 298 K, as GCMC codes (RASPA) compute it by Widom
    insertion of a He probe; here on the cell grid instead of random points. Capped voxels weigh 0."""
    cap_K = 100.0 * temperature_K                   # exp(-100): nothing above it counts
    return widom_factor(voxelize_cell(atoms, spacing_A, "He", cutoff_A, cap_K, device), temperature_K, cap_K)


def _properties(grid_K, density_kg_m3, temperature_K, cap_K, what):
    """log10 K_H and Q_st of one grid; NaN for both, with a warning, when no voxel is below cap_K."""
    if not (np.asarray(grid_K) < cap_K).any():
        warnings.warn(f"{what}: no accessible voxel (every energy >= cap_K={cap_K} K); K_H and Q_st are NaN",
                      stacklevel=3)
        return math.nan, math.nan
    kh = henry_coefficient(grid_K, density_kg_m3, temperature_K, cap_K)
    return (math.log10(kh) if kh > 0 else -math.inf), heat_of_adsorption(grid_K, temperature_K, cap_K)


def cell_properties(atoms, probe=DEFAULT_GRID.probe, temperature_K=None, spacing_A=CELL_SPACING_A,
                    cutoff_A=DEFAULT_GRID.cutoff_A, cap_K=DEFAULT_GRID.cap_K, device=None, name=None,
                    void_spacing_A=VOID_FRACTION_SPACING_A) -> dict:
    """Properties of the whole crystal, from grids over its full periodic cell (`voxelize_cell`):

    density_kg_m3, temperature_K (default PROBE_TEMPERATURE_K[probe]), log10_KH_mol_kg_Pa (Henry coefficient
    in mol kg^-1 Pa^-1), Qst_kJ_mol (isosteric heat at infinite dilution) and void_fraction_He (298 K, on its own
    grid at void_spacing_A).
    Voxels at the cap are inside atoms and count for nothing; a structure with none below it gets NaN K_H and
    Q_st and a warning naming it.
    """
    if temperature_K is None and probe not in PROBE_TEMPERATURE_K:
        raise ValueError(f"no default temperature for probe {probe!r}: pass temperature_K")
    temperature_K = float(temperature_K or PROBE_TEMPERATURE_K[probe])
    density = framework_density(atoms)
    grid = voxelize_cell(atoms, spacing_A, probe, cutoff_A, cap_K, device)
    log_kh, qst = _properties(grid, density, temperature_K, cap_K, name or atoms.info.get("name", "structure"))
    return {"density_kg_m3": density, "temperature_K": temperature_K, "log10_KH_mol_kg_Pa": log_kh,
            "Qst_kJ_mol": qst, "void_fraction_He": void_fraction_He(atoms, void_spacing_A, cutoff_A, device=device)}


def window_properties(grid_K, density_kg_m3, temperature_K=DEFAULT_GRID.temperature_K, cap_K=DEFAULT_GRID.cap_K,
                      name="grid") -> dict:
    """log10 K_H and Q_st of a window grid (e.g. the 32 A cube frame), named as such: window_log10_KH_mol_kg_Pa,
    window_Qst_kJ_mol. A window covers part of a large cell, so these differ from `cell_properties`; they are
    what a generated cube grid can be compared with."""
    log_kh, qst = _properties(grid_K, density_kg_m3, temperature_K, cap_K, name)
    return {"window_log10_KH_mol_kg_Pa": log_kh, "window_Qst_kJ_mol": qst}



# Per-structure properties (shard footers, `mofkit.py voxelize`): the whole crystal's (cell grid at CELL_SPACING_A,
# at params.temperature_K; He void fraction at 298 K), then the stored window grid's own (for comparing generated
# cube grids with real ones); shards add the source's table. NaN (null in JSON) where no voxel is accessible.
PROPERTY_COLUMNS = ("density_kg_m3", "log10_KH_mol_kg_Pa", "Qst_kJ_mol", "void_fraction_He",
                    "window_log10_KH_mol_kg_Pa", "window_Qst_kJ_mol")


def structure_properties(atoms, grid_K, params=None, device=None, name=None) -> dict:
    """PROPERTY_COLUMNS of a structure and its grid made with `params` (None: DEFAULT_GRID): the whole crystal's
    (`cell_properties`; with params.cell_properties False its density alone, the rest NaN) and the window's
    (`window_properties` of grid_K)."""
    params = params or DEFAULT_GRID
    name = name or atoms.info.get("name", "structure")
    if params.cell_properties:
        cell = cell_properties(atoms, params.probe, params.temperature_K, CELL_SPACING_A, params.cutoff_A,
                               params.cap_K, device, name, VOID_FRACTION_SPACING_A)
    else:
        cell = {"density_kg_m3": framework_density(atoms), "log10_KH_mol_kg_Pa": math.nan, "Qst_kJ_mol": math.nan,
                "void_fraction_He": math.nan}
    window = window_properties(grid_K, cell["density_kg_m3"], params.temperature_K, params.cap_K, name)
    return {c: {**cell, **window}[c] for c in PROPERTY_COLUMNS}


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

def saturation_pressure_bar(adsorbate, temperature_K, window_K=5.0) -> float:
    """Saturation (vapour) pressure P0 of `adsorbate` near its normal boiling point, in bar."""
    key = _formula(adsorbate)
    if key not in _BOILING_POINTS:
        raise ValueError(f"no saturation pressure known for adsorbate {adsorbate!r}; pass p0 explicitly")
    tb_K, dh_kJ_mol = _BOILING_POINTS[key]
    if abs(temperature_K - tb_K) > window_K:
        raise ValueError(f"P0 of {key} is known here only within {window_K} K of {tb_K} K, "
                         f"not at {temperature_K} K; pass p0 explicitly")
    return ATM_BAR * math.exp(-dh_kJ_mol * 1e3 / R_J_PER_MOL_K * (1 / temperature_K - 1 / tb_K))


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
    with np.errstate(divide="ignore", invalid="ignore"):  # ln of a zero or slightly negative uptake: left out
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
    `degenerate` is '' for a fit whose free parameters the data determine, else why not (a standard error that
    is infinite or over 1000 times its parameter, or a saturation capacity the data come nowhere near, e.g.
    a Sips g_inf of 1e10 mmol/g with K 1e-132: only a Freundlich-like product is determined); the fitters warn
    with it. Such parameters are not to be reported.
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
    degenerate: str = ""

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
    """Validated float64 (P, q); ValueError naming the bad input, a warning naming each dropped point.

    Negative pressures are dropped everywhere; zero pressures where `drop_zero_pressure` (power laws in P).
    Adsorption may be slightly negative (digitisation noise near P = 0: 13 of 175 real ISODB isotherms) in a
    linear-space fit; zero and negative uptakes are dropped where `drop_zero_adsorption` (log-space fits).
    """
    P = np.asarray(pressure, dtype=np.float64)
    q = np.asarray(adsorption, dtype=np.float64)
    if P.ndim != 1 or q.ndim != 1:
        raise ValueError(f"pressure and adsorption must be 1-D, got shapes {P.shape} and {q.shape}")
    if P.size != q.size:
        raise ValueError(f"pressure has {P.size} points but adsorption has {q.size}")
    for name, a in (("pressure", P), ("adsorption", q)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has NaN/inf at index {np.flatnonzero(~np.isfinite(a)).tolist()}")
    if P.size and not (q > 0).any():
        raise ValueError("adsorption is zero at every point (or negative): nothing to fit")
    keep = np.ones(P.size, dtype=bool)
    for name, a, drop, reason in (
            ("pressure", P, P < 0, "a negative pressure"),
            ("pressure", P, drop_zero_pressure & (P == 0), why),
            ("adsorption", q, drop_zero_adsorption & (q < 0), why),
            ("adsorption", q, drop_zero_adsorption & (q == 0), why)):
        gone = drop & keep
        if gone.any():
            kind = "negative" if (a[gone] < 0).all() else "zero"
            warnings.warn(f"dropped {int(gone.sum())} {kind}-{name} point(s) at index {np.flatnonzero(gone).tolist()} "
                          f"({name} {a[gone][:5].tolist()}): {reason}", stacklevel=3)
            keep &= ~gone
    if keep.sum() < 3:
        raise ValueError(f"only {int(keep.sum())} usable points; at least 3 are needed")
    return P[keep], q[keep]


def _fit_model(model, P, q, fixed=None, log_space=False) -> IsothermFit:
    """The one fitting core: least squares over ln(free parameters), from linearised starting values."""
    from scipy.optimize import leastsq  # MINPACK Levenberg-Marquardt: less overhead than least_squares (README)
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
        theta, cov_theta, info, message, status = leastsq(
            residual, np.log([start[p] for p in free]), full_output=True, xtol=1e-15, ftol=1e-15, gtol=1e-15,
            maxfev=20000)
    if status not in (1, 2, 3, 4) or not np.isfinite(theta).all() or not np.isfinite(info["fvec"]).all():
        raise RuntimeError(f"{model} fit did not converge: {message}")
    values = np.exp(theta)
    m, k = len(q), len(free)
    s2 = np.sum(info["fvec"] ** 2) / (m - k) if m > k else np.nan
    var = s2 * np.diag(cov_theta) if cov_theta is not None else np.full(k, np.nan)  # None: singular J
    se = dict(zip(free, values * np.sqrt(var)))
    q_hat = predict(theta)
    ss_res = float(np.sum((q - q_hat) ** 2))
    with np.errstate(divide="ignore", invalid="ignore"):  # exact data: ss_res = 0, aic = -inf
        r2 = 1.0 - ss_res / float(np.sum((q - q.mean()) ** 2))
        aic = m * math.log(ss_res / m) + 2 * k if ss_res > 0 else -math.inf
    params = {p: (fixed[p] if p in fixed else float(values[free.index(p)])) for p in spec.params}
    return IsothermFit(model, params, {p: float(se.get(p, np.nan)) for p in spec.params},
                       float(r2), math.sqrt(ss_res / m), aic, m, (float(P.min()), float(P.max())),
                       tuple(fixed), log_space, _degenerate(model, params, se, P, q))


def _degenerate(model, params, se, P, q) -> str:
    """Why a fit's free parameters are not determined by its data, or '' (see IsothermFit.degenerate)."""
    reasons = []
    capacity = {"sips": "g_inf", "langmuir": "Q_max"}.get(model)
    if capacity in se and params[capacity] > 1e3 * np.abs(q).max():
        reasons.append(f"{capacity} = {params[capacity]:.3g} is over 1000 times the largest uptake "
                       f"{np.abs(q).max():.3g}: the data do not approach saturation")
    for p, s in se.items():
        if not math.isfinite(s) and len(q) > len(se):
            reasons.append(f"{p} has no finite standard error")
        elif math.isfinite(s) and s > 1e3 * abs(params[p]):
            reasons.append(f"{p} = {params[p]:.3g} +- {s:.3g}")
    return "; ".join(reasons)


def _warn_degenerate(fit, stacklevel=3):
    if fit.degenerate:
        warnings.warn(f"degenerate {fit.model} fit, its parameters are not determined by the data: "
                      f"{fit.degenerate}", stacklevel=stacklevel)
    return fit


def fit_freundlich(pressure, adsorption, log_space=False) -> IsothermFit:
    """Freundlich q = K P^(1/n) by nonlinear least squares, started from the log-log line.

    log_space=True fits ln q instead (right for relative, i.e. multiplicative, errors). Zero-pressure
    points (and zero adsorption in log space) are dropped with a warning. K is in adsorption units
    per (pressure unit)^(1/n).
    """
    P, q = _isotherm_points(pressure, adsorption, drop_zero_pressure=True, drop_zero_adsorption=log_space,
                            why="Freundlich is a power law in P")
    return _warn_degenerate(_fit_model("freundlich", P, q, log_space=log_space))


def fit_sips(pressure, adsorption, fix_K=None, fix_n=None, fix_g_inf=None, log_space=False) -> IsothermFit:
    """Sips (Langmuir-Freundlich) q = g_inf (K P)^(1/n) / (1 + (K P)^(1/n)), any parameter fixable.

    The study's published "Freundlich" numbers are this model with K fixed at 2.5 (1/bar), g_inf and n
    fitted in linear space: `fit_sips(P_bar, q_mmol_g, fix_K=2.5)`. Zero-pressure points are dropped
    with a warning. K is in 1/(pressure unit), g_inf in adsorption units.
    """
    P, q = _isotherm_points(pressure, adsorption, drop_zero_pressure=True, drop_zero_adsorption=log_space,
                            why="Sips is a power law in P")
    return _warn_degenerate(_fit_model("sips", P, q, {"g_inf": fix_g_inf, "K": fix_K, "n": fix_n}, log_space))


def fit_langmuir(pressure, adsorption, log_space=False) -> IsothermFit:
    """Langmuir q = Q_max b P / (1 + b P); b in 1/(pressure unit), Q_max in adsorption units."""
    P, q = _isotherm_points(pressure, adsorption, drop_zero_pressure=log_space,
                            drop_zero_adsorption=log_space, why="log-space fit")
    return _warn_degenerate(_fit_model("langmuir", P, q, log_space=log_space))


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
        qi, xi = q[inside][order], x[inside][order]
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
    fit = _warn_degenerate(_fit_model("bet", P[use], q[use], {"P0": p0}))
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
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
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
    parameters, r2, rmse, aic, n_points, fit_error ('' when fitted), degenerate ('' unless the fitted
    parameters are not determined, see IsothermFit) and fit_warning (the fit's warnings, e.g. dropped points,
    collected here instead of raised). fit_kwargs go to the fitter,
    e.g. `fit_isotherm_table(df, "sips", fix_K=2.5)` for the study's own table.
    """
    import pandas as pd
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
        note = row.get("note")
        out.update(n_points=0, fit_error="" if note is None or pd.isna(note) else str(note), degenerate="",
                   fit_warning="")
        if not out["fit_error"]:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    fit = FITTERS[model](_cell_points(row[p_col]), _cell_points(row[q_col]), **fit_kwargs)
                    out.update({**fit.params, **{f"{p}_se": s for p, s in fit.se.items()}},
                               r2=fit.r2, rmse=fit.rmse, aic=fit.aic, n_points=fit.n_points,
                               degenerate=fit.degenerate)
                except (ValueError, TypeError, RuntimeError) as e:
                    out["fit_error"] = f"{type(e).__name__}: {e}"
            out["fit_warning"] = "; ".join(str(w.message) for w in caught)
        rows.append(out)
    result = df.reset_index(drop=True).copy()
    for col, values in pd.DataFrame(rows).items():
        result[col] = values
    return result


@dataclass(frozen=True)
class GridIsotherm:
    """ESTIMATE of an isotherm from an energy grid, never a measurement. Uptakes per mass of framework."""
    model: str                  # "lda" (grid_isotherm) or "lattice_gas" (lattice_gas_isotherm)
    probe: str
    temperature_K: float
    pressure_bar: np.ndarray
    absolute_mmol_g: np.ndarray  # all adsorbate in the pores
    excess_mmol_g: np.ndarray    # absolute - bulk density x He pore volume; NaN unless void_fraction was given
    absolute_cm3_stp_g: np.ndarray
    bulk_density_mol_m3: np.ndarray  # of the bulk fluid at each pressure, in the model's own terms
    henry_mmol_g_bar: float  # low-pressure slope: Widom <exp(-E/kT)> / (R T rho)
    accessible_fraction: float  # voxels with E < cap_K
    void_fraction: float  # as given for the excess (NaN: none given)


def _isotherm_inputs(grid_K, temperature_K, pressures_bar, density_kg_m3):
    E = np.asarray(grid_K, dtype=np.float64).ravel()
    P_bar = np.atleast_1d(np.asarray(pressures_bar, dtype=np.float64))
    if E.size == 0 or not (E > -np.inf).all():
        raise ValueError(f"grid_K must be a non-empty grid without NaN or -inf (size {E.size})")
    if not (density_kg_m3 > 0 and temperature_K > 0) or not np.isfinite(P_bar).all() or (P_bar < 0).any():
        raise ValueError(f"need density_kg_m3 > 0 (got {density_kg_m3}), temperature_K > 0 "
                         f"(got {temperature_K}) and finite pressures >= 0")
    return E, P_bar


def _grid_isotherm_result(model, probe, T, P_bar, absolute, bulk_mol_m3, E, cap_K, density_kg_m3, void_fraction):
    void = math.nan if void_fraction is None else float(void_fraction)
    henry = henry_coefficient(E, density_kg_m3, T, cap_K) * 1e5  # mol/kg/Pa -> mmol/g/bar
    excess = absolute - bulk_mol_m3 * void / density_kg_m3
    return GridIsotherm(model, probe, float(T), P_bar, absolute, excess, absolute * CM3_STP_PER_MMOL, bulk_mol_m3,
                        float(henry), float(np.mean(E < cap_K)), void)


# Bulk fluids. The default equation of state is CoolProp's (the reference equations cited at LIQUID_DENSITY_KG_M3;
# < 0.1-0.5% in density over their range); Peng-Robinson is the documented cubic alternative (Peng & Robinson,
# Ind. Eng. Chem. Fundam. 15, 59 (1976)), needs nothing installed and is several % off in dense fluid
# (README compares them).
EOS_NAMES = ("coolprop", "peng-robinson")
_EOS_P_MIN_PA = 1e-5  # below it the fluid is an ideal gas to < 1e-11 (second virial term), and is taken as one


def _peng_robinson(gas, temperature_K, pressure_Pa):
    """(density mol/m^3, fugacity Pa) of the stable Peng-Robinson root (lowest fugacity) at T, P."""
    Tc, Pc, omega = _CRITICAL[gas]
    RT = R_J_PER_MOL_K * temperature_K
    kappa = 0.37464 + 1.54226 * omega - 0.26992 * omega ** 2
    a = 0.45724 * (R_J_PER_MOL_K * Tc) ** 2 / Pc * (1 + kappa * (1 - math.sqrt(temperature_K / Tc))) ** 2
    A, B = a * pressure_Pa / RT ** 2, 0.07780 * R_J_PER_MOL_K * Tc / Pc * pressure_Pa / RT
    roots = np.roots([1.0, B - 1.0, A - 3 * B ** 2 - 2 * B, B ** 3 + B ** 2 - A * B])
    Z = roots.real[(np.abs(roots.imag) < 1e-9 * np.abs(roots).max()) & (roots.real > B)]
    s2 = math.sqrt(2.0)
    ln_phi = Z - 1 - np.log(Z - B) - A / (2 * s2 * B) * np.log((Z + (1 + s2) * B) / (Z + (1 - s2) * B))
    k = int(np.argmin(ln_phi))
    return pressure_Pa / (Z[k] * RT), pressure_Pa * math.exp(ln_phi[k])


def _coolprop_states(gas, temperature_K, pressures_Pa):
    """(P, density, fugacity) arrays along the isotherm from CoolProp, up to the equation's limit (its maximum
    pressure or the melting line: above 1e5 Pa the first state it refuses ends the table). Below the critical
    temperature both saturated states are included, at the same fugacity (the density jumps: condensation)."""
    try:
        import CoolProp.CoolProp as CP
    except ImportError:
        raise ImportError("the default equation of state needs CoolProp: pip install CoolProp==8.0.0 "
                          "(or pass eos='peng-robinson')") from None
    state = CP.AbstractState("HEOS", _COOLPROP_NAMES[gas])
    # densities on the kit's gas constant: some reference equations use an older R (H2: 8.314472, 1.1e-6
    # above), and the Henry limit must be exactly <exp(-E/kT)>/(R T rho)
    r_ratio = state.gas_constant() / R_J_PER_MOL_K
    sat = None
    if temperature_K < state.T_critical():
        state.update(CP.QT_INPUTS, 0.0, temperature_K)
        sat = state.p()
    out = []
    for P in pressures_Pa:
        if sat is not None and abs(P / sat - 1) < 1e-9:
            continue  # the saturated states are added below, exactly
        try:
            state.specify_phase(CP.iphase_not_imposed if sat is None else
                                CP.iphase_gas if P < sat else CP.iphase_liquid)
            state.update(CP.PT_INPUTS, P, temperature_K)
        except ValueError:
            if P < 1e5:
                raise
            break                                   # beyond the equation's range: the table ends
        out.append((P, state.rhomolar() * r_ratio, state.fugacity(0)))
    state.specify_phase(CP.iphase_not_imposed)
    if sat is not None:
        for quality in (1.0, 0.0):                  # vapour, then liquid
            state.update(CP.QT_INPUTS, quality, temperature_K)
            out.append((sat, state.rhomolar() * r_ratio, state.fugacity(0)))
    return np.array(sorted(out, key=lambda s: (s[2], s[1]))).reshape(-1, 3).T


def bulk_fluid(gas, temperature_K, pressures_Pa, eos="coolprop"):
    """(density mol/m^3, fugacity Pa) of the bulk fluid at each pressure, from `eos` ('coolprop' or
    'peng-robinson'). Below the critical temperature the stable phase is returned (liquid above P_sat)."""
    key, P = _formula(gas), np.atleast_1d(np.asarray(pressures_Pa, dtype=np.float64))
    if key not in _CRITICAL or eos not in EOS_NAMES:
        raise ValueError(f"no equation of state for gas {gas!r} / eos {eos!r}: gases {sorted(_CRITICAL)}, "
                         f"eos one of {EOS_NAMES}")
    if eos == "peng-robinson":
        rho, f = np.array([_peng_robinson(key, temperature_K, p) for p in P]).T.reshape(2, -1)
        return rho, f
    Ps, rho, f = _coolprop_states(key, temperature_K, P)
    if len(Ps) < len(P) or not np.isin(P, Ps).all():
        raise ValueError(f"{key} at {temperature_K} K: pressures up to {P.max():.4g} Pa are beyond CoolProp's "
                         f"equation of state (it ends below {P[~np.isin(P, Ps)].min():.4g} Pa here)")
    i = np.array([np.flatnonzero(Ps == p)[-1] for p in P])  # at P_sat: the liquid (stable above)
    return rho[i], f[i]


def _fugacity_table(gas, temperature_K, eos, pressures_Pa):
    """(ln f, y = ln(rho R T / f), rho) along the isotherm, sorted by fugacity, through the given pressures:
    y -> 0 in the ideal-gas limit; the table ends at the equation's high-pressure limit."""
    RT = R_J_PER_MOL_K * temperature_K
    P = np.union1d(np.geomspace(_EOS_P_MIN_PA, 1e10, 2000), pressures_Pa[pressures_Pa >= _EOS_P_MIN_PA])
    if eos == "coolprop":
        _, rho, f = _coolprop_states(gas, temperature_K, P)
    else:
        rho, f = bulk_fluid(gas, temperature_K, P, eos)
        order = np.lexsort((rho, f))
        rho, f = rho[order], f[order]
    return np.log(f), np.log(rho * RT / f), rho


def _lda_density(x, table, RT):
    """Bulk density (mol/m^3) at ln-fugacities x from a _fugacity_table: interpolated in y = ln(rho RT/f) over
    ln f; below the table y shrinks linearly in f (second-virial behaviour); above it the density stays at the
    table's last (the densest state the equation of state allows: a packing limit)."""
    ln_f, y, rho = table
    low = x < ln_f[0]
    yx = np.interp(x, ln_f, y)
    yx[low] = y[0] * np.exp(x[low] - ln_f[0])
    out = np.exp(np.minimum(x, ln_f[-1]) + yx - math.log(RT))
    out[x > ln_f[-1]] = rho[-1]
    return out


def grid_isotherm(grid_K, temperature_K, pressures_bar, probe=DEFAULT_GRID.probe, *, density_kg_m3,
                  cap_K=DEFAULT_GRID.cap_K, void_fraction=None, eos="coolprop") -> GridIsotherm:
    """ESTIMATE of an adsorption isotherm from a probe energy grid (kelvin): local density approximation.

    Each voxel holds the bulk fluid's density at the local fugacity f exp(-E/kT) (f: the bulk fugacity at P),
    from a real-fluid equation of state (`eos`: 'coolprop', default, or 'peng-robinson'; see bulk_fluid).
    Exact in the Henry limit (q/P -> <exp(-E/kT)>/(R T rho), the Widom average) and for the bulk fluid (E = 0
    everywhere gives the bulk density); in between it has no layering or confinement beyond the local
    energy. Voxels at or above cap_K are inside atoms and hold nothing (GAN output with repulsion clipped to
    0 K: cap_K=0.0). Absolute uptake is the mean density over the grid / framework density; excess subtracts
    the bulk density times the pore volume void_fraction / density (GCMC codes use the helium void fraction,
    `void_fraction_He`); without void_fraction it is NaN. Voxels are equal-volume: the spacing cancels.
    """
    E, P_bar = _isotherm_inputs(grid_K, temperature_K, pressures_bar, density_kg_m3)
    key, P_Pa = _formula(probe), P_bar * 1e5
    RT, e_acc = R_J_PER_MOL_K * temperature_K, E[E < cap_K] / temperature_K
    ideal = P_Pa < _EOS_P_MIN_PA
    bulk, f = bulk_fluid(key, temperature_K, np.where(ideal, 1e5, P_Pa), eos)  # checks gas, eos and range
    bulk[ideal], f[ideal] = P_Pa[ideal] / RT, P_Pa[ideal]
    table = _fugacity_table(key, temperature_K, eos, P_Pa)  # holds the requested pressures: E = 0 is exact
    absolute = np.array([_lda_density(math.log(fp) - e_acc, table, RT).sum() if p > 0 else 0.0
                         for p, fp in zip(P_Pa, f)]) / E.size / density_kg_m3   # mol/kg = mmol/g
    return _grid_isotherm_result("lda", key, temperature_K, P_bar, absolute, bulk, E, cap_K, density_kg_m3,
                                 void_fraction)


def lattice_gas_isotherm(grid_K, temperature_K, pressures_bar, probe=DEFAULT_GRID.probe, *, density_kg_m3,
                         cap_K=DEFAULT_GRID.cap_K,
                         void_fraction=None, liquid_density_kg_m3=None, molar_mass_g_mol=None) -> GridIsotherm:
    """ESTIMATE of an adsorption isotherm from a probe energy grid (kelvin): ideal lattice gas (the kit's first
    estimate; `grid_isotherm` is the better one).

    Each voxel is an independent Langmuir site holding at most the probe's liquid density times its
    volume, with occupancy b P / (1 + b P), b = exp(-E/kT) / (R T c_liq) (c_liq: liquid molar density).
    At low pressure this is exactly the Widom Henry law; at high pressure it saturates at accessible pore
    volume x liquid density. Its bulk fluid (E = 0) holds c_liq P / (P + R T c_liq): below the ideal gas by
    P / (R T c_liq), 0.69x for H2 at 77 K and 100 bar, which is why it runs low. Voxels at or above cap_K hold
    nothing; the excess and the rest as in grid_isotherm.
    """
    from scipy.special import expit
    E, P_bar = _isotherm_inputs(grid_K, temperature_K, pressures_bar, density_kg_m3)
    key = _formula(probe)
    if (liquid_density_kg_m3 is None and key not in LIQUID_DENSITY_KG_M3) or (molar_mass_g_mol is None
                                                                             and key not in GASES):
        raise ValueError(f"no liquid density or molar mass known for probe {probe!r}; pass "
                         f"liquid_density_kg_m3 and molar_mass_g_mol (known: {sorted(LIQUID_DENSITY_KG_M3)})")
    molar_mass_g_mol = molar_mass_g_mol or GASES[key][1]
    liquid_density_kg_m3 = liquid_density_kg_m3 or LIQUID_DENSITY_KG_M3[key]
    c_liq_mol_m3 = liquid_density_kg_m3 / (molar_mass_g_mol * 1e-3)
    rtc_Pa = R_J_PER_MOL_K * temperature_K * c_liq_mol_m3
    E_acc = E[E < cap_K]
    # occupancy b P/(1 + b P) = expit(ln(P/RTc) - E/T): no overflow for deep sites or huge P
    with np.errstate(divide="ignore"):
        log_p = np.log(P_bar * 1e5 / rtc_Pa)
    e_over_T = E_acc / temperature_K
    theta = np.array([expit(lp - e_over_T).sum() / E.size for lp in log_p])
    absolute = c_liq_mol_m3 / density_kg_m3 * theta  # mol/kg = mmol/g
    return _grid_isotherm_result("lattice_gas", key, temperature_K, P_bar, absolute, c_liq_mol_m3 * expit(log_p),
                                 E, cap_K, density_kg_m3, void_fraction)


def grid_freundlich(grid_K, temperature_K=DEFAULT_GRID.temperature_K, pressures_bar=None, probe=DEFAULT_GRID.probe, *,
                    density_kg_m3, cap_K=DEFAULT_GRID.cap_K) -> IsothermFit:
    """Freundlich (K in mmol/g/bar^(1/n), n) of a grid's ESTIMATED absolute isotherm (`grid_isotherm`).

    Lets real and generated grids be compared in the study's own terms. Default pressures: 12 points
    from 0.01 to 1 bar, log-spaced, like the study's 77 K H2 measurements (0.017-1 bar).
    """
    pressures_bar = np.geomspace(0.01, 1.0, 12) if pressures_bar is None else pressures_bar
    iso = grid_isotherm(grid_K, temperature_K, pressures_bar, probe, density_kg_m3=density_kg_m3, cap_K=cap_K)
    return fit_freundlich(iso.pressure_bar, iso.absolute_mmol_g)



# =============================================================================
# 5. Shards: sharded grid datasets, data_manifest.csv, streaming dataset
# =============================================================================

# A shard is ONE file: a standard float16 .npy array (N, C, D, D, D) followed by a JSON footer,
#
#   [.npy header][N*C*D^3 float16][footer JSON, utf-8][footer length: uint64 LE][b"MOFSHRD1"]
#
# One file is one download, one sha256 and one atomic rename (no array/sidecar pair that can disagree).
# np.load(path, mmap_mode="r") reads it as a plain array in any numpy (np.load never looks past the
# data), so a grid is read without loading its shard. The .npy header and the footer length fix the file
# size exactly, so a truncated file is always detected. float16 stores a 64^3 grid in 524,288 B = 0.5 MiB
# (the study: ~6.9 MB of text), rounded to relative precision 2^-11 ~ 5e-4 (at most 2 K at the 5000 K cap,
# 0.25 K near -1000 K); its largest value is 65504, hence cap_K <= 60000. The footer holds the requested members, the
# names of the stored grids in order, the failures, the voxelizer parameters and per-structure properties
# (computed from the float32 grid before rounding). Channel 0 is the energy in kelvin; with
# GridParams.density_classes the atom-density channels follow, in [0, 1] (float16 keeps 2^-11 near 1); the footer's
# "channels" names each. The footer also makes the file self-verifying: its own file name and the sha256 of the
# grid bytes and of the footer, so a shard built here and one downloaded without a published sha256 are equally
# safe (checked on first open; cost in README, Reliability).

SHARD_MAGIC = b"MOFSHRD1"
SHARD_FORMAT = "mofkit-shard-2"     # footer holds the file's name and the sha256 of its grids and of itself
SHARD_FORMAT_V1 = "mofkit-shard-1"  # no checksums: still read, with a warning
# data_manifest.csv: one row per file. kind "shard": file is the shard's name, members its structures (';'-separated,
# the footer's "members"), params/params_hash its GridParams, url where it is published; kind "weights": a shipped
# generator (`record_weights`), file its path relative to the manifest. Manifests written before 2026-11-25 name
# three columns differently (_OLD_MANIFEST_COLUMNS); they are read, and rewritten, with today's names.
MANIFEST_COLUMNS = ["file", "n_members", "n_grids", "bytes", "sha256", "source", "params_hash", "params", "url",
                    "members", "kind"]
_OLD_MANIFEST_COLUMNS = {"shard": "file", "n_names": "n_members", "names": "members"}
FAILURE_COLUMNS = ["shard", "name", "reason"]
COREMOF_SOURCE = "coremof:2019-ASR"


class ShardError(ValueError):
    """A shard file that is truncated, corrupted, or not what its manifest row says."""


def _footer_digest(meta) -> str:
    """sha256 of a footer's JSON without its own digest, re-serialised canonically (json round-trips floats)."""
    body = {k: v for k, v in meta.items() if k != "footer_sha256"}
    return hashlib.sha256(json.dumps(body, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def write_shard(path, grids, meta):
    """Write grids (N, C, D, D, D) as float16 followed by the JSON footer `meta`, atomically.

    The footer also records the file's own name and the sha256 of the grid bytes and of the footer, so the
    file verifies itself (see `verify_shard`).
    """
    path = Path(path)
    meta = {k: v for k, v in meta.items() if k not in ("format", "shard", "shape", "data_offset", "data_sha256",
                                                       "footer_sha256")}  # a footer read back is written afresh
    with np.errstate(over="ignore"):  # overflow is reported below, naming the file
        grids16 = np.ascontiguousarray(grids, dtype=np.float16)
    if grids16.ndim != 5 or not np.isfinite(grids16).all():
        raise ValueError(f"{path}: grids must be finite (N, C, D, D, D) below 65504, got shape {grids16.shape}")
    full = {"format": SHARD_FORMAT, "shard": path.name, **meta,
            "data_sha256": hashlib.sha256(grids16.reshape(-1).view(np.uint8)).hexdigest()}
    full["footer_sha256"] = _footer_digest(full)
    footer = json.dumps(full, separators=(",", ":"), allow_nan=False).encode()
    with atomic_write(path) as f:
        np.lib.format.write_array(f, grids16, allow_pickle=False)
        f.write(footer)
        f.write(struct.pack("<Q", len(footer)) + SHARD_MAGIC)


def _broken_shard_error(path, reason):
    return ShardError(f"{path}: {reason}; it is not a complete, intact mofkit shard: delete it and rerun "
                      f"ensure_shards (or build_shards)")


def read_shard_meta(path) -> dict:
    """A shard's footer (members, names, failures, params, properties, source), after checking the file is whole,
    its footer matches its own sha256 and the file name it was written under.

    Reads only the .npy header and the footer (the grid bytes are checked by `verify_shard`, which `open_shard`
    runs once per file and process). Raises ShardError naming the file if it is truncated, altered, copied over
    another shard, or not a shard. Files of the first format (mofkit-shard-1, no checksums) are still read, with
    a warning.
    """
    path = Path(path)
    if path.is_dir():
        raise ShardError(f"{path}: is a folder, not a shard file")
    size = path.stat().st_size

    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}[version]
            shape, fortran_order, dtype = read_header(f)
        except (ValueError, KeyError) as e:
            raise _broken_shard_error(path, f"no .npy header ({e})") from None
        data_start = f.tell()
        data_end = data_start + math.prod(shape) * dtype.itemsize
        if size < data_end + 16:
            raise _broken_shard_error(path, f"{size} bytes, too short for its {shape} array and footer (truncated?)")
        f.seek(size - 16)
        footer_bytes, magic = struct.unpack("<Q8s", f.read(16))
        if magic != SHARD_MAGIC or size != data_end + footer_bytes + 16:
            raise _broken_shard_error(path, f"{size} bytes and no footer where one should end (truncated?)")
        f.seek(data_end)
        try:
            meta = json.loads(f.read(footer_bytes))
        except ValueError as e:
            raise _broken_shard_error(path, f"unreadable footer ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") not in (SHARD_FORMAT, SHARD_FORMAT_V1):
        raise _broken_shard_error(path, f"unknown format {meta.get('format') if isinstance(meta, dict) else meta!r}")
    if meta["format"] == SHARD_FORMAT:
        if meta.get("footer_sha256") != _footer_digest(meta):
            raise _broken_shard_error(path, "its footer (names, properties, parameters) does not match the footer's "
                                      "own sha256: it was altered")
        if meta.get("shard") != path.name:
            raise _broken_shard_error(path, f"it was written as {meta.get('shard')!r}: another shard copied or renamed "
                                      f"over this one")
    elif path not in _WARNED_V1:
        _WARNED_V1.add(path)
        warnings.warn(f"{path}: a {SHARD_FORMAT_V1} shard without checksums; it is read as is: rebuild it "
                      f"(delete it and rerun build_shards) to make it self-verifying", stacklevel=2)
    if dtype != np.float16 or fortran_order or len(shape) != 5 or shape[0] != len(meta["names"]):
        raise _broken_shard_error(path, f"unexpected layout {dtype} {shape} for format {meta.get('format')!r}")
    meta["shape"] = list(shape)
    meta["data_offset"] = data_start
    return meta


_WARNED_V1 = set()
_VERIFIED = {}   # (path, inode, size, mtime_ns) of files whose grid bytes matched their footer in this process


def verify_shard(path, meta=None) -> dict:
    """Check a shard completely: `read_shard_meta`, then the sha256 of its grid bytes against the footer's
    (streamed, no copy in memory). A file is hashed once per process while it is unchanged on disk (same inode,
    size and mtime). Returns the footer; raises ShardError naming the file (flipped bytes, NaN/inf written into
    the grids, a changed footer, a shard copied over another)."""
    path = Path(path)
    meta = read_shard_meta(path) if meta is None else meta
    if meta["format"] != SHARD_FORMAT:
        return meta
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if _VERIFIED.get(key) != meta["data_sha256"]:
        h = hashlib.sha256()
        remaining = math.prod(meta["shape"]) * 2
        with open(path, "rb") as f:
            f.seek(meta["data_offset"])
            while remaining:
                block = f.read(min(remaining, 1 << 22))
                if not block:
                    break
                h.update(block)
                remaining -= len(block)
        if h.hexdigest() != meta["data_sha256"]:
            raise _broken_shard_error(path, "its grid bytes do not match the sha256 in its footer (corrupted on "
                                      "disk or in transfer)")
        _VERIFIED[key] = meta["data_sha256"]
    return meta


def open_shard(path):
    """(grids, meta): grids is a (N, C, D, D, D) float16 memory map (nothing is read until indexed), after
    `verify_shard` (once per process and unchanged file)."""
    meta = verify_shard(path)
    # copy-on-write map: torch only wraps writable arrays; the pages are never written, so nothing is copied
    return np.load(path, mmap_mode="c"), meta


def _source_label(source) -> str:
    """'coremof:<dataset>' or 'cifs:<folder>': how a manifest row names where its structures come from."""
    if source is None:
        return COREMOF_SOURCE
    source = str(source)
    if source.startswith(("coremof:", "cifs:")):
        return source
    if Path(source).is_dir():
        return f"cifs:{source}"
    raise ValueError(f"source {source!r}: expected None (CoRE MOF 2019-ASR), 'coremof:<dataset>' or a folder "
                     f"of .cif files")


def source_names(source=None) -> list:
    """The structure names of a source (as `build_shards` takes it: None, 'coremof:<dataset>' or a CIF folder)."""
    kind, where = _source_label(source).split(":", 1)
    if kind == "coremof":
        return coremof_names(where)
    return list(dict.fromkeys(p.stem for p in _cif_paths(where)))  # a.cif and a.CIF: one name (iter_cifs records it)


def iter_source(source, names, failures=None):
    """Yield (name, atoms) for `names` of a source (as in `source_names`), appending (name, reason) to `failures`
    for those that cannot be read."""
    kind, where = _source_label(source).split(":", 1)
    if kind == "coremof":
        return iter_coremof(where, names=names, failures=failures)
    found = {}
    for p in _cif_paths(where):
        found.setdefault(p.stem, p)
    return iter_cifs([found.get(name, Path(where) / f"{name}.cif") for name in names], failures=failures)


def _source_table(label):
    """The source's own per-structure property table (pandas, indexed by name), or None."""
    kind, where = label.split(":", 1)
    return coremof_properties(where) if kind == "coremof" else None


def _shard_plan(names, shard_size):
    """[(file name, members)]: shard k holds names[k*shard_size:(k+1)*shard_size], whatever later fails."""
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: must be >= 1")
    bad = [n for n in names if ";" in n or not n]
    if bad:
        raise ValueError(f"structure names {bad[:3]}: names must be non-empty and free of ';' (the manifest's "
                         f"separator)")
    return [(f"shard_{k:05d}.npy", names[i:i + shard_size]) for k, i in enumerate(range(0, len(names), shard_size))]


def _manifest_row(shard, members, label, params, path=None, url=""):
    """One data_manifest.csv row; bytes/sha256/n_grids are filled from the file at `path` when there is one."""
    row = {"file": shard, "n_members": len(members), "n_grids": "", "bytes": "", "sha256": "", "source": label,
           "params_hash": params.hash, "params": params.to_json(), "url": url, "members": ";".join(members),
           "kind": "shard"}
    if path is not None:
        row.update(n_grids=read_shard_meta(path)["shape"][0], bytes=Path(path).stat().st_size,
                   sha256=sha256_file(path))
    return row


def read_manifest(path, kind="shard") -> list:
    """The rows of data_manifest.csv of one kind ("shard", "weights"; None: all) as dicts of strings, with
    today's column names (MANIFEST_COLUMNS). A manifest without a kind column (older files) lists shards only."""
    with open(path, newline="") as f:
        rows = [{_OLD_MANIFEST_COLUMNS.get(k, k): v for k, v in row.items()} for row in csv.DictReader(f)]
    missing = set(MANIFEST_COLUMNS) - {"kind"} - set(rows[0] if rows else MANIFEST_COLUMNS)
    if missing:
        raise ValueError(f"{path}: not a shard manifest, columns {sorted(missing)} are missing")
    for row in rows:
        row["kind"] = row.get("kind") or "shard"
    return [r for r in rows if kind is None or r["kind"] == kind]


def write_manifest(path, rows):
    """Write manifest rows (dicts with MANIFEST_COLUMNS, as `read_manifest` returns them) to `path` atomically."""
    _write_csv(path, MANIFEST_COLUMNS, rows)


def _merge_manifest(path, rows):
    """Rewrite the manifest `path` with `rows` replacing its rows of the same files; sorted by file."""
    files = {r["file"] for r in rows}
    old = [r for r in read_manifest(path, kind=None) if r["file"] not in files] if Path(path).exists() else []
    write_manifest(path, sorted(old + rows, key=lambda r: r["file"]))


def _members(row) -> list:
    return row["members"].split(";") if row["members"] else []


def _holds(meta, members, params_hash) -> bool:
    """Does a shard footer say it holds exactly `members`, made with the GridParams of `params_hash`?"""
    return meta["members"] == list(members) and GridParams(**meta["params"]).hash == params_hash


def coremof_manifest(path=None, dataset="2019-ASR", shard_size=100, params=None) -> list:
    """Manifest rows of the default dataset: every CoRE MOF structure in package order, `shard_size` per shard.

    Membership and parameters only (bytes, sha256 and url blank until someone builds and publishes the files).
    Written to `path` when given.
    """
    params = params or GridParams()
    label = f"coremof:{dataset}"
    rows = [_manifest_row(shard, members, label, params)
            for shard, members in _shard_plan(coremof_names(dataset), shard_size)]
    if path is not None:
        write_manifest(path, rows)
    return rows


def _voxelize_chunk(chunk, params, device, failures) -> dict:
    """name -> grid for a list of (name, atoms) voxelized together; if the batch fails it is redone one by
    one, so only the structure at fault is lost (recorded in `failures`): one odd structure must not stop 12,000."""
    try:
        return dict(zip([n for n, _ in chunk], voxelize_many([a for _, a in chunk], device=device,
                                                             params=params)))
    except Exception as e:
        if len(chunk) == 1:
            failures.append((chunk[0][0], f"{type(e).__name__}: {e}"))
            return {}
        return {k: v for item in chunk for k, v in _voxelize_chunk([item], params, device, failures).items()}


def _build_shard(path, members, label, params, table, device=None, progress=True) -> dict:
    """Voxelize `members` into one shard file; a structure that fails is recorded in the footer and skipped."""
    failures, grids, props = [], {}, {}
    structures = iter_source(label, members, failures)
    device = usable_device(device)
    per_call = 16 if device.type == "cuda" else 1          # a GPU wants many structures in one batch
    with tqdm(total=len(members), desc=path.name, leave=False, disable=not progress) as bar:
        while chunk := list(itertools.islice(structures, per_call)):
            atoms_by_name = dict(chunk)
            for name, grid_K in _voxelize_chunk(chunk, params, device, failures).items():
                props[name] = list(structure_properties(atoms_by_name[name], grid_K, params, device, name).values())
                atom_channels = [density_channels(atoms_by_name[name], params.size, params.spacing_A,
                                                  params.density_sigma_A, params.density_classes)
                                 ] if params.density_classes else []
                grids[name] = np.concatenate([grid_K[None]] + atom_channels).astype(np.float16)
            bar.update(len(chunk))
    reported = {n for n, _ in failures}
    failures += [(n, "not found in the source") for n in members if n not in grids and n not in reported]
    names = [n for n in members if n in grids]  # the member order, whatever order the source yielded
    columns = list(PROPERTY_COLUMNS)
    if table is not None:
        columns += [str(c) for c in table.columns]
        for n in names:
            props[n] += table.loc[n].tolist() if n in table.index else [None] * len(table.columns)
    size = params.size
    meta = {"source": label, "params": params.to_dict(), "channels": params.channels, "members": list(members),
            "names": names,
            "failures": [list(f) for f in failures],
            "properties": {"columns": columns, "rows": [[_json_value(v) for v in props[n]] for n in names],
                           "settings": {"cell_spacing_A": CELL_SPACING_A, "temperature_K": params.temperature_K,
                                        "void_fraction_He_spacing_A": VOID_FRACTION_SPACING_A,
                                        "void_fraction_He_temperature_K": VOID_FRACTION_T_K}}}
    stacked = (np.stack([grids[n] for n in names]) if names
               else np.zeros((0, len(params.channels), size, size, size)))
    write_shard(path, stacked, meta)
    return meta


def usable_device(device=None) -> torch.device:
    """torch.device for `device` (None: cuda if available, else cpu), or ValueError saying why it cannot run here
    (not a device name, no CUDA/MPS on this machine, no such GPU index), before any work starts."""
    try:
        dev = _default_device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r}: not a torch device name ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {device!r}: mofkit runs on cpu, cuda or mps")
    return dev


def _reuse_shard_or_delete(path, members, params):
    """The footer of a finished shard at `path` for exactly these members and params, else None. DELETES a file
    that is broken (truncated, altered, failed its checksum) or holds no grid, so it gets rebuilt; RAISES
    ShardError for an intact shard of other structures or parameters, which is never overwritten."""
    if not path.exists():
        return None
    try:
        meta = verify_shard(path)
    except ShardError as e:
        warnings.warn(f"{e} -- deleting it and building it again")
        path.unlink()
        return None
    if not _holds(meta, members, params.hash):
        raise ShardError(f"{path} holds other structures or voxelizer parameters than requested: build into "
                         f"another folder, or delete it")
    if members and not meta["names"]:  # a failed build (wrong device, missing files): never counted as done
        warnings.warn(f"{path}: holds 0 of its {len(members)} grids -- deleting it and building it again")
        path.unlink()
        return None
    return meta


def _build(plan, out_dir, label, params, device, progress, deadline=math.inf) -> list:
    """Build the unfinished shards of `plan` in out_dir; record each in out_dir's data_manifest.csv and
    failures.csv as soon as it exists, so an interrupted run loses at most the shard in progress.
    Stops before the next shard once time.monotonic() passes `deadline`."""
    table = _source_table(label)
    rows = []
    for shard, members in tqdm(plan, desc=f"shards in {out_dir}", disable=not progress):
        if time.monotonic() >= deadline:
            break
        path = out_dir / shard
        meta = _reuse_shard_or_delete(path, members, params) or _build_shard(path, members, label, params, table,
                                                                              device, progress)
        rows.append(_manifest_row(shard, members, label, params, path=path))
        _merge_manifest(out_dir / "data_manifest.csv", [rows[-1]])
        _merge_csv(out_dir / "failures.csv", FAILURE_COLUMNS,
                   [{"shard": shard, "name": n, "reason": r} for n, r in meta["failures"]], {shard})
    return rows


def build_summary(rows, out_dir) -> str:
    """One line for the end of a build: shards, grids, structures that failed, where the failures are listed."""
    grids = sum(int(r["n_grids"] or 0) for r in rows)
    failed = sum(int(r["n_members"]) for r in rows) - grids
    return (f"{len(rows)} shards, {grids} grids, {failed} failed structures in {out_dir}"
            + (f" (reasons: {Path(out_dir) / 'failures.csv'})" if failed else ""))


def build_shards(out_dir, source=None, *, params=None, shard_size=100, names=None, limit=None, device=None,
                 progress=True, max_minutes=None) -> list:
    """Voxelize a source into shard files shard_00000.npy, shard_00001.npy, ... in out_dir; resumable.

    source: None (CoRE MOF 2019-ASR), 'coremof:<dataset>', or a folder of .cif files (any case, name = file stem).
    params: GridParams (voxelizer settings, property temperature). names/limit (>= 1) pick the structures.
    Shard k holds the members names[k*shard_size:(k+1)*shard_size] -- membership comes from the name list, not
    from which structures succeed -- so a rerun skips finished shards (a shard with no grid is never finished:
    it is built again). A structure that fails is listed in out_dir/failures.csv and its shard holds one grid
    fewer. Each shard stores per structure PROPERTY_COLUMNS (the whole crystal's K_H, Q_st and He void fraction,
    and the stored window's) and the source's table. The device is checked before any work.
    Returns the manifest rows, also merged into out_dir/data_manifest.csv (url blank, ready to publish); with
    progress, ends with the one-line `build_summary`.
    `max_minutes` starts no new shard after that much time (for fixed-length sessions): fewer rows come back
    than planned, and the next call continues.
    """
    params = params or GridParams()
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ValueError(f"limit={limit!r}: must be a whole number >= 1 (or None for every structure)")
    device = usable_device(device)
    label = _source_label(source)
    names = list(source_names(label) if names is None else names)[:limit]
    if not names:
        raise ValueError(f"{label}: no structures to build")
    deadline = time.monotonic() + 60 * max_minutes if max_minutes is not None else math.inf
    rows = _build(_shard_plan(names, shard_size), Path(out_dir), label, params, device, progress, deadline)
    if progress:
        print(build_summary(rows, out_dir))
    return rows


def _verified(path, row, local_row) -> bool:
    """Is `path` an intact shard (its own checksums) with the row's members and params, and, where a sha256 is
    recorded, byte-identical to the published shard of `row` or to the one this machine built or fetched
    (local_row, from dest_dir/data_manifest.csv)?"""
    try:
        meta = verify_shard(path)
    except ShardError:
        return False
    if not _holds(meta, _members(row), row["params_hash"]):
        return False
    same = [r for r in (row, local_row) if r and r["members"] == row["members"]
            and r["params_hash"] == row["params_hash"]]
    known = {r["sha256"] for r in same if r["sha256"]}
    return not known or sha256_file(path) in known


def ensure_shards(manifest_csv, dest_dir, build_missing=True, device=None, progress=True) -> list:
    """Make every shard of a manifest present and verified in dest_dir; return the paths in manifest order.

    Per row: a present file is used if it verifies (its own checksums, and the manifest's sha256 where one is
    recorded, or dest_dir/data_manifest.csv's for a shard this machine built); otherwise it is deleted, never used.
    A missing shard is downloaded from the row's url (sha256-verified, see `download`, and then self-verified, so
    an error page saved under the shard's name is caught); if there is no url or the download fails (e.g. Google
    Drive's daily quota), it is built locally from the row's source, members and parameters (build_missing=True).
    A local build that yields no grid (e.g. the CIF folder is gone) is an error, never a success.
    """
    dest_dir = Path(dest_dir)
    if dest_dir.exists() and not dest_dir.is_dir():
        raise ShardError(f"{dest_dir}: is a file, not a folder for shards")
    local_csv = dest_dir / "data_manifest.csv"
    local = {r["file"]: r for r in read_manifest(local_csv)} if local_csv.exists() else {}
    paths, built = [], []
    for row in tqdm(read_manifest(manifest_csv), desc="checking shards", disable=not progress):
        shard, path = row["file"], dest_dir / row["file"]
        params, members = GridParams(**json.loads(row["params"])), _members(row)
        if path.exists() and not _verified(path, row, local.get(shard)):
            warnings.warn(f"shard {shard}: {path} does not match its manifest row (corrupted or truncated): "
                          f"deleted it, fetching it again")
            path.unlink()
        if not path.exists() and row["url"]:
            try:
                download(row["url"], path, sha256=row["sha256"] or None, progress=progress)
                verify_shard(path)
                _merge_manifest(local_csv, [_manifest_row(shard, members, row["source"], params, path=path,
                                                          url=row["url"])])
            except (DownloadError, ShardError) as e:
                with contextlib.suppress(FileNotFoundError):
                    if isinstance(e, ShardError):
                        path.unlink()  # e.g. an HTML page served in place of the shard
                warnings.warn(f"shard {shard}: download failed: {e}" + (" Building it locally instead."
                                                                        if build_missing else ""))
        if not path.exists():
            if not build_missing:
                raise ShardError(f"shard {shard} is not in {dest_dir} and could not be downloaded: rerun "
                                 f"ensure_shards later, or with build_missing=True to build it locally")
            try:
                built += _build([(shard, members)], dest_dir, row["source"], params, usable_device(device), progress)
            except ValueError as e:  # ShardError is a ValueError: a missing source folder, an unusable device
                raise ShardError(f"shard {shard} is not in {dest_dir} and cannot be built: {e}") from e
            if not read_shard_meta(path)["names"]:
                reasons = read_shard_meta(path)["failures"][:2]
                path.unlink()
                raise ShardError(f"shard {shard}: building it locally gave 0 of its {len(members)} grids (e.g. "
                                 f"{reasons}); nothing was kept. Restore its source {row['source']} or fetch it")
        meta = read_shard_meta(path)
        if not _holds(meta, members, params.hash):
            raise ShardError(f"shard {shard}: {path} passed its checksum but holds other structures or parameters "
                             f"than its manifest row: the manifest {manifest_csv} is inconsistent, fix its row")
        paths.append(path)
    if built and progress:
        print(f"built locally: {build_summary(built, dest_dir)}")
    return paths


_COPY_CHUNK = 32768  # torch's parallel grain size: copies this small run on the calling thread


def _half_to_float(src):
    """A new float32 tensor from a float16 one, converted in chunks on the calling thread.

    A whole-grid .float() wakes torch's thread pool, which on busy cores costs far more than the copy itself
    (README, "Shard streaming").
    """
    flat, out = src.reshape(-1), torch.empty(src.numel(), dtype=torch.float32)
    for a in range(0, flat.numel(), _COPY_CHUNK):
        out[a:a + _COPY_CHUNK].copy_(flat[a:a + _COPY_CHUNK])
    return out.view(src.shape)


def _prefetch(path):
    """Ask the kernel to start reading a file into the page cache (returns at once; a no-op where unsupported).

    The next shard is read ahead while this one is decoded: cold streaming is bound by the disk (README, "Shard
    streaming").
    """
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


class ShardDataset(torch.utils.data.IterableDataset):
    """Stream grids from shard files as float32 tensors (C, D, D, D) in stored units (channel 0: kelvin).

    Each epoch visits the shards in a shuffled order and each shard's grids in a shuffled order, both seeded by
    (seed, epoch): call set_epoch(epoch) before each epoch, as with DistributedSampler. DDP ranks (from
    torch.distributed when initialised, or rank=/world_size=) get disjoint shards and equal sample counts (a
    rank's extra grids are left out of that epoch; a different set next epoch), because DDP steps in lockstep.
    DataLoader workers take whole batches of their rank's sequence in turn, so with batch_size equal to the
    DataLoader's the trainer sees the same order for any num_workers (persistent_workers=False), and
    start=k skips the first k samples of the epoch exactly, without reading them (mid-epoch resume).
    A shard is memory-mapped while it is read and released (then gc.collect(1)) before the next, whose file the
    kernel is already reading ahead: at most two shards in memory. with_index=True yields (grid, i), i a row of
    metadata().
    """

    def __init__(self, shards, seed=0, shuffle=True, transform=None, channels=None, batch_size=1, start=0,
                 rank=None, world_size=None, with_index=False):
        super().__init__()
        if isinstance(shards, (str, Path)):
            shards = sorted(Path(shards).glob("shard_*.npy"))
        self.shards = [Path(p) for p in shards]
        if not self.shards:
            raise ValueError("ShardDataset: no shard files given")
        self.counts = [read_shard_meta(p)["shape"][0] for p in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).tolist()
        self.seed, self.shuffle, self.transform, self.channels = seed, shuffle, transform, channels
        self.batch_size, self.rank, self.world_size, self.with_index = batch_size, rank, world_size, with_index
        self.epoch, self.start = 0, start

    @property
    def num_grids(self) -> int:
        """Grids in all shards (all ranks)."""
        return self.offsets[-1]

    @property
    def params(self) -> GridParams:
        """How the first shard's grids were made: .channels says what each channel is, .decode_kwargs() what
        grid_to_atoms / structure_report need to decode them. With channels=[0] of multi-channel shards (the
        energy alone) density_classes is ()."""
        params = GridParams(**read_shard_meta(self.shards[0])["params"])
        picked = np.arange(len(params.channels))[self.channels if self.channels is not None else slice(None)]
        if picked.reshape(-1).tolist() == [0]:
            return dataclasses.replace(params, density_classes=(), density_sigma_A=None)
        if picked.reshape(-1).tolist() != list(range(len(params.channels))):
            raise ValueError(f"ShardDataset channels={self.channels}: grid parameters describe every channel or "
                             f"the energy alone ([0])")
        return params

    def set_epoch(self, epoch, start=0):
        """Select the epoch's order; start=k skips its first k samples (of this rank) to resume mid-epoch."""
        self.epoch, self.start = epoch, start

    def metadata(self):
        """pandas DataFrame, one row per grid (shard order, then in-shard order): shard, index, name, properties."""
        import pandas as pd
        frames = []
        for path in self.shards:
            meta = read_shard_meta(path)
            frame = pd.DataFrame(meta["properties"]["rows"], columns=meta["properties"]["columns"])
            frame.insert(0, "name", meta["names"])
            frame.insert(0, "index", range(len(meta["names"])))
            frame.insert(0, "shard", path.name)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def _rank_world(self):
        dist = torch.distributed
        if self.world_size is not None:
            return self.rank or 0, self.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _rng(self, *key):
        return np.random.default_rng([self.seed, self.epoch, *key])

    def _plan(self):
        """[(shard index, samples taken)] of this rank for this epoch, in order."""
        rank, world = self._rank_world()
        if world > len(self.shards):
            raise ValueError(f"{len(self.shards)} shards cannot feed {world} ranks disjoint shards: make smaller shards")
        order = self._rng().permutation(len(self.shards)) if self.shuffle else np.arange(len(self.shards))
        budget = min(sum(self.counts[s] for s in order[r::world]) for r in range(world))
        plan = []
        for s in order[rank::world]:
            plan.append((int(s), min(self.counts[s], budget)))
            budget -= plan[-1][1]
        return plan

    def __len__(self):
        """Samples this rank yields this epoch (after start)."""
        return max(sum(take for _, take in self._plan()) - self.start, 0)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        plan = [(s, take) for s, take in self._plan() if take]
        begin = 0  # position of this shard's first sample in the rank's sequence for the epoch
        for i, (s, take) in enumerate(plan):
            # position p >= start goes to worker ((p - start) // batch_size) % workers
            mine = [p - begin for p in range(max(self.start, begin), begin + take)
                    if (p - self.start) // self.batch_size % workers == worker]
            begin += take
            if not mine:
                continue  # skipped without opening the file
            order = self._rng(s).permutation(self.counts[s])[:take] if self.shuffle else np.arange(take)
            if i + 1 < len(plan):
                _prefetch(self.shards[plan[i + 1][0]])
            grids, _ = open_shard(self.shards[s])
            for j in mine:
                k = int(order[j])
                x = _half_to_float(torch.from_numpy(grids[k] if self.channels is None else grids[k][self.channels]))
                x = self.transform(x) if self.transform is not None else x
                yield (x, self.offsets[s] + k) if self.with_index else x
            del grids
            # Between shards only, and the young generations only: they hold what reading one shard created; a
            # full collection walks every object in the process, ~100x longer with torch loaded (README).
            gc.collect(1)



# =============================================================================
# 6. Models: the study's 3D GAN (after Wu et al. 2016)
# =============================================================================

# The study's network (after Wu et al. 2016): a latent vector is projected by a Linear layer to a 4^3 x `channels`
# volume and doubled in size by k4 s2 p1 transposed convolutions, halving the channels each time; the discriminator
# mirrors it and ends in a Linear head. Convolutions carry no bias (BatchNorm follows them). The study ends both
# nets in a Sigmoid; here the generator's last activation follows the input transform (Sigmoid for "wells", Tanh for
# "signed") and the discriminator's Sigmoid is optional (`sigmoid=`). At dim 64, latent 200, 512 channels this is
# exactly the study's model summary: 17,601,408 generator and 11,048,833 discriminator parameters. The layer layout
# is the one those counts pin down: the projection has a bias and no BatchNorm (a ReLU follows it), the last
# transposed convolution has no BatchNorm, and every discriminator convolution (the first too) does.

def _widths(dim, channels, name="channels"):
    """Feature channels from the 4^3 bottleneck outwards: channels, channels/2, ... (one per resolution step)."""
    steps = round(math.log2(dim / 4)) if dim >= 8 else 0
    if steps < 1 or 4 * 2 ** steps != dim:
        raise ValueError(f"dim={dim}: grid size must be 4 * 2^n with n >= 1 (8, 16, 32, 64, 128, ...)")
    if channels % 2 ** (steps - 1):
        raise ValueError(f"{name}={channels}: must be divisible by {2 ** (steps - 1)} for dim={dim}")
    return [channels >> i for i in range(steps)]


class Generator(torch.nn.Module):
    """z (N, latent) -> grids (N, out_channels, dim, dim, dim) in GAN space (see `to_gan_input`): a Sigmoid
    output in [0, 1] for the study's "wells" transform, Tanh in [-1, 1] for "signed".

    Density channels (all but channel 0): density_head="channels" gives each its own output; "occupancy" makes
    them sigmoid(o) * exp(l_c - max_c l_c) from one occupancy output o and per-class logits l_c, so that, as in
    `density_channels`, the largest class equals the occupancy; density_blur low-passes o (or every channel).
    "atoms" draws the channels as `density_channels` draws atoms, a max of Gaussians sigma_voxels wide
    (`gaussian_dilate`), one on every site, as tall in class c as the site's presence
    sigmoid(o + ATOM_PRIOR_LOGIT) times its share exp(l_c - max_c l_c): every peak has an atom's shape and lies
    in its own classes, so what is left to learn is where atoms are and of what. The sites are the voxel
    centres (subvoxels=1) or, with subvoxels=2, those and the points halfway between them (one presence output
    per site of a voxel, 2^3): an atom between two voxels, as most real ones are, can then be drawn as one.
    density_upsample="resize" computes the density outputs from the last features upsampled and two 3^3
    convolutions instead of the last transposed convolution, which then draws the energy alone.
    atom_offsets=True (the "atoms" head, voxel-centred sites) adds three outputs per site, its atom's shift
    0.5 tanh(.) voxel along each axis (`gaussian_dilate`'s offsets): an atom may then lie anywhere, not only where
    the output layer's sub-lattices put it (README, "Generated atoms").
    """

    def __init__(self, dim=64, latent=200, channels=512, out_channels=1, transform="wells", density_blur=False,
                 density_head="channels", sigma_voxels=0.0, subvoxels=1, density_upsample="transposed",
                 atom_offsets=False):
        super().__init__()
        nn = torch.nn
        widths = _widths(dim, channels)
        self.dim, self.latent, self.channels, self.out_channels = dim, latent, channels, out_channels
        self.transform = _check_transform(transform)
        self.density_blur, self.density_head = density_blur, _check_density_head(density_head)
        self.sigma_voxels = _check_atoms_head(density_head, sigma_voxels, density_blur)
        if subvoxels not in (1, 2):
            raise ValueError(f"subvoxels={subvoxels!r}: expected 1 or 2 presence sites per voxel edge")
        self.subvoxels = subvoxels if density_head == "atoms" else 1
        if density_upsample not in DENSITY_UPSAMPLES:
            raise ValueError(f"density_upsample={density_upsample!r}: use one of {DENSITY_UPSAMPLES}")
        self.density_upsample = density_upsample if out_channels > 1 else "transposed"
        self.atom_offsets = _check_atom_offsets(atom_offsets, density_head, self.subvoxels)
        # outputs beyond the grid channels: the occupancy, or one presence per site of a voxel (and its shifts)
        extra = 0 if density_head == "channels" or out_channels == 1 else self.subvoxels ** 3 + 3 * self.atom_offsets
        density_outputs = out_channels - 1 + extra
        self.project = nn.Linear(latent, channels * 4 ** 3)
        layers = []
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose3d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm3d(c_out),
                       nn.ReLU(inplace=True)]
        resize = self.density_upsample == "resize"
        layers += [nn.ConvTranspose3d(widths[-1], 1 if resize else 1 + density_outputs, 4, 2, 1, bias=False),
                   nn.Sigmoid() if transform == "wells" else nn.Tanh()]
        self.net = nn.Sequential(*layers)
        # "resize": the density outputs from the last features upsampled (trilinear) and two 3^3 convolutions at
        # full resolution, not from the stride-2 transposed convolution, whose 8 output sub-lattices each have
        # their own filter: the atoms head kept its atoms on them (README, "Generated atoms"), as in Odena et
        # al. 2016's checkerboard artefacts, and their fix
        self.density_net = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False),
            nn.Conv3d(widths[-1], widths[-1], 3, 1, 1), nn.ReLU(inplace=True),
            nn.Conv3d(widths[-1], density_outputs, 3, 1, 1)) if resize else None
        # torch draws a transposed convolution's initial weights with its output channels as the fan-in, so
        # every extra grid channel shrinks all output weights: with 1 + 10 channels they start sqrt(11)
        # smaller, and the generator learned none of them (README, "Generated atoms": the run and the pilots).
        # Scaled back, each channel starts as an energy-only generator's would (a no-op for one channel).
        with torch.no_grad():
            layers[-2].weight.mul_(math.sqrt(layers[-2].out_channels))

    def forward(self, z, with_presence=False):
        """Grids; with_presence=True (the "atoms" head): (grids, presence (N, 1, S, S, S) on the sites, their
        shifts (N, 3, S, S, S) in voxels or None)."""
        if with_presence and (self.density_head != "atoms" or self.out_channels == 1):
            raise ValueError("with_presence: only the 'atoms' density head has atom presences")
        features = self.net[:-2](torch.relu(self.project(z).view(-1, self.channels, 4, 4, 4)))
        x = self.net[-2](features)
        if self.density_net is not None:
            x = torch.cat([x, self.density_net(features)], 1)
        if self.out_channels == 1:
            return self.net[-1](x)
        energy, density = self.net[-1](x[:, :1]), x[:, 1:]
        if self.density_head != "channels":
            sites = self.subvoxels ** 3
            occupancy, logits = density[:, :sites], density[:, sites:]
            shifts = None
            if self.atom_offsets:  # within the site's own voxel: a shift of more would be another site's atom
                shifts, logits = 0.5 * torch.tanh(logits[:, :3]), logits[:, 3:]
            # class shares exp(l_c - max_c l_c): the largest is 1, so the largest class carries the whole occupancy,
            # as in density_channels (a max of Gaussians), and an atom's peak is not split below the decoder's threshold
            shares = torch.exp(logits - logits.amax(1, True))
            if self.density_head == "atoms":  # each atom's Gaussian in its site's classes, as density_channels
                presence = _interleave_sites(torch.sigmoid(occupancy + ATOM_PRIOR_LOGIT), self.subvoxels)
                density = gaussian_dilate(presence * _spread_to_sites(shares, self.subvoxels), self.sigma_voxels,
                                          self.subvoxels, shifts)
            else:
                density = torch.sigmoid(binomial_blur(occupancy) if self.density_blur else occupancy) * shares
            grids = torch.cat([energy, 2 * density - 1 if self.transform == "signed" else density], 1)
            return (grids, presence, shifts) if with_presence else grids
        if self.density_blur:  # before the activation: a blurred peak can still reach 1
            density = binomial_blur(density)
        return torch.cat([energy, self.net[-1](density)], 1)


DENSITY_HEADS = ("channels", "occupancy", "atoms")
DENSITY_UPSAMPLES = ("transposed", "resize")
# The "atoms" head's presence starts near 1% (RetinaNet's prior for rare objects, Lin et al. 2017): a voxel of
# a real 32^3 cube at 0.5 A holds an atom centre ~0.7% of the time, so the untrained field starts nearly empty.
ATOM_PRIOR_LOGIT = math.log(0.01 / 0.99)


def _check_density_head(head):
    if head not in DENSITY_HEADS:
        raise ValueError(f"density_head={head!r}: use one of {DENSITY_HEADS}")
    return head


def _check_atom_offsets(atom_offsets, head, subvoxels):
    if atom_offsets and (head != "atoms" or subvoxels != 1):
        raise ValueError(f"atom_offsets=True shifts the 'atoms' head's voxel-centred sites: it needs "
                         f"density_head='atoms' and atom_subvoxels=1, got {head!r} and {subvoxels}")
    return bool(atom_offsets)


def _check_atoms_head(head, sigma_voxels, density_blur):
    """sigma_voxels for the "atoms" head (the data's density_sigma_A / spacing_A), 0.0 for the others."""
    if head != "atoms":
        return 0.0
    if not (math.isfinite(sigma_voxels) and sigma_voxels > 0):
        raise ValueError(f"density_head='atoms' draws Gaussians sigma_voxels wide: give the data's "
                         f"density_sigma_A / spacing_A (> 0), got {sigma_voxels!r}")
    if density_blur:
        raise ValueError("density_head='atoms' draws smooth Gaussians itself: density_blur must be off")
    return float(sigma_voxels)


# Closer than any bond: the shortest in MOFs is O-H, 0.96 A; 1.8 voxels is 0.9 A at the atoms scale's 0.5 A.
CLASH_VOXELS = 1.8


def clash_pairs(presence, sub=1, shifts=None, reach_voxels=CLASH_VOXELS):
    """Pairs of atoms closer than reach_voxels per grid, expected: the sum over every such pair of sites of the
    product of their presences (N, 1, S, S, S) on sites 1/sub voxel apart, averaged over the batch. Each
    unordered pair counts once; 0 exactly when no two atoms of nonzero presence are that close.

    shifts (N, 3, S, S, S), sub=1: the atoms lie that many voxels past their sites (`Generator`'s atom_offsets),
    and a pair at distance d counts sigmoid((reach^2 - d^2) / (2 reach CLASH_SOFTNESS_VOXELS)) times its presences:
    a step smoothed (in d^2, which has a gradient at d = 0), so that the shifts of a pair near the limit learn to
    move it apart. Only sites at most floor(reach) + 1 apart along every axis pair up: shifts of 0.5 voxel bring no
    others that near."""
    if shifts is not None:
        return _clash_pairs_shifted(presence, shifts, reach_voxels)
    reach, n = reach_voxels * sub, presence.shape[-1]
    total = presence.new_zeros(())
    for o in itertools.product(range(-math.floor(reach), math.floor(reach) + 1), repeat=3):
        if o <= (0, 0, 0) or sum(c * c for c in o) > reach * reach:
            continue  # o and -o are one pair
        here, there = _offset_slices(o, n)
        total = total + (presence[(..., *here)] * presence[(..., *there)]).sum()
    return total / presence.shape[0]


def _offset_slices(offset, size):
    """(here, there): slices of the last len(offset) axes (each `size` long) such that x[..., *there] is x at
    here + offset, for every point whose partner lies inside the grid."""
    return (tuple(slice(max(0, -c), size - max(0, c)) for c in offset),
            tuple(slice(max(0, c), size + min(0, c)) for c in offset))


CLASH_SOFTNESS_VOXELS = 0.05  # at reach 1.8, a pair 2 voxels apart (1.0 A, as C-H) counts 0.015


def _clash_pairs_shifted(presence, shifts, reach):
    n, far = presence.shape[-1], math.floor(reach) + 1  # two shifts bring sites at most 1 voxel nearer
    total = presence.new_zeros(())
    for o in itertools.product(range(-far, far + 1), repeat=3):
        if o <= (0, 0, 0):
            continue
        here, there = _offset_slices(o, n)
        step = shifts[(..., *there)] - shifts[(..., *here)] + shifts.new_tensor(o).view(1, 3, 1, 1, 1)
        near = torch.sigmoid((reach ** 2 - step.square().sum(1, keepdim=True)) / (2 * reach * CLASH_SOFTNESS_VOXELS))
        total = total + (presence[(..., *here)] * presence[(..., *there)] * near).sum()
    return total / presence.shape[0]


# The pair-count term's radii: from under the shortest bond (O-H 0.96 A) through bond lengths to second neighbours
PAIR_RADII_A = (0.7, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.8, 2.0, 2.2, 2.5)
PAIR_SITES = 768                 # candidate atoms per grid: 3.5x the ~215 of a real 16 A cube at the atoms scale
PAIR_SOFTNESS_VOXELS = 0.1       # a pair 0.05 voxel inside a radius counts 0.62 of a pair, 0.2 voxel inside 0.88
PAIR_ATOMS_WEIGHT = 5.0          # the atom count's weight beside the pair counts' (README, "Generated atoms")
COUNTED_TERMS = ("pair_count_weight", "bond_weight", "class_count_weight", "crowd_weight")  # on decoded atoms


def _counted_sites(presence, shifts, density, threshold, sites):
    """The candidate atoms of each grid, as the decoder finds them: per grid (positions (K, 3) in voxels, indicator
    (K,) 1 at an atom, 0 elsewhere, with the presence's gradient (straight-through), site index (K,)), K = `sites`
    candidates: the peaks of `peak_voxels` first, then the most present of the rest."""
    n, size = presence.shape[0], presence.shape[-1]
    p = presence.reshape(n, -1)
    s = shifts.reshape(n, 3, -1).transpose(1, 2) if shifts is not None else p.new_zeros(n, p.shape[1], 3)
    peak = peak_voxels(density.detach(), threshold).any(1).reshape(n, -1).to(p.dtype)
    is_atom = peak + p - p.detach()
    top = (2 * peak + p.detach()).topk(min(sites, p.shape[1]), 1).indices
    axis = torch.arange(size, dtype=p.dtype, device=p.device)
    centres = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij")).reshape(3, -1).T
    return [(centres[top[b]] + s[b, top[b]], is_atom[b, top[b]], top[b]) for b in range(n)]


def atom_pair_counts(presence, shifts, density, threshold, radii_voxels, sites=PAIR_SITES):
    """The atoms the "atoms" head draws, counted as the decoder finds them, and their pairs: (atoms (N,), pairs
    closer than each radius (N, R)) for presences (N, 1, S, S, S) on voxel centres, shifts (N, 3, S, S, S) in voxels
    (or None) and the density channels they draw (N, C, S, S, S) in [0, 1].

    A site holds an atom when its voxel is a peak of a density channel above `threshold` (`peak_voxels`, the
    decoder's rule): that decides the count, while its gradient is the presence's (straight-through, Bengio et al.
    2013), so G learns to raise or drop sites. Of each grid, `sites` sites are candidates (pairs cost sites^2): the
    peaks first, then the most present of the rest (whose presences the count then pulls up). A pair at distance d
    counts sigmoid((r^2 - d^2) / (2 r PAIR_SOFTNESS_VOXELS)) times both atoms' indicators: smoothed, so shifts
    learn."""
    radii = torch.as_tensor(radii_voxels, dtype=presence.dtype, device=presence.device).view(-1, 1, 1)
    atoms, pairs = [], []
    for at, w, _ in _counted_sites(presence, shifts, density, threshold, sites):
        d2 = (at[:, None] - at[None]).square().sum(-1)
        near = torch.sigmoid((radii ** 2 - d2) / (2 * radii * PAIR_SOFTNESS_VOXELS))
        pairs.append((near * torch.triu(w[:, None] * w[None], 1)).sum((1, 2)))
        atoms.append(w.sum())
    return torch.stack(atoms), torch.stack(pairs)


def atom_class_counts(presence, shifts, density, threshold, sites=PAIR_SITES):
    """The atoms of each density class (N, C), counted as `atom_pair_counts` counts them, an atom's class its
    site's largest density channel. The count is exact; its gradient goes to the presences (straight-through, as
    there) and, for an atom, to its site's density values: a class short of atoms raises its channel there, one
    with too many lowers it, so that atoms change class."""
    n, classes = density.shape[:2]
    values = density.reshape(n, classes, -1)
    counts = []
    for b, (_, w, site) in enumerate(_counted_sites(presence, shifts, density, threshold, sites)):
        v = values[b][:, site].T  # (K, C)
        one_hot = torch.nn.functional.one_hot(v.detach().argmax(1), classes).to(w.dtype)
        counts.append((w[:, None] * one_hot + w.detach()[:, None] * (v - v.detach())).sum(0))
    return torch.stack(counts)


def real_class_counts(structures, classes) -> list:
    """The class-count term's reference: the mean number of atoms of each density class in decoded real cubes."""
    classes = check_density_classes(classes)
    counts = [np.bincount([classes.index(element_class(x, classes)) for x in s.get_chemical_symbols()],
                          minlength=len(classes)) for s in structures]
    return np.mean(counts, 0).tolist()


def class_count_loss(counts, reference):
    """How far generated atoms per class (`atom_class_counts`) are from `real_class_counts`: the squared difference
    of log(1 + count) of the batch means, averaged over classes."""
    return (torch.log1p(counts.mean(0)) - torch.log1p(counts.new_tensor(reference))).square().mean()


BOND_MULT = 1.2      # a bond: closer than this x the sum of covalent radii (Zn-O at 2.0 A, radii 1.22 + 0.66, counts)
CROWD_MULT = 0.8     # crowded: closer than this x that sum (X-ray C-H, 0.93 A, is 0.87x; README "Generated atoms")
REPORT_EDGE_A = 3.0  # atoms this far inside the cube's faces have all their neighbours in it


def bond_voxels(classes, spacing_A, bond_mult=BOND_MULT):
    """(C, C) float64 tensor: the longest bond between atoms of two density classes, in voxels, as
    `structure_report` counts one: bond_mult x the sum of the covalent radii of the elements written for them."""
    from ase.data import atomic_numbers, covalent_radii
    radii = [covalent_radii[atomic_numbers[class_symbol(c, classes)]] for c in check_density_classes(classes)]
    r = torch.tensor(radii, dtype=torch.float64)
    return bond_mult * (r[:, None] + r[None]) / spacing_A


BOND_REACH_VOXELS = 0.5  # the bond term's gradient: sigmoid((b^2 - d^2) / (2 b reach)), felt ~2 reaches past b


def unbonded_atoms(presence, shifts, density, threshold, bonds_voxels, edge_voxels, sites=PAIR_SITES):
    """The share of a grid's atoms with no bonded neighbour (N,), as `structure_report` counts it: atoms (as
    `atom_pair_counts` finds them) at least edge_voxels inside every face, whose class is their site's largest
    density channel; a neighbour j of i counts if closer than b = bonds_voxels[class i, class j] (`bond_voxels`),
    times its indicator, and i is unbonded by max(0, 1 - that sum). The count is exact; its gradient is that of
    sigmoid((b^2 - d^2) / (2 b BOND_REACH_VOXELS)) (straight-through), so a lonely atom pulls in would-be
    neighbours up to ~1 voxel beyond a bond, or is dropped, or raises a site near it."""
    shares = []
    for neighbours, atom, w in _neighbours(presence, shifts, density, threshold, bonds_voxels, edge_voxels, sites):
        lonely = atom * w * torch.relu(1 - neighbours)  # atoms only: a site that is none is not lonely
        shares.append(lonely.sum() / atom.sum().clamp(min=1))
    return torch.stack(shares)


def crowded_atoms(presence, shifts, density, threshold, close_voxels, edge_voxels, sites=PAIR_SITES, share=True):
    """The share of a grid's inner atoms with a neighbour closer than close_voxels[class i, class j] (N,)
    (`bond_voxels` with CROWD_MULT), as `structure_report`'s crowded_fraction counts it; atoms, classes and the
    straight-through gradient as `unbonded_atoms`', on crowded atoms only: a crowded atom is dropped or its
    neighbours pushed away, while a pair just past its limit (X-ray C-H, 0.93 A) is left where it is.
    share=False: their number instead."""
    counts = []
    for neighbours, atom, w in _neighbours(presence, shifts, density, threshold, close_voxels, edge_voxels, sites):
        crowded = (neighbours.detach() > 0).to(neighbours.dtype)
        near = crowded + crowded * (neighbours - neighbours.detach())
        count = (atom * w * near).sum()
        counts.append(count / atom.sum().clamp(min=1) if share else count)
    return torch.stack(counts)


def _neighbours(presence, shifts, density, threshold, limits_voxels, edge_voxels, sites):
    """Per grid (neighbours (K,): how many atoms lie closer to each candidate than limits_voxels[its class, theirs],
    exact, with the gradient of sigmoid((b^2 - d^2) / (2 b BOND_REACH_VOXELS)); atom (K,): 1 at an atom at least
    edge_voxels inside every face, no gradient; w: the candidates' indicators (`_counted_sites`))."""
    n, size = presence.shape[0], presence.shape[-1]
    kind = density.detach().reshape(n, density.shape[1], -1).argmax(1)
    limits = limits_voxels.to(presence)
    for b, (at, w, site) in enumerate(_counted_sites(presence, shifts, density, threshold, sites)):
        c = kind[b, site]
        limit = limits[c[:, None], c[None]]
        d2 = (at[:, None] - at[None]).square().sum(-1)
        soft = torch.sigmoid((limit ** 2 - d2) / (2 * limit * BOND_REACH_VOXELS))
        near = (d2 < limit ** 2).to(w.dtype) + soft - soft.detach()
        inner = ((at.detach() >= edge_voxels) & (at.detach() <= size - edge_voxels)).all(1).to(w.dtype)
        yield (near * w[None]).sum(1) - near.diagonal() * w, inner * w.detach(), w  # not itself


def real_pair_counts(structures, radii_A=PAIR_RADII_A) -> dict:
    """The reference of the pair-count term: the mean atom count of decoded real cubes (ase.Atoms), the mean
    count of their uncrowded atoms (no neighbour closer than CROWD_MULT x the sum of covalent radii, anywhere in
    the cube) and their mean number of atom pairs closer than each radius (float64)."""
    atoms, uncrowded, pairs = [], [], []
    for s in structures:
        d = s.get_all_distances()[np.triu_indices(len(s), 1)] if len(s) > 1 else np.zeros(0)
        atoms.append(len(s))
        uncrowded.append(int((~_crowded(s, CROWD_MULT)).sum()))
        pairs.append([(d < r).sum() for r in radii_A])
    return {"radii_A": list(map(float, radii_A)), "atoms": float(np.mean(atoms)),
            "uncrowded_atoms": float(np.mean(uncrowded)), "pairs": np.mean(pairs, 0).tolist(),
            "structures": len(atoms)}


def _crowded(atoms, crowd_mult):
    """Bool (N,): the atoms of a decoded cube (ase.Atoms) with a neighbour closer than crowd_mult x the sum of
    their covalent radii (ase natural_cutoffs), the cube not periodic."""
    from ase.neighborlist import natural_cutoffs, neighbor_list
    cube = atoms.copy()
    cube.pbc = False
    crowded = np.zeros(len(atoms), bool)
    crowded[neighbor_list("i", cube, natural_cutoffs(cube, mult=crowd_mult))] = True
    return crowded


def pair_count_loss(atoms, pairs, reference, atoms_weight=PAIR_ATOMS_WEIGHT, uncrowded=False):
    """How far generated atom and pair counts (`atom_pair_counts`) are from `real_pair_counts`' reference: the
    squared difference of log(1 + count), pair counts averaged over radii, plus atoms_weight times the atom
    count's, on the batch means. It tells G how many atoms to draw and how many neighbours each has at every
    distance: bonds, not contacts (README, "Generated atoms"). uncrowded: `atoms` counts uncrowded atoms only,
    compared with the reference's."""
    ref_pairs = pairs.new_tensor(reference["pairs"])
    ref_atoms = reference["uncrowded_atoms" if uncrowded else "atoms"]
    shape = (torch.log1p(pairs.mean(0)) - torch.log1p(ref_pairs)).square().mean()
    return shape + atoms_weight * (torch.log1p(atoms.mean()) - math.log1p(ref_atoms)) ** 2


def _spread_to_sites(x, sub):
    """(N, C, D, D, D) -> (N, C, sub*D, sub*D, sub*D): each voxel's values on each of its sites."""
    for axis in (-3, -2, -1):
        x = x.repeat_interleave(sub, axis)
    return x


def _interleave_sites(x, sub):
    """(N, sub^3, D, D, D) -> (N, 1, sub*D, sub*D, sub*D): channel (a, b, c) of voxel (i, j, k) goes to site
    (sub*i + a, sub*j + b, sub*k + c), i.e. (a, b, c) / sub voxel past the voxel's centre."""
    n, d = x.shape[0], x.shape[-1]
    x = x.reshape(n, sub, sub, sub, d, d, d).permute(0, 4, 1, 5, 2, 6, 3)
    return x.reshape(n, 1, sub * d, sub * d, sub * d)


def gaussian_dilate(x, sigma_voxels, sub=1, offsets=None):
    """max over sites y of x(y) * exp(-|v - y|^2 / 2 sigma^2) at every voxel v: x (N, C, sub*D, sub*D, sub*D)
    holds heights >= 0 at sites 1/sub voxel apart (site sub*i + a is a/sub voxel past voxel i), out (N, C, D, D, D).

    With x a one-hot at an atom's site this is `density_channels` of that atom (window: 3 sigma, a cube); with
    several, the max of their Gaussians, each as tall as its x. The Gaussian is a product over axes and every
    factor is positive, so the max over the window is three 1-D maxes in turn (a separable dilation): 2 * reach
    + 1 shifted copies per axis instead of (2 * reach + 1)^3. Sites beyond the grid count as 0.

    offsets (N, 3, D, D, D), sub=1: each site's Gaussian is centred that many voxels past it along axes -3, -2,
    -1 (|offset| <= 0.5 here: the window is cut for it). The per-axis maxes then carry the winning site's other
    offsets on: exact wherever one site wins along every line of the window, as with one atom, or atoms further
    apart than the window along each axis; elsewhere a near max (which site wins can depend on the order).
    """
    if offsets is not None:
        return _gaussian_dilate_shifted(x, sigma_voxels, offsets)
    reach = math.ceil(3 * sigma_voxels * sub)  # in sites
    for axis in (-3, -2, -1):
        n, dim = x.shape[axis], x.ndim + axis
        padded = torch.nn.functional.pad(x, [0, 0] * (-1 - axis) + [reach, reach])
        every = (slice(None),) * dim + (slice(None, None, sub),)  # the sites at voxel centres
        out = None
        for o in range(-reach, reach + 1):  # voxel i takes site sub*i + o
            term = padded.narrow(axis, reach + o, n)[every] * math.exp(-(o / sub) ** 2 / (2 * sigma_voxels ** 2))
            out = term if out is None else torch.maximum(out, term)
        x = out
    return x


def _gaussian_dilate_shifted(x, sigma_voxels, offsets):
    reach = math.ceil(3 * sigma_voxels + 0.5)
    carried = [offsets[:, a:a + 1] for a in range(3)]
    for k, axis in enumerate((-3, -2, -1)):
        n = x.shape[axis]
        pad = [0, 0] * (-1 - axis) + [reach, reach]
        padded = [torch.nn.functional.pad(t, pad) for t in [x] + carried]
        out = rest = None
        for o in range(-reach, reach + 1):  # voxel v takes site v + o, centred o + offset voxels away
            here = [t.narrow(axis, reach + o, n) for t in padded]
            term = here[0] * torch.exp(-(o + here[1]) ** 2 / (2 * sigma_voxels ** 2))
            if out is None:
                out, rest = term, here[2:]
            else:
                wins = term > out
                out, rest = torch.where(wins, term, out), [torch.where(wins, a, b) for a, b in zip(here[2:], rest)]
        x, carried = out, rest
    return x


def binomial_blur(x):
    """[1, 2, 1] / 4 along each axis of (N, C, D, D, D), each channel on its own, edges replicated.

    A k4 s2 transposed convolution overlaps its outputs unevenly, so a generator's last layer leaves a checkerboard
    (Odena et al. 2016, "Deconvolution and checkerboard artifacts"); on density channels its body-diagonal tops
    decode as pairs of atoms under 0.7 A apart. This filter's response is zero at the grid's Nyquist frequency
    (StyleGAN's low-pass after upsampling, here fixed). Measured on density channels (README, "Generated atoms"):
    it helps with Gaussians 1.5 voxels wide and fails with 1 voxel.
    """
    c = x.shape[1]
    k1 = x.new_tensor([1.0, 2.0, 1.0]) / 4
    k = (k1[:, None, None] * k1[None, :, None] * k1[None, None, :]).expand(c, 1, 3, 3, 3)
    return torch.nn.functional.conv3d(torch.nn.functional.pad(x, (1,) * 6, mode="replicate"), k, groups=c)


class Discriminator(torch.nn.Module):
    """grids (N, in_channels, dim, dim, dim) in GAN space -> D(x) in (0, 1), shape (N,); with sigmoid=False
    the raw score (the logit), as LSGAN's own discriminator (Mao et al. 2017) has no output squashing.

    norm="batch" is the study's BatchNorm after every convolution. Run on a real batch and on a generated batch
    apart (TrainConfig(d_norm="batch"), the study's step), each is normalised by its own statistics: D cannot see
    a contrast (a scale of its input about 0) shared by a whole batch, e.g. every generated peak weaker than real
    (tested). d_norm="joint" shows it both as one batch; norm="none": no normalisation, convolutions with a bias.

    patch=True adds PatchGAN's local scores (Isola et al. 2017): a 1x1x1 convolution on the second block's
    features (dim/4 per edge, each seeing 10 voxels), so that every neighbourhood of a grid is judged, not only the
    whole through the 4^3 bottleneck. The output is then (N, 1 + (dim/4)^3): column 0 the global score, the rest
    the patches'; the losses weigh the two parts equally (`discriminator_loss`).
    """

    def __init__(self, dim=64, channels=512, in_channels=1, sigmoid=True, patch=False, norm="batch"):
        super().__init__()
        self.sigmoid = sigmoid
        _check_d_norm(norm, D_NORMS[:2])
        nn = torch.nn
        widths = _widths(dim, channels)[::-1]
        self.dim, self.channels, self.in_channels = dim, channels, in_channels
        blocks = [[nn.Conv3d(c_in, c_out, 4, 2, 1, bias=norm == "none")]
                  + ([nn.BatchNorm3d(c_out)] if norm == "batch" else []) + [nn.ReLU(inplace=True)]
                  for c_in, c_out in zip([in_channels] + widths, widths)]
        self._local_layers = sum(len(b) for b in blocks[:2])  # the modules up to the patch scores
        self.features = nn.Sequential(*(m for b in blocks for m in b))
        self.head = nn.Linear(channels * 4 ** 3, 1)
        if patch and len(widths) < 2:
            raise ValueError(f"dim={dim}: patch scores need dim >= 16 (they are read at dim/4)")
        self.patch_head = nn.Conv3d(widths[1], 1, 1) if patch else None

    def forward(self, x):
        if self.patch_head is None:
            score = self.head(self.features(x).flatten(1)).squeeze(1)
        else:
            local = self.features[:self._local_layers](x)  # two blocks: dim/4 per edge
            score = torch.cat([self.head(self.features[self._local_layers:](local).flatten(1)),
                               self.patch_head(local).flatten(1)], 1)
        return torch.sigmoid(score) if self.sigmoid else score


D_NORMS = ("batch", "none", "joint")  # "joint": BatchNorm, shown real and generated grids as one batch (_gan_step)


def _check_d_norm(norm, allowed=D_NORMS):
    if norm not in allowed:
        raise ValueError(f"d_norm={norm!r}: use one of {allowed}")
    return norm


# Input transforms (kelvin -> GAN space), on channel 0; extra channels (atom densities already in [0, 1])
# pass through unchanged; the channel axis is -4 for inputs with 4 or more dimensions.
#   "wells"  (the study's): x = clip(-E, 0, E_scale) / E_scale in [0, 1]: every repulsive voxel becomes 0,
#            so the atom cores that locate the framework are invisible to both networks.
#   "signed" x = clip(-E / E_scale, -1, 1): wells as above, and repulsion up to +E_scale K kept as negative
#            values (the cores' edges), in the spirit of ZeoGAN, which keeps energies up to +5000 K scaled.
# Either way `from_gan_output` gives kelvin back, and comparisons with real grids are made on the attractive
# part (`gan_round_trip`), the only part both transforms keep.
TRANSFORMS = ("wells", "signed")


def _check_transform(transform):
    if transform not in TRANSFORMS:
        raise ValueError(f"transform={transform!r}: use one of {TRANSFORMS}")
    return transform


def _map_energy_channel(x, fn, density_fn=None):
    if x.ndim < 4 or x.shape[-4] == 1:
        return fn(x)
    cat = torch.cat if torch.is_tensor(x) else np.concatenate
    rest = x[..., 1:, :, :, :]
    return cat([fn(x[..., :1, :, :, :]), density_fn(rest) if density_fn else rest], -4)


def _check_e_scale(e_scale_K):
    if not (math.isfinite(e_scale_K) and e_scale_K > 0):
        raise ValueError(f"e_scale_K={e_scale_K}: must be a positive finite energy in kelvin")


def _float32(x):
    return x.float() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32)


def to_gan_input(grid_K, e_scale_K, transform="wells"):
    """Kelvin grid(s) -> GAN space on channel 0 (numpy or torch, float32); see TRANSFORMS above. Under
    "signed" the density channels are mapped from [0, 1] to [-1, 1] too, the generator's Tanh range."""
    _check_e_scale(e_scale_K)
    lo = {"wells": 0.0, "signed": -1.0}[_check_transform(transform)]
    return _map_energy_channel(_float32(grid_K), lambda e: (-e / e_scale_K).clip(lo, 1.0),
                               (lambda d: 2 * d - 1) if transform == "signed" else None)


def from_gan_output(x, e_scale_K, transform="wells"):
    """GAN space -> kelvin: E = -x * E_scale on channel 0 (either transform; "wells" has no repulsion to give
    back); density channels back to [0, 1]."""
    _check_e_scale(e_scale_K)
    return _map_energy_channel(_float32(x), lambda v: -v * e_scale_K,
                               (lambda d: (d + 1) / 2) if _check_transform(transform) == "signed" else None)


def gan_round_trip(grid_K, e_scale_K):
    """Kelvin grid(s) as every comparison sees them: energies clipped to [-E_scale, 0] K on channel 0.

    Real grids and generated grids (of either transform) both go through this before they are compared:
    the wells are the part every transform represents, so a comparison measures the generator, not the clip.
    """
    _check_e_scale(e_scale_K)
    return _map_energy_channel(_float32(grid_K), lambda e: e.clip(-e_scale_K, 0.0))


def pick_e_scale(grids_K, percentile=99.9, values_per_grid=65536, seed=0):
    """E_scale (K) from data: the `percentile` of -E over attractive voxels (E < 0) of channel 0.

    A high percentile keeps almost every well below saturation while one freak voxel cannot set the scale.
    Each grid contributes at most `values_per_grid` random attractive voxels, so memory stays small.
    """
    rng = np.random.default_rng(seed)
    wells = []
    for grid in grids_K:
        e = np.asarray(grid, dtype=np.float32)
        e = e[0] if e.ndim == 4 else e
        depth = -e[e < 0]
        if depth.size > values_per_grid:
            depth = rng.choice(depth, values_per_grid, replace=False)
        wells.append(depth)
    wells = np.concatenate(wells) if wells else np.empty(0, np.float32)
    if wells.size == 0:
        raise ValueError("pick_e_scale: no attractive voxel (E < 0) in the grids given")
    return float(np.percentile(wells, percentile))



# =============================================================================
# 7. Training: the kit's and the study's recipes, exact-resume checkpoints, mixed precision, DDP; sampling
# =============================================================================

# Training runs one update of D and then of G on EVERY batch (the study's script ran D over all
# shards and then G over all shards; that is not copied). Everything a run needs to continue bit-for-bit
# lives in one checkpoint, written atomically (temp + rename) so a Colab disconnect mid-write leaves the
# previous one intact. Multi-GPU: launch with torchrun; each process reads RANK / WORLD_SIZE / LOCAL_RANK.
# BatchNorm stays per-process (plain BatchNorm3d, DDP broadcast_buffers=True re-syncs running stats from
# rank 0 at every D/G forward): per-GPU batch statistics match the single-GPU recipe, and SyncBatchNorm
# would add a collective to each of the ~8 BN layers in each of the 3 forwards per step.

ARCH_FIELDS = ("dim", "channels", "generator_channels", "latent", "grid_channels", "density_head",
               "density_sigma_voxels", "atom_subvoxels", "density_upsample", "atom_offsets")
HISTORY_COLUMNS = ("step", "epoch", "loss_d", "loss_g", "d_real", "d_fake", "samples_per_s", "time_s")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not match the run; the file is left untouched."""


class TrainingDiverged(FloatingPointError):
    """A loss became NaN/Inf; nothing is saved from then on (the message says which checkpoint, if any, is kept)."""


LOSSES = ("lsgan", "hinge", "nonsat")


@dataclass
class TrainConfig:
    """One training run. Defaults are the kit's recipe, chosen by the ablation in README (benchmarks/ablation.py);
    `TrainConfig.study()` is the study's exact recipe and `TrainConfig.fast_gpu()` the kit's recipe with GPU
    speed settings. The architecture defaults are the study's (dim 64, latent 200, 512 channels).
    """
    dim: int = 64                   # grid edge in voxels (8, 16, 32, 64, 128, ...)
    channels: int = 512             # feature channels at the 4^3 bottleneck
    generator_channels: int = 0     # the generator's own, when it differs from D's (0: channels, as the study);
                                    # the generator is the cheap half on CPU (README, "Generated atoms")
    latent: int = 200
    grid_channels: int = 1          # channel 0 = energy (K); more channels = atom densities in [0, 1]
    epochs: int = 48
    batch_size: int = 8             # per process
    lr: float = 2e-4
    betas: tuple = (0.5, 0.999)
    loss: str = "hinge"             # "hinge"; "lsgan": least squares to targets 1 (real) / 0 (fake) on D's
                                    # output (the study's, with d_sigmoid); "nonsat": non-saturating logistic.
                                    # See `discriminator_loss` and `generator_loss`.
    d_sigmoid: bool = False         # the study's D ends in a Sigmoid; under least squares its gradient vanishes
                                    # once D wins and G freezes (README, "The study's recipe"). False: D's raw
                                    # score, as LSGAN's authors (Mao et al. 2017) use it.
    transform: str = "signed"       # kelvin -> GAN space on channel 0: "signed" or "wells" (the study's)
    ema: float = 0.999              # decay of the generator's exponential moving average used for sampling
                                    # (Yazici et al. 2019); 0 = sample the raw generator
    r1_gamma: float = 0.0           # weight of the zero-centred R1 penalty on D(real) (Mescheder et al. 2018)
    r1_every: int = 16              # lazy R1: applied every this many steps, scaled up to match (StyleGAN2)
    marginal_weight: float = 0.0    # weight of `marginal_w2` (generated vs real batch, per channel) in G's loss:
                                    # a voxel-level term beside the adversarial one (README, "Generated atoms")
    marginal_channels: str = "all"  # the channels it compares: "all", or "density" (1 onwards: the energy
                                    # channel's distance dwarfs a density channel's and takes the term; README)
    pair_weight: float = 0.0        # weight of `pair_w2` (generated vs real batch) in G's loss: how pairs of
                                    # voxels a contact to a bond length apart compare, on the density field
    pair_field: str = "max"         # made of the density channels by: "max" (the occupancy, as density_channels
                                    # and the decoder see atoms) or "sum" (lets G split atoms over classes; README)
    d_patch: bool = False           # D also scores each neighbourhood (PatchGAN; `Discriminator`)
    d_norm: str = "batch"           # D's normalisation: "batch" (the study's: real and generated batches apart),
                                    # "joint" (BatchNorm over both as one batch) or "none" (`Discriminator`)
    density_blur: bool = False      # the generator's density channels through `binomial_blur` (no-op for one
                                    # channel): helps at density width 1.5 voxels, fails at 1 (README,
                                    # "Generated atoms")
    density_head: str = "channels"  # "channels": one output per density class; "occupancy": one occupancy
                                    # times per-class shares whose largest is 1 (`Generator`; no-op for one
                                    # channel): measured worse (README, "Generated atoms"); "atoms": atom
                                    # presences drawn as Gaussians density_sigma_voxels wide (`Generator`)
    density_sigma_voxels: float = 0.0  # the "atoms" head's Gaussian width: the data's density_sigma_A / spacing_A
    atom_subvoxels: int = 1         # the "atoms" head's presence sites per voxel edge: 1 (voxel centres) or 2
    atom_offsets: bool = False      # the "atoms" head, voxel-centred sites: each atom also shifted within its voxel
                                    # (`Generator`)
    density_upsample: str = "transposed"  # the density outputs from the last stride-2 transposed convolution, as
                                    # the energy, or "resize": upsampled features and 3^3 convolutions (`Generator`)
    clash_voxels: float = CLASH_VOXELS  # the clash term's reach: pairs closer count (`clash_pairs`)
    clash_weight: float = 0.0       # the "atoms" head: weight of `clash_pairs` (pairs of atoms closer than any
                                    # bond) in G's loss, as AlphaFold's clash term (README, "Generated atoms")
    pair_count_weight: float = 0.0  # the "atoms" head: weight of `pair_count_loss` (G's atoms and their pairs
                                    # closer than PAIR_RADII_A, counted as the decoder finds them, against those of
                                    # real training cubes decoded when the run starts) in G's loss (README)
    pair_atoms_weight: float = PAIR_ATOMS_WEIGHT  # in that term, the atom count's weight beside the pairs'
    class_count_weight: float = 0.0 # the "atoms" head: weight of `class_count_loss` (G's atoms per class against
                                    # those of the real cubes the pair-count term decodes) (README)
    bond_weight: float = 0.0        # the "atoms" head: weight of `unbonded_atoms` (the share of G's atoms with no
                                    # bonded neighbour, as `structure_report` counts it; real cubes: ~0) (README)
    crowd_weight: float = 0.0       # the "atoms" head: weight of `crowded_atoms` (the share of G's atoms with a
                                    # neighbour closer than CROWD_MULT x the covalent radii's sum) (README)
    count_uncrowded: bool = False   # the pair-count term counts G's uncrowded atoms only (all minus
                                    # `crowded_atoms`' count, the whole cube), against real's: two sites where
                                    # real has one atom no longer pay as two (README, "Generated atoms")
    energy_hold_weight: float = 0.0 # with init_from: weight of the mean squared difference (GAN space) between G's
                                    # energy channel and init_from's for the same z: the trunk may then train for
                                    # the atoms while the energy stays init_from's (README, "Generated atoms")
    output_lr: float = 0.0          # the generator's output layer's learning rate (0: lr): its atom outputs may
                                    # then learn faster than a trunk they share with the energy
    init_from: str = ""             # a generator file (`export_generator`) that G starts from instead of random
                                    # weights: every tensor, and of the output layer the energy channel's
                                    # (`_init_generator`); read when a run starts, not when it resumes
    freeze_trunk: bool = False      # with init_from: only the density outputs train, so the energy channel stays
                                    # init_from's exactly (README, "Generated atoms")
    augment: bool = False           # train on real grids under random cube symmetries (48 rotations/reflections:
                                    # the crystal rotated); held-out grids stay as `voxelize` makes them
    e_scale_K: float | None = None  # None: the dataset's `e_scale_K`, else `pick_e_scale` on its first 64 grids
    seed: int = 0
    device: str = "auto"            # "auto": cuda:LOCAL_RANK when available, else cpu
    precision: str = "fp32"         # "fp32" | "bf16" | "fp16" (+ GradScaler) | "auto": bf16 from Ampere on,
                                    # fp16 on older GPUs (T4), fp32 on CPU
    channels_last: bool = False     # channels_last_3d memory format (faster cuDNN kernels with bf16/fp16)
    compile: bool = False           # torch.compile the models
    num_workers: int = 0            # DataLoader worker processes
    log_every: int = 10             # steps per history row (and per NaN check)
    checkpoint_every_steps: int = 1000
    checkpoint_every_min: float = 10.0

    def __post_init__(self):
        checks = {"epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1, "latent": self.latent >= 1,
                  "lr": self.lr > 0, "ema": 0 <= self.ema < 1, "r1_gamma": self.r1_gamma >= 0,
                  "marginal_weight": self.marginal_weight >= 0,
                  "pair_weight": self.pair_weight >= 0, "atom_subvoxels": self.atom_subvoxels in (1, 2),
                  "clash_weight": self.clash_weight >= 0, "clash_voxels": self.clash_voxels > 0,
                  "pair_count_weight": self.pair_count_weight >= 0, "energy_hold_weight": self.energy_hold_weight >= 0,
                  "pair_atoms_weight": self.pair_atoms_weight >= 0, "bond_weight": self.bond_weight >= 0,
                  "class_count_weight": self.class_count_weight >= 0, "crowd_weight": self.crowd_weight >= 0,
                  "output_lr": self.output_lr >= 0,
                  "r1_every": self.r1_every >= 1, "grid_channels": self.grid_channels >= 1,
                  "generator_channels": self.generator_channels >= 0,
                  "log_every": self.log_every >= 1, "checkpoint_every_steps": self.checkpoint_every_steps >= 1}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"TrainConfig: {name}={getattr(self, name)!r} is out of range")
        if self.loss not in LOSSES:
            raise ValueError(f"TrainConfig: loss={self.loss!r}: use one of {LOSSES}")
        if self.d_sigmoid and self.loss != "lsgan":
            raise ValueError(f"TrainConfig: loss={self.loss!r} needs D's raw score (d_sigmoid=False)")
        _check_transform(self.transform)
        _check_density_head(self.density_head)
        _check_atoms_head(self.density_head, self.density_sigma_voxels, self.density_blur)
        _check_atom_offsets(self.atom_offsets, self.density_head, self.atom_subvoxels)
        _check_d_norm(self.d_norm)
        if self.marginal_channels not in MARGINAL_CHANNELS:
            raise ValueError(f"TrainConfig: marginal_channels={self.marginal_channels!r}: use one of {MARGINAL_CHANNELS}")
        if self.marginal_channels == "density" and self.marginal_weight > 0 and self.grid_channels < 2:
            raise ValueError("TrainConfig: marginal_channels='density' needs density channels (grid_channels >= 2)")
        if self.clash_weight > 0 and (self.density_head != "atoms" or self.grid_channels < 2):
            raise ValueError("TrainConfig: clash_weight needs atom presences: density_head='atoms' and density "
                             "channels (grid_channels >= 2)")
        if self.count_uncrowded and self.pair_count_weight == 0:
            raise ValueError("TrainConfig: count_uncrowded counts atoms for the pair-count term: set pair_count_weight")
        for name in COUNTED_TERMS:
            if getattr(self, name) > 0 and (self.density_head != "atoms" or self.grid_channels < 2):
                raise ValueError(f"TrainConfig: {name} needs atom presences: density_head='atoms' and density "
                                 "channels (grid_channels >= 2)")
        if self.energy_hold_weight > 0 and not self.init_from:
            raise ValueError("TrainConfig: energy_hold_weight needs init_from (the generator whose energy to hold)")
        if self.freeze_trunk and not (self.init_from and self.grid_channels >= 2):
            raise ValueError("TrainConfig: freeze_trunk needs init_from (the trunk to keep) and density channels "
                             "(grid_channels >= 2: the outputs that train)")
        if self.pair_field not in PAIR_FIELDS:
            raise ValueError(f"TrainConfig: pair_field={self.pair_field!r}: use one of {PAIR_FIELDS}")
        if self.pair_weight > 0 and self.grid_channels < 2:
            raise ValueError("TrainConfig: pair_weight needs density channels (grid_channels >= 2)")
        _widths(self.dim, self.channels)
        if self.generator_channels:
            _widths(self.dim, self.generator_channels, "generator_channels")

    @classmethod
    def study(cls, **overrides):
        """The study's recipe exactly: Sigmoid D under MSE (targets 1/0), batch 2, 48 epochs, Adam 2e-4
        (0.5, 0.999), the "wells" transform, no EMA, no regulariser, no augmentation."""
        preset = dict(batch_size=2, epochs=48, loss="lsgan", d_sigmoid=True, transform="wells", ema=0.0,
                      r1_gamma=0.0, augment=False, d_norm="batch", marginal_weight=0.0,
                      pair_weight=0.0)
        return cls(**{**preset, **overrides})

    @classmethod
    def fast_gpu(cls, **overrides):
        """The kit's recipe with GPU speed settings (autocast, channels_last_3d, torch.compile, batch 64 with the
        same lr: DCGAN's own setting); any field can still be overridden."""
        preset = dict(batch_size=64, precision="auto", channels_last=True, compile=True,
                      num_workers=min(4, os.cpu_count() or 1))  # Colab: 2 vCPUs
        return cls(**{**preset, **overrides})


@dataclass
class TrainResult:
    generator: torch.nn.Module
    discriminator: torch.nn.Module
    checkpoint: Path
    history: list                   # dicts with HISTORY_COLUMNS


# --- checkpoints -------------------------------------------------------------

def _rng_state():
    """This process's python / numpy / torch / CUDA RNG states as tensors and plain containers (weights_only-safe)."""
    import random
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, key.tolist(), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state):
    import random
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_all(seed):
    import random
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# What a checkpoint holds, in the order `_checkpoint` writes it; `_restore` reads it back. Keys that the first
# checkpoints lacked are optional when reading (their absence means: no EMA, no grid parameters, one process).
CHECKPOINT_KEYS = ("config", "e_scale_K", "grid_params", "generator", "generator_ema", "discriminator", "opt_g",
                   "opt_d", "scaler", "rng", "step", "epoch", "samples_in_epoch", "time_s", "history", "world_size",
                   "config_changes", "references")
_CHECKPOINT_KEYS_ADDED_LATER = ("grid_params", "generator_ema", "world_size", "config_changes", "references")


@dataclass
class _TrainState:
    """Where a run stands: with `_Run`'s weights, optimizers and the RNG states, what a checkpoint stores."""
    e_scale_K: float
    grid_params: dict | None = None                     # the training grids' GridParams.to_dict(), if known
    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0                           # of this process, for an exact mid-epoch resume
    time_s: float = 0.0                                 # training time of the calls before this one
    history: list = field(default_factory=list)         # dicts with HISTORY_COLUMNS
    config_changes: list = field(default_factory=list)  # see _resume_from
    references: dict = field(default_factory=dict)      # what G's extra terms compare with (`_prepare_terms`)


def _checkpoint(run, state, rng_states, time_s, world) -> dict:
    """The checkpoint of a run: the one place its schema (CHECKPOINT_KEYS) is written."""
    return {"config": {**asdict(run.config), "e_scale_K": state.e_scale_K}, "e_scale_K": state.e_scale_K,
            "grid_params": state.grid_params, "generator": run.G.state_dict(),
            "generator_ema": run.G_ema.state_dict() if run.G_ema is not None else None,
            "discriminator": run.D.state_dict(), "opt_g": run.opt_g.state_dict(), "opt_d": run.opt_d.state_dict(),
            "scaler": run.scaler.state_dict(), "rng": rng_states, "step": state.step, "epoch": state.epoch,
            "samples_in_epoch": state.samples_in_epoch, "time_s": time_s, "history": state.history,
            "world_size": world, "config_changes": state.config_changes, "references": state.references}


def _restore(run, ckpt, rank) -> _TrainState:
    """Load a checkpoint (from `_resume_from`) into `run` and this process's RNGs; return where the run stands."""
    try:
        run.G.load_state_dict(ckpt["generator"])
        run.D.load_state_dict(ckpt["discriminator"])
        run.opt_g.load_state_dict(ckpt["opt_g"])
        run.opt_d.load_state_dict(ckpt["opt_d"])
        run.scaler.load_state_dict(ckpt["scaler"])
        if run.G_ema is not None:
            run.G_ema.load_state_dict(ckpt.get("generator_ema") or ckpt["generator"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt['path']}: does not fit this model/optimizer ({e})") from e
    if rank < len(ckpt["rng"]):
        _set_rng_state(ckpt["rng"][rank])
    else:  # more processes than when saved: exact continuation is impossible anyway
        _seed_all(run.config.seed + rank + 7919 * ckpt["step"])
    return _TrainState(ckpt["e_scale_K"], ckpt.get("grid_params"), ckpt["step"], ckpt["epoch"],
                       ckpt["samples_in_epoch"], ckpt["time_s"], list(ckpt["history"]), ckpt["config_changes"],
                       dict(ckpt.get("references") or {}))


def _save(run, state, meter, path, rank, world):
    """Write the checkpoint atomically (rank 0; every rank's RNG states gathered into it); note it in the meter."""
    rng_states = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(rng_states, _rng_state())
    else:
        rng_states = [_rng_state()]
    if rank == 0:
        with atomic_write(path) as f:
            torch.save(_checkpoint(run, state, rng_states, state.time_s + time.perf_counter() - meter.started,
                                   world), f)
    meter.saved_step, meter.saved = state.step, time.monotonic()


def load_checkpoint(path, map_location="cpu"):
    """Read a training checkpoint with torch.load(weights_only=True); CheckpointError names the file and why."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable mofkit checkpoint ({type(e).__name__}: {e})") from e
    required = set(CHECKPOINT_KEYS) - set(_CHECKPOINT_KEYS_ADDED_LATER)
    missing = required - set(ckpt) if isinstance(ckpt, dict) else required
    if missing:
        raise CheckpointError(f"{path}: not a mofkit GAN checkpoint (missing {sorted(missing)})")
    if not (_finite_number(ckpt["e_scale_K"]) and float(ckpt["e_scale_K"]) > 0):
        raise CheckpointError(f"{path}: e_scale_K={ckpt['e_scale_K']!r} is not a positive finite energy in kelvin "
                              f"(a corrupted or hand-edited checkpoint)")
    return ckpt


# checkpoints written before a field existed ran with the behaviour its study-preset value names (pair_field:
# the pair term's first version took the summed density)
LEGACY_CONFIG = {"batch_size": 2, "loss": "lsgan", "ema": 0.0, "transform": "wells", "d_sigmoid": True,
                 "r1_gamma": 0.0, "density_blur": False, "density_head": "channels", "generator_channels": 0,
                 "d_norm": "batch", "marginal_weight": 0.0, "marginal_channels": "all",
                 "pair_weight": 0.0, "pair_field": "sum", "density_sigma_voxels": 0.0,
                 "atom_subvoxels": 1, "clash_weight": 0.0, "clash_voxels": CLASH_VOXELS, "init_from": "",
                 "freeze_trunk": False, "density_upsample": "transposed", "atom_offsets": False}


def _config_from_checkpoint(ckpt):
    names = TrainConfig.__dataclass_fields__.keys()
    return TrainConfig(**{**LEGACY_CONFIG, **{k: v for k, v in ckpt["config"].items() if k in names}})


def _models(config):
    return (Generator(config.dim, config.latent, config.generator_channels or config.channels, config.grid_channels,
                      config.transform, config.density_blur, config.density_head, config.density_sigma_voxels,
                      config.atom_subvoxels, config.density_upsample, config.atom_offsets),
            Discriminator(config.dim, config.channels, config.grid_channels, sigmoid=config.d_sigmoid,
                          patch=config.d_patch, norm="none" if config.d_norm == "none" else "batch"))


# --- the objective -------------------------------------------------------------

def _score_parts(d):
    """A discriminator's output as its parts: (global,) for shape (N,), (global, patches) for (N, 1 + P)."""
    return (d,) if d.ndim == 1 else (d[:, 0], d[:, 1:])


def global_score(d):
    """The whole-grid score of a discriminator output, with or without patch scores (`Discriminator`)."""
    return _score_parts(d)[0]


def discriminator_loss(loss, d_real, d_fake):
    """The loss D minimises, from its outputs on real and generated batches (`loss` as in TrainConfig):
    lsgan 0.5 (mean (D(x) - 1)^2 + mean D(G(z))^2); hinge mean relu(1 - D(x)) + mean relu(1 + D(G(z)));
    nonsat mean softplus(-D(x)) + mean softplus(D(G(z))) (the logistic loss on raw scores). With patch scores
    the loss is the global score's plus the patches' (each patch a sample of the mean)."""
    return sum(_discriminator_loss(loss, r, f) for r, f in zip(_score_parts(d_real), _score_parts(d_fake)))


def _discriminator_loss(loss, d_real, d_fake):
    F = torch.nn.functional
    if loss == "lsgan":
        return 0.5 * (F.mse_loss(d_real, torch.ones_like(d_real)) + F.mse_loss(d_fake, torch.zeros_like(d_fake)))
    if loss == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    if loss == "nonsat":
        return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    raise ValueError(f"loss={loss!r}: use one of {LOSSES}")


def generator_loss(loss, d_gen):
    """The loss G minimises from D's output on its batch: lsgan mean (D(G(z)) - 1)^2; hinge -mean D(G(z));
    nonsat mean softplus(-D(G(z))) (Goodfellow et al.'s non-saturating form); with patch scores, summed as in
    `discriminator_loss`."""
    return sum(_generator_loss(loss, d) for d in _score_parts(d_gen))


def _generator_loss(loss, d_gen):
    F = torch.nn.functional
    if loss == "lsgan":
        return F.mse_loss(d_gen, torch.ones_like(d_gen))
    if loss == "hinge":
        return -d_gen.mean()
    if loss == "nonsat":
        return F.softplus(-d_gen).mean()
    raise ValueError(f"loss={loss!r}: use one of {LOSSES}")


MARGINAL_CHANNELS = ("all", "density")
MARGINAL_VOXELS = 16384  # per channel and step: sorting all of a batch of 8 at 32^3 costs more than the step


def marginal_w2(fake, real, voxels=None):
    """The squared 2-Wasserstein distance between the voxel values of two equal-shape batches (N, C, D, D, D),
    channel by channel, averaged over channels: in one dimension the optimal coupling pairs sorted values, so it
    is the mean squared difference of the sorted values (the histogram loss of texture synthesis, Risser et al.
    2017). Blind to where values sit, it tells G how many voxels should be how strong (e.g. peaks as high and as
    many as real ones), which a discriminator normalising each batch apart cannot (README, "Generated atoms").
    `voxels`: compare that many voxels per channel drawn at random (global torch RNG) instead of all."""
    if fake.shape != real.shape:
        raise ValueError(f"marginal_w2: batches of shape {tuple(fake.shape)} and {tuple(real.shape)} differ")
    return _sorted_w2(_channel_values(fake, voxels), _channel_values(real, voxels))


def _sorted_w2(a, b):
    """The squared 2-Wasserstein distance between equal-size samples of numbers along the last axis, averaged over
    the others: in one dimension the optimal coupling pairs sorted values."""
    return (a.sort(dim=-1).values - b.sort(dim=-1).values).pow(2).mean()


def _channel_values(x, voxels=None):
    """(C, M): each channel's voxel values over the batch (N, C, D, D, D), in (grid, voxel) order: all of them
    (M = N D^3), or `voxels` of those positions drawn at random, picked without copying the whole batch."""
    x = x.float().flatten(2)
    if voxels is None:
        return x.transpose(0, 1).flatten(1)
    at = torch.randint(x.shape[0] * x.shape[2], (voxels,), device=x.device)
    return x[at // x.shape[2], :, at % x.shape[2]].T


PAIR_FIELDS = ("max", "sum")
# voxel offsets, each standing for its images under the cube's symmetries: at 0.5 A spacing 0.5-1.5 A, from the
# split tops of one blob (contacts < 0.7 A) to the bond lengths of organic linkers (1.0-1.5 A)
PAIR_OFFSETS = ((1, 0, 0), (1, 1, 0), (1, 1, 1), (2, 0, 0), (2, 1, 0), (2, 1, 1), (2, 2, 0), (3, 0, 0))


def pair_w2(fake, real, voxels=None):
    """How the arrangement of two equal-shape batches of fields (N, D, D, D) differs: for each offset class of
    PAIR_OFFSETS, the values at pairs of voxels that far apart (every direction of the class), summed and
    differenced (|a - b|), and the squared 2-Wasserstein distance between generated and real of each (sorted
    values, as `marginal_w2`), averaged. A peak a bond length from another raises the sum at that offset; a
    broad blob with two tops lowers the difference at short offsets, which a sharp peak keeps high: pairs see
    what `marginal_w2`, blind to where values sit, cannot (README, "Generated atoms"). `voxels`: that many pairs
    per class drawn at random (global torch RNG: a direction of the class, then a voxel it fits from) instead
    of all."""
    if fake.shape != real.shape or fake.ndim != 4:
        raise ValueError(f"pair_w2: batches of shape {tuple(fake.shape)} and {tuple(real.shape)}: "
                         f"need two equal (N, D, D, D)")
    total = 0.0
    for offset in PAIR_OFFSETS:
        directions = _pair_directions(offset, fake.device)
        f, r = _pair_values(fake, directions, voxels), _pair_values(real, directions, voxels)
        total = total + sum(_sorted_w2(a, b) for a, b in zip(f, r))
    return total / (2 * len(PAIR_OFFSETS))


def _pair_directions(offset, device):
    """(K, 3): the distinct images of a voxel offset under the cube's 48 symmetries."""
    import itertools
    images = {tuple(s * offset[a] for s, a in zip(signs, perm))
              for perm in itertools.permutations(range(3)) for signs in itertools.product((1, -1), repeat=3)}
    return torch.tensor(sorted(images), device=device)


def _pair_values(x, directions, voxels=None):
    """(a + b, |a - b|) over pairs of voxels (a at r, b at r + d) of the fields x (N, D, D, D), d one of
    `directions` (K, 3): every pair that fits in the grid, or `voxels` pairs drawn at random."""
    x = x.float()
    n, size = x.shape[0], x.shape[1]
    if voxels is None:
        pairs = []
        for d in directions.tolist():
            fit, moved = _offset_slices(d, size)
            pairs.append((x[(slice(None), *fit)].flatten(), x[(slice(None), *moved)].flatten()))
        a, b = (torch.cat(v) for v in zip(*pairs))
    else:
        d = directions[torch.randint(len(directions), (voxels,), device=x.device)]
        low, high = (-d).clamp(min=0), size - d.clamp(min=0)
        at = low + (torch.rand(voxels, 3, device=x.device) * (high - low)).long()
        grid = torch.randint(n, (voxels,), device=x.device)
        to = at + d
        a, b = x[grid, at[:, 0], at[:, 1], at[:, 2]], x[grid, to[:, 0], to[:, 1], to[:, 2]]
    return a + b, (a - b).abs()


CUBE_SYMMETRIES = 48  # 6 axis permutations x 8 sign flips: the cube's rotations and reflections


def cube_symmetry(grid, index):
    """`grid` (..., D, D, D) under symmetry `index` of the cube (0 = identity): the three spatial axes
    permuted (index // 8 picks one of the 6 orders) and flipped (bits of index % 8). On a cube cut from a
    crystal this is the cube cut from the crystal rotated or reflected about the cube's centre."""
    import itertools
    if not 0 <= index < CUBE_SYMMETRIES:
        raise ValueError(f"index={index}: a cube symmetry is 0..{CUBE_SYMMETRIES - 1}")
    lead = grid.ndim - 3
    perm = list(itertools.permutations(range(3)))[index // 8]
    grid = grid.permute(*range(lead), *(lead + a for a in perm))
    flips = [lead + a for a in range(3) if index % 8 >> a & 1]
    return grid.flip(flips) if flips else grid


def _augment(batch):
    """Each grid of (N, C, D, D, D) under its own random cube symmetry (global torch RNG: resumes exactly)."""
    picks = torch.randint(CUBE_SYMMETRIES, (len(batch),)).tolist()
    return torch.stack([cube_symmetry(g, i) for g, i in zip(batch, picks)])


# --- one step ----------------------------------------------------------------

@dataclass
class _Run:
    """The live training objects: the modules themselves (G, D: their state_dicts and parameters), the callables
    that run them in a step (*_step: maybe DDP- and/or compile-wrapped), optimizers."""
    config: TrainConfig
    G: torch.nn.Module
    D: torch.nn.Module
    G_ema: torch.nn.Module | None    # the moving average of G's weights that `sample` uses (None: ema = 0)
    G_step: object                   # G, maybe DDP- and/or compile-wrapped
    D_step: object                   # D for the D step (DDP-wrapped under torchrun)
    D_step_for_G: object             # D for the G step: no DDP, its weight grads are never needed
    D_step_r1: object                # D for R1 steps: never compiled (torch.compile has no double backward)
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler: object
    precision: str
    memory_format: torch.memory_format
    G_hold: torch.nn.Module | None = None  # energy_hold_weight: init_from's generator, whose energy G keeps
    pair_reference: dict | None = None     # pair_count_weight: `real_pair_counts` of real training cubes
    class_reference: list | None = None    # class_count_weight: `real_class_counts` of those cubes
    bonds: tuple | None = None             # bond_weight: (`bond_voxels`, edge in voxels) of the data's classes
    crowds: tuple | None = None            # crowd_weight: (`bond_voxels` with CROWD_MULT, edge in voxels)

    def autocast(self, device_type):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[self.precision])


def _resolve_precision(precision, device):
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision={precision!r}: use 'auto', 'fp32', 'bf16' or 'fp16'")
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"  # T4/V100: fp16 + GradScaler


def _build_run(config, device, ddp=False):
    """Models, optimizers and wrappers for `config` on `device` (DDP when running under torchrun)."""
    import copy
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    G, D = (m.to(device) for m in _models(config))
    if config.freeze_trunk:
        _freeze_trunk(G)
    memory_format = torch.channels_last_3d if config.channels_last else torch.contiguous_format
    G, D = G.to(memory_format=memory_format), D.to(memory_format=memory_format)
    G_ema = copy.deepcopy(G).requires_grad_(False) if config.ema > 0 else None
    adam = dict(lr=config.lr, betas=tuple(config.betas))
    opt_g, opt_d = torch.optim.Adam(_generator_groups(G, config), **adam), torch.optim.Adam(D.parameters(), **adam)
    precision = _resolve_precision(config.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    G_step, D_step, D_step_for_G = G, D, D
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device.type == "cuda" else None
        G_step, D_step = DDP(G, device_ids=ids, broadcast_buffers=True), DDP(D, device_ids=ids, broadcast_buffers=True)
    D_step_r1 = D_step
    if config.compile:
        G_step, D_step = torch.compile(G_step), torch.compile(D_step)
        D_step_for_G = torch.compile(D) if ddp else D_step
    return _Run(config, G, D, G_ema, G_step, D_step, D_step_for_G, D_step_r1, opt_g, opt_d, scaler, precision,
                memory_format)


def _generator_groups(G, config):
    """G's parameters for Adam: one group, or with output_lr the output layers (the density outputs' own with
    density_upsample="resize") in a second group at that rate."""
    if not config.output_lr:
        return G.parameters()
    outputs = [*_output_layer(G).parameters(), *(G.density_net.parameters() if G.density_net is not None else ())]
    chosen = {id(q) for q in outputs}
    return [{"params": [q for q in G.parameters() if id(q) not in chosen]},
            {"params": outputs, "lr": config.output_lr}]


def _output_layer(G):
    return G.net[-2]  # the last transposed convolution; its output channels: energy, then the density outputs


def _freeze_trunk(G):
    """Train only G's density outputs: every layer before the output layer, and the output layer's energy channel,
    get no gradient (Adam then leaves them as they are)."""
    for p in G.parameters():
        p.requires_grad_(False)
    if G.density_net is not None:  # "resize": the density outputs are their own layers, the output layer the energy
        G.density_net.requires_grad_(True)
        return
    weight = _output_layer(G).weight.requires_grad_(True)  # (in, out, k, k, k): out channel 0 is the energy
    keep = torch.ones_like(weight)
    keep[:, 0] = 0
    weight.register_hook(lambda grad: grad * keep)


def _init_generator(run, path, e_scale_K, grid_params):
    """Copy the generator file `path` into a new run's G (and its EMA): every tensor but the output layer's, which
    must match in name and shape, and of the output layer the energy channel. The file must have been trained on
    grids made the same way and in the same units (grid parameters, E_scale), or its energy channel means something
    else."""
    source = load_generator(path)
    if not math.isclose(source.e_scale_K, e_scale_K, rel_tol=1e-6) or source.transform != run.G.transform:
        raise ValueError(f"init_from={str(path)!r}: E_scale {source.e_scale_K} K and transform {source.transform!r}, "
                         f"this run {e_scale_K} K and {run.G.transform!r}: its energy channel would mean another thing")
    if grid_params is not None and source.grid_params is not None and \
            GridParams(**source.grid_params) != GridParams(**grid_params):
        raise ValueError(f"init_from={str(path)!r}: trained on grids {source.grid_params}, this run's are "
                         f"{grid_params}")
    output = f"net.{len(run.G.net) - 2}.weight"  # _output_layer's
    ours, theirs = run.G.state_dict(), source.state_dict()
    for name, value in theirs.items():
        fits = name in ours and (ours[name].shape == value.shape if name != output
                                 else ours[name].shape[0] == value.shape[0] and ours[name].shape[2:] == value.shape[2:])
        if not fits:
            raise ValueError(f"init_from={str(path)!r}: its {name} {tuple(value.shape)} does not fit this run's "
                             f"generator ({tuple(ours[name].shape) if name in ours else 'no such tensor'})")
    with torch.no_grad():
        for G in filter(None, (run.G, run.G_ema)):
            weights = G.state_dict()
            for name, value in theirs.items():
                if name == output:
                    weights[name][:, :1] = value[:, :1]
                else:
                    weights[name].copy_(value)


def _gan_step(run, real, step):
    """One update of D, then of G, on a batch of GAN-space grids (`run.config.loss`; lazy R1 on D every
    `r1_every` steps; G's loss with `marginal_weight` times `marginal_w2` and `pair_weight` times `pair_w2` against
    this real batch; then the EMA of G); returns [loss_d, loss_g, D(real), D(fake)] (loss_d without R1, loss_g
    with those terms)."""
    config, device_type = run.config, real.device.type
    r1 = config.r1_gamma > 0 and step % config.r1_every == 0
    z = torch.randn(real.shape[0], run.G.latent, device=real.device)
    if r1:
        real = real.detach().requires_grad_(True)
    with run.autocast(device_type):
        counted = any(getattr(config, name) > 0 for name in COUNTED_TERMS)
        atoms = config.clash_weight > 0 or counted
        fake, presence, shifts = run.G_step(z, with_presence=True) if atoms else (run.G_step(z), None, None)
        D_real = run.D_step_r1 if r1 else run.D_step
        if config.d_norm == "joint":  # one batch, real then generated: BatchNorm sees both (`Discriminator`)
            both = D_real(torch.cat([real, fake.detach()])).float()
            d_real, d_fake = both[:len(real)], both[len(real):]
        else:
            d_real, d_fake = D_real(real).float(), run.D_step(fake.detach()).float()
        loss_d = discriminator_loss(config.loss, d_real, d_fake)
    total_d = loss_d
    if r1:  # zero-centred gradient penalty on real data, scaled by the interval (lazy regularisation)
        # on the score per grid: the global one plus the patches' mean (as the loss weighs them)
        per_grid = sum(part.mean(1) if part.ndim == 2 else part for part in _score_parts(d_real))
        grad, = torch.autograd.grad(per_grid.sum(), real, create_graph=True)
        total_d = loss_d + 0.5 * config.r1_gamma * config.r1_every * grad.float().pow(2).flatten(1).sum(1).mean()
    run.opt_d.zero_grad(set_to_none=True)
    run.scaler.scale(total_d).backward()
    run.scaler.step(run.opt_d)

    run.D.requires_grad_(False)  # the G step needs D's input gradients only
    with run.autocast(device_type):
        if config.d_norm == "joint":
            d_gen = run.D_step_for_G(torch.cat([real.detach(), fake])).float()[len(real):]
        else:
            d_gen = run.D_step_for_G(fake).float()
        loss_g = generator_loss(config.loss, d_gen)
        if config.marginal_weight > 0:
            first = 1 if config.marginal_channels == "density" else 0
            loss_g = loss_g + config.marginal_weight * marginal_w2(fake[:, first:], real[:, first:].detach(),
                                                                   MARGINAL_VOXELS)
        if config.pair_weight > 0:  # where atoms are, whatever their class
            field = (lambda x: x[:, 1:].amax(1)) if config.pair_field == "max" else (lambda x: x[:, 1:].sum(1))
            loss_g = loss_g + config.pair_weight * pair_w2(field(fake), field(real.detach()), MARGINAL_VOXELS)
        if config.clash_weight > 0:
            loss_g = loss_g + config.clash_weight * clash_pairs(presence, config.atom_subvoxels, shifts,
                                                                config.clash_voxels)
        if counted:  # [0, 1], as the decoder reads; its gradient is the class count's
            density = from_gan_output(fake, 1.0, config.transform)[:, 1:].float()
            drawn = (presence.float(), None if shifts is None else shifts.float(), density,
                     default_threshold(1.0, config.density_sigma_voxels))
        if config.pair_count_weight > 0:
            radii = [r / run.pair_reference["spacing_A"] for r in run.pair_reference["radii_A"]]
            atoms, pairs = atom_pair_counts(*drawn, radii)
            if config.count_uncrowded:
                atoms = atoms - crowded_atoms(*drawn, run.crowds[0], -math.inf, share=False)
            loss_g = loss_g + config.pair_count_weight * pair_count_loss(
                atoms, pairs, run.pair_reference, config.pair_atoms_weight, config.count_uncrowded)
        if config.bond_weight > 0:
            loss_g = loss_g + config.bond_weight * unbonded_atoms(*drawn, *run.bonds).mean()
        if config.crowd_weight > 0:
            loss_g = loss_g + config.crowd_weight * crowded_atoms(*drawn, *run.crowds).mean()
        if config.class_count_weight > 0:
            loss_g = loss_g + config.class_count_weight * class_count_loss(atom_class_counts(*drawn),
                                                                          run.class_reference)
        if run.G_hold is not None:  # train mode, as G: both normalise by this batch
            with torch.no_grad():
                held = run.G_hold(z)[:, :1]
            loss_g = loss_g + config.energy_hold_weight * (fake[:, :1].float() - held.float()).square().mean()
    run.opt_g.zero_grad(set_to_none=True)
    run.scaler.scale(loss_g).backward()
    run.scaler.step(run.opt_g)
    run.scaler.update()
    run.D.requires_grad_(True)
    if run.G_ema is not None:
        decay = min(config.ema, (1 + step) / (10 + step))  # short warm-up: early averages forget the init
        with torch.no_grad():
            torch._foreach_lerp_(list(run.G_ema.parameters()), list(run.G.parameters()), 1 - decay)
            for b_ema, b in zip(run.G_ema.buffers(), run.G.buffers()):
                b_ema.copy_(b)
    return torch.stack([loss_d, loss_g, global_score(d_real).mean(), global_score(d_fake).mean()]).detach()


# --- data --------------------------------------------------------------------

class _Reiterable(torch.utils.data.IterableDataset):
    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


def _epoch_batches(dataset, config, epoch, skip_samples, rank, world, pin):
    """This process's batches for `epoch`, starting after `skip_samples` samples (exact mid-epoch resume).

    Map-style datasets (lists, torch Datasets) are shuffled per (seed, epoch) and split across processes by a
    DistributedSampler. Streaming datasets (ShardDataset) order and split themselves: they get
    `set_epoch(epoch, start=n)` (skip n samples without reading them) and `batch_size` set to the trainer's
    (so DataLoader workers keep the order); a stream whose set_epoch takes no `start` has skipped batches read.
    """
    import inspect
    import itertools
    from torch.utils.data import DataLoader, DistributedSampler, IterableDataset
    seed = int(np.random.SeedSequence([config.seed, epoch, rank]).generate_state(1)[0])
    kw = dict(batch_size=config.batch_size, drop_last=True, num_workers=config.num_workers, pin_memory=pin,
              generator=torch.Generator().manual_seed(seed))  # own generator: the global RNG stays untouched
    skip_batches = skip_samples // config.batch_size
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, "batch_size"):
            dataset.batch_size = config.batch_size
        set_epoch = getattr(dataset, "set_epoch", None)
        if set_epoch is not None and "start" in inspect.signature(set_epoch).parameters:
            set_epoch(epoch, start=skip_batches * config.batch_size)
            skip_batches = 0
        elif set_epoch is not None:
            set_epoch(epoch)
        loader = DataLoader(dataset, **kw)
    else:
        sampler = DistributedSampler(dataset, world, rank, shuffle=True, seed=config.seed, drop_last=True)
        sampler.set_epoch(epoch)
        loader = DataLoader(dataset, sampler=sampler, **kw)
    batches = itertools.islice(loader, skip_batches, None)
    if world > 1 and not hasattr(dataset, "__len__"):
        return _while_all_ranks_have(batches, pin)
    return batches  # a length means equal counts per process (DistributedSampler, ShardDataset): no per-step sync


def _steps_per_epoch(dataset, config, world):
    """Batches per process per epoch (for the progress bar); None for a stream of unknown length."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return len(dataset) // config.batch_size if hasattr(dataset, "__len__") else None
    return len(dataset) // world // config.batch_size


def _as_dataset(dataset):
    from torch.utils.data import IterableDataset
    if isinstance(dataset, IterableDataset) or hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        return dataset
    if iter(dataset) is dataset:
        raise TypeError("dataset is a one-shot iterator; pass a list, a torch Dataset or a ShardDataset")
    return _Reiterable(dataset)


def _while_all_ranks_have(batches, cuda):
    """Yield batches while every process still has one: DDP steps in lockstep, a stream may run out unevenly."""
    import torch.distributed as dist
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    for batch in batches:
        flag = torch.ones(1, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if not flag.item():
            return
        yield batch
    dist.all_reduce(torch.zeros(1, device=device), op=dist.ReduceOp.MIN)


# --- the loop ----------------------------------------------------------------

def _distributed(config):
    """(rank, world, device, created_group) from torchrun's environment variables."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if config.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world == 1:
        return 0, 1, device, False
    import torch.distributed as dist
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device, created


def _write_history_csv(path, rows):
    with atomic_write(path, "w") as f:
        f.write(",".join(HISTORY_COLUMNS) + "\n")
        f.writelines(",".join(repr(r[c]) for c in HISTORY_COLUMNS) + "\n" for r in rows)


def load_history(path):
    """A run's history.csv (or the run folder holding it) as a pandas DataFrame, one row per logged step."""
    import pandas as pd
    path = Path(path)
    return pd.read_csv(path / "history.csv" if path.is_dir() else path)


# TrainConfig fields a resumed run may change: they do not alter the sequence of updates. Every other field (those
# added later included) must match the checkpoint, or the caller says allow_config_change=True.
RESUME_MAY_CHANGE = ("epochs", "device", "num_workers", "log_every", "checkpoint_every_steps", "checkpoint_every_min",
                     "init_from")  # read only when a run starts


def _config_changes(saved, config) -> dict:
    """{field: [checkpoint's value, config's value]} for the fields of `config` that differ from a checkpoint's
    config and would change the run (a field the checkpoint predates counts as `_config_from_checkpoint` reads
    it: its legacy value, else its default)."""
    def norm(v):
        return tuple(norm(x) for x in v) if isinstance(v, (list, tuple)) else v
    try:
        saved = asdict(_config_from_checkpoint({"config": saved}))
    except (TypeError, ValueError):  # a config today's TrainConfig refuses: compare what was stored
        pass
    changes = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in RESUME_MAY_CHANGE or f.name in ARCH_FIELDS or f.name == "e_scale_K":
            continue  # architecture and E_scale are checked on their own: they can never change
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        old, new = saved.get(f.name, default), getattr(config, f.name)
        if norm(old) != norm(new):
            changes[f.name] = [old, new]
    return changes


def _resume_from(resume, last, config, allow_config_change=False):
    """The checkpoint to continue from (or None), checked against `config`; never silently starts over, and never
    silently continues with a config that changes the run (see RESUME_MAY_CHANGE): that needs
    allow_config_change=True, and is then recorded in the checkpoint's "config_changes"."""
    if resume is False or resume is None:
        if last.exists():
            raise CheckpointError(f"{last}: a checkpoint is already there; pass resume=True to continue it "
                                  "or choose another out_dir (it is never overwritten by a fresh run)")
        return None
    path = last if resume is True else Path(resume)
    if resume is True and not path.exists():
        return None
    ckpt = load_checkpoint(path)
    for name in ARCH_FIELDS:  # a field the checkpoint predates reads as what it ran with
        theirs, ours = ckpt["config"].get(name, LEGACY_CONFIG.get(name)), getattr(config, name)
        if theirs != ours:
            raise CheckpointError(f"{path}: checkpoint has {name}={theirs} but the config asks for {ours}; "
                                  "use a matching config or another out_dir")
    if config.e_scale_K is not None and config.e_scale_K != ckpt["e_scale_K"]:
        raise CheckpointError(f"{path}: checkpoint has e_scale_K={ckpt['e_scale_K']} but the config asks "
                              f"for {config.e_scale_K}")
    changes = _config_changes(ckpt["config"], config)
    described = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
    if changes and not allow_config_change:
        raise CheckpointError(f"{path}: the config differs from the checkpoint's ({described}), so the run would "
                              f"not continue exactly; use the checkpoint's config, another out_dir, or "
                              f"train(..., allow_config_change=True) to continue with the change recorded")
    ckpt["config_changes"] = list(ckpt.get("config_changes") or [])
    if changes:
        warnings.warn(f"{path}: continuing at step {ckpt['step']} with a changed config ({described}); recorded "
                      f"in the checkpoint's config_changes", stacklevel=3)
        ckpt["config_changes"].append({"step": ckpt["step"], "changes": changes})
    ckpt["path"] = str(path)
    return ckpt


def _e_scale(config, dataset, world, device):
    """E_scale (K): the config's, else the dataset's, else picked from its first 64 grids (rank 0's, shared)."""
    e_scale = config.e_scale_K or getattr(dataset, "e_scale_K", None)
    if e_scale is None:
        import itertools
        e_scale = pick_e_scale(itertools.islice(iter(dataset), 64))
    if world > 1:
        import torch.distributed as dist
        shared = torch.tensor([float(e_scale)], dtype=torch.float64, device=device)
        dist.broadcast(shared, 0)
        e_scale = shared.item()
    _check_e_scale(float(e_scale))
    return float(e_scale)


def _grid_params_of(dataset):
    """The voxelize settings of a shard dataset's grids (recorded with the weights), else None."""
    return dataset.params.to_dict() if isinstance(dataset, ShardDataset) else None


PAIR_REFERENCE_GRIDS = 256  # real training cubes decoded for the pair-count term's reference (0.1 s each)


def _prepare_terms(run, state, dataset, grid_params, world, device):
    """What G's extra terms compare with, made when a run starts and kept in its checkpoint (state.references):
    pair_count_weight: `real_pair_counts` of the first PAIR_REFERENCE_GRIDS training cubes, decoded by the
    default decoder (rank 0's, shared); class_count_weight: `real_class_counts` of the same cubes; bond_weight:
    the bond lengths of the data's classes (`bond_voxels`), crowd_weight likewise with CROWD_MULT;
    energy_hold_weight: init_from's sha256, so that a resumed run holds the energy of the very file it started
    from."""
    config = run.config
    params = GridParams(**grid_params) if grid_params is not None else None
    for name in COUNTED_TERMS:
        if getattr(config, name) > 0 and (params is None or not params.density_classes):
            raise ValueError(f"{name}: train on shards with density channels (a ShardDataset): their grid "
                             "parameters say how to decode the real cubes the term compares with")
    if config.bond_weight > 0:
        run.bonds = (bond_voxels(params.density_classes, params.spacing_A).to(device),
                     REPORT_EDGE_A / params.spacing_A)
    if config.crowd_weight > 0 or config.count_uncrowded:
        run.crowds = (bond_voxels(params.density_classes, params.spacing_A, CROWD_MULT).to(device),
                      REPORT_EDGE_A / params.spacing_A)
    wanted = {"pairs": config.pair_count_weight > 0, "classes": config.class_count_weight > 0}
    missing = [k for k, on in wanted.items() if on and k not in state.references]
    pairs = state.references.get("pairs")
    if config.count_uncrowded and pairs is not None and "uncrowded_atoms" not in pairs:
        missing.append("pairs")  # made before the uncrowded count was
    if missing:
        made = None
        if world == 1 or torch.distributed.get_rank() == 0:  # the others take rank 0's: decode once
            grids = itertools.islice(iter(dataset), PAIR_REFERENCE_GRIDS)
            decoded = [grid_to_atoms(g, **params.decode_kwargs()) for g in grids]
            made = {"pairs": {**real_pair_counts(decoded), "spacing_A": params.spacing_A},
                    "classes": real_class_counts(decoded, params.density_classes)}
        if world > 1:
            shared = [made]
            torch.distributed.broadcast_object_list(shared, 0)
            made = shared[0]
        state.references.update({k: made[k] for k in missing})
    run.pair_reference, run.class_reference = state.references.get("pairs"), state.references.get("classes")
    if config.energy_hold_weight > 0:
        digest = sha256_file(config.init_from)
        kept = state.references.setdefault("energy_hold_sha256", digest)
        if kept != digest:
            raise CheckpointError(f"init_from={config.init_from!r}: sha256 {digest[:12]}..., but this run holds the "
                                  f"energy of a file with sha256 {kept[:12]}...: put that file back")
        with torch.random.fork_rng(devices=[]):  # building it draws initial weights: keep the run's RNG exact
            run.G_hold = load_generator(config.init_from).float().to(device).train().requires_grad_(False)


def _check_sigma_of_data(config, grid_params):
    """The "atoms" head must draw the Gaussians the data holds (when the data says which)."""
    if config.density_head != "atoms" or grid_params is None:
        return
    params = GridParams(**grid_params)
    want = params.density_sigma_A / params.spacing_A
    if not math.isclose(config.density_sigma_voxels, want, rel_tol=1e-6):
        raise ValueError(f"TrainConfig: density_sigma_voxels={config.density_sigma_voxels} but the shards' Gaussians "
                         f"are {params.density_sigma_A} / {params.spacing_A} = {want:g} voxels wide")


def train(config: TrainConfig, dataset, out_dir="mofkit_run", resume=True, max_steps=None, progress=True,
          max_minutes=None, allow_config_change=False):
    """Train the GAN on `dataset` (kelvin grids (C, D, D, D): a list, torch Dataset or ShardDataset).

    Writes `out_dir/last.pt` (every `checkpoint_every_steps` steps or `checkpoint_every_min` minutes and at the
    end) and `out_dir/history.csv`. `resume=True` continues `out_dir/last.pt` exactly when it exists,
    `resume="path.pt"` continues that file, `resume=False` refuses to touch an existing checkpoint.
    `max_steps` stops after that many optimizer steps in total (counting resumed ones); `max_minutes` stops
    (and checkpoints) after that much wall-clock time in this call, for fixed-length sessions. Under torchrun
    every process calls this and rank 0 writes the files. Resuming with a config that changes the run (any field
    but those in RESUME_MAY_CHANGE) raises CheckpointError unless allow_config_change=True; the change is then
    recorded in the checkpoint ("config_changes": step and old/new values).
    """
    out_dir = Path(out_dir)
    last, history_csv = out_dir / "last.pt", out_dir / "history.csv"
    ckpt = _resume_from(resume, last, config, allow_config_change)
    rank, world, device, created_group = _distributed(config)
    try:
        return _train(config, _as_dataset(dataset), ckpt, last, history_csv, rank, world, device,
                      max_steps, progress, max_minutes)
    finally:
        if created_group:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train(config, dataset, ckpt, last, history_csv, rank, world, device, max_steps, progress, max_minutes=None):
    _seed_all(config.seed + rank)
    run = _build_run(config, device, ddp=world > 1)
    grid_params = _grid_params_of(dataset)
    _check_sigma_of_data(config, grid_params)
    if ckpt is None:
        state = _TrainState(_e_scale(config, dataset, world, device), grid_params)
        if config.init_from:
            _init_generator(run, config.init_from, state.e_scale_K, grid_params)
    else:
        state = _restore(run, ckpt, rank)
    _prepare_terms(run, state, dataset, grid_params, world, device)
    if rank == 0:
        _write_history_csv(history_csv, state.history)  # drops rows logged after the checkpoint we resume from
    stop_at = max_steps if max_steps is not None else float("inf")
    per_epoch = _steps_per_epoch(dataset, config, world)
    total = min(stop_at, config.epochs * per_epoch) if per_epoch is not None else stop_at
    bar = tqdm(total=None if total == float("inf") else total, initial=state.step,
               disable=not progress or rank != 0, desc="train", unit="step")
    meter = _Meter(torch.zeros(4, device=device))
    meter.deadline = meter.saved + 60 * max_minutes if max_minutes is not None else math.inf
    out_of_time, first_step = False, state.step
    while state.epoch < config.epochs and state.step < stop_at and not out_of_time:
        epoch_start = state.step
        for real in _epoch_batches(dataset, config, state.epoch, state.samples_in_epoch, rank, world,
                                   device.type == "cuda"):
            real = _augment(real) if config.augment else real
            real = to_gan_input(real.to(device, non_blocking=True), state.e_scale_K, config.transform)
            meter.sums += _gan_step(run, real.contiguous(memory_format=run.memory_format), state.step)
            meter.steps += 1
            state.step += 1
            state.samples_in_epoch += config.batch_size
            bar.update()
            ckpt_due = state.step % config.checkpoint_every_steps == 0
            if ckpt_due or state.step % config.log_every == 0:
                time_due, out_of_time = _log(state, meter, config, rank, world, history_csv, bar, last, ckpt)
                if time_due or ckpt_due:
                    _save(run, state, meter, last, rank, world)
            if state.step >= stop_at or out_of_time:
                break
        else:
            if state.step == epoch_start and state.samples_in_epoch == 0:
                raise ValueError(f"dataset gives no full batch of {config.batch_size} grids per process")
            state.epoch, state.samples_in_epoch = state.epoch + 1, 0
    if meter.steps:
        _log(state, meter, config, rank, world, history_csv, bar, last, ckpt)
    if state.step > first_step:
        _save(run, state, meter, last, rank, world)
    bar.close()
    return TrainResult(run.G, run.D, last, state.history)


@dataclass
class _Meter:
    """One call's figures since the last history row, and its clocks."""
    sums: torch.Tensor                  # [loss_d, loss_g, D(real), D(fake)], summed over `steps`
    steps: int = 0
    started: float = field(default_factory=time.perf_counter)
    logged: float = None                # time.perf_counter() of the last row (at first: started)
    saved: float = field(default_factory=time.monotonic)  # time.monotonic() of the last save (at first: the start)
    deadline: float = math.inf          # time.monotonic() past which the call stops (max_minutes)
    saved_step: int | None = None       # the step of the checkpoint this call wrote last

    def __post_init__(self):
        self.logged = self.started if self.logged is None else self.logged


def _log(state, meter, config, rank, world, history_csv, bar, last, ckpt) -> tuple:
    """Append one history row: the meter's sums averaged over its steps and over processes; then reset the meter.
    Returns (checkpoint due by the clock, out of time): rank 0's clock decides and the all-reduce tells the other
    ranks, so every rank saves and stops at the same step. A non-finite loss raises TrainingDiverged first."""
    now = time.perf_counter()
    flags = (rank == 0 and time.monotonic() - meter.saved >= 60 * config.checkpoint_every_min,
             rank == 0 and time.monotonic() >= meter.deadline)
    stats = torch.cat([meter.sums / meter.steps, torch.tensor([float(f) for f in flags], device=meter.sums.device)])
    if world > 1:
        torch.distributed.all_reduce(stats)
        stats[:4] /= world
    loss_d, loss_g, d_real, d_fake, time_due, late = stats.tolist()
    if not all(math.isfinite(v) for v in (loss_d, loss_g, d_real, d_fake)):
        if meter.saved_step is not None:
            kept = f"the last good checkpoint {last} (step {meter.saved_step}) is kept"
        elif ckpt is not None:
            kept = f"the last good checkpoint {ckpt['path']} (step {ckpt['step']}) is kept; this call saved none"
        else:
            kept = "no checkpoint exists for this run (none was due yet)"
        raise TrainingDiverged(f"non-finite loss at step {state.step} (losses are checked every {config.log_every} "
                               f"steps: it appeared after step {state.step - meter.steps}; loss_d={loss_d}, "
                               f"loss_g={loss_g}); stopped without saving: {kept}")
    row = dict(step=state.step, epoch=state.epoch, loss_d=loss_d, loss_g=loss_g, d_real=d_real, d_fake=d_fake,
               samples_per_s=meter.steps * config.batch_size * world / (now - meter.logged),
               time_s=state.time_s + now - meter.started)
    state.history.append(row)
    if rank == 0:
        with open(history_csv, "a") as f:
            f.write(",".join(repr(row[c]) for c in HISTORY_COLUMNS) + "\n")
    bar.set_postfix(loss_d=f"{loss_d:.4f}", loss_g=f"{loss_g:.4f}", refresh=False)
    meter.sums, meter.steps, meter.logged = torch.zeros_like(meter.sums), 0, now
    return bool(time_due), late > 0


# --- trained generators: sample, export_generator, load_generator -----------------------------------------

def _recalibrate_batchnorm(G, n=256, batch_size=16, seed=0):
    """Set G's BatchNorm running statistics to their plain average over `n` seeded samples (train-mode batches).

    An EMA generator's weights never ran a forward pass with the running statistics copied from the raw
    generator; re-estimating them is what makes its eval-mode samples match what it was averaged from.
    """
    norms = [m for m in G.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return G
    was_training, momenta = G.training, [m.momentum for m in norms]
    device = next(G.parameters()).device
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts equally
    z = torch.randn(n, G.latent, generator=torch.Generator().manual_seed(seed))
    G.train()
    with torch.no_grad():
        for batch in z.split(batch_size):
            G(batch.to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return G.train(was_training)


def _generator_from(state, ema=True):
    """A float32 Generator from a checkpoint or generator-file dict: the EMA weights when present (BatchNorm
    statistics re-estimated), with `.e_scale_K` and `.grid_params` set."""
    config = _config_from_checkpoint(state)
    G = _models(config)[0]
    weights = state.get("generator_ema") if ema else None
    try:
        G.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in (weights or state["generator"]).items()})
    except RuntimeError as e:
        raise CheckpointError(f"generator weights do not fit the recorded model (dim={config.dim}, "
                              f"channels={G.channels}, latent={config.latent}): {e}") from None
    if weights is not None:
        _recalibrate_batchnorm(G)
    for name, t in G.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"generator weights hold NaN or Inf ({name}): the run diverged; use an "
                                  "earlier checkpoint")
    try:
        _check_e_scale(float(state["e_scale_K"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"generator file or checkpoint records an unusable E_scale ({e})") from None
    G.e_scale_K = float(state["e_scale_K"])
    G.grid_params = state.get("grid_params")
    return G.eval()


def _load_any_generator(path, ema=True):
    """A training checkpoint or an exported generator file -> Generator (see `_generator_from`)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable generator or checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and state.get("format") == GENERATOR_FORMAT:
        if not ema and state.get("ema"):
            raise ValueError(f"{path}: a generator file holds only the EMA weights; ema=False needs the checkpoint")
        return load_generator(path)
    return _generator_from(load_checkpoint(path), ema=ema)


def sample(generator_or_path, n, batch_size=16, seed=0, device=None, e_scale_K=None, ema=True):
    """n generated grids in kelvin, np.float32 (n, C, D, D, D); channel 0 energy, others densities in [0, 1].

    Pass a training checkpoint or a generator file from `export_generator` (path; the EMA weights when the run
    kept them; ema=False: a checkpoint's raw weights), or a Generator (with `.e_scale_K` as `load_generator` sets
    it, or pass `e_scale_K`). The generator runs in eval mode (BatchNorm running statistics), so a grid depends
    only on its latent vector and `seed`, not on `batch_size`.
    """
    if not (isinstance(n, int) and n >= 0):
        raise ValueError(f"sample: n={n!r} must be a whole number >= 0")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"sample: batch_size={batch_size!r} must be a whole number >= 1")
    G = (generator_or_path if isinstance(generator_or_path, torch.nn.Module)
         else _load_any_generator(generator_or_path, ema))
    e_scale_K = getattr(G, "e_scale_K", None) if e_scale_K is None else e_scale_K
    if e_scale_K is None:
        raise ValueError("sample: pass e_scale_K (kelvin) with a Generator, or give a checkpoint path")
    device = torch.device(device) if device else next(G.parameters()).device
    G = G.to(device)
    was_training = G.training
    G.eval()
    z = torch.randn(n, G.latent, generator=torch.Generator().manual_seed(seed))  # same grids for any batch_size
    out = []
    with torch.no_grad():
        for batch in z.split(batch_size):
            out.append(from_gan_output(G(batch.to(device)).float(), e_scale_K, G.transform).cpu().numpy())
    G.train(was_training)
    return np.concatenate(out) if out else np.empty((0, G.out_channels) + (G.dim,) * 3, np.float32)


GENERATOR_FORMAT = "mofkit-generator-1"


def export_generator(checkpoint, path, dtype=torch.float16) -> Path:
    """Write what `sample` needs from a training checkpoint -- the generator's weights (the EMA's, BatchNorm
    statistics re-estimated, when the run kept one), config, E_scale and the grid parameters it was trained on
    -- and no optimizer or discriminator state: a few MB to ship (float16 halves it again; the rounding, ~1e-3
    of a weight, moves generated energies by far less than the GAN's own noise). Returns path."""
    ckpt = load_checkpoint(checkpoint)
    G = _generator_from(ckpt)
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in G.state_dict().items()}
    state = {"format": GENERATOR_FORMAT, "config": ckpt["config"], "e_scale_K": ckpt["e_scale_K"],
             "grid_params": ckpt.get("grid_params"), "ema": ckpt.get("generator_ema") is not None,
             "step": ckpt["step"], "epoch": ckpt["epoch"], "generator": weights}
    with atomic_write(path) as f:
        torch.save(state, f)
    return Path(path)


def record_weights(path, manifest_csv, source="") -> dict:
    """Record a generator file (from `export_generator`) in a manifest as a "weights" row: its path relative to the
    manifest's folder (its name when outside it), bytes and sha256, and `source` (e.g. the command that made it),
    replacing an older row of that path. `load_generator` then refuses any other file under that name."""
    path = Path(path)
    try:
        file = path.resolve().relative_to(Path(manifest_csv).resolve().parent).as_posix()
    except ValueError:
        file = path.name
    row = {**dict.fromkeys(MANIFEST_COLUMNS, ""), "file": file, "bytes": path.stat().st_size,
           "sha256": sha256_file(path), "source": source, "kind": "weights"}
    _merge_manifest(manifest_csv, [row])
    return row


def load_generator(path, manifest_csv=Path(__file__).with_name("data_manifest.csv")):
    """A Generator saved by `export_generator`, in eval mode and float32, with `.e_scale_K` and `.grid_params`
    (the `voxelize` settings of its training grids: compare its samples with grids made the same way) set, so
    `sample(load_generator(path), n)` works. When the manifest has a "weights" row for this file name, the
    file's sha256 must match it (a stale or corrupted download is refused, never used)."""
    path = Path(path)
    if manifest_csv is not None and Path(manifest_csv).exists():
        for row in read_manifest(manifest_csv, kind="weights"):
            if Path(row["file"]).name == path.name and sha256_file(path) != row["sha256"]:
                raise CheckpointError(f"{path}: sha256 {sha256_file(path)} does not match {manifest_csv} "
                                      f"({row['sha256']}): corrupted or a different model; fetch it again")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable generator file ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != GENERATOR_FORMAT:
        raise CheckpointError(f"{path}: not a {GENERATOR_FORMAT} file (write one with export_generator)")
    try:
        return _generator_from({k: v for k, v in state.items() if k != "generator_ema"}, ema=False)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


# =============================================================================
# 8. Scoring: 1-NN two-sample accuracy, memorisation, property distances
# =============================================================================

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

    nq, nr = sum(len(p) for p in queries), sum(len(p) for p in refs)
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
    device = _default_device(device)
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
    device = _default_device(device)
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


# --- the evaluation protocol ----------------------------------------------------------------------------
# One protocol scores every generator (notebook, benchmarks/reproduce.py, command line):
#   * real grids come from a refcode-grouped split: near-duplicates (FUVDEH, FUVDEH01, ...) never straddle
#     train and held-out; held-out grids are exactly as `voxelize` makes them (no augmentation);
#   * every grid, real or generated, goes through `gan_round_trip` (the attractive part, clipped at E_scale);
#   * leave-one-out 1-NN accuracy, with a bootstrap 95% interval and per-class accuracies, in three feature
#     spaces (raw voxels, 4x average-pooled voxels, energy histograms: Xu et al. 2018 show 1-NN is only as
#     good as its features), over several sampling seeds;
#   * references measured in the same call: real train vs held-out (the floor: what "indistinguishable"
#     scores), near-blank grids, the mean training grid plus noise, and the untrained generator;
#   * memorisation and property distances (log10 K_H, Q_st, core-voxel fraction, roughness).

CSD_REFCODE = re.compile(r"^([A-Z]{6})\d{0,2}$")
FEATURES = ("raw", "pooled", "histogram")


def refcode(name: str) -> str:
    """The group a CoRE MOF name belongs to: its CSD refcode without the 2-digit polymorph/redetermination
    suffix (FUVDEH12_clean -> FUVDEH), or, for structures named after a paper's supporting information,
    the paper (ja4015666_si_002_clean -> ja4015666): conservative, so near-duplicates share a group."""
    head = name.split("_")[0]
    match = CSD_REFCODE.match(head)
    return match.group(1) if match else head


def make_split(names, n_heldout, n_train=None, seed=0, parses=None):
    """[(name, refcode, 'train'|'heldout')]: refcode groups in a seeded random order fill held-out first
    (until n_heldout structures), then train (until n_train, or all). `parses(name) -> bool` drops
    structures that fail; whole groups are assigned, so the counts are reached or passed by one group."""
    groups = {}
    for name in sorted(names):
        groups.setdefault(refcode(name), []).append(name)
    order = sorted(groups)
    rng = np.random.default_rng(seed)
    rows, counts = [], {"heldout": 0, "train": 0}
    for g in rng.permutation(len(order)):
        split = "heldout" if counts["heldout"] < n_heldout else "train"
        if split == "train" and n_train is not None and counts["train"] >= n_train:
            break
        members = [n for n in groups[order[g]] if parses is None or parses(n)]
        rows += [(n, order[g], split) for n in members]
        counts[split] += len(members)
    return rows


def write_split(path, rows):
    with atomic_write(path, "w") as f:
        w = csv.writer(f)
        w.writerow(["name", "refcode", "split"])
        w.writerows(rows)


def read_split(path) -> dict:
    """{'train': [names], 'heldout': [names]} from a split CSV (name, refcode, split), in file order."""
    out = {"train": [], "heldout": []}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            out[row["split"]].append(row["name"])
    return out


def _one_nn_scores(real, generated, features, n_boot, seed, device):
    """1-NN accuracy, bootstrap 95% interval over the per-sample leave-one-out outcomes, per-class accuracies."""
    mode = "downsampled" if features == "pooled" else features
    details = one_nn_accuracy(real, generated, features=mode, return_details=True, device=device)
    labels = np.r_[np.zeros(len(real), bool), np.ones(len(generated), bool)]
    correct = (labels[details["nearest"]] == labels).astype(float)
    boot = correct[np.random.default_rng(seed).integers(0, len(correct), (n_boot, len(correct)))].mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"accuracy": details["accuracy"], "ci_low": lo, "ci_high": hi,
            "real_accuracy": details["real_accuracy"], "generated_accuracy": details["generated_accuracy"]}


def core_fraction(grids_K, e_scale_K):
    """Per grid: the fraction of voxels that are repulsive or negligible (E > -1% of E_scale, on channel 0),
    the atom cores; one definition for real grids and for generated ones of either transform."""
    e = _float32(gan_round_trip(grids_K, e_scale_K))
    e = e[:, 0] if e.ndim == 5 else e
    return (e > -0.01 * e_scale_K).reshape(len(e), -1).mean(1)


def roughness_K(grids_K, e_scale_K):
    """Per grid: the mean absolute energy difference between neighbouring voxels (K, three axes, channel 0)."""
    e = np.asarray(gan_round_trip(grids_K, e_scale_K), dtype=np.float64)
    e = e[:, 0] if e.ndim == 5 else e
    diffs = [np.abs(np.diff(e, axis=a)).reshape(len(e), -1).mean(1) for a in (1, 2, 3)]
    return sum(diffs) / 3


def read_grids(shard_dir, n=None, seed=0):
    """n grids (kelvin, float32 (n, C, D, D, D)) drawn without replacement, seeded, from a folder of shards (all
    when n is None or larger), in storage order, and their metadata rows (name, density, ...)."""
    dataset = ShardDataset(shard_dir, shuffle=False, with_index=True)
    total = dataset.num_grids
    chosen = np.arange(total) if n is None or n >= total else np.sort(
        np.random.default_rng(seed).choice(total, n, replace=False))
    keep, grids = set(chosen.tolist()), {}
    for grid, i in dataset:
        if i in keep:
            grids[i] = grid.numpy()
    return np.stack([grids[i] for i in chosen]), dataset.metadata().iloc[chosen].reset_index(drop=True)


@dataclass
class EvalReport:
    """What `evaluate` measured. `one_nn`: one row per (compared set, feature space) with accuracy, 95% interval
    and per-class accuracies; `properties`: one row per set with distances to the held-out grids."""
    one_nn: object                 # pandas DataFrame
    properties: object             # pandas DataFrame
    memorisation: dict
    n: int
    e_scale_K: float
    sampling_seeds: tuple

    @property
    def accuracy(self) -> float:
        """The headline: raw-voxel 1-NN accuracy of generated vs held-out, mean over sampling seeds."""
        rows = self.one_nn[(self.one_nn["features"] == "raw") & self.one_nn["set"].str.startswith("generated")]
        return float(rows["accuracy"].mean())

    @property
    def table(self):
        """1-NN accuracy per set (rows) and feature space (columns), as percentages with 95% intervals."""
        t = self.one_nn.assign(cell=[f"{100 * a:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" for a, lo, hi in
                                     zip(self.one_nn["accuracy"], self.one_nn["ci_low"], self.one_nn["ci_high"])])
        return t.pivot(index="set", columns="features", values="cell").reindex(
            index=list(dict.fromkeys(self.one_nn["set"])), columns=list(dict.fromkeys(self.one_nn["features"])))

    def __str__(self):
        import pandas as pd
        with pd.option_context("display.width", 160, "display.max_columns", 20):
            props = self.properties.round(3).to_string()
            small = (f"\nWith n = {self.n} the intervals are too wide to rank anything: use n >= 200 (generated "
                     "grids are cheap; held-out grids are the limit).\n" if self.n < 200 else "")
            return (f"1-NN accuracy, %, 95% interval ({self.n} held-out vs {self.n} per set; 50% = indistinguishable; "
                    f"'real train' is the floor):\n{self.table.to_string()}\n{small}\n\nproperties (W1 = Wasserstein distance "
                    f"to the held-out grids):\n{props}\n\nmemorisation: {self.memorisation['fraction_closer']:.3f} "
                    f"of generated grids closer to the training set than any held-out grid (fresh samples: "
                    f"~{1 / (self.n + 1):.4f}; copies: 1)")

    __repr__ = __str__


def evaluate(generator, heldout_K, train_K, n=None, sampling_seeds=(0, 1, 2), e_scale_K=None, features=FEATURES,
             baselines=True, temperature_K=DEFAULT_GRID.temperature_K, density_kg_m3=None, n_boot=1000, seed=0,
             device=None, channels=None) -> EvalReport:
    """Score a generator against held-out real grids by the kit's one protocol (see the comment above).

    generator: a Generator (`load_generator`), a checkpoint or generator-file path, or an array of generated
    kelvin grids (then one set, `sampling_seeds` unused). heldout_K, train_K: real kelvin grids (n, C, D, D, D)
    or (n, D, D, D) exactly as `voxelize` makes them, from the generator's own refcode split. n: grids per
    compared set (default: all held-out grids; generated grids are cheap, so use n >= 200 for a meaningful
    interval). channels: the grid channels compared (default all); (0,) scores the energy alone, e.g. of a
    generator with atom-density channels against an energy-only one.
    Returns an EvalReport; `print(report)` shows it, `plot_evaluation(report)` draws it.
    """
    import pandas as pd
    from scipy.stats import wasserstein_distance

    def five_d(x, name):
        x = _as_samples(x, name).numpy()
        x = x if x.ndim == 5 else x[:, None]
        return x if channels is None else x[:, list(channels)]

    heldout, train = five_d(heldout_K, "heldout_K"), five_d(train_K, "train_K")
    if isinstance(generator, (str, Path)):
        generator = _load_any_generator(generator)
    is_model = isinstance(generator, torch.nn.Module)
    if e_scale_K is None:
        e_scale_K = getattr(generator, "e_scale_K", None) if is_model else None
        if e_scale_K is None:
            raise ValueError("evaluate: pass e_scale_K (kelvin) with generated grids")
    n = min(len(heldout), len(train)) if n is None else n
    if n < 2 or n > len(heldout) or n > len(train):
        raise ValueError(f"evaluate: n={n} needs 2 <= n <= the held-out ({len(heldout)}) and train ({len(train)}) "
                         "grids given")
    rng = np.random.default_rng(seed)
    pick = lambda x: x[np.sort(rng.choice(len(x), n, replace=False))] if len(x) > n else x
    clip = lambda x: np.asarray(gan_round_trip(x, e_scale_K), dtype=np.float32)
    heldout, train = clip(pick(heldout)), clip(pick(train))
    if is_model:
        sets = {f"generated (seed {s})": clip(five_d(sample(generator, n, seed=1000 + s, device=device), "generated"))
                for s in sampling_seeds}
    else:
        sets = {"generated": clip(pick(five_d(generator, "generated")))}
        sampling_seeds = ()
    first = next(iter(sets.values()))
    if first.shape[1:] != heldout.shape[1:]:
        raise ValueError(f"evaluate: generated grids are {first.shape[1:]} but held-out grids {heldout.shape[1:]}: "
                         "voxelize the real grids with the generator's grid_params")
    sets["real train (floor)"] = train
    if baselines:
        noise = np.random.default_rng(seed + 1).normal(0, 0.002 * e_scale_K, heldout.shape).astype(np.float32)
        sets["near-blank"] = clip(-np.abs(noise))  # a collapsed generator's output: ~0 K everywhere
        noise = np.random.default_rng(seed + 2).normal(0, 0.05 * e_scale_K, heldout.shape).astype(np.float32)
        sets["mean train grid + noise"] = clip(train.mean(0, keepdims=True) + noise)
        if is_model:
            torch.manual_seed(seed)
            fresh = Generator(generator.dim, generator.latent, generator.channels, generator.out_channels,
                              generator.transform, generator.density_blur, generator.density_head,
                              generator.sigma_voxels, generator.subvoxels, generator.density_upsample,
                              generator.atom_offsets)
            sets["untrained generator"] = clip(five_d(sample(fresh, n, seed=999, device=device, e_scale_K=e_scale_K),
                                                      "untrained generator"))
    rows = [{"set": name, "features": f, **_one_nn_scores(heldout, grids, f, n_boot, seed, device)}
            for f in features for name, grids in sets.items()]

    def props(x):
        table = grid_properties(x, temperature_K, density_kg_m3)
        return {"log10": table["log10_widom" if density_kg_m3 is None else "log10_henry"].to_numpy(),
                "Q_st": table["heat_kJ_mol"].to_numpy(),
                "core": core_fraction(x, e_scale_K), "rough": roughness_K(x, e_scale_K)}

    real = props(heldout)
    log_name = "log10_widom" if density_kg_m3 is None else "log10_henry"
    prop_rows = {}
    for name, grids in sets.items():
        p = props(grids)
        prop_rows[name] = {f"W1 {log_name}": wasserstein_distance(real["log10"], p["log10"]),
                           "W1 Q_st kJ/mol": wasserstein_distance(real["Q_st"], p["Q_st"]),
                           "core fraction": p["core"].mean(), "roughness K": p["rough"].mean(),
                           "spread K": float(grids[:, 0].std(0).mean())}
    prop_rows["held-out (reference)"] = {f"W1 {log_name}": 0.0, "W1 Q_st kJ/mol": 0.0,
                                         "core fraction": real["core"].mean(), "roughness K": real["rough"].mean(),
                                         "spread K": float(heldout[:, 0].std(0).mean())}
    mem = memorisation(first, train, heldout)
    return EvalReport(pd.DataFrame(rows), pd.DataFrame(prop_rows).T, {"fraction_closer": mem["fraction_closer"],
                      "threshold": mem["threshold"]}, n, float(e_scale_K), tuple(sampling_seeds))


def grid_properties(grids_K, temperature_K=DEFAULT_GRID.temperature_K, density_kg_m3=None):
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


def property_comparison(real_grids_K, generated_grids_K, temperature_K=DEFAULT_GRID.temperature_K, density_kg_m3=None,
                        seed=0):
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


def _symlog_colours(volumes, linthresh_K, cmap):
    """(norm, colormap) spanning exactly the data's range on a symmetric-log scale with 0 K at the colormap's
    centre: grids without positive energies (GAN space) get only its lower half, no empty red end."""
    import matplotlib
    from matplotlib.colors import ListedColormap, SymLogNorm
    lo = min(0.0, min(float(v.min()) for v in volumes))
    hi = max(0.0, max(float(v.max()) for v in volumes))
    if lo == hi:  # all 0 K: any small symmetric range
        lo, hi = -linthresh_K, linthresh_K
    full = SymLogNorm(linthresh=linthresh_K, vmin=-max(-lo, hi), vmax=max(-lo, hi), base=10)
    # an odd transform: the part [full(lo), full(hi)] of the colormap on SymLogNorm(lo, hi) keeps 0 K at its centre
    part = matplotlib.colormaps[cmap](np.linspace(float(full(lo)), float(full(hi)), 256))
    return SymLogNorm(linthresh=linthresh_K, vmin=lo, vmax=hi, base=10), ListedColormap(part)


def _scale_bar(ax, spacing_A, voxels):
    """An angstrom scale bar (a round length up to half the panel) in the panel's lower left."""
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar
    half_A = voxels * spacing_A / 2
    length_A = max(x for x in (1, 2, 5, 10, 20, 50, 100, 200, 500) if x <= max(half_A, 1))
    ax.add_artist(AnchoredSizeBar(ax.transData, length_A / spacing_A, f"{length_A:g} Å", "lower left", pad=0.15,
                                  borderpad=0.1, sep=1.5, color="black", frameon=True, label_top=True,
                                  size_vertical=voxels / 40, fontproperties={"size": 7, "weight": "bold"}))


def plot_slices(grid, titles=None, axis=0, channel=0, linthresh_K=10.0, cmap="RdBu_r", panel_in=0.9,
                spacing_A=None, path=None):
    """CT-style montage of every slice of a kelvin grid (64 slices -> an 8 x 8 panel); a list of grids
    (e.g. [real, generated]) gives montages side by side with one shared colour scale.

    Colours use a symmetric-log scale (linear within +-linthresh_K, logarithmic beyond) centred on 0 K (white):
    adsorption wells (E < 0, a few hundred K deep) show blue and repulsive cores (up to the +5000 K cap)
    red, both legible at once, which a linear scale (dominated by the cap) cannot do. The scale spans the data
    shown: grids in the GAN's range (no positive energies) have no red. `spacing_A` (voxel edge, Å) adds a
    scale bar to each montage's first slice.
    Returns the matplotlib Figure (shown inline in a notebook); saves it when `path` is given.
    """
    from matplotlib.figure import Figure
    volumes = [_energy_volume(g, channel) for g in (grid if isinstance(grid, (list, tuple)) else [grid])]
    titles = list(titles) if titles is not None else [None] * len(volumes)
    if len(titles) != len(volumes):
        raise ValueError(f"titles: {len(titles)} given for {len(volumes)} grids")
    n = volumes[0].shape[axis]
    ncols = math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    norm, colours = _symlog_colours(volumes, linthresh_K, cmap)
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
                image = ax.imshow(np.take(volume, k, axis=axis).T, origin="lower", cmap=colours, norm=norm,
                                  interpolation="nearest")
        if spacing_A is not None:
            _scale_bar(panels[0, 0], spacing_A, volume.shape[(axis + 1) % 3])
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


def plot_evaluation(report, path=None):
    """Bar chart of an EvalReport's 1-NN accuracies: one group per feature space, one bar per compared set,
    95% intervals as error bars, 50% (indistinguishable) as a dashed line."""
    import matplotlib.pyplot as plt
    t = report.one_nn
    sets, feats = list(dict.fromkeys(t["set"])), list(dict.fromkeys(t["features"]))
    fig, ax = plt.subplots(figsize=(3.6 + 0.55 * len(feats) * len(sets), 4.2))
    width = 0.8 / len(sets)
    colours = plt.get_cmap("tab10")
    for k, name in enumerate(sets):
        rows = t[t["set"] == name].set_index("features").reindex(feats)
        x = np.arange(len(feats)) + (k - (len(sets) - 1) / 2) * width
        err = [100 * (rows["accuracy"] - rows["ci_low"]), 100 * (rows["ci_high"] - rows["accuracy"])]
        ax.bar(x, 100 * rows["accuracy"], width, yerr=err, capsize=2, label=name, color=colours(k % 10))
    ax.axhline(50, color="k", ls="--", lw=1)
    ax.set_xticks(np.arange(len(feats)), [{"raw": "raw voxels", "pooled": "pooled voxels (4x)",
                                           "histogram": "energy histograms"}.get(f, f) for f in feats])
    ax.set_ylim(0, 105)
    ax.set_ylabel("1-NN accuracy vs held-out grids (%)")
    ax.set_title(f"1-NN two-sample test ({report.n} held-out vs {report.n} per set; 50% = indistinguishable)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), title="compared with held-out")
    fig.tight_layout()
    return _save_figure(fig, path)


# Axis labels and titles of the per-grid properties (grid_properties, shard properties); any other name is
# labelled from its unit suffix (_kJ_mol, _K, ...).
PROPERTY_LABELS = {
    "log10_henry": ("Henry coefficient", "log$_{10}$ K$_H$, K$_H$ in mol kg$^{-1}$ Pa$^{-1}$"),
    "heat_kJ_mol": ("heat of adsorption at infinite dilution", "Q$_{st}$ (kJ/mol)"),
    "log10_widom": ("Widom factor", "log$_{10}$ ⟨exp(−E/k$_B$T)⟩ (dimensionless)"),
    "widom": ("Widom factor", "⟨exp(−E/k$_B$T)⟩ (dimensionless)"),
}
_UNIT_SUFFIXES = {"_kJ_mol": "kJ/mol", "_mol_kg_Pa": "mol kg$^{-1}$ Pa$^{-1}$", "_mmol_g": "mmol/g",
                  "_kg_m3": "kg/m$^3$", "_m2_g": "m$^2$/g", "_K": "K", "_A": "Å", "_bar": "bar"}


def _property_label(name) -> tuple:
    """(title, axis label) of a property column."""
    if name in PROPERTY_LABELS:
        return PROPERTY_LABELS[name]
    for suffix, unit in _UNIT_SUFFIXES.items():
        if name.endswith(suffix):
            quantity = name[:-len(suffix)].replace("_", " ")
            return quantity, f"{quantity} ({unit})"
    return name.replace("_", " "), name


def plot_property_histograms(real_vals, gen_vals, label="value", bins=30, path=None):
    """Overlaid histograms of a property for real and generated samples. Arrays give one panel (x axis
    `label`); dicts or DataFrames give one panel per shared key (e.g. `grid_properties`), titled and labelled
    with the property's name and unit (PROPERTY_LABELS)."""
    from matplotlib.figure import Figure
    if isinstance(real_vals, dict) or hasattr(real_vals, "columns"):
        keys = [k for k in real_vals.keys() if k in gen_vals.keys()]
        pairs = [(*_property_label(k), np.asarray(real_vals[k], float), np.asarray(gen_vals[k], float))
                 for k in keys]
    else:
        pairs = [(label, label, np.asarray(real_vals, float).ravel(), np.asarray(gen_vals, float).ravel())]
    if not pairs:
        raise ValueError("real_vals and gen_vals share no property")
    fig = Figure(figsize=(4.6 * len(pairs), 3.6), layout="constrained")
    for ax, (title, xlabel, real, gen) in zip(np.atleast_1d(fig.subplots(1, len(pairs))), pairs):
        edges = np.histogram_bin_edges(np.concatenate([real, gen]), bins=bins)
        ax.hist(real, edges, alpha=0.55, density=True, label=f"real (n = {len(real)})")
        ax.hist(gen, edges, alpha=0.55, density=True, label=f"generated (n = {len(gen)})")
        ax.set(title=title, xlabel=xlabel, ylabel="probability density (per x unit)")
        ax.legend(fontsize=8)
    return _save_figure(fig, path)


# Units of each model's parameters for q in mmol/g and P in bar (plot_isotherm_fits' inputs); "" = dimensionless.
_PARAM_UNITS = {"freundlich": {"K": "mmol g⁻¹ bar^(−1/n)", "n": ""},
                "sips": {"g_inf": "mmol/g", "K": "bar⁻¹", "n": ""},
                "langmuir": {"Q_max": "mmol/g", "b": "bar⁻¹"},
                "bet": {"q_m": "mmol/g", "C": "", "P0": "bar"}}


def plot_isotherm_fits(pressure_bar, q_mmol_g, fits, path=None, title=None):
    """Measured points with each fitted curve above a table of the fits -> (figure, table DataFrame).

    fits: {label: IsothermFit}, e.g. the study's Sips (K fixed), free Sips and Freundlich. The table has one
    row per fit: model, parameters with units and standard errors ("fixed" for held parameters), R², AIC.
    The figure is written atomically to `path` (format from its suffix) when given.
    """
    import pandas as pd
    from matplotlib.figure import Figure
    P, q = np.asarray(pressure_bar, dtype=np.float64), np.asarray(q_mmol_g, dtype=np.float64)

    def parameter(f, name, value):
        unit = _PARAM_UNITS[f.model][name]
        unit = f" {unit}" if unit else ""
        if name in f.fixed:
            return f"{name} = {value:.6g}{unit} (fixed)"
        return f"{name} = {value:.6g} ± {f.se[name]:.2g}{unit}"

    table = pd.DataFrame({label: {"model": f.model,
                                  "parameters": "; ".join(parameter(f, k, v) for k, v in f.params.items()),
                                  "R²": f"{f.r2:.6f}", "AIC": f"{f.aic:.2f}"}
                          for label, f in fits.items()}).T
    fig = Figure(figsize=(10, 5.2 + 0.28 * len(table)), layout="constrained")
    ax, ax_table = fig.subplots(2, 1, height_ratios=[5, 0.45 + 0.28 * len(table)])
    ax.plot(P, q, "ko", label="measured")
    P_fine = np.linspace(P.min(), P.max(), 200)
    for label, f in fits.items():
        ax.plot(P_fine, f.predict(P_fine), label=f"{label} (R² {f.r2:.4f})")
    ax.set(xlabel="pressure (bar)", ylabel="adsorption (mmol/g)", title=title or "")
    ax.legend(fontsize=9)
    ax_table.axis("off")
    cells = ax_table.table(cellText=table.values, rowLabels=table.index, colLabels=table.columns, loc="center",
                           cellLoc="left")
    cells.auto_set_font_size(False)
    cells.set_fontsize(9)
    cells.auto_set_column_width(list(range(-1, len(table.columns))))  # widths from the text: no overlaps
    _save_figure(fig, path)
    return fig, table


# =============================================================================
# 10. Inverse: grid -> atoms -> XYZ
# =============================================================================

# Element classes of the atom-density channels. A class is an element symbol, "metal" (a metal without a class
# of its own) or "other" (any other element without one). Metals ranked by how many CoRE MOF 2019-ASR
# structures hold them (its All_Metals column, 12,020 structures); non-metals outside C/N/O/H by the structures
# holding them in a 184-structure sample (every 60th name). README "Atoms from grids" has the counts.
COREMOF_METALS = ("Zn", "Cu", "Cd", "Co", "Mn", "Ag", "Ni", "Fe", "Eu", "Tb", "In", "Gd", "La", "Nd", "Al", "Na",
                  "K", "Mg", "Dy", "Zr", "Sm", "U", "V", "Mo", "Ce")
COREMOF_OTHER = ("P", "S", "F", "Cl", "Br", "B", "Si", "I", "As")
DENSITY_CLASSES = ("metal", "C", "N", "O", "H", "other")  # one channel for every metal: its element is lost
METAL_DENSITY_CLASSES = COREMOF_METALS[:4] + DENSITY_CLASSES  # the 4 commonest metals named (README: measured)
_NON_METALS = {"X", "H", "He", "B", "C", "N", "O", "F", "Ne", "Si", "P", "S", "Cl", "Ar", "Ge", "As", "Se",
               "Br", "Kr", "Sb", "Te", "I", "Xe", "At", "Rn"}


def check_density_classes(classes) -> tuple:
    """`classes` as a tuple, after checking each is an element symbol, "metal" or "other", without repeats, and
    that "other" is one of them (every atom then has a channel)."""
    from ase.data import chemical_symbols
    classes = tuple(classes)
    bad = [c for c in classes if c not in ("metal", "other") and (c not in chemical_symbols or c == "X")]
    if bad or len(set(classes)) != len(classes) or "other" not in classes:
        raise ValueError(f"density classes {classes}: expected distinct element symbols or 'metal', and the "
                         f"catch-all 'other'")
    return classes


def element_class(symbol, classes=DENSITY_CLASSES) -> str:
    """Density class of an element: itself if it is a class, else "metal" for metals, else "other"."""
    if symbol in classes:
        return symbol
    return "metal" if "metal" in classes and symbol not in _NON_METALS else "other"


def class_symbol(cls, classes=DENSITY_CLASSES) -> str:
    """Element written for a decoded atom of class `cls`: the class itself if it is an element, else a stand-in
    (a placeholder: the channels do not say which element): the commonest CoRE MOF metal, or non-metal, that has
    no class of its own. grid_to_atoms marks such atoms (arrays["density_class"], info["placeholders"])."""
    if cls not in ("metal", "other"):
        return cls
    ranked = COREMOF_METALS if cls == "metal" else COREMOF_OTHER
    return next(s for s in ranked if element_class(s, classes) == cls)


def _placeholder_note(classes_present, classes) -> str:
    """The comment-line note for stand-in elements, '' when every decoded atom's element is its class."""
    parts = [f"{class_symbol(c, classes)} stands for any {'metal' if c == 'metal' else 'element'} without a "
             f"channel of its own (class '{c}')" for c in ("metal", "other") if c in classes_present]
    return ("placeholder elements: " + "; ".join(parts)) if parts else ""


def _cube_images(atoms, size, spacing_A, margin_A):
    """(symbols, positions) of the periodic images within margin_A (> 0) of the sampled cube
    [0, (size-1)*spacing_A]^3: the frame of grid_points(atoms, size, "cube", spacing_A)."""
    positions, index = periodic_images(atoms, [0.0] * 3, [(size - 1) * spacing_A] * 3, margin_A)
    return np.array(atoms.get_chemical_symbols())[index], positions


def density_channels(atoms, size=DEFAULT_GRID.size, spacing_A=DEFAULT_GRID.spacing_A, sigma_A=None,
                     classes=DENSITY_CLASSES) -> np.ndarray:
    """Gaussian-smeared atom densities per element class on the cube-frame grid, float32 (C, D, D, D).

    Same frame as voxelize(atoms, size, "cube", spacing_A), so these stack onto the energy grid as extra
    GAN channels. Each voxel holds the max (not the sum) over atoms of exp(-r^2 / 2 sigma^2): values
    stay in [0, 1], peak exactly 1 at an atom centre, and every atom's nearest voxel stays a local
    maximum however close its neighbours are, which is what grid_to_atoms(method="density") relies on.
    sigma_A defaults to spacing_A (the peaks then look the same in voxels at any resolution).
    """
    sigma_A = spacing_A if sigma_A is None else sigma_A
    if sigma_A <= 0 or spacing_A <= 0:
        raise ValueError(f"sigma_A and spacing_A must be positive, got {sigma_A}, {spacing_A}")
    classes = check_density_classes(classes)
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


def default_threshold(spacing_A, sigma_A):
    """The density decoder's default threshold (see `grid_to_atoms`)."""
    return 0.6 ** ((spacing_A / sigma_A) ** 2)


def peak_voxels(channels, threshold, neighbours=6):
    """Where density channels (..., D, D, D) peak: above `threshold` and >= their 6 face neighbours, or all 26
    (strictly > those at a lower index, so a flat top of two equal voxels gives one peak; cube faces may peak).
    A bool tensor (numpy in, numpy out)."""
    as_numpy = isinstance(channels, np.ndarray)
    v = torch.from_numpy(channels) if as_numpy else channels
    size = v.shape[-1]
    padded = torch.nn.functional.pad(v, (1, 1) * 3, value=-1.0)
    peak = v > threshold
    for offset in itertools.product((-1, 0, 1), repeat=3):
        if sum(map(abs, offset)) == 0 or (neighbours == 6 and sum(map(abs, offset)) != 1):
            continue
        neighbour = padded[(...,) + tuple(slice(1 + o, size + 1 + o) for o in offset)]
        peak &= (v > neighbour) if offset < (0, 0, 0) else (v >= neighbour)
    return peak.numpy() if as_numpy else peak


def _density_peaks(channels, threshold, spacing_A, sigma_A, min_separation_A, neighbours=6):
    """(positions_A, class index, height) of atoms found as peaks in per-class density channels.

    A peak is a voxel `peak_voxels` finds. It is refined to sub-voxel along each axis by the parabola through the
    log values of the peak and its neighbour(s) whose
    curvature is the known Gaussian's, -(spacing/sigma)^2 per voxel^2: exact for an isolated atom, and
    on a cube face it needs only the one inner neighbour. The shift stays within the peak voxel's cell
    (a neighbour lifted by another atom cannot drag it further); peaks that land outside the cube are
    images beyond it and dropped. Peaks of different channels closer than min_separation_A are one atom
    whose class is the strongest channel's.
    """
    from scipy.spatial import cKDTree
    size = channels.shape[-1]
    v = channels.astype(np.float64)
    c, *ijk = np.nonzero(peak_voxels(v, threshold, neighbours))
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
    # atoms on a face (often at 0) stay: float16 channels put their fitted centre up to ~1e-3 voxel outside
    inside = np.all((centre > -0.02) & (centre < size - 1 + 0.02), axis=1)
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
    """Inner distance (A) at which the element-probe pair energy A/r^12 - B/r^6 falls to threshold_K.

    A negative threshold (GAN output never reaches exactly 0 K) below the pair's well depth has no such
    distance; the core then ends at the well's minimum."""
    (a,), (b,) = pair_coefficients([element], probe)
    return ((b + math.sqrt(max(b * b + 4 * a * threshold_K, 0.0))) / (2 * a)) ** (-1 / 6)


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


def grid_to_atoms(grid, spacing_A=DEFAULT_GRID.spacing_A, method="density", threshold=None, classes=DENSITY_CLASSES,
                  sigma_A=None, min_separation_A=0.5, peak_neighbours=6, probe=DEFAULT_GRID.probe,
                  elements=("H", "C", "N", "O", "Zn"), seed=0):
    """Decode a cube-frame grid into atoms: ase.Atoms with positions in angstrom inside the cube.

    method="density": `grid` holds density_channels (C, D, D, D) of `classes`, optionally after an energy
    channel 0 (C + 1 channels, as stacked in shards and for training); atoms are peaks above `threshold`
    with the class from the strongest channel. `sigma_A` (default spacing_A) must be the one the channels
    were made with (it fixes the sub-voxel fit's curvature). peak_neighbours: a peak is >= its 6 face
    neighbours (the default: the higher recall on real grids) or all 26, which also merges two peaks of one
    blob on diagonal voxels, as a generator's speckled output has them, and drops a few real atoms whose
    voxels touch diagonally (README, "Generated atoms", measures both). Default threshold 0.6^((spacing/sigma)^2):
    a clean atom's nearest voxel (at most sqrt(3)/2 voxel away) holds >= exp(-3/8 (spacing/sigma)^2), 0.69
    at sigma = spacing, while an image more than ~1 voxel beyond a cube face stays below it there.
    Symbols: the class's element, or class_symbol's stand-in for "metal" and "other" (a placeholder: the
    atoms then carry info["placeholders"], which write_xyz/write_cif put on the comment line). Every atom's
    class is in arrays["density_class"].
    method="cluster": the study's route for energy-only grids (kelvin, channel 0 if several): k-means
    clusters of repulsive-core voxels (E >= threshold, default 0 K: the study's clip(-E, 0, E_scale)
    scaling keeps nothing above 0 K) with elements guessed from the core size. It cannot see hydrogen as
    separate from its neighbour's core, cannot tell C/N/O apart (their cores differ by ~0.1 A, less than
    a voxel), and merged cores of bonded atoms (core radius ~3 A vs bonds of ~1.4 A) make the atom count
    a volume estimate: on CoRE MOFs it recovers ~1-2% of non-H atoms within 0.5 A (README, "Evaluation");
    its elements are guesses among `elements`.
    Cell = the cube (size * spacing_A), pbc False (the cube is not periodic).
    """
    from ase import Atoms
    g = np.asarray(grid.detach().cpu() if torch.is_tensor(grid) else grid, dtype=np.float32)
    if g.ndim not in (3, 4) or len(set(g.shape[-3:])) != 1:
        raise ValueError(f"grid: expected a cube (D, D, D) or (C, D, D, D), got shape {g.shape}")
    if method == "density":
        classes = check_density_classes(classes)
        if g.ndim != 4 or g.shape[0] not in (len(classes), len(classes) + 1):
            raise ValueError(f"grid: method='density' needs {len(classes)} density channels {classes} "
                             f"(or energy + those), got shape {g.shape}")
        sigma_A = spacing_A if sigma_A is None else sigma_A
        threshold = default_threshold(spacing_A, sigma_A) if threshold is None else threshold
        if peak_neighbours not in (6, 26):
            raise ValueError(f"peak_neighbours={peak_neighbours!r}: expected 6 or 26")
        positions, cls, _ = _density_peaks(g[-len(classes):], threshold, spacing_A, sigma_A, min_separation_A,
                                           peak_neighbours)
        names = [classes[c] for c in cls]
        atoms = Atoms(symbols=[class_symbol(c, classes) for c in names], positions=positions,
                      cell=[g.shape[-1] * spacing_A] * 3, pbc=False)
        atoms.new_array("density_class", np.array(names, dtype="U8"))
        note = _placeholder_note(set(names), classes)
        if note:
            atoms.info["placeholders"] = note
        return atoms
    if method == "cluster":
        symbols, positions = _cluster_atoms(g[0] if g.ndim == 4 else g, spacing_A,
                                            0.0 if threshold is None else threshold, probe, elements, seed)
        atoms = Atoms(symbols=symbols, positions=positions, cell=[g.shape[-1] * spacing_A] * 3, pbc=False)
        atoms.info["placeholders"] = "elements guessed from repulsive-core sizes (cluster route)"
        return atoms
    raise ValueError(f"method={method!r}: expected 'density' or 'cluster'")


def write_xyz(atoms, path) -> Path:
    """Atomically write extended XYZ (plain XYZ plus the cell, and any placeholder note, on the comment line;
    any XYZ reader works)."""
    import ase.io
    with atomic_write(path, "w") as f:
        ase.io.write(f, atoms, format="extxyz")
    return Path(path)


def write_cif(atoms, path) -> Path:
    """Atomically write a P1 CIF of the atoms in their cell (for decoded atoms: the cube); a placeholder note
    (atoms.info["placeholders"]) goes in a comment line at the top."""
    import io
    import ase.io
    text = io.BytesIO()
    ase.io.write(text, atoms, format="cif")
    note = atoms.info.get("placeholders")
    with atomic_write(path, "wb") as f:
        f.write((f"# {note}\n" if note else "").encode() + text.getvalue())
    return Path(path)


def contact_count(atoms, min_A=0.7) -> int:
    """Number of atom pairs closer than min_A (physically impossible contacts), periodic if atoms.pbc."""
    from ase.neighborlist import neighbor_list
    return len(neighbor_list("i", atoms, min_A)) // 2


def round_trip_scores(decoded, atoms, size=DEFAULT_GRID.size, spacing_A=DEFAULT_GRID.spacing_A, tol_A=0.5,
                      classes=DENSITY_CLASSES) -> dict:
    """Compare decoded atoms with the true non-hydrogen atoms of `atoms` in the cube frame.

    Decoded and true atoms are paired one-to-one (Hungarian, maximising the number of pairs within
    tol_A). recall = paired true atoms / true non-H atoms inside the sampled cube [0, (size-1)*spacing]^3;
    precision = paired decoded / decoded non-H atoms (true images just outside the cube may pair, so
    a correct peak on a face is not a false positive). The class_* figures pair only atoms of the same
    element class (of `classes`); metal_element_recall = true metal atoms inside the cube paired with a
    decoded atom of their own element (NaN without metals).
    """
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist
    true_symbols, true_pos = _cube_images(atoms, size, spacing_A, tol_A)
    heavy = true_symbols != "H"
    true_symbols, true_pos = true_symbols[heavy], true_pos[heavy]
    true_cls = np.array([element_class(s, classes) for s in true_symbols])
    inside = np.all((true_pos >= 0) & (true_pos <= (size - 1) * spacing_A), axis=1)
    dec_symbols = np.array(decoded.get_chemical_symbols())
    dec_cls = np.array([element_class(s, classes) for s in dec_symbols], dtype=object)
    dec_pos, dec_symbols, dec_cls = decoded.positions[dec_symbols != "H"], dec_symbols[dec_symbols != "H"], \
        dec_cls[dec_symbols != "H"]
    metal = inside & np.array([s not in _NON_METALS for s in true_symbols], dtype=bool)
    scores = {"n_true": int(inside.sum()), "n_decoded": len(dec_pos)}
    for prefix, same_class in (("", False), ("class_", True)):
        cost = cdist(dec_pos, true_pos)
        if same_class:
            cost[dec_cls[:, None] != true_cls[None, :]] = np.inf
        within = cost <= tol_A
        rows, cols = linear_sum_assignment(np.where(within, cost, tol_A * (len(cost) + 1) + 1))
        hit = within[rows, cols]
        scores[prefix + "recall"] = float(inside[cols[hit]].sum() / max(1, inside.sum()))
        scores[prefix + "precision"] = float(hit.sum() / max(1, len(dec_pos)))
        if not same_class:
            right = dec_symbols[rows[hit]] == true_symbols[cols[hit]]
            scores["metal_element_recall"] = (float((metal[cols[hit]] & right).sum() / metal.sum())
                                              if metal.any() else math.nan)
    return scores


# --- structure report --------------------------------------------------------
# One set of chemistry figures for any decoded structure, generated or real, so the two are compared decoded
# the same way. Neighbour figures use the atoms at least edge_A inside the cube (their neighbours are inside
# it too); contacts use every atom.

REPORT_CLASSES = ("metal", "C", "N", "O", "H", "other")


def _as_structures(structures, energies_K, spacing_A, classes, sigma_A):
    """[(atoms, energy grid or None)] from Atoms, a list of them, or grids (N, 1 + C, D, D, D) to decode."""
    from ase import Atoms
    if isinstance(structures, Atoms):
        structures = [structures]
    if isinstance(structures, (np.ndarray, torch.Tensor)):
        grids = np.asarray(structures.detach().cpu() if torch.is_tensor(structures) else structures, np.float32)
        if grids.ndim != 5 or grids.shape[1] != len(classes) + 1:
            raise ValueError(f"structures: grids must be (N, 1 + {len(classes)}, D, D, D) (energy + density "
                             f"channels of {classes}), got shape {grids.shape}")
        if spacing_A is None:
            raise ValueError("structure_report: grids need spacing_A (the voxel spacing they were made with)")
        structures = [grid_to_atoms(g, spacing_A, classes=classes, sigma_A=sigma_A) for g in grids]
        energies_K = grids[:, 0] if energies_K is None else energies_K
    structures = list(structures)
    if energies_K is None:
        return [(a, None) for a in structures]
    energies = [np.asarray(e, np.float32) for e in energies_K]
    if len(energies) != len(structures):
        raise ValueError(f"energies_K: {len(energies)} grids for {len(structures)} structures")
    return [(a, e[0] if e.ndim == 4 else e) for a, e in zip(structures, energies)]


def _energy_consistency(atoms, energy_K, probe, cutoff_A, grid_cutoff_A, cap_K, e_scale_K):
    """(Pearson r, mean |dE| K, voxels) of the probe energy recomputed from `atoms` vs `energy_K` on the voxels
    at least cutoff_A inside every cube face, both clipped to the GAN's range [-e_scale_K, 0] (all a generated
    energy channel holds). Pairs from cutoff_A to grid_cutoff_A (the grid's own cutoff) are added as the
    uniform-density tail of the atoms in the cube."""
    size = energy_K.shape[-1]
    length_A = float(atoms.cell[0, 0])
    spacing_A = length_A / size
    axis = np.arange(size) * spacing_A
    keep = (axis >= cutoff_A - 1e-9) & (axis <= (size - 1) * spacing_A - cutoff_A + 1e-9)
    if not keep.any():
        return math.nan, math.nan, 0
    lonely = atoms.copy()
    lonely.set_cell([length_A + cutoff_A + 1.0] * 3)  # no periodic image is within the cutoff of the cube
    points = np.stack(np.meshgrid(axis[keep], axis[keep], axis[keep], indexing="ij"), -1)
    symbols = atoms.get_chemical_symbols()
    missing = sorted(set(symbols) - set(UFF))
    if missing:
        raise ValueError(f"atoms: no UFF parameters for {missing}")
    if not len(atoms):  # nothing decoded: no energy anywhere, which the grid's own energy may contradict
        recomputed = np.zeros(points.shape[:-1])
    else:
        recomputed = probe_energy(lonely, points, probe, cutoff_A, device="cpu")
    if grid_cutoff_A > cutoff_A and len(atoms):
        a, b = pair_coefficients(symbols, probe)
        volume = length_A ** 3
        recomputed += (4 * math.pi / volume) * ((a.sum() / 9) * (cutoff_A ** -9 - grid_cutoff_A ** -9)
                                                - (b.sum() / 3) * (cutoff_A ** -3 - grid_cutoff_A ** -3))
    low = -math.inf if e_scale_K is None else -e_scale_K
    mine = np.clip(np.minimum(recomputed, cap_K), low, 0).ravel()
    own = np.clip(energy_K[np.ix_(keep, keep, keep)].astype(np.float64), low, 0).ravel()
    r = float(np.corrcoef(mine, own)[0, 1]) if mine.std() > 0 and own.std() > 0 else math.nan
    return r, float(np.abs(mine - own).mean()), int(mine.size)


def structure_report(structures, energies_K=None, *, spacing_A=None, classes=DENSITY_CLASSES, sigma_A=None,
                     names=None, edge_A=REPORT_EDGE_A, bond_mult=BOND_MULT, crowd_mult=CROWD_MULT, contact_A=0.7,
                     axis_deg=5.0, probe=DEFAULT_GRID.probe,
                     cutoff_A=None, grid_cutoff_A=DEFAULT_GRID.cutoff_A, cap_K=DEFAULT_GRID.cap_K, e_scale_K=None):
    """Chemistry of decoded structures: pandas DataFrame, one row per structure.

    structures: ase.Atoms (decoded: cell = the cube, pbc False), a list of them, or grids (N, 1 + C, D, D, D)
    (energy in K + density channels of `classes`, e.g. a shard's grids or from_gan_output of generated
    samples), decoded here by grid_to_atoms(method="density") with spacing_A and their channel 0 taken as
    energies_K. Columns:
      n_atoms, atoms_per_nm3 (per cube volume); frac_<class> for REPORT_CLASSES (metal = any metal);
      nn_median_A, nn_p10_A, nn_p90_A: nearest-neighbour distances of the atoms >= edge_A inside the cube;
      bonded_fraction: of those atoms, the share with a neighbour between contact_A and bond_mult x the sum of
        covalent radii (ase natural_cutoffs(mult=bond_mult));
      crowded_fraction: of those atoms, the share with a neighbour closer than crowd_mult x that sum;
      contact_fraction: atoms with a neighbour closer than contact_A (impossible);
      axis_fraction: of the inner atoms, the share whose nearest neighbour lies within axis_deg of a cube axis
        (atoms in rows along the grid, as a generator may draw them; isotropic bonds: 3 (1 - cos axis_deg), 0.011);
      energy_r, energy_mae_K, energy_voxels: with energies_K, the energy-atoms consistency (_energy_consistency:
        the probe energy recomputed from the atoms with cutoff_A (default: a quarter of the cube's edge, capped
        at grid_cutoff_A: 4 A for a 16 A cube) on the voxels >= cutoff_A inside every face (the central cube of
        half the edge), plus the uniform tail to grid_cutoff_A, vs the grid's own energy, both clipped to
        [-e_scale_K, 0]).
    Stand-in elements (grid_to_atoms' placeholders) count as what they stand for: a metal, or "other".
    """
    import pandas as pd
    from ase.neighborlist import natural_cutoffs, neighbor_list
    from scipy.spatial import cKDTree
    classes = check_density_classes(classes)
    rows = []
    for atoms, energy in _as_structures(structures, energies_K, spacing_A, classes, sigma_A):
        n = len(atoms)
        length_A = float(atoms.cell[0, 0])
        row = {"n_atoms": n, "atoms_per_nm3": n / (length_A / 10) ** 3}
        coarse = [element_class(s, REPORT_CLASSES) for s in atoms.get_chemical_symbols()]
        row.update({f"frac_{c}": coarse.count(c) / max(n, 1) for c in REPORT_CLASSES})
        cube = atoms.copy()
        cube.pbc = False
        i, d = neighbor_list("id", cube, natural_cutoffs(cube, mult=bond_mult))
        inner = np.all((atoms.positions >= edge_A) & (atoms.positions <= length_A - edge_A), axis=1)
        bonded = np.zeros(n, bool)
        bonded[i[d >= contact_A]] = True
        crowded = _crowded(atoms, crowd_mult)
        tree = cKDTree(atoms.positions.reshape(-1, 3))
        contact = np.zeros(n, bool)
        contact[tree.query_pairs(contact_A, output_type="ndarray").ravel()] = True
        nn, axis = [], math.nan
        if n > 1 and inner.any():
            nn, j = (x[:, 1] for x in tree.query(atoms.positions[inner], k=2))
            v = atoms.positions[j] - atoms.positions[inner]
            axis = float((np.abs(v).max(1) > nn * math.cos(math.radians(axis_deg))).mean())
        p10, median, p90 = np.percentile(nn, [10, 50, 90]) if len(nn) else (math.nan,) * 3
        row.update(n_inner=int(inner.sum()), nn_median_A=median, nn_p10_A=p10, nn_p90_A=p90,
                   bonded_fraction=float(bonded[inner].mean()) if inner.any() else math.nan,
                   crowded_fraction=float(crowded[inner].mean()) if inner.any() else math.nan,
                   contact_fraction=float(contact.mean()) if n else math.nan, axis_fraction=axis)
        if energy is not None:
            cut = min(length_A / 4, grid_cutoff_A) if cutoff_A is None else cutoff_A
            r, mae, voxels = _energy_consistency(atoms, energy, probe, cut, grid_cutoff_A, cap_K, e_scale_K)
            row.update(energy_r=r, energy_mae_K=mae, energy_voxels=voxels)
        rows.append(row)
    return pd.DataFrame(rows, index=names)


def structure_targets(generated, real):
    """The generation targets (README, "Atoms from grids") from two structure_report tables (generated, held-out
    real decoded the same way): pandas DataFrame of the generated and real medians (contact_fraction,
    crowded_fraction, axis_fraction: means) per figure, and whether the target is met (None: reported, no target)."""
    import pandas as pd
    g, r = generated.median(numeric_only=True), real.median(numeric_only=True)
    rows = [("atoms_per_nm3", g["atoms_per_nm3"], r["atoms_per_nm3"], "within 15%",
             abs(g["atoms_per_nm3"] / r["atoms_per_nm3"] - 1) <= 0.15),
            ("nn_median_A", g["nn_median_A"], r["nn_median_A"], "within 10%",
             abs(g["nn_median_A"] / r["nn_median_A"] - 1) <= 0.10),
            ("bonded_fraction", g["bonded_fraction"], r["bonded_fraction"], ">= 0.9 x real",
             g["bonded_fraction"] >= 0.9 * r["bonded_fraction"]),
            ("contact_fraction", generated["contact_fraction"].mean(), real["contact_fraction"].mean(), "<= 0.01",
             generated["contact_fraction"].mean() <= 0.01)]
    for mean in ("crowded_fraction", "axis_fraction"):
        if mean in generated and mean in real:
            rows.append((mean, generated[mean].mean(), real[mean].mean(), "reported", None))
    if "energy_r" in generated and "energy_r" in real:
        rows.append(("energy_r", g["energy_r"], r["energy_r"], "reported", None))
        rows.append(("energy_mae_K", g["energy_mae_K"], r["energy_mae_K"], "reported", None))
    return pd.DataFrame(rows, columns=["figure", "generated", "real", "target", "met"]).set_index("figure")



# =============================================================================
# 11. Command line
# =============================================================================

# Per-cell time limits of a headless run: QUICK's cells take seconds to a minute on a CPU; the GPU mode's longest
# cells (building 2,500 grids, training) stop themselves after at most 20 minutes each; FULL trains for hours.
NOTEBOOK_TIMEOUT_S = {"quick": 900, "gpu": 3600, "full": 0}  # 0: no limit


def run_notebook(path="MOF_3DGAN.ipynb", out_dir="mofkit_outputs", mode="auto", timeout_s=None):
    """Execute the tutorial notebook headless (nbclient); the executed copy and its files land in out_dir.

    mode: "quick" (CPU, minutes), "gpu" (sized for a free Colab T4: under an hour), "full" (the study's scale,
    hours on a GPU) or "auto" (gpu when CUDA is available, else quick). timeout_s: seconds per cell, 0 for no
    limit, None for the mode's default (NOTEBOOK_TIMEOUT_S). The notebook reads MOFKIT_MODE and MOFKIT_OUT from
    the environment, so Colab's "Run all" and this function run the same cells. Progress bars are text.
    """
    import nbformat
    from nbclient import NotebookClient
    if mode == "auto":
        mode = "gpu" if torch.cuda.is_available() else "quick"
    if mode not in NOTEBOOK_TIMEOUT_S:
        raise ValueError(f"mode={mode!r}: choose auto, {', '.join(NOTEBOOK_TIMEOUT_S)}")
    timeout_s = NOTEBOOK_TIMEOUT_S[mode] if timeout_s is None else timeout_s
    path, out_dir = Path(path).resolve(), Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(path, as_version=4)
    # the inline backend, as in Jupyter: plt.show() figures are saved in the executed copy (Agg would drop them)
    env = {"MOFKIT_MODE": mode, "MOFKIT_OUT": str(out_dir), "MPLBACKEND": "module://matplotlib_inline.backend_inline",
           "MOFKIT_PROGRESS": "text"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits these
    try:
        NotebookClient(nb, timeout=int(timeout_s) or None, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        with atomic_write(out_dir / path.name, "w") as f:   # also when a cell failed: the traceback is in it
            nbformat.write(nb, f)
    return out_dir / path.name


def main(argv=None):
    """python mofkit.py {notebook, voxelize, shards, train, sample, evaluate} ... (each with --help).

    Every error ends the command with ONE line on stderr, `mofkit: error: ...`, and exit status 1 (2 for bad
    arguments, 130 for Ctrl-C); `--debug` anywhere on the line shows the full traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return _main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("mofkit: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        if debug:
            raise
        message = " ".join(str(e).split()) or "(no message)"
        print(f"mofkit: error: {message if isinstance(e, _CLEAR_ERRORS) else f'{type(e).__name__}: {message}'} "
              f"(rerun with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


# Errors whose message already says what is wrong with which input (the CLI prints them without a type name).
_CLEAR_ERRORS = (ValueError, DownloadError, CheckpointError, TrainingDiverged, FileNotFoundError,
                 IsADirectoryError, PermissionError)


def _main(argv):
    import argparse
    if argv[:1] == ["train"]:                   # its flags mirror TrainConfig; torchrun-friendly
        return main_train(argv[1:])
    p = argparse.ArgumentParser(prog="mofkit.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    nb = sub.add_parser("notebook", help="run MOF_3DGAN.ipynb headless (the main job)")
    nb.add_argument("--mode", choices=["auto", *NOTEBOOK_TIMEOUT_S], default="auto",
                    help="quick: CPU, minutes; gpu: a free Colab T4, under an hour; full: the study's scale, hours "
                         "(auto: gpu with CUDA, else quick)")
    nb.add_argument("--out", default="mofkit_outputs")
    nb.add_argument("--timeout", type=int, default=None, metavar="S",
                    help="seconds per cell, 0 for no limit (default: " + ", ".join(
                        f"{m} {t or 'none'}" for m, t in NOTEBOOK_TIMEOUT_S.items()) + ")")
    vx = sub.add_parser("voxelize", help="energy grids of CIF files or CoRE MOF names -> .npy (kelvin)")
    vx.add_argument("structures", nargs="+", help="CIF paths or CoRE MOF 2019-ASR names")
    sh = sub.add_parser("shards", help="voxelize CoRE MOF 2019-ASR (or a CIF folder) into shards")
    sh.add_argument("out_dir")
    sh.add_argument("--source", default=None, help="CIF folder (default: CoRE MOF 2019-ASR)")
    sh.add_argument("--limit", type=int, default=None)
    sh.add_argument("--shard-size", type=int, default=100)
    sub.add_parser("train", help="train the GAN on a shard folder (see: mofkit.py train --help)")
    sm = sub.add_parser("sample", help="generate grids from a checkpoint or generator file -> .npy + slice PNGs")
    sm.add_argument("checkpoint", help="a training checkpoint (last.pt) or a generator file (weights/*.pt)")
    ev = sub.add_parser("evaluate", help="score a generator against held-out shards (the kit's one protocol)")
    ev.add_argument("generator", help="a training checkpoint or a generator file")
    ev.add_argument("--heldout", required=True, help="folder of held-out shards (same grid settings)")
    ev.add_argument("--train", required=True, help="folder of the generator's training shards")
    ev.add_argument("--n", type=int, default=500, help="grids per compared set")
    ev.add_argument("--plot", default=None, help="also save the 1-NN bar chart here (PNG)")
    sm.add_argument("--n", type=int, default=4)
    sm.add_argument("--seed", type=int, default=0)
    for q in (vx, sm):
        q.add_argument("--out", default="mofkit_outputs")
    for q in (vx, sh, sm):
        q.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    for q in (vx, sh):
        q.add_argument("--temperature", type=float, default=None,
                       help="K of the printed/stored K_H and Q_st (default per probe: H2 77, CH4/Kr/Xe 298, Ar 87)")
        q.add_argument("--size", type=int, default=DEFAULT_GRID.size)
        q.add_argument("--frame", choices=["cube", "cell"], default=DEFAULT_GRID.frame)
        q.add_argument("--spacing", type=float, default=DEFAULT_GRID.spacing_A, help="cube frame voxel size, A")
        q.add_argument("--probe", choices=sorted(PROBES), default=DEFAULT_GRID.probe)
    args = p.parse_args(argv)

    if args.command == "notebook":
        print(run_notebook(out_dir=args.out, mode=args.mode, timeout_s=args.timeout))
    elif args.command == "voxelize":
        out = Path(args.out)
        params = _cli_grid_params(args)
        device = usable_device(args.device)
        failures = []

        def one(src):
            atoms = read_structure(src) if src.lower().endswith(".cif") else load_coremof(src)
            grid = voxelize(atoms, params=params, device=device)
            name = atoms.info["name"]
            with atomic_write(out / f"{name}.npy") as f:
                np.save(f, grid)
            props = structure_properties(atoms, grid, params, device, name)
            print(f"{name}: {out / (name + '.npy')}  {params.probe} at {params.temperature_K:g} K, whole cell: "
                  f"log10 K_H = {props['log10_KH_mol_kg_Pa']:.3f} (mol/kg/Pa), Q_st = {props['Qst_kJ_mol']:.2f} "
                  f"kJ/mol, He void fraction = {props['void_fraction_He']:.3f}; this grid (window): log10 K_H = "
                  f"{props['window_log10_KH_mol_kg_Pa']:.3f}, Q_st = {props['window_Qst_kJ_mol']:.2f} kJ/mol")

        for src in args.structures:  # one bad input never stops the others
            _read_or_record(lambda: one(src), src, failures)
        if failures:
            _write_csv(out / "failures.csv", ["name", "reason"], [{"name": n, "reason": r} for n, r in failures])
            raise ValueError(f"{len(failures)} of {len(args.structures)} structures failed, listed in "
                             f"{out / 'failures.csv'}; first: {failures[0][1]}")
    elif args.command == "shards":
        rows = build_shards(args.out_dir, args.source, params=_cli_grid_params(args), shard_size=args.shard_size,
                            limit=args.limit, device=args.device, progress=False)
        print(f"{build_summary(rows, args.out_dir)}; manifest: {Path(args.out_dir) / 'data_manifest.csv'}")
        if not sum(int(r["n_grids"] or 0) for r in rows):
            raise ValueError(f"no grid was built: every structure failed (see {Path(args.out_dir) / 'failures.csv'})")
    elif args.command == "sample":
        if args.n < 1:
            raise ValueError(f"--n {args.n}: the number of grids must be >= 1")
        out = Path(args.out)
        grids = sample(args.checkpoint, args.n, seed=args.seed, device=args.device)
        with atomic_write(out / "generated.npy") as f:
            np.save(f, grids)
        for i, g in enumerate(grids):
            plot_slices(g, path=out / f"generated_{i}.png")
        print(f"{len(grids)} grids: {out / 'generated.npy'} and generated_*.png")
    elif args.command == "evaluate":
        heldout, _ = read_grids(args.heldout, args.n)
        train, meta = read_grids(args.train, args.n)
        report = evaluate(args.generator, heldout, train, n=min(args.n, len(heldout), len(train)),
                          density_kg_m3=float(np.median(meta["density_kg_m3"])))
        print(report)
        if args.plot:
            plot_evaluation(report, path=args.plot)



def _cli_grid_params(args) -> GridParams:
    """The GridParams of the voxelize and shards commands' flags."""
    return GridParams(size=args.size, frame=args.frame, spacing_A=args.spacing, probe=args.probe,
                      temperature_K=args.temperature)


def main_train(argv=None):
    """`python mofkit.py train SHARDS_DIR --out RUN_DIR [--fast-gpu] [--epochs 48 ...]` (every TrainConfig field
    is a flag); under `torchrun --nproc_per_node=N` each process runs it and ShardDataset splits by rank.
    The grid size and channel count come from the shards."""
    import argparse
    import dataclasses
    p = argparse.ArgumentParser(prog="mofkit.py train", description="Train the 3D GAN on a folder of shards.")
    p.add_argument("shards", help="folder of shard_*.npy files (from build_shards / ensure_shards)")
    p.add_argument("--out", default="mofkit_run", help="run folder: last.pt, history.csv (resumed if present)")
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--fast-gpu", action="store_true", help="start from TrainConfig.fast_gpu() (GPU speed settings)")
    preset.add_argument("--study", action="store_true", help="start from TrainConfig.study(): the study's exact recipe")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the config changes the run (recorded in the checkpoint)")
    fields = [f for f in dataclasses.fields(TrainConfig) if f.name not in ("dim", "grid_channels", "betas")]
    for f in fields:
        kind = type(f.default) if f.default is not None else float
        extra = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
        p.add_argument("--" + f.name.replace("_", "-"), default=None, **extra)
    args = p.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in fields if getattr(args, f.name) is not None}
    shards = ShardDataset(args.shards).shards
    # the grid size is the shards', so widths are checked against it, not against the default dim
    _, grid_channels, dim = read_shard_meta(shards[0])["shape"][:3]
    preset = TrainConfig.fast_gpu if args.fast_gpu else TrainConfig.study if args.study else TrainConfig
    config = preset(**overrides, dim=dim, grid_channels=grid_channels)
    dataset = ShardDataset(shards, seed=config.seed, batch_size=config.batch_size)
    result = train(config, dataset, args.out, resume=True, max_steps=args.max_steps, progress=not args.no_progress,
                   allow_config_change=args.allow_config_change)
    print(f"checkpoint: {result.checkpoint}")
    return result


if __name__ == "__main__":
    main()


