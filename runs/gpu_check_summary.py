"""runs/gpu_check.sh's last step: one table of every step and one JSON file (gpu_check.json) in OUT."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# bench/train.py's per-depth lines
BENCH_LINE = re.compile(
    r"depth (\d+): ([\d,]+) tok/s, MFU ([\d.]+)%, peak RSS [\d.]+ GB, peak CUDA memory ([\d.]+) GB"
)


def main(out_dir: str) -> int:
    out = Path(out_dir)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
    bench_log = out / "bench_train.log"
    bench = []
    if bench_log.exists():
        for depth, tokens, mfu, cuda_gb in BENCH_LINE.findall(bench_log.read_text()):
            row = {"depth": int(depth), "tok_per_sec": float(tokens.replace(",", "")), "mfu": float(mfu)}
            bench.append(row | {"peak_cuda_gb": float(cuda_gb)})
    for step in steps:
        log = out / f"{step['step']}.log"
        step["log_tail"] = log.read_text(errors="replace").splitlines()[-3:] if log.exists() else []
    result = {"steps": steps, "bench_train": bench, "ok": all(s["rc"] == 0 for s in steps)}
    text = json.dumps(result, indent=2) + "\n"
    (out / "gpu_check.json.tmp").write_text(text)
    (out / "gpu_check.json.tmp").replace(out / "gpu_check.json")
    print(f"{'step':<12} {'status':<7} {'seconds':>7}")
    for s in steps:
        print(f"{s['step']:<12} {'ok' if s['rc'] == 0 else 'FAILED':<7} {s['seconds']:>7}")
    for b in bench:
        print(
            f"bench_train depth {b['depth']}: {b['tok_per_sec']:,.0f} tokens/s, MFU {b['mfu']:.1f}%, "
            f"peak CUDA memory {b['peak_cuda_gb']:.2f} GB"
        )
    print(f"wrote {out / 'gpu_check.json'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
