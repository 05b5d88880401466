"""Benchmark of base-pretraining throughput: tokens/s, MFU, peak memory and start-up time per depth.

    .venv/bin/python bench/train.py --depths 4 6 8 --device-batch-size 8

For each depth (width = depth * 64, head dim 64, vocab 32768, sequence 512, 16,384 tokens per optimiser
step by default; the architecture is `train base`'s default, its extras included, with the same
flags, `--plain` among them) a fresh subprocess (this process, for a single depth) builds the GPT and its
optimisers and runs full training steps exactly as the trainer does (gradient accumulation over
micro-batches of --device-batch-size rows, gradient clipping, AdamW + Muon, the trainer's allocator
settings). Reported per depth:
  - tok/s: tokens per second of the timed steps (median step time), after --warmup-steps steps;
  - MFU: model FLOPs (GPT.estimate_flops() per token) per second over the peak FLOP/s of
    picochat/train/flops.py (a GPU's datasheet bf16 peak; on a CPU the cached best-of-rounds matmul
    measurement, raised to the observed throughput if that is higher, so MFU never exceeds 100%);
    the peak used and its source are printed;
  - peak RSS of the process (a subprocess per depth, so the peaks are separate) and, on CUDA, peak
    CUDA memory (torch.cuda.max_memory_allocated);
  - first step: seconds from launching the subprocess to the end of its first training step
    (interpreter and torch import, model build, any torch.compile, one step).
Random tokens are used: speed does not depend on what the tokens are. `--device cuda --dtype bf16
--compile` is the GPU measurement of runs/gpu_check.sh; the default is the CPU in fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

RESULT_PREFIX = "BENCH_RESULT "
START = time.time()  # the in-process "first step" clock starts here (after the interpreter started)


def build_parser() -> argparse.ArgumentParser:
    from picochat.train.flags import add_architecture_args

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=[4, 6, 8], help="model depths to measure")
    p.add_argument("--device-batch-size", type=int, default=8, help="rows per forward/backward micro-batch")
    p.add_argument("--total-batch-size", type=int, default=16384, help="tokens per optimiser step")
    p.add_argument("--seq-len", type=int, default=512, help="sequence length")
    p.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size")
    p.add_argument("--aspect-ratio", type=int, default=64, help="model width = depth * aspect ratio")
    p.add_argument("--head-dim", type=int, default=64, help="attention head dimension")
    p.add_argument("--warmup-steps", type=int, default=1, help="untimed optimiser steps first")
    p.add_argument("--steps", type=int, default=3, help="timed optimiser steps")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (cold compile included)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device to train on")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="autocast dtype of the forward")
    p.add_argument("--depth", type=int, default=0, help=argparse.SUPPRESS)  # set in worker subprocesses
    p.add_argument("--launch-time", type=float, default=0.0, help=argparse.SUPPRESS)
    add_architecture_args(p.add_argument_group("architecture (as train base)"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.depth:
        print(RESULT_PREFIX + json.dumps(worker(args)), flush=True)
        return 0
    rows = args.total_batch_size // args.seq_len
    print(
        f"config: depths {args.depths}, seq_len {args.seq_len}, vocab {args.vocab_size}, width = depth * "
        f"{args.aspect_ratio}, head_dim {args.head_dim}, total batch {rows} x {args.seq_len} = "
        f"{args.total_batch_size} tokens/step, device batch {args.device_batch_size} "
        f"(grad accum {rows // args.device_batch_size}), compile {args.compile}, threads "
        f"{args.threads or 'default'}, {args.dtype} {args.device}, {args.warmup_steps} warm-up + "
        f"{args.steps} timed steps, {architecture_summary(args)}",
        flush=True,
    )
    argv = sys.argv[1:] if argv is None else argv
    results = [run_depth(args, depth, argv) for depth in args.depths]
    print_table(results)
    return 0


def architecture_summary(args: argparse.Namespace) -> str:
    from picochat.gpt import GPTConfig, architecture_extras
    from picochat.train.flags import architecture_config

    config = GPTConfig(sequence_len=args.seq_len, **architecture_config(args, args.seq_len))
    extras = architecture_extras(config)
    return "architecture " + (", ".join(f"{k}={v}" for k, v in extras.items()) or "plain")


def run_depth(args: argparse.Namespace, depth: int, argv: list[str]) -> dict:
    """Run one depth in a fresh interpreter (in this one when it is the only depth) and return its record.

    A subprocess per depth keeps each depth's peak RSS and start-up time separate; a single depth runs
    here to save one interpreter and torch import (runs/gpu_check.sh --dry).
    """
    if len(args.depths) == 1:
        result = worker(argparse.Namespace(**{**vars(args), "depth": depth, "launch_time": START}))
    else:
        result = run_subprocess(depth, argv)
    print(
        f"depth {depth}: {result['tok_per_sec']:,.0f} tok/s, MFU {result['mfu']:.1f}%, "
        f"peak RSS {result['peak_rss_gb']:.2f} GB, peak CUDA memory {result['peak_cuda_gb']:.2f} GB, "
        f"first step at {result['first_step_s']:.1f} s, "
        f"step times {', '.join(f'{t:.2f}' for t in result['step_times'])} s",
        flush=True,
    )
    return result


def run_subprocess(depth: int, argv: list[str]) -> dict:
    """Run `worker` for one depth in a fresh interpreter (same flags, plus --depth) and read back its
    result line."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--depth", str(depth)]
    proc = subprocess.run([*cmd, "--launch-time", repr(time.time())], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"depth {depth}: benchmark subprocess failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def worker(args: argparse.Namespace) -> dict:
    """Build the GPT of `args.depth`, time its training steps and return the result record."""
    import torch

    from picochat.common import keep_freed_memory, synchronize
    from picochat.gpt import GPT, GPTConfig
    from picochat.train.flags import architecture_config
    from picochat.train.flops import peak_flops, raise_peak

    keep_freed_memory()  # as the trainer's init_runtime does
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = args.total_batch_size // args.seq_len
    if args.total_batch_size % args.seq_len or rows % args.device_batch_size:
        raise SystemExit("--total-batch-size must be a multiple of --seq-len * --device-batch-size")
    accum = rows // args.device_batch_size
    width = args.depth * args.aspect_ratio
    config = GPTConfig(
        sequence_len=args.seq_len,
        vocab_size=args.vocab_size,
        n_layer=args.depth,
        n_head=width // args.head_dim,
        n_kv_head=width // args.head_dim,
        n_embd=width,
        **architecture_config(args, args.seq_len),
    )
    with torch.device("meta"):
        model = GPT(config)
    device = torch.device(args.device)
    model.to_empty(device=device)
    model.init_weights()
    optimizers = model.setup_optimizers()
    compiled = torch.compile(model, dynamic=False) if args.compile else model
    gen = torch.Generator().manual_seed(0)
    shape = (accum, args.device_batch_size, args.seq_len + 1)
    data = torch.randint(0, args.vocab_size, shape, generator=gen).to(device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    autocast = torch.autocast(device.type, dtype=dtype, enabled=args.dtype == "bf16")
    params = list(model.parameters())

    def train_step() -> None:
        for micro in data:
            with autocast:
                loss = compiled(micro[:, :-1], micro[:, 1:])
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    times = []
    first_step_s = None
    for _ in range(args.warmup_steps + args.steps):
        synchronize(device)
        t0 = time.perf_counter()
        train_step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if first_step_s is None:
            first_step_s = time.time() - args.launch_time
    step_s = statistics.median(times[args.warmup_steps :])
    tok_per_sec = args.total_batch_size / step_s
    flops_per_token = model.estimate_flops()
    achieved = flops_per_token * tok_per_sec
    peak, peak_source = peak_flops(device)
    peak, peak_source = raise_peak(device, achieved, peak, peak_source)
    cuda = device.type == "cuda"
    result = {
        "depth": args.depth,
        "width": width,
        "params_m": model.num_params() / 1e6,
        "device_batch": args.device_batch_size,
        "step_s": step_s,
        "tok_per_sec": tok_per_sec,
        "gflops": flops_per_token * tok_per_sec / 1e9,
        "peak_gflops": peak / 1e9,
        "peak_source": peak_source,
        "mfu": 100 * (achieved / peak),  # achieved <= peak, so at most 100 exactly (not 100 * a / a)
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "peak_cuda_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else 0.0,
        "first_step_s": first_step_s,
        "step_times": times,
    }
    return result


def print_table(results: list[dict]) -> None:
    header = (
        f"{'depth':>5} {'width':>5} {'params':>8} {'tok/s':>8} {'GFLOP/s':>8} {'peak':>8} {'MFU':>6} "
        f"{'peak RSS':>9} {'CUDA mem':>9} {'1st step':>9}"
    )
    print(header)
    for r in results:
        print(
            f"{r['depth']:>5} {r['width']:>5} {r['params_m']:>7.1f}M {r['tok_per_sec']:>8,.0f} "
            f"{r['gflops']:>8.1f} {r['peak_gflops']:>8.1f} {r['mfu']:>5.1f}% {r['peak_rss_gb']:>7.2f}GB "
            f"{r['peak_cuda_gb']:>7.2f}GB {r['first_step_s']:>8.1f}s"
        )
    for r in results:
        print(f"depth {r['depth']} peak: {r['peak_gflops']:,.1f} GFLOP/s ({r['peak_source']})")


if __name__ == "__main__":
    sys.exit(main())
