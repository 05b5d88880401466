"""Peak FLOP/s of one process's device, the denominator of MFU (model FLOPs utilisation).

GPUs: the one table of datasheet dense bf16 peaks below (the first name fragment found wins). CPUs (and
GPUs not in the table): measured, as the best of several rounds of square matmuls in the training dtype,
because a single timing on a busy machine underestimates the peak and then MFU reads above 100%. The
measurement is cached in $PICOCHAT_HOME/peak_flops.json under the device's model name and thread count,
so every run on a machine divides by the same number. The source of the peak is always printed with it.
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


def peak_flops(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for one process's device."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS:
            if key in name:
                return flops, f"{name}, datasheet dense bf16"
        return _cached(f"{name} bf16", lambda: measure_matmul_flops(device, torch.bfloat16, 4096))
    key = f"{device.type} {_cpu_name()} x{torch.get_num_threads()} threads fp32"
    return _cached(key, lambda: measure_matmul_flops(device, torch.float32, 1024))


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 4) -> float:
    """Best FLOP/s of `ROUNDS` rounds of `repeats` n x n matmuls (after one warm-up round)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(ROUNDS + 1):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - t0) / repeats)
    return 2 * n**3 / best


def _cached(key: str, measure: object) -> tuple[float, str]:
    path = get_base_dir() / "peak_flops.json"
    table = _read(path)
    if key not in table:
        table[key] = measure()  # type: ignore[operator]
        atomic_write_json(path, table)
    return table[key], f"{key}, measured matmul peak (cached in {path.name})"


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
