"""Stream >= 4 GB of mofkit shards and compare with the study's text grids.

    python benchmarks/bench_stream.py [--gb 4.2] [--dir /tmp] [--device cuda]

Writes synthetic 64^3 float16 shards (random energies: reading and decoding cost does not depend on the values)
to a temporary folder, streams them through ShardDataset (directly, and through a DataLoader with 0 and 2
workers), and reports grids/s and peak RSS. Cold figures read files evicted from the page cache
(/proc/sys/vm/drop_caches when allowed, else posix_fadvise(DONTNEED) on every shard); warm figures read them
after they have been read once. Each measurement runs in a fresh process so its peak RSS is its own; CPU
ms/grid (user + system, workers included) shows the cost apart from waiting for other jobs' CPU time.
The study's approach: each grid as a ~6.9 MB text file (np.savetxt, one value per line), parsed with np.loadtxt
(and pandas.read_csv, the fastest common text parser); a few grids are timed and the rate extrapolated.
Targets (issue 3): peak RSS < 1 GB and >= 2,000 grids/s warm. The folder is removed at the end.
"""
import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mofkit  # noqa: E402

SIZE, PER_SHARD, BATCH = 64, 100, 32
GRID_BYTES = SIZE ** 3 * 2


def write_shards(folder, n_shards):
    rng = np.random.default_rng(0)
    base = rng.uniform(-1500, 5000, (PER_SHARD, 1, SIZE, SIZE, SIZE)).astype(np.float16)
    for k in range(n_shards):
        names = [f"synthetic_{k}_{i}" for i in range(PER_SHARD)]
        meta = {"source": "synthetic", "params": asdict(mofkit.GridParams()), "members": names,
                "names": names, "failures": [], "properties": {"columns": [], "rows": [[] for _ in names]}}
        mofkit.write_shard(folder / f"shard_{k:05d}.npy", np.roll(base, k, axis=0), meta)


