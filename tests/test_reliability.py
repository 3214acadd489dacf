"""Regression tests for issue 16 (reliability): every bad input is built here, in the test, and must give a clear
error naming it, be skipped and recorded by batches, or be handled as documented. No network, CPU only, seconds."""
import gzip
import json
import os
import struct
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mofkit  # noqa: E402
from conftest import Reply, ranged  # noqa: E402
from helpers import TINY, random_grids, tiny_config  # noqa: E402

FAST = dict(timeout_s=0.5, retries=1, backoff_s=0.01, progress=False)


def cif(sites=(("Zn", 0.1, 0.1, 0.1), ("O", 0.3, 0.1, 0.1)), a=10.0, b=None, c=None, angles=(90, 90, 90),
        name="t", extra="", sg="'P 1'"):
    """A CIF text with (symbol, fx, fy, fz) sites; every value is written as given (strings too: 'nan', '?')."""
    rows = "\n".join(f"{s}{i} {s} {x} {y} {z}" for i, (s, x, y, z) in enumerate(sites))
    al, be, ga = angles
    return (f"data_{name}\n_cell_length_a {a}\n_cell_length_b {b or a}\n_cell_length_c {c or a}\n"
            f"_cell_angle_alpha {al}\n_cell_angle_beta {be}\n_cell_angle_gamma {ga}\n{extra}"
            f"_symmetry_space_group_name_H-M {sg}\nloop_\n_atom_site_label\n_atom_site_type_symbol\n"
            f"_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n{rows}\n")


FOUR = (("Zn", 0.1, 0.1, 0.1), ("O", 0.3, 0.2, 0.1), ("Co", 0.5, 0.5, 0.5), ("Co", 0.7, 0.5, 0.5))


# =============================================================================
# 2. Structures: one validation of cell and coordinates before any expensive step
# =============================================================================

BAD_CELLS = [
    (dict(angles=(120, 120, 120), a=30.0), "cannot form a 3D cell"),            # volume 4e-5 A^3: used to hang
    (dict(angles=(120, 120, 119.999), a=30.0), "cannot fit in a cell|overlap"),  # nearly flat: bounded, refused
    (dict(a="nan"), "cell a is 'nan', not a finite number"),                    # was LinAlgError: SVD did not converge
    (dict(a="?"), "cell a is '\\?', not a number"),
    (dict(a="inf"), "not a finite number"),
    (dict(a=-10.0), "cell length a = -10 A must be positive"),                 # was accepted with |a|
    (dict(angles=(200, 90, 90)), "cell angle alpha = 200 deg must lie strictly between 0 and 180"),  # was 160
    (dict(angles=(10, 10, 90)), "cannot form a 3D cell"),                       # was 'AssertionError: '
    (dict(angles=(0, 90, 90)), "strictly between 0 and 180"),
]


@pytest.mark.parametrize("kw, reason", BAD_CELLS)
def test_impossible_cells_are_refused_fast_with_the_reason(kw, reason):
    mofkit.read_structure(cif(FOUR), name="warm-up")  # imports and tables, outside the timing
    start = time.process_time()  # CPU time: a hang burns it; a busy shared machine does not inflate it
    with pytest.raises(mofkit.StructureError, match=f"^bad-cell: .*({reason})"):
        mofkit.read_structure(cif(FOUR, **kw), name="bad-cell")
    assert time.process_time() - start < 2.0


@pytest.mark.parametrize("value", ["nan", "inf", "?", "."])
def test_non_numeric_coordinates_are_named(value):
    import re
    text = cif((("Zn", 0.1, 0.1, 0.1), ("O", 0.3, value, 0.1)))
    with pytest.raises(mofkit.StructureError,
                       match=re.escape(f"coords: atom coordinates that are not finite numbers: ['{value}']")):
        mofkit.read_structure(text, name="coords")


def test_a_huge_skewed_cell_is_checked_in_bounded_time():
    # lengths 1e4 A at 120/120/119.9999 deg: legal, nearly flat; the overlap search runs on the reduced cell
    mofkit.read_structure(cif(FOUR), name="warm-up")
    start = time.process_time()
    atoms = mofkit.read_structure(cif(FOUR, a=1e4, angles=(120, 120, 119.9999)), name="skewed")
    assert len(atoms) == 4 and time.process_time() - start < 5.0
    # an atom within 0.5 A of its own periodic image is an overlap, whatever the cell looks like
    from ase import Atoms
    with pytest.raises(mofkit.StructureError, match="tiny: every atom overlaps its own periodic image"):
        mofkit.check_structure(Atoms("Zn", scaled_positions=[[0, 0, 0]], cell=[0.3, 20, 20], pbc=True), "tiny")


