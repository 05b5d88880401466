"""Recipe ablations at equal compute: validation bits per byte and tokens/s, baseline vs variants.

    .venv/bin/python bench/recipe.py --variants "wd=--muon-weight-decay 0.2" "polar=--ns polar" \
        --depths 4 6 --seeds 1 2 --target-flops 2e14 --jobs 2 --results recipe.jsonl

Every (variant, depth, seed) is one `picochat train base` run for --target-flops training FLOPs (the
trainer's FLOPs per token times tokens, so a variant that changes the model's cost gets fewer steps),
on the bundled corpus by default at vocabulary --vocab-size and sequence --max-seq-len, with the
variant's extra flags after the common ones. The baseline (no extra flags) is always measured.

Practical on a small CPU:
  - each run is a subprocess with its own PICOCHAT_HOME (checkpoints, metrics) that links one
    tokenizer trained once under --workdir; --threads torch threads each, --jobs runs at a time
    (2 runs of 1 thread is usually the best throughput on 2 cores);
  - each finished run appends one JSON line to --results; a run already there (same variant flags,
    depth, seed, budget and common flags) is skipped, so an interrupted sweep resumes where it stopped;
  - the table is printed from the results file at the end (or alone with --table).
Table: per variant and depth, the median final validation bpb over seeds and its spread (max - min),
the change against the baseline's median, and the median tokens/s (steady steps) with its ratio to the
baseline's. docs/recipe.md states the adoption rule applied to it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASELINE = "baseline"
SKIP_STEPS = 3  # the first steps include allocation and the loader's first tokenization


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--variants",
        nargs="*",
        default=[],
        help='NAME="extra train base flags" per variant (the baseline is always run)',
    )
    p.add_argument("--depths", type=int, nargs="+", default=[4, 6], help="model depths")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="--seed of each run")
    p.add_argument("--target-flops", type=float, default=2e14, help="training FLOPs of every run")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary (trained once)")
    p.add_argument("--max-seq-len", type=int, default=512, help="sequence length of every run")
    p.add_argument(
        "--common",
        default="--total-batch-size 8192 --device-batch-size 8",
        help="flags given to every run before the variant's (e.g. batch size, --source, --eval-tokens)",
    )
    p.add_argument(
        "--results", type=Path, default=Path("recipe.jsonl"), help="JSON-lines file of finished runs"
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="folder of the shared tokenizer and the runs' homes (default: next to --results)",
    )
    p.add_argument(
        "--tokenizer-max-chars", type=int, default=0, help="train the tokenizer on at most N chars"
    )
    p.add_argument("--table", action="store_true", help="only print the table of --results")
    return p


def parse_variants(specs: list[str]) -> dict[str, str]:
    variants = {BASELINE: ""}
    for spec in specs:
        name, sep, extra = spec.partition("=")
        if not sep or not name or name in variants:
            raise SystemExit(f"bad variant {spec!r}: write NAME=FLAGS with a new name (not {BASELINE!r})")
        variants[name] = extra.strip()
    return variants


def run_key(row: dict) -> tuple:
    return (row["flags"], row["depth"], row["seed"], row["target_flops"], row["common"], row["max_seq_len"])


def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed sweep
            continue
    return rows


def picochat(home: Path, threads: int, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PICOCHAT_HOME": str(home)}
    if threads > 0:  # else torch's default
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "picochat", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)


def shared_tokenizer(workdir: Path, vocab_size: int, max_chars: int, common: list[str]) -> Path:
    """Train the tokenizer once into workdir/tokenizer_home (skipped when it is already there)."""
    home = workdir / f"tokenizer_{vocab_size}"
    if not (home / "tokenizer" / "tokenizer.json").exists():
        argv = ["tokenizer", "train", "--vocab-size", str(vocab_size)]
        if max_chars:
            argv += ["--max-chars", str(max_chars)]
        if "--source" in common:
            argv += ["--source", common[common.index("--source") + 1]]
        result = picochat(home, 0, *argv)
        if result.returncode:
            raise SystemExit(f"tokenizer training failed:\n{result.stdout}\n{result.stderr}")
    return home / "tokenizer"


def train(job: dict, workdir: Path, tokenizer: Path, threads: int) -> dict:
    """One `train base` run in its own PICOCHAT_HOME; the JSON line of its result."""
    home = Path(tempfile.mkdtemp(prefix=f"{job['variant']}_d{job['depth']}_s{job['seed']}_", dir=workdir))
    (home / "tokenizer").symlink_to(tokenizer.resolve(), target_is_directory=True)
    argv = ["train", "base", "--depth", str(job["depth"]), "--seed", str(job["seed"])]
    argv += ["--max-seq-len", str(job["max_seq_len"]), "--target-flops", f"{job['target_flops']:g}"]
    argv += ["--eval-every", "0", "--sample-every", "0", "--save-every", "0", "--keep-last", "1"]
    argv += ["--run", "r", "--model-tag", "r", *shlex.split(job["common"]), *shlex.split(job["flags"])]
    started = time.time()
    result = picochat(home, threads, *argv)
    if result.returncode:
        tail = (result.stdout + result.stderr)[-2000:]
        raise RuntimeError(f"{job['variant']} d{job['depth']} seed {job['seed']} failed:\n{tail}")
    summary = json.loads((home / "runs" / "r" / "summary.json").read_text())
    metrics = [json.loads(line) for line in (home / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    speeds = [m["tok_per_sec"] for m in metrics if m["kind"] == "train"]
    return {
        **job,
        "val_bpb": summary["final_val_bpb"],
        "tok_per_sec": statistics.median(speeds[SKIP_STEPS:] or speeds),
        "steps": summary["steps"],
        "train_flops": summary["flops_per_token"] * summary["tokens"],
        "wall_seconds": round(time.time() - started, 1),
    }


def append(path: Path, row: dict) -> None:
    """Append one line and flush it to disk, so a killed sweep loses at most the runs in flight."""
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def table(rows: list[dict], variants: list[str] | None = None) -> str:
    """The markdown table of the results: median and spread over seeds per (variant, depth)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["depth"]), []).append(row)
    names = variants or list(dict.fromkeys(r["variant"] for r in rows))
    header = ["variant", "depth", "seeds", "val bpb (median)", "spread", "vs baseline", "tok/s (median)"]
    header.append("vs baseline")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for depth in sorted({r["depth"] for r in rows}):
        base = groups.get((BASELINE, depth))
        base_bpb = statistics.median(r["val_bpb"] for r in base) if base else None
        base_speed = statistics.median(r["tok_per_sec"] for r in base) if base else None
        for name in names:
            runs = groups.get((name, depth))
            if not runs:
                continue
            bpbs = [r["val_bpb"] for r in runs]
            bpb, speed = statistics.median(bpbs), statistics.median(r["tok_per_sec"] for r in runs)
            d_bpb = f"{bpb - base_bpb:+.4f}" if base_bpb is not None and name != BASELINE else ""
            d_speed = f"{speed / base_speed:.3f}x" if base_speed and name != BASELINE else ""
            spread = max(bpbs) - min(bpbs)
            cells = [name, depth, len(runs), f"{bpb:.4f}", f"{spread:.4f}", d_bpb, f"{speed:,.0f}", d_speed]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    variants = parse_variants(args.variants)
    if args.table:
        print(table(load_results(args.results)))
        return 0
    workdir = args.workdir or args.results.resolve().parent / (args.results.stem + "_runs")
    workdir.mkdir(parents=True, exist_ok=True)
    common = shlex.split(args.common)
    tokenizer = shared_tokenizer(workdir, args.vocab_size, args.tokenizer_max_chars, common)
    done = {run_key(r) for r in load_results(args.results)}
    jobs = [
        {"variant": name, "flags": flags, "depth": depth, "seed": seed, "target_flops": args.target_flops}
        | {"common": args.common, "max_seq_len": args.max_seq_len}
        for depth in args.depths
        for seed in args.seeds
        for name, flags in variants.items()  # interleaved: the variants of a seed run side by side
    ]
    todo = [job for job in jobs if run_key(job) not in done]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already in {args.results}; {len(todo)} to go")
    failures = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(train, job, workdir, tokenizer, args.threads): job for job in todo}
        for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
            try:
                row = future.result()
            except RuntimeError as exc:
                failures += 1
                print(exc, file=sys.stderr)
                continue
            append(args.results, row)
            print(
                f"[{i}/{len(todo)}] {row['variant']} d{row['depth']} seed {row['seed']}: "
                f"bpb {row['val_bpb']:.4f}, {row['tok_per_sec']:,.0f} tok/s, {row['steps']} steps, "
                f"{row['wall_seconds']:.0f} s",
                flush=True,
            )
    rows = [r for r in load_results(args.results) if r["target_flops"] == args.target_flops]
    print(table(rows, list(variants)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
