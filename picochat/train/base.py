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
import dataclasses
import math
from typing import Any

import torch

from picochat.checkpoint import checkpoint_dir_for
from picochat.common import PicochatError, compute_dtype, distributed_runtime, print0, run_cli
from picochat.train import flags
from picochat.train.loop import Evaluation, Trainer, accumulate_gradients, wrap_model

# Batch-size rule: nanochat's d12 reference at a Chinchilla horizon uses 2^19 tokens per step.
REF_DEPTH = 12
REF_BATCH_TOKENS = 2**19
BATCH_POWER = 0.383
CPU_BATCH_DIVISOR = 64
MUON_MOMENTUM_WARMUP_STEPS = 300
BYTES_PER_PARAM = 16  # fp32 weights + gradients + two optimiser moments: the least a step needs


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
    g = flags.groups(p)
    g["input and output"].add_argument(
        "--source",
        default=None,
        help="pretraining shards: bundled (default), hub (`picochat download`) or a folder",
    )
    g["input and output"].add_argument(
        "--model-tag", default=None, help="checkpoint folder name (default: d<depth>)"
    )
    m = g["model"]
    m.add_argument("--depth", type=int, default=4, help="number of transformer layers: the one size dial")
    m.add_argument("--aspect-ratio", type=int, default=64, help="model width = depth * aspect ratio")
    m.add_argument("--head-dim", type=int, default=64, help="dimension of each attention head")
    m.add_argument("--n-kv-head", type=int, default=-1, help="key/value heads (GQA); -1 = as many as heads")
    m.add_argument("--max-seq-len", type=int, default=512, help="context length in tokens")
    m.add_argument("--seed", type=int, default=42, help="random seed of the initial weights")
    flags.add_architecture_args(m)
    b = g["batch and horizon"]
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
    flags.add_horizon_args(b, "from --target-param-data-ratio")
    b.add_argument(
        "--target-param-data-ratio",
        type=float,
        default=20.0,
        help="training tokens per scaling parameter (20 = Chinchilla)",
    )
    o = g["optimisation"]
    flags.add_optim_args(o, init_lr_frac=None)
    o.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of LR warm-up")
    o.add_argument("--warmdown-ratio", type=float, default=0.2, help="fraction of steps of LR warm-down")
    o.add_argument(
        "--final-lr-frac", type=float, default=0.0, help="LR at the end, as a fraction of the peak"
    )
    e = g["evaluation, logging and checkpoints"]
    flags.add_output_args(e, "base", eval_every=100, save_every=500)
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
    r = g["runtime"]
    flags.add_runtime_args(r)
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


