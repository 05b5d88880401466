"""Peak FLOP/s of one process's device, the denominator of MFU (model FLOPs utilisation).

GPUs: the one table of datasheet dense bf16 peaks below (the first name fragment found wins). CPUs (and
GPUs not in the table): measured, as the best of several rounds of square matmuls in the training dtype,
because a single timing on a busy machine underestimates the peak and then MFU reads above 100%. The
measurement is cached in $PICOCHAT_HOME/peak_flops.json under the device's model name and thread count,
so every run on a machine divides by the same number. A cached value measured while the machine was busy
is too low, so each call also takes one quick probe and re-measures when the probe beats the cache, and
`raise_peak` lifts the cached peak to any throughput actually observed above it: MFU never reads above
100%. The source of the peak is always printed with it.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from picochat.common import atomic_write_json, get_base_dir, synchronize

# Dense bf16 peak FLOP/s by GPU name (checked in order: the first substring found wins).
GPU_PEAK_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
]
ROUNDS = 5  # timed rounds per measurement; the fastest counts
CPU_N, GPU_N = 1024, 4096  # matmul sizes: large enough to reach the kernels' steady speed


def peak_flops(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for one process's device."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS:
            if key in name:
                return flops, f"{name}, datasheet dense bf16"
        return _cached(device, f"{name} bf16", torch.bfloat16, GPU_N)
    return _cached(device, _cpu_key(device), torch.float32, CPU_N)


def raise_peak(device: torch.device, observed: float, peak: float, source: str) -> tuple[float, str]:
    """The peak to divide by once `observed` FLOP/s were reached: `peak`, or `observed` if higher.

    A measured peak below real throughput was taken on a busy machine; it is raised in the cache (and the
    new source says so) so that this and later runs never show an MFU above 100%.
    """
    if observed <= peak:
        return peak, source
    if device.type == "cpu" or "measured" in source:
        key = _cpu_key(device) if device.type == "cpu" else f"{torch.cuda.get_device_name(device)} bf16"
        path = _path()
        atomic_write_json(path, {**_read(path), key: observed})
    return observed, f"{source}; raised to the observed {observed / 1e9:,.1f} GFLOP/s"


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, n: int, repeats: int = 4, rounds: int = ROUNDS
) -> float:
    """Best FLOP/s of `rounds` rounds of `repeats` n x n matmuls (after one untimed warm-up round)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(rounds + 1):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        if i:  # round 0 warms up (allocation, kernel selection, thread pool start)
            best = min(best, (time.perf_counter() - t0) / repeats)
    return 2 * n**3 / best


def _cached(device: torch.device, key: str, dtype: torch.dtype, n: int) -> tuple[float, str]:
    """The cached peak for `key`, re-measured when absent or when one quick probe already beats it."""
    path = _path()
    table = _read(path)
    cached = table.get(key)
    probe = measure_matmul_flops(device, dtype, n, repeats=2, rounds=1) if cached else 0.0
    note = ""
    if not cached or probe > cached:
        fresh = max(probe, measure_matmul_flops(device, dtype, n))
        note = f", re-measured: the cached {cached / 1e9:,.1f} GFLOP/s was low" if cached else ""
        table[key] = fresh
        atomic_write_json(path, table)
    return table[key], f"{key}, measured matmul peak (cached in {path.name}{note})"


def _path() -> Path:
    return get_base_dir() / "peak_flops.json"


def _cpu_key(device: torch.device) -> str:
    return f"{device.type} {_cpu_name()} x{torch.get_num_threads()} threads fp32"


def _read(path: Path) -> dict[str, float]:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
