"""Base pretraining: `picochat train base` (or `torchrun --nproc_per_node=N -m picochat.train.base`).

One dial, `--depth`, sizes the whole run (every derived value can be overridden and is printed as a
table at start):
  - width  = depth * aspect_ratio (64), rounded up to a multiple of head_dim (64); heads = width / head_dim;
    kv heads = heads;
  - learning rates: nanochat's values; `GPT.setup_optimizers` scales the AdamW ones by (width/768)^-0.5;
  - data horizon = target_param_data_ratio (20, Chinchilla) * scaling parameters, where, as in nanochat,
    the scaling parameters are all parameters except the token embedding table(s) (transformer matrices
    + lm_head + the few scalars): embedding lookups cost no FLOPs and fit the scaling laws worse.
    One horizon rule wins: --num-iterations, else --target-flops (training FLOPs / (FLOPs per token *
    total batch) steps), else the ratio;
  - total batch size (tokens per optimiser step) from nanochat's power-line rule B ~ D^0.383 anchored at
    2^19 tokens for a d12 model, divided by CPU_BATCH_DIVISOR on CPU, where a run is limited by compute
    long before its data horizon and more, smaller steps learn more per second (picochat.train.sizing).
`--device-batch-size` only trades memory for gradient-accumulation steps: the update is the same.
The optimiser, schedule, data and systems switches (--muon-weight-decay, --ns, --packing, ...) and
which of them are on by default are measured in docs/recipe.md (bench/recipe.py).

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
import gc
import math
from typing import Any

import torch

from picochat.checkpoint import checkpoint_dir_for
from picochat.common import PicochatError, compute_dtype, distributed_runtime, print0, run_cli
from picochat.train import flags
from picochat.train.loop import Evaluation, Trainer, accumulate_gradients, wrap_model
from picochat.train.schedule import (
    REF_BATCH_TOKENS,
    batch_lr_scale,
    batch_weight_decay,
    muon_momentum,
    weight_decay_multiplier,
)
from picochat.train.sizing import BATCH_POWER, CPU_BATCH_DIVISOR, make_plan, model_shape, reference_tokens

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
    m.add_argument(
        "--mlp-init-scale", type=flags.positive(float), default=0.4,
        help="the MLP input projection's initial weights are this times the attention projections' "
        "(0.4, measured in docs/recipe.md; 1 = the same)",
    )  # fmt: skip
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
    flags.add_horizon_args(b, "from --target-flops, else --target-param-data-ratio (the first rule set wins)")
    b.add_argument(
        "--target-flops",
        type=float,
        default=-1.0,
        help="training FLOPs of the run (FLOPs per token as logged, times tokens); used when "
        "--num-iterations is -1, and wins over --target-param-data-ratio; -1 = off",
    )
    b.add_argument(
        "--target-param-data-ratio",
        type=float,
        default=20.0,
        help="training tokens per scaling parameter (20 = Chinchilla); the horizon when neither "
        "--num-iterations nor --target-flops is set",
    )
    o = g["optimisation"]
    flags.add_optim_args(o, init_lr_frac=None, matrix_lr=0.025)  # adopted (docs/recipe.md)
    flags.add_recipe_args(o)
    o.add_argument("--warmup-ratio", type=float, default=0.0, help="fraction of steps of LR warm-up")
    o.add_argument(
        "--warmdown-ratio", type=float, default=0.4, help="fraction of steps of LR warm-down (adopted: 0.4)"
    )
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
# The run


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = flags.parse(build_parser(prog), argv)
    try:
        with distributed_runtime(args.device_type) as (rank, world_size, device):
            BaseTrainer(args, rank, world_size, device).run()
    finally:  # --gc freeze must not outlive the run (tests and notebooks call main in-process)
        gc.unfreeze()
        gc.enable()
    return 0


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
            **flags.architecture_config(args, args.max_seq_len),
        )
        torch.manual_seed(args.seed)
        with torch.device("meta"):
            self.model = GPT(self.config)
        flags.check_memory(self.model, device, BYTES_PER_PARAM)
        self.model.to_empty(device=device)
        self.model.init_weights(mlp_init_scale=args.mlp_init_scale)
        self.plan = make_plan(args, self.model, self.config.vocab_size, world_size, device.type)
        self.flops_per_token = self.plan.flops_per_token
        self.schedule = (args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac, args.warmup_steps)
        self.optimizers = self._optimizers()
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
            packing=args.packing,
            prefetch=args.prefetch == "on",
        )
        self.batches = iter(self.train_loader)
        self.train_model = wrap_model(self.model, world_size, self.use_compile)
        self.samples: list[str] = []

    def _optimizers(self) -> list[torch.optim.Optimizer]:
        """The model's Muon + AdamW, with the batch-size rules and Muon's switches applied."""
        from picochat.optim import configure_muon

        args, plan = self.args, self.plan
        scaled = args.batch_scaling == "on"
        lr_scale = batch_lr_scale(plan.total_batch_size) if scaled else 1.0
        optimizers = self.model.setup_optimizers(
            unembedding_lr=args.unembedding_lr * lr_scale,
            embedding_lr=args.embedding_lr * lr_scale,
            matrix_lr=args.matrix_lr * lr_scale,
            weight_decay=args.weight_decay,
        )
        wd = args.muon_weight_decay
        if scaled:
            tokens = plan.num_iterations * plan.total_batch_size
            ref_tokens = reference_tokens(args, self.config.vocab_size)
            wd = batch_weight_decay(wd, plan.total_batch_size, tokens, ref_tokens)
        self.muon_weight_decay = wd
        configure_muon(optimizers, ns=args.ns, weight_decay=wd, normuon_beta2=args.normuon_beta2)
        return optimizers

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
            ("target tokens", plan.target_tokens, self._horizon_rule()),
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
            ("training FLOPs", plan.flops_per_token * plan.num_iterations * plan.total_batch_size, "steps"),
            (
                "eval_tokens",
                plan.eval_steps * plan.device_batch_size * args.max_seq_len * self.world_size,
                _how(args, "eval_tokens", -1, "10 * total batch"),
            ),
        ]
        lr_rule = "flag, width-scaled by the model"
        if args.batch_scaling == "on":
            lr_rule += f", * sqrt(batch / {REF_BATCH_TOKENS})"
        rows += [
            (f"lr {type(opt).__name__}[{i}]", float(group["initial_lr"]), lr_rule)
            for opt in self.optimizers
            for i, group in enumerate(opt.param_groups)
        ]
        rows.append(("Muon weight decay", self.muon_weight_decay, "--muon-weight-decay, --batch-scaling"))
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

    def _horizon_rule(self) -> str:
        if self.args.num_iterations > 0:
            return f"{self.args.target_param_data_ratio:g} * scaling parameters (unused: --num-iterations)"
        if self.args.target_flops > 0:
            return "--target-flops / FLOPs per token"
        return f"{self.args.target_param_data_ratio:g} * scaling parameters"

    # -- the stage's hooks

    def forward_backward(self) -> tuple[float, int]:
        result = accumulate_gradients(self.train_model, self.batches, self.plan.grad_accum_steps)
        if self.args.gc == "freeze" and gc.isenabled():
            # Everything alive now (model, optimiser state, modules) lives to the end: freezing moves
            # it out of the collector's sight, and disabling it stops the pauses its passes cost.
            # Reference counting still frees the steps' tensors; main() re-enables it.
            gc.collect()
            gc.freeze()
            gc.disable()
        return result

    def momentum(self, step: int) -> float:
        args = self.args
        return muon_momentum(
            step,
            self.state.horizon,
            args.muon_momentum,
            args.muon_momentum_warmup,
            args.muon_momentum_final,
            args.warmdown_ratio,
        )

    def weight_decay(self, step: int) -> float:
        return weight_decay_multiplier(step, self.state.horizon)

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
