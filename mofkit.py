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



# =============================================================================
# 5. Shards: sharded grid datasets, data_manifest.csv, streaming dataset
# =============================================================================



# =============================================================================
# 6. Models: the study's 3D GAN (after Wu et al. 2016)
# =============================================================================

# The study's network (after Wu et al. 2016): a latent vector is projected by a Linear layer to a
# 4^3 x `channels` volume and doubled in size by k4 s2 p1 transposed convolutions, halving the channels
# each time; the discriminator mirrors it and ends in a Linear head. Convolutions carry no bias (BatchNorm
# follows them); both nets end in a Sigmoid. At dim 64, latent 200, 512 channels this is exactly the
# study's model summary: 17,601,408 generator and 11,048,833 discriminator parameters. The layer
# layout is the one those counts pin down: the projection has a bias and no BatchNorm, the last
# transposed convolution has no BatchNorm, and every discriminator convolution (the first too) does.

def _widths(dim, channels):
    """Feature channels from the 4^3 bottleneck outwards: channels, channels/2, ... (one per resolution step)."""
    steps = round(math.log2(dim / 4)) if dim >= 8 else 0
    if steps < 1 or 4 * 2 ** steps != dim:
        raise ValueError(f"dim={dim}: grid size must be 4 * 2^n with n >= 1 (8, 16, 32, 64, 128, ...)")
    if channels % 2 ** (steps - 1):
        raise ValueError(f"channels={channels}: must be divisible by {2 ** (steps - 1)} for dim={dim}")
    return [channels >> i for i in range(steps)]


class Generator(torch.nn.Module):
    """z (N, latent) -> grids (N, out_channels, dim, dim, dim) in [0, 1] (GAN space, see `to_gan_input`)."""

    def __init__(self, dim=64, latent=200, channels=512, out_channels=1):
        super().__init__()
        nn = torch.nn
        widths = _widths(dim, channels)
        self.dim, self.latent, self.channels, self.out_channels = dim, latent, channels, out_channels
        self.project = nn.Linear(latent, channels * 4 ** 3)
        layers = []
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose3d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose3d(widths[-1], out_channels, 4, 2, 1, bias=False), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        x = self.project(z).view(-1, self.channels, 4, 4, 4)
        return self.net(torch.relu(x))


class Discriminator(torch.nn.Module):
    """grids (N, in_channels, dim, dim, dim) in GAN space -> D(x) in (0, 1), shape (N,)."""

    def __init__(self, dim=64, channels=512, in_channels=1):
        super().__init__()
        nn = torch.nn
        widths = _widths(dim, channels)[::-1]
        self.dim, self.channels, self.in_channels = dim, channels, in_channels
        layers = []
        for c_in, c_out in zip([in_channels] + widths, widths):
            layers += [nn.Conv3d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels * 4 ** 3, 1)

    def forward(self, x):
        return torch.sigmoid(self.head(self.features(x).flatten(1))).squeeze(1)


# The study's input transform: attractive wells (E < 0) become positive values in (0, 1], everything
# repulsive becomes 0, wells deeper than E_scale saturate at 1. Extra channels (atom densities already in
# [0, 1]) pass through unchanged; the channel axis is -4 for inputs with 4 or more dimensions.

def _map_energy_channel(x, fn):
    if x.ndim < 4 or x.shape[-4] == 1:
        return fn(x)
    cat = torch.cat if torch.is_tensor(x) else np.concatenate
    return cat([fn(x[..., :1, :, :, :]), x[..., 1:, :, :, :]], -4)


def _check_e_scale(e_scale_K):
    if not (math.isfinite(e_scale_K) and e_scale_K > 0):
        raise ValueError(f"e_scale_K={e_scale_K}: must be a positive finite energy in kelvin")


def _float32(x):
    return x.float() if torch.is_tensor(x) else np.asarray(x, dtype=np.float32)


def to_gan_input(grid_K, e_scale_K):
    """Kelvin grid(s) -> GAN space: clip(-E, 0, E_scale) / E_scale on channel 0 (numpy or torch, float32)."""
    _check_e_scale(e_scale_K)
    return _map_energy_channel(_float32(grid_K), lambda e: (-e).clip(0, e_scale_K) / e_scale_K)


