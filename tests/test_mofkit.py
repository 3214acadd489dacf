"""Tests for mofkit: no network, CPU only. Sections follow mofkit.py's pipeline order."""
import os
import sys
import copy
import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mofkit  # noqa: E402
from helpers import (
    DDP_CHILD, DRIVE_ID, FAST, FIXTURES, H2_LIQUID_MOL_M3, ISODB, MOFXDB, PAYLOAD, REPO, TINY, blob_grids,
    cif_folder, colab_stand_in, coolprop_density, counting_voxelize, dataset_ids, density_at_fugacity, image_axes,
    isodb_records, local_repository, make_cif, mofxdb_pages, notebook_outputs, params_from_json, published_shards,
    random_grid, random_grids, serve_isodb, sha256_hex, sklearn_loo_1nn, small_framework, study_points,
    synthetic_shards, tag_with_worker, tiny_config)  # noqa: E402


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
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    import hashlib
    assert mofkit.sha256_file(target) == hashlib.sha256(b"first").hexdigest()


# --- download(): local HTTP server on 127.0.0.1 (tests/conftest.py) ---------------------------------------

from conftest import Reply, ranged  # noqa: E402


def test_download_success_verified_and_atomic(http_server, tmp_path):
    http_server.route("/shard.bin", PAYLOAD)
    dest = mofkit.download(f"{http_server.url}/shard.bin", tmp_path / "d" / "shard.bin", sha256_hex(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD
    assert os.listdir(dest.parent) == ["shard.bin"]
    # A present file with the right sha256 is kept without asking the server again.
    mofkit.download(f"{http_server.url}/shard.bin", dest, sha256_hex(PAYLOAD), **FAST)
    assert http_server.hits("/shard.bin") == 1


def test_download_retries_a_500_then_succeeds(http_server, tmp_path):
    http_server.route("/shard.bin", Reply(500), Reply(503), PAYLOAD)
    dest = mofkit.download(f"{http_server.url}/shard.bin", tmp_path / "shard.bin", sha256_hex(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD and http_server.hits("/shard.bin") == 3


def test_download_gives_up_on_a_hanging_server_with_a_clear_error(http_server, tmp_path):
    http_server.route("/slow.bin", Reply(body=PAYLOAD, delay_s=1.0))
    with pytest.raises(mofkit.DownloadError, match=r"slow\.bin.*failed after 2 attempts.*timed out"):
        mofkit.download(f"{http_server.url}/slow.bin", tmp_path / "slow.bin", **{**FAST, "timeout_s": 0.1,
                                                                                  "retries": 1})
    assert http_server.hits("/slow.bin") == 2
    assert os.listdir(tmp_path) == []


def test_download_rejects_a_truncated_body_and_leaves_nothing(http_server, tmp_path):
    http_server.route("/cut.bin", Reply(body=PAYLOAD[:1000], content_length=len(PAYLOAD)))
    with pytest.raises(mofkit.DownloadError) as err:
        mofkit.download(f"{http_server.url}/cut.bin", tmp_path / "cut.bin", **FAST)
    assert f"of the {len(PAYLOAD)} bytes announced by Content-Length arrived" in str(err.value)
    assert "cut.bin" in str(err.value)
    assert http_server.hits("/cut.bin") == 3  # retried (retries=2) before giving up
    assert os.listdir(tmp_path) == []


def test_download_rejects_a_corrupted_file_and_keeps_the_old_one(http_server, tmp_path):
    corrupted = bytearray(PAYLOAD)
    corrupted[100] ^= 1
    http_server.route("/shard.bin", bytes(corrupted))
    dest = tmp_path / "shard.bin"
    dest.write_bytes(b"old")
    with pytest.raises(mofkit.DownloadError) as err:
        mofkit.download(f"{http_server.url}/shard.bin", dest, sha256_hex(PAYLOAD), **FAST)
    message = str(err.value)
    assert sha256_hex(PAYLOAD) in message and sha256_hex(bytes(corrupted)) in message and str(dest) in message
    assert dest.read_bytes() == b"old" and os.listdir(tmp_path) == ["shard.bin"]


def test_download_resumes_with_range_after_a_dropped_connection(http_server, tmp_path):
    half = len(PAYLOAD) // 2
    cut = Reply(body=PAYLOAD[:half], content_length=len(PAYLOAD), headers={"Accept-Ranges": "bytes"})
    http_server.route("/shard.bin", cut, ranged(PAYLOAD))
    dest = mofkit.download(f"{http_server.url}/shard.bin", tmp_path / "shard.bin", sha256_hex(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD
    first, second = http_server.requests
    resumed_at = int(second.headers["Range"].removeprefix("bytes=").removesuffix("-"))
    assert "Range" not in first.headers and 0 < resumed_at <= half


def test_download_restarts_when_the_server_ignores_range(http_server, tmp_path):
    cut = Reply(body=PAYLOAD[:5000], content_length=len(PAYLOAD))
    http_server.route("/shard.bin", cut, PAYLOAD)  # answers the Range request with the whole file (200)
    dest = mofkit.download(f"{http_server.url}/shard.bin", tmp_path / "shard.bin", sha256_hex(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD


def test_download_does_not_retry_a_404(http_server, tmp_path):
    with pytest.raises(mofkit.DownloadError, match="HTTP 404"):
        mofkit.download(f"{http_server.url}/missing.bin", tmp_path / "missing.bin", **FAST)
    assert http_server.hits("/missing.bin") == 1 and os.listdir(tmp_path) == []


@pytest.mark.parametrize("url", [f"https://drive.google.com/file/d/{DRIVE_ID}/view?usp=sharing",
                                 f"https://drive.google.com/open?id={DRIVE_ID}",
                                 f"https://drive.google.com/uc?export=download&id={DRIVE_ID}"])
def test_download_google_drive_link_via_gdown(http_server, monkeypatch, tmp_path, url):
    # Drive answers a large file with a "can't scan for viruses" page whose form leads to the real download.
    http_server.intercept(monkeypatch, "drive.google.com", "drive.usercontent.google.com")
    form = ('<html><body><form id="download-form" action="https://drive.usercontent.google.com/download" '
            f'method="get"><input type="hidden" name="id" value="{DRIVE_ID}"><input type="hidden" '
            'name="export" value="download"><input type="hidden" name="confirm" value="t"></form></body></html>')
    http_server.route("/drive.google.com/uc", Reply(body=form.encode(), headers={"Content-Type": "text/html"}))
    http_server.route("/drive.usercontent.google.com/download", Reply(body=PAYLOAD, headers={
        "Content-Type": "application/octet-stream", "Content-Disposition": 'attachment; filename="shard.bin"'}))
    dest = mofkit.download(url, tmp_path / "shard.bin", sha256_hex(PAYLOAD), **FAST)
    assert dest.read_bytes() == PAYLOAD and os.listdir(tmp_path) == ["shard.bin"]
    assert http_server.requests[0].query["id"] == DRIVE_ID
    assert http_server.requests[1].query == {"id": DRIVE_ID, "export": "download", "confirm": "t"}


def test_download_google_drive_quota_error_is_clear(http_server, monkeypatch, tmp_path):
    http_server.intercept(monkeypatch, "drive.google.com")
    page = ('<html><body><p class="uc-error-subcaption">Too many users have viewed or downloaded this file '
            'recently. Please try accessing the file again later.</p></body></html>')
    http_server.route("/drive.google.com/uc", Reply(body=page.encode(), headers={"Content-Type": "text/html"}))
    with pytest.raises(mofkit.DownloadError) as err:
        mofkit.download(f"https://drive.google.com/file/d/{DRIVE_ID}/view", tmp_path / "s.bin", **FAST)
    message = str(err.value)
    assert "Too many users" in message and "quota" in message and "building the file locally" in message
    assert http_server.hits("/drive.google.com/uc") == 1  # a refusal is not retried
    assert os.listdir(tmp_path) == []


def test_download_gdown_returning_without_a_file_is_an_error(monkeypatch, tmp_path):
    import gdown
    monkeypatch.setattr(gdown, "download", lambda **kwargs: None)  # as gdown 5 does after e.g. a proxy error
    with pytest.raises(mofkit.DownloadError, match="would not serve"):
        mofkit.download(f"https://drive.google.com/open?id={DRIVE_ID}", tmp_path / "s.bin", **FAST)
    assert os.listdir(tmp_path) == []


def test_download_rejects_folder_links_and_other_schemes(tmp_path):
    with pytest.raises(mofkit.DownloadError, match="without a file id"):
        mofkit.download("https://drive.google.com/drive/folders/abc", tmp_path / "x", **FAST)
    with pytest.raises(mofkit.DownloadError, match="only http"):
        mofkit.download("ftp://example.org/x", tmp_path / "x", **FAST)
    assert os.listdir(tmp_path) == []


# --- ISODB and MOFX-DB clients -----------------------------------------------------------------------------


def test_isodb_table_parses_every_sample():
    table = mofkit.isodb_table(isodb_records()).set_index("filename")
    assert len(table) == 5
    cubtc = table.loc["10.1002adem.200500223.isotherm1"]
    assert (cubtc.doi, cubtc.adsorbent, cubtc.adsorbate, cubtc.temperature_K) == (
        "10.1002/adem.200500223", "CuBTC", "Hydrogen", 77.0)
    assert cubtc.adsorption[0] == 20.6782 and cubtc.note == ""
    assert cubtc.adsorption_mmol_g[0] == pytest.approx(0.923134, abs=5e-7)  # the study's row, 22.4 cm3(STP)/mmol
    assert cubtc.pressure_bar == cubtc.pressure
    volume = table.loc["10.1002adem.200500223.isotherm3"]
    assert volume.adsorption_mmol_g is None and volume.pressure_bar is not None
    assert volume.note == "unit '% Volume Adsorbed' not convertible to mmol/g"
    mixture = table.loc["10.1007s1045001193373.Isotherm11"]
    assert mixture.adsorbate == "Oxygen + Argon" and mixture.note == "mixture of 2 adsorbates"
    assert mixture.adsorption_mmol_g is None and mixture.adsorption[0] == 0.315
    wt = table.loc["10.1021Ja2021944.isotherm6"]
    assert wt.adsorption_units == "wt%" and wt.note == ""
    # 0.0902018 g H2 per 100 g = 0.902018 mg/g, over 2.01588 g/mol.
    np.testing.assert_allclose(wt.adsorption_mmol_g, np.array(wt.adsorption) * 10 / 2.01588, rtol=1e-12)
    assert wt.adsorption_mmol_g[0] == pytest.approx(0.447456, abs=1e-6)


def test_isodb_table_converts_pressure_units_and_flags_the_rest():
    base = isodb_records()[0]
    cases = {"Pa": 1e-5, "kPa": 1e-2, "MPa": 10.0, "atm": 1.01325, "torr": 101325 / 760 / 1e5,
             "mbar": 1e-3, "psi": 6894.757293168 / 1e5}
    for unit, bar_per_unit in cases.items():
        row = mofkit.isodb_table([{**base, "pressureUnits": unit}]).iloc[0]
        np.testing.assert_allclose(row.pressure_bar, np.array(row.pressure) * bar_per_unit, rtol=1e-9)
    relative = mofkit.isodb_table([{**base, "pressureUnits": "RELATIVE"}]).iloc[0]
    assert relative.pressure_bar is None and relative.note == "pressure unit 'RELATIVE' not convertible to bar"
    gap = json.loads(json.dumps(base))
    gap["isotherm_data"][2]["total_adsorption"] = None
    row = mofkit.isodb_table([gap]).iloc[0]
    assert row.note == "null total_adsorption" and row.adsorption_mmol_g is None
    water = {**base, "adsorbates": [{"InChIKey": "XLYOFNOQVPJJNP-UHFFFAOYSA-N", "name": "Water"}],
             "adsorptionUnits": "mg/g"}
    assert "molar mass of 'Water'" in mofkit.isodb_table([water]).iloc[0].note
    mg = mofkit.isodb_table([{**base, "adsorptionUnits": "mg/g"}]).iloc[0]
    assert mg.adsorption_mmol_g[0] == pytest.approx(20.6782 / 2.01588)
    failures = []  # a malformed record is skipped and recorded, never fails the table (issue 16)
    with pytest.warns(UserWarning, match="ISODB isotherm record not in the expected schema.*'filename'.*Not found"):
        assert len(mofkit.isodb_table([{"detail": "Not found."}, base], failures)) == 1
    assert failures[0][0] == "record 0" and "Not found" in failures[0][1]


def test_fetch_isodb_filters_the_index_and_caches(http_server, tmp_path):
    serve_isodb(http_server)
    kw = dict(base_url=http_server.url, cache_dir=tmp_path / "cache", progress=False, timeout_s=1, retries=0)
    table = mofkit.fetch_isodb(adsorbent="hkust-1", adsorbate="H2", temperature_K=77, **kw)
    assert list(table.filename) == ["10.1002adem.200500223.isotherm1"]
    assert list(mofkit.fetch_isodb(adsorbate="Hydrogen", **kw).filename) == [
        "10.1002adem.200500223.isotherm1", "10.1002adem.200500223.isotherm2", "10.1021Ja2021944.isotherm6"]
    assert len(mofkit.fetch_isodb(doi="10.1002/ADEM.200500223", **kw)) == 3
    served = len(http_server.requests)
    again = mofkit.fetch_isodb(adsorbent="CuBTC", adsorbate="h2", temperature_K=77.2, **kw)
    assert list(again.filename) == list(table.filename)
    assert len(http_server.requests) == served  # all from the on-disk cache
    with pytest.raises(ValueError, match="'MOF-9999' is not a material"):
        mofkit.fetch_isodb(adsorbent="MOF-9999", **kw)
    with pytest.raises(ValueError, match="give filenames or at least one filter"):
        mofkit.fetch_isodb(**kw)


def test_fetch_isodb_by_filename_retries_a_500(http_server, tmp_path):
    serve_isodb(http_server)
    name = "10.1002adem.200500223.isotherm1"
    record = json.loads((ISODB / f"{name}.json").read_text())
    http_server.route(f"/isodb/api/isotherm/{name}.json", Reply(500), record)
    table = mofkit.fetch_isodb(filenames=[name], base_url=http_server.url, cache_dir=None, progress=False,
                               backoff_s=0.01)
    assert table.iloc[0].adsorption_mmol_g[0] == pytest.approx(0.923134, abs=5e-7)
    assert http_server.hits(f"/isodb/api/isotherm/{name}.json") == 2


def test_fetch_json_malformed_is_a_clear_error_and_not_cached(http_server, tmp_path):
    http_server.route("/isodb/api/isotherm/broken.json", b'{"filename": "broken", "isotherm_data": [')
    url = f"{http_server.url}/isodb/api/isotherm/broken.json"
    with pytest.raises(mofkit.DownloadError, match=r"broken\.json: malformed JSON"):
        mofkit.fetch_json(url, cache_dir=tmp_path, retries=0)
    assert list(tmp_path.iterdir()) == []


def test_fetch_json_timeout_then_clear_error(http_server):
    http_server.route("/isodb/api/isotherms.json", Reply(body=b"[]", delay_s=1.0))
    with pytest.raises(mofkit.DownloadError, match=r"isotherms\.json: failed after 2 attempts.*timed out"):
        mofkit.fetch_json(f"{http_server.url}/isodb/api/isotherms.json", timeout_s=0.1, retries=1, backoff_s=0.01)


def test_isodb_biblio_uses_the_doi_stub(http_server):
    serve_isodb(http_server)
    assert mofkit.isodb_doi_stub("10.1007/s10450-011-9337-3") == "10.1007s1045001193373"
    biblio = mofkit.isodb_biblio("10.1002/adem.200500223", base_url=http_server.url, cache_dir=None)
    assert [i["filename"] for i in biblio["isotherms"]][0] == "10.1002adem.200500223.isotherm1"


def test_fetch_mofxdb_follows_pages_and_parses_isotherms(http_server, tmp_path):
    results, answer = mofxdb_pages()
    http_server.route("/mofs.json", answer)
    kw = dict(base_url=http_server.url, cache_dir=tmp_path, progress=False, retries=0)
    table = mofkit.fetch_mofxdb(database="Tobacco", **kw)
    assert [r.query for r in http_server.requests] == [{"database": "Tobacco", "page": str(p)} for p in (1, 2, 3)]
    assert list(table.name.unique()) == ["tobmof-345", "tobmof-344", "tobmof-351"]
    assert len(table) == sum(len(r["isotherms"]) for r in results)
    h2 = table[(table.name == "tobmof-345") & (table.adsorbate == "Hydrogen") & (table.temperature_K == 77)].iloc[0]
    assert h2.pressure_bar == [100.0, 6.0] and h2.adsorption_units == "cm3(STP)/g" and h2.note == ""
    assert h2.adsorption_mmol_g[1] == pytest.approx(690.2356409948538 / 22.4)
    assert h2.cif == results[0]["cif"]
    xekr = table[table.adsorbate == "Xenon + Krypton"]
    assert len(xekr) == 3 and set(xekr.note) == {"mixture of 2 adsorbates"}
    assert len(mofkit.fetch_mofxdb(database="Tobacco", max_pages=1, **kw).name.unique()) == 1
    assert len(http_server.requests) == 3  # page 1 again came from the cache


def test_fetch_mofxdb_converts_pascal(http_server, tmp_path):
    doc = json.loads((MOFXDB / "mofs.mofkey.QAHDUA_clean.json").read_text())
    http_server.route("/mofs.json", doc)
    table = mofkit.fetch_mofxdb(name="QAHDUA_clean", base_url=http_server.url, cache_dir=None, progress=False)
    n2 = table[table.adsorbate == "Nitrogen"].iloc[0]
    assert (n2.database, n2.temperature_K, n2.pressure_units, n2.note) == ("CoREMOF 2019", 77.0, "Pa", "")
    assert n2.pressure[:2] == [75.0, 100000.0]
    np.testing.assert_allclose(n2.pressure_bar[:2], [75e-5, 1.0])
    assert table[table.adsorbate == "Argon"].iloc[0].pressure_bar[0] == pytest.approx(0.6)
    assert n2.cif.startswith("data_image0")
    with pytest.raises(ValueError, match="give name, mofkey or database"):
        mofkit.fetch_mofxdb(base_url=http_server.url, cache_dir=None)


def test_mofxdb_table_keeps_a_mof_without_isotherms():
    mof = json.loads((MOFXDB / "mofs.mofkey.QAHDUA_clean.json").read_text())["results"][0]
    table = mofkit.mofxdb_table([{**mof, "isotherms": []}])
    assert len(table) == 1 and table.iloc[0].note == "no isotherms" and table.iloc[0].cif == mof["cif"]


def test_mofxdb_structures_reads_the_cifs():
    results = json.loads((MOFXDB / "mofs.page1.sample.json").read_text())["results"]
    broken = {**results[0], "name": "broken", "cif": "data_x\n_cell_length_a oops\n"}
    failures = []
    atoms = mofkit.mofxdb_structures(mofkit.mofxdb_table(results + [broken]), failures)
    assert list(atoms) == ["tobmof-345", "tobmof-344", "tobmof-351"]
    assert [name for name, _ in failures] == ["broken"]
    tobmof = atoms["tobmof-345"]
    assert len(tobmof) == 491 and tobmof.get_chemical_formula() == "C264H176Cu12N36Zn3"
    assert tobmof.info["name"] == "tobmof-345"
    np.testing.assert_allclose(tobmof.cell.cellpar(), [47.5795, 47.8407, 47.3675, 89.8089, 90.0725, 89.8585],
                               atol=1e-4)


# =============================================================================
# 2. Structures
# =============================================================================


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

def test_uff_and_probe_tables(uff_reference, probe_reference, coremof_elements):
    # values from a second transcription of Rappe et al. 1992 and the probes' own papers (tests/fixtures/forcefield)
    assert set(mofkit.UFF) == set(uff_reference) and len(mofkit.UFF) == 103   # UFF covers H..Lr
    assert set(coremof_elements) <= set(mofkit.UFF) and len(coremof_elements) == 77
    for element, (eps_K, sigma_A) in uff_reference.items():
        assert mofkit.UFF[element] == pytest.approx((eps_K, sigma_A), rel=1e-12), element
    assert mofkit.KCAL_PER_MOL_IN_K == pytest.approx(4184 / 8.314462618, rel=1e-5)   # 1 kcal/mol / k_B
    assert mofkit.PROBES == probe_reference


def test_single_atom_reproduces_analytic_lennard_jones():
    atoms = mofkit.read_structure(make_cif([("C", 0.5, 0.5, 0.5)], a=32.0))   # atom at (16,16,16) A
    eps = np.sqrt(0.105 * 503.22 * 34.2)            # Rappe et al. 1992: D_C 0.105 kcal/mol; Buch 1994: H2 34.2 K
    sig = (3.851 / 2 ** (1 / 6) + 2.96) / 2         # x_C = 3.851 A is the LJ minimum; H2 sigma 2.96 A
    r = np.array([2.5, 3.0, 3.5, 4.0, 6.0, 10.0, 12.5, 13.0])
    exact = np.where(r < 12.8, 4 * eps * ((sig / r) ** 12 - (sig / r) ** 6), 0.0)
    pts = np.stack([16 + r, np.full_like(r, 16.0), np.full_like(r, 16.0)], 1)
    np.testing.assert_allclose(mofkit.probe_energy(atoms, pts), exact, rtol=1e-12, atol=1e-12)
    grid = mofkit.voxelize(atoms, size=64, frame="cube", spacing_A=0.5, cap_K=1e9)
    assert grid.dtype == np.float32 and grid.shape == (64, 64, 64)
    np.testing.assert_allclose(grid[(32 + 2 * r).astype(int), 32, 32], exact, rtol=2e-5, atol=1e-4)
    assert grid.min() == pytest.approx(-eps, rel=1e-3)   # the well depth, on the sphere r = 2^(1/6) sigma


@pytest.mark.parametrize("name", ["ABAVIJ_clean", "ABIXOZ_clean", "ACUBAB_clean"])  # triclinic; 8.9 A thin hexagonal
def test_energies_match_float64_brute_force_on_coremof_cells(name, brute_force_lj):
    atoms = mofkit.load_coremof(name)
    rng = np.random.default_rng(0)
    pts = rng.uniform(-3.0, 20.0, size=(150, 3))
    ref = brute_force_lj(atoms, pts)
    np.testing.assert_allclose(mofkit.probe_energy(atoms, pts), ref, rtol=1e-9, atol=1e-9)
    for frame in ("cube", "cell"):
        grid = mofkit.voxelize(atoms, size=32, frame=frame, spacing_A=0.7)
        gp = mofkit.grid_points(atoms, 32, frame, 0.7).reshape(-1, 3)
        # mostly points in the pores (where the physics is), some anywhere (capped cores)
        idx = np.concatenate([rng.choice(np.flatnonzero(grid.reshape(-1) < 0), 100, replace=False),
                              rng.choice(len(gp), 50, replace=False)])
        ref = brute_force_lj(atoms, gp[idx])
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


def test_gpu_style_batching_over_structures_matches_one_by_one():
    """The large padded multi-structure batches a GPU gets are exercised here on the CPU."""
    structures = [mofkit.load_coremof("ABAVIJ_clean"), mofkit.load_coremof("ABIXOZ_clean")]
    one_by_one = [mofkit.voxelize(a, size=24, frame="cell", block=4) for a in structures]
    batched = mofkit.voxelize_many(structures, size=24, frame="cell", block=8, pairs_per_batch=50_000_000)
    for b, o in zip(batched, one_by_one):
        np.testing.assert_allclose(b, o, rtol=1e-4, atol=1e-3)


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


def test_capped_voxels_weigh_nothing_and_an_all_capped_grid_has_no_heat():
    T = 77.0
    grid = np.array([-300.0, 5000.0, 5000.0, 0.0])
    w = (np.exp(300 / T) + 1.0) / 4
    assert mofkit.widom_factor(grid, T, cap_K=5000.0) == pytest.approx(w, rel=1e-15)
    assert mofkit.widom_factor(grid, T) == pytest.approx(w + np.exp(-5000 / T) / 2, rel=1e-15)
    assert mofkit.heat_of_adsorption(grid, T, cap_K=5000.0) == pytest.approx(
        mofkit.heat_of_adsorption(grid[[0, 3]], T), rel=1e-15)
    with pytest.warns(UserWarning, match="no accessible voxel"):
        assert np.isnan(mofkit.heat_of_adsorption(np.full(8, 5000.0), T, cap_K=5000.0))


def test_voxelize_cell_spans_the_periodic_cell_and_matches_float64_energies():
    atoms = mofkit.load_coremof("ABAVIJ_clean")
    counts = mofkit.cell_grid_counts(atoms, 0.5)
    assert all(n % 8 == 0 and length / n <= 0.5 for n, length in zip(counts, atoms.cell.lengths()))
    grid = mofkit.voxelize_cell(atoms, 0.5, cap_K=1e9)
    assert grid.shape == counts
    idx = np.random.default_rng(0).integers(0, counts, (40, 3))
    ref = mofkit.probe_energy(atoms, (idx / counts) @ atoms.cell.array)   # float64 reference
    np.testing.assert_allclose(grid[tuple(idx.T)], np.minimum(ref, 1e9), rtol=1e-4, atol=1e-2)
    # the grid is the same lattice shifted by whole cells: a translated copy of the crystal gives the same mean
    shifted = atoms.copy()
    shifted.positions += atoms.cell.array.sum(0) * 0.37
    assert mofkit.widom_factor(mofkit.voxelize_cell(shifted, 0.5), 77.0) == pytest.approx(
        mofkit.widom_factor(grid, 77.0), rel=0.02)


def test_void_fraction_He_of_one_atom_in_a_big_cell_is_one_minus_its_excluded_volume():
    """Hand float64 reference: 1 - 4 pi int_0^rc (1 - exp(-u(r)/kT)) r^2 dr / V for one He-C pair (one image
    within the cutoff in a 30 A cell)."""
    import ase
    from scipy.integrate import quad
    atoms = ase.Atoms("C", positions=[[0.0, 0.0, 0.0]], cell=[30.0, 30.0, 30.0], pbc=True)
    (A,), (B,) = mofkit.pair_coefficients(["C"], "He")
    T, rc = 298.0, 12.8
    integrand = lambda r: (1 - np.exp(-(A / r ** 12 - B / r ** 6) / T)) * r ** 2
    excluded = 4 * np.pi * (quad(integrand, 1e-3, 4.0, points=[2.5, 3.0])[0] + quad(integrand, 4.0, rc)[0])
    expected = 1 - excluded / 30.0 ** 3
    assert mofkit.void_fraction_He(atoms, 0.3, cutoff_A=rc) == pytest.approx(expected, abs=2e-5)


def test_cell_properties_name_their_units_and_a_dense_solid_gets_nan_with_a_warning():
    import ase.build
    atoms = mofkit.load_coremof("ABAVIJ_clean")
    props = mofkit.cell_properties(atoms, spacing_A=0.5)
    assert set(props) == {"density_kg_m3", "temperature_K", "log10_KH_mol_kg_Pa", "Qst_kJ_mol", "void_fraction_He"}
    assert props["temperature_K"] == 77.0 and 0 < props["void_fraction_He"] < 1 and props["Qst_kJ_mol"] > 0
    grid = mofkit.voxelize_cell(atoms, 0.5)
    assert props["log10_KH_mol_kg_Pa"] == pytest.approx(np.log10(mofkit.henry_coefficient(
        grid, props["density_kg_m3"], 77.0, cap_K=5000.0)), rel=1e-12)
    assert mofkit.cell_properties(atoms, "CH4", spacing_A=0.5)["temperature_K"] == 298.0
    copper = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True)   # no room for H2 anywhere
    with pytest.warns(UserWarning, match="Cu4: no accessible voxel"):
        dense = mofkit.cell_properties(copper, spacing_A=0.5, name="Cu4")
    assert np.isnan(dense["log10_KH_mol_kg_Pa"]) and np.isnan(dense["Qst_kJ_mol"]) and dense["void_fraction_He"] < 1e-6
    window = mofkit.window_properties(mofkit.voxelize(atoms, 16, "cube", 1.0), props["density_kg_m3"])
    assert set(window) == {"window_log10_KH_mol_kg_Pa", "window_Qst_kJ_mol"}


# =============================================================================
# 4. Isotherms
# =============================================================================


def test_sips_with_K_fixed_reproduces_the_studys_published_row():
    P, q = study_points()
    fit = mofkit.fit_sips(P, q, fix_K=2.5)
    assert abs(fit.g_inf - 16.466949) < 1e-5
    assert fit.K == 2.5 and "K" in fit.fixed and np.isnan(fit.K_se)
    assert abs(fit.n - 1.328632) < 1e-5
    assert abs(fit.r2 - 0.996919) < 1e-5
    assert fit.n_points == 12 and fit.model == "sips"


def test_free_sips_and_true_freundlich_on_the_study_isotherm():
    P, q = study_points()
    sips, freundlich = mofkit.fit_sips(P, q), mofkit.fit_freundlich(P, q)
    assert sips.g_inf == pytest.approx(14.07, abs=0.01) and sips.K == pytest.approx(3.89, abs=0.01)
    assert sips.n == pytest.approx(1.143, abs=1e-3) and sips.r2 == pytest.approx(0.9986, abs=1e-4)
    assert freundlich.K == pytest.approx(11.42, abs=0.01) and freundlich.n == pytest.approx(2.43, abs=0.01)
    assert freundlich.r2 == pytest.approx(0.974, abs=1e-3)
    # the free fit has one more parameter and must not fit worse than K fixed at 2.5
    assert sips.r2 > mofkit.fit_sips(P, q, fix_K=2.5).r2 > freundlich.r2


def test_fit_statistics_match_their_definitions():
    P, q = study_points()
    fit = mofkit.fit_langmuir(P, q)
    resid = q - fit.Q_max * fit.b * P / (1 + fit.b * P)
    assert fit.r2 == pytest.approx(1 - np.sum(resid ** 2) / np.sum((q - q.mean()) ** 2), rel=1e-12)
    assert fit.rmse == pytest.approx(np.sqrt(np.mean(resid ** 2)), rel=1e-12)
    assert fit.aic == pytest.approx(12 * np.log(np.mean(resid ** 2)) + 2 * 2, rel=1e-12)
    # least squares optimum: the gradient J^T r vanishes (central differences, parameters as given)
    for name in ("Q_max", "b"):
        h = 1e-6 * fit.params[name]
        up, down = ({**fit.params, name: fit.params[name] + s * h} for s in (1, -1))
        langmuir = MODEL_FORMULAS["langmuir"]
        grad = (np.sum((q - langmuir(P, **up)) ** 2) - np.sum((q - langmuir(P, **down)) ** 2)) / (2 * h)
        assert abs(grad) * fit.params[name] < 1e-6


NOISELESS = [  # (fitter, true parameters, pressures, fitter kwargs)
    (mofkit.fit_freundlich, {"K": 11.4, "n": 2.4}, np.linspace(0.05, 1.0, 15), {}),
    (mofkit.fit_sips, {"g_inf": 14.0, "K": 3.9, "n": 1.15}, np.linspace(0.05, 1.0, 15), {}),
    (mofkit.fit_sips, {"g_inf": 16.5, "K": 2.5, "n": 1.33}, np.linspace(0.05, 1.0, 15), {"fix_K": 2.5}),
    (mofkit.fit_langmuir, {"Q_max": 12.8, "b": 4.9}, np.linspace(0.05, 1.0, 15), {}),
    (mofkit.fit_bet, {"q_m": 8.0, "C": 80.0, "P0": 1.0}, np.linspace(0.05, 0.3, 15), {"p0": 1.0}),
]


# the models as their papers write them, independent of mofkit's own model functions
MODEL_FORMULAS = {
    "freundlich": lambda P, K, n: K * P ** (1 / n),
    "sips": lambda P, g_inf, K, n: g_inf * (K * P) ** (1 / n) / (1 + (K * P) ** (1 / n)),
    "langmuir": lambda P, Q_max, b: Q_max * b * P / (1 + b * P),
    "bet": lambda P, q_m, C, P0: q_m * C * (P / P0) / ((1 - P / P0) * (1 - P / P0 + C * P / P0)),
}


def _model_values(fitter, true, P):
    return MODEL_FORMULAS[fitter.__name__[4:]](P, **true)


@pytest.mark.parametrize("fitter,true,P,kwargs", NOISELESS)
def test_isotherm_fits_recover_noiseless_parameters(fitter, true, P, kwargs):
    fit = fitter(P, _model_values(fitter, true, P), **kwargs)
    for name, value in true.items():
        assert fit.params[name] == pytest.approx(value, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)


def test_freundlich_log_space_recovers_noiseless_parameters():
    P = np.geomspace(0.01, 10, 9)
    fit = mofkit.fit_freundlich(P, 3.0 * P ** (1 / 1.7), log_space=True)
    assert fit.log_space and fit.K == pytest.approx(3.0, rel=1e-6) and fit.n == pytest.approx(1.7, rel=1e-6)


@pytest.mark.parametrize("fitter,true,P,kwargs", NOISELESS)
def test_isotherm_standard_errors_cover_the_truth_under_2pct_noise(fitter, true, P, kwargs):
    # 1000 seeded data sets, Gaussian noise of 2% of the largest uptake (the least-squares model's own
    # assumption). A calibrated se puts the truth within 1 se and 2 se as often as Student's t with m - k
    # degrees of freedom says (66% and 93% for 12-13); binomial sd 1.5% and 0.8%. The bounds allow the
    # models' mild nonlinearity (measured: 0.66-0.69 and 0.93-0.94) and fail for se 10% too small
    # (0.62, 0.91); test_isotherm_fit_parameters_and_standard_errors_equal_curve_fit pins se to 2%.
    from scipy.stats import t as student
    q_true = _model_values(fitter, true, P)
    rng = np.random.default_rng(9)
    z = []
    for _ in range(1000):
        fit = fitter(P, q_true + 0.02 * q_true.max() * rng.standard_normal(P.size), **kwargs)
        z.append([(fit.params[p] - v) / fit.se[p] for p, v in true.items() if p not in fit.fixed])
    z = np.abs(np.array(z))
    dof = P.size - z.shape[1]
    within_1, within_2 = 2 * student.cdf(1, dof) - 1, 2 * student.cdf(2, dof) - 1
    assert (abs((z < 1).mean(0) - within_1 - 0.01) <= 0.035).all(), ((z < 1).mean(0), within_1)
    assert (abs((z < 2).mean(0) - within_2) <= 0.015).all(), ((z < 2).mean(0), within_2)


def test_freundlich_log_space_errors_cover_the_truth_under_2pct_relative_noise():
    # as above: 1000 data sets, coverage as Student's t with 13 degrees of freedom says (0.664, 0.933)
    P, rng, z = np.linspace(0.05, 1.0, 15), np.random.default_rng(3), []
    for _ in range(1000):
        fit = mofkit.fit_freundlich(P, 11.4 * P ** (1 / 2.4) * (1 + 0.02 * rng.standard_normal(P.size)),
                                    log_space=True)
        z.append([(fit.K - 11.4) / fit.K_se, (fit.n - 2.4) / fit.n_se])
    z = np.abs(np.array(z))
    assert (abs((z < 1).mean(0) - 0.664 - 0.01) <= 0.035).all() and (abs((z < 2).mean(0) - 0.933) <= 0.015).all()


BAD_INPUTS = [
    (([0.1, np.nan, 0.3], [1, 2, 3]), "pressure has NaN/inf at index \\[1\\]"),
    (([0.1, 0.2, 0.3], [1, np.inf, 3]), "adsorption has NaN/inf"),
    # negative points are dropped with a warning, or kept by linear-space fits: tests/test_reliability.py
    (([0.1, 0.2], [1, 2]), "only 2 usable points"),
    (([0.1, 0.2, 0.3], [0, 0, 0]), "zero at every point"),
    (([0.1, 0.2, 0.3, 0.4], [1, 2, 3]), "4 points but adsorption has 3"),
]


@pytest.mark.parametrize("fitter", [mofkit.fit_freundlich, mofkit.fit_sips, mofkit.fit_langmuir,
                                    lambda P, q: mofkit.fit_bet(P, q, p0=1.0, p_range=(0.0, 0.9))])
@pytest.mark.parametrize("data,message", BAD_INPUTS)
def test_isotherm_fits_reject_bad_input_by_name(fitter, data, message):
    with pytest.raises(ValueError, match=message):
        fitter(*data)


def test_freundlich_drops_zero_pressure_points_with_a_warning():
    P = np.array([0.0, 0.1, 0.2, 0.5, 1.0])
    with pytest.warns(UserWarning, match="dropped 1 zero-pressure point"):
        fit = mofkit.fit_freundlich(P, np.r_[0.0, 2.0 * P[1:] ** 0.5])
    assert fit.n_points == 4 and fit.n == pytest.approx(2.0, rel=1e-6)
    # a zero uptake at P > 0 is data in linear space (it only spoils the log-log start)
    q = [0.0, 2.0 * 0.2 ** 0.5, 2.0 * 0.5 ** 0.5, 2.0]
    fit = mofkit.fit_freundlich(P[1:], q)
    from scipy.optimize import curve_fit
    reference, _ = curve_fit(lambda P, K, n: K * P ** (1 / n), P[1:], q, p0=(2.0, 2.0),
                             xtol=1e-14, ftol=1e-14)
    assert fit.n_points == 4
    np.testing.assert_allclose([fit.K, fit.n], reference, rtol=1e-6)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="only 2 usable"):
        mofkit.fit_freundlich([0.0, 0.0, 0.1, 0.2], [0.0, 0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="fixed sips parameter K=-1"):
        mofkit.fit_sips([0.1, 0.2, 0.3], [1, 2, 3], fix_K=-1)


def test_bet_p0_lookup_validity_range_and_rouquerol():
    assert mofkit.saturation_pressure_bar("Nitrogen", 77.355) == pytest.approx(1.01325, rel=1e-12)
    # reference equation-of-state values (Span et al. 2000, Tegeler et al. 1999, via CoolProp)
    assert mofkit.saturation_pressure_bar("N2", 77.0) == pytest.approx(0.971523, rel=1e-3)
    assert mofkit.saturation_pressure_bar("Argon", 87.0) == pytest.approx(0.981313, rel=1e-3)
    with pytest.raises(ValueError, match="Hydrogen"):
        mofkit.saturation_pressure_bar("Hydrogen", 77.0)
    with pytest.raises(ValueError, match="pass p0"):
        mofkit.saturation_pressure_bar("N2", 90.0)
    p0 = mofkit.saturation_pressure_bar("N2", 77.0)
    P = np.linspace(0.01, 0.95, 60) * p0
    q_bet = MODEL_FORMULAS["bet"](P, 10.0, 150.0, p0)
    fit = mofkit.fit_bet(P, q_bet, adsorbate="Nitrogen", temperature_K=77.0)
    assert fit.q_m == pytest.approx(10.0, rel=1e-6) and fit.C == pytest.approx(150.0, rel=1e-6)
    x = P / p0
    assert fit.n_points == np.sum((x >= 0.05) & (x <= 0.30)) and fit.P0 == p0
    # a type-I (Langmuir-like) isotherm: Rouquerol keeps points up to the maximum of q (1 - x)
    q_type1 = MODEL_FORMULAS["langmuir"](x, 10.0, 200.0)
    fit = mofkit.fit_bet(P, q_type1, p0=p0, p_range="rouquerol")
    assert fit.pressure_range[1] / p0 == pytest.approx(x[np.argmax(q_type1 * (1 - x))])
    with pytest.raises(ValueError, match="BET range"):
        mofkit.fit_bet(P[x > 0.5], q_bet[x > 0.5], p0=p0)


def test_fit_isotherm_table_fits_good_rows_and_keeps_bad_ones_with_the_reason():
    import pandas as pd
    records = [json.loads((FIXTURES / "isodb" / f"{name}.json").read_text()) for name in
               ("10.1002adem.200500223.isotherm1", "10.1002adem.200500223.isotherm3",
                "10.1007s1045001193373.Isotherm11")]
    rows = mofkit.isodb_table(records).to_dict("records")
    bad = dict(rows[0], filename="bad", adsorption_mmol_g=[np.nan] + rows[0]["adsorption_mmol_g"][1:])
    table = mofkit.fit_isotherm_table(pd.DataFrame(rows + [bad]), "sips", progress=False, fix_K=2.5)
    assert list(table.filename) == [r["filename"] for r in rows] + ["bad"]
    assert table.g_inf[0] == pytest.approx(16.466949, abs=1e-5) and table.r2[0] == pytest.approx(0.996919, abs=1e-5)
    assert table.n[0] == pytest.approx(1.328632, abs=1e-5) and table.K[0] == 2.5 and table.fit_error[0] == ""
    assert "not convertible" in table.fit_error[1] and "mixture of 2" in table.fit_error[2]
    assert "NaN/inf" in table.fit_error[3] and table[["g_inf", "n", "r2"]].iloc[1:].isna().all().all()
    assert {"doi", "adsorbent", "adsorbate", "temperature_K", "g_inf_se", "n_points"} <= set(table.columns)


def test_fit_isotherm_table_reads_user_csv_layouts(tmp_path):
    import pandas as pd
    P, q = study_points()
    wide = tmp_path / "wide.csv"
    pd.DataFrame({"name": ["cubtc", "empty"], "pressure": [json.dumps(P.tolist()), None],
                  "adsorption": [json.dumps(q.tolist()), None], "note": ["", ""]}).to_csv(wide, index=False)
    long = pd.DataFrame({"isotherm": ["a"] * 12 + ["b"] * 12, "pressure": np.r_[P, P],
                         "adsorption": np.r_[q, 2 * q]})
    expected = mofkit.fit_freundlich(P, q)
    by_list = mofkit.fit_isotherm_table(pd.read_csv(wide), progress=False)
    by_point = mofkit.fit_isotherm_table(long, progress=False)
    assert by_list.K[0] == pytest.approx(expected.K, rel=1e-9) and by_list["name"][0] == "cubtc"
    assert by_list.fit_error[0] == "" and "no points" in by_list.fit_error[1]  # empty note reads back NaN
    assert list(by_point.isotherm) == ["a", "b"] and by_point.K[1] == pytest.approx(2 * expected.K, rel=1e-6)
    np.testing.assert_allclose(by_point.n, expected.n, rtol=1e-6)
    assert (by_point.fit_error == "").all()
    with pytest.raises(ValueError, match="pressure_bar/adsorption_mmol_g or pressure/adsorption"):
        mofkit.fit_isotherm_table(pd.DataFrame({"p": [1]}))


def test_plot_isotherm_fits_writes_figure_and_table(tmp_path):
    P, q = study_points()
    fits = {"study: Sips, K = 2.5": mofkit.fit_sips(P, q, fix_K=2.5), "Sips": mofkit.fit_sips(P, q),
            "Freundlich": mofkit.fit_freundlich(P, q)}
    fig, table = mofkit.plot_isotherm_fits(P, q, fits, path=tmp_path / "fits.png")
    assert (tmp_path / "fits.png").read_bytes()[:4] == b"\x89PNG"
    assert list(table.index) == list(fits) and table.loc["Freundlich", "R²"] == f"{fits['Freundlich'].r2:.6f}"
    assert "K = 2.5 bar⁻¹ (fixed)" in table.loc["study: Sips, K = 2.5", "parameters"]  # no standard error
    assert {m: set(u) for m, u in mofkit._PARAM_UNITS.items()} == {m: set(v.params) for m, v in
                                                                     mofkit._MODELS.items()}  # every model's
    f = fits["Freundlich"]  # every parameter with its unit (Freundlich K's depends on n)
    assert table.loc["Freundlich", "parameters"] == (f"K = {f.K:.6g} ± {f.K_se:.2g} mmol g⁻¹ bar^(−1/n); "
                                                     f"n = {f.n:.6g} ± {f.n_se:.2g}")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # every text inside its own cell: nothing runs into a neighbour (the old 7 pt table did)
    renderer = canvas.get_renderer()
    for key, cell in fig.axes[1].tables[0].get_celld().items():
        box, text = cell.get_window_extent(renderer), cell.get_text().get_window_extent(renderer)
        assert box.x0 - 1 <= text.x0 and text.x1 <= box.x1 + 1, key


def test_lattice_gas_isotherm_of_uniform_grid_is_exactly_langmuir():
    E0, T, rho = -400.0, 77.0, 900.0
    P = np.geomspace(1e-4, 100, 13)
    iso = mofkit.lattice_gas_isotherm(np.full((4, 4, 4), E0), T, P, "H2", density_kg_m3=rho)
    b_per_bar = np.exp(-E0 / T) / (mofkit.R_J_PER_MOL_K * T * H2_LIQUID_MOL_M3) * 1e5
    Q = H2_LIQUID_MOL_M3 / rho  # mol/kg = mmol/g
    np.testing.assert_allclose(iso.absolute_mmol_g, Q * b_per_bar * P / (1 + b_per_bar * P), rtol=1e-12)
    np.testing.assert_allclose(iso.absolute_cm3_stp_g, iso.absolute_mmol_g * 22.414, rtol=1e-15)
    fit = mofkit.fit_langmuir(P, iso.absolute_mmol_g)
    assert fit.b == pytest.approx(b_per_bar, rel=1e-6) and fit.Q_max == pytest.approx(Q, rel=1e-6)
    assert iso.model == "lattice_gas" and np.isnan(iso.excess_mmol_g).all()  # no void fraction given


@pytest.mark.parametrize("isotherm", [mofkit.grid_isotherm, mofkit.lattice_gas_isotherm])
def test_grid_isotherms_reduce_to_the_widom_henry_law(isotherm):
    grid, T, rho = random_grid(), 77.0, 1200.0
    widom = np.mean(np.exp(-grid.astype(np.float64) / T))  # over every voxel, capped ones included
    henry_mmol_g_bar = widom / (mofkit.R_J_PER_MOL_K * T * rho) * 1e5
    P = np.array([1e-22, 1e-20])  # deepest site: b ~ 1e11/bar, so b P < 1e-10
    iso = isotherm(grid, T, P, density_kg_m3=rho)
    np.testing.assert_allclose(iso.absolute_mmol_g / P, henry_mmol_g_bar, rtol=1e-10)
    assert iso.henry_mmol_g_bar == pytest.approx(henry_mmol_g_bar, rel=1e-10)


@pytest.mark.parametrize("probe, T", [("H2", 77.0), ("CH4", 298.0)])
def test_grid_isotherm_henry_limit_matches_henry_coefficient_on_a_real_grid(probe, T):
    atoms = mofkit.load_coremof("ABAVIJ_clean")
    grid, rho = mofkit.voxelize(atoms, size=16, frame="cell", probe=probe), mofkit.framework_density(atoms)
    iso = mofkit.grid_isotherm(grid, T, [1e-22], probe, density_kg_m3=rho)
    henry_mmol_g_bar = mofkit.henry_coefficient(grid, rho, T, cap_K=5000.0) * 1e5  # mol/kg/Pa -> mmol/g/bar
    assert iso.absolute_mmol_g[0] / 1e-22 == pytest.approx(henry_mmol_g_bar, rel=1e-10)
    assert iso.henry_mmol_g_bar == pytest.approx(henry_mmol_g_bar, rel=1e-10)
    assert 0 < iso.accessible_fraction < 1


def test_lattice_gas_saturates_at_accessible_pore_volume_times_liquid_density():
    grid, T, rho = random_grid(seed=1), 77.0, 1200.0
    accessible = np.mean(grid < 5000.0)  # voxels below the cap
    q_sat = accessible / rho * 70.85 / 2.01588e-3  # pore volume per kg x liquid H2 -> mol/kg
    iso = mofkit.lattice_gas_isotherm(grid, T, [1.0, 100.0, 1e60], density_kg_m3=rho)
    assert iso.accessible_fraction == accessible and iso.absolute_mmol_g[-1] == pytest.approx(q_sat, rel=1e-12)
    assert 0 < iso.absolute_mmol_g[0] < iso.absolute_mmol_g[1] < iso.absolute_mmol_g[2]
    # GAN output has repulsion clipped to 0 K: cap_K=0 keeps only attractive voxels
    gan = np.minimum(grid, 0.0)
    iso_gan = mofkit.lattice_gas_isotherm(gan, T, [1e60], density_kg_m3=rho, cap_K=0.0)
    assert iso_gan.accessible_fraction == np.mean(grid < 0)
    with pytest.raises(ValueError, match="no liquid density"):
        mofkit.lattice_gas_isotherm(grid, T, [1.0], probe="He", density_kg_m3=rho)


def test_grid_isotherm_rejects_bad_input_by_name():
    grid = random_grid()
    with pytest.raises(ValueError, match="density_kg_m3 > 0"):
        mofkit.grid_isotherm(grid, 77.0, [1.0], density_kg_m3=0.0)
    with pytest.raises(ValueError, match="NaN"):
        mofkit.grid_isotherm(np.full(8, np.nan), 77.0, [1.0], density_kg_m3=900.0)
    with pytest.raises(ValueError, match="no equation of state for gas 'SF6'"):
        mofkit.grid_isotherm(grid, 298.0, [1.0], probe="SF6", density_kg_m3=900.0)
    with pytest.raises(ValueError, match="beyond CoolProp's equation of state"):
        mofkit.grid_isotherm(grid, 77.0, [1e5], density_kg_m3=900.0)  # 10 GPa: H2 is solid at 77 K


@pytest.mark.parametrize("probe, fluid, T", [("H2", "Hydrogen", 77.0), ("CH4", "Methane", 298.0)])
def test_lda_with_no_field_is_the_bulk_fluid(probe, fluid, T):
    P_bar = np.array([0.01, 1.0, 6.0, 100.0, 300.0])
    rho_fw = 1000.0
    iso = mofkit.grid_isotherm(np.zeros((3, 3, 3)), T, P_bar, probe, density_kg_m3=rho_fw, void_fraction=1.0)
    bulk = np.array([coolprop_density(fluid, T, p * 1e5)[0] for p in P_bar])
    np.testing.assert_allclose(iso.absolute_mmol_g * rho_fw, bulk, rtol=1e-12)
    np.testing.assert_allclose(iso.bulk_density_mol_m3, bulk, rtol=1e-12)
    np.testing.assert_allclose(iso.excess_mmol_g, 0.0, atol=1e-12 * bulk.max())  # all pore is bulk: no excess


def test_lda_matches_a_hand_computed_two_voxel_grid():
    """float64 by hand: each voxel holds the density at fugacity f exp(-E/kT), f from CoolProp at P; one voxel
    inside an atom holds nothing; excess subtracts the bulk over the given void fraction."""
    T, rho_fw, P = 77.0, 500.0, np.array([1.0, 50.0])
    grid = np.array([-600.0, -150.0, 200.0, 5000.0])
    iso = mofkit.grid_isotherm(grid, T, P, density_kg_m3=rho_fw, void_fraction=0.6)
    for k, p in enumerate(P):
        bulk, f = coolprop_density("Hydrogen", T, p * 1e5)
        local = [density_at_fugacity("Hydrogen", T, f * np.exp(-e / T)) for e in grid[:3]]
        q = sum(local) / 4 / rho_fw
        assert iso.absolute_mmol_g[k] == pytest.approx(q, rel=3e-5)   # table interpolation
        assert iso.excess_mmol_g[k] == pytest.approx(q - bulk * 0.6 / rho_fw, rel=3e-5)


def test_lda_condenses_below_the_critical_temperature():
    """Argon at 87 K (P_sat ~ 1 bar): a voxel whose local fugacity passes the saturation fugacity holds liquid."""
    import CoolProp.CoolProp as CP
    T = 87.0
    sat = CP.AbstractState("HEOS", "Argon")
    sat.update(CP.QT_INPUTS, 0.0, T)
    liquid, f_sat, p_sat = sat.rhomolar(), sat.fugacity(0), sat.p()
    P = 0.5 * p_sat / 1e5                                        # bulk: gas
    f = coolprop_density("Argon", T, P * 1e5)[1]
    e_cond = -T * np.log(1.05 * f_sat / f)                        # local fugacity 1.05 f_sat: liquid
    e_gas = -T * np.log(0.95 * f_sat / f)                         # 0.95 f_sat: still gas
    q = mofkit.grid_isotherm(np.array([e_cond, e_gas]), T, [P], "Ar", density_kg_m3=1.0).absolute_mmol_g[0]
    by_hand = (density_at_fugacity("Argon", T, 1.05 * f_sat) + density_at_fugacity("Argon", T, 0.95 * f_sat)) / 2
    assert q == pytest.approx(by_hand, rel=1e-4) and by_hand > 0.5 * liquid


def test_peng_robinson_constants_and_dilute_limit():
    import CoolProp.CoolProp as CP
    for gas, (Tc, Pc, omega) in mofkit._CRITICAL.items():
        state = CP.AbstractState("HEOS", mofkit._COOLPROP_NAMES[gas])
        assert (Tc, Pc, omega) == pytest.approx((state.T_critical(), state.p_critical(), state.acentric_factor()),
                                                rel=1e-3, abs=1e-4)
    # PR's second virial coefficient is b - a/(RT): Z = 1 + B P/(RT) + O(P^2)
    T, P = 298.0, 1e3
    Tc, Pc, omega = mofkit._CRITICAL["CH4"]
    R = mofkit.R_J_PER_MOL_K
    kappa = 0.37464 + 1.54226 * omega - 0.26992 * omega ** 2
    a = 0.45724 * R ** 2 * Tc ** 2 / Pc * (1 + kappa * (1 - np.sqrt(T / Tc))) ** 2
    B = 0.07780 * R * Tc / Pc - a / (R * T)
    rho, f = mofkit.bulk_fluid("CH4", T, [P], eos="peng-robinson")
    assert P / (rho[0] * R * T) == pytest.approx(1 + B * P / (R * T), rel=1e-9)
    assert f[0] / P == pytest.approx(np.exp(B * P / (R * T)), rel=1e-9)   # ln phi = B P / RT to first order
    cool = mofkit.bulk_fluid("H2", 77.0, [1e7])[0][0]
    assert mofkit.bulk_fluid("H2", 77.0, [1e7], eos="peng-robinson")[0][0] == pytest.approx(cool, rel=0.15)


def test_grid_freundlich_is_henry_law_for_a_weak_uniform_grid_and_sublinear_for_a_real_one():
    rho, T = 900.0, 77.0
    weak = np.full((4, 4, 4), 400.0)  # local fugacity < 0.006 bar up to 1 bar: the Henry regime
    fit = mofkit.grid_freundlich(weak, T, density_kg_m3=rho)
    P = np.geomspace(0.01, 1.0, 12)
    iso = mofkit.grid_isotherm(weak, T, P, density_kg_m3=rho)
    f_bar = mofkit.bulk_fluid("H2", T, P * 1e5)[1] / 1e5   # bulk H2 at 77 K: f 0.16% below P at 1 bar
    np.testing.assert_allclose(iso.absolute_mmol_g, iso.henry_mmol_g_bar * f_bar, rtol=1e-4)  # Henry in f
    assert fit.n == pytest.approx(1.0, rel=3e-3) and fit.K == pytest.approx(iso.henry_mmol_g_bar, rel=3e-3)
    atoms = mofkit.load_coremof("ABAVIJ_clean")
    real = mofkit.voxelize(atoms, size=16, frame="cell")
    strong = mofkit.grid_freundlich(real, T, density_kg_m3=mofkit.framework_density(atoms))
    assert strong.n > 1.5 and strong.K > 0


# =============================================================================
# 5. Shards
# =============================================================================


def test_shard_round_trip_is_float16_npy_with_footer(tmp_path):
    rng = np.random.default_rng(0)
    grids = rng.uniform(-2000, 5000, (3, 2, 8, 8, 8)).astype(np.float32)
    meta = {"source": "x", "params": {"size": 8}, "members": ["a", "b", "c", "d"], "names": ["a", "b", "c"],
            "failures": [["d", "ValueError: bad"]], "properties": {"columns": ["p"], "rows": [[1.5], [None], [3]]}}
    path = tmp_path / "shard_00000.npy"
    mofkit.write_shard(path, grids, meta)
    back = mofkit.read_shard_meta(path)
    assert {k: back[k] for k in meta} == meta and back["shape"] == [3, 2, 8, 8, 8]
    plain = np.load(path, mmap_mode="r")  # any numpy reads the grids as a plain .npy
    assert plain.dtype == np.float16 and plain.shape == grids.shape
    np.testing.assert_allclose(plain.astype(np.float32), grids, rtol=2 ** -11)
    assert path.stat().st_size - grids.size * 2 < 600  # header + footer (with its name and two sha256) only
    mapped, _ = mofkit.open_shard(path)
    assert isinstance(mapped, np.memmap)
    assert np.array_equal(mapped[1], plain[1])
    with pytest.raises(ValueError, match="finite"):
        mofkit.write_shard(tmp_path / "big.npy", np.full((1, 1, 2, 2, 2), 70000.0), meta)
    assert not (tmp_path / "big.npy").exists()


@pytest.mark.parametrize("cut", ["footer", "data", "header", "empty"])
def test_truncated_shard_gives_error_naming_file(tmp_path, cut):
    path = synthetic_shards(tmp_path, [3])[0]
    data = path.read_bytes()
    keep = {"footer": len(data) - 5, "data": 300, "header": 20, "empty": 0}[cut]
    path.write_bytes(data[:keep])
    with pytest.raises(mofkit.ShardError, match=r"shard_00000\.npy.*(truncated|header).*delete it"):
        mofkit.read_shard_meta(path)
    with pytest.raises(mofkit.ShardError, match="shard_00000"):
        mofkit.ShardDataset([path])


def test_shard_dataset_yields_every_grid_once_per_epoch_in_seeded_order(tmp_path):
    paths = synthetic_shards(tmp_path, [5, 3, 4, 6])
    data = mofkit.ShardDataset(paths, seed=1)
    assert data.num_grids == len(data) == 18
    x = next(iter(data))
    assert x.dtype == torch.float32 and x.shape == (1, 4, 4, 4)
    epoch0 = dataset_ids(data)
    data.set_epoch(1)
    epoch1 = dataset_ids(data)
    assert sorted(epoch0) == sorted(epoch1) == list(range(18))
    assert epoch0 != epoch1
    assert dataset_ids(mofkit.ShardDataset(paths, seed=1)) == epoch0  # same seed, same order
    assert dataset_ids(mofkit.ShardDataset(paths, seed=2)) != epoch0
    assert dataset_ids(mofkit.ShardDataset(tmp_path, shuffle=False)) == list(range(18))  # a folder works too
    # in-shard shuffling, not only shard order: some shard's ids come out of order
    assert any(np.diff([i for i in epoch0 if lo <= i < hi]).min() < 0 for lo, hi in [(0, 5), (8, 12), (12, 18)])


def test_shard_dataset_ranks_get_disjoint_shards_and_equal_counts(tmp_path):
    paths = synthetic_shards(tmp_path, [4, 4, 4, 4])
    ranks = [mofkit.ShardDataset(paths, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = [dataset_ids(d) for d in ranks]
    assert len(seen[0]) == len(seen[1]) == len(ranks[0]) == 8
    assert sorted(seen[0] + seen[1]) == list(range(16))
    assert {i // 4 for i in seen[0]}.isdisjoint({i // 4 for i in seen[1]})  # whole shards per rank
    uneven = synthetic_shards(tmp_path / "uneven", [5, 2, 4])  # DDP needs equal step counts
    ranks = [dataset_ids(mofkit.ShardDataset(uneven, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) and not set(ranks[0]) & set(ranks[1])
    with pytest.raises(ValueError, match="3 shards cannot feed 4 ranks"):
        list(mofkit.ShardDataset(uneven, world_size=4, rank=0))


def test_shard_dataset_workers_split_batches_and_keep_the_order(tmp_path):
    paths = synthetic_shards(tmp_path, [5, 3, 4, 6])
    data = mofkit.ShardDataset(paths, seed=4, batch_size=3)
    data.set_epoch(2)
    single = dataset_ids(data)
    loader = torch.utils.data.DataLoader(data, batch_size=3, num_workers=2)
    batches = [b[:, 0, 0, 0, 0].int().tolist() for b in loader]
    assert sum(batches, []) == single  # same order as num_workers=0: exact resume does not depend on workers
    assert len(batches) == 6 and all(len(b) == 3 for b in batches)
    # each worker reads only its own batches, every other one: tag each grid with the worker that read it
    tagged = mofkit.ShardDataset(paths, seed=4, batch_size=3, transform=tag_with_worker)
    tagged.set_epoch(2)
    batches = [b[:, 0, 0, 0, 0].int().tolist() for b in torch.utils.data.DataLoader(tagged, batch_size=3,
                                                                                     num_workers=2)]
    assert [{v // 1000 for v in b} for b in batches] == [{1}, {2}] * 3
    assert [v % 1000 for b in batches for v in b] == single
    data.set_epoch(2, start=7)
    assert sum((b[:, 0, 0, 0, 0].int().tolist() for b in loader), []) == single[7:]


def test_shard_dataset_start_skips_exactly_without_reading(tmp_path, monkeypatch):
    paths = synthetic_shards(tmp_path, [5, 3, 4, 6])
    data = mofkit.ShardDataset(paths, seed=5)
    data.set_epoch(3)
    full = dataset_ids(data)
    opened = []
    real_open = mofkit.open_shard
    monkeypatch.setattr(mofkit, "open_shard", lambda p: opened.append(Path(p).name) or real_open(p))
    for k in [0, 1, 5, 9, 17, 18, 30]:
        data.set_epoch(3, start=k)
        assert dataset_ids(data) == full[k:] and len(data) == len(full[k:])
    opened.clear()
    data.set_epoch(3, start=17)
    assert dataset_ids(data) == full[17:] and len(opened) == 1  # skipped shards are never opened
    data.set_epoch(4)
    assert len(data) == 18  # start applies to one epoch only


def test_shard_dataset_maps_at_most_two_shards_and_collects_only_between_shards(tmp_path, monkeypatch):
    import weakref
    paths = synthetic_shards(tmp_path, [3, 2, 4, 1])
    maps, events = [], []
    real_open = mofkit.open_shard

    def tracked_open(path):
        grids, meta = real_open(path)
        maps.append(weakref.ref(grids))
        return grids, meta

    monkeypatch.setattr(mofkit, "open_shard", tracked_open)
    monkeypatch.setattr(mofkit.gc, "collect", lambda *a: events.append("gc"))
    for x in mofkit.ShardDataset(paths, seed=6):
        events.append(sum(m() is not None for m in maps))
    assert max(e for e in events if e != "gc") <= 2
    assert len(maps) == 4 and all(m() is None for m in maps)  # every map released
    runs = "".join("g" if e == "gc" else "s" for e in events)
    # one collection after each shard, none between the samples of a shard
    assert runs.endswith("g") and sorted(len(r) for r in runs.split("g")[:-1]) == [1, 2, 3, 4]


def test_shard_dataset_channels_transform_index_and_metadata(tmp_path):
    paths = synthetic_shards(tmp_path, [3, 2], channels=2)
    data = mofkit.ShardDataset(paths, channels=[1], transform=lambda x: x * 2, with_index=True, seed=7)
    meta = data.metadata()
    assert list(meta.columns) == ["shard", "index", "name", "id"] and len(meta) == 5
    for x, i in data:
        assert x.shape == (1, 4, 4, 4)
        assert float(x[0, 0, 0, 0]) == -2 * meta["id"][i] and meta["name"][i] == f"s{meta['id'][i]}"


def test_grid_params_temperature_defaults_per_probe():
    assert mofkit.GridParams().temperature_K == 77.0 and mofkit.GridParams(probe="CH4").temperature_K == 298.0
    assert mofkit.GridParams(probe="CH4", temperature_K=250).temperature_K == 250.0
    assert mofkit.GridParams(temperature_K=77).hash == mofkit.GridParams().hash   # the default is explicit


def test_grid_params_drive_voxelize_and_the_old_name_and_hash_stay():
    assert mofkit.ShardParams is mofkit.GridParams and mofkit.DEFAULT_GRID == mofkit.GridParams()
    assert mofkit.DEFAULT_GRID.hash == "904594a35265850f"  # data_manifest.csv's: published shards keep their name
    atoms = mofkit.read_structure(make_cif([("Cu", 0.1, 0.2, 0.3)], a=9.0))
    params = mofkit.GridParams(size=4, spacing_A=1.5, probe="Xe", cutoff_A=6.0)
    grid = mofkit.voxelize(atoms, params=params, device="cpu")
    np.testing.assert_array_equal(grid, mofkit.voxelize(atoms, 4, "cube", 1.5, "Xe", 6.0, device="cpu"))
    np.testing.assert_array_equal(mofkit.voxelize_many([atoms], params=params, device="cpu")[0], grid)
    np.testing.assert_array_equal(mofkit.grid_points(atoms, params=params), mofkit.grid_points(atoms, 4, "cube", 1.5))
    # a keyword given replaces that one setting of params
    np.testing.assert_array_equal(mofkit.voxelize(atoms, probe="H2", params=params, device="cpu"),
                                  mofkit.voxelize(atoms, 4, "cube", 1.5, "H2", 6.0, device="cpu"))


def test_build_shards_max_minutes_stops_between_shards_and_the_next_call_continues(tmp_path, monkeypatch):
    cifs, out = cif_folder(tmp_path / "cifs"), tmp_path / "out"
    clock = iter(range(0, 10**6, 45))  # every look at the clock: 45 s later
    monkeypatch.setattr(mofkit.time, "monotonic", lambda: next(clock))
    rows = mofkit.build_shards(out, cifs, params=TINY, shard_size=2, progress=False, max_minutes=1.0)
    assert [r["file"] for r in rows] == ["shard_00000.npy"]  # 45 s in: one more shard would start after 60 s
    assert sorted(p.name for p in out.glob("shard_*")) == ["shard_00000.npy"]
    rows = mofkit.build_shards(out, cifs, params=TINY, shard_size=2, progress=False)
    assert [r["n_grids"] for r in rows] == [2, 1, 1]


def test_build_shards_from_cif_folder_stores_grids_properties_and_failures(tmp_path):
    cifs = cif_folder(tmp_path / "cifs")
    out = tmp_path / "out"
    rows = mofkit.build_shards(out, cifs, params=TINY, shard_size=2, progress=False)
    assert [r["file"] for r in rows] == ["shard_00000.npy", "shard_00001.npy", "shard_00002.npy"]
    assert [r["members"] for r in rows] == ["mof0;mof1", "mof2;mof3", "mof4"]  # membership from the names
    assert [r["n_grids"] for r in rows] == [2, 1, 1]
    assert all(r["sha256"] == mofkit.sha256_file(out / r["file"]) and r["source"] == f"cifs:{cifs}" for r in rows)
    assert [{k: str(v) for k, v in r.items()} for r in rows] == mofkit.read_manifest(out / "data_manifest.csv")
    failures = (out / "failures.csv").read_text().splitlines()
    assert len(failures) == 2 and failures[1].startswith("shard_00001.npy,mof2,") and "malformed CIF" in failures[1]

    grids, meta = mofkit.open_shard(out / "shard_00001.npy")
    assert meta["names"] == ["mof3"] and meta["failures"][0][0] == "mof2" and meta["params"] == TINY.to_dict()
    atoms = mofkit.read_structure(cifs / "mof3.cif")
    grid_K = mofkit.voxelize(atoms, **TINY.voxelize_kwargs())
    assert grids.shape == (1, 1, 8, 8, 8) and grid_K.min() < -50  # a porous cell: attractive sites
    np.testing.assert_allclose(grids[0, 0].astype(np.float32), grid_K, rtol=2 ** -11, atol=1e-3)
    props = dict(zip(meta["properties"]["columns"], meta["properties"]["rows"][0]))
    cell = mofkit.cell_properties(atoms, cutoff_A=TINY.cutoff_A)
    window = mofkit.window_properties(grid_K, cell["density_kg_m3"], 77.0)
    assert props == pytest.approx({k: v for k, v in {**cell, **window}.items() if k != "temperature_K"}, rel=1e-12)
    assert meta["properties"]["settings"]["temperature_K"] == 77.0
    assert len(mofkit.ShardDataset(out)) == 4


def test_build_shards_resumes_and_never_leaves_a_partial_shard(tmp_path, monkeypatch):
    cifs = cif_folder(tmp_path / "cifs")
    out = tmp_path / "out"
    calls = counting_voxelize(monkeypatch, interrupt_at=3)
    with pytest.raises(KeyboardInterrupt):
        mofkit.build_shards(out, cifs, params=TINY, shard_size=2, progress=False)
    assert calls == ["mof0", "mof1", "mof3"]
    assert sorted(os.listdir(out)) == ["data_manifest.csv", "failures.csv", "shard_00000.npy"]  # no partial file
    calls = counting_voxelize(monkeypatch)
    rows = mofkit.build_shards(out, cifs, params=TINY, shard_size=2, progress=False)
    assert calls == ["mof3", "mof4"]  # finished shard 0 was kept
    assert mofkit.build_shards(out, cifs, params=TINY, shard_size=2, progress=False) == rows and calls == ["mof3", "mof4"]
    with pytest.raises(mofkit.ShardError, match="shard_00000.npy holds other structures"):
        mofkit.build_shards(out, cifs, params=mofkit.GridParams(size=8, cutoff_A=5.0), shard_size=2, progress=False)


def test_ensure_shards_downloads_verifies_and_replaces_bad_files(tmp_path, http_server, monkeypatch):
    manifest, files = published_shards(tmp_path, http_server)
    calls = counting_voxelize(monkeypatch)
    dest = tmp_path / "dest"
    paths = mofkit.ensure_shards(manifest, dest, progress=False)
    assert [p.read_bytes() for p in paths] == list(files.values()) and calls == []
    assert mofkit.ensure_shards(manifest, dest, progress=False) == paths  # verified present files are used
    assert [http_server.hits(f"/{s}") for s in files] == [1, 1, 1]
    corrupt = bytearray(paths[0].read_bytes())
    corrupt[200] ^= 1
    paths[0].write_bytes(bytes(corrupt))  # one flipped bit in the grids
    paths[1].write_bytes(files["shard_00001.npy"][:-100])  # truncated
    with pytest.warns(UserWarning, match="does not match its manifest row .* deleted it") as warned:
        mofkit.ensure_shards(manifest, dest, progress=False)
    assert [str(w.message).split(":")[0] for w in warned] == ["shard shard_00000.npy", "shard shard_00001.npy"]
    assert [p.read_bytes() for p in paths] == list(files.values())  # fetched again
    assert [http_server.hits(f"/{s}") for s in files] == [2, 2, 1] and calls == []
    assert sorted(os.listdir(dest)) == sorted([*files, "data_manifest.csv"])


def test_ensure_shards_reads_manifests_with_the_old_column_names(tmp_path, http_server, monkeypatch):
    """Manifests from before file/n_members/members (published ones, an old local one) work and are rewritten
    with today's names, keeping their other rows."""
    manifest, files = published_shards(tmp_path, http_server)
    rows = mofkit.read_manifest(manifest)
    old = {new: old for old, new in mofkit._OLD_MANIFEST_COLUMNS.items()}
    old_columns = [old.get(c, c) for c in mofkit.MANIFEST_COLUMNS]
    mofkit._write_csv(manifest, old_columns, [{old.get(k, k): v for k, v in r.items()} for r in rows])
    assert "shard,n_names" in manifest.read_text() and mofkit.read_manifest(manifest) == rows
    dest = tmp_path / "dest"
    other = {**rows[0], "file": "shard_09999.npy", "url": ""}
    mofkit._write_csv(dest / "data_manifest.csv", old_columns, [{old.get(k, k): v for k, v in other.items()}])
    calls = counting_voxelize(monkeypatch)
    paths = mofkit.ensure_shards(manifest, dest, progress=False)
    assert [p.read_bytes() for p in paths] == list(files.values()) and calls == []
    assert (dest / "data_manifest.csv").read_text().splitlines()[0] == ",".join(mofkit.MANIFEST_COLUMNS)
    local = mofkit.read_manifest(dest / "data_manifest.csv")
    assert [r["file"] for r in local] == [*files, "shard_09999.npy"] and local[-1] == other


def test_ensure_shards_rejects_a_corrupted_download_and_builds_instead(tmp_path, http_server, monkeypatch):
    manifest, files = published_shards(tmp_path, http_server)
    bad = bytearray(files["shard_00000.npy"])
    bad[300] ^= 1
    http_server.route("/shard_00000.npy", bytes(bad))
    calls = counting_voxelize(monkeypatch)
    dest = tmp_path / "dest"
    with pytest.warns(UserWarning, match=r"shard_00000.npy: download failed: .*sha256.* Building it locally"):
        paths = mofkit.ensure_shards(manifest, dest, progress=False)
    assert calls == ["mof0", "mof1"]  # built, not downloaded
    assert mofkit.read_shard_meta(paths[0])["names"] == ["mof0", "mof1"]
    assert not any(p.name.startswith(".") for p in dest.iterdir())  # the bad download left nothing
    local = {r["file"]: r for r in mofkit.read_manifest(dest / "data_manifest.csv")}
    assert local["shard_00000.npy"]["sha256"] == mofkit.sha256_file(paths[0])
    mofkit.ensure_shards(manifest, dest, progress=False)
    assert calls == ["mof0", "mof1"]  # the local build is verified by its recorded sha256 and kept


def test_ensure_shards_falls_back_to_building_on_google_drive_quota(tmp_path, http_server, monkeypatch):
    manifest, _ = published_shards(tmp_path, http_server)
    rows = mofkit.read_manifest(manifest)
    rows[2]["url"] = f"https://drive.google.com/file/d/{DRIVE_ID}/view?usp=sharing"
    mofkit.write_manifest(manifest, rows)
    http_server.intercept(monkeypatch, "drive.google.com")
    page = ('<html><body><p class="uc-error-subcaption">Too many users have viewed or downloaded this file '
            'recently. Please try accessing the file again later.</p></body></html>')
    http_server.route("/drive.google.com/uc", Reply(body=page.encode(), headers={"Content-Type": "text/html"}))
    calls = counting_voxelize(monkeypatch)
    with pytest.warns(UserWarning, match="shard_00002.npy: download failed: .*quota.* Building it locally"):
        paths = mofkit.ensure_shards(manifest, tmp_path / "dest", progress=False)
    assert calls == ["mof4"] and mofkit.read_shard_meta(paths[2])["names"] == ["mof4"]
    with pytest.raises(mofkit.ShardError, match="shard_00002.npy is not in .* build_missing=True"), \
            pytest.warns(UserWarning, match="quota"):
        mofkit.ensure_shards(manifest, tmp_path / "elsewhere", build_missing=False, progress=False)


def test_ensure_shards_builds_coremof_rows_with_the_package_properties(tmp_path, monkeypatch):
    monkeypatch.setattr(mofkit, "CELL_SPACING_A", 1.0)  # coarse whole-cell properties: ACOCOM's cell is 26 A
    names = ["ACECIV_ion_b", "ACOCOM_clean", "NOT_A_MOF"]
    row = mofkit._manifest_row("shard_00000.npy", names, mofkit.COREMOF_SOURCE, TINY)
    mofkit.write_manifest(tmp_path / "m.csv", [row])
    [path] = mofkit.ensure_shards(tmp_path / "m.csv", tmp_path / "dest", progress=False)
    data = mofkit.ShardDataset([path], with_index=True)
    meta = data.metadata()
    assert list(meta["name"]) == names[:2] and "NOT_A_MOF" in (tmp_path / "dest" / "failures.csv").read_text()
    table = mofkit.coremof_properties()
    assert meta["LCD"].tolist() == table.loc[names[:2], "LCD"].tolist() and (meta["log10_KH_mol_kg_Pa"] > -6).all()


def test_default_manifest_lists_all_coremof_structures_and_matches_the_committed_one(tmp_path):
    rows = mofkit.coremof_manifest(tmp_path / "m.csv")
    assert len(rows) == 121 and [r["n_members"] for r in rows[-2:]] == [100, 20]
    assert sum((r["members"].split(";") for r in rows), []) == mofkit.coremof_names()
    assert {r["params_hash"] for r in rows} == {mofkit.GridParams().hash} and not any(r["sha256"] for r in rows)
    assert (tmp_path / "m.csv").stat().st_size < 1_000_000
    committed = Path(__file__).resolve().parents[1] / "data_manifest.csv"  # its shard rows; weights rows aside
    assert mofkit.read_manifest(committed) == mofkit.read_manifest(tmp_path / "m.csv")


def test_manifest_weights_rows_are_not_shards_and_old_manifests_still_read(tmp_path):
    rows = mofkit.coremof_manifest(tmp_path / "m.csv")[:2]
    weights = dict.fromkeys(mofkit.MANIFEST_COLUMNS, "")
    weights.update(file="weights/g.pt", bytes="3", sha256="ab" * 32, kind="weights")
    mofkit.write_manifest(tmp_path / "m.csv", rows + [weights])
    assert [r["file"] for r in mofkit.read_manifest(tmp_path / "m.csv")] == [r["file"] for r in rows]
    assert [r["file"] for r in mofkit.read_manifest(tmp_path / "m.csv", kind="weights")] == ["weights/g.pt"]
    old_columns = [c for c in mofkit.MANIFEST_COLUMNS if c != "kind"]  # a manifest from before the kind column
    mofkit._write_csv(tmp_path / "old.csv", old_columns, [{c: r[c] for c in old_columns} for r in rows])
    assert mofkit.read_manifest(tmp_path / "old.csv") == [{k: str(v) for k, v in r.items()} for r in rows]


def test_batched_voxelization_for_shards_loses_only_the_bad_structure():
    """On a GPU build_shards voxelizes 16 structures per batch; a failing batch is redone one by one."""
    good = mofkit.read_structure(make_cif([("Zn", 0.1, 0.2, 0.3)], a=10.0), name="good")
    bad = good.copy()
    bad.symbols[0] = "Rf"                      # no force-field parameters: fails inside voxelize
    failures = []
    params = mofkit.GridParams(size=8, spacing_A=1.0)
    grids = mofkit._voxelize_chunk([("good", good), ("bad", bad), ("good2", good)], params, "cpu", failures)
    assert list(grids) == ["good", "good2"] and grids["good"].shape == (8, 8, 8)
    np.testing.assert_array_equal(grids["good"], mofkit.voxelize(good, **params.voxelize_kwargs()))
    assert [f[0] for f in failures] == ["bad"] and "Rf" in failures[0][1]


# =============================================================================
# 6. Models
# =============================================================================

def test_gan_parameter_counts_match_study():
    with torch.device("meta"):  # shapes only: no 17M-parameter allocation
        G, D = mofkit.Generator(dim=64, latent=200, channels=512), mofkit.Discriminator(dim=64, channels=512)
    assert sum(p.numel() for p in G.parameters()) == 17_601_408
    assert sum(p.numel() for p in D.parameters()) == 11_048_833
    convs = [m for m in [*G.modules(), *D.modules()] if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    assert len(convs) == 8 and all(m.bias is None and m.kernel_size == (4, 4, 4) and m.stride == (2, 2, 2)
                                   and m.padding == (1, 1, 1) for m in convs)


def test_generator_output_weights_start_the_same_for_any_grid_channel_count():
    """torch's default init of a transposed convolution takes its output channels as the fan-in, so it shrinks
    with them; the generator's last layer is scaled back: 1 and 11 grid channels both start with torch's
    one-channel kaiming-uniform bound, 1 / sqrt(1 x 4^3)."""
    for c in (1, 11):
        torch.manual_seed(0)
        w = mofkit.Generator(dim=16, latent=8, channels=16, out_channels=c, transform="signed").net[-2].weight
        assert w.abs().max().item() == pytest.approx(1 / 8, rel=0.02), c  # 8 x c x 64 uniform draws reach it
        assert w.abs().max().item() <= 1 / 8 + 1e-7
        assert w.std().item() == pytest.approx(1 / 8 / math.sqrt(3), rel=0.1), c


def test_binomial_blur_matches_scipy_and_removes_the_checkerboard():
    import scipy.ndimage
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 3, 6, 7, 5)))
    k1 = np.array([1.0, 2.0, 1.0]) / 4
    k = k1[:, None, None] * k1[None, :, None] * k1[None, None, :]
    ref = np.stack([[scipy.ndimage.convolve(c, k, mode="nearest") for c in g] for g in x.numpy()])  # edge replicated
    np.testing.assert_allclose(mofkit.binomial_blur(x).numpy(), ref, rtol=1e-12, atol=1e-12)
    checker = torch.from_numpy((np.indices((8, 8, 8)).sum(0) % 2 * 2 - 1.0)[None, None])
    assert mofkit.binomial_blur(checker)[..., 1:-1, 1:-1, 1:-1].abs().max() == 0  # zero response at Nyquist
    torch.testing.assert_close(mofkit.binomial_blur(torch.full((1, 1, 4, 4, 4), 0.3)), torch.full((1, 1, 4, 4, 4), 0.3))


def test_density_blur_smooths_only_the_density_channels_before_the_activation():
    torch.manual_seed(0)
    plain = mofkit.Generator(dim=16, latent=8, channels=16, out_channels=3, transform="signed")
    blurred = mofkit.Generator(dim=16, latent=8, channels=16, out_channels=3, transform="signed", density_blur=True)
    blurred.load_state_dict(plain.state_dict())  # the same parameters: old checkpoints load either way
    plain.eval(), blurred.eval()
    z = torch.randn(2, 8)
    with torch.no_grad():
        a, b = plain(z), blurred(z)
        torch.testing.assert_close(b[:, :1], a[:, :1])  # energy untouched
        torch.testing.assert_close(b[:, 1:], torch.tanh(mofkit.binomial_blur(torch.atanh(a[:, 1:].double())).float()),
                                   atol=1e-4, rtol=1e-4)
    assert mofkit._config_from_checkpoint({"config": {}}).density_blur is False  # models trained before it: none
    one = mofkit.Generator(dim=16, latent=8, channels=16, density_blur=True).eval()
    ref = mofkit.Generator(dim=16, latent=8, channels=16).eval()
    ref.load_state_dict(one.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(one(z), ref(z))  # one channel: nothing to blur


def head_outputs(G, z, transform):
    """(the last layer's raw outputs, the generator's grids back in [0, 1] / kelvin per unit E_scale), float64."""
    with torch.no_grad():
        features = G.net[:-1](torch.relu(G.project(z).view(-1, G.channels, 4, 4, 4))).double()
        return features, mofkit.from_gan_output(G(z), 1.0, transform).double()


def test_occupancy_head_gives_the_strongest_class_the_whole_occupancy():
    torch.manual_seed(0)
    z = torch.randn(2, 8)
    for transform, blur in [("signed", False), ("wells", True)]:
        G = mofkit.Generator(dim=16, latent=8, channels=16, out_channels=4, transform=transform, density_blur=blur,
                             density_head="occupancy").eval()
        assert G.net[-2].weight.shape[1] == 5  # energy, occupancy, 3 class logits
        features, out = head_outputs(G, z, transform)
        activation = torch.sigmoid if transform == "wells" else torch.tanh
        torch.testing.assert_close(out[:, 0], -activation(features[:, 0]))  # energy: as the channels head's
        occupancy = features[:, 1:2]
        occupancy = torch.sigmoid(mofkit.binomial_blur(occupancy) if blur else occupancy)[:, 0]
        density = out[:, 1:]
        torch.testing.assert_close(density.amax(1), occupancy, atol=1e-6, rtol=1e-6)  # the largest class: all of it
        assert density.min() >= 0 and (density < occupancy[:, None] - 1e-3).any()  # the others: a share of it
        order = features[:, 2:].argsort(1)  # shares follow the class logits
        assert torch.equal(density.argsort(1), order)
    with pytest.raises(ValueError, match="density_head='soft'"):
        mofkit.TrainConfig(density_head="soft")
    assert mofkit._config_from_checkpoint({"config": {}}).density_head == "channels"  # models trained before it
    one = mofkit.Generator(dim=16, latent=8, channels=16, density_head="occupancy").eval()
    ref = mofkit.Generator(dim=16, latent=8, channels=16).eval()
    ref.load_state_dict(one.state_dict())  # one channel: no densities, the same model
    with torch.no_grad():
        torch.testing.assert_close(one(z), ref(z))


def brute_dilate(x, sigma_voxels, sub=1):
    """max over every site y (1/sub voxel apart) within ceil(3 sigma sub) sites (a cube) of voxel v of x(y) *
    exp(-|v - y|^2 / 2 sigma^2), by loops over the sites that hold something."""
    x = np.asarray(x, dtype=np.float64)
    reach = math.ceil(3 * sigma_voxels * sub) / sub + 1e-9  # in voxels
    n = x.shape[-1] // sub
    out = np.zeros(x.shape[:-3] + (n, n, n))
    v = np.arange(n)
    for index in zip(*np.nonzero(x)):
        *lead, i, j, k = index
        d = [v - c / sub for c in (i, j, k)]  # voxels from the site, per axis
        if any(np.abs(e).min() > reach for e in d):
            continue
        a, b, c = np.meshgrid(*d, indexing="ij")
        g = x[index] * np.exp(-(a ** 2 + b ** 2 + c ** 2) / (2 * sigma_voxels ** 2))
        g[(np.abs(a) > reach) | (np.abs(b) > reach) | (np.abs(c) > reach)] = 0
        np.maximum(out[tuple(lead)], g, out=out[tuple(lead)])
    return out


def test_gaussian_dilate_draws_each_voxel_as_density_channels_draws_an_atom():
    """The separable dilation equals the max over every voxel's Gaussian (loops), at any height, near the cube's
    faces too; heights 1 on atoms' voxels give density_channels of those atoms."""
    from ase import Atoms
    rng = np.random.default_rng(0)
    for sigma in (0.5, 1.0, 1.5):
        x = np.where(rng.random((2, 3, 9, 9, 9)) < 0.02, rng.random((2, 3, 9, 9, 9)), 0.0)
        x[0, 0, 0, 0, 8] = 0.9  # a corner: its Gaussian is cut by three faces
        np.testing.assert_allclose(mofkit.gaussian_dilate(torch.from_numpy(x), sigma).numpy(),
                                   brute_dilate(x, sigma), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(mofkit.gaussian_dilate(torch.from_numpy(x), sigma, 3).numpy(),  # sites 1/3 apart
                                   brute_dilate(x, sigma, 3), rtol=1e-12, atol=1e-15)
    voxels = np.array([[3, 4, 5], [4, 5, 5], [8, 2, 9], [0, 11, 6]])  # two bonded, one near a face
    atoms = Atoms("C4", positions=voxels * 0.5, cell=[40.0] * 3, pbc=True)  # images far beyond the cube
    onehot = torch.zeros(1, 1, 12, 12, 12)
    onehot[0, 0, voxels[:, 0], voxels[:, 1], voxels[:, 2]] = 1
    expected = mofkit.density_channels(atoms, size=12, spacing_A=0.5, sigma_A=0.75, classes=("C", "other"))
    np.testing.assert_allclose(mofkit.gaussian_dilate(onehot, 1.5)[0].numpy(), expected[:1], rtol=1e-6, atol=1e-7)
    # atoms between voxels, drawn on sites half a voxel apart, decode where they are
    sites = np.array([[7, 8, 9], [12, 9, 9], [17, 4, 13], [3, 15, 6]])  # odd: half a voxel past a centre; 1.27 A
    half = torch.zeros(1, 1, 24, 24, 24)
    half[0, 0, sites[:, 0], sites[:, 1], sites[:, 2]] = 1
    field = mofkit.gaussian_dilate(half, 1.5, 2)[0].numpy()
    decoded = mofkit.grid_to_atoms(np.concatenate([field, 0 * field]), spacing_A=0.5, classes=("C", "other"),
                                   sigma_A=0.75)
    got = decoded.positions[np.lexsort(decoded.positions.T[::-1])]
    np.testing.assert_allclose(got, sites[np.lexsort(sites.T[::-1])] * 0.25, atol=1e-6)


def test_atoms_head_draws_each_presence_as_a_gaussian_shared_out_by_class():
    torch.manual_seed(0)
    z = torch.randn(2, 8)
    for transform in ("signed", "wells"):
        G = mofkit.Generator(dim=16, latent=8, channels=16, out_channels=4, transform=transform,
                             density_head="atoms", sigma_voxels=1.5).eval()
        assert G.net[-2].weight.shape[1] == 5  # energy, presence, 3 class logits
        features, out = head_outputs(G, z, transform)
        activation = torch.sigmoid if transform == "wells" else torch.tanh
        torch.testing.assert_close(out[:, 0], -activation(features[:, 0]))  # energy: as the channels head's
        presence = torch.sigmoid(features[:, 1] + mofkit.ATOM_PRIOR_LOGIT)
        logits = features[:, 2:]
        shares = torch.exp(logits - logits.amax(1, True))  # the largest class's share is 1
        density = out[:, 1:]
        # each site's Gaussian in every class, as tall as its presence times its share of that class
        torch.testing.assert_close(density, torch.from_numpy(brute_dilate((presence[:, None] * shares).numpy(), 1.5)),
                                   atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(density.amax(1), torch.from_numpy(brute_dilate(presence.numpy(), 1.5)), atol=1e-6,
                                   rtol=1e-5)  # the largest class: the whole occupancy
        assert presence.median() < 0.02  # untrained: nearly empty, as real cubes are between atoms
    G = mofkit.Generator(dim=16, latent=8, channels=16, out_channels=4, transform="wells", density_head="atoms",
                         sigma_voxels=1.5, subvoxels=2).eval()
    assert G.net[-2].weight.shape[1] == 12  # energy, 8 presences (the sites of a voxel), 3 class logits
    features, out = head_outputs(G, z, "wells")
    presence = torch.sigmoid(features[:, 1:9] + mofkit.ATOM_PRIOR_LOGIT).numpy()
    logits = features[:, 9:].numpy()
    shares = np.exp(logits - logits.max(1, keepdims=True))
    sites = np.zeros((2, 3, 32, 32, 32))
    for a, b, c in itertools.product(range(2), repeat=3):  # output (a, b, c) of voxel (i, j, k): site 2i+a, ...
        sites[:, :, a::2, b::2, c::2] = presence[:, None, 4 * a + 2 * b + c] * shares  # the voxel's shares
    torch.testing.assert_close(out[:, 1:], torch.from_numpy(brute_dilate(sites, 1.5, 2)), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="subvoxels=3"):
        mofkit.Generator(dim=16, latent=8, channels=16, out_channels=4, density_head="atoms", sigma_voxels=1.5,
                         subvoxels=3)
    with pytest.raises(ValueError, match="atom_subvoxels=3"):
        mofkit.TrainConfig(grid_channels=4, density_head="atoms", density_sigma_voxels=1.5, atom_subvoxels=3)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma_voxels"):
            mofkit.Generator(dim=16, latent=8, channels=16, out_channels=4, density_head="atoms", sigma_voxels=bad)
        with pytest.raises(ValueError, match="sigma_voxels"):
            mofkit.TrainConfig(grid_channels=4, density_head="atoms", density_sigma_voxels=bad)
    with pytest.raises(ValueError, match="density_blur must be off"):
        mofkit.TrainConfig(grid_channels=4, density_head="atoms", density_sigma_voxels=1.5, density_blur=True)
    assert mofkit._config_from_checkpoint({"config": {}}).density_sigma_voxels == 0.0  # models trained before it
    params = mofkit.GridParams(size=16, spacing_A=0.5, cutoff_A=5.0, density_classes=("C", "O", "other"),
                               density_sigma_A=0.75, cell_properties=False).to_dict()
    config = mofkit.TrainConfig(dim=16, grid_channels=4, density_head="atoms", density_sigma_voxels=1.5)
    mofkit._check_sigma_of_data(config, params)  # 0.75 / 0.5: the same width
    mofkit._check_sigma_of_data(config, None)  # grids that do not say: nothing to check
    with pytest.raises(ValueError, match="density_sigma_voxels=1.0 but the shards' Gaussians are 0.75 / 0.5 = 1.5"):
        mofkit._check_sigma_of_data(dataclasses.replace(config, density_sigma_voxels=1.0), params)


def test_atoms_head_trains_resumes_and_samples_with_its_width(tmp_path):
    config = tiny_config(grid_channels=3, density_head="atoms", density_sigma_voxels=1.5, atom_subvoxels=2,
                         clash_weight=0.1)
    mofkit.train(config, random_grids(4, channels=3), tmp_path, max_steps=2, progress=False)
    mofkit.export_generator(tmp_path / "last.pt", tmp_path / "g.pt")
    G = mofkit.load_generator(tmp_path / "g.pt")
    assert (G.density_head, G.sigma_voxels, G.subvoxels) == ("atoms", 1.5, 2)
    x = mofkit.sample(tmp_path / "last.pt", 2, seed=0)
    assert x.shape == (2, 3, 16, 16, 16) and 0 <= x[:, 1:].min() and x[:, 1:].max() <= 1
    with pytest.raises(mofkit.CheckpointError, match="density_sigma_voxels=1.5 but the config asks for 1.0"):
        mofkit.train(dataclasses.replace(config, density_sigma_voxels=1.0), random_grids(4, channels=3), tmp_path,
                     max_steps=3, progress=False)
    with pytest.raises(mofkit.CheckpointError, match="atom_subvoxels=2 but the config asks for 1"):
        mofkit.train(dataclasses.replace(config, atom_subvoxels=1), random_grids(4, channels=3), tmp_path,
                     max_steps=3, progress=False)
    with pytest.raises(mofkit.CheckpointError, match="density_upsample=transposed but the config asks for resize"):
        mofkit.train(dataclasses.replace(config, density_upsample="resize"), random_grids(4, channels=3), tmp_path,
                     max_steps=3, progress=False)


def test_init_from_starts_the_generator_from_a_file_and_freeze_trunk_trains_only_the_density_outputs(tmp_path):
    # a channels-head generator, trained and exported: the file an atoms-head run starts from
    source = tiny_config(grid_channels=3)
    mofkit.train(source, random_grids(4, channels=3), tmp_path / "source", max_steps=2, progress=False)
    mofkit.export_generator(tmp_path / "source" / "last.pt", tmp_path / "g.pt", dtype=torch.float32)
    theirs = mofkit.load_generator(tmp_path / "g.pt").state_dict()
    atoms = dict(grid_channels=3, density_head="atoms", density_sigma_voxels=1.5, init_from=str(tmp_path / "g.pt"))
    output = "net.3.weight"  # dim 16: two layers of three, then the output layer
    trunk = [k for k in theirs if k != output and "running" not in k and "num_batches" not in k]

    def after(config, name, steps):
        """The run's raw generator weights after `steps` steps."""
        mofkit.train(config, random_grids(4, channels=3, seed=1), tmp_path / name, max_steps=steps, progress=False)
        return {k: v.float() for k, v in mofkit.load_checkpoint(tmp_path / name / "last.pt")["generator"].items()}

    frozen = after(tiny_config(**atoms, freeze_trunk=True), "frozen", 3)
    frozen_ema = mofkit.load_checkpoint(tmp_path / "frozen" / "last.pt")["generator_ema"]
    assert all(torch.equal(frozen[k], theirs[k]) and torch.equal(frozen_ema[k].float(), theirs[k]) for k in trunk)
    assert torch.equal(frozen[output][:, :1], theirs[output][:, :1])  # the energy channel: the file's, still
    assert frozen[output].shape[1] == 1 + 1 + 2  # energy, one presence, two class logits
    fresh = after(tiny_config(**{**atoms, "init_from": ""}), "fresh", 3)
    # the density outputs start from the same random draw as a run from scratch, and train
    assert 0 < (frozen[output][:, 1:] - fresh[output][:, 1:]).abs().max() < 0.01
    # freed, the trunk moves from where the file put it
    free = after(tiny_config(**atoms), "free", 1)
    moved = [k for k in trunk if not torch.equal(free[k], theirs[k])]
    assert moved and all((free[k] - theirs[k]).abs().max() < 0.01 for k in trunk)  # one Adam step of 2e-4
    # "resize": the output layer keeps the energy alone, the density outputs are their own layers and train
    resized_1 = after(tiny_config(**atoms, freeze_trunk=True, density_upsample="resize"), "resized_1", 1)
    resized = after(tiny_config(**atoms, freeze_trunk=True, density_upsample="resize"), "resized", 3)
    head = [k for k in resized if k.startswith("density_net.")]
    assert len(head) == 4 and all(not torch.equal(resized[k], resized_1[k]) for k in head)
    assert all(torch.equal(resized[k], theirs[k]) for k in trunk)
    assert resized[output].shape[1] == 1 and torch.equal(resized[output], theirs[output][:, :1])
    resized_fresh = after(tiny_config(**{**atoms, "init_from": ""}, density_upsample="resize"), "resized_fresh", 3)
    assert all(0 < (resized[k] - resized_fresh[k]).abs().max() < 0.01 for k in head)
    with pytest.raises(ValueError, match="freeze_trunk needs init_from"):
        tiny_config(grid_channels=3, freeze_trunk=True)
    with pytest.raises(ValueError, match="E_scale 800.0 K .* this run 900.0 K"):
        after(tiny_config(**{**atoms, "e_scale_K": 900.0}), "other_scale", 1)
    with pytest.raises(ValueError, match=r"its project.weight \(512, 8\) does not fit .* \(\(1024, 8\)\)"):
        after(tiny_config(**atoms, channels=16), "wider", 1)
    with pytest.raises(mofkit.CheckpointError, match="not a readable generator file"):
        after(tiny_config(**{**atoms, "init_from": str(tmp_path / "missing.pt")}), "missing", 1)


def test_resize_density_upsample_draws_density_outputs_at_full_resolution():
    torch.manual_seed(0)
    G = mofkit.Generator(16, 8, 8, 3, "signed", False, "atoms", 1.5, 1, "resize")
    assert G.net[-2].out_channels == 1 and G.density_net[-1].out_channels == 1 + 2  # one presence, two classes
    x, presence, _ = G(torch.randn(2, 8), with_presence=True)
    assert x.shape == (2, 3, 16, 16, 16) and presence.shape == (2, 1, 16, 16, 16)
    # the density outputs are the head's on the last features; the energy is the output layer's alone
    with torch.no_grad():
        features = G.net[:-2](torch.relu(G.project(torch.randn(2, 8)).view(-1, 8, 4, 4, 4)))
        G.density_net[-1].bias.fill_(-50.0)  # no presence anywhere: the density channels are 0
        assert G(torch.randn(2, 8))[:, 1:].eq(-1).all()
        assert features.shape == (2, 4, 8, 8, 8)
    assert mofkit.Generator(16, 8, 8, 1, density_upsample="resize").density_net is None  # energy only: nothing
    with pytest.raises(ValueError, match="density_upsample='nearest'"):
        mofkit.Generator(16, 8, 8, 3, density_upsample="nearest")


def shifted_sites(positions_voxels, size):
    """(heights (1, 1, D, D, D), shifts (1, 3, D, D, D)) placing atoms at continuous voxel positions: height 1 on
    each atom's nearest voxel, shifted by the rest."""
    site = np.round(positions_voxels).astype(int)
    x, shifts = torch.zeros(1, 1, size, size, size, dtype=torch.float64), torch.zeros(1, 3, size, size, size,
                                                                                        dtype=torch.float64)
    x[0, 0, site[:, 0], site[:, 1], site[:, 2]] = 1
    shifts[0, :, site[:, 0], site[:, 1], site[:, 2]] = torch.from_numpy(positions_voxels - site).T
    return x, shifts


def test_atom_offsets_draw_each_atom_where_its_shift_puts_it():
    """One atom anywhere, or atoms whose windows do not overlap, are drawn exactly as density_channels draws them
    and decode where they are; without shifts the drawing is gaussian_dilate's own."""
    from ase import Atoms
    rng = np.random.default_rng(0)
    positions = np.array([[4.3, 5.6, 4.5], [17.7, 18.2, 16.6]])  # 13 voxels apart on every axis: no overlap
    for one in (positions[:1], positions, rng.uniform(5, 18, (1, 3))):
        x, shifts = shifted_sites(one, 24)
        field = mofkit.gaussian_dilate(x, 1.5, 1, shifts)[0].numpy()
        atoms = Atoms(f"C{len(one)}", positions=one * 0.5, cell=[60.0] * 3, pbc=True)
        expected = mofkit.density_channels(atoms, size=24, spacing_A=0.5, sigma_A=0.75, classes=("C", "other"))
        np.testing.assert_allclose(field, expected[:1], atol=2e-7)
        decoded = mofkit.grid_to_atoms(np.concatenate([field, 0 * field]), spacing_A=0.5, classes=("C", "other"),
                                       sigma_A=0.75)
        np.testing.assert_allclose(np.sort(decoded.positions, 0), np.sort(one * 0.5, 0), atol=1e-6)
    x = torch.from_numpy(rng.random((2, 3, 10, 10, 10)) ** 8)
    torch.testing.assert_close(mofkit.gaussian_dilate(x, 1.5, 1, torch.zeros(2, 3, 10, 10, 10, dtype=x.dtype)),
                               mofkit.gaussian_dilate(x, 1.5), rtol=1e-12, atol=1e-15)


def test_atom_offsets_head_draws_its_shifted_atoms_and_refuses_other_heads():
    torch.manual_seed(0)
    G = mofkit.Generator(16, 8, 16, 4, "wells", False, "atoms", 1.5, 1, atom_offsets=True).eval()
    assert G.net[-2].out_channels == 1 + 1 + 3 + 3  # energy, presence, three shifts, three class logits
    z = torch.randn(2, 8)
    features, out = head_outputs(G, z, "wells")
    grids, presence, shifts = G(z, with_presence=True)
    torch.testing.assert_close(shifts.double(), 0.5 * torch.tanh(features[:, 2:5]), rtol=1e-5, atol=1e-6)
    assert shifts.abs().max() <= 0.5 and shifts.abs().max() > 0.1
    logits = features[:, 5:]
    heights = torch.sigmoid(features[:, 1:2] + mofkit.ATOM_PRIOR_LOGIT) * torch.exp(logits - logits.amax(1, True))
    torch.testing.assert_close(out[:, 1:], mofkit.gaussian_dilate(heights, 1.5, 1, 0.5 * torch.tanh(features[:, 2:5])),
                               rtol=1e-5, atol=1e-6)
    for bad in [dict(density_head="channels"), dict(density_head="atoms", subvoxels=2)]:
        with pytest.raises(ValueError, match="atom_offsets=True"):
            mofkit.Generator(16, 8, 16, 4, sigma_voxels=1.5 if bad["density_head"] == "atoms" else 0.0,
                             atom_offsets=True, **bad)
    with pytest.raises(ValueError, match="atom_offsets=True"):
        mofkit.TrainConfig(grid_channels=4, density_head="atoms", density_sigma_voxels=1.5, atom_subvoxels=2,
                           atom_offsets=True)
    assert mofkit._config_from_checkpoint({"config": {}}).atom_offsets is False


def test_atom_offsets_train_with_the_clash_of_the_shifted_atoms_and_resume_only_with_them(tmp_path):
    config = tiny_config(grid_channels=3, density_head="atoms", density_sigma_voxels=1.5, atom_offsets=True,
                         clash_weight=0.1)
    mofkit.train(config, random_grids(4, channels=3), tmp_path, max_steps=2, progress=False)
    mofkit.export_generator(tmp_path / "last.pt", tmp_path / "g.pt")
    assert mofkit.load_generator(tmp_path / "g.pt").atom_offsets
    with pytest.raises(mofkit.CheckpointError, match="atom_offsets=True but the config asks for False"):
        mofkit.train(dataclasses.replace(config, atom_offsets=False), random_grids(4, channels=3), tmp_path,
                     max_steps=3, progress=False)


def soft_pairs(positions_voxels, radii_voxels):
    """Pairs closer than each radius, each smoothed as atom_pair_counts does (numpy, float64)."""
    from scipy.spatial.distance import pdist
    d2 = pdist(positions_voxels) ** 2
    tau = mofkit.PAIR_SOFTNESS_VOXELS
    return np.array([(1 / (1 + np.exp(-(r * r - d2) / (2 * r * tau)))).sum() for r in radii_voxels])


def test_atom_pair_counts_count_the_atoms_the_decoder_finds_and_their_pairs():
    """Atoms drawn by the atoms head (presence, shift) and decoded by grid_to_atoms: atom_pair_counts counts
    those the decoder keeps (a site drawn below the threshold is none) and their smoothed pairs, with gradients
    to presences (straight-through) and shifts."""
    spacing_A, sigma_A, size = 0.5, 0.75, 16
    sigma = sigma_A / spacing_A
    rng = np.random.default_rng(3)
    positions = [rng.uniform(2, size - 3, 3)]
    while len(positions) < 14:  # atoms 1.0-3 A apart: bonds and second neighbours, none merged by the decoder
        q = positions[rng.integers(len(positions))] + rng.normal(size=3) * 2.5
        d = np.linalg.norm(np.array(positions) - q, axis=1).min()
        if 2.0 <= d <= 6 and ((2 <= q) & (q <= size - 3)).all():
            positions.append(q)
    positions = np.array(positions)
    presence, shifts = shifted_sites(positions, size)
    heights = np.array([1.0] * 10 + [0.9, 0.85, 0.75, 0.5])  # the last two are drawn below 0.6^(1/sigma^2) = 0.80
    site = np.round(positions).astype(int)
    presence[0, 0, site[:, 0], site[:, 1], site[:, 2]] = torch.from_numpy(heights)
    classes = ("C", "O", "other")
    kind = torch.zeros(1, 3, size, size, size, dtype=torch.float64)
    kind[0, 0] = 1
    drawn = mofkit.gaussian_dilate(presence * kind, sigma, 1, shifts)
    decoded = mofkit.grid_to_atoms(drawn[0].numpy(), spacing_A, classes=classes, sigma_A=sigma_A)
    own = heights * np.exp(-((positions - site) ** 2).sum(1) / (2 * sigma ** 2))
    kept = own >= 0.6 ** (1 / sigma ** 2)
    assert kept.sum() == len(decoded) == 12 and not kept[-2:].any()
    radii = [r / spacing_A for r in mofkit.PAIR_RADII_A]
    threshold = mofkit.default_threshold(spacing_A, sigma_A)
    atoms, pairs = mofkit.atom_pair_counts(presence, shifts, drawn, threshold, radii)
    assert atoms.item() == 12
    np.testing.assert_allclose(pairs[0].numpy(), soft_pairs(positions[kept], radii), rtol=1e-10)
    from scipy.spatial.distance import cdist
    miss_A = cdist(decoded.positions / spacing_A, positions[kept]).min(1) * spacing_A  # the same atoms
    assert miss_A.max() < 0.15, miss_A
    # `sites` candidates: the peaks first, then the most present of the rest
    assert mofkit.atom_pair_counts(presence, shifts, drawn, threshold, radii, sites=3)[0].item() == 3
    decoy, centred = presence.clone(), shifts.clone()
    centred[(0, slice(None), *site[0])] = 0  # atom 0 on its voxel, height 1; beside it a site of presence 0.95
    decoy[(0, 0, *(site[0] - [1, 0, 0]))] = 0.95  # drawn under atom 0's taller Gaussian: no peak, no atom
    drawn_decoy = mofkit.gaussian_dilate(decoy * kind, sigma, 1, centred)
    assert len(mofkit.grid_to_atoms(drawn_decoy[0].numpy(), spacing_A, classes=classes, sigma_A=sigma_A)) == 12
    assert mofkit.atom_pair_counts(decoy, centred, drawn_decoy, threshold, radii, sites=12)[0].item() == 12
    # gradients: every candidate's presence moves the count by one; the pairs move with the shifts
    p, s = presence.clone().requires_grad_(True), shifts.clone().requires_grad_(True)
    atoms, pairs = mofkit.atom_pair_counts(p, s, drawn, threshold, radii)
    (atoms.sum() + pairs.sum()).backward()
    assert (p.grad[0, 0, site[:, 0], site[:, 1], site[:, 2]] >= 1).all() and s.grad.abs().sum() > 0
    # the reference: real_pair_counts of structures, hard counts in angstrom; the loss is 0 at it
    reference = mofkit.real_pair_counts([decoded, decoded[:4]])
    d = decoded.get_all_distances()[np.triu_indices(len(decoded), 1)]
    d4 = decoded[:4].get_all_distances()[np.triu_indices(4, 1)]
    assert reference["atoms"] == 8.0 and reference["structures"] == 2
    assert reference["pairs"] == [((d < r).sum() + (d4 < r).sum()) / 2 for r in mofkit.PAIR_RADII_A]
    same = torch.tensor([8.0, 8.0]), torch.tensor([reference["pairs"]] * 2)
    assert mofkit.pair_count_loss(*same, reference).item() == pytest.approx(0, abs=1e-12)
    fewer = torch.tensor([3.5, 3.5]), same[1]
    assert mofkit.pair_count_loss(*fewer, reference).item() == pytest.approx(
        mofkit.PAIR_ATOMS_WEIGHT * (math.log(4.5) - math.log(9.0)) ** 2, rel=1e-6)
    closer = same[0], same[1] * torch.tensor([2.0] + [1.0] * (len(radii) - 1))
    expected = (math.log1p(2 * reference["pairs"][0]) - math.log1p(reference["pairs"][0])) ** 2 / len(radii)
    assert mofkit.pair_count_loss(*closer, reference).item() == pytest.approx(expected, rel=1e-6)


def atom_shards(folder, n=4, size=16, seed=0):
    """Shards of n cubes: random energies and the density channels (C, O, other; Gaussians 0.75 A wide) of
    random atoms 1.1-3 A from a neighbour, as build_shards would store them."""
    params = mofkit.GridParams(size=size, spacing_A=0.5, cutoff_A=5.0, density_classes=("C", "O", "other"),
                               density_sigma_A=0.75, cell_properties=False)
    rng = np.random.default_rng(seed)
    grids = []
    for _ in range(n):
        positions = [rng.uniform(1, 7, 3)]
        while len(positions) < 20:
            q = positions[rng.integers(len(positions))] + rng.normal(size=3)
            if 1.1 <= np.linalg.norm(np.array(positions) - q, axis=1).min() <= 3 and ((0 <= q) & (q < 8)).all():
                positions.append(q)
        from ase import Atoms
        atoms = Atoms(rng.choice(["C", "O", "H"], len(positions)), positions=positions, cell=[8.0] * 3)
        energy = rng.uniform(-900, 2000, (1, size, size, size))
        grids.append(np.concatenate([energy, mofkit.density_channels(atoms, size, 0.5, 0.75, params.density_classes)]))
    names = [f"s{i}" for i in range(n)]
    meta = {"source": "synthetic", "params": params.to_dict(), "members": names, "names": names, "failures": [],
            "properties": {"columns": ["id"], "rows": [[i] for i in range(n)]}}
    mofkit.write_shard(folder / "shard_00000.npy", np.stack(grids).astype(np.float16), meta)
    return mofkit.ShardDataset(folder, seed=0)


def test_unbonded_and_crowded_atoms_are_the_shares_structure_report_finds():
    """Atoms of three classes drawn by the atoms head and decoded: 1 - unbonded_atoms equals structure_report's
    bonded_fraction and crowded_atoms its crowded_fraction (same bond lengths, same inner atoms); their gradients
    drop a lonely atom and move a would-be neighbour nearer, drop a crowded atom and move its neighbour away."""
    spacing_A, sigma_A, size = 0.5, 0.75, 28
    classes = ("C", "O", "H", "other")
    bonds = mofkit.bond_voxels(classes, spacing_A)
    close = mofkit.bond_voxels(classes, spacing_A, mofkit.CROWD_MULT)
    assert bonds[0, 2].item() == pytest.approx(1.2 * (0.76 + 0.31) / spacing_A)  # C-H, ase's covalent radii
    rng = np.random.default_rng(5)
    edge = mofkit.REPORT_EDGE_A / spacing_A
    positions, kinds = [rng.uniform(9, size - 10, 3)], [0]
    while len(positions) < 40:  # 0.75-4 A apart, none within 0.4 voxel of a bond or crowding length or of the edge
        q, k = positions[rng.integers(len(positions))] + rng.normal(size=3) * 3, int(rng.integers(3))
        d = np.linalg.norm(np.array(positions) - q, axis=1)
        limits = np.concatenate([bonds[k, kinds].numpy(), close[k, kinds].numpy()])
        apart = np.where(np.array(kinds) == k, 2.0, 1.5)  # the decoder parts classes (own channels) nearer
        if ((d >= apart).all() and (np.abs(np.tile(d, 2) - limits) > 0.4).all() and ((2 <= q) & (q <= size - 3)).all()
                and (np.abs(q - edge) > 0.4).all() and (np.abs(q - (size - edge)) > 0.4).all()):
            positions.append(q)
            kinds.append(k)
    threshold = mofkit.default_threshold(spacing_A, sigma_A)

    def draw(positions, kinds):  # (presence, shifts, density drawn by the atoms head, site, decoded atoms)
        presence, shifts = shifted_sites(positions, size)
        kind = torch.zeros(1, len(classes), size, size, size, dtype=torch.float64)
        site = np.round(positions).astype(int)
        kind[0, kinds, site[:, 0], site[:, 1], site[:, 2]] = 1
        drawn = mofkit.gaussian_dilate(presence * kind, sigma_A / spacing_A, 1, shifts)
        decoded = mofkit.grid_to_atoms(drawn[0].numpy(), spacing_A, classes=classes, sigma_A=sigma_A)
        assert len(decoded) == len(positions)
        return presence, shifts, drawn, site, decoded
    # O-C-O in a line, C-O 0.9 A (crowded), O-O 1.8 A: the carbon crowded twice counts once
    trio = draw(np.array([[14, 14, 12.2], [14, 14, 14.0], [14, 14, 15.8]]), [1, 0, 1])
    assert mofkit.structure_report(trio[-1]).crowded_fraction[0] == 1
    assert mofkit.crowded_atoms(*trio[:3], threshold, close, edge).item() == 1
    positions, kinds = np.array(positions), np.array(kinds)
    presence, shifts, drawn, site, decoded = draw(positions, kinds)
    report = mofkit.structure_report(decoded)
    share = mofkit.unbonded_atoms(presence, shifts, drawn, threshold, bonds, edge)
    assert 0 < report.bonded_fraction[0] < 1, report.bonded_fraction[0]  # some inner atoms bonded, some not
    # the atoms of each class, as decoded; the reference and loss
    density = drawn.clone().requires_grad_(True)
    counts = mofkit.atom_class_counts(presence, shifts, density, threshold)
    per_class = np.bincount(kinds, minlength=4).tolist()
    assert counts[0].tolist() == mofkit.real_class_counts([decoded], classes) == per_class
    first5 = np.bincount([classes.index(x) for x in decoded[:5].get_chemical_symbols()], minlength=4)
    assert mofkit.real_class_counts([decoded, decoded[:5]], classes) == pytest.approx(
        (np.bincount(kinds, minlength=4) + first5) / 2)
    assert mofkit.class_count_loss(counts, counts[0].tolist()).item() == 0
    assert mofkit.class_count_loss(counts, [0, 0, 0, 0]).item() == pytest.approx(
        np.mean(np.log1p(np.bincount(kinds, minlength=4)) ** 2))
    counts[0, 0].backward()  # more carbon: every atom's carbon channel at its site, nothing else
    at_sites = density.grad[0, :, site[:, 0], site[:, 1], site[:, 2]]
    assert (at_sites[0] == 1).all() and (at_sites[1:] == 0).all() and density.grad.abs().sum() == len(positions)
    assert 1 - share.item() == pytest.approx(report.bonded_fraction[0], abs=1e-12)
    crowded = mofkit.crowded_atoms(presence, shifts, drawn, threshold, close, edge)
    assert 0 < report.crowded_fraction[0] < 1 and crowded.item() == pytest.approx(report.crowded_fraction[0], abs=1e-12)
    # gradients: descending drops a lonely inner atom's presence and brings its nearest would-be neighbour closer
    from scipy.spatial.distance import cdist
    grid = np.stack(np.meshgrid(*[np.arange(int(edge) + 1, size - int(edge))] * 3, indexing="ij"), -1).reshape(-1, 3)
    far = grid[cdist(grid, positions).min(1).argmax()]  # an inner site far from every atom: drawn as none
    assert cdist([far], positions).min() > bonds.max() + 1
    p, s = presence.clone(), shifts.clone()
    p[(0, 0, *far)] = 0.05  # a candidate (most present of the rest), not an atom
    p.requires_grad_(True), s.requires_grad_(True)
    mofkit.unbonded_atoms(p, s, drawn, threshold, bonds, edge).sum().backward()
    assert abs(p.grad[(0, 0, *far)]) < 1e-12  # it is no atom, so not a lonely one
    d = cdist(positions, positions) + np.eye(len(positions)) * 99
    lonely = [i for i in range(len(positions)) if (d[i] > bonds[kinds[i], kinds].numpy()).all()
              and ((positions[i] >= edge) & (positions[i] <= size - edge)).all()]
    assert lonely
    i = lonely[0]
    assert p.grad[(0, 0, *site[i])] > 0
    j = int(d[i].argmin())  # moving j along the gradient's descent brings it nearer i
    step = -s.grad[(0, slice(None), *site[j])].numpy()
    assert step @ (positions[i] - positions[j]) > 0
    # descending the crowded share drops a crowded inner atom and moves its crowding neighbour away
    p, s = presence.clone().requires_grad_(True), shifts.clone().requires_grad_(True)
    mofkit.crowded_atoms(p, s, drawn, threshold, close, edge).sum().backward()
    inside = ((positions >= edge) & (positions <= size - edge)).all(1)
    i = next(i for i in range(len(positions)) if inside[i] and (d[i] < close[kinds[i], kinds].numpy()).any())
    j = int(np.argmax(close[kinds[i], kinds].numpy() - d[i]))  # the neighbour deepest inside i's limit
    assert p.grad[(0, 0, *site[i])] > 0
    assert -s.grad[(0, slice(None), *site[j])].numpy() @ (positions[i] - positions[j]) < 0
    # counted over the whole cube (share=False, no edge): every crowded atom, as the distances say; real's count
    whole = (d < close.numpy()[kinds[:, None], kinds[None]]).any(1).sum()
    assert mofkit.crowded_atoms(presence, shifts, drawn, threshold, close, -math.inf, share=False).item() == whole
    assert mofkit.real_pair_counts([decoded])["uncrowded_atoms"] == len(positions) - whole
    face = draw(np.array([[2, 14, 13.0], [2, 14, 14.5]]), [0, 1])  # C-O 0.75 A, beside a face: no inner atom
    assert mofkit.crowded_atoms(*face[:3], threshold, close, edge).item() == 0
    assert mofkit.crowded_atoms(*face[:3], threshold, close, -math.inf, share=False).item() == 2
    assert mofkit.real_pair_counts([face[-1]])["uncrowded_atoms"] == 0
    # a C-H pair just past its limit (0.95 A, X-ray's, against 0.86 A) is not crowded and feels no push
    pair = draw(np.array([[14, 14, 13.0], [14, 14, 14.9]]), [0, 2])
    p, s = pair[0].clone().requires_grad_(True), pair[1].clone().requires_grad_(True)
    share = mofkit.crowded_atoms(p, s, pair[2], threshold, close, edge)
    share.sum().backward()
    assert share.item() == 0 and p.grad.abs().max() == 0 and s.grad.abs().max() == 0


def test_pair_count_and_energy_hold_terms_train_resume_exactly_and_keep_their_references(tmp_path):
    (tmp_path / "shards").mkdir()
    data = atom_shards(tmp_path / "shards")
    source = tiny_config(grid_channels=4, e_scale_K=None)
    mofkit.train(source, data, tmp_path / "source", max_steps=2, progress=False)
    mofkit.export_generator(tmp_path / "source" / "last.pt", tmp_path / "g.pt", dtype=torch.float32)
    config = tiny_config(grid_channels=4, e_scale_K=None, density_head="atoms", density_sigma_voxels=1.5,
                         atom_offsets=True, pair_count_weight=1.0, energy_hold_weight=1000.0, output_lr=1e-3,
                         bond_weight=1.0, class_count_weight=1.0, init_from=str(tmp_path / "g.pt"))
    straight = mofkit.train(config, data, tmp_path / "a", max_steps=3, progress=False)
    mofkit.train(config, data, tmp_path / "b", max_steps=1, progress=False)
    resumed = mofkit.train(config, data, tmp_path / "b", max_steps=3, progress=False)
    for (k, x), y in zip(straight.generator.state_dict().items(), resumed.generator.state_dict().values()):
        assert torch.equal(x, y), k
    assert [r["loss_g"] for r in straight.history] == [r["loss_g"] for r in resumed.history]
    references = mofkit.load_checkpoint(tmp_path / "b" / "last.pt")["references"]
    decoded = [mofkit.grid_to_atoms(g, **data.params.decode_kwargs()) for g in data]
    assert references["pairs"] == {**mofkit.real_pair_counts(decoded), "spacing_A": 0.5}
    assert references["classes"] == mofkit.real_class_counts(decoded, ("C", "O", "other"))
    assert references["pairs"]["atoms"] >= 15 and references["energy_hold_sha256"] == mofkit.sha256_file(
        tmp_path / "g.pt")
    alone = mofkit.train(dataclasses.replace(config, pair_count_weight=0.0), data, tmp_path / "alone", max_steps=1,
                         progress=False)
    assert alone.history[0]["loss_g"] < straight.history[0]["loss_g"]  # the same step, the pair-count term added
    def spied(term, **change):  # one step with `term` 0.25 higher, and the arguments it was called with
        calls, real = [], getattr(mofkit, term)

        def spy(*args, **kwargs):
            calls.append(args + tuple(kwargs.values()))
            return real(*args, **kwargs) + 0.25
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(mofkit, term, spy)
            result = mofkit.train(dataclasses.replace(config, **change), data, tmp_path / "_".join([term, *change]),
                                  max_steps=1, progress=False)
        return result, calls
    # the bond term: G's atoms (none yet at the first step) with the data's bond lengths, times bond_weight
    spy_bond, calls = spied("unbonded_atoms", bond_weight=2.0)
    unbonded = mofkit.train(dataclasses.replace(config, bond_weight=0.0), data, tmp_path / "nobond", max_steps=1,
                            progress=False)
    assert spy_bond.history[0]["loss_g"] - unbonded.history[0]["loss_g"] == pytest.approx(0.5, abs=1e-4)
    assert straight.history[0]["loss_g"] == unbonded.history[0]["loss_g"]
    (presence, _, density, threshold, bonds, edge), = calls
    assert torch.equal(bonds, mofkit.bond_voxels(("C", "O", "other"), 0.5)) and edge == 6.0
    assert presence.shape == (2, 1, 16, 16, 16) and density.shape == (2, 3, 16, 16, 16)
    assert density.requires_grad  # G's: the class count's gradient reaches it
    assert threshold == mofkit.default_threshold(1.0, 1.5)
    # the crowding term likewise, with CROWD_MULT's limits
    spy_crowd, calls = spied("crowded_atoms", crowd_weight=3.0)
    assert spy_crowd.history[0]["loss_g"] - straight.history[0]["loss_g"] == pytest.approx(0.75, abs=1e-4)
    (_, _, _, _, close, edge), = calls
    assert torch.equal(close, mofkit.bond_voxels(("C", "O", "other"), 0.5, mofkit.CROWD_MULT)) and edge == 6.0
    # count_uncrowded: the atom count less the crowded count of the whole cube, against real's uncrowded atoms
    pairs = references["pairs"]
    assert 0 < pairs["uncrowded_atoms"] < pairs["atoms"]  # the shards' atoms are 1.1-3 A apart: some crowded
    uncrowded = mofkit.train(dataclasses.replace(config, count_uncrowded=True), data, tmp_path / "uncrowded",
                             max_steps=1, progress=False)
    spy_count, calls = spied("crowded_atoms", count_uncrowded=True)
    (_, _, _, _, close, edge, share), = calls
    assert torch.equal(close, mofkit.bond_voxels(("C", "O", "other"), 0.5, mofkit.CROWD_MULT))
    assert edge == -math.inf and share is False
    term = lambda atoms, ref: mofkit.PAIR_ATOMS_WEIGHT * (math.log1p(atoms) - math.log1p(ref)) ** 2  # no atoms yet
    assert uncrowded.history[0]["loss_g"] - straight.history[0]["loss_g"] == pytest.approx(
        term(0, pairs["uncrowded_atoms"]) - term(0, pairs["atoms"]), abs=1e-4)
    assert spy_count.history[0]["loss_g"] - uncrowded.history[0]["loss_g"] == pytest.approx(
        term(-0.25, pairs["uncrowded_atoms"]) - term(0, pairs["uncrowded_atoms"]), abs=1e-4)
    weighed = mofkit.train(dataclasses.replace(config, pair_atoms_weight=50.0), data, tmp_path / "weighed",
                           max_steps=1, progress=False)
    assert weighed.history[0]["loss_g"] > straight.history[0]["loss_g"]  # the atom count weighs more
    classless = mofkit.train(dataclasses.replace(config, class_count_weight=0.0), data, tmp_path / "classless",
                             max_steps=1, progress=False)
    assert classless.history[0]["loss_g"] < straight.history[0]["loss_g"]  # and the class count
    # the output layer learns at output_lr, the trunk at lr
    run = mofkit._build_run(config, torch.device("cpu"))
    assert [g["lr"] for g in run.opt_g.param_groups] == [2e-4, 1e-3]
    assert run.opt_g.param_groups[1]["params"] == [mofkit._output_layer(run.G).weight]
    # held: G's energy starts as the file's and stays nearer to it than without the term
    free = mofkit.train(dataclasses.replace(config, energy_hold_weight=0.0), data, tmp_path / "free", max_steps=3,
                        progress=False)
    G, z = mofkit.load_generator(tmp_path / "g.pt").train(), torch.randn(8, 8)
    with torch.no_grad():
        gap = {name: (G(z)[:, :1] - res.generator.train()(z)[:, :1]).square().mean().item()
               for name, res in (("held", straight), ("free", free))}
    assert 0 < gap["held"] < gap["free"] / 2, gap
    with pytest.raises(mofkit.CheckpointError, match="holds the energy of a file with sha256"):
        mofkit.export_generator(tmp_path / "a" / "last.pt", tmp_path / "g.pt", dtype=torch.float32)
        mofkit.train(config, data, tmp_path / "b", max_steps=4, progress=False)
    with pytest.raises(ValueError, match="pair_count_weight: train on shards with density channels"):
        mofkit.train(dataclasses.replace(config, energy_hold_weight=0.0, init_from=""), random_grids(4, channels=4),
                     tmp_path / "list", max_steps=1, progress=False)
    with pytest.raises(ValueError, match="pair_count_weight needs atom presences"):
        tiny_config(grid_channels=4, pair_count_weight=1.0)
    with pytest.raises(ValueError, match="bond_weight needs atom presences"):
        tiny_config(grid_channels=4, bond_weight=1.0)
    with pytest.raises(ValueError, match="class_count_weight needs atom presences"):
        tiny_config(grid_channels=4, class_count_weight=1.0)
    with pytest.raises(ValueError, match="crowd_weight needs atom presences"):
        tiny_config(grid_channels=4, crowd_weight=1.0)
    with pytest.raises(ValueError, match="count_uncrowded counts atoms for the pair-count term"):
        tiny_config(grid_channels=4, count_uncrowded=True)
    with pytest.raises(ValueError, match="energy_hold_weight needs init_from"):
        tiny_config(energy_hold_weight=1.0)


@pytest.mark.parametrize("dim,channels,grid_channels", [(32, 16, 1), (64, 16, 2), (128, 16, 1)])
def test_gan_shapes_and_ranges(dim, channels, grid_channels):
    torch.manual_seed(0)
    G = mofkit.Generator(dim=dim, latent=8, channels=channels, out_channels=grid_channels)
    D = mofkit.Discriminator(dim=dim, channels=channels, in_channels=grid_channels)
    with torch.no_grad():
        x = G(torch.randn(2, 8))
        d = D(x)
    assert x.shape == (2, grid_channels, dim, dim, dim) and d.shape == (2,)
    assert 0 <= x.min() and x.max() <= 1 and ((0 < d) & (d < 1)).all()
    # one resolution step per factor of 2 above 4^3
    n_up = sum(isinstance(m, torch.nn.ConvTranspose3d) for m in G.modules())
    assert n_up == int(np.log2(dim // 4))


def test_discriminator_raw_score_is_the_logit_of_the_sigmoid_output_and_trains(tmp_path):
    torch.manual_seed(0)
    D = mofkit.Discriminator(dim=16, channels=8).eval()
    raw = mofkit.Discriminator(dim=16, channels=8, sigmoid=False).eval()
    raw.load_state_dict(D.state_dict())  # same parameters: only the output differs
    x = torch.rand(3, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(torch.sigmoid(raw(x)), D(x))
    res = mofkit.train(tiny_config(d_sigmoid=False), random_grids(4), tmp_path, max_steps=2, progress=False)
    assert res.discriminator.sigmoid is False and mofkit.load_checkpoint(res.checkpoint)["config"]["d_sigmoid"] is False


def test_patch_discriminator_scores_each_neighbourhood_and_the_whole():
    """d_patch: column 0 is the plain discriminator's score (same weights), the other (dim/4)^3 columns are local:
    a change in one corner of the grid moves only the patch scores whose 10-voxel field covers it."""
    torch.manual_seed(0)
    D = mofkit.Discriminator(dim=32, channels=16, in_channels=2, sigmoid=False, patch=True).eval()
    plain = mofkit.Discriminator(dim=32, channels=16, in_channels=2, sigmoid=False).eval()
    plain.load_state_dict({k: v for k, v in D.state_dict().items() if not k.startswith("patch_head")})
    x = torch.rand(3, 2, 32, 32, 32)
    with torch.no_grad():
        d = D(x)
        assert d.shape == (3, 1 + 8 ** 3)
        torch.testing.assert_close(mofkit.global_score(d), plain(x))
        y = x.clone()
        y[:, :, :2, :2, :2] = 5.0
        moved = (D(y)[:, 1:] - d[:, 1:]).abs().view(3, 8, 8, 8) > 1e-6
    assert moved[:, 0, 0, 0].all() and not moved[:, 2:].any() and not moved[:, :, 2:].any()
    assert not moved[:, :, :, 2:].any()
    with pytest.raises(ValueError, match="dim=8: patch scores"):
        mofkit.Discriminator(dim=8, channels=8, patch=True)
    # the losses: the global score's plus the patches' (each patch one sample of the mean)
    d_real, d_fake = torch.tensor([[0.9, 0.2, 1.4], [0.3, -2.0, 0.5]]), torch.tensor([[0.1, -0.3, 0.6], [-1.2, 0.4, 0.0]])
    hinge = lambda r, f: torch.relu(1 - r).mean() + torch.relu(1 + f).mean()
    expect = hinge(d_real[:, 0], d_fake[:, 0]) + hinge(d_real[:, 1:], d_fake[:, 1:])
    assert mofkit.discriminator_loss("hinge", d_real, d_fake).item() == pytest.approx(expect.item())
    assert mofkit.generator_loss("hinge", d_fake).item() == pytest.approx(
        (-d_fake[:, 0].mean() - d_fake[:, 1:].mean()).item())


def test_batchnorm_discriminator_cannot_see_a_contrast_shared_by_a_batch():
    """The study's D normalises each batch by its own statistics, and _gan_step shows it real and generated batches
    apart: a whole batch at 0.6x the contrast scores exactly as the batch itself. Without the norm it does not."""
    torch.manual_seed(0)
    x = 2 * torch.rand(4, 3, 16, 16, 16) - 1
    for patch in (False, True):
        batch = mofkit.Discriminator(dim=16, channels=8, in_channels=3, sigmoid=False, patch=patch)
        plain = mofkit.Discriminator(dim=16, channels=8, in_channels=3, sigmoid=False, patch=patch, norm="none")
        with torch.no_grad():
            torch.testing.assert_close(batch(0.6 * x), batch(x))
            assert (plain(0.6 * x) - plain(x)).abs().max() > 1e-3
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in plain.modules())
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, torch.nn.Conv3d))
    with pytest.raises(ValueError, match="d_norm='layer'"):
        mofkit.TrainConfig(d_norm="layer")
    with pytest.raises(ValueError, match="d_norm='joint'"):  # a way of running the batch-normalised D, not a module
        mofkit.Discriminator(dim=16, channels=8, norm="joint")
    # shown as one batch (d_norm="joint"), the same D tells the dimmed half from the rest
    with torch.no_grad():
        joint = batch(torch.cat([x, 0.6 * x]))
    assert (joint[4:] - joint[:4]).abs().max() > 1e-3
    assert mofkit.TrainConfig.study(d_patch=True).d_norm == "batch"
    assert mofkit._config_from_checkpoint({"config": {}}).d_norm == "batch"  # models trained before it


def test_gan_rejects_bad_sizes():
    with pytest.raises(ValueError, match="dim=48"):
        mofkit.Generator(dim=48)
    with pytest.raises(ValueError, match="channels=12"):
        mofkit.Discriminator(dim=64, channels=12)


def test_gan_transform_round_trip_numpy_and_torch():
    e = np.array([-1500.0, -400.0, -100.0, 0.0, 250.0, 5000.0], dtype=np.float32).reshape(1, 1, 6)
    x = mofkit.to_gan_input(e, 800.0)
    np.testing.assert_allclose(x.ravel(), [1.0, 0.5, 0.125, 0, 0, 0])  # wells positive, repulsion 0, saturation
    assert x.dtype == np.float32
    back = mofkit.from_gan_output(x, 800.0)
    np.testing.assert_allclose(back, np.clip(e, -800.0, 0.0))  # the inverse up to the clip
    t = mofkit.to_gan_input(torch.from_numpy(e).double(), 800.0)
    assert torch.is_tensor(t) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), x)
    # multi-channel (N, C, D, D, D): only channel 0 is energy, densities pass through
    grid = np.zeros((2, 3, 2, 2, 2), np.float32)
    grid[:, 0] = -200.0
    grid[:, 1:] = 0.7
    out = mofkit.to_gan_input(torch.from_numpy(grid), 400.0)
    assert out.shape == grid.shape and torch.allclose(out[:, 0], torch.tensor(0.5)) and (out[:, 1:] == 0.7).all()
    back = mofkit.from_gan_output(out.numpy(), 400.0)
    np.testing.assert_allclose(back, grid)
    with pytest.raises(ValueError, match="e_scale_K"):
        mofkit.to_gan_input(e, 0.0)


def test_signed_transform_keeps_repulsion_and_maps_densities_to_tanh_range():
    e = np.array([-1500.0, -400.0, 0.0, 250.0, 5000.0], dtype=np.float32).reshape(1, 1, 5)
    x = mofkit.to_gan_input(e, 800.0, "signed")
    np.testing.assert_allclose(x.ravel(), [1.0, 0.5, 0.0, -0.3125, -1.0])  # repulsion kept down to +E_scale
    np.testing.assert_allclose(mofkit.from_gan_output(x, 800.0, "signed"), np.clip(e, -800.0, 800.0))
    np.testing.assert_allclose(mofkit.gan_round_trip(e, 800.0), np.clip(e, -800.0, 0.0))  # what comparisons see
    grid = np.zeros((1, 2, 2, 2, 2), np.float32)
    grid[:, 1] = [[[0.0, 0.25], [0.5, 1.0]]] * 2
    out = mofkit.to_gan_input(grid, 400.0, "signed")
    np.testing.assert_allclose(out[:, 1], 2 * grid[:, 1] - 1)              # densities [0, 1] -> [-1, 1]
    np.testing.assert_allclose(mofkit.from_gan_output(out, 400.0, "signed")[:, 1], grid[:, 1], atol=1e-7)
    with pytest.raises(ValueError, match="transform='log'"):
        mofkit.to_gan_input(e, 800.0, "log")


def test_pick_e_scale_is_percentile_of_attractive_wells():
    rng = np.random.default_rng(1)
    grids = [np.concatenate([-rng.uniform(0, 1000, 500), rng.uniform(0, 5000, 500)]).reshape(1, 10, 10, 10)
             for _ in range(3)]
    wells = np.concatenate([-g[g < 0] for g in grids])
    assert mofkit.pick_e_scale(grids, percentile=99.0) == pytest.approx(np.percentile(wells, 99.0))
    # subsampled per grid: still the same distribution
    assert mofkit.pick_e_scale(grids, 50.0, values_per_grid=300) == pytest.approx(500, rel=0.1)
    with pytest.raises(ValueError, match="no attractive"):
        mofkit.pick_e_scale([np.ones((4, 4, 4))])


# =============================================================================
# 7. Training
# =============================================================================


def test_train_config_defaults_study_preset_and_fast_gpu_preset():
    c = mofkit.TrainConfig()
    assert (c.epochs, c.latent, c.lr, c.betas, c.dim, c.channels, c.precision) == \
        (48, 200, 2e-4, (0.5, 0.999), 64, 512, "fp32")
    assert (c.loss, c.d_sigmoid, c.transform, c.r1_gamma, c.augment) == ("hinge", False, "signed", 0.0, False)
    assert c.ema == 0.999  # the kit's recipe (README, "Choosing the recipe"): hinge on D's raw score, EMA
    s = mofkit.TrainConfig.study()  # the study's recipe, written out independently of the class
    assert (s.batch_size, s.epochs, s.loss, s.d_sigmoid, s.transform, s.ema, s.r1_gamma, s.augment, s.lr,
            s.betas, s.dim, s.channels, s.latent) == (2, 48, "lsgan", True, "wells", 0.0, 0.0, False, 2e-4,
                                                      (0.5, 0.999), 64, 512, 200)
    f = mofkit.TrainConfig.fast_gpu(epochs=3)
    assert f.batch_size > 2 and f.precision == "auto" and f.channels_last and f.compile and f.epochs == 3
    recipe = ("loss", "d_sigmoid", "transform", "ema", "r1_gamma", "augment")
    assert all(getattr(f, k) == getattr(c, k) for k in recipe)  # the GPU preset trains the same recipe


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(epochs=0), dict(lr=-1.0), dict(ema=1.0),
                                 dict(loss="wgan"), dict(loss="hinge", d_sigmoid=True), dict(transform="log"),
                                 dict(r1_every=0), dict(dim=48)])
def test_train_config_refuses_bad_values_naming_the_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad)) if "dim" not in bad else "dim=48"):
        mofkit.TrainConfig(**bad)


def test_train_one_step_changes_weights_finite_losses(tmp_path):
    # least squares: under the hinge loss D's output bias has zero gradient while every score is inside the
    # margin (-1 from the real term, +1 from the fake one), so "every weight moves" holds only for lsgan
    config = tiny_config(loss="lsgan")
    mofkit.train(config, random_grids(4), tmp_path, max_steps=1, progress=False)
    before = mofkit.load_checkpoint(tmp_path / "last.pt")
    res = mofkit.train(config, random_grids(4), tmp_path, max_steps=2, progress=False)  # one more step
    h = res.history[-1]
    assert h["step"] == 2 and all(np.isfinite(h[k]) for k in ("loss_d", "loss_g", "d_real", "d_fake"))
    for name, module in [("generator", res.generator), ("discriminator", res.discriminator)]:
        for k, w in module.named_parameters():
            assert not torch.equal(before[name][k], w.detach()), (name, k)  # every weight got an update


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_autocast_step_on_cpu(tmp_path, precision):
    res = mofkit.train(tiny_config(precision=precision, channels_last=True), random_grids(4), tmp_path, max_steps=2,
                       progress=False)
    h = res.history[-1]
    assert h["step"] == 2 and np.isfinite(h["loss_d"]) and np.isfinite(h["loss_g"]) and np.isfinite(h["d_real"])
    ckpt = mofkit.load_checkpoint(tmp_path / "last.pt")
    assert bool(ckpt["scaler"]) == (precision == "fp16")  # GradScaler state only on the fp16 path


def test_train_max_minutes_stops_at_a_checkpoint_and_resumes(tmp_path):
    data = random_grids(4)
    res = mofkit.train(tiny_config(epochs=10**6), data, tmp_path, max_minutes=0.02, progress=False)
    ckpt = mofkit.load_checkpoint(res.checkpoint)
    assert 0 < ckpt["step"] < 10**6 and 1.2 <= ckpt["time_s"] < 30  # stopped at the first log past 1.2 s
    more = mofkit.train(tiny_config(epochs=10**6), data, tmp_path, max_minutes=0.01, progress=False)
    again = mofkit.load_checkpoint(more.checkpoint)
    assert again["step"] > ckpt["step"] and again["time_s"] >= ckpt["time_s"] + 0.6


def test_export_and_load_generator_sample_like_the_checkpoint_and_check_the_manifest(tmp_path):
    res = mofkit.train(tiny_config(), random_grids(4), tmp_path / "run", max_steps=3, progress=False)
    path = mofkit.export_generator(res.checkpoint, tmp_path / "g.pt")
    assert path.stat().st_size < res.checkpoint.stat().st_size / 3  # no optimizer/discriminator state, fp16
    G = mofkit.load_generator(path, manifest_csv=None)
    assert G.e_scale_K == 800.0 and not G.training
    shipped, full = mofkit.sample(G, 3, seed=5), mofkit.sample(res.checkpoint, 3, seed=5)
    assert shipped.shape == full.shape == (3, 1, 16, 16, 16)
    assert np.abs(shipped - full).max() < 800.0 * 0.01  # fp16 weights: within 1% of E_scale
    row = mofkit.record_weights(path, tmp_path / "m.csv", source="a test")
    assert mofkit.read_manifest(tmp_path / "m.csv", kind="weights") == [{k: str(v) for k, v in row.items()}]
    assert (row["file"], row["sha256"], row["bytes"]) == ("g.pt", mofkit.sha256_file(path), path.stat().st_size)
    assert mofkit.load_generator(path, tmp_path / "m.csv").e_scale_K == 800.0
    mofkit.write_manifest(tmp_path / "m.csv", [{**row, "sha256": "0" * 64}])
    with pytest.raises(mofkit.CheckpointError, match="does not match"):
        mofkit.load_generator(path, tmp_path / "m.csv")
    old = {new: old for old, new in mofkit._OLD_MANIFEST_COLUMNS.items()}  # a manifest before file/members
    mofkit._write_csv(tmp_path / "old.csv", [old.get(c, c) for c in mofkit.MANIFEST_COLUMNS],
                      [{old.get(k, k): v for k, v in {**row, "sha256": "0" * 64}.items()}])
    with pytest.raises(mofkit.CheckpointError, match="does not match"):
        mofkit.load_generator(path, tmp_path / "old.csv")
    with pytest.raises(mofkit.CheckpointError, match="export_generator"):
        mofkit.load_generator(res.checkpoint, manifest_csv=None)  # a training checkpoint is not a generator file


def test_train_resume_is_bit_identical(tmp_path):
    data = random_grids(6)  # 3 steps per epoch: the 4-step run crosses an epoch, the split falls mid-epoch
    straight = mofkit.train(tiny_config(), data, tmp_path / "a", max_steps=4, progress=False)
    first = mofkit.train(tiny_config(), data, tmp_path / "b", max_steps=2, progress=False)
    assert first.history[-1]["step"] == 2
    resumed = mofkit.train(tiny_config(), data, tmp_path / "b", resume=True, max_steps=4, progress=False)
    for a, b in [(straight.generator, resumed.generator), (straight.discriminator, resumed.discriminator)]:
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), k
    assert [r["loss_g"] for r in straight.history] == [r["loss_g"] for r in resumed.history]
    ckpt = mofkit.load_checkpoint(tmp_path / "b" / "last.pt")
    assert (ckpt["step"], ckpt["epoch"], ckpt["samples_in_epoch"]) == (4, 1, 2)


def test_train_history_csv_and_load_history(tmp_path):
    mofkit.train(tiny_config(log_every=2), random_grids(4), tmp_path, max_steps=5, progress=False)
    df = mofkit.load_history(tmp_path)
    assert list(df.columns) == list(mofkit.HISTORY_COLUMNS)
    assert df["step"].tolist() == [2, 4, 5] and (df["samples_per_s"] > 0).all()
    assert df["epoch"].tolist() == [0, 1, 2]  # 2 steps per epoch
    # rows logged after the checkpoint a run resumes from are dropped
    with open(tmp_path / "history.csv", "a") as f:
        f.write("6,3,0,0,0,0,0,0\n")
    mofkit.train(tiny_config(log_every=2), random_grids(4), tmp_path, max_steps=6, progress=False)
    assert mofkit.load_history(tmp_path / "history.csv")["step"].tolist() == [2, 4, 5, 6]


def test_generator_channels_widen_the_generator_only_and_travel_with_its_files(tmp_path):
    config = tiny_config(generator_channels=16)
    G, D = mofkit._models(config)
    assert (G.channels, D.channels) == (16, 8) and G.net[0].in_channels == 16 and D.features[-3].out_channels == 8
    assert mofkit._models(tiny_config())[0].channels == 8  # 0: the one width of the study
    assert mofkit._config_from_checkpoint({"config": {}}).generator_channels == 0  # models trained before it
    with pytest.raises(ValueError, match="generator_channels=6: must be divisible by 4"):
        tiny_config(dim=32, generator_channels=6)
    mofkit.train(config, random_grids(4), tmp_path, max_steps=2, progress=False)
    G = mofkit.load_generator(mofkit.export_generator(tmp_path / "last.pt", tmp_path / "g.pt"))
    assert G.channels == 16 and mofkit.sample(G, 2).shape == (2, 1, 16, 16, 16)
    with pytest.raises(mofkit.CheckpointError, match="generator_channels=16 but the config asks for 0"):
        mofkit.train(tiny_config(), random_grids(4), tmp_path, max_steps=3, progress=False)


def test_train_corrupt_or_mismatched_checkpoint_clear_error_and_kept(tmp_path):
    mofkit.train(tiny_config(), random_grids(4), tmp_path, max_steps=1, progress=False)
    last = tmp_path / "last.pt"
    good = last.read_bytes()
    with pytest.raises(mofkit.CheckpointError, match="channels=8 but the config asks for 16"):
        mofkit.train(tiny_config(channels=16), random_grids(4), tmp_path, max_steps=2, progress=False)
    with pytest.raises(mofkit.CheckpointError, match="density_head=channels but the config asks for occupancy"):
        mofkit.train(tiny_config(density_head="occupancy"), random_grids(4), tmp_path, max_steps=2, progress=False)
    with pytest.raises(mofkit.CheckpointError, match="already there"):
        mofkit.train(tiny_config(), random_grids(4), tmp_path, resume=False, max_steps=2, progress=False)
    assert last.read_bytes() == good
    bad = tmp_path / "bad" / "last.pt"
    bad.parent.mkdir()
    bad.write_bytes(good[: len(good) // 2])  # a checkpoint cut short
    with pytest.raises(mofkit.CheckpointError, match=r"bad[/\\]last\.pt.*not a readable"):
        mofkit.train(tiny_config(), random_grids(4), bad.parent, max_steps=2, progress=False)
    assert bad.read_bytes() == good[: len(good) // 2]
    torch.save({"step": 3}, bad)
    with pytest.raises(mofkit.CheckpointError, match="missing"):
        mofkit.sample(bad, 1)


def test_train_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config(checkpoint_every_steps=1)
    mofkit.train(cfg, random_grids(4), tmp_path, max_steps=2, progress=False)
    good = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(mofkit.TrainingDiverged, match="non-finite loss at step 3.*last good checkpoint"):
        mofkit.train(cfg, random_grids(4, fill=float("nan")), tmp_path, max_steps=4, progress=False)
    assert (tmp_path / "last.pt").read_bytes() == good
    assert mofkit.load_checkpoint(tmp_path / "last.pt")["step"] == 2


def test_train_rejects_unusable_datasets(tmp_path):
    with pytest.raises(TypeError, match="one-shot"):
        mofkit.train(tiny_config(), (g for g in random_grids(4)), tmp_path / "a", max_steps=1, progress=False)
    with pytest.raises(ValueError, match="no full batch of 2"):
        mofkit.train(tiny_config(), random_grids(1), tmp_path / "b", max_steps=1, progress=False)


def test_train_streaming_dataset_and_picked_e_scale(tmp_path):
    class Stream(torch.utils.data.IterableDataset):  # ShardDataset's protocol: set_epoch(epoch, start=n)
        def __init__(self, grids):
            self.grids, self.calls, self.start, self.batch_size = grids, [], 0, 1

        def set_epoch(self, epoch, start=0):
            self.calls.append((epoch, start))
            self.start = start

        def __iter__(self):
            return iter(self.grids[self.start:])

    grids = random_grids(6, channels=2)
    stream = Stream(grids)
    cfg = tiny_config(grid_channels=2, e_scale_K=None)
    res = mofkit.train(cfg, stream, tmp_path / "a", max_steps=2, progress=False)
    assert stream.batch_size == 2  # set to the trainer's, so DataLoader workers keep the stream's order
    assert mofkit.load_checkpoint(res.checkpoint)["e_scale_K"] == pytest.approx(mofkit.pick_e_scale(grids))
    resumed = mofkit.train(cfg, stream, tmp_path / "a", max_steps=5, progress=False)
    assert stream.calls == [(0, 0), (0, 4), (1, 0)]  # resumed mid-epoch without re-reading
    # a stream without `start`: the skipped batches are read and dropped, same result
    plain = mofkit.train(cfg, mofkit._Reiterable(grids), tmp_path / "b", max_steps=2, progress=False)
    plain = mofkit.train(cfg, mofkit._Reiterable(grids), tmp_path / "b", max_steps=5, progress=False)
    for x, y in zip(resumed.generator.parameters(), plain.generator.parameters()):
        assert torch.equal(x, y)


# --- the objective and the recipe ----------------------------------------------

def test_gan_losses_are_the_published_objectives():
    d_real, d_fake = torch.tensor([0.9, 0.2, 1.4]), torch.tensor([0.1, -0.3, 0.6])
    # least squares, Mao et al. 2017 (a=0, b=c=1): D to 1 on real, 0 on fake; G pulls D(G(z)) to 1
    ls_d = 0.5 * (sum((x - 1) ** 2 for x in [0.9, 0.2, 1.4]) / 3 + sum(x ** 2 for x in [0.1, -0.3, 0.6]) / 3)
    assert mofkit.discriminator_loss("lsgan", d_real, d_fake).item() == pytest.approx(ls_d)
    assert mofkit.generator_loss("lsgan", d_fake).item() == pytest.approx(sum((x - 1) ** 2 for x in [0.1, -0.3, 0.6]) / 3)
    # hinge (Lim & Ye 2017; Miyato et al. 2018)
    hinge_d = sum(max(0, 1 - x) for x in [0.9, 0.2, 1.4]) / 3 + sum(max(0, 1 + x) for x in [0.1, -0.3, 0.6]) / 3
    assert mofkit.discriminator_loss("hinge", d_real, d_fake).item() == pytest.approx(hinge_d)
    assert mofkit.generator_loss("hinge", d_fake).item() == pytest.approx(-(0.1 - 0.3 + 0.6) / 3)
    # logistic, non-saturating G (Goodfellow et al. 2014): -log sigmoid(D(x)) - log(1 - sigmoid(D(G(z))))
    sig = lambda x: 1 / (1 + math.exp(-x))
    ns_d = (sum(-math.log(sig(x)) for x in [0.9, 0.2, 1.4]) + sum(-math.log(1 - sig(x)) for x in [0.1, -0.3, 0.6])) / 3
    assert mofkit.discriminator_loss("nonsat", d_real, d_fake).item() == pytest.approx(ns_d, rel=1e-6)
    assert mofkit.generator_loss("nonsat", d_fake).item() == pytest.approx(
        sum(-math.log(sig(x)) for x in [0.1, -0.3, 0.6]) / 3, rel=1e-6)


def sorted_pairs_w2(a, b):
    """The squared 2-Wasserstein distance of two equal-size samples of numbers by an optimal assignment
    (scipy's Hungarian solver on squared differences): independent of sorting."""
    from scipy.optimize import linear_sum_assignment
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    cost = (a[:, None] - b[None, :]) ** 2
    rows, cols = linear_sum_assignment(cost)
    return cost[rows, cols].mean()


def test_marginal_w2_is_the_optimal_transport_cost_per_channel():
    rng = np.random.default_rng(3)
    widths = np.array([0.5, 1.0, 2.0])[:, None, None, None]  # channels of their own widths
    fake, real = (torch.tensor(rng.normal(size=(2, 3, 4, 4, 4)) * s, dtype=torch.float32) for s in (1.0, widths))
    expect = np.mean([sorted_pairs_w2(fake[:, c], real[:, c]) for c in range(3)])
    assert mofkit.marginal_w2(fake, real).item() == pytest.approx(expect, rel=1e-5)
    # blind to where values sit: voxels shuffled across grids and positions, channel by channel, cost nothing
    shuffled = torch.stack([real[:, c].flatten()[torch.randperm(128)].reshape(2, 4, 4, 4) for c in range(3)], 1)
    assert mofkit.marginal_w2(shuffled, real).item() == pytest.approx(0, abs=1e-12)
    # ... but not to channels swapped, nor to a batch-wide contrast (what BatchNorm in D cannot see)
    assert mofkit.marginal_w2(real[:, [1, 0, 2]], real).item() > 0.05
    assert mofkit.marginal_w2(0.8 * real, real).item() == pytest.approx(0.04 * real.pow(2).mean().item(), rel=1e-5)
    # on `voxels` drawn at random per channel (the trainer's speed setting): the cost of those draws
    torch.manual_seed(1)
    drawn = mofkit.marginal_w2(fake, real, voxels=40).item()
    torch.manual_seed(1)
    at_fake, at_real = torch.randint(128, (40,)), torch.randint(128, (40,))
    flat = lambda x, c: x[:, c].flatten()
    assert drawn == pytest.approx(np.mean([sorted_pairs_w2(flat(fake, c)[at_fake], flat(real, c)[at_real])
                                           for c in range(3)]), rel=1e-5)
    with pytest.raises(ValueError, match="marginal_channels='energy'"):
        mofkit.TrainConfig(marginal_channels="energy")
    with pytest.raises(ValueError, match="marginal_channels='density' needs density channels"):
        mofkit.TrainConfig(marginal_weight=1.0, marginal_channels="density")
    with pytest.raises(ValueError, match=r"marginal_w2: batches of shape \(2, 3, 4, 4, 4\) and \(1, 3, 4, 4, 4\)"):
        mofkit.marginal_w2(fake, real[:1])


def brute_pairs(x, offset):
    """(sums, |differences|) of the values of every pair of voxels of the fields x (N, D, D, D) whose offset has
    the absolute components of `offset` in any order and sign, by loops over every vector in the cube."""
    x = np.asarray(x, np.float64)
    size, reach = x.shape[1], max(offset)
    sums, diffs = [], []
    for d in itertools.product(range(-reach, reach + 1), repeat=3):
        if sorted(map(abs, d)) != sorted(offset):
            continue
        for grid in x:
            for r in itertools.product(range(size), repeat=3):
                q = tuple(a + b for a, b in zip(r, d))
                if all(0 <= c < size for c in q):
                    sums.append(grid[r] + grid[q])
                    diffs.append(abs(grid[r] - grid[q]))
    return np.array(sums), np.array(diffs)


def test_pair_w2_compares_the_values_of_voxel_pairs_by_optimal_transport():
    rng = np.random.default_rng(4)
    fake = torch.tensor(rng.normal(size=(1, 4, 4, 4)), dtype=torch.float32)
    real = torch.tensor(rng.normal(size=(1, 4, 4, 4)) * 1.5 + 0.3, dtype=torch.float32)
    expect = np.mean([sorted_pairs_w2(f, r) for offset in mofkit.PAIR_OFFSETS
                      for f, r in zip(brute_pairs(fake, offset), brute_pairs(real, offset))])
    assert mofkit.pair_w2(fake, real).item() == pytest.approx(expect, rel=1e-4)
    assert mofkit.pair_w2(real, real).item() == 0
    # it sees arrangement: two peaks a bond (2 voxels) apart vs the same values 4 apart; every voxel value is
    # the same, so the marginal term is blind to the change
    near, far = torch.zeros(1, 8, 8, 8), torch.zeros(1, 8, 8, 8)
    near[0, 2, 3, 3] = near[0, 4, 3, 3] = far[0, 1, 3, 3] = far[0, 5, 3, 3] = 1.0
    assert mofkit.marginal_w2(near[:, None], far[:, None]).item() == 0
    assert mofkit.pair_w2(near, far).item() > 1e-4
    # drawn pairs (the trainer's setting) estimate the whole: fields smooth along one axis only, so a draw that
    # missed directions of a class, or voxels, would be off
    smooth = torch.tensor(rng.normal(size=(2, 6, 6, 6)), dtype=torch.float32).cumsum(1) / 2
    rough = torch.tensor(rng.normal(size=(2, 6, 6, 6)), dtype=torch.float32)
    torch.manual_seed(0)
    whole, drawn = mofkit.pair_w2(smooth, rough).item(), mofkit.pair_w2(smooth, rough, voxels=100_000).item()
    assert drawn == pytest.approx(whole, rel=0.05)
    with pytest.raises(ValueError, match=r"pair_w2: batches of shape \(2, 6, 6, 6\) and \(1, 6, 6, 6\)"):
        mofkit.pair_w2(smooth, rough[:1])
    with pytest.raises(ValueError, match="pair_weight needs density channels"):
        mofkit.TrainConfig(pair_weight=1.0)
    with pytest.raises(ValueError, match="pair_field='mean'"):
        mofkit.TrainConfig(pair_field="mean")


def brute_clash(presence, sub=1, shifts=None):
    """Sum over every pair of sites (1/sub voxel apart) closer than CLASH_VOXELS of p p, mean over grids (pdist);
    with shifts (sub=1), every pair of the shifted atoms, weighed by the smoothed step."""
    from scipy.spatial.distance import pdist
    p = np.asarray(presence, dtype=np.float64).reshape(len(presence), -1)
    n = round(p.shape[1] ** (1 / 3))
    sites = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3) / sub
    i, j = np.triu_indices(len(sites), 1)
    if shifts is None:
        close = pdist(sites) <= mofkit.CLASH_VOXELS + 1e-9
        return np.mean([(q[i[close]] * q[j[close]]).sum() for q in p])
    window = pdist(sites, "chebyshev") <= math.floor(mofkit.CLASH_VOXELS) + 1  # shifts bring no others that near
    r, tau = mofkit.CLASH_VOXELS, mofkit.CLASH_SOFTNESS_VOXELS
    near = [window / (1 + np.exp((pdist(sites + s.reshape(3, -1).T) ** 2 - r * r) / (2 * r * tau))) for s in shifts]
    return np.mean([(q[i] * q[j] * w).sum() for q, w in zip(p, near)])


def test_clash_pairs_counts_pairs_of_atoms_closer_than_any_bond():
    p = torch.zeros(1, 1, 8, 8, 8)
    p[0, 0, 1, 1, 1] = p[0, 0, 2, 2, 1] = 1.0  # sqrt(2) voxels: 0.71 A at 0.5 A
    p[0, 0, 5, 5, 5] = p[0, 0, 7, 5, 5] = 1.0  # 2 voxels, 1.0 A: a bond, not a clash
    assert mofkit.clash_pairs(p).item() == pytest.approx(1.0)
    p[0, 0, 1, 2, 2] = 0.5  # sqrt(2) from the first, 1 from the second
    assert mofkit.clash_pairs(p).item() == pytest.approx(2.0)
    rng = np.random.default_rng(0)
    for sub in (1, 2):
        x = rng.random((3, 1) + (6 * sub,) * 3) ** 4
        assert mofkit.clash_pairs(torch.from_numpy(x), sub).item() == pytest.approx(brute_clash(x, sub), rel=1e-10)
    # shifted atoms (atom_offsets): the pair's own distance, the step smoothed; zero shifts count as the sites do
    shifts = torch.from_numpy(rng.uniform(-0.5, 0.5, (3, 3, 6, 6, 6)))
    x = torch.from_numpy(rng.random((3, 1, 6, 6, 6)) ** 4)
    assert mofkit.clash_pairs(x, 1, shifts).item() == pytest.approx(brute_clash(x.numpy(), 1, shifts.numpy()),
                                                                   rel=1e-10)
    q = torch.zeros(1, 1, 8, 8, 8, dtype=torch.float64)
    q[0, 0, 2, 2, 2] = q[0, 0, 3, 2, 2] = q[0, 0, 6, 6, 6] = q[0, 0, 6, 6, 4] = 1.0  # 1 and 2 voxels apart
    zero = torch.zeros(1, 3, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    count = mofkit.clash_pairs(q, 1, zero)
    step = lambda d: 1 / (1 + math.exp((d * d - 1.8 ** 2) / (2 * 1.8 * mofkit.CLASH_SOFTNESS_VOXELS)))
    assert count.item() == pytest.approx(step(1) + step(2), rel=1e-12) and step(1) > 0.999 and step(2) < 0.02
    shifted = torch.zeros(1, 3, 8, 8, 8, dtype=torch.float64)
    shifted[0, 0, 3, 2, 2], shifted[0, 0, 2, 2, 2] = 0.4, -0.35  # the first pair 1.75 voxels apart, near the limit
    shifted.requires_grad_(True)
    mofkit.clash_pairs(q, 1, shifted).backward()
    assert shifted.grad[0, 0, 3, 2, 2] < 0 < shifted.grad[0, 0, 2, 2, 2]  # moving them apart lowers the count
    assert shifted.grad[0, 1:, 2:4, 2, 2].abs().max() < 1e-12  # and sideways does not
    wide = lambda d: 1 / (1 + math.exp((d * d - 2.5 ** 2) / (2 * 2.5 * mofkit.CLASH_SOFTNESS_VOXELS)))
    assert mofkit.clash_pairs(q, 1, zero, 2.5).item() == pytest.approx(wide(1) + wide(2), rel=1e-12)  # wider reach
    q[0, 0, 4, 2, 2], shifted.grad = 1.0, None  # an atom shifted onto another: a gradient, not NaN
    with torch.no_grad():
        shifted[0, 0, 3, 2, 2], shifted[0, 0, 4, 2, 2] = 0.5, -0.5
    mofkit.clash_pairs(q, 1, shifted).backward()
    assert torch.isfinite(shifted.grad).all()
    with pytest.raises(ValueError, match="clash_weight needs atom presences"):
        mofkit.TrainConfig(grid_channels=3, clash_weight=1.0)
    with pytest.raises(ValueError, match="with_presence"):
        mofkit.Generator(dim=16, latent=8, channels=16, out_channels=3)(torch.randn(1, 8), with_presence=True)
    assert mofkit._config_from_checkpoint({"config": {}}).clash_weight == 0.0


@pytest.mark.parametrize("preset", ["kit", "study", "patch", "joint", "marginal", "marginal_density", "pair_max",
                                    "pair_sum", "clash"])
def test_gan_step_minimises_each_players_loss(preset):
    """One _gan_step: D's loss is measured on D before its update and G's on D after it, from the same fakes;
    each player's update lowers its own loss on those inputs (a flipped target would raise it). The objectives
    are written out here: the kit's hinge loss on raw scores, the study's least squares on a Sigmoid output,
    the hinge loss on the global score plus on the patch scores (d_patch; the log shows the global score), the
    hinge loss with real and generated grids through D as one batch (d_norm="joint"), the hinge loss plus the
    marginal term against the real batch (marginal_weight; on every channel, or the density channels only), the
    hinge loss plus the pair term on the density channels' largest or their sum (pair_weight, pair_field), the
    hinge loss plus the clash term on the "atoms" head's presences (clash_weight)."""
    scores = lambda D, real, fake: (D(real), D(fake))
    first = 1 if preset == "marginal_density" else 0
    clash = 0.05 if preset == "clash" else 0.0
    presences = {}  # grids -> the presences they were drawn from (the clash preset)
    if preset in ("kit", "joint", "marginal", "marginal_density", "pair_max", "pair_sum", "clash"):
        weight = 3.0 if preset.startswith("marginal") else 0.0
        pair_weight = 2.0 if preset.startswith("pair") else 0.0
        config = mofkit.TrainConfig(dim=16, channels=8, latent=8, batch_size=4, lr=1e-3, ema=0.0,
                                    grid_channels=3 if pair_weight or clash else 1 + first, marginal_weight=weight,
                                    marginal_channels="density" if first else "all", pair_weight=pair_weight,
                                    pair_field=preset[5:] if pair_weight else "max",
                                    d_norm="joint" if preset == "joint" else "batch", clash_weight=clash,
                                    density_head="atoms" if clash else "channels",
                                    density_sigma_voxels=1.5 if clash else 0.0)
        field = lambda x: x[:, 1:].sum(1) if preset == "pair_sum" else x[:, 1:].max(1).values
        assert (config.loss, config.d_sigmoid) == ("hinge", False)
        loss_d_of = lambda r, f: torch.relu(1 - r).mean() + torch.relu(1 + f).mean()
        def loss_g_of(g, f):  # the voxels the G step drew: torch's RNG as it was right after z
            with torch.random.fork_rng():
                torch.set_rng_state(after_z)
                loss = -g.mean()
                if weight:
                    loss = loss + weight * mofkit.marginal_w2(f[:, first:], real[:, first:], mofkit.MARGINAL_VOXELS)
                if pair_weight:  # on the density channels' largest, or their sum
                    loss = loss + pair_weight * mofkit.pair_w2(field(f), field(real), mofkit.MARGINAL_VOXELS)
                if clash:
                    loss = loss + clash * brute_clash(presences[id(f)].detach())
                return loss
        if preset == "joint":
            scores = lambda D, real, fake: D(torch.cat([real, fake])).split(len(real))
    elif preset == "patch":
        config = mofkit.TrainConfig(dim=16, channels=8, latent=8, batch_size=4, lr=1e-3, ema=0.0, d_patch=True)
        hinge = lambda r, f: torch.relu(1 - r).mean() + torch.relu(1 + f).mean()
        loss_d_of = lambda r, f: hinge(r[:, 0], f[:, 0]) + hinge(r[:, 1:], f[:, 1:])
        loss_g_of = lambda g, f: -g[:, 0].mean() - g[:, 1:].mean()
    else:
        config = mofkit.TrainConfig.study(dim=16, channels=8, latent=8, batch_size=4, lr=1e-3)
        loss_d_of = lambda r, f: 0.5 * (((r - 1) ** 2).mean() + (f ** 2).mean())
        loss_g_of = lambda g, f: ((g - 1) ** 2).mean()
    mofkit._seed_all(0)
    run = mofkit._build_run(config, torch.device("cpu"))
    real = mofkit.to_gan_input(torch.stack(random_grids(4, channels=config.grid_channels)), 800.0, config.transform)
    G0, D0 = copy.deepcopy(run.G), copy.deepcopy(run.D)
    torch.manual_seed(5)
    loss_d, loss_g, d_real, d_fake = mofkit._gan_step(run, real, step=1).tolist()
    def draw(G):
        if not clash:
            return G(torch.randn(4, 8)).detach()
        grids, presence, _ = G(torch.randn(4, 8), with_presence=True)
        presences[id(grids)] = presence
        return grids
    torch.manual_seed(5)
    fake = draw(G0)
    after_z = torch.get_rng_state()
    out_real, out_fake = scores(D0, real, fake)
    if preset == "study":  # the study: D ends in a Sigmoid
        assert ((0 < out_real) & (out_real < 1)).all()
    expect_d = loss_d_of(out_real, out_fake)
    assert loss_d == pytest.approx(expect_d.item(), rel=1e-5)
    assert d_real == pytest.approx(out_real[..., 0].mean().item() if preset == "patch" else out_real.mean().item(),
                                   rel=1e-5)
    assert loss_d_of(*scores(run.D, real, fake)) < expect_d   # D moved towards its targets
    expect_g = loss_g_of(scores(run.D, real, fake)[1], fake)
    assert loss_g == pytest.approx(float(expect_g), rel=1e-4, abs=1e-6)
    torch.manual_seed(5)
    moved = draw(run.G)
    assert loss_g_of(scores(run.D, real, moved)[1], moved) < expect_g  # G moved towards its targets


@pytest.mark.parametrize("d_patch,d_norm", [(False, "batch"), (True, "batch"), (True, "none"), (False, "joint")])
def test_r1_step_gives_d_the_gradient_of_the_written_out_penalty(d_patch, d_norm):
    """A lazy-R1 step: D's gradient is that of hinge + 0.5 gamma r1_every E|grad_x s(x)|^2 on real grids, with s
    the score per grid (with patch scores: the global one plus the patches' mean)."""
    gamma, every = 0.7, 4
    config = mofkit.TrainConfig(dim=16, channels=8, latent=8, batch_size=4, ema=0.0, r1_gamma=gamma, r1_every=every,
                                d_patch=d_patch, d_norm=d_norm)
    mofkit._seed_all(0)
    run = mofkit._build_run(config, torch.device("cpu"))
    real = mofkit.to_gan_input(torch.stack(random_grids(4)), 800.0, config.transform)
    D0 = copy.deepcopy(run.D)
    torch.manual_seed(5)
    fake = run.G(torch.randn(4, 8)).detach()
    torch.manual_seed(5)
    mofkit._gan_step(run, real, step=2 * every)
    x = real.clone().requires_grad_(True)
    if d_norm == "joint":  # one batch through BatchNorm: real then generated
        both = D0(torch.cat([x, fake]))
        d_real, d_fake = both[:4], both[4:]
    else:
        d_real, d_fake = D0(x), D0(fake)
    score = d_real[:, 0] + d_real[:, 1:].mean(1) if d_patch else d_real
    grad_x, = torch.autograd.grad(score.sum(), x, create_graph=True)
    total = mofkit.discriminator_loss("hinge", d_real, d_fake) + 0.5 * gamma * every * grad_x.pow(2).sum((1, 2, 3, 4)).mean()
    expect = torch.autograd.grad(total, list(D0.parameters()))
    for (name, p), g in zip(run.D.named_parameters(), expect):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=name)


def test_ema_generator_is_the_moving_average_of_the_weights(tmp_path):
    config = tiny_config(ema=0.999)
    mofkit._seed_all(config.seed)
    G0, _ = mofkit._models(config)  # the initial weights train() starts from (same seed, same order)
    res = mofkit.train(config, random_grids(4), tmp_path, max_steps=1, progress=False)
    ckpt = mofkit.load_checkpoint(res.checkpoint)
    decay = 0.1  # the warm-up at step 0: min(0.999, (1 + 0) / (10 + 0))
    for name, w0 in G0.named_parameters():
        expected = decay * w0.detach() + (1 - decay) * ckpt["generator"][name]
        torch.testing.assert_close(ckpt["generator_ema"][name], expected)
    # sampling a checkpoint uses the average (BatchNorm statistics re-estimated), not the raw weights
    raw = mofkit.sample(res.generator, 2, e_scale_K=ckpt["e_scale_K"])
    assert not np.allclose(mofkit.sample(res.checkpoint, 2), raw)
    np.testing.assert_array_equal(mofkit.sample(res.checkpoint, 2, ema=False), raw)  # ema=False: the raw weights
    exported = mofkit.export_generator(res.checkpoint, tmp_path / "g.pt")
    with pytest.raises(ValueError, match="g.pt: a generator file holds only the EMA weights"):
        mofkit.sample(exported, 2, ema=False)
    assert mofkit.train(tiny_config(ema=0.0), random_grids(4), tmp_path / "b", max_steps=1,
                        progress=False).checkpoint.exists()
    assert mofkit.load_checkpoint(tmp_path / "b" / "last.pt")["generator_ema"] is None


def test_cube_symmetries_are_the_48_distinct_rotations_and_reflections():
    g = torch.rand(2, 5, 5, 5)
    images = [mofkit.cube_symmetry(g, i) for i in range(48)]
    assert torch.equal(images[0], g)
    assert len({x.numpy().tobytes() for x in images}) == 48          # all distinct
    keys = {x.numpy().tobytes() for x in images}
    for i in (5, 17, 40):                                            # closed under composition
        for j in (3, 29):
            assert mofkit.cube_symmetry(images[i], j).numpy().tobytes() in keys
    # a proper rotation: 90 degrees about the last axis (swap the first two axes, flip one)
    assert any(torch.equal(x, torch.rot90(g, 1, (1, 2))) for x in images)
    assert all(sorted(x.flatten().tolist()) == sorted(g.flatten().tolist()) for x in images)  # values kept
    with pytest.raises(ValueError, match="index=48"):
        mofkit.cube_symmetry(g, 48)


@pytest.mark.parametrize("d_patch", [False, True])
def test_augmented_training_resumes_exactly_and_r1_runs(tmp_path, d_patch):
    cfg = tiny_config(augment=True, r1_gamma=1.0, r1_every=2, transform="signed", d_patch=d_patch)
    straight = mofkit.train(cfg, random_grids(6), tmp_path / "a", max_steps=4, progress=False)
    mofkit.train(cfg, random_grids(6), tmp_path / "b", max_steps=2, progress=False)
    resumed = mofkit.train(cfg, random_grids(6), tmp_path / "b", max_steps=4, progress=False)
    for x, y in zip(straight.generator.state_dict().values(), resumed.generator.state_dict().values()):
        assert torch.equal(x, y)
    assert all(np.isfinite(h["loss_d"]) for h in straight.history)
    x = mofkit.sample(straight.checkpoint, 3)
    assert x.min() < 0 < x.max() and -800.0 <= x.min() and x.max() <= 800.0  # "signed": repulsion kept to +E_scale


def test_default_recipe_keeps_g_learning_where_the_study_recipe_saturates(tmp_path):
    """Same data, same steps: the study's Sigmoid D drives G's least-squares gradient towards zero (D's
    verdicts sit on the flat tail of the Sigmoid); the kit's raw-score D keeps it, and its samples vary
    about as much as the real grids do."""
    data = blob_grids(32)
    kw = dict(dim=16, channels=16, latent=16, e_scale_K=600.0, log_every=10, device="cpu", epochs=100)
    grads, spread = {}, {}
    real = mofkit.gan_round_trip(torch.stack(data).numpy(), 600.0)
    for name, config in [("kit", mofkit.TrainConfig(**kw)), ("study", mofkit.TrainConfig.study(**kw))]:
        res = mofkit.train(config, data, tmp_path / name, max_steps=250, progress=False)
        torch.manual_seed(1)
        fake = res.generator(torch.randn(16, 16)).detach().requires_grad_(True)
        grads[name] = torch.autograd.grad(mofkit.generator_loss(config.loss, res.discriminator(fake)),
                                          fake)[0].abs().mean().item()
        gen = mofkit.gan_round_trip(mofkit.sample(res.checkpoint, 32), 600.0)
        spread[name] = gen[:, 0].std(0).mean() / real[:, 0].std(0).mean()
    assert grads["kit"] > 3 * grads["study"], grads
    assert 0.3 < spread["kit"] < 3, spread


def test_evaluate_puts_both_sides_through_the_gan_round_trip():
    """A perfect generator's output -- real grids exactly as the GAN represents them (clipped to [-E_scale, 0] K) --
    scores ~50% against raw held-out grids: the protocol clips the real side too. Compared raw, the same sets
    are told apart every time (the first round's notebook printed that 100%)."""
    real = torch.stack(blob_grids(90, seed=3)).numpy()
    heldout, train, other = real[:30], real[30:60], real[60:]
    perfect = mofkit.gan_round_trip(other, 600.0)
    report = mofkit.evaluate(perfect, heldout, train, e_scale_K=600.0, n_boot=200)
    rows = report.one_nn.set_index(["set", "features"])
    for f in ("raw", "pooled"):
        assert 0.3 < rows.loc[("generated", f), "accuracy"] < 0.7, f
        assert abs(rows.loc[("generated", f), "accuracy"] - rows.loc[("real train (floor)", f), "accuracy"]) < 0.2
    assert mofkit.one_nn_accuracy(heldout, perfect) > 0.95  # raw real vs clipped: trivially separable
    assert report.memorisation["fraction_closer"] < 0.2
    assert str(report).startswith("1-NN accuracy") and "With n = 30" in str(report)


def test_sample_refuses_broken_generators_and_bad_counts(tmp_path):
    res = mofkit.train(tiny_config(ema=0.0), random_grids(4), tmp_path, max_steps=1, progress=False)
    with pytest.raises(ValueError, match="n=-1"):
        mofkit.sample(res.checkpoint, -1)
    ckpt = mofkit.load_checkpoint(res.checkpoint)
    ckpt["generator"]["project.weight"].fill_(float("nan"))
    torch.save(ckpt, tmp_path / "nan.pt")
    with pytest.raises(mofkit.CheckpointError, match="NaN"):
        mofkit.sample(tmp_path / "nan.pt", 2)
    ckpt = mofkit.load_checkpoint(res.checkpoint)
    ckpt["config"]["channels"] = 16  # weights of an 8-channel model under a 16-channel config
    torch.save(ckpt, tmp_path / "mismatch.pt")
    with pytest.raises(mofkit.CheckpointError, match="do not fit"):
        mofkit.sample(tmp_path / "mismatch.pt", 2)


def test_sample_from_checkpoint_in_kelvin(tmp_path):
    res = mofkit.train(tiny_config(grid_channels=2, ema=0.0), random_grids(4, channels=2), tmp_path, max_steps=1, progress=False)
    grids = mofkit.sample(tmp_path / "last.pt", 5, batch_size=2, seed=3)
    assert grids.shape == (5, 2, 16, 16, 16) and grids.dtype == np.float32
    assert grids[:, 0].max() <= 800.0 and grids[:, 0].min() >= -800.0  # K, "signed": within [-E_scale, E_scale]
    assert 0 <= grids[:, 1:].min() and grids[:, 1:].max() <= 1      # density channel untouched
    same = mofkit.sample(res.generator, 5, batch_size=5, seed=3, e_scale_K=800.0)
    np.testing.assert_allclose(grids, same, rtol=1e-5, atol=1e-3)  # batching changes only float rounding
    with pytest.raises(ValueError, match="e_scale_K"):
        mofkit.sample(res.generator, 1)


def test_main_train_on_shards_resumes_exactly(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(2):  # two real shard files of 5 tiny kelvin grids each, 2 channels
        grids = rng.uniform(-1000, 500, (5, 2, 16, 16, 16)).astype(np.float32)
        names = [f"m{k}{i}" for i in range(5)]
        meta = {"source": "synthetic", "params": {}, "members": names, "names": names, "failures": [],
                "properties": {"columns": [], "rows": [[] for _ in names]}}
        mofkit.write_shard(tmp_path / "shards" / f"shard_{k:05d}.npy", grids, meta)
    flags = [str(tmp_path / "shards"), "--channels", "8", "--latent", "8", "--e-scale-K", "800", "--device", "cpu",
             "--log-every", "1", "--batch-size", "2", "--no-progress"]
    straight = mofkit.main_train(flags + ["--out", str(tmp_path / "a"), "--max-steps", "7"])
    mofkit.main_train(flags + ["--out", str(tmp_path / "b"), "--max-steps", "3"])  # stops mid-epoch 0
    resumed = mofkit.main_train(flags + ["--out", str(tmp_path / "b"), "--max-steps", "7"])
    ckpt = mofkit.load_checkpoint(resumed.checkpoint)
    assert (ckpt["config"]["dim"], ckpt["config"]["grid_channels"], ckpt["step"], ckpt["epoch"]) == (16, 2, 7, 1)
    for x, y in zip(straight.generator.state_dict().values(), resumed.generator.state_dict().values()):
        assert torch.equal(x, y)


def test_train_ddp_two_cpu_processes_keep_identical_weights(tmp_path):
    import socket
    import subprocess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = DDP_CHILD.format(root=str(Path(mofkit.__file__).parent), out=str(tmp_path))
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    # "list": DistributedSampler splits 8 grids; "stream": rank 0 has 4 batches, rank 1 only 3 -> both stop at 3
    for run, steps in [("list", 2), ("stream", 3)]:
        p0, p1 = (torch.load(tmp_path / run / f"params{r}.pt", weights_only=True) for r in range(2))
        assert all(torch.equal(a, b) for a, b in zip(p0, p1)), run
        ckpt = mofkit.load_checkpoint(tmp_path / run / "last.pt")
        assert ckpt["step"] == steps and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    # each process drew its own latent vectors
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])

# =============================================================================
# 8. Scoring
# =============================================================================


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_nn_accuracy_equals_sklearn_leave_one_out(dtype):
    rng = np.random.default_rng(0)
    real = rng.normal(size=(23, 6, 6, 6)).astype(np.float32)
    generated = rng.normal(0.2, 1.1, size=(19, 6, 6, 6)).astype(np.float32)
    correct = sklearn_loo_1nn([real, generated])
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
    expected = sklearn_loo_1nn([pool(real), pool(generated)]).mean()
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


def test_plot_slices_montage_panels_and_png(tmp_path):
    grid = np.linspace(-800, 5000, 16 ** 3, dtype=np.float32).reshape(16, 16, 16)
    fig = mofkit.plot_slices(grid, path=tmp_path / "slices.png")
    assert len(image_axes(fig)) == 16 and len(fig.axes) == 16 + 1  # 4 x 4 panels + colour bar
    assert (tmp_path / "slices.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pair = mofkit.plot_slices([grid, grid[None]], titles=["real", "generated"], path=tmp_path / "pair.png")
    assert len(image_axes(pair)) == 32
    ct = mofkit.plot_slices(np.zeros((64, 4, 4), np.float32) - 100.0)  # the study's 64 slices -> 8 x 8
    assert len(image_axes(ct)) == 64 and len(ct.axes) == 64 + 1
    odd = mofkit.plot_slices(grid[:10], axis=0)  # 10 slices -> 4 x 3 panel, 2 blank
    assert len(image_axes(odd)) == 10 and len(odd.axes) == 12 + 1
    with pytest.raises(ValueError, match="grid"):
        mofkit.plot_slices(np.zeros((4, 4)))


def test_plot_slices_colour_scale_spans_the_data_with_white_at_zero():
    import matplotlib
    gan_space = -np.linspace(0, 900, 8 ** 3, dtype=np.float32).reshape(8, 8, 8)  # no positive energies
    image = image_axes(mofkit.plot_slices(gan_space, spacing_A=1.0))[0].images[0]
    assert image.norm.vmin == pytest.approx(-900) and image.norm.vmax == 0  # no empty red end of the bar
    white = matplotlib.colormaps["RdBu_r"](0.5)
    np.testing.assert_allclose(image.cmap(image.norm(0.0)), white, atol=0.02)  # 0 K stays white
    assert image.cmap(image.norm(-900.0))[2] > 0.3 > image.cmap(image.norm(-900.0))[0]  # deep wells: blue
    real = np.concatenate([gan_space[4:], np.full((4, 8, 8), 5000, np.float32)])
    image = image_axes(mofkit.plot_slices(real))[0].images[0]
    assert (image.norm.vmin, image.norm.vmax) == (pytest.approx(-900), 5000)
    np.testing.assert_allclose(image.cmap(image.norm(0.0)), white, atol=0.02)


def test_plot_slices_scale_bar_in_angstrom():
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar
    bars = lambda fig: [a for ax in fig.axes for a in ax.artists if isinstance(a, AnchoredSizeBar)]
    grid = np.zeros((4, 16, 16), np.float32)
    assert not bars(mofkit.plot_slices(grid))
    [bar] = bars(mofkit.plot_slices(grid, spacing_A=2.0))  # a 32 A panel: a 10 A bar, 5 voxels long
    assert bar.txt_label.get_text() == "10 Å" and bar.size_bar.get_children()[0].get_width() == 5
    assert len(bars(mofkit.plot_slices([grid] * 2, spacing_A=0.5))) == 2  # one per montage (8 A: a 2 A bar)


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
    props = {"log10_henry": rng.normal(size=9), "heat_kJ_mol": rng.normal(size=9), "lcd_A": rng.normal(size=9)}
    axes = mofkit.plot_property_histograms(props, props).axes  # titled panels, axes labelled with units
    assert [ax.get_title() for ax in axes] == ["Henry coefficient", "heat of adsorption at infinite dilution", "lcd"]
    assert "mol kg" in axes[0].get_xlabel() and "kJ/mol" in axes[1].get_xlabel() and axes[2].get_xlabel() == "lcd (Å)"
    assert all("probability density" in ax.get_ylabel() for ax in axes)


# =============================================================================
# 10. Inverse
# =============================================================================


def test_density_channels_frame_and_values():
    atoms = small_framework()
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
    atoms = small_framework()
    size, spacing = 24, 0.5
    decoded = mofkit.grid_to_atoms(mofkit.density_channels(atoms, size, spacing), spacing, method="density")
    scores = mofkit.round_trip_scores(decoded, atoms, size, spacing)
    assert scores["recall"] == 1.0 and scores["precision"] == 1.0
    assert scores["class_recall"] == 1.0 and scores["class_precision"] == 1.0
    from scipy.spatial.distance import cdist
    symbols, truth = mofkit._cube_images(atoms, size, spacing, 1e-9)
    d = cdist(decoded.positions, truth)
    assert np.all(d.min(0) < 0.1)  # every true atom in the cube, found within 0.1 A
    interior = np.all((decoded.positions > 0.5) & (decoded.positions < (size - 2) * spacing), axis=1)
    assert interior.sum() >= 10 and np.all(d[interior].min(1) < 0.1)  # (face peaks may be images just outside)
    nearest = d[interior].argmin(1)
    expected = [mofkit.class_symbol(mofkit.element_class(s)) for s in symbols[nearest]]
    assert list(np.array(decoded.get_chemical_symbols())[interior]) == expected
    # an energy channel in front (as stacked for training) is skipped
    stacked = np.concatenate([np.zeros((1, size, size, size), np.float32),
                              mofkit.density_channels(atoms, size, spacing)])
    assert len(mofkit.grid_to_atoms(stacked, spacing)) == len(decoded)


def test_peak_neighbours_merge_a_blob_with_two_diagonal_tops():
    """A blob whose top is split over two diagonal voxels (a generator's speckle) is two atoms 0.71 A apart by
    face neighbours and one by all 26; clean atoms decode the same either way."""
    atoms = small_framework()
    clean = mofkit.density_channels(atoms, 24, 0.5)
    by_face, by_all = (mofkit.grid_to_atoms(clean, 0.5, peak_neighbours=k) for k in (6, 26))
    assert np.array_equal(by_face.positions, by_all.positions)
    ijk = np.stack(np.meshgrid(*[np.arange(12)] * 3, indexing="ij"))
    r2 = ((ijk - np.array([6.5, 6.5, 6.0])[:, None, None, None]) ** 2).sum(0)
    speckled = np.zeros((len(mofkit.DENSITY_CLASSES), 12, 12, 12), np.float32)
    speckled[1] = 0.8 * np.exp(-r2 / 18.0)  # one smooth blob of carbon density ...
    speckled[1, 6, 6, 6] = speckled[1, 7, 7, 6] = 0.9  # ... with two tops on diagonal voxels
    two, one = (mofkit.grid_to_atoms(speckled, 0.5, peak_neighbours=k) for k in (6, 26))
    assert len(two) == 2 and mofkit.contact_count(two) == 1
    assert len(one) == 1 and one.positions[0] == pytest.approx([3.0, 3.0, 3.0], abs=0.05)
    with pytest.raises(ValueError, match="peak_neighbours"):
        mofkit.grid_to_atoms(clean, 0.5, peak_neighbours=18)


def test_round_trip_scores_count_misses_and_wrong_classes():
    from ase import Atoms
    from scipy.spatial.distance import cdist
    atoms = small_framework()
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
    # C and O cores (radius ~3.1-3.2 A at 4999 K) are neither H's nor Zn's (~2.7 A): C, N or O is chosen
    assert set(np.array(decoded.get_chemical_symbols())[interior]) <= {"C", "N", "O"}
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


def test_metal_channels_decode_to_their_element_and_placeholders_are_declared(tmp_path):
    import ase.io
    from ase import Atoms
    classes = mofkit.METAL_DENSITY_CLASSES
    assert classes[:4] == ("Zn", "Cu", "Cd", "Co") and classes[-1] == "other"
    # Cu and Co have channels; Fe does not (class "metal"), S neither (class "other")
    atoms = Atoms(["Cu", "Co", "Fe", "O", "S", "C"],
                  positions=[[2.1, 2.3, 2.2], [6.2, 2.4, 5.9], [2.2, 6.1, 6.3], [4.1, 4.2, 2.2], [6.1, 6.3, 2.4],
                             [4.2, 6.2, 4.1]], cell=[20.0] * 3, pbc=True)
    decoded = mofkit.grid_to_atoms(mofkit.density_channels(atoms, 18, 0.5, classes=classes), 0.5, classes=classes)
    assert len(decoded) == 6
    order = [int(np.linalg.norm(decoded.positions - p, axis=1).argmin()) for p in atoms.positions]
    stand_in_metal, stand_in_other = mofkit.class_symbol("metal", classes), mofkit.class_symbol("other", classes)
    assert (stand_in_metal, stand_in_other) == ("Mn", "P")  # commonest CoRE MOF metal / non-metal without a channel
    assert [decoded.get_chemical_symbols()[i] for i in order] == ["Cu", "Co", stand_in_metal, "O", stand_in_other, "C"]
    assert [decoded.arrays["density_class"][i] for i in order] == ["Cu", "Co", "metal", "O", "other", "C"]
    scores = mofkit.round_trip_scores(decoded, atoms, 18, 0.5, classes=classes)
    assert scores["metal_element_recall"] == pytest.approx(2 / 3) and scores["class_recall"] == 1.0
    # the files say which elements are stand-ins
    comment = mofkit.write_xyz(decoded, tmp_path / "d.xyz").read_text().splitlines()[1]
    assert "Mn stands for any metal" in comment and "P stands for any element" in comment
    back = ase.io.read(tmp_path / "d.xyz")
    assert list(back.arrays["density_class"]) == list(decoded.arrays["density_class"])
    cif = mofkit.write_cif(decoded, tmp_path / "d.cif").read_text()
    assert cif.startswith("# placeholder elements: Mn stands for any metal")
    assert ase.io.read(tmp_path / "d.cif").get_chemical_formula() == decoded.get_chemical_formula()
    # with every element named by a channel there is no note
    named = mofkit.grid_to_atoms(mofkit.density_channels(atoms[[0, 1, 3, 5]], 18, 0.5, classes=classes), 0.5,
                                 classes=classes)
    assert "placeholders" not in named.info
    assert "placeholder" not in mofkit.write_xyz(named, tmp_path / "n.xyz").read_text()
    # one metal channel: the metal is a stand-in Zn, declared
    one = mofkit.grid_to_atoms(mofkit.density_channels(atoms, 18, 0.5), 0.5)
    assert one.get_chemical_symbols().count("Zn") == 3 and "Zn stands for any metal" in one.info["placeholders"]


def test_atoms_on_a_cube_face_survive_float16_channels():
    from ase import Atoms
    # atoms on special positions sit exactly on the cube's faces (x = 0); shards store the channels as float16
    atoms = Atoms(["Cu", "O", "C"], positions=[[0.0, 0.0, 0.0], [0.0, 1.95, 0.0], [3.1, 0.0, 2.7]],
                  cell=[12.0] * 3, pbc=True)
    classes = mofkit.METAL_DENSITY_CLASSES
    channels = mofkit.density_channels(atoms, 16, 0.5, classes=classes).astype(np.float16).astype(np.float32)
    decoded = mofkit.grid_to_atoms(channels, 0.5, classes=classes)
    assert sorted(decoded.get_chemical_symbols()) == ["C", "Cu", "O"]
    np.testing.assert_allclose(decoded.positions[np.argsort(decoded.get_chemical_symbols())],
                               atoms.positions[[2, 0, 1]], atol=0.02)


def test_density_classes_are_checked():
    for bad in (("C", "N"), ("metal", "C", "C", "other"), ("Qq", "other"), ("X", "other")):
        with pytest.raises(ValueError, match="density classes"):
            mofkit.check_density_classes(bad)
    with pytest.raises(ValueError, match="density classes"):
        mofkit.GridParams(density_classes=("C", "N"))
    with pytest.raises(ValueError, match="frame"):
        mofkit.GridParams(frame="cell", density_classes=mofkit.DENSITY_CLASSES)


def test_shards_with_density_channels_round_trip(tmp_path):
    from ase import Atoms
    classes = mofkit.METAL_DENSITY_CLASSES
    params = mofkit.GridParams(size=16, spacing_A=0.5, cutoff_A=5.0, density_classes=list(classes))
    assert params.density_classes == classes and params_from_json(params) == params
    # energy-only parameters serialise (and hash) exactly as before density channels existed
    assert "density_classes" not in TINY.to_json() and params.hash != mofkit.GridParams(
        size=16, spacing_A=0.5, cutoff_A=5.0).hash
    folder = tmp_path / "cifs"
    folder.mkdir()
    (folder / "cu.cif").write_text(make_cif([("Cu", 0.1, 0.1, 0.1), ("O", 0.2, 0.1, 0.1), ("C", 0.1, 0.3, 0.2)],
                                            a=9.0))
    (folder / "zn.cif").write_text(make_cif([("Zn", 0.2, 0.2, 0.2), ("N", 0.4, 0.2, 0.2)], a=8.0))
    mofkit.build_shards(tmp_path / "out", folder, params=params, shard_size=2, progress=False)
    path = tmp_path / "out" / "shard_00000.npy"
    grids, meta = mofkit.open_shard(path)
    assert grids.shape == (2, 1 + len(classes), 16, 16, 16) and grids.dtype == np.float16
    assert meta["channels"] == ["energy_K"] + [f"density:{c}" for c in classes]
    atoms = mofkit.read_structure(folder / "cu.cif")
    np.testing.assert_allclose(grids[0, 0], mofkit.voxelize(atoms, 16, "cube", 0.5, cutoff_A=5.0),
                               rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(grids[0, 1:], mofkit.density_channels(atoms, 16, 0.5, classes=classes), atol=5e-4)
    data = mofkit.ShardDataset(tmp_path / "out", shuffle=False)
    assert data.params == params and data.params.channels == meta["channels"]
    x = next(iter(data))
    assert x.shape == (1 + len(classes), 16, 16, 16)
    gan = mofkit.to_gan_input(x, 800.0)
    assert torch.equal(gan[1:], x[1:]) and float(gan[0].max()) <= 1.0  # densities pass through the transform
    back = mofkit.from_gan_output(gan, 800.0)
    assert torch.equal(back[1:], x[1:])
    decoded = mofkit.grid_to_atoms(back, 0.5, classes=classes)  # energy + densities: the density route
    assert "Cu" in decoded.get_chemical_symbols() and "placeholders" not in decoded.info
    report = mofkit.structure_report(torch.stack([x, x]), spacing_A=0.5, classes=classes, e_scale_K=800.0)
    assert len(report) == 2 and report["n_atoms"].iloc[0] == len(decoded)
    # the GAN trains on them as they are, and its samples go through the same report
    mofkit.train(tiny_config(grid_channels=len(data.params.channels)), data, tmp_path / "run", max_steps=1, progress=False)
    generated = mofkit.sample(tmp_path / "run" / "last.pt", 2)
    assert generated.shape == (2, 1 + len(classes), 16, 16, 16)
    assert len(mofkit.structure_report(generated, spacing_A=0.5, classes=classes, e_scale_K=800.0)) == 2


def test_density_width_is_a_grid_parameter(tmp_path):
    """GridParams.density_sigma_A: shards are built with it, decode_kwargs hands it to the decoder, and at the
    voxel spacing (its default) the parameters and their hash are those from before it existed."""
    classes = mofkit.DENSITY_CLASSES
    base = dict(size=16, spacing_A=0.5, cutoff_A=5.0, density_classes=classes, cell_properties=False)
    plain, wide = mofkit.GridParams(**base), mofkit.GridParams(**base, density_sigma_A=0.75)
    assert plain.density_sigma_A == 0.5 and "density_sigma_A" not in plain.to_json()
    assert mofkit.GridParams(**base, density_sigma_A=0.5) == plain and wide.hash != plain.hash
    assert wide.to_dict()["density_sigma_A"] == 0.75 and params_from_json(wide) == wide
    assert "density_sigma_A" not in mofkit.GridParams(size=16, density_sigma_A=0.75).to_json()  # no channels
    assert wide.decode_kwargs() == {"spacing_A": 0.5, "classes": classes, "sigma_A": 0.75}
    for bad in (0, -1.0, math.nan):
        with pytest.raises(ValueError, match="density_sigma_A"):
            mofkit.GridParams(**base, density_sigma_A=bad)
    folder = tmp_path / "cifs"
    folder.mkdir()
    (folder / "s.cif").write_text(make_cif([("Cu", 0.1, 0.1, 0.1), ("O", 0.3, 0.1, 0.1), ("C", 0.1, 0.35, 0.2)],
                                           a=9.0))
    mofkit.build_shards(tmp_path / "out", folder, params=wide, shard_size=1, progress=False)
    data = mofkit.ShardDataset(tmp_path / "out")
    assert data.params == wide
    grid = next(iter(data)).numpy()
    atoms = mofkit.read_structure(folder / "s.cif")
    np.testing.assert_allclose(grid[1:], mofkit.density_channels(atoms, 16, 0.5, 0.75, classes), atol=5e-4)
    assert not np.allclose(grid[1:], mofkit.density_channels(atoms, 16, 0.5, 0.5, classes), atol=0.05)
    decoded = mofkit.grid_to_atoms(grid, **data.params.decode_kwargs())
    scores = mofkit.round_trip_scores(decoded, atoms, 16, 0.5, tol_A=0.1, classes=classes)
    assert scores["n_true"] >= 3 and scores["class_recall"] == 1.0 and scores["class_precision"] == 1.0
    assert mofkit.ShardDataset(tmp_path / "out", channels=[0]).params.to_dict() == mofkit.GridParams(
        **{**base, "density_classes": ()}).to_dict()


def test_training_shards_without_cell_properties_and_energy_only_views(tmp_path):
    """cell_properties=False skips the whole-cell grids (NaN in their columns, density kept); channels=[0] of
    multi-channel shards is an energy-only dataset, recorded as such with the weights; evaluate(channels=(0,))
    scores a multi-channel generator's energy alone."""
    classes = mofkit.METAL_DENSITY_CLASSES
    params = mofkit.GridParams(size=16, spacing_A=0.5, cutoff_A=5.0, density_classes=classes, cell_properties=False)
    full = dataclasses.replace(params, cell_properties=True)
    assert "cell_properties" not in full.to_json() and params.hash != full.hash
    assert params_from_json(params) == params
    folder = tmp_path / "cifs"
    folder.mkdir()
    for k in range(4):
        (folder / f"s{k}.cif").write_text(make_cif([("Cu", 0.1, 0.1, 0.1 + 0.1 * k), ("O", 0.3, 0.1, 0.1),
                                                    ("C", 0.1, 0.35, 0.2)], a=9.0 + k))
    mofkit.build_shards(tmp_path / "out", folder, params=params, shard_size=4, progress=False)
    table = mofkit.ShardDataset(tmp_path / "out").metadata()
    atoms = mofkit.read_structure(folder / "s0.cif")
    assert table["density_kg_m3"].iloc[0] == pytest.approx(mofkit.framework_density(atoms))
    assert table[["log10_KH_mol_kg_Pa", "Qst_kJ_mol", "void_fraction_He"]].isna().all().all()
    assert table["window_log10_KH_mol_kg_Pa"].notna().all()
    with pytest.raises(mofkit.ShardError, match="other structures or voxelizer parameters"):
        mofkit.build_shards(tmp_path / "out", folder, params=full, shard_size=4, progress=False)

    energy = mofkit.ShardDataset(tmp_path / "out", channels=[0])
    assert energy.params.density_classes == () and energy.params.channels == ["energy_K"]
    assert mofkit.ShardDataset(tmp_path / "out", channels=list(range(1 + len(classes)))).params == params
    with pytest.raises(ValueError, match="energy alone"):
        mofkit.ShardDataset(tmp_path / "out", channels=[0, 2]).params
    res = mofkit.train(tiny_config(grid_channels=1), energy, tmp_path / "energy", max_steps=1, progress=False)
    assert mofkit.load_checkpoint(res.checkpoint)["grid_params"] == energy.params.to_dict()

    data = mofkit.ShardDataset(tmp_path / "out", shuffle=False)
    res = mofkit.train(tiny_config(grid_channels=1 + len(classes)), data, tmp_path / "multi", max_steps=1, progress=False)
    real = torch.stack(list(data)).numpy()
    report = mofkit.evaluate(res.checkpoint, real, real, sampling_seeds=(0,), channels=(0,), n_boot=50)
    energy_only = mofkit.evaluate(mofkit.sample(res.checkpoint, 4, seed=1000)[:, :1], real[:, :1], real[:, :1],
                                  e_scale_K=report.e_scale_K, n_boot=50, baselines=False)
    rows = report.one_nn.set_index(["set", "features"])
    assert rows.loc[("generated (seed 0)", "raw"), "accuracy"] == \
        energy_only.one_nn.set_index(["set", "features"]).loc[("generated", "raw"), "accuracy"]


def test_structure_report_of_a_hand_built_cube():
    from ase import Atoms
    # a 20 A cube; neighbour figures use the atoms >= 3 A inside it (all but the N at the corner)
    atoms = Atoms(["C", "C", "O", "H", "Zn", "O", "N"],
                  positions=[[10, 10, 10], [11.4, 10, 10],      # C-C 1.40 A: bonded
                             [5, 5, 5], [5.5, 5, 5],            # O-H 0.50 A: an impossible contact, not a bond
                             [15, 15, 15], [15, 15, 17.0],      # Zn-O 2.00 A: bonded with radii x 1.2, not x 1.0
                             [1, 1, 1]],                        # N near the corner: counted, not inner
                  cell=[20.0] * 3, pbc=False)
    row = mofkit.structure_report(atoms).iloc[0]
    assert row["n_atoms"] == 7 and row["n_inner"] == 6
    assert row["atoms_per_nm3"] == pytest.approx(7 / 8.0)
    assert (row["frac_metal"], row["frac_C"], row["frac_O"], row["frac_H"], row["frac_N"], row["frac_other"]) == \
        pytest.approx((1 / 7, 2 / 7, 2 / 7, 1 / 7, 1 / 7, 0))
    # inner nearest-neighbour distances: 1.4, 1.4, 0.5, 0.5, 2.0, 2.0
    assert row["nn_median_A"] == pytest.approx(1.4)
    assert row["nn_p10_A"] == pytest.approx(np.percentile([0.5, 0.5, 1.4, 1.4, 2.0, 2.0], 10))
    assert row["bonded_fraction"] == pytest.approx(4 / 6)
    assert row["contact_fraction"] == pytest.approx(2 / 7)
    assert mofkit.structure_report(atoms, bond_mult=1.0).iloc[0]["bonded_fraction"] == pytest.approx(2 / 6)
    assert "energy_r" not in mofkit.structure_report(atoms).columns
    # every inner pair lies along a cube axis; the O-H pair tilted 4 degrees still does, 6 degrees not
    assert row["axis_fraction"] == 1
    for degrees, share in ((4, 1), (6, 4 / 6)):
        tilted = atoms.copy()
        tilted.positions[3] = [5 + 0.5 * math.cos(math.radians(degrees)), 5 + 0.5 * math.sin(math.radians(degrees)), 5]
        assert mofkit.structure_report(tilted).iloc[0]["axis_fraction"] == pytest.approx(share)
    spread = atoms.copy()
    spread.positions[5] = spread.positions[4] + 2 / math.sqrt(3)  # Zn-O 2.0 A along a body diagonal
    assert mofkit.structure_report(spread).iloc[0]["axis_fraction"] == pytest.approx(4 / 6)


def test_structure_report_energy_consistency_against_the_voxelizer():
    from ase import Atoms
    # a molecule-like cluster in a 40 A cell: the 16 A cube holds every atom and no image is within the cutoff,
    # so the recomputed energy (cutoff 5 A, no tail) must equal voxelize's grid with the same cutoff
    positions = [[7.2, 7.9, 8.1], [8.6, 7.8, 8.0], [9.3, 9.0, 8.2], [6.6, 9.1, 7.4], [8.0, 6.7, 9.2]]
    atoms = Atoms(["C", "C", "N", "O", "Zn"], positions=positions, cell=[40.0] * 3, pbc=True)
    energy = mofkit.voxelize(atoms, 32, "cube", 0.5, cutoff_A=5.0)
    cube = Atoms(atoms.get_chemical_symbols(), positions, cell=[16.0] * 3, pbc=False)
    row = mofkit.structure_report(cube, [energy], cutoff_A=5.0, grid_cutoff_A=5.0).iloc[0]
    assert row["energy_voxels"] == 12 ** 3  # 5.0 .. 10.5 A: 12 voxels per axis
    assert row["energy_r"] > 0.99999 and row["energy_mae_K"] < 0.01
    moved = cube.copy()
    moved.positions[0] += [0.8, 0, 0]
    worse = mofkit.structure_report(moved, [energy], cutoff_A=5.0, grid_cutoff_A=5.0).iloc[0]
    assert worse["energy_mae_K"] > 5.0
    # the uniform tail beyond the cutoff: its mean shift, -(4 pi / 3 V) sum B (1/rc^3 - 1/Rc^3) + the A term
    a, b = mofkit.pair_coefficients(cube.get_chemical_symbols())
    tail = 4 * np.pi / 16.0 ** 3 * (a.sum() / 9 * (5.0 ** -9 - 8.0 ** -9) - b.sum() / 3 * (5.0 ** -3 - 8.0 ** -3))
    shifted = mofkit.structure_report(cube, [energy + tail], cutoff_A=5.0, grid_cutoff_A=8.0).iloc[0]
    assert tail < -1 and shifted["energy_mae_K"] < 0.01 - tail * 1e-4
    clipped = mofkit.structure_report(cube, [energy], cutoff_A=5.0, grid_cutoff_A=5.0, e_scale_K=50.0).iloc[0]
    assert clipped["energy_mae_K"] <= row["energy_mae_K"] + 1e-9


def test_structure_targets_compare_generated_with_real():
    import pandas as pd
    real = pd.DataFrame({"atoms_per_nm3": [60.0, 64.0], "nn_median_A": [1.1, 1.1], "bonded_fraction": [1.0, 1.0],
                         "contact_fraction": [0.0, 0.0]})
    good = real * [1.1, 0.95, 0.95, 1] + [0, 0, 0, 0.005]
    bad = real * [0.5, 2.0, 0.5, 1] + [0, 0, 0, 0.1]
    assert mofkit.structure_targets(good, real)["met"].all()
    assert not mofkit.structure_targets(bad, real)["met"].any()
    real["crowded_fraction"], good["crowded_fraction"] = [0.0, 0.1], [0.5, 0.7]
    reported = mofkit.structure_targets(good, real).loc["crowded_fraction"]
    assert (reported.generated, reported.real, reported.met) == (0.6, 0.05, None)


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


def test_notebook_is_stored_without_outputs():
    nb = json.loads((REPO / "MOF_3DGAN.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code and all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    assert not any("/work/" in "".join(c["source"]) or "/root/" in "".join(c["source"]) for c in nb["cells"])


def test_notebook_runs_as_colab_would_twice(tmp_path, monkeypatch):
    """'Run all' on a fresh Colab VM, simulated: google.colab imported at kernel start, the notebook alone in a
    folder without mofkit.py, the repository fetched from MOFKIT_REPO (a local copy of this tree), quick mode;
    then 'Run all' again in the same folder, as after 'Restart session'. Drive stays unmounted (not asked for)
    and the printed 1-NN accuracy is the evaluation protocol's."""
    import re
    import shutil
    import nbformat
    for k, v in colab_stand_in(tmp_path / "colab").items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MOFKIT_REPO", str(local_repository(tmp_path / "origin")))
    content = tmp_path / "content"
    content.mkdir()
    shutil.copy(REPO / "MOF_3DGAN.ipynb", content)
    for attempt in ("fresh VM", "restarted session"):
        out = mofkit.run_notebook(content / "MOF_3DGAN.ipynb", content / "out", mode="quick")
        nb = nbformat.read(out, as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, (attempt, errors[0]["evalue"] if errors else "")
        assert notebook_outputs(nb, r"mofkit from (\S+);") == [str(content / "mofkit")], attempt
        assert not any("IProgress" in t or "\x1b[" in t for t in notebook_outputs(nb, r"[^\n]+")), attempt
        shown = [any("image/png" in o.get("data", {}) for o in c.outputs) for c in nb.cells if c.cell_type == "code"
                 and re.search(r"plt\.show\(\)|^mofkit\.plot_|display\(.*plot_|plot_evaluation", c.source, re.M)]
        assert shown and all(shown), (attempt, shown)  # every cell that draws keeps its picture in the copy
    assert not (tmp_path / "colab" / "mounts.txt").exists()  # Drive is never mounted unless USE_DRIVE
    out_dir = content / "out"
    for name in ["slices_real_vs_generated.png", "generated_0.xyz", "run_quick/history.csv", "evaluation.png",
                 "isotherm_fits.png", "loss_curves.png", "property_histograms.png", "atoms_real_vs_generated.png",
                 "generated_cluster_route.xyz"]:
        assert (out_dir / name).stat().st_size > 0, name
    import ase.io
    assert len(ase.io.read(out_dir / "FIQCEN_decoded.xyz")) > 100
    # generated atoms come from the multi-channel generator's density channels: each keeps its class
    generated_atoms = ase.io.read(out_dir / "generated_0.xyz")
    assert len(generated_atoms) > 0
    assert set(generated_atoms.arrays["density_class"]) <= set(mofkit.METAL_DENSITY_CLASSES)
    steps = mofkit.load_history(out_dir / "run_quick" / "history.csv")["step"]
    assert steps.is_unique and steps.max() == 20  # resumed, not restarted; the second run added nothing
    assert (out_dir / "run_quick" / "last.pt").stat().st_size < 20 * 2 ** 20  # quick keeps checkpoints small

    # the printed accuracy is mofkit.evaluate's on the notebook's own grids (the shipped model, held-out part)
    [printed] = notebook_outputs(nb, r"1-NN accuracy, 12 held-out vs 12 generated grids: ([\d.]+%) \(raw voxels")
    heldout, heldout_meta = mofkit.read_grids(out_dir / "grids_quick" / "heldout")
    train, train_meta = mofkit.read_grids(out_dir / "grids_quick" / "train", len(heldout), seed=0)
    split = mofkit.read_split(REPO / "benchmarks" / "split_cpu32.csv")
    assert set(heldout_meta.name) <= set(split["heldout"]) and set(train_meta.name) <= set(split["train"])
    report = mofkit.evaluate(mofkit.load_generator(REPO / "weights" / "generator_cpu32.pt"), heldout, train)
    assert printed == f"{report.accuracy:.1%}" and report.accuracy < 1.0


def test_notebook_setup_says_what_to_do_when_the_repository_cannot_be_fetched(tmp_path, monkeypatch):
    import nbformat
    from nbclient.exceptions import CellExecutionError
    nb = nbformat.read(REPO / "MOF_3DGAN.ipynb", as_version=4)
    nb.cells = [c for c in nb.cells if "#@title Setup" in c.source]
    nbformat.write(nb, tmp_path / "setup.ipynb")
    monkeypatch.setenv("MOFKIT_REPO", str(tmp_path / "no-such-repository"))
    with pytest.raises(CellExecutionError, match="could not fetch mofkit from .*no-such-repository"):
        mofkit.run_notebook(tmp_path / "setup.ipynb", tmp_path / "out", mode="quick")
    (tmp_path / "mofkit").mkdir()  # a folder left by an interrupted download is named, not silently reused
    with pytest.raises(CellExecutionError, match="holds no mofkit.py"):
        mofkit.run_notebook(tmp_path / "setup.ipynb", tmp_path / "out", mode="quick")


def test_notebook_cli_timeout_and_modes(monkeypatch):
    calls = []
    monkeypatch.setattr(mofkit, "run_notebook", lambda **kw: calls.append(kw) or "nb.ipynb")
    mofkit.main(["notebook", "--mode", "gpu", "--timeout", "120"])
    mofkit.main(["notebook", "--mode", "full"])
    assert [(c["mode"], c["timeout_s"]) for c in calls] == [("gpu", 120), ("full", None)]  # None: the mode's
    assert mofkit.NOTEBOOK_TIMEOUT_S == {"quick": 900, "gpu": 3600, "full": 0}  # full trains for hours: no limit


def test_notebook_modes_and_colab_form(tmp_path):
    """The configuration cell offers the modes as a Colab form; Drive is a checkbox, off by default."""
    nb = json.loads((REPO / "MOF_3DGAN.ipynb").read_text())
    config = next("".join(c["source"]) for c in nb["cells"] if "#@title Configuration" in "".join(c["source"]))
    assert 'MODE = "auto"  #@param ["auto", "quick", "gpu", "full"]' in config
    assert 'USE_DRIVE = False  #@param {type:"boolean"}' in config
    assert all(f'"{mode}": dict(' in config for mode in mofkit.NOTEBOOK_TIMEOUT_S)
    with pytest.raises(ValueError, match="mode='fast'"):
        mofkit.run_notebook(REPO / "MOF_3DGAN.ipynb", tmp_path, mode="fast")


def test_text_progress_bars_skip_nested_bars(capsys):
    """Headless notebooks get text bars; inner (leave=False) bars would save cursor-moving escapes."""
    for _ in mofkit._TextBar(range(3), desc="outer"):
        for _ in mofkit._TextBar(range(2), desc="inner", leave=False):
            pass
    err = capsys.readouterr().err
    assert "outer" in err and "inner" not in err and "\x1b[" not in err


def test_cli_voxelize_writes_grid_and_properties(tmp_path, capsys):
    mofkit.main(["voxelize", "ABAVIJ_clean", "--size", "8", "--spacing", "4", "--out", str(tmp_path)])
    grid = np.load(tmp_path / "ABAVIJ_clean.npy")
    assert grid.shape == (8, 8, 8) and grid.dtype == np.float32
    np.testing.assert_array_equal(grid, mofkit.voxelize(mofkit.load_coremof("ABAVIJ_clean"), 8, "cube", 4.0))
    out = capsys.readouterr().out
    assert "H2 at 77 K, whole cell: log10 K_H = " in out and "He void fraction" in out and "window" in out
    mofkit.main(["voxelize", "ABAVIJ_clean", "--size", "8", "--spacing", "4", "--out", str(tmp_path), "--probe",
                 "CH4", "--temperature", "250"])
    assert "CH4 at 250 K, whole cell" in capsys.readouterr().out
