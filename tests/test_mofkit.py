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

def _grids(n, dim=16, channels=1, seed=0, fill=None):
    """Kelvin grids with wells and repulsive walls, like the voxelizer's output."""
    g = torch.Generator().manual_seed(seed)
    grids = [torch.rand(channels, dim, dim, dim, generator=g) * 1500 - 1000 for _ in range(n)]
    if channels > 1:
        for x in grids:
            x[1:] = x[1:].abs() / 1000
    if fill is not None:
        for x in grids:
            x.fill_(fill)
    return grids


def _tiny(**kw):
    base = dict(dim=16, channels=8, latent=8, batch_size=2, e_scale_K=800.0, log_every=1, device="cpu",
                checkpoint_every_steps=1000)
    return mofkit.TrainConfig(**{**base, **kw})


def _weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_train_config_defaults_are_the_study_and_fast_gpu_preset():
    c = mofkit.TrainConfig()
    assert (c.epochs, c.batch_size, c.latent, c.lr, c.betas, c.dim, c.channels, c.precision) == \
        (48, 2, 200, 2e-4, (0.5, 0.999), 64, 512, "fp32")
    f = mofkit.TrainConfig.fast_gpu(epochs=3)
    assert f.batch_size > 2 and f.precision == "auto" and f.channels_last and f.compile and f.epochs == 3


def test_train_one_step_changes_weights_finite_losses(tmp_path):
    torch.manual_seed(0)
    G0, D0 = (_weights(m) for m in mofkit._models(_tiny()))
    res = mofkit.train(_tiny(), _grids(4), tmp_path, max_steps=1, progress=False)
    assert res.history[-1]["step"] == 1 and all(np.isfinite(res.history[-1][k]) for k in ("loss_d", "loss_g"))
    G1, D1 = _weights(res.generator), _weights(res.discriminator)
    assert not torch.equal(G0["project.weight"], G1["project.weight"])  # same seed -> same init, then one update
    assert not torch.equal(D0["head.weight"], D1["head.weight"])
    assert (tmp_path / "last.pt").exists()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_autocast_step_on_cpu(tmp_path, precision):
    res = mofkit.train(_tiny(precision=precision, channels_last=True), _grids(4), tmp_path, max_steps=2,
                       progress=False)
    h = res.history[-1]
    assert h["step"] == 2 and np.isfinite(h["loss_d"]) and np.isfinite(h["loss_g"]) and 0 < h["d_real"] < 1
    ckpt = mofkit.load_checkpoint(tmp_path / "last.pt")
    assert bool(ckpt["scaler"]) == (precision == "fp16")  # GradScaler state only on the fp16 path


def test_train_resume_is_bit_identical(tmp_path):
    data = _grids(6)  # 3 steps per epoch: the 4-step run crosses an epoch, the split falls mid-epoch
    straight = mofkit.train(_tiny(), data, tmp_path / "a", max_steps=4, progress=False)
    first = mofkit.train(_tiny(), data, tmp_path / "b", max_steps=2, progress=False)
    assert first.history[-1]["step"] == 2
    resumed = mofkit.train(_tiny(), data, tmp_path / "b", resume=True, max_steps=4, progress=False)
    for a, b in [(straight.generator, resumed.generator), (straight.discriminator, resumed.discriminator)]:
        for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), k
    assert [r["loss_g"] for r in straight.history] == [r["loss_g"] for r in resumed.history]
    ckpt = mofkit.load_checkpoint(tmp_path / "b" / "last.pt")
    assert (ckpt["step"], ckpt["epoch"], ckpt["samples_in_epoch"]) == (4, 1, 2)


def test_train_history_csv_and_load_history(tmp_path):
    mofkit.train(_tiny(log_every=2), _grids(4), tmp_path, max_steps=5, progress=False)
    df = mofkit.load_history(tmp_path)
    assert list(df.columns) == list(mofkit.HISTORY_COLUMNS)
    assert df["step"].tolist() == [2, 4, 5] and (df["samples_per_s"] > 0).all()
    assert df["epoch"].tolist() == [0, 1, 2]  # 2 steps per epoch
    # rows logged after the checkpoint a run resumes from are dropped
    with open(tmp_path / "history.csv", "a") as f:
        f.write("6,3,0,0,0,0,0,0\n")
    mofkit.train(_tiny(log_every=2), _grids(4), tmp_path, max_steps=6, progress=False)
    assert mofkit.load_history(tmp_path / "history.csv")["step"].tolist() == [2, 4, 5, 6]