def from_gan_output(x, e_scale_K):
    """GAN space -> kelvin: E = -x * E_scale on channel 0 (repulsive regions come back as 0 K)."""
    _check_e_scale(e_scale_K)
    return _map_energy_channel(_float32(x), lambda v: -v * e_scale_K)


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
# 7. Training: LSGAN with exact-resume checkpoints, mixed precision, DDP
# =============================================================================

# Training runs one LSGAN update of D and then of G on EVERY batch (the study's script ran D over all
# shards and then G over all shards; that is not copied). Everything a run needs to continue bit-for-bit
# lives in one checkpoint, written atomically (temp + rename) so a Colab disconnect mid-write leaves the
# previous one intact. Multi-GPU: launch with torchrun; each process reads RANK / WORLD_SIZE / LOCAL_RANK.
# BatchNorm stays per-process (plain BatchNorm3d, DDP broadcast_buffers=True re-syncs running stats from
# rank 0 at every D/G forward): per-GPU batch statistics match the single-GPU recipe, and SyncBatchNorm
# would add a collective to each of the ~8 BN layers in each of the 3 forwards per step.

ARCH_FIELDS = ("dim", "channels", "latent", "grid_channels")
HISTORY_COLUMNS = ("step", "epoch", "loss_d", "loss_g", "d_real", "d_fake", "samples_per_s", "time_s")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not match the run; the file is left untouched."""


class TrainingDiverged(FloatingPointError):
    """A loss became NaN/Inf; the last good checkpoint was kept."""


@dataclass
class TrainConfig:
    """Defaults are the study's best run (48 epochs, batch 2, latent 200, Adam 2e-4 (0.5, 0.999), fp32 eager).

    `TrainConfig.fast_gpu()` is the kit's GPU preset (bf16/fp16 autocast, channels_last_3d, torch.compile,
    batch 64 with the same lr: DCGAN's own recipe). A bigger batch means fewer updates per epoch.
    """
    dim: int = 64                   # grid edge in voxels (8, 16, 32, 64, 128, ...)
    channels: int = 512             # feature channels at the 4^3 bottleneck
    latent: int = 200
    grid_channels: int = 1          # channel 0 = energy (K); more channels = atom densities in [0, 1]
    epochs: int = 48
    batch_size: int = 2             # per process
    lr: float = 2e-4
    betas: tuple = (0.5, 0.999)
    e_scale_K: float | None = None  # None: the dataset's `e_scale_K`, else `pick_e_scale` on its first 64 grids
    seed: int = 0
    device: str = "auto"            # "auto": cuda:LOCAL_RANK when available, else cpu
    precision: str = "fp32"         # "fp32" | "bf16" | "fp16" (with GradScaler) | "auto" (bf16 >= Ampere, else fp16; cpu fp32)
    channels_last: bool = False     # channels_last_3d memory format (faster cuDNN kernels with bf16/fp16)
    compile: bool = False           # torch.compile the models
    num_workers: int = 0            # DataLoader worker processes
    log_every: int = 10             # steps per history row (and per NaN check)
    checkpoint_every_steps: int = 1000
    checkpoint_every_min: float = 10.0

    @classmethod
    def fast_gpu(cls, **overrides):
        """The kit's default GPU preset; any field can still be overridden."""
        preset = dict(batch_size=64, precision="auto", channels_last=True, compile=True, num_workers=4)
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