def evict(paths):
    """Drop the files from the page cache; returns how."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        return "fadvise DONTNEED"


def warm(paths):
    buf = bytearray(1 << 24)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def cpu_s():
    """CPU seconds (user + system) of this process and its finished children (DataLoader workers)."""
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                         resource.RUSAGE_CHILDREN)))


def measure(folder, mode, device):
    """Stream every grid once; runs in its own process (see main)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5\n")  # reset the peak RSS: this process began as a fork of the (larger) benchmark process
    data = mofkit.ShardDataset(folder, seed=0, batch_size=BATCH)
    device = torch.device(device)
    cpu0, t0 = cpu_s(), time.perf_counter()
    n = 0
    if mode == "dataset":
        for x in data:
            n += 1
    else:
        workers = int(mode.removeprefix("loader"))
        loader = torch.utils.data.DataLoader(data, batch_size=BATCH, num_workers=workers,
                                             pin_memory=device.type == "cuda")
        for batch in loader:
            batch = batch.to(device, non_blocking=True)
            n += len(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - t0, cpu_s() - cpu0
    peak_kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    worker_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest DataLoader worker
    return {"grids": n, "seconds": seconds, "cpu_s": cpu,
            "rss_MB": peak_kib / 1024, "worker_rss_MB": worker_kib / 1024}


def run_measure(folder, mode, device):
    out = subprocess.run([sys.executable, __file__, "--measure", mode, "--dir", str(folder), "--device", device],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def study_text(folder, n_grids=3):
    """The study's format: one grid per text file, one value per line (np.savetxt's default '%.18e')."""
    import pandas as pd
    rng = np.random.default_rng(1)
    paths = []
    for i in range(n_grids):
        paths.append(folder / f"grid_{i}.txt")
        np.savetxt(paths[-1], rng.uniform(-1500, 5000, SIZE ** 3))
    warm(paths)
    rates = {}
    for parser, read in [("np.loadtxt", np.loadtxt),
                         ("pandas.read_csv", lambda p: pd.read_csv(p, header=None, dtype=np.float64).to_numpy())]:
        cpu0, t0 = cpu_s(), time.perf_counter()
        for p in paths:
            read(p).reshape(SIZE, SIZE, SIZE).astype(np.float32)  # parse and decode, as a loader must
        rates[parser] = n_grids / (time.perf_counter() - t0), (cpu_s() - cpu0) / n_grids
    return sum(p.stat().st_size for p in paths) / n_grids, rates


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=4.2, help="GB of shards to write (default 4.2 = 8,000 grids)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary folder goes")
    ap.add_argument("--device", default="cpu", help="move each batch here, e.g. cuda (pinned memory)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row; the fastest is reported (shared machine)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.dir, args.measure, args.device)))
        return

    n_shards = max(1, round(args.gb * 1e9 / (GRID_BYTES * PER_SHARD)))
    free = shutil.disk_usage(args.dir).free
    need = n_shards * PER_SHARD * GRID_BYTES + 50e6
    if free < 2 * need:
        sys.exit(f"{args.dir}: {free / 1e9:.1f} GB free, want {2 * need / 1e9:.1f} GB; use --dir or --gb")
    load = os.getloadavg()
    folder = Path(tempfile.mkdtemp(dir=args.dir, prefix="mofkit_bench_stream_"))
    try:
        t0 = time.perf_counter()
        write_shards(folder, n_shards)
        write_s = time.perf_counter() - t0
        paths = sorted(folder.glob("shard_*.npy"))
        total = sum(p.stat().st_size for p in paths)
        n = n_shards * PER_SHARD

        def fastest(mode, cold):
            runs = []
            for _ in range(args.repeat):
                how = f"cold ({evict(paths)})" if cold else "warm (page cache)"
                runs.append(run_measure(folder, mode, args.device))
            return how, mode, min(runs, key=lambda r: r["seconds"])

        rows = [fastest(mode, cold=True) for mode in ["dataset", "loader2"]]
        warm(paths)
        rows += [fastest(mode, cold=False) for mode in ["dataset", "loader0", "loader2"]]
        text_bytes, text_rates = study_text(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    label = {"dataset": "ShardDataset, iterated directly", "loader0": f"DataLoader(batch {BATCH}, 0 workers)",
             "loader2": f"DataLoader(batch {BATCH}, 2 workers)"}
    print(f"## Streaming shards: {n:,} synthetic 64^3 grids, {n_shards} shards, {total / 1e9:.2f} GB on disk\n")
    print(f"Machine: {machine()}; {platform.platform()}; torch {torch.__version__}, numpy {np.__version__}; "
          f"batches moved to {args.device}.  ")
    print(f"Date: {datetime.datetime.now().isoformat(timespec='minutes')}; load average at start "
          f"{load[0]:.2f} (the machine is shared with other jobs).  ")
    print(f"Wrote the shards in {write_s:.1f} s ({total / write_s / 1e9:.2f} GB/s, atomic + fsync). "
          f"Each row: the fastest of {args.repeat} runs.\n")
    print("| read | pipeline | grids | s | grids/s | GB/s | CPU ms/grid | peak RSS main (MB) | peak RSS worker (MB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for read, mode, r in rows:
        assert r["grids"] == n, r
        worker = f"{r['worker_rss_MB']:.0f}" if mode == "loader2" else "-"
        print(f"| {read} | {label[mode]} | {r['grids']:,} | {r['seconds']:.2f} | {r['grids'] / r['seconds']:,.0f} | "
              f"{r['grids'] * GRID_BYTES / r['seconds'] / 1e9:.2f} | {1e3 * r['cpu_s'] / r['grids']:.2f} | "
              f"{r['rss_MB']:.0f} | {worker} |")
    for parser, (rate, cpu) in text_rates.items():
        print(f"| warm | the study: text grid files, {parser} | 3, extrapolated to {n:,} | {n / rate:,.0f} | "
              f"{rate:,.2f} | {rate * text_bytes / 1e9:.3f} | {1e3 * cpu:,.0f} | - | - |")
    per_grid = total / n
    print(f"\nOn disk per 64^3 grid: shards {per_grid:,.0f} B ({per_grid / 2**20:.3f} MiB, "
          f"{per_grid / 1e6:.3f} MB); the study's text {text_bytes:,.0f} B ({text_bytes / 1e6:.2f} MB), "
          f"{text_bytes / per_grid:.1f}x larger. Targets: >= 2,000 grids/s warm, peak RSS < 1 GB.")


if __name__ == "__main__":
    main()