def test_train_corrupt_or_mismatched_checkpoint_clear_error_and_kept(tmp_path):
    mofkit.train(_tiny(), _grids(4), tmp_path, max_steps=1, progress=False)
    last = tmp_path / "last.pt"
    good = last.read_bytes()
    with pytest.raises(mofkit.CheckpointError, match="channels=8 but the config asks for 16"):
        mofkit.train(_tiny(channels=16), _grids(4), tmp_path, max_steps=2, progress=False)
    with pytest.raises(mofkit.CheckpointError, match="already there"):
        mofkit.train(_tiny(), _grids(4), tmp_path, resume=False, max_steps=2, progress=False)
    assert last.read_bytes() == good
    bad = tmp_path / "bad" / "last.pt"
    bad.parent.mkdir()
    bad.write_bytes(good[: len(good) // 2])  # a checkpoint cut short
    with pytest.raises(mofkit.CheckpointError, match=r"bad[/\\]last\.pt.*not a readable"):
        mofkit.train(_tiny(), _grids(4), bad.parent, max_steps=2, progress=False)
    assert bad.read_bytes() == good[: len(good) // 2]
    torch.save({"step": 3}, bad)
    with pytest.raises(mofkit.CheckpointError, match="missing"):
        mofkit.sample(bad, 1)


def test_train_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = _tiny(checkpoint_every_steps=1)
    mofkit.train(cfg, _grids(4), tmp_path, max_steps=2, progress=False)
    good = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(mofkit.TrainingDiverged, match="non-finite loss at step 3.*last good checkpoint"):
        mofkit.train(cfg, _grids(4, fill=float("nan")), tmp_path, max_steps=4, progress=False)
    assert (tmp_path / "last.pt").read_bytes() == good
    assert mofkit.load_checkpoint(tmp_path / "last.pt")["step"] == 2


def test_train_rejects_unusable_datasets(tmp_path):
    with pytest.raises(TypeError, match="one-shot"):
        mofkit.train(_tiny(), (g for g in _grids(4)), tmp_path / "a", max_steps=1, progress=False)
    with pytest.raises(ValueError, match="no full batch of 2"):
        mofkit.train(_tiny(), _grids(1), tmp_path / "b", max_steps=1, progress=False)


def test_train_streaming_dataset_and_picked_e_scale(tmp_path):
    class Stream(torch.utils.data.IterableDataset):  # ShardDataset's protocol: set_epoch(epoch, start=n)
        def __init__(self, grids):
            self.grids, self.calls, self.start, self.batch_size = grids, [], 0, 1

        def set_epoch(self, epoch, start=0):
            self.calls.append((epoch, start))
            self.start = start

        def __iter__(self):
            return iter(self.grids[self.start:])

    grids = _grids(6, channels=2)
    stream = Stream(grids)
    cfg = _tiny(grid_channels=2, e_scale_K=None)
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


def test_sample_from_checkpoint_in_kelvin(tmp_path):
    res = mofkit.train(_tiny(grid_channels=2), _grids(4, channels=2), tmp_path, max_steps=1, progress=False)
    grids = mofkit.sample(tmp_path / "last.pt", 5, batch_size=2, seed=3)
    assert grids.shape == (5, 2, 16, 16, 16) and grids.dtype == np.float32
    assert grids[:, 0].max() <= 0 and grids[:, 0].min() >= -800.0  # energies in K, within [-E_scale, 0]
    assert 0 <= grids[:, 1:].min() and grids[:, 1:].max() <= 1      # density channel untouched
    same = mofkit.sample(res.generator, 5, batch_size=5, seed=3, e_scale_K=800.0)
    np.testing.assert_allclose(grids, same, rtol=1e-5, atol=1e-3)  # batching changes only float rounding
    with pytest.raises(ValueError, match="e_scale_K"):
        mofkit.sample(res.generator, 1)


_DDP_CHILD = """
import os, sys, torch
sys.path.insert(0, {root!r})
import mofkit
torch.set_num_threads(1)
torch.distributed.init_process_group("gloo")  # as a user script under torchrun may; train() then reuses it
rank = int(os.environ["RANK"])
g = torch.Generator().manual_seed(0)
data = [torch.rand(1, 16, 16, 16, generator=g) * 1500 - 1000 for _ in range(8)]
cfg = mofkit.TrainConfig(dim=16, channels=8, latent=8, batch_size=2, e_scale_K=800.0, log_every=1, device="cpu",
                         epochs=1)
for run, dataset, steps in [("list", data, 2), ("stream", mofkit._Reiterable(data[:8 - 2 * rank]), None)]:
    res = mofkit.train(cfg, dataset, {out!r} + "/" + run, max_steps=steps, progress=False)
    torch.save([p.detach() for m in (res.generator, res.discriminator) for p in m.parameters()],
               {out!r} + f"/{{run}}/params{{rank}}.pt")
"""


def test_train_ddp_two_cpu_processes_keep_identical_weights(tmp_path):
    import socket
    import subprocess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = _DDP_CHILD.format(root=str(Path(mofkit.__file__).parent), out=str(tmp_path))
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



# =============================================================================
# 9. Pictures
# =============================================================================



# =============================================================================
# 10. Inverse
# =============================================================================



# =============================================================================
# 11. Command line and notebook
# =============================================================================