def load_checkpoint(path, map_location="cpu"):
    """Read a training checkpoint with torch.load(weights_only=True); CheckpointError names the file and why."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable mofkit checkpoint ({type(e).__name__}: {e})") from e
    required = {"config", "e_scale_K", "generator", "discriminator", "opt_g", "opt_d", "scaler", "rng",
                "step", "epoch", "samples_in_epoch", "time_s", "history"}
    missing = required - set(ckpt) if isinstance(ckpt, dict) else required
    if missing:
        raise CheckpointError(f"{path}: not a mofkit GAN checkpoint (missing {sorted(missing)})")
    return ckpt


def _config_from_checkpoint(ckpt):
    names = {f for f in TrainConfig.__dataclass_fields__}
    return TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in names})


def _models(config):
    return (Generator(config.dim, config.latent, config.channels, config.grid_channels),
            Discriminator(config.dim, config.channels, config.grid_channels))


# --- one step ----------------------------------------------------------------

@dataclass
class _Run:
    """The live training objects: raw modules (for state_dicts), the callables to run them, optimizers."""
    G: torch.nn.Module
    D: torch.nn.Module
    g: object                        # G, maybe DDP- and/or compile-wrapped
    d: object                        # D for the D step (DDP-wrapped under torchrun)
    d_for_g: object                  # D for the G step: no DDP, its weight grads are never needed
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler: object
    precision: str
    memory_format: torch.memory_format

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
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    G, D = (m.to(device) for m in _models(config))
    memory_format = torch.channels_last_3d if config.channels_last else torch.contiguous_format
    G, D = G.to(memory_format=memory_format), D.to(memory_format=memory_format)
    opt_g = torch.optim.Adam(G.parameters(), lr=config.lr, betas=tuple(config.betas))
    opt_d = torch.optim.Adam(D.parameters(), lr=config.lr, betas=tuple(config.betas))
    precision = _resolve_precision(config.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    g, d, d_for_g = G, D, D
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device.type == "cuda" else None
        g, d = DDP(G, device_ids=ids, broadcast_buffers=True), DDP(D, device_ids=ids, broadcast_buffers=True)
    if config.compile:
        g, d = torch.compile(g), torch.compile(d)
        d_for_g = torch.compile(D) if ddp else d
    return _Run(G, D, g, d, d_for_g, opt_g, opt_d, scaler, precision, memory_format)


def _gan_step(run, real):
    """One LSGAN update of D, then of G, on a batch of GAN-space grids; returns [loss_d, loss_g, D(real), D(fake)]."""
    mse = torch.nn.functional.mse_loss
    device_type = real.device.type
    z = torch.randn(real.shape[0], run.G.latent, device=real.device)
    with run.autocast(device_type):
        fake = run.g(z)
        d_real, d_fake = run.d(real).float(), run.d(fake.detach()).float()
        loss_d = 0.5 * (mse(d_real, torch.ones_like(d_real)) + mse(d_fake, torch.zeros_like(d_fake)))
    run.opt_d.zero_grad(set_to_none=True)
    run.scaler.scale(loss_d).backward()
    run.scaler.step(run.opt_d)

    run.D.requires_grad_(False)  # the G step needs D's input gradients only
    with run.autocast(device_type):
        d_gen = run.d_for_g(fake).float()
        loss_g = mse(d_gen, torch.ones_like(d_gen))
    run.opt_g.zero_grad(set_to_none=True)
    run.scaler.scale(loss_g).backward()
    run.scaler.step(run.opt_g)
    run.scaler.update()
    run.D.requires_grad_(True)
    return torch.stack([loss_d, loss_g, d_real.mean(), d_fake.mean()]).detach()


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


def _resume_from(resume, last, config):
    """The checkpoint to continue from (or None), checked against `config`; never silently starts over."""
    if resume is False or resume is None:
        if last.exists():
            raise CheckpointError(f"{last}: a checkpoint is already there; pass resume=True to continue it "
                                  "or choose another out_dir (it is never overwritten by a fresh run)")
        return None
    path = last if resume is True else Path(resume)
    if resume is True and not path.exists():
        return None
    ckpt = load_checkpoint(path)
    for name in ARCH_FIELDS:
        theirs, ours = ckpt["config"].get(name), getattr(config, name)
        if theirs != ours:
            raise CheckpointError(f"{path}: checkpoint has {name}={theirs} but the config asks for {ours}; "
                                  "use a matching config or another out_dir")
    if config.e_scale_K is not None and config.e_scale_K != ckpt["e_scale_K"]:
        raise CheckpointError(f"{path}: checkpoint has e_scale_K={ckpt['e_scale_K']} but the config asks "
                              f"for {config.e_scale_K}")
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


def train(config: TrainConfig, dataset, out_dir="mofkit_run", resume=True, max_steps=None, progress=True):
    """Train the GAN on `dataset` (kelvin grids (C, D, D, D): a list, torch Dataset or ShardDataset).

    Writes `out_dir/last.pt` (every `checkpoint_every_steps` steps or `checkpoint_every_min` minutes and at the
    end) and `out_dir/history.csv`. `resume=True` continues `out_dir/last.pt` exactly when it exists,
    `resume="path.pt"` continues that file, `resume=False` refuses to touch an existing checkpoint.
    `max_steps` stops after that many optimizer steps in total (counting resumed ones). Under torchrun
    every process calls this and rank 0 writes the files.
    """
    out_dir = Path(out_dir)
    last, history_csv = out_dir / "last.pt", out_dir / "history.csv"
    ckpt = _resume_from(resume, last, config)
    rank, world, device, created_group = _distributed(config)
    try:
        return _train(config, _as_dataset(dataset), ckpt, last, history_csv, rank, world, device,
                      max_steps, progress)
    finally:
        if created_group:
            import torch.distributed as dist
            dist.destroy_process_group()


def _train(config, dataset, ckpt, last, history_csv, rank, world, device, max_steps, progress):
    import time
    import torch.distributed as dist
    from tqdm.auto import tqdm
    _seed_all(config.seed + rank)
    run = _build_run(config, device, ddp=world > 1)
    step, epoch, samples_in_epoch, time_s, history = 0, 0, 0, 0.0, []
    if ckpt is None:
        e_scale = _e_scale(config, dataset, world, device)
    else:
        try:
            run.G.load_state_dict(ckpt["generator"])
            run.D.load_state_dict(ckpt["discriminator"])
            run.opt_g.load_state_dict(ckpt["opt_g"])
            run.opt_d.load_state_dict(ckpt["opt_d"])
            run.scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{ckpt['path']}: does not fit this model/optimizer ({e})") from e
        rng = ckpt["rng"]
        if rank < len(rng):
            _set_rng_state(rng[rank])
        else:  # more processes than when saved: exact continuation is impossible anyway
            _seed_all(config.seed + rank + 7919 * ckpt["step"])
        step, epoch, samples_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["samples_in_epoch"]
        time_s, history, e_scale = ckpt["time_s"], list(ckpt["history"]), ckpt["e_scale_K"]
    if rank == 0:
        _write_history_csv(history_csv, history)  # drops rows logged after the checkpoint we resume from
    stop_at = max_steps if max_steps is not None else float("inf")
    saved_config = {**asdict(config), "e_scale_K": e_scale}

    def save():
        states = [None] * world
        if world > 1:
            dist.all_gather_object(states, _rng_state())
        else:
            states = [_rng_state()]
        if rank == 0:
            state = {"config": saved_config, "e_scale_K": e_scale, "generator": run.G.state_dict(),
                     "discriminator": run.D.state_dict(), "opt_g": run.opt_g.state_dict(),
                     "opt_d": run.opt_d.state_dict(), "scaler": run.scaler.state_dict(), "rng": states,
                     "step": step, "epoch": epoch, "samples_in_epoch": samples_in_epoch,
                     "time_s": time_s + time.perf_counter() - t_start, "history": history, "world_size": world}
            with atomic_write(last) as f:
                torch.save(state, f)

    acc, acc_steps = torch.zeros(4, device=device), 0
    t_start = t_log = time.perf_counter()
    t_saved = time.monotonic()

    def log():
        """Average the metrics since the last log over steps and processes; stop on NaN/Inf; return 'save now'."""
        nonlocal acc, acc_steps, t_log
        now = time.perf_counter()
        time_due = rank == 0 and time.monotonic() - t_saved >= 60 * config.checkpoint_every_min
        stats = torch.cat([acc / acc_steps, torch.tensor([float(time_due)], device=device)])
        if world > 1:
            dist.all_reduce(stats)
            stats[:4] /= world
        loss_d, loss_g, d_real, d_fake, time_due = stats.tolist()
        if not all(math.isfinite(v) for v in (loss_d, loss_g, d_real, d_fake)):
            raise TrainingDiverged(f"non-finite loss at step {step} (loss_d={loss_d}, loss_g={loss_g}); "
                                   f"stopped without saving, the last good checkpoint {last} is kept")
        row = dict(step=step, epoch=epoch, loss_d=loss_d, loss_g=loss_g, d_real=d_real, d_fake=d_fake,
                   samples_per_s=acc_steps * config.batch_size * world / (now - t_log),
                   time_s=time_s + now - t_start)
        history.append(row)
        if rank == 0:
            with open(history_csv, "a") as f:
                f.write(",".join(repr(row[c]) for c in HISTORY_COLUMNS) + "\n")
        bar.set_postfix(loss_d=f"{loss_d:.4f}", loss_g=f"{loss_g:.4f}", refresh=False)
        acc, acc_steps, t_log = torch.zeros(4, device=device), 0, now
        return bool(time_due)

    pin = device.type == "cuda"
    per_epoch = _steps_per_epoch(dataset, config, world)
    total = min(stop_at, config.epochs * per_epoch) if per_epoch is not None else stop_at
    bar = tqdm(total=None if total == float("inf") else total, initial=step,
               disable=not progress or rank != 0, desc="train", unit="step")
    first_step = step
    while epoch < config.epochs and step < stop_at:
        epoch_start = step
        batches = _epoch_batches(dataset, config, epoch, samples_in_epoch, rank, world, pin)
        for real in batches:
            real = to_gan_input(real.to(device, non_blocking=True), e_scale)
            acc += _gan_step(run, real.contiguous(memory_format=run.memory_format))
            acc_steps += 1
            step += 1
            samples_in_epoch += config.batch_size
            bar.update()
            ckpt_due = step % config.checkpoint_every_steps == 0
            if ckpt_due or step % config.log_every == 0:
                if log() or ckpt_due:
                    save()
                    t_saved = time.monotonic()
            if step >= stop_at:
                break
        else:
            if step == epoch_start and samples_in_epoch == 0:
                raise ValueError(f"dataset gives no full batch of {config.batch_size} grids per process")
            epoch, samples_in_epoch = epoch + 1, 0
    if acc_steps:
        log()
    if step > first_step:
        save()
    bar.close()
    return TrainResult(run.G, run.D, last, history)


def sample(generator_or_checkpoint, n, batch_size=16, seed=0, device=None, e_scale_K=None):
    """n generated grids in kelvin, np.float32 (n, C, D, D, D); channel 0 energy, others densities in [0, 1].

    Pass a checkpoint path (E_scale is read from it) or a Generator plus `e_scale_K`. The generator runs in
    eval mode (BatchNorm running statistics), so a grid depends only on its latent vector.
    """
    if isinstance(generator_or_checkpoint, torch.nn.Module):
        G = generator_or_checkpoint
        if e_scale_K is None:
            raise ValueError("sample: pass e_scale_K (kelvin) with a Generator, or give a checkpoint path")
    else:
        ckpt = load_checkpoint(generator_or_checkpoint)
        G = _models(_config_from_checkpoint(ckpt))[0]
        G.load_state_dict(ckpt["generator"])
        e_scale_K = ckpt["e_scale_K"] if e_scale_K is None else e_scale_K
    device = torch.device(device) if device else next(G.parameters()).device
    G = G.to(device)
    was_training = G.training
    G.eval()
    z = torch.randn(n, G.latent, generator=torch.Generator().manual_seed(seed))  # same grids for any batch_size
    out = []
    with torch.no_grad():
        for batch in z.split(batch_size):
            out.append(from_gan_output(G(batch.to(device)).float(), e_scale_K).cpu().numpy())
    G.train(was_training)
    return np.concatenate(out) if out else np.empty((0, G.out_channels) + (G.dim,) * 3, np.float32)



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