def test_garbage_cifs_say_why():
    for text, reason in [("this is not a CIF\nat all\n", "no 'data_' block header"),
                         ("data_x\n_cell_length_a 10\n garbage", "Unexpected CIF file entry"),
                         ("data_x\n_cell_length_a 10\n", "no cell and atom sites")]:
        with pytest.raises(mofkit.StructureError, match=f"junk: malformed CIF.*{reason}") as err:
            mofkit.read_structure(text, name="junk")
        assert "AssertionError: )" not in str(err.value)


def test_cif_consistency_checks_where_the_cif_declares_its_content():
    # a row missing one value: ase silently dropped that row and the next (2 Co atoms lost)
    text = cif(FOUR).replace("Co2 Co 0.5 0.5 0.5", "Co2 Co 0.5 0.5")
    with pytest.raises(mofkit.StructureError, match="rowgap: a loop row has missing or extra values"):
        mofkit.read_structure(text, name="rowgap")
    with pytest.raises(mofkit.StructureError, match="incomplete row"):  # the last row cut short
        mofkit.read_structure(cif(FOUR).replace("Co3 Co 0.7 0.5 0.5", "Co3 Co 0.7 0.5"), name="cut")
    # two data blocks: the second was silently dropped
    with pytest.raises(mofkit.StructureError, match="two: 2 data blocks with atoms \\(data_a, data_b\\)"):
        mofkit.read_structure(cif(FOUR, name="a") + cif(FOUR, name="b"), name="two")
    # a file truncated at a line end, caught where the CIF declares its formula (x Z, or up to a factor) ...
    formula = "_chemical_formula_sum 'Zn O Co2'\n_cell_formula_units_Z 1\n"
    assert len(mofkit.read_structure(cif(FOUR, extra=formula), name="whole")) == 4
    truncated = cif(FOUR, extra=formula).rsplit("Co3", 1)[0]
    with pytest.raises(mofkit.StructureError, match=r"disagree with the declared _chemical_formula_sum.*'Co': \(1, 2"):
        mofkit.read_structure(truncated, name="truncated")
    doubled = "_chemical_formula_sum 'Zn2 O2 Co4'\n"  # no Z: a whole multiple of the formula also passes
    assert len(mofkit.read_structure(cif(FOUR, extra=doubled.replace("Zn2 O2 Co4", "Zn O Co2")), name="x")) == 4
    with pytest.raises(mofkit.StructureError, match="disagree"):
        mofkit.read_structure(cif(FOUR, extra="_chemical_formula_sum 'Zn O Co3'\n"), name="x")
    # ... or its cell content (_atom_type_number_in_cell)
    types = "loop_\n_atom_type_symbol\n_atom_type_number_in_cell\nZn 1\nO 1\nCo 3\n"
    with pytest.raises(mofkit.StructureError, match="_atom_type_number_in_cell"):
        mofkit.read_structure(cif(FOUR) + types, name="x")
    assert len(mofkit.read_structure(cif(FOUR) + types.replace("Co 3", "Co 2"), name="x")) == 4
    # documented limit: with no declaration (all of CoRE MOF 2019), a file cut at a line end cannot be told
    assert len(mofkit.read_structure(cif(FOUR).rsplit("Co3", 1)[0], name="x")) == 3


def test_a_p1_label_over_more_symmetry_operations_reads_like_ase(tmp_path):
    import ase.io
    text = cif((("Cu", 0.1, 0.1, 0.1), ("O", 0.3, 0.2, 0.1))) + \
        "loop_\n_symmetry_equiv_pos_as_xyz\n'x, y, z'\n'-x, -y, -z'\n"
    (tmp_path / "p1ops.cif").write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = ase.io.read(tmp_path / "p1ops.cif")
    atoms = mofkit.read_structure(text, name="p1ops")
    assert len(atoms) == len(reference) == 4  # was 2
    np.testing.assert_allclose(sorted(atoms.get_scaled_positions()[:, 0]),
                               sorted(reference.get_scaled_positions()[:, 0]))


