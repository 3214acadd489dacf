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
import re
import sys
import math
import json
import time
import shutil
import hashlib
import inspect
import tempfile
import contextlib
import urllib.parse
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
    for i in range(retries + 1):
        try:
            return attempt()
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
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise DownloadError(f"{url}: only http(s) URLs (Google Drive links included) can be downloaded")
    if sha256 is not None and dest.is_file() and sha256_file(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as dest, so the final rename is atomic; gdown also puts its own partial files in here.
    work = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"))
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
    from tqdm.auto import tqdm
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
                size = f.tell()
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
        if not path.is_file():  # gdown < 5 prints the refusal and returns None instead of raising
            raise DownloadError(refused)

    _with_retries(attempt, **retry)


# --- JSON APIs: NIST/ARPA-E ISODB and MOFX-DB ---------------------------------------------------------------

ISODB_URL = "https://adsorption.nist.gov"        # /isodb/api/... and /matdb/api/...
MOFXDB_URL = "https://mof.tech.northwestern.edu"  # /mofs.json?...
CACHE_DIR = Path("~/.cache/mofkit").expanduser()

# Molar masses (g/mol) of common adsorbates, to turn mg/g and wt% into mmol/g; keyed by formula, with the
# names ISODB and MOFX-DB use.
GASES = {
    "H2": ("Hydrogen", 2.01588), "He": ("Helium", 4.002602), "CH4": ("Methane", 16.04246),
    "N2": ("Nitrogen", 28.0134), "CO": ("Carbon monoxide", 28.0101), "O2": ("Oxygen", 31.9988),
    "Ar": ("Argon", 39.948), "CO2": ("Carbon dioxide", 44.0095), "Kr": ("Krypton", 83.798),
    "Xe": ("Xenon", 131.293),
}
PRESSURE_TO_BAR = {"bar": 1.0, "pa": 1e-5, "kpa": 1e-2, "mpa": 10.0, "mbar": 1e-3, "atm": 1.01325,
                   "torr": 1.01325 / 760, "mmhg": 1.01325 / 760, "psi": 0.0689475729}
# Amount-based adsorption units -> mmol/g. cm3(STP)/g uses 22.4 cm3(STP)/mmol as the study did (the ideal gas
# at 0 °C and 1 atm: 22.414; the 0.06% difference is below digitisation error).
AMOUNT_TO_MMOL_G = {"mmol/g": 1.0, "mol/kg": 1.0, "mol/g": 1000.0, "mmol/kg": 1e-3, "cm3(stp)/g": 1 / 22.4}
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


def fetch_json(url, params=None, *, cache_dir=None, timeout_s=30.0, retries=4, backoff_s=1.0):
    """GET a JSON document with timeouts and retries; with `cache_dir`, a copy on disk answers later calls.

    The cache file name is a hash of the full URL (query included) plus its last path part; only documents
    that parsed as JSON are cached, written atomically. Delete the folder to refresh.
    """
    import requests
    full_url = requests.Request("GET", url, params=params).prepare().url
    name = urllib.parse.urlsplit(full_url).path.rsplit("/", 1)[-1]
    cache = None if cache_dir is None else (
        Path(cache_dir).expanduser() / f"{hashlib.sha256(full_url.encode()).hexdigest()[:16]}-{name}")
    if cache is not None and cache.is_file():
        return _parse_json(cache.read_bytes(), cache)

    def attempt():
        r = requests.get(full_url, timeout=timeout_s)
        if r.status_code >= 500 or r.status_code == 429:
            raise _Transient(f"HTTP {r.status_code} {r.reason}")
        if r.status_code != 200:
            raise DownloadError(f"{full_url}: HTTP {r.status_code} {r.reason}; check the name or query.")
        return r.content

    body = _with_retries(attempt, f"fetching {full_url}", "The service may be down: retry later.", retries, backoff_s)
    data = _parse_json(body, full_url)
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
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise ValueError(f"{kind} record not in the expected schema ({type(e).__name__}: {e}): "
                         f"{str(record)[:200]}") from None


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


def isodb_table(records):
    """ISODB isotherm records (parsed JSON) -> a tidy pandas table, one row per isotherm, as in the study.

    Columns: filename, doi, adsorbent, adsorbate, temperature_K, pressure_units, adsorption_units, pressure and
    adsorption (raw lists; adsorption is total_adsorption), pressure_bar and adsorption_mmol_g (lists, or None
    where the units do not allow it), note ('' when converted, else why not).
    """
    import pandas as pd

    def parse(r):
        return {"filename": r["filename"], "doi": r["DOI"], "adsorbent": r["adsorbent"]["name"], **_isotherm_fields(r)}

    rows = [_parse_record(parse, record, "ISODB isotherm") for record in records]
    return pd.DataFrame(rows, columns=["filename", "doi", "adsorbent", "adsorbate", "temperature_K",
                                       "pressure_units", "adsorption_units", "pressure", "adsorption",
                                       "pressure_bar", "adsorption_mmol_g", "note"])


def _named(entry, query):
    """Whether an ISODB material/gas entry has `query` as its name or one of its synonyms (any case)."""
    names = [entry.get("name") or ""] + list(entry.get("synonyms") or [])
    return query.casefold() in {n.casefold() for n in names}


def fetch_isodb(adsorbent=None, adsorbate=None, temperature_K=None, *, doi=None, filenames=None,
                base_url=ISODB_URL, cache_dir=CACHE_DIR / "isodb", progress=True, **http):
    """List and fetch NIST/ARPA-E ISODB isotherms; returns `isodb_table` of them.

    Either give `filenames` (e.g. "10.1002adem.200500223.isotherm1"), or filter the isotherm index by
    `adsorbent` (material name or synonym, e.g. "CuBTC" or "HKUST-1"), `adsorbate` (gas name, synonym or a
    formula from GASES), `temperature_K` (within 0.5 K) and `doi`. `http` takes fetch_json's timeout_s, retries
    and backoff_s. Everything fetched is cached under `cache_dir` (None: no cache).
    """
    from tqdm.auto import tqdm

    def get(path):
        return fetch_json(f"{base_url}{path}", cache_dir=cache_dir, **http)

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
    records = [get(f"/isodb/api/isotherm/{name}.json")
               for name in tqdm(filenames, desc="ISODB isotherms", disable=not progress)]
    return isodb_table(records)


def isodb_doi_stub(doi):
    """The DOI stub ISODB uses in file names and URLs (10.1007/s10450-011-9337-3 -> 10.1007s1045001193373)."""
    stub = doi.replace("/", "-").replace("(", "").replace(")", "").replace(":", "").replace(" ", "")
    return stub.replace("+", "plus").replace("-", "")


def isodb_biblio(doi, *, base_url=ISODB_URL, cache_dir=CACHE_DIR / "isodb", **http):
    """The ISODB bibliography record of an article (title, authors, its isotherms' filenames...)."""
    return fetch_json(f"{base_url}/isodb/api/biblio/{isodb_doi_stub(doi)}.json", cache_dir=cache_dir, **http)


def mofxdb_table(results):
    """MOFX-DB results (entries of mofs.json pages) -> a tidy pandas table, one row per (MOF, isotherm).

    Columns: name, mofkey, database, then the isotherm columns of `isodb_table` (adsorbate ... note), then cif
    (the entry's CIF text). A MOF without isotherms keeps one row, with note 'no isotherms', so its CIF is
    not lost.
    """
    import pandas as pd

    def parse(mof):
        head = {"name": mof["name"], "mofkey": mof["mofkey"], "database": mof["database"]}
        isotherms = [_isotherm_fields(iso) for iso in mof["isotherms"]] or [{"note": "no isotherms"}]
        return [{**head, **iso, "cif": mof["cif"]} for iso in isotherms]

    rows = [row for mof in results for row in _parse_record(parse, mof, "MOFX-DB MOF")]
    return pd.DataFrame(rows, columns=["name", "mofkey", "database", "adsorbate", "temperature_K",
                                       "pressure_units", "adsorption_units", "pressure", "adsorption",
                                       "pressure_bar", "adsorption_mmol_g", "note", "cif"])


def fetch_mofxdb(name=None, mofkey=None, database=None, *, base_url=MOFXDB_URL, cache_dir=CACHE_DIR / "mofxdb",
                 max_pages=None, progress=True, **http):
    """Query MOFX-DB (mofs.json: by MOF name, MOFkey and/or database such as "CoREMOF 2019"), following its
    pages up to `max_pages`; returns `mofxdb_table` of the MOFs with their CIFs and computed isotherms.

    `http` takes fetch_json's timeout_s, retries and backoff_s; pages are cached under `cache_dir`.
    """
    from tqdm.auto import tqdm
    params = {k: v for k, v in {"name": name, "mofkey": mofkey, "database": database}.items() if v is not None}
    if not params and max_pages is None:
        raise ValueError("fetch_mofxdb: give name, mofkey or database, or max_pages; the whole database is "
                         "over 100,000 MOFs with CIFs")
    results, page, pages = [], 1, 1
    with tqdm(desc="MOFX-DB pages", disable=not progress) as bar:
        while page <= min(pages, max_pages or pages):
            doc = fetch_json(f"{base_url}/mofs.json", {**params, "page": page}, cache_dir=cache_dir, **http)
            results += doc["results"]
            pages = doc["pages"]
            bar.total = min(pages, max_pages or pages)
            bar.update(1)
            page += 1
    return mofxdb_table(results)


def mofxdb_structures(table, failures=None):
    """{name: ase.Atoms} from the CIFs of a `mofxdb_table` (one per MOF), read with `read_structure`.

    A CIF that does not parse is skipped and `(name, reason)` appended to `failures` if a list is given.
    """
    structures = {}
    for name, cif in table.drop_duplicates("name")[["name", "cif"]].itertuples(index=False):
        try:
            structures[name] = read_structure(cif, name=name)
        except ValueError as e:  # StructureError is a ValueError
            if failures is not None:
                failures.append((name, str(e)))
    return structures




# =============================================================================
# 2. Structures: CIF files and the embedded CoRE MOF 2019 dataset
# =============================================================================



# =============================================================================
# 3. Voxelizer: force field, probe energies, grids, Henry coefficient
# =============================================================================



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


