"""runs/gpu_check.sh's last step: one table of every step and one JSON file (gpu_check.json) in OUT.

Figures come from the steps' own output: bench/train.py's per-depth lines, bench/infer.py's prefill and
decode lines, and the base run's metrics (the metrics.jsonl its report section names: the median tokens/s
and MFU of its steps after the first three, which include torch.compile's warm-up).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
from pathlib import Path

# bench/train.py's per-depth lines
BENCH_LINE = re.compile(
    r"depth (\d+): ([\d,]+) tok/s, MFU ([\d.]+)%, peak RSS [\d.]+ GB, peak CUDA memory ([\d.]+) GB"
)
PREFILL_LINE = re.compile(r"prefill: ([\d,]+) tokens/s median")
DECODE_LINE = re.compile(r"batch (\d+): decode ([\d,]+) tokens/s median")


def number(text: str) -> float:
    return float(text.replace(",", ""))


def infer_figures(log: Path) -> dict:
    """bench/infer.py's prefill tokens/s and decode tokens/s per batch size (empty if it did not run)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    prefill = PREFILL_LINE.search(text)
    decode = {int(batch): number(rate) for batch, rate in DECODE_LINE.findall(text)}
    return {"prefill_tok_per_sec": number(prefill.group(1)), "decode_tok_per_sec": decode} if prefill else {}


def base_figures(home: Path) -> dict:
    """The base run's steady-state tokens/s and MFU, from the metrics file its report section names."""
    section = home / "report" / "base.json"
    metrics = home / json.loads(section.read_text())["metrics"] if section.exists() else None  # relative
    lines = metrics.read_text().splitlines() if metrics is not None and metrics.exists() else []
    train = [row for row in map(json.loads, filter(str.strip, lines)) if row.get("kind") == "train"]
    steady = train[3:] or train
    if not steady:
        return {}
    return {
        "steps": len(train),
        "tok_per_sec": statistics.median(r["tok_per_sec"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady),
    }


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
    infer = infer_figures(out / "bench_infer.log")
    base = base_figures(Path(os.environ["PICOCHAT_HOME"])) if "PICOCHAT_HOME" in os.environ else {}
    ok = all(s["rc"] == 0 for s in steps)
    result = {"steps": steps, "bench_train": bench, "bench_infer": infer, "base_run": base, "ok": ok}
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
    if infer:
        decode = ", ".join(f"batch {b}: {r:,.0f}" for b, r in infer["decode_tok_per_sec"].items())
        print(f"bench_infer: prefill {infer['prefill_tok_per_sec']:,.0f} tokens/s; decode tokens/s {decode}")
    if base:
        print(f"base run: {base['steps']} steps, {base['tok_per_sec']:,.0f} tokens/s, MFU {base['mfu']:.1f}%")
    print(f"wrote {out / 'gpu_check.json'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