def test_a_path_string_starting_with_data_is_a_path_when_the_file_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("data_mof.cif").write_text(cif())
    assert mofkit.read_structure("data_mof.cif").info["name"] == "data_mof"
    with pytest.raises(mofkit.StructureError, match="is a folder"):
        mofkit.read_structure(str(tmp_path))


def test_batches_never_stop_on_one_bad_file_and_read_upper_case_names(tmp_path):
    folder = tmp_path / "cifs"
    folder.mkdir()
    (folder / "a_good.cif").write_text(cif())
    (folder / "b_nan_cell.cif").write_text(cif(a="nan"))
    (folder / "c_flat.cif").write_text(cif(FOUR, a=30.0, angles=(120, 120, 120)))
    (folder / "d_garbage.cif").write_text("\x00\x01 not a cif")
    (folder / "e_upper.CIF").write_text(cif())
    (folder / "e_upper.cif").write_text(cif())      # a second file with the same name
    (folder / "f_good.cif").write_text(cif())
    (folder / "notes.txt").write_text("not a structure")
    failures = []
    start = time.process_time()
    names = [n for n, _ in mofkit.iter_cifs(folder, failures)]
    assert time.process_time() - start < 10
    assert names == ["a_good", "e_upper", "f_good"]
    assert [f[0] for f in failures] == ["b_nan_cell", "c_flat", "d_garbage", "e_upper"]
    assert "not a finite number" in failures[0][1] and "second file named 'e_upper'" in failures[3][1]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no \\*.cif files"):
        list(mofkit.iter_cifs(tmp_path / "empty"))
    with pytest.raises(ValueError, match="nowhere: no such folder"):
        list(mofkit.iter_cifs(tmp_path / "nowhere"))
    # build_shards goes on past the same files and records why each failed
    rows = mofkit.build_shards(tmp_path / "out", folder, params=TINY, shard_size=10, progress=False)
    assert rows[0]["n_grids"] == 3 and rows[0]["n_members"] == 6
    reasons = (tmp_path / "out" / "failures.csv").read_text()
    assert "b_nan_cell" in reasons and "c_flat" in reasons and "d_garbage" in reasons


# =============================================================================
# 3/5. Grid settings, build options, device
# =============================================================================

@pytest.mark.parametrize("kw, message", [(dict(spacing_A=0.0), "spacing_A=0.0"), (dict(spacing_A=-0.5), "spacing_A"),
                                         (dict(size=0), "size=0"), (dict(size=-2), "size=-2"),
                                         (dict(cutoff_A=0), "cutoff_A"), (dict(spacing_A=float("nan")), "spacing_A")])
def test_voxelize_and_shard_params_refuse_empty_or_degenerate_grids(kw, message):
    atoms = mofkit.read_structure(cif(), name="x")
    with pytest.raises(ValueError, match=message):
        mofkit.voxelize(atoms, **{"size": 8, **kw})
    with pytest.raises(ValueError, match=message):
        mofkit.GridParams(**kw)


