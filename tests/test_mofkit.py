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



# =============================================================================
# 3. Voxelizer
# =============================================================================



# =============================================================================
# 4. Isotherms
# =============================================================================



# =============================================================================
# 5. Shards
# =============================================================================

def _synthetic_shards(folder, counts, channels=1, size=4):
    """Shards whose grids are filled with their global id (exact in float16), named s<id>."""
    paths, start = [], 0
    for k, n in enumerate(counts):
        ids = np.arange(start, start + n)
        grids = np.broadcast_to(ids[:, None, None, None, None], (n, channels, size, size, size)).copy()
        grids[:, 1:] *= -1  # further channels differ from channel 0
        names = [f"s{i}" for i in ids]
        meta = {"source": "synthetic", "params": {}, "members": names, "names": names, "failures": [],
                "properties": {"columns": ["id"], "rows": [[int(i)] for i in ids]}}
        paths.append(folder / f"shard_{k:05d}.npy")
        mofkit.write_shard(paths[-1], grids, meta)
        start += n
    return paths


def _ids(dataset):
    return [int(x[0, 0, 0, 0]) for x in dataset]


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
    assert path.stat().st_size - grids.size * 2 < 400  # header + footer only
    mapped, _ = mofkit.open_shard(path)
    assert isinstance(mapped, np.memmap)
    assert np.array_equal(mapped[1], plain[1])
    with pytest.raises(ValueError, match="finite"):
        mofkit.write_shard(tmp_path / "big.npy", np.full((1, 1, 2, 2, 2), 70000.0), meta)
    assert not (tmp_path / "big.npy").exists()


@pytest.mark.parametrize("cut", ["footer", "data", "header", "empty"])
def test_truncated_shard_gives_error_naming_file(tmp_path, cut):
    path = _synthetic_shards(tmp_path, [3])[0]
    data = path.read_bytes()
    keep = {"footer": len(data) - 5, "data": 300, "header": 20, "empty": 0}[cut]
    path.write_bytes(data[:keep])
    with pytest.raises(mofkit.ShardError, match=r"shard_00000\.npy.*(truncated|header).*delete it"):
        mofkit.read_shard_meta(path)
    with pytest.raises(mofkit.ShardError, match="shard_00000"):
        mofkit.ShardDataset([path])


def test_shard_dataset_yields_every_grid_once_per_epoch_in_seeded_order(tmp_path):
    paths = _synthetic_shards(tmp_path, [5, 3, 4, 6])
    data = mofkit.ShardDataset(paths, seed=1)
    assert data.num_grids == len(data) == 18
    x = next(iter(data))
    assert x.dtype == torch.float32 and x.shape == (1, 4, 4, 4)
    epoch0 = _ids(data)
    data.set_epoch(1)
    epoch1 = _ids(data)
    assert sorted(epoch0) == sorted(epoch1) == list(range(18))
    assert epoch0 != epoch1
    assert _ids(mofkit.ShardDataset(paths, seed=1)) == epoch0  # same seed, same order
    assert _ids(mofkit.ShardDataset(paths, seed=2)) != epoch0
    assert _ids(mofkit.ShardDataset(tmp_path, shuffle=False)) == list(range(18))  # a folder works too
    # in-shard shuffling, not only shard order: some shard's ids come out of order
    assert any(np.diff([i for i in epoch0 if lo <= i < hi]).min() < 0 for lo, hi in [(0, 5), (8, 12), (12, 18)])


def test_shard_dataset_ranks_get_disjoint_shards_and_equal_counts(tmp_path):
    paths = _synthetic_shards(tmp_path, [4, 4, 4, 4])
    ranks = [mofkit.ShardDataset(paths, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = [_ids(d) for d in ranks]
    assert len(seen[0]) == len(seen[1]) == len(ranks[0]) == 8
    assert sorted(seen[0] + seen[1]) == list(range(16))
    assert {i // 4 for i in seen[0]}.isdisjoint({i // 4 for i in seen[1]})  # whole shards per rank
    uneven = _synthetic_shards(tmp_path / "uneven", [5, 2, 4])  # DDP needs equal step counts
    ranks = [_ids(mofkit.ShardDataset(uneven, seed=0, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) and not set(ranks[0]) & set(ranks[1])
    with pytest.raises(ValueError, match="3 shards cannot feed 4 ranks"):
        list(mofkit.ShardDataset(uneven, world_size=4, rank=0))


def test_shard_dataset_workers_split_batches_and_keep_the_order(tmp_path):
    paths = _synthetic_shards(tmp_path, [5, 3, 4, 6])
    data = mofkit.ShardDataset(paths, seed=4, batch_size=3)
    data.set_epoch(2)
    single = _ids(data)
    loader = torch.utils.data.DataLoader(data, batch_size=3, num_workers=2)
    batches = [b[:, 0, 0, 0, 0].int().tolist() for b in loader]
    assert sum(batches, []) == single  # same order as num_workers=0: exact resume does not depend on workers
    # each worker's grids are disjoint: a worker sees every other batch
    assert len(batches) == 6 and all(len(b) == 3 for b in batches)
    data.set_epoch(2, start=7)
    assert sum((b[:, 0, 0, 0, 0].int().tolist() for b in loader), []) == single[7:]


def test_shard_dataset_start_skips_exactly_without_reading(tmp_path, monkeypatch):
    paths = _synthetic_shards(tmp_path, [5, 3, 4, 6])
    data = mofkit.ShardDataset(paths, seed=5)
    data.set_epoch(3)
    full = _ids(data)
    opened = []
    real_open = mofkit.open_shard
    monkeypatch.setattr(mofkit, "open_shard", lambda p: opened.append(Path(p).name) or real_open(p))
    for k in [0, 1, 5, 9, 17, 18, 30]:
        data.set_epoch(3, start=k)
        assert _ids(data) == full[k:] and len(data) == len(full[k:])
    opened.clear()
    data.set_epoch(3, start=17)
    assert _ids(data) == full[17:] and len(opened) == 1  # skipped shards are never opened
    data.set_epoch(4)
    assert len(data) == 18  # start applies to one epoch only


def test_shard_dataset_maps_at_most_two_shards_and_collects_only_between_shards(tmp_path, monkeypatch):
    import weakref
    paths = _synthetic_shards(tmp_path, [3, 2, 4, 1])
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
    paths = _synthetic_shards(tmp_path, [3, 2], channels=2)
    data = mofkit.ShardDataset(paths, channels=[1], transform=lambda x: x * 2, with_index=True, seed=7)
    meta = data.metadata()
    assert list(meta.columns) == ["shard", "index", "name", "id"] and len(meta) == 5
    for x, i in data:
        assert x.shape == (1, 4, 4, 4)
        assert float(x[0, 0, 0, 0]) == -2 * meta["id"][i] and meta["name"][i] == f"s{meta['id'][i]}"



# =============================================================================
# 6. Models
# =============================================================================



# =============================================================================
# 7. Training
# =============================================================================



# =============================================================================
# 8. Scoring
# =============================================================================



# =============================================================================
# 9. Pictures
# =============================================================================



# =============================================================================
# 10. Inverse
# =============================================================================



# =============================================================================
# 11. Command line and notebook
# =============================================================================