def muon_momentum(step: int) -> float:
    """Muon momentum ramps from 0.85 to 0.95 over the first steps (as in nanochat)."""
    frac = min(step / MUON_MOMENTUM_WARMUP_STEPS, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


# ---------------------------------------------------------------------------------------------
# The run


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = flags.parse(build_parser(prog), argv)
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


class BaseTrainer(Trainer):
    """Pretraining: a fresh model from the flags, token rows from the corpus, bpb / CORE / samples."""

    stage = "base"

    def __init__(self, args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> None:
        from picochat.dataloader import TokenBatchLoader
        from picochat.gpt import GPT, GPTConfig
        from picochat.tokenizer import get_token_bytes, get_tokenizer

        model_tag = args.model_tag or f"d{args.depth}"
        super().__init__(
            args, rank, world_size, device, checkpoint_dir_for("base", model_tag), args.run or model_tag
        )
        self.model_tag = model_tag
        self.tokenizer = get_tokenizer()
        self.token_bytes = get_token_bytes(device)
        shape = model_shape(args.depth, args.aspect_ratio, args.head_dim, args.n_kv_head)
        self.config = GPTConfig(
            sequence_len=args.max_seq_len,
            vocab_size=self.tokenizer.get_vocab_size(),
            **shape,
            **flags.architecture_config(args),
        )
        torch.manual_seed(args.seed)
        with torch.device("meta"):
            self.model = GPT(self.config)
        flags.check_memory(self.model, device, BYTES_PER_PARAM)
        self.model.to_empty(device=device)
        self.model.init_weights()
        self.plan = make_plan(args, self.model, self.config.vocab_size, world_size, device.type)
        self.flops_per_token = self.plan.flops_per_token
        self.schedule = (args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
        self.optimizers = self.model.setup_optimizers(
            unembedding_lr=args.unembedding_lr,
            embedding_lr=args.embedding_lr,
            matrix_lr=args.matrix_lr,
            weight_decay=args.weight_decay,
        )
        self.start(self.plan.num_iterations)
        loader_state = self._restore() if self.resumed else None
        self.use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
        self.dtype = compute_dtype(device.type)
        _print_table(self._table())
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
        self.samples: list[str] = []

    def _restore(self) -> Any:
        """Restore the checkpoint after checking that it is this model and batch; return the loader state."""
        return self.restore(check=self._check_resume)

    def _check_resume(self, meta: dict[str, Any]) -> None:
        saved_config, saved_total = meta.get("model_config"), meta.get("plan", {}).get("total_batch_size")
        if saved_config != dataclasses.asdict(self.config):
            raise PicochatError(
                f"cannot resume: {meta['path']} holds a different model ({saved_config}) from the one "
                f"these flags describe ({dataclasses.asdict(self.config)}); use the run's original flags"
            )
        if saved_total != self.plan.total_batch_size:
            raise PicochatError(
                f"cannot resume with a total batch of {self.plan.total_batch_size} tokens: the run used "
                f"{saved_total}; pass --total-batch-size {saved_total}"
            )

    def _table(self) -> list[tuple[str, Any, str]]:
        from picochat.gpt import architecture_extras

        args, plan, config = self.args, self.plan, self.config
        cpu_note = f", /{CPU_BATCH_DIVISOR} on CPU" if self.device.type == "cpu" else ""
        rows = [
            ("depth (n_layer)", args.depth, "--depth"),
            ("model_dim (n_embd)", config.n_embd, f"depth * {args.aspect_ratio}, in whole heads"),
            ("n_head", config.n_head, f"model_dim / head_dim {args.head_dim}"),
            ("n_kv_head", config.n_kv_head, _how(args, "n_kv_head", -1, "= n_head")),
            ("vocab_size", config.vocab_size, "tokenizer"),
            (
                "architecture extras",
                ", ".join(f"{k}={v}" for k, v in architecture_extras(config).items()) or "none (plain)",
                "model flags",
            ),
            ("rope_theta", config.rope_theta, "--rope-theta"),
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
            ("peak FLOP/s per process", self.peak, self.peak_source),
        ]
        return rows

    # -- the stage's hooks

    def forward_backward(self) -> tuple[float, int]:
        return accumulate_gradients(self.train_model, self.batches, self.plan.grad_accum_steps)

    def momentum(self, step: int) -> float:
        return muon_momentum(step)

    def data_state(self) -> dict[str, Any]:
        return self.train_loader.state_dict()

    def evaluations(self) -> list[Evaluation]:
        args = self.args
        return [
            Evaluation(args.eval_every, self.evaluate_bpb),
            Evaluation(args.core_metric_every, self.evaluate_core),
            Evaluation(args.sample_every, self.sample, at_start=False),
        ]

    def evaluate_bpb(self) -> dict[str, float]:
        from picochat.common import autocast_context
        from picochat.dataloader import TokenBatchLoader
        from picochat.evals.bpb import evaluate_bpb

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
        return {"val_bpb": bpb, "min_val_bpb": min(self.state.figures.get("min_val_bpb", math.inf), bpb)}

    def evaluate_core(self) -> dict[str, float]:
        from picochat.evals.core import evaluate_core

        self.model.eval()
        max_per_task = self.args.core_metric_max_per_task
        result = evaluate_core(self.model, self.tokenizer, self.device, max_per_task)
        self.model.train()
        return {"core": result["core"]}

    def sample(self) -> dict[str, Any]:
        from picochat.common import autocast_context
        from picochat.evals.samples import SAMPLE_PROMPTS, SAMPLE_TOKENS, sample_greedy

        if self.rank != 0:
            return {}
        self.model.eval()
        with autocast_context(self.device):
            self.samples = [
                sample_greedy(self.model, self.tokenizer, prompt, SAMPLE_TOKENS, self.device)
                for prompt in SAMPLE_PROMPTS
            ]
        self.model.train()
        self.progress.write("\n".join(f"  {s!r}" for s in self.samples))
        return {"samples": self.samples}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"plan": dataclasses.asdict(self.plan), "val_bpb": self.state.figures.get("val_bpb")}

    def summary_extra(self) -> dict[str, Any]:
        self.train_loader.close()
        figures = self.state.figures
        return {
            "model_config": dataclasses.asdict(self.config),
            **dataclasses.asdict(self.plan),
            "final_val_bpb": figures.get("val_bpb"),
            "min_val_bpb": figures.get("min_val_bpb"),
            "core_metric": figures.get("core"),
            "samples": self.samples,
        }


if __name__ == "__main__":
    run_cli(main)
