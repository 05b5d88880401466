"""Base pretraining: `picochat train base` (or `torchrun --nproc_per_node=N -m picochat.train.base`).

One dial, `--depth`, sizes the whole run (every derived value can be overridden and is printed as a
table at start):
  - width  = depth * aspect_ratio (64), rounded up to a multiple of head_dim (64); heads = width / head_dim;
    kv heads = heads;
  - learning rates: nanochat's values; `GPT.setup_optimizers` scales the AdamW ones by (width/768)^-0.5;
  - data horizon = target_param_data_ratio (20, Chinchilla) * scaling parameters, where, as in nanochat,
    the scaling parameters are all parameters except the token embedding table(s) (transformer matrices
    + lm_head + the few scalars): embedding lookups cost no FLOPs and fit the scaling laws worse;
  - total batch size (tokens per optimiser step) from nanochat's power-line rule B ~ D^0.383 anchored at
    2^19 tokens for a d12 model, divided by CPU_BATCH_DIVISOR on CPU, where a run is limited by compute
    long before its data horizon and more, smaller steps learn more per second.
`--device-batch-size` only trades memory for gradient-accumulation steps: the update is the same.

The loop: gradient accumulation, warm-up / constant / warm-down learning rate, Muon momentum warm-up,
validation bits per byte and greedy samples every N steps, a tqdm bar (loss, tokens/s, MFU, ETA),
metrics as JSON lines in $PICOCHAT_HOME/runs/<run>/metrics.jsonl (and wandb with --run), checkpoints
that `--resume` continues from exactly, and a report section at the end. `--max-minutes` turns the run
into a time budget: the schedule's horizon becomes the number of steps that fit, so the warm-down still
happens before the clean finish (final eval, samples, checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from picochat.checkpoint import (
    capture_rng_state,
    check_resume,
    checkpoint_dir_for,
    load_checkpoint,
    restore_optimizers,
    restore_rng_state,
    save_checkpoint,
)
from picochat.common import (
    PicochatError,
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    autocast_context,
    compute_dtype,
    distributed_runtime,
    get_base_dir,
    print0,
    run_cli,
    synchronize,
)
from picochat.evals.bpb import evaluate_bpb
from picochat.evals.samples import SAMPLE_PROMPTS, SAMPLE_TOKENS, sample_greedy
from picochat.optim import Muon
from picochat.report import record

# Batch-size rule: nanochat's d12 reference at a Chinchilla horizon uses 2^19 tokens per step.
REF_DEPTH = 12
REF_BATCH_TOKENS = 2**19
BATCH_POWER = 0.383
CPU_BATCH_DIVISOR = 64
MUON_MOMENTUM_WARMUP_STEPS = 300
EMA_BETA = 0.9  # smoothing of the displayed training loss
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


# ---------------------------------------------------------------------------------------------
# Arguments


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Pretrain a GPT from scratch on the pretraining corpus. --depth sets the model size and, "
        "from it, the width, heads, learning rates, batch size and training horizon (printed at start; "
        "every derived value has its own flag). Defaults suit a small CPU; on GPUs use e.g. "
        "--depth 20 --max-seq-len 2048 --device-batch-size 32.",
    )
    m = p.add_argument_group("model")
    m.add_argument("--depth", type=int, default=4, help="number of transformer layers: the one size dial")
    m.add_argument("--aspect-ratio", type=int, default=64, help="model width = depth * aspect ratio")
    m.add_argument("--head-dim", type=int, default=64, help="dimension of each attention head")
    m.add_argument("--n-kv-head", type=int, default=-1, help="key/value heads (GQA); -1 = as many as heads")
    m.add_argument("--max-seq-len", type=int, default=512, help="context length in tokens")
    b = p.add_argument_group("batch and horizon")
    b.add_argument(
        "--device-batch-size",
        type=int,
        default=-1,
        help="rows per forward pass per process (only changes gradient accumulation); -1 = auto",
    )
    b.add_argument(
        "--total-batch-size",
        type=int,
        default=-1,
        help="tokens per optimiser step over all processes; -1 = derived from depth",
    )
    b.add_argument(
        "--num-iterations",
        type=int,
        default=-1,
        help="optimiser steps; -1 = from --target-param-data-ratio",
    )
    b.add_argument(
        "--target-param-data-ratio",
        type=float,
        default=20.0,
        help="training tokens per scaling parameter (20 = Chinchilla)",
    )
    b.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop after this many minutes of training (counting earlier segments of a resumed run) and "
        "finish cleanly; the LR warm-down is fitted into the budget. 0 = no limit",
    )
    o = p.add_argument_group("optimisation")
    o.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW LR of the token embedding")
    o.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW LR of the lm_head")
    o.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR of the transformer matrices")
    o.add_argument("--weight-decay", type=float, default=0.0, help="weight decay of the AdamW groups")
    o.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    o.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of LR warm-up")
    o.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps of LR warm-down")
    o.add_argument(
        "--final-lr-frac", type=float, default=0.0, help="LR at the end, as a fraction of the peak"
    )
    o.add_argument("--seed", type=int, default=42, help="random seed of the initial weights")
    e = p.add_argument_group("evaluation, logging and checkpoints")
    e.add_argument("--eval-every", type=int, default=100, help="validation bpb every N steps (0 = end only)")
    e.add_argument(
        "--eval-tokens", type=int, default=-1, help="validation tokens per eval; -1 = 10 total batches"
    )
    e.add_argument(
        "--core-metric-every",
        type=int,
        default=-1,
        help="CORE score (bundled tasks) every N steps and at the end; -1 = never (run `picochat eval base`)",
    )
    e.add_argument(
        "--core-metric-max-per-task", type=int, default=500, help="items per CORE task during training"
    )
    e.add_argument("--sample-every", type=int, default=200, help="print samples every N steps (0 = end only)")
    e.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (0 = end only)")
    e.add_argument("--keep-last", type=int, default=0, help="keep only the last K checkpoints (0 = all)")
    e.add_argument(
        "--run", default=None, help="run name: metrics folder name, and logs to wandb if installed"
    )
    e.add_argument("--model-tag", default=None, help="checkpoint folder name (default: d<depth>)")
    e.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint of this model tag"
    )
    e.add_argument(
        "--overwrite", action="store_true", help="start afresh even if this model tag already has checkpoints"
    )
    r = p.add_argument_group("runtime")
    r.add_argument("--device-type", default="", help="cuda | cpu | mps (default: autodetect)")
    r.add_argument(
        "--source",
        default=None,
        help="pretraining shards: bundled (default), hub (`picochat download`) or a folder",
    )
    r.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="torch.compile the model; auto = on for CUDA only (it does not pay off on CPU)",
    )
    return p


# ---------------------------------------------------------------------------------------------
# The depth dial


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


def lr_multiplier(
    step: int, horizon: int, warmup_ratio: float, warmdown_ratio: float, final_frac: float
) -> float:
    """Linear warm-up to 1, constant, then linear warm-down to final_frac over the last steps."""
    warmup = round(warmup_ratio * horizon)
    warmdown = round(warmdown_ratio * horizon)
    if step < warmup:
        return (step + 1) / warmup
    if step <= horizon - warmdown or warmdown == 0:
        return 1.0
    progress = max(0.0, (horizon - step) / warmdown)
    return progress + (1 - progress) * final_frac


def muon_momentum(step: int) -> float:
    """Muon momentum ramps from 0.85 to 0.95 over the first steps (as in nanochat)."""
    frac = min(step / MUON_MOMENTUM_WARMUP_STEPS, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


# ---------------------------------------------------------------------------------------------
# Throughput


def peak_flops(device: torch.device) -> tuple[float, str]:
    """Peak FLOP/s of one process's device: a table for known GPUs, otherwise a quick matmul benchmark."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS:
            if key in name:
                return flops, f"{name} (datasheet bf16)"
        return measure_matmul_flops(device, torch.bfloat16, 4096), f"{name} (measured bf16 matmul)"
    return measure_matmul_flops(device, torch.float32, 1024), f"{device.type} (measured fp32 matmul)"


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first round warms up
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------------------------
# One optimiser step, evaluation and samples


