"""`picochat plan`: size a base-training run on paper before renting GPUs for it.

`picochat plan --depth 26 --nproc 8 --gpu h100` prints what `picochat train base` would do with the same
flags (it builds the base trainer's own arguments and batch plan, on the meta device, so nothing is
allocated): parameters, tokens (target param:data ratio x scaling parameters), FLOPs
(`GPT.estimate_flops` per token), training hours at a stated MFU, memory per GPU and whether it fits,
and the cost at a stated price per GPU-hour. `--check` turns "does not fit" into an error, which is how
`runs/speedrun.sh` refuses a device batch that would run out of memory an hour into a rented run.

Memory per GPU is the sum of (bytes, N = parameters):
  - weights 4N and gradients 4N (fp32 master weights; autocast computes in bf16), plus 4N for DDP's
    gradient buckets when there is more than one process;
  - optimizer state: Muon keeps one fp32 momentum buffer per matrix (4 bytes per Muon parameter), AdamW
    two moments (8 bytes per AdamW parameter);
  - activations saved for the backward pass, per token of the device batch: per layer
    ACT_COMPUTE_PER_LAYER x n_embd values in the compute dtype (2 bytes in bf16, 4 in fp32) and
    ACT_FP32_PER_LAYER x n_embd in fp32 (the residual stream going into each RMSNorm), plus
    ACT_FP32_OUTSIDE x n_embd fp32 outside the blocks; and the fused loss's fp32 lm_head gradient
    (4 x vocab x n_embd). The constants were counted by hooking every tensor autograd saves during one
    forward pass on the CPU (fp32, flash attention: nothing scales with T^2); tests/test_plan.py
    checks them against that measurement at other sizes. torch.compile can only save fewer;
  - a fixed reserve for the CUDA context, kernels' workspace and allocator fragmentation.
The result is an estimate for eager bf16 training; for the plain architecture it agrees with nanochat's
experience (d26 at 16 rows of 2048 tokens fits an 80 GB H100 and 32 rows do not). The model is the one
`train base`'s architecture flags build (the same flags here): value embeddings and a bigram table add
parameters, so gradients and optimizer state, but no scaling parameters.

MFU: nanochat's first bf16 leaderboard run (d24, 8xH100) did 4.33e19 FLOPs in 10,949 s, 4.9e14 FLOP/s
per GPU, 50% of the H100's 989 TFLOP/s dense bf16 peak, with the same FLOPs-per-token formula. picochat
uses plain DDP and has not yet been measured on a GPU, so the default assumes 40%; `runs/gpu_check.sh`
measures the real figure (docs/gpu.md) and `--mfu` takes it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch

from picochat.common import PicochatError, run_cli
from picochat.train import flags

GIB = 2**30
ACT_COMPUTE_PER_LAYER = 16  # per token, in units of n_embd values (measured, see the docstring)
ACT_FP32_PER_LAYER = 2
ACT_FP32_OUTSIDE = 3
DEFAULT_MFU = 0.40
DEVICE_BATCH_CHOICES = (32, 16, 8, 4, 2, 1)


@dataclass(frozen=True)
class Gpu:
    name: str
    peak_key: str  # the name in picochat.train.base.GPU_PEAK_FLOPS (dense bf16 FLOP/s)
    memory_gib: float
    price: float  # typical on-demand $ per GPU-hour in 2026 (nanochat's figure for H100: ~$3)
    reserve_gib: float = 2.0


# Memory as torch.cuda.get_device_properties reports it (a little under the marketing figure).
GPUS = {
    "h100": Gpu("H100 SXM 80GB", "H100", 79.6, 3.00),
    "h200": Gpu("H200 141GB", "H200", 139.8, 3.80),
    "a100": Gpu("A100 80GB", "A100", 79.2, 1.80),
    "b200": Gpu("B200 180GB", "B200", 178.4, 6.00),
}


def build_model(
    depth: int,
    seq_len: int,
    vocab_size: int,
    aspect_ratio: int = 64,
    head_dim: int = 64,
    architecture: dict[str, Any] | None = None,
) -> Any:
    """The GPT that `picochat train base --depth ...` builds, on the meta device (no memory, no time).
    `architecture`: GPTConfig's extras (`flags.architecture_config`); None = the plain model."""
    from picochat.gpt import GPT, GPTConfig
    from picochat.train.base import model_shape

    shape = model_shape(depth, aspect_ratio, head_dim)
    with torch.device("meta"):
        return GPT(GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, **shape, **(architecture or {})))


