"""GAN training throughput: the study's regime vs the kit's GPU preset, on one device, in one run.

    python benchmarks/bench_train.py --device cuda            # H100/A100/T4...: study (fp32, eager, batch 2) vs preset
    python benchmarks/bench_train.py --device cpu --steps 3   # CPU figures (slow: a few steps)
    python benchmarks/bench_train.py --device cpu --dim 32 --steps 5

Both rows run mofkit's own training step (`_gan_step`: D update then G update, LSGAN) on batches already on
the device, transformed by `to_gan_input` each step as `train()` does; `--end-to-end` adds a row through
`mofkit.train()` itself (DataLoader, host->device copies, logging) on an in-memory dataset. The FLOP floor is
the counted FLOPs of one training step per sample (G forward/backward, three D forwards and their backwards)
divided by the device's dense bf16/fp16 tensor-core peak: no implementation can be faster than that.
"""
import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mofkit  # noqa: E402

PEAK_TFLOPS = [  # dense bf16/fp16 tensor-core peaks, most specific name first
    ("H100 PCIe", 756), ("H100 NVL", 835), ("H100", 989), ("H200", 989), ("GH200", 989), ("B200", 2250),
    ("A100", 312), ("A10G", 125), ("A10", 125), ("L40S", 362), ("L4", 121), ("V100", 125), ("T4", 65),
]


def flops_per_sample(config):
    """FLOPs of one training step for one sample, counted on the meta device (no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = mofkit.TrainConfig(**{**vars(config), "precision": "fp32", "compile": False, "channels_last": False})
    with torch.device("meta"):
        run = mofkit._build_run(cfg, torch.device("meta"))
        real = torch.rand(1, cfg.grid_channels, cfg.dim, cfg.dim, cfg.dim)
    counter = FlopCounterMode(display=False)
    with counter:
        mofkit._gan_step(run, real, step=1)
    return counter.get_total_flops()


def step_throughput(config, device, steps, warmup):
    """samples/s of `_gan_step` and peak device memory (GiB, CUDA only)."""
    torch.manual_seed(0)
    run = mofkit._build_run(config, device)
    shape = (config.batch_size, config.grid_channels) + (config.dim,) * 3
    grids_K = torch.rand(shape, device=device) * 1500 - 1000
    e_scale = 800.0

    def step(step=1):
        real = mofkit.to_gan_input(grids_K, e_scale, config.transform).contiguous(memory_format=run.memory_format)
        return mofkit._gan_step(run, real, step)

    for _ in range(warmup):  # cudnn.benchmark autotuning, torch.compile
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        stats = step()
    stats.tolist()  # waits for the device
    sync()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    del run
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return steps * config.batch_size / seconds, peak


def end_to_end_throughput(config, steps, tmp):
    """samples/s through mofkit.train() (DataLoader in the main process, host->device copies, logging) on an
    in-memory dataset of one epoch; the first `steps` steps (warm-up, compilation) are not counted."""
    g = torch.Generator().manual_seed(0)
    distinct = [torch.rand(config.grid_channels, config.dim, config.dim, config.dim, generator=g) * 1500 - 1000
                for _ in range(16)]
    data = [distinct[i % 16] for i in range(2 * steps * config.batch_size)]  # references: little memory
    cfg = mofkit.TrainConfig(**{**vars(config), "e_scale_K": 800.0, "log_every": steps, "num_workers": 0,
                                "checkpoint_every_steps": 10 ** 9, "checkpoint_every_min": 1e9})
    res = mofkit.train(cfg, data, tmp, resume=False, max_steps=2 * steps, progress=False)
    return res.history[-1]["samples_per_s"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--channels", type=int, default=512)
    p.add_argument("--batch", type=int, default=None, help="preset batch size (default: TrainConfig.fast_gpu's)")
    p.add_argument("--precision", default="auto", help="preset precision: auto (bf16, fp16 on T4), bf16, fp16")
    p.add_argument("--no-compile", action="store_true", help="preset without torch.compile")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 50 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 GPU, 1 CPU)")
    p.add_argument("--end-to-end", action="store_true", help="add a row through mofkit.train()")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the device's dense bf16 peak")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    steps = args.steps or (50 if gpu else 3)
    warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
    common = dict(dim=args.dim, channels=args.channels, device=str(device))
    study = mofkit.TrainConfig.study(**common)  # fp32, eager, batch 2, contiguous: the study's regime
    preset = mofkit.TrainConfig.fast_gpu(**common, precision=args.precision, compile=not args.no_compile,
                                         **({"batch_size": args.batch} if args.batch else {}))
    if gpu:
        name = torch.cuda.get_device_name(device)
        peak = args.peak_tflops or next((t for key, t in PEAK_TFLOPS if key in name), None)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        models = [l.split(":", 1)[1].strip() for l in cpuinfo.read_text().splitlines()
                  if l.startswith("model name")] if cpuinfo.exists() else []
        name = models[0] if models else platform.processor() or platform.machine()
        peak = args.peak_tflops
    flops = flops_per_sample(study)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    rows = []
    for label, cfg in [("study: fp32, eager, batch 2", study),
                       (f"kit preset: {mofkit._resolve_precision(preset.precision, device)}, channels_last_3d, "
                        f"{'compiled' if preset.compile else 'eager'}, batch {preset.batch_size}", preset)]:
        rate, mem = step_throughput(cfg, device, steps, warmup)
        rows.append((label, rate, mem))
    if args.end_to_end:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(("kit preset through train() (in-memory data)",
                         end_to_end_throughput(preset, steps, tmp), float("nan")))

    print(f"\n### GAN training throughput, dim {args.dim}, {args.channels} channels\n")
    print(f"Machine: {name} ({device}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads; "
          f"{datetime.date.today().isoformat()}; {steps} timed steps after {warmup} warm-up per row; "
          f"load average {load:.1f} at start (other jobs sharing the machine slow CPU figures).\n")
    print("| regime | samples/s | speed-up | peak GPU memory (GiB) |")
    print("|---|---:|---:|---:|")
    for label, rate, mem in rows:
        shown = f"{rate:,.1f}" if rate >= 10 else f"{rate:.3f}"
        print(f"| {label} | {shown} | {rate / rows[0][1]:.1f}x | {'-' if mem != mem else f'{mem:.1f}'} |")
    floor = f"{peak * 1e12 / flops:,.0f} samples/s at {peak} TFLOP/s" if peak else "n/a (pass --peak-tflops)"
    print(f"\nFLOPs per sample per training step: {flops / 1e9:.1f} GFLOP; FLOP floor (ceiling on samples/s): "
          f"{floor}.")


if __name__ == "__main__":
    main()