def test_build_shards_refuses_bad_limits_empty_folders_and_an_unusable_device(tmp_path):
    folder = tmp_path / "cifs"
    folder.mkdir()
    (folder / "a.cif").write_text(cif())
    for limit in (0, -1):
        with pytest.raises(ValueError, match=f"limit={limit}: must be a whole number >= 1"):
            mofkit.build_shards(tmp_path / "out", folder, params=TINY, limit=limit, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.cif files"):
        mofkit.build_shards(tmp_path / "out", tmp_path / "empty", params=TINY, progress=False)
    with pytest.raises(ValueError, match="not a torch device name"):
        mofkit.build_shards(tmp_path / "out", folder, params=TINY, device="gpu0", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            mofkit.build_shards(tmp_path / "out", folder, params=TINY, device="cuda", progress=False)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_a_shard_without_grids_is_never_finished_and_every_build_ends_with_a_count(tmp_path, capsys):
    folder = tmp_path / "cifs"
    folder.mkdir()
    for i in range(2):
        (folder / f"m{i}.cif").write_text("garbage\n")
    out = tmp_path / "out"
    rows = mofkit.build_shards(out, folder, params=TINY, shard_size=2)
    assert rows[0]["n_grids"] == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"1 shards, 0 grids, 2 failed structures in {out} (reasons: {out / 'failures.csv'})")
    for i in range(2):
        (folder / f"m{i}.cif").write_text(cif(a=8.0 + i))
    with pytest.warns(UserWarning, match="holds 0 of its 2 grids -- deleting it and building it again"):
        rows = mofkit.build_shards(out, folder, params=TINY, shard_size=2)
    assert rows[0]["n_grids"] == 2 and "1 shards, 2 grids, 0 failed structures" in capsys.readouterr().out
    assert not hasattr(mofkit, "_finished_shard") and hasattr(mofkit, "_reuse_shard_or_delete")


# =============================================================================
# 5. Self-verifying shards
# =============================================================================

def _shard(path, n=3, size=4, seed=0):
    grids = np.random.default_rng(seed).uniform(-900, 900, (n, 1, size, size, size))
    names = [f"s{i}" for i in range(n)]
    meta = {"source": "x", "params": {}, "members": names, "names": names, "failures": [],
            "properties": {"columns": ["p"], "rows": [[float(i)] for i in range(n)]}}
    mofkit.write_shard(path, grids, meta)
    return path


def _rewrite_footer(path, edit):
    """Rewrite a shard's footer through `edit(meta)` with a consistent length field (a careful forger)."""
    data = path.read_bytes()
    length = struct.unpack("<Q", data[-16:-8])[0]
    meta = json.loads(data[-16 - length:-16])
    edit(meta)
    footer = json.dumps(meta, separators=(",", ":")).encode()
    path.write_bytes(data[:-16 - length] + footer + struct.pack("<Q", len(footer)) + mofkit.SHARD_MAGIC)


@pytest.mark.parametrize("damage, message", [
    ("flip", "grid bytes do not match"), ("nan", "grid bytes do not match"), ("inf", "grid bytes do not match"),
    ("property", "footer .* does not match"), ("swap_names", "footer .* does not match"),
    ("copied_over", "written as 'shard_00001.npy'"),
])
def test_damaged_shards_are_refused_naming_the_file(tmp_path, damage, message):
    path = _shard(tmp_path / "shard_00000.npy")
    offset = mofkit.read_shard_meta(path)["data_offset"]
    data = bytearray(path.read_bytes())
    if damage in ("flip", "nan", "inf"):
        value = {"flip": None, "nan": np.float16(np.nan), "inf": np.float16(np.inf)}[damage]
        if value is None:
            data[offset + 10] ^= 0x01  # a finite value changed in its last bit
        else:
            data[offset + 8:offset + 10] = value.tobytes()
        path.write_bytes(bytes(data))
    elif damage == "property":
        _rewrite_footer(path, lambda m: m["properties"]["rows"][0].__setitem__(0, 99.0))
    elif damage == "swap_names":
        _rewrite_footer(path, lambda m: m.__setitem__("names", m["names"][::-1]))
    else:
        _shard(tmp_path / "shard_00001.npy", seed=1)
        os.replace(tmp_path / "shard_00001.npy", path)
    with pytest.raises(mofkit.ShardError, match=f"shard_00000.npy: .*{message}"):
        mofkit.verify_shard(path)
    with pytest.raises(mofkit.ShardError, match="shard_00000.npy"):
        list(mofkit.ShardDataset([path], shuffle=False))


def test_intact_shards_verify_once_per_process_and_old_format_still_reads(tmp_path, monkeypatch):
    path = _shard(tmp_path / "shard_00000.npy")
    mofkit.verify_shard(path)
    hashed = []
    real = mofkit.hashlib.sha256
    monkeypatch.setattr(mofkit.hashlib, "sha256", lambda *a: hashed.append(not a) or real(*a))
    assert len(list(mofkit.ShardDataset([path], shuffle=False))) == 3
    assert hashed and not any(hashed)  # footer digests only: the grid bytes were verified already (unchanged file)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # touched: checked again
    mofkit.verify_shard(path)
    assert hashed[-1]
    # mofkit-shard-1 (no checksums) is still read, with a warning that says how to upgrade
    old = tmp_path / "shard_00001.npy"
    grids = np.zeros((2, 1, 4, 4, 4), np.float16)
    footer = json.dumps({"format": "mofkit-shard-1", "members": ["a", "b"], "names": ["a", "b"], "failures": [],
                         "params": {}, "properties": {"columns": [], "rows": [[], []]}}).encode()
    with open(old, "wb") as f:
        np.lib.format.write_array(f, grids)
        f.write(footer + struct.pack("<Q", len(footer)) + mofkit.SHARD_MAGIC)
    with pytest.warns(UserWarning, match="shard_00001.npy: a mofkit-shard-1 shard without checksums"):
        assert mofkit.verify_shard(old)["names"] == ["a", "b"]


# =============================================================================
# 5. ensure_shards
# =============================================================================

def _manifest(tmp_path, url=""):
    folder = tmp_path / "cifs"
    folder.mkdir()
    for i in range(2):
        (folder / f"m{i}.cif").write_text(cif(a=8.0 + i))
    rows = mofkit.build_shards(tmp_path / "pub", folder, params=TINY, shard_size=2, progress=False)
    for r in rows:
        r["url"], r["sha256"] = url, ""   # as the shipped manifest: no published checksum
    manifest = tmp_path / "data_manifest.csv"
    mofkit.write_manifest(manifest, rows)
    return manifest, folder, (tmp_path / "pub" / rows[0]["file"]).read_bytes()


def test_ensure_shards_never_replaces_a_corrupt_shard_by_an_empty_one(tmp_path):
    manifest, folder, good = _manifest(tmp_path)
    dest = tmp_path / "dest"
    dest.mkdir()
    bad = bytearray(good)
    bad[200] ^= 1
    (dest / "shard_00000.npy").write_bytes(bytes(bad))
    for p in folder.iterdir():
        p.unlink()
    folder.rmdir()  # the source is gone
    cannot = "shard_00000.npy is not in .* cannot be built: .*cifs: no such folder"
    with pytest.warns(UserWarning, match="does not match its manifest row"), pytest.raises(mofkit.ShardError,
                                                                                              match=cannot):
        mofkit.ensure_shards(manifest, dest, progress=False)
    assert not (dest / "shard_00000.npy").exists()


@pytest.mark.parametrize("route,reply,warning", [
    ("/shard_00000.npy", Reply(200, b"<html><body>Quota exceeded</body></html>", {"Content-Type": "text/html"}),
     "download failed: .*no .npy header.* Building it locally"),   # HTML instead of a shard
    ("/loop", Reply(302, headers={"Location": "/loop"}), "redirects in a loop"),
])
def test_ensure_shards_bad_download_falls_back_to_a_local_build(tmp_path, http_server, route, reply, warning):
    http_server.route(route, reply)
    manifest, _, _ = _manifest(tmp_path, url=f"{http_server.url}{route}")
    with pytest.warns(UserWarning, match=warning):
        (path,) = mofkit.ensure_shards(manifest, tmp_path / "dest", progress=False)
    assert mofkit.verify_shard(path)["names"] == ["m0", "m1"]


def test_download_bad_urls_and_destinations_are_clear_errors(tmp_path, http_server):
    http_server.route("/loop", Reply(302, headers={"Location": "/loop"}))
    with pytest.raises(mofkit.DownloadError, match="redirects in a loop"):
        mofkit.download(f"{http_server.url}/loop", tmp_path / "f", **FAST)
    with pytest.raises(mofkit.DownloadError, match="no host name"):
        mofkit.download("http://", tmp_path / "f", **FAST)
    with pytest.raises(mofkit.DownloadError, match="is a folder"):
        mofkit.download(f"{http_server.url}/x", tmp_path, **FAST)
    assert sorted(os.listdir(tmp_path)) == []


def test_download_accepts_a_complete_gzip_encoded_body_and_catches_a_cut_one(tmp_path, http_server):
    payload = np.random.default_rng(1).bytes(50_000) + bytes(100_000)
    body = gzip.compress(payload)
    http_server.route("/z.bin", Reply(200, body, {"Content-Encoding": "gzip"}))
    assert mofkit.download(f"{http_server.url}/z.bin", tmp_path / "z.bin", **FAST).read_bytes() == payload
    http_server.route("/cut.bin", Reply(200, body[:-1000], {"Content-Encoding": "gzip"}, content_length=len(body)))
    with pytest.raises(mofkit.DownloadError, match="truncated body"):
        mofkit.download(f"{http_server.url}/cut.bin", tmp_path / "cut.bin", **FAST)
    assert not (tmp_path / "cut.bin").exists()


def test_orphaned_temp_files_and_download_folders_are_removed(tmp_path, http_server):
    target = tmp_path / "last.pt"
    dead = 2 ** 22 + 12345  # above Linux's default pid_max: no such process
    orphan = tmp_path / f".last.pt.{dead}.abc123.tmp"
    live = tmp_path / f".last.pt.{os.getppid()}.def456.tmp"   # a running writer: kept
    fresh = tmp_path / f".last.pt.{dead}.ghi789.tmp"         # touched a moment ago: kept (another machine?)
    part = tmp_path / f".f.bin.{dead}.xyz.part"
    for p in (orphan, live, fresh):
        p.write_bytes(b"x" * 100)
    part.mkdir()
    (part / "f.bin").write_bytes(b"partial")
    old = time.time() - 3600
    for p in (orphan, live, part):
        os.utime(p, (old, old))
    with mofkit.atomic_write(target) as f:
        f.write(b"new")
    assert not orphan.exists() and live.exists() and fresh.exists()
    http_server.route("/f.bin", ranged(b"whole file"))
    mofkit.download(f"{http_server.url}/f.bin", tmp_path / "f.bin", **FAST)
    assert not part.exists()


# =============================================================================
# 1. JSON APIs
# =============================================================================

def test_fetch_mofxdb_is_bounded_by_default_and_names_a_wrong_page(tmp_path, http_server):
    def endless(request):  # a server that keeps raising the page count
        page = int(request.query.get("page", 1))
        return {"results": [], "page": page, "pages": page + 1}
    http_server.route("/mofs.json", endless)
    with pytest.warns(UserWarning, match="fetched 20 of 21 pages"):
        mofkit.fetch_mofxdb(database="x", base_url=http_server.url, cache_dir=None, progress=False, retries=0)
    assert http_server.hits("/mofs.json") == 20
    with pytest.raises(ValueError, match="max_pages=0"):
        mofkit.fetch_mofxdb(database="x", base_url=http_server.url, max_pages=0)
    http_server.route("/mofs.json", {"error": "rate limited"})
    with pytest.raises(mofkit.DownloadError, match="mofs.json.*no 'results' list"):
        mofkit.fetch_mofxdb(database="x", base_url=http_server.url, cache_dir=tmp_path, progress=False, retries=0)
    assert list(tmp_path.iterdir()) == []


def test_fetch_isodb_never_caches_an_error_document(tmp_path, http_server):
    record = {"filename": "f1", "DOI": "d", "adsorbent": {"name": "X"}, "adsorbates": [{"name": "Hydrogen"}],
              "pressureUnits": "bar", "adsorptionUnits": "mmol/g", "temperature": 77,
              "isotherm_data": [{"pressure": 1.0, "total_adsorption": 2.0}]}
    http_server.route("/isodb/api/isotherm/f1.json", {"detail": "Not found."}, record)
    kw = dict(base_url=http_server.url, cache_dir=tmp_path, progress=False, retries=0)
    with pytest.raises(mofkit.DownloadError, match="f1.json: not the document expected .*nothing was cached"):
        mofkit.fetch_isodb(filenames=["f1"], **kw)
    assert list(tmp_path.iterdir()) == []
    assert len(mofkit.fetch_isodb(filenames=["f1"], **kw)) == 1  # the real answer, later, is used and cached
    assert len(list(tmp_path.iterdir())) == 1


def test_isodb_table_skips_and_records_malformed_records():
    good = {"filename": "f1", "DOI": "d", "adsorbent": {"name": "X"}, "adsorbates": [{"name": "Hydrogen"}],
            "pressureUnits": "bar", "adsorptionUnits": "mmol/g", "temperature": 77,
            "isotherm_data": [{"pressure": 1.0, "total_adsorption": 2.0}]}
    failures = []
    with pytest.warns(UserWarning, match="skipped 3 malformed ISODB isotherm record"):
        table = mofkit.isodb_table([good, {**good, "filename": "f2", "temperature": "warm"},
                                    {**good, "filename": "f3", "isotherm_data": None}, "not a record"], failures)
    assert table.filename.tolist() == ["f1"] and [f[0] for f in failures] == ["f2", "f3", "record 3"]


# =============================================================================
# 4. Isotherm fits: slightly negative points, degenerate fits
# =============================================================================

def test_linear_fits_keep_slightly_negative_uptakes_and_log_fits_drop_them_by_name():
    P = np.array([0.01, 0.1, 0.3, 0.6, 1.0, 2.0])
    q = 3.0 * 2.0 * P / (1 + 2.0 * P)
    q[0] = -1.8e-5  # digitisation noise at P ~ 0, as in 12 real ISODB isotherms
    for fitter in (mofkit.fit_langmuir, mofkit.fit_sips, mofkit.fit_freundlich):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # nothing dropped, nothing to warn about
            assert fitter(P, q).n_points == 6
    with pytest.warns(UserWarning, match=r"dropped 1 negative-adsorption point\(s\) at index \[0\] "
                                         r"\(adsorption \[-1.8e-05\]\)"):
        assert mofkit.fit_langmuir(P, q, log_space=True).n_points == 5
    with pytest.warns(UserWarning, match=r"dropped 1 negative-pressure point\(s\) at index \[1\]"):
        assert mofkit.fit_freundlich([0.1, -0.001, 0.3, 0.6, 1.0], [1, 0.01, 2, 3, 4]).n_points == 4
    table = mofkit.fit_isotherm_table(__import__("pandas").DataFrame(
        {"pressure": [list(P)], "adsorption": [list(q)]}), "langmuir", progress=False, log_space=True)
    assert table.fit_error[0] == "" and "negative-adsorption" in table.fit_warning[0]


def test_degenerate_sips_fits_are_flagged():
    P = np.geomspace(0.01, 1.0, 8)
    q = 2.0 * P ** 0.6   # a pure power law: Sips' g_inf and K are not separately determined
    with pytest.warns(UserWarning, match="degenerate sips fit.*g_inf"):
        fit = mofkit.fit_sips(P, q)
    assert "g_inf" in fit.degenerate
    langmuir = 3.0 * 2.0 * P / (1 + 2.0 * P)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert mofkit.fit_sips(P, langmuir * (1 + 0.01 * np.sin(7 * P))).degenerate == ""
    table = mofkit.fit_isotherm_table(__import__("pandas").DataFrame({"pressure": [list(P)], "adsorption": [list(q)]}),
                                      "sips", progress=False)
    assert "g_inf" in table.degenerate[0] and table.fit_error[0] == ""


# =============================================================================
# 7. Training: resume with a changed config, TrainingDiverged, e_scale_K
# =============================================================================

@pytest.mark.parametrize("change", [dict(loss="lsgan"), dict(transform="wells"), dict(batch_size=4),
                                    dict(lr=1e-4), dict(seed=1),
                                   dict(betas=(0.9, 0.999)), dict(precision="bf16")])
def test_resume_with_a_changed_config_is_refused_unless_allowed_and_then_recorded(tmp_path, change):
    mofkit.train(tiny_config(), random_grids(4), tmp_path, max_steps=1, progress=False)
    good = (tmp_path / "last.pt").read_bytes()
    (name, value), = change.items()
    with pytest.raises(mofkit.CheckpointError, match=f"differs from the checkpoint's \\({name}: .*allow_config_change"):
        mofkit.train(tiny_config(**change), random_grids(4), tmp_path, max_steps=2, progress=False)
    assert (tmp_path / "last.pt").read_bytes() == good
    with pytest.warns(UserWarning, match=f"continuing at step 1 with a changed config \\({name}"):
        mofkit.train(tiny_config(**change), random_grids(4), tmp_path, max_steps=2, progress=False, allow_config_change=True)
    ckpt = mofkit.load_checkpoint(tmp_path / "last.pt")
    assert ckpt["step"] == 2 and [c["step"] for c in ckpt["config_changes"]] == [1]
    assert list(ckpt["config_changes"][0]["changes"]) == [name]


def test_resume_allows_run_length_and_logging_changes_and_compares_unknown_fields_generically(tmp_path):
    mofkit.train(tiny_config(), random_grids(4), tmp_path, max_steps=1, progress=False)
    mofkit.train(tiny_config(epochs=3, log_every=2, checkpoint_every_steps=5, checkpoint_every_min=1.0, num_workers=0),
                 random_grids(4), tmp_path, max_steps=2, progress=False)
    ckpt = mofkit.load_checkpoint(tmp_path / "last.pt")
    assert ckpt["step"] == 2 and ckpt["config_changes"] == []
    # a field the checkpoint predates counts as _config_from_checkpoint reads it (legacy value, else default);
    # one it has that differs is a change
    saved = {**ckpt["config"]}
    assert mofkit._config_changes(saved, tiny_config()) == {}
    legacy = mofkit._config_from_checkpoint({"config": {}})
    for name in ("seed", "transform"):
        predates = {k: v for k, v in saved.items() if k != name}
        assert mofkit._config_changes(predates, tiny_config(**{name: getattr(legacy, name)})) == {}
    assert mofkit._config_changes({**saved, "lr": 1.0}, tiny_config()) == {"lr": [1.0, tiny_config().lr]}
    assert mofkit._config_changes({**saved, "future_field": 3}, tiny_config()) == {}  # unknown to this version


def test_training_diverged_says_truly_which_checkpoint_is_kept(tmp_path):
    with pytest.raises(mofkit.TrainingDiverged, match="non-finite loss at step 1 .*no checkpoint exists for this run"):
        mofkit.train(tiny_config(), random_grids(4, fill=float("nan")), tmp_path / "a", max_steps=3, progress=False)
    assert not (tmp_path / "a" / "last.pt").exists()
    mofkit.train(tiny_config(checkpoint_every_steps=1), random_grids(4), tmp_path / "b", max_steps=2, progress=False)
    with pytest.raises(mofkit.TrainingDiverged, match=r"at step 3 .*last good checkpoint .*last.pt \(step 2\) is kept; "
                                                      r"this call saved none"):
        mofkit.train(tiny_config(checkpoint_every_steps=1), random_grids(4, fill=float("nan")), tmp_path / "b", max_steps=4,
                     progress=False)


def test_a_checkpoint_with_nan_e_scale_names_its_file(tmp_path):
    mofkit.train(tiny_config(), random_grids(4), tmp_path, max_steps=1, progress=False)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    ckpt["e_scale_K"] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    with pytest.raises(mofkit.CheckpointError, match=r"nan\.pt: e_scale_K=nan is not a positive finite energy"):
        mofkit.sample(tmp_path / "nan.pt", 1)


# =============================================================================
# 11. Command line: one line per error, batches go on
# =============================================================================

def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    for argv, message in [(["voxelize", "a.cif", "--spacing", "0"], "spacing_A=0.0"),
                          (["shards", str(tmp_path / "o"), "--source", str(tmp_path), "--limit", "-1"], "limit=-1"),
                          (["sample", "x.pt", "--n", "-2"], "--n -2"),
                          (["sample", str(tmp_path / "missing.pt")], "missing.pt: not a readable")]:
        with pytest.raises(SystemExit) as exit_:
            mofkit.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 1 and err.count("\n") == 1 and err.startswith("mofkit: error: ") and message in err
        assert "Traceback" not in err
    with pytest.raises(ValueError, match="spacing_A"):
        mofkit.main(["voxelize", "a.cif", "--spacing", "0", "--debug"])


def test_cli_voxelize_processes_the_good_files_and_records_the_bad_one(tmp_path, capsys):
    for name, text in [("a", cif(a=8.0)), ("garbage", "junk\n"), ("b", cif(a=9.0))]:
        (tmp_path / f"{name}.cif").write_text(text)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        mofkit.main(["voxelize", str(tmp_path / "a.cif"), str(tmp_path / "garbage.cif"), str(tmp_path / "b.cif"),
                     "--size", "8", "--spacing", "1", "--device", "cpu", "--out", str(out)])
    captured = capsys.readouterr()
    assert exit_.value.code == 1 and sorted(p.name for p in out.glob("*.npy")) == ["a.npy", "b.npy"]
    assert "1 of 3 structures failed" in captured.err and captured.err.count("\n") == 1
    assert "garbage" in (out / "failures.csv").read_text()
