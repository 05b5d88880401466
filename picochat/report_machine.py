"""The machine a run ran on, for the report card: its hardware, software and code, and its hourly price.

Prices are assumptions, stated in the report: on-demand cloud prices per GPU-hour for GPU machines and,
for a CPU-only machine, a price per logical core (vCPU) hour.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from picochat.common import REPO_DIR

# Assumed on-demand cloud prices in $ per GPU-hour (first match in the GPU's name wins).
GPU_HOURLY_USD = [("H200", 3.50), ("H100", 3.00), ("A100", 1.80), ("L40", 1.00), ("A10", 0.75), ("L4", 0.70),
                  ("T4", 0.35), ("4090", 0.50), ("3090", 0.30)]  # fmt: skip
UNKNOWN_GPU_HOURLY_USD = 1.00
# A CPU-only machine is priced per logical core (vCPU) hour, about what an on-demand general-purpose
# cloud instance costs (e.g. 2 vCPUs at ~$0.09/h).
CPU_CORE_HOURLY_USD = 0.045


def system_info() -> dict[str, Any]:
    """Git state, hardware, software versions and the size of the code, as plain JSON."""
    import psutil
    import torch

    from picochat import __version__

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1)})
    return {
        "git": _git_info(),
        "cpu": _cpu_model(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpus,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "picochat": __version__,
        "code": codebase_stats(),
    }


def _git_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise OSError(out.stderr.strip())
        return out.stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "--short=12", "HEAD"),
            "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown (not a git checkout)", "branch": "-", "dirty": None}


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def codebase_stats(package_dir: Path = REPO_DIR / "picochat") -> dict[str, int]:
    """Files, lines and characters of the package's Python code; tokens ~ characters / 4."""
    files = sorted(package_dir.rglob("*.py"))
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    chars = sum(len(t) for t in texts)
    return {
        "files": len(files),
        "lines": sum(t.count("\n") for t in texts),
        "characters": chars,
        "approx_tokens": chars // 4,
    }


def hourly_cost(system: dict[str, Any]) -> tuple[float, str]:
    """($ per hour, how it was worked out) for the machine described by `system_info()`."""
    gpus = system.get("gpus") or []
    if not gpus:
        cores = system.get("cores_logical") or 1
        return cores * CPU_CORE_HOURLY_USD, (
            f"CPU only: {cores} logical cores at an assumed ${CPU_CORE_HOURLY_USD:.3f} per core-hour, about "
            "an on-demand cloud vCPU"
        )
    total, parts = 0.0, []
    for gpu in gpus:
        rate = next((r for key, r in GPU_HOURLY_USD if key in gpu["name"]), UNKNOWN_GPU_HOURLY_USD)
        total += rate
        parts.append(f"{gpu['name']} ${rate:.2f}/h")
    return total, f"{len(gpus)} GPU(s) at assumed on-demand cloud prices: " + ", ".join(sorted(set(parts)))
