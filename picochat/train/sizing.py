"""The depth dial of base pretraining: model shape, scaling parameters, batch size and horizon.

The rules (the values `picochat train base` prints at start; each has a flag that overrides it):
  - width  = depth * aspect_ratio, rounded up to a multiple of head_dim; heads = width / head_dim;
  - scaling parameters = all parameters but the token embedding table(s), as in nanochat;
  - horizon: --num-iterations, else --target-flops / (FLOPs per token * total batch), else
    target_param_data_ratio * scaling parameters / total batch (the first rule set wins);
  - total batch from nanochat's power line B ~ D^0.383 anchored at 2^19 tokens for d12, divided by
    CPU_BATCH_DIVISOR on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch

from picochat.common import PicochatError
from picochat.train.schedule import REF_BATCH_TOKENS

REF_DEPTH = 12  # nanochat's d12 reference at a Chinchilla horizon uses 2^19 tokens per step
BATCH_POWER = 0.383
CPU_BATCH_DIVISOR = 64


def model_shape(depth: int, aspect_ratio: int, head_dim: int, n_kv_head: int = -1) -> dict[str, int]:
    """Width, heads and kv heads for a depth: width = depth*aspect_ratio rounded up to whole heads."""
    if depth < 1 or aspect_ratio < 1 or head_dim < 1:
        raise PicochatError("--depth, --aspect-ratio and --head-dim must be positive")
    n_head = max(1, math.ceil(depth * aspect_ratio / head_dim))
    n_kv_head = n_head if n_kv_head == -1 else n_kv_head
    if n_kv_head < 1 or n_head % n_kv_head:
        raise PicochatError(f"--n-kv-head {n_kv_head} must divide the number of heads ({n_head})")
    return {"n_layer": depth, "n_embd": n_head * head_dim, "n_head": n_head, "n_kv_head": n_kv_head}


def scaling_params(model: torch.nn.Module) -> int:
    """Parameters that count for the data horizon: all but the token embedding table(s)."""
    embedding = sum(
        p.numel() for mod in model.modules() if isinstance(mod, torch.nn.Embedding) for p in mod.parameters()
    )
    return sum(p.numel() for p in model.parameters()) - embedding


def default_total_batch(target_tokens: float, ref_target_tokens: float, device_type: str) -> int:
    """Tokens per step: B = 2^19 * (D / D_d12)^0.383, as a power of two (divided down on CPU)."""
    batch = REF_BATCH_TOKENS * (target_tokens / ref_target_tokens) ** BATCH_POWER
    if device_type == "cpu":
        batch /= CPU_BATCH_DIVISOR
    return 2 ** round(math.log2(batch))


def batch_plan(total: int, device_batch: int, seq_len: int, world_size: int) -> tuple[int, int, int]:
    """(total_batch, device_batch, grad_accum): total = device_batch * seq_len * world_size * accum."""
    rows_per_rank, rem = divmod(total, seq_len * world_size)
    if total < 1 or rem:
        raise PicochatError(
            f"--total-batch-size {total} must be a positive multiple of max_seq_len * processes = "
            f"{seq_len} * {world_size} = {seq_len * world_size}"
        )
    if device_batch == -1:  # the largest power of two up to 32 rows that divides a rank's share
        device_batch = math.gcd(rows_per_rank, 32)
    if device_batch < 1 or rows_per_rank % device_batch:
        raise PicochatError(
            f"--device-batch-size {device_batch} must divide the {rows_per_rank} rows each process handles "
            f"per step (total batch {total} = rows * max_seq_len {seq_len} * {world_size} processes); "
            "pick a divisor, or change --total-batch-size"
        )
    return total, device_batch, rows_per_rank // device_batch


@dataclasses.dataclass
class Plan:
    """The values derived from --depth (or overridden by flags) that the loop runs with."""

    total_batch_size: int
    device_batch_size: int
    grad_accum_steps: int
    num_iterations: int
    eval_steps: int
    num_params: int
    scaling_params: int
    flops_per_token: float
    target_tokens: int


def make_plan(
    args: argparse.Namespace, model: torch.nn.Module, vocab_size: int, world_size: int, device_type: str
) -> Plan:
    """Batch size, horizon and eval size for this model (the rules are in the module docstring)."""
    seq_len = args.max_seq_len
    num_scaling = scaling_params(model)
    flops_per_token = float(model.estimate_flops())
    if args.target_flops > 0 and args.num_iterations <= 0:
        target_tokens = args.target_flops / flops_per_token
    else:
        target_tokens = args.target_param_data_ratio * num_scaling
    total = args.total_batch_size
    if total == -1:
        ref_tokens = reference_tokens(args, vocab_size)
        unit = seq_len * world_size  # whole rows on every process
        total = max(1, round(default_total_batch(target_tokens, ref_tokens, device_type) / unit)) * unit
    total, device_batch, grad_accum = batch_plan(total, args.device_batch_size, seq_len, world_size)
    num_iterations = args.num_iterations if args.num_iterations > 0 else max(1, int(target_tokens // total))
    eval_tokens = args.eval_tokens if args.eval_tokens > 0 else 10 * total
    return Plan(
        total_batch_size=total,
        device_batch_size=device_batch,
        grad_accum_steps=grad_accum,
        num_iterations=num_iterations,
        eval_steps=max(1, eval_tokens // (device_batch * seq_len * world_size)),
        num_params=sum(p.numel() for p in model.parameters()),
        scaling_params=num_scaling,
        flops_per_token=flops_per_token,
        target_tokens=int(target_tokens),
    )


def reference_tokens(args: argparse.Namespace, vocab_size: int) -> float:
    """The d12 reference's horizon at this run's tokens-per-parameter ratio (the batch-size rules)."""
    ref_shape = model_shape(REF_DEPTH, args.aspect_ratio, args.head_dim)
    return args.target_param_data_ratio * _ref_scaling_params(ref_shape, vocab_size)


def _ref_scaling_params(shape: dict[str, int], vocab_size: int) -> int:
    """Scaling parameters of the d12 reference model (built on the meta device: no memory, no time)."""
    from picochat.gpt import GPT, GPTConfig

    with torch.device("meta"):
        ref = GPT(GPTConfig(sequence_len=1, vocab_size=vocab_size, **shape))
    return scaling_params(ref)