def activation_bytes(config: Any, rows: int, compute_bytes: int) -> int:
    """Bytes autograd keeps for the backward pass of one micro-batch of `rows` x sequence_len tokens."""
    tokens, width = rows * config.sequence_len, config.n_embd
    per_layer = ACT_COMPUTE_PER_LAYER * compute_bytes + ACT_FP32_PER_LAYER * 4
    stream = tokens * width * (config.n_layer * per_layer + ACT_FP32_OUTSIDE * 4)
    return stream + 4 * config.vocab_size * width  # the fused loss's lm_head gradient, fp32


def memory_bytes(model: Any, rows: int, world_size: int, compute_bytes: int = 2) -> dict[str, int]:
    """Memory per process by kind (see the module docstring); `rows` is the device batch size."""
    muon = sum(p.numel() for p in model.transformer.h.parameters() if p.ndim == 2)
    total = sum(p.numel() for p in model.parameters())
    return {
        "weights": 4 * total,
        "gradients": 4 * total * (2 if world_size > 1 else 1),  # DDP's buckets hold a second copy
        "optimizer": 4 * muon + 8 * (total - muon),
        "activations": activation_bytes(model.config, rows, compute_bytes),
    }


def make_run_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `picochat plan` prints, as numbers (device_batch_size -1: the largest that fits)."""
    from picochat.train import base

    if args.gpu not in GPUS:
        raise PicochatError(f"unknown --gpu {args.gpu!r}; use one of {', '.join(GPUS)}")
    if args.nproc < 1 or args.nodes < 1 or not 0 < args.mfu <= 1 or args.price < 0:
        raise PicochatError("--nproc and --nodes must be at least 1, --mfu in (0, 1], --price not negative")
    gpu = GPUS[args.gpu]
    world_size = args.nproc * args.nodes
    shape = (args.depth, args.max_seq_len, args.vocab_size, args.aspect_ratio, args.head_dim)
    model = build_model(*shape, architecture=flags.architecture_config(args, args.max_seq_len))
    capacity = int(gpu.memory_gib * GIB)

    def plan_for(device_batch: int) -> tuple[Any, dict[str, int]]:
        flags = ["--depth", str(args.depth), "--max-seq-len", str(args.max_seq_len)]
        flags += ["--device-batch-size", str(device_batch), "--total-batch-size", str(args.total_batch_size)]
        flags += ["--target-param-data-ratio", str(args.target_param_data_ratio)]
        flags += ["--aspect-ratio", str(args.aspect_ratio), "--head-dim", str(args.head_dim)]
        train_args = base.build_parser().parse_args(flags)
        batch = base.make_plan(train_args, model, args.vocab_size, world_size, "cuda")
        memory = memory_bytes(model, batch.device_batch_size, world_size)
        memory["reserve"] = int(gpu.reserve_gib * GIB)
        return batch, memory

    if args.device_batch_size == -1:
        rows = plan_for(1)[0].total_batch_size // (args.max_seq_len * world_size)
        choices = [b for b in DEVICE_BATCH_CHOICES if rows % b == 0]
        for device_batch in choices:
            batch, memory = plan_for(device_batch)
            if sum(memory.values()) <= capacity:
                break
    else:
        batch, memory = plan_for(args.device_batch_size)
    from picochat.train.flops import GPU_PEAK_FLOPS

    peak = dict(GPU_PEAK_FLOPS)[gpu.peak_key]
    tokens = batch.num_iterations * batch.total_batch_size
    flops = batch.flops_per_token * tokens
    hours = flops / (world_size * peak * args.mfu) / 3600
    return {
        "gpu": gpu,
        "world_size": world_size,
        "batch": batch,
        "tokens": tokens,
        "flops": flops,
        "peak": peak,
        "hours": hours,
        "cost": hours * world_size * args.price,
        "memory": memory,
        "capacity": capacity,
        "fits": sum(memory.values()) <= capacity,
    }


def format_plan(args: argparse.Namespace, plan: dict[str, Any]) -> str:
    b, gpu, mem = plan["batch"], plan["gpu"], plan["memory"]
    gib = {k: v / GIB for k, v in mem.items()}
    total = sum(gib.values())
    fmt = f"{total:.1f} GiB of {gpu.memory_gib:.1f} GiB"
    parts = " + ".join(f"{kind} {size:.1f}" for kind, size in gib.items())
    return "\n".join(
        [
            f"plan: depth {args.depth} on {args.nodes} x {args.nproc} {gpu.name}, context {args.max_seq_len}",
            f"  parameters        {b.num_params / 1e6:,.0f}M ({b.scaling_params / 1e6:,.0f}M scaling: "
            "all but the embedding tables)",
            f"  tokens            {plan['tokens'] / 1e9:,.2f}B = {b.num_iterations:,} steps x "
            f"{b.total_batch_size:,} tokens (ratio {args.target_param_data_ratio:g} x scaling parameters)",
            f"  batch per GPU     {b.device_batch_size} rows x {args.max_seq_len} tokens, "
            f"{b.grad_accum_steps} micro-batch(es) per step",
            f"  FLOPs             {plan['flops']:.3g} ({b.flops_per_token:.3g} per token)",
            f"  time              {plan['hours']:.2f} h at {args.mfu:.0%} MFU of {plan['peak'] / 1e12:.0f} "
            "TFLOP/s bf16 per GPU (training steps only)",
            f"  memory per GPU    {parts} = {fmt}: {'fits' if plan['fits'] else 'DOES NOT FIT'}",
            f"  cost              ${plan['cost']:,.0f} at ${args.price:.2f} per GPU-hour "
            f"({plan['world_size']} GPUs)",
        ]
    )


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Plan a base-training run before renting GPUs: parameters, tokens, FLOPs, hours at a "
        "stated MFU, memory per GPU (and whether it fits) and cost. Uses the same rules as "
        "`picochat train base` with the same flags.",
    )
    p.add_argument("--depth", type=int, default=26, help="transformer layers (default: 26, the speedrun's)")
    p.add_argument("--nproc", type=int, default=8, help="GPUs per node (default: 8)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default: 1)")
    p.add_argument("--gpu", default="h100", help=f"GPU model: {', '.join(GPUS)} (default: h100)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context length (default: 2048)")
    p.add_argument(
        "--device-batch-size",
        type=int,
        default=-1,
        help="rows per GPU per micro-batch; -1 = the largest power of two up to 32 that fits (default)",
    )
    p.add_argument(
        "--total-batch-size", type=int, default=-1, help="tokens per step; -1 = the trainer's rule (default)"
    )
    p.add_argument(
        "--target-param-data-ratio",
        type=float,
        default=20.0,
        help="training tokens per scaling parameter, as `train base` (default: 20)",
    )
    p.add_argument(
        "--vocab-size", type=int, default=65536, help="tokenizer size (default: 65536, the speedrun's)"
    )
    p.add_argument("--aspect-ratio", type=int, default=64, help="model width = depth * aspect ratio")
    p.add_argument("--head-dim", type=int, default=64, help="dimension of each attention head")
    p.add_argument(
        "--mfu",
        type=float,
        default=DEFAULT_MFU,
        help=f"assumed model FLOPs utilisation (default: {DEFAULT_MFU})",
    )
    p.add_argument(
        "--price", type=float, default=None, help="$ per GPU-hour (default: a typical price per GPU)"
    )
    p.add_argument(
        "--check", action="store_true", help="exit with an error if the run does not fit in memory"
    )
    # The model's extras change its parameters (value embeddings, a bigram table), so memory too.
    flags.add_architecture_args(p.add_argument_group("architecture (as train base; its defaults)"))
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.price is None:
        args.price = GPUS[args.gpu].price if args.gpu in GPUS else 0.0
    plan = make_run_plan(args)
    print(format_plan(args, plan), flush=True)
    if args.check and not plan["fits"]:
        need = sum(plan["memory"].values()) / GIB
        raise PicochatError(
            f"device batch {plan['batch'].device_batch_size} needs about {need:.0f} GiB per GPU but the "
            f"{plan['gpu'].name} has {plan['gpu'].memory_gib:.0f}; lower --device-batch-size (halve it: "
            "gradient accumulation keeps the update the same; for runs/speedrun.sh set DEVICE_BATCH_SIZE)"
        )
    return 0


if __name__ == "__main__":
    run_cli(main)