def train_step(
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    batches: Any,
    grad_accum: int,
    lr_mult: float,
    momentum: float,
    grad_clip: float,
    autocast: Any,
) -> float:
    """Accumulate gradients over `grad_accum` batches, clip, step every optimiser; return the mean loss.

    When distributed, `model` is wrapped in DistributedDataParallel (see `wrap_model`): it averages the
    gradients over ranks during the last micro-batch's backward (overlapped with it), so every rank
    steps with the same gradients, as picochat.optim expects. The returned loss is averaged over ranks.
    """
    loss_sum = torch.zeros((), device=next(model.parameters()).device)
    for micro in range(grad_accum):
        inputs, targets = next(batches)
        skip_sync = isinstance(model, DDP) and micro < grad_accum - 1
        with model.no_sync() if skip_sync else contextlib.nullcontext():
            with autocast:
                loss = model(inputs, targets)
            (loss / grad_accum).backward()
        loss_sum += loss.detach()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(loss_sum)
        loss_sum /= dist.get_world_size()
    params = [p for p in model.parameters() if p.grad is not None]
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
            if isinstance(opt, Muon):
                group["momentum"] = momentum
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss_sum.item() / grad_accum


def wrap_model(model: torch.nn.Module, world_size: int, compile_model: bool) -> torch.nn.Module:
    """The module the loop calls: DDP when distributed, then torch.compile if asked."""
    if world_size > 1:
        model = DDP(model)
    return torch.compile(model, dynamic=False) if compile_model else model


# ---------------------------------------------------------------------------------------------
# The run


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    with distributed_runtime(args.device_type) as (rank, world_size, device):
        BaseTrainer(args, rank, world_size, device).run()
    return 0


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
    target_tokens = args.target_param_data_ratio * num_scaling
    total = args.total_batch_size
    if total == -1:
        ref_shape = model_shape(REF_DEPTH, args.aspect_ratio, args.head_dim)
        ref_tokens = args.target_param_data_ratio * _ref_scaling_params(ref_shape, vocab_size)
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
        flops_per_token=float(model.estimate_flops()),
        target_tokens=int(target_tokens),
    )


def _ref_scaling_params(shape: dict[str, int], vocab_size: int) -> int:
    """Scaling parameters of the d12 reference model (built on the meta device: no memory, no time)."""
    from picochat.gpt import GPT, GPTConfig

    with torch.device("meta"):
        ref = GPT(GPTConfig(sequence_len=1, vocab_size=vocab_size, **shape))
    return scaling_params(ref)


def _how(args: argparse.Namespace, name: str, default: Any, rule: str) -> str:
    """'--flag' when the user set it, else the rule that derived it (for the start-up table)."""
    return "--" + name.replace("_", "-") if getattr(args, name) != default else rule


def _print_table(rows: list[tuple[str, Any, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(_fmt(r[1])) for r in rows)
    print0(f"{'setting':<{width}}  {'value':>{vwidth}}  how it was set")
    for name, value, how in rows:
        print0(f"{name:<{width}}  {_fmt(value):>{vwidth}}  {how}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


@dataclasses.dataclass
class LoopState:
    """Everything besides weights, optimiser and data position that a resumed run must continue."""

    step: int = 0
    smooth_loss: float = 0.0
    min_val_bpb: float = float("inf")
    last_val_bpb: float = float("nan")
    train_seconds: float = 0.0  # wall clock spent in the loop, summed over resumed segments
    horizon: int = 0  # the step the schedule ends at (moves with --max-minutes)
    last_core: float | None = None  # with --core-metric-every


class BaseTrainer:
    """One pretraining run: set-up from the flags (or a checkpoint), the loop, and its outputs."""

    def __init__(self, args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> None:
        from picochat.dataloader import TokenBatchLoader
        from picochat.gpt import GPT, GPTConfig
        from picochat.tokenizer import get_token_bytes, get_tokenizer

        self.args, self.rank, self.world_size, self.device = args, rank, world_size, device
        self.model_tag = args.model_tag or f"d{args.depth}"
        self.ckpt_dir = checkpoint_dir_for("base", self.model_tag)
        self.run_dir = get_base_dir() / "runs" / (args.run or self.model_tag)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.resumed = check_resume(self.ckpt_dir, args.resume, args.overwrite)

        self.tokenizer = get_tokenizer()
        self.token_bytes = get_token_bytes(device)
        shape = model_shape(args.depth, args.aspect_ratio, args.head_dim, args.n_kv_head)
        self.config = GPTConfig(
            sequence_len=args.max_seq_len, vocab_size=self.tokenizer.get_vocab_size(), **shape
        )
        torch.manual_seed(args.seed)
        with torch.device("meta"):
            self.model = GPT(self.config)
        self.model.to_empty(device=device)
        self.model.init_weights()
        self.plan = make_plan(args, self.model, self.config.vocab_size, world_size, device.type)
        self.optimizers = self.model.setup_optimizers(
            unembedding_lr=args.unembedding_lr,
            embedding_lr=args.embedding_lr,
            matrix_lr=args.matrix_lr,
            weight_decay=args.weight_decay,
        )
        self.state = LoopState(horizon=self.plan.num_iterations)
        loader_state = self._restore() if self.resumed else None

        self.use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
        self.dtype = compute_dtype(device.type)
        self.peak, peak_source = peak_flops(device)
        _print_table(self._table(peak_source))
        self.train_loader = TokenBatchLoader(
            self.tokenizer,
            self.plan.device_batch_size,
            args.max_seq_len,
            "train",
            device,
            args.source,
            rank,
            world_size,
            loader_state,
        )
        self.batches = iter(self.train_loader)
        self.train_model = wrap_model(self.model, world_size, self.use_compile)
        self.wandb = _init_wandb(args, rank, {**vars(args), **dataclasses.asdict(self.plan)})
        self.samples: list[str] = []
        self.mfus: list[float] = []

    # -- set-up helpers

    def _restore(self) -> Any:
        """Load the latest checkpoint into model, optimisers, RNG and loop state; return the loader state."""
        ckpt = load_checkpoint(self.ckpt_dir, device=self.device)
        saved_config, saved_plan = ckpt.meta.get("model_config"), ckpt.meta.get("plan", {})
        if saved_config != dataclasses.asdict(self.config):
            raise PicochatError(
                f"cannot resume: {ckpt.meta['path']} holds a different model ({saved_config}) from the one "
                f"these flags describe ({dataclasses.asdict(self.config)}); use the run's original flags"
            )
        saved_total = saved_plan.get("total_batch_size")
        if saved_total != self.plan.total_batch_size:
            raise PicochatError(
                f"cannot resume with a total batch of {self.plan.total_batch_size} tokens: the run used "
                f"{saved_total}; pass --total-batch-size {saved_total}"
            )
        self.model.load_state_dict(ckpt.model_state)
        restore_optimizers(self.optimizers, ckpt)
        rank_state = ckpt.meta["rank_state"] or {}
        if "rng" in rank_state:
            restore_rng_state(rank_state["rng"])
        self.state = LoopState(**ckpt.meta["loop"])
        if not self.args.max_minutes:
            self.state.horizon = self.plan.num_iterations  # --num-iterations may extend a finished run
        print0(f"resuming from {ckpt.meta['path']} (step {self.state.step})")
        if self.rank == 0:
            trim_metrics(self.metrics_path, self.state.step)
        return rank_state.get("loader")

    def _table(self, peak_source: str) -> list[tuple[str, Any, str]]:
        args, plan, config = self.args, self.plan, self.config
        cpu_note = f", /{CPU_BATCH_DIVISOR} on CPU" if self.device.type == "cpu" else ""
        rows = [
            ("depth (n_layer)", args.depth, "--depth"),
            ("model_dim (n_embd)", config.n_embd, f"depth * {args.aspect_ratio}, in whole heads"),
            ("n_head", config.n_head, f"model_dim / head_dim {args.head_dim}"),
            ("n_kv_head", config.n_kv_head, _how(args, "n_kv_head", -1, "= n_head")),
            ("vocab_size", config.vocab_size, "tokenizer"),
            ("max_seq_len", args.max_seq_len, _how(args, "max_seq_len", 512, "default")),
            ("parameters", plan.num_params, "all"),
            ("scaling parameters", plan.scaling_params, "all but the token embeddings"),
            ("FLOPs per token", plan.flops_per_token, "model.estimate_flops()"),
            ("target tokens", plan.target_tokens, f"{args.target_param_data_ratio:g} * scaling parameters"),
            (
                "total_batch_size",
                plan.total_batch_size,
                _how(args, "total_batch_size", -1, f"power line B ~ D^{BATCH_POWER}{cpu_note}"),
            ),
            (
                "device_batch_size",
                plan.device_batch_size,
                _how(args, "device_batch_size", -1, "largest divisor <= 32"),
            ),
            ("grad_accum_steps", plan.grad_accum_steps, "total / (device batch * seq len * processes)"),
            ("processes", self.world_size, "torchrun"),
            (
                "num_iterations",
                plan.num_iterations,
                _how(args, "num_iterations", -1, "target tokens / total batch"),
            ),
            (
                "eval_tokens",
                plan.eval_steps * plan.device_batch_size * args.max_seq_len * self.world_size,
                _how(args, "eval_tokens", -1, "10 * total batch"),
            ),
        ]
        rows += [
            (f"lr {type(opt).__name__}[{i}]", float(group["initial_lr"]), "flag, width-scaled by the model")
            for opt in self.optimizers
            for i, group in enumerate(opt.param_groups)
        ]
        rows += [
            ("max_minutes", args.max_minutes or "none", "--max-minutes"),
            (
                "dtype",
                str(self.dtype).removeprefix("torch."),
                "autocast" if self.dtype != torch.float32 else "",
            ),
            ("torch.compile", self.use_compile, f"--compile {args.compile}"),
            ("peak FLOP/s per process", self.peak, peak_source),
        ]
        return rows

    # -- the loop

    def run(self) -> dict[str, Any]:
        args, state = self.args, self.state
        budget = args.max_minutes * 60
        start_step, start_seconds = state.step, state.train_seconds
        if not self.resumed:
            start_afresh(self.rank, self.ckpt_dir, self.metrics_path)
        loop_t0 = time.time() - start_seconds
        bar = tqdm(
            total=state.horizon, initial=state.step, disable=self.rank != 0, unit="step", dynamic_ncols=True
        )
        while True:
            state.train_seconds = time.time() - loop_t0
            if budget:
                state.train_seconds = synced_max(state.train_seconds, self.world_size, self.device)
                if state.step > start_step:  # refit the horizon to the steps that fit in the budget
                    per_step = (state.train_seconds - start_seconds) / (state.step - start_step)
                    fit = state.step + int(max(0.0, budget - state.train_seconds) / per_step)
                    state.horizon = bar.total = min(self.plan.num_iterations, fit)
            last = state.step >= state.horizon or (budget > 0 and state.train_seconds >= budget)
            handled = self.resumed and state.step == start_step  # evaluated and saved before the kill
            if not handled and (last or every(args.eval_every, state.step)):
                self.evaluate()
            core_due = args.core_metric_every > 0 and (last or every(args.core_metric_every, state.step))
            if not handled and core_due:
                self.evaluate_core()
            if not handled and (last or (state.step > 0 and every(args.sample_every, state.step))):
                self.sample()
            if not handled and (last or every(args.save_every, state.step)) and state.step > 0:
                self.save()
            if last:
                break
            self.step()
            bar.set_postfix(
                loss=f"{self.shown_loss:.3f}",
                tok_s=f"{self.tok_per_sec:,.0f}",
                mfu=f"{self.mfu:.1f}%",
                refresh=False,
            )
            bar.update(1)
        bar.close()
        return self.finish()

    def step(self) -> None:
        args, state = self.args, self.state
        synchronize(self.device)
        t0 = time.time()
        lrm = lr_multiplier(
            state.step, state.horizon, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac
        )
        loss = train_step(
            self.train_model,
            self.optimizers,
            self.batches,
            self.plan.grad_accum_steps,
            lrm,
            muon_momentum(state.step),
            args.grad_clip,
            autocast_context(self.device),
        )
        synchronize(self.device)
        dt = time.time() - t0
        state.step += 1
        state.smooth_loss = EMA_BETA * state.smooth_loss + (1 - EMA_BETA) * loss
        self.shown_loss = state.smooth_loss / (1 - EMA_BETA**state.step)  # debiased EMA
        self.tok_per_sec = self.plan.total_batch_size / dt
        self.mfu = (
            100 * self.plan.flops_per_token * self.plan.total_batch_size / dt / (self.peak * self.world_size)
        )
        self.mfus.append(self.mfu)
        self.log(
            {
                "step": state.step,
                "kind": "train",
                "loss": loss,
                "smooth_loss": self.shown_loss,
                "lr_mult": lrm,
                "dt": dt,
                "tok_per_sec": self.tok_per_sec,
                "mfu": self.mfu,
                "train_seconds": state.train_seconds,
            }
        )

    def evaluate(self) -> None:
        from picochat.dataloader import TokenBatchLoader

        args = self.args
        val_loader = TokenBatchLoader(
            self.tokenizer,
            self.plan.device_batch_size,
            args.max_seq_len,
            "val",
            self.device,
            args.source,
            self.rank,
            self.world_size,
        )
        self.train_model.eval()
        with val_loader, autocast_context(self.device):
            bpb = evaluate_bpb(self.train_model, iter(val_loader), self.plan.eval_steps, self.token_bytes)
        self.train_model.train()
        self.state.last_val_bpb, self.state.min_val_bpb = bpb, min(self.state.min_val_bpb, bpb)
        if self.rank == 0:
            tqdm.write(f"step {self.state.step:6d} | val bpb {bpb:.4f}")
        self.log(
            {
                "step": self.state.step,
                "kind": "val",
                "val_bpb": bpb,
                "train_seconds": self.state.train_seconds,
            }
        )

    def evaluate_core(self) -> None:
        from picochat.evals.core import evaluate_core

        self.model.eval()
        max_per_task = self.args.core_metric_max_per_task
        result = evaluate_core(
            self.model, self.tokenizer, self.device, max_per_task if max_per_task > 0 else None
        )
        self.model.train()
        self.state.last_core = result["core"]
        if self.rank == 0:
            tqdm.write(f"step {self.state.step:6d} | CORE {result['core']:.4f}")
        self.log({"step": self.state.step, "kind": "core", "core": result["core"]})

    def sample(self) -> None:
        if self.rank != 0:
            return
        self.model.eval()
        with autocast_context(self.device):
            self.samples = [
                sample_greedy(self.model, self.tokenizer, prompt, SAMPLE_TOKENS, self.device)
                for prompt in SAMPLE_PROMPTS
            ]
        self.model.train()
        tqdm.write("\n".join(f"  {s!r}" for s in self.samples))
        self.log({"step": self.state.step, "kind": "samples", "samples": self.samples})

    def save(self) -> None:
        meta = {
            "model_config": dataclasses.asdict(self.config),
            "plan": dataclasses.asdict(self.plan),
            "train_config": vars(self.args),
            "loop": dataclasses.asdict(self.state),
            "val_bpb": self.state.last_val_bpb,
        }
        save_checkpoint(
            self.ckpt_dir,
            self.state.step,
            self.model.state_dict(),
            [opt.state_dict() for opt in self.optimizers],
            meta,
            rank_state={"loader": self.train_loader.state_dict(), "rng": capture_rng_state()},
            shard_optim=any(getattr(opt, "sharded_state", False) for opt in self.optimizers),
            keep_last=self.args.keep_last or None,
        )

    def log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        append_jsonl(self.metrics_path, record)
        if self.wandb is not None:
            self.wandb.log(
                {k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"]
            )

    def finish(self) -> dict[str, Any]:
        self.train_loader.close()
        state, plan = self.state, self.plan
        steady = self.mfus[3:] or self.mfus  # the first steps include warm-up (allocation, compilation)
        summary = {
            "model_tag": self.model_tag,
            "model_config": dataclasses.asdict(self.config),
            **dataclasses.asdict(plan),
            "processes": self.world_size,
            "steps": state.step,
            "tokens": state.step * plan.total_batch_size,
            "train_minutes": state.train_seconds / 60,
            "final_val_bpb": state.last_val_bpb,
            "min_val_bpb": state.min_val_bpb,
            "core_metric": state.last_core,
            "mfu_percent": sum(steady) / len(steady) if steady else None,
            "device": self.device.type,
            "samples": self.samples,
            "metrics": str(self.metrics_path),
            "checkpoint_dir": str(self.ckpt_dir),
        }
        if self.rank == 0:
            record("base", summary)
            atomic_write_json(self.run_dir / "summary.json", summary)
            print0(
                f"done: {state.step} steps in {state.train_seconds / 60:.1f} min, val bpb "
                f"{state.last_val_bpb:.4f} (min {state.min_val_bpb:.4f}); checkpoints in {self.ckpt_dir}"
            )
        if self.wandb is not None:
            self.wandb.finish()
        return summary


def every(n: int, step: int) -> bool:
    return n > 0 and step % n == 0


def start_afresh(rank: int, ckpt_dir: Path, metrics_path: Path) -> None:
    """A new run replaces the old run's metrics and (with --overwrite) its checkpoints."""
    barrier()  # every rank has looked for checkpoints before rank 0 deletes them
    if rank == 0:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        metrics_path.unlink(missing_ok=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def synced_max(seconds: float, world_size: int, device: torch.device) -> float:
    """The same elapsed time on every rank (the slowest one's), so that all ranks stop at the same step."""
    if world_size == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=device)  # NCCL reduces GPU tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (the killed run's lost steps)."""
    if not path.exists():
        return
    kept = [
        line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step
    ]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _init_wandb(args: argparse.Namespace, rank: int, config: dict[str, Any]) -> Any:
    if not args.run or rank != 0:
        return None
    try:
        import wandb
    except ImportError:
        print0("note: --run given but wandb is not installed; metrics go to metrics.jsonl only")
        return None
    return wandb.init(project="picochat", name=args.run, config=config)


if __name__ == "__main__":
    run_cli(main)
