"""The one training loop that base, mid, SFT and RL run: state, resume/save, cadence, logs and summary.

A stage subclasses `Trainer` and supplies only what is its own:
  - its model, optimisers, flops per token and LR schedule (set in its __init__);
  - `forward_backward()`: the gradients of one optimiser step (returns the step's loss and tokens);
  - `evaluations()`: what to measure, and how often;
  - `data_state()` / the `data` it gets back from `restore()`: where its batches continue;
  - `checkpoint_meta()` and `summary_extra()`: what its checkpoints and report section add.
The loop does the rest the same way for every stage: LR and momentum of the step, gradient clipping
(and its norm), a clear stop when the loss is not finite, `--max-minutes` (the schedule's horizon
refitted to the steps that fit, from the slowest rank's clock, so the warm-down still happens), checkpoints
every `--save-every` steps that `--resume` continues exactly (weights, optimisers, data position, RNG,
this state), step lines with loss, tokens/s, MFU, LR, gradient norm and ETA (a bar on a terminal, plain
lines when stdout is a file or pipe: every `--log-every` steps, by default ~50 per run and one every
30 s at least), metrics.jsonl, wandb with `--run`, and the summary (summary.json and the report section).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from picochat.checkpoint import (
    capture_rng_state,
    check_resume,
    load_checkpoint,
    restore_optimizers,
    restore_rng_state,
    save_checkpoint,
    verified_config,
)
from picochat.common import (
    PicochatError,
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    autocast_context,
    get_base_dir,
    print0,
    synchronize,
)
from picochat.optim import Muon
from picochat.report import record
from picochat.train.flops import peak_flops, raise_peak
from picochat.train.progress import Progress, format_duration, show_figure
from picochat.train.schedule import lr_multiplier

EMA_BETA = 0.9  # smoothing of the displayed training loss
IGNORE = -1  # target value the loss skips


@dataclasses.dataclass
class LoopState:
    """Everything besides weights, optimisers, data position and RNG that a resumed run continues."""

    step: int = 0
    horizon: int = 0  # the step the schedule ends at (moves with --max-minutes)
    planned: int = 0  # the horizon the flags asked for
    train_seconds: float = 0.0  # wall clock spent in the loop, summed over resumed segments
    smooth_loss: float = 0.0  # EMA of the training loss (debiased when shown)
    tokens: int = 0  # tokens trained on so far, over all ranks
    flops: float = 0.0  # training FLOPs so far (tokens x the stage's FLOPs per token), for the report
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)  # latest evaluation results


class Evaluation(NamedTuple):
    """A measurement the loop makes every `every` steps and at the end (0 = end only, < 0 = never)."""

    every: int
    run: Callable[[], dict[str, Any]]  # returns the figures (logged, kept in LoopState.figures)
    at_start: bool = True  # also at step 0


# ---------------------------------------------------------------------------------------------
# One optimiser step (pure functions, used by the trainers and by the DDP tests)


def ddp_module(model: torch.nn.Module) -> DDP | None:
    """The DistributedDataParallel wrapper inside `model`, if any (torch.compile keeps it as _orig_mod)."""
    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, DDP) else None


def sync_gradients(model: torch.nn.Module, sync: bool) -> Any:
    """Context for one backward pass: DDP all-reduces only when `sync` (the step's last micro-batch)."""
    ddp = ddp_module(model)
    return ddp.no_sync() if ddp is not None and not sync else contextlib.nullcontext()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def accumulate_gradients(model: torch.nn.Module, batches: Iterator, grad_accum: int) -> tuple[float, int]:
    """Gradients of the token-weighted mean loss over `grad_accum` micro-batches on every rank.

    Every target token of the step (all micro-batches, all ranks) weighs the same, so the device batch
    size changes only memory, never the update, even when micro-batches hold different numbers of
    target tokens (masked chat rows). DDP averages gradients over ranks, hence the world-size factor.
    Returns (mean loss over the step's tokens, number of target tokens over all ranks).
    """
    device = next(model.parameters()).device
    micro = [next(batches) for _ in range(grad_accum)]
    tokens = all_reduce_sum(torch.stack([(t != IGNORE).sum() for _, t in micro]).sum().double())
    world = dist.get_world_size() if dist.is_initialized() else 1
    num_tokens = int(tokens.item())
    scale = world / max(1, num_tokens)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, (inputs, targets) in enumerate(micro):
        with sync_gradients(model, sync=i == grad_accum - 1):
            with autocast_context(device):
                loss = model(inputs, targets, loss_reduction="sum")
            (loss * scale).backward()
        loss_sum += loss.detach().double()
    return all_reduce_sum(loss_sum).item() / max(1, num_tokens), num_tokens


def optimizer_step(
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    lr_mult: float,
    momentum: float | None,
    grad_clip: float,
    wd_mult: float = 1.0,
) -> float:
    """Clip the gradients (0 = no clipping), set LR, Muon momentum and Muon weight decay (its initial
    value times `wd_mult`), step, zero; return the grad norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
            if isinstance(opt, Muon):
                group["weight_decay"] = group.get("initial_weight_decay", group["weight_decay"]) * wd_mult
                if momentum is not None:
                    group["momentum"] = momentum
        opt.step()
    model.zero_grad(set_to_none=True)
    return float(norm)


def wrap_model(model: torch.nn.Module, world_size: int, compile_model: bool) -> torch.nn.Module:
    """The module the loop calls: DDP when distributed, then torch.compile if asked."""
    if world_size > 1:
        model = DDP(model)
    return torch.compile(model, dynamic=False) if compile_model else model


def every(n: int, step: int) -> bool:
    return n > 0 and step % n == 0


def synced_max(seconds: float, world_size: int, device: torch.device) -> float:
    """The same elapsed time on every rank (the slowest one's), so that all ranks stop at the same step."""
    if world_size == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=device)  # NCCL reduces GPU tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


# ---------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """One run of a stage. Subclasses set the attributes listed in __init__ and supply the hooks."""

    stage = ""  # checkpoint stage and report section: "base" | "mid" | "sft" | "rl"

    def __init__(
        self,
        args: argparse.Namespace,
        rank: int,
        world_size: int,
        device: torch.device,
        ckpt_dir: Path,
        run_name: str,
    ) -> None:
        self.args, self.rank, self.world_size, self.device = args, rank, world_size, device
        self.ckpt_dir = ckpt_dir
        self.run_dir = get_base_dir() / "runs" / run_name
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.dry_run = getattr(args, "dry_run", False)
        self.resumed = check_resume(ckpt_dir, args.resume, args.overwrite or self.dry_run)
        # Set by the subclass:
        self.model: torch.nn.Module
        self.train_model: torch.nn.Module  # what the step calls (DDP / compiled)
        self.optimizers: list[torch.optim.Optimizer] = []
        self.flops_per_token = 0.0  # training FLOPs per token, for MFU
        self.schedule = (0.0, 0.0, 0.0)  # (warm-up ratio, warm-down ratio, final LR fraction)
        self.state = LoopState()
        self.mfus: list[float] = []
        self.peak, self.peak_source = peak_flops(device)
        self.wandb: Any = None
        self.model_tag = ""
        self.step_extra: dict[str, Any] = {}  # stage figures of the last step (RL: reward), logged with it
        self.step_fields: dict[str, str] = {}  # the last step's line

    # -- hooks

    def forward_backward(self) -> tuple[float, int]:
        """Accumulate the gradients of one step; return (loss, tokens trained on over all ranks)."""
        raise NotImplementedError

    def evaluations(self) -> list[Evaluation]:
        return []

    def momentum(self, step: int) -> float | None:
        """Muon momentum at a step (None = leave the optimiser's own)."""
        return None

    def weight_decay(self, step: int) -> float:
        """Multiplier of the Muon weight decay at a step (1 = constant)."""
        return 1.0

    def data_state(self) -> dict[str, Any] | None:
        """This rank's data position, saved in checkpoints and handed back by `restore`."""
        return None

    def checkpoint_meta(self) -> dict[str, Any]:
        return {}

    def summary_extra(self) -> dict[str, Any]:
        return {}

    # -- set-up

    def start(self, horizon: int) -> None:
        """A fresh run's state; call before `restore` (which replaces it) when resuming."""
        self.state = LoopState(horizon=horizon, planned=horizon)

    def restore(
        self,
        weights_from: dict[str, Any] | None = None,
        check: Callable[[dict[str, Any]], None] | None = None,
    ) -> Any:
        """Continue the latest checkpoint: optimisers, RNG and loop state, after `check(meta)`; return
        this rank's data position.

        `weights_from` is the meta of the checkpoint the stage already built its model from (mid, SFT
        and RL load it with `load_model`): only its optimiser state is read then, so a resume reads the
        weights once. Without it (base) the weights are loaded into the model here, after the same
        weights/meta.json agreement check `load_model` makes.
        """
        planned = self.state.planned
        if weights_from is not None:
            ckpt = load_checkpoint(self.ckpt_dir, weights_from["step"], self.device, load_weights=False)
        else:
            ckpt = load_checkpoint(self.ckpt_dir, device=self.device)
            verified_config(ckpt)
        if check is not None:
            check(ckpt.meta)
        if weights_from is None:
            self.model.load_state_dict(ckpt.model_state)
        restore_optimizers(self.optimizers, ckpt)
        rank_state = ckpt.meta.get("rank_state")
        if rank_state is None:
            raise PicochatError(
                f"{ckpt.meta['path']} was saved by {ckpt.meta.get('world_size')} processes; "
                "resume with as many"
            )
        restore_rng_state(rank_state["rng"])
        known = {f.name for f in dataclasses.fields(LoopState)}
        self.state = LoopState(**{k: v for k, v in ckpt.meta["loop"].items() if k in known})
        if self.args.num_iterations > 0 and not self.args.max_minutes:
            self.state.horizon = self.state.planned = planned  # --num-iterations may extend a run
        print0(f"resuming from {ckpt.meta['path']} (step {self.state.step})")
        if self.rank == 0:
            trim_metrics(self.metrics_path, self.state.step)
        return rank_state.get("data")

    # -- the loop

    def run(self) -> dict[str, Any]:
        args, state = self.args, self.state
        budget = args.max_minutes * 60
        start_step, start_seconds = state.step, state.train_seconds
        if not self.resumed and not self.dry_run:
            start_afresh(self.rank, self.ckpt_dir, self.metrics_path)
        self.wandb = _init_wandb(args, self.rank, self.stage)
        self.progress = Progress(state, self.rank == 0, args.log_every)
        loop_t0 = time.time() - start_seconds
        while True:
            state.train_seconds = time.time() - loop_t0
            if budget:
                state.train_seconds = synced_max(state.train_seconds, self.world_size, self.device)
                if state.step > start_step:  # refit the horizon to the steps that fit in the budget
                    per_step = (state.train_seconds - start_seconds) / (state.step - start_step)
                    fit = state.step + int(max(0.0, budget - state.train_seconds) / per_step)
                    state.horizon = min(state.planned, fit)
            last = state.step >= state.horizon or (budget > 0 and state.train_seconds >= budget)
            if not (self.resumed and state.step == start_step):  # else done before the stop
                self.evaluate(last)
                if state.step > 0 and (last or every(args.save_every, state.step)):
                    self.save()
            if last:
                break
            self.step()
            state.train_seconds = time.time() - loop_t0
            done = state.step - start_step
            eta = (state.horizon - state.step) * (state.train_seconds - start_seconds) / max(1, done)
            if budget:  # the horizon is refitted to the budget from the second step on
                eta = min(eta, max(0.0, budget - state.train_seconds))
            self.progress.step(state, self.step_fields, eta)
        self.progress.close()
        return self.finish()

    def evaluate(self, last: bool) -> None:
        step = self.state.step
        for ev in self.evaluations():
            due = last or (every(ev.every, step) and (step > 0 or ev.at_start))
            if ev.every < 0 or not due:
                continue
            figures = ev.run()
            self.state.figures.update(figures)
            shown = ", ".join(f"{k} {show_figure(v)}" for k, v in figures.items() if not isinstance(v, list))
            if shown:
                self.progress.write(f"step {step:6d} | {shown}")
            row = {"step": step, "kind": "eval", **figures, "tokens": self.state.tokens}
            self.log({**row, "flops": self.state.flops, "train_seconds": self.state.train_seconds})

    def step(self) -> None:
        """One optimiser step with its log line."""
        state = self.state
        synchronize(self.device)
        t0 = time.time()
        lrm = lr_multiplier(state.step, state.horizon, *self.schedule)
        loss, tokens = self.forward_backward()
        if not math.isfinite(loss):
            raise PicochatError(
                f"the training loss became {loss} at step {state.step + 1}; lower the learning rates "
                "(e.g. --matrix-lr, --init-lr-frac) or --grad-clip, and --resume from the last checkpoint"
            )
        grad_norm = optimizer_step(
            self.train_model,
            self.optimizers,
            lrm,
            self.momentum(state.step),
            self.args.grad_clip,
            self.weight_decay(state.step),
        )
        synchronize(self.device)
        dt = time.time() - t0
        state.step += 1
        state.tokens += tokens
        state.flops += tokens * self.flops_per_token
        state.smooth_loss = EMA_BETA * state.smooth_loss + (1 - EMA_BETA) * loss
        shown_loss = state.smooth_loss / (1 - EMA_BETA**state.step)  # debiased EMA
        tok_per_sec = tokens / dt
        achieved = self.flops_per_token * tok_per_sec / self.world_size  # FLOP/s per process
        peak, self.peak_source = raise_peak(self.device, achieved, self.peak, self.peak_source)
        if peak != self.peak:
            print0(f"peak FLOP/s raised: {self.peak_source}")
            self.peak = peak
        mfu = 100 * (achieved / self.peak)  # achieved <= peak: at most 100 exactly (100 * a / a is not)
        self.mfus.append(mfu)
        self.step_fields = {
            "loss": f"{shown_loss:.4f}",
            "lr": f"{lrm:.3f}",
            "grad norm": f"{grad_norm:.3f}",
            "tok/s": f"{tok_per_sec:,.0f}",
            "tokens": f"{state.tokens:,}",
            "FLOPs": f"{state.flops:.3g}",
            "MFU": f"{mfu:.2f}% of {self.peak / 1e12:.3g} TFLOP/s",  # the peak used (its source at start)
        }
        row = {"step": state.step, "kind": "train", "loss": loss, "smooth_loss": shown_loss, "lr_mult": lrm}
        row |= {"grad_norm": grad_norm, "dt": dt, "tok_per_sec": tok_per_sec, "mfu": mfu}
        row |= {"tokens": state.tokens, "flops": state.flops}
        self.log({**row, **self.step_extra, "train_seconds": state.train_seconds})

    def save(self) -> None:
        if self.dry_run:
            return
        meta = {
            "model_config": dataclasses.asdict(self.model.config),
            "train_config": vars(self.args),
            "loop": dataclasses.asdict(self.state),
            **self.checkpoint_meta(),
        }
        save_checkpoint(
            self.ckpt_dir,
            self.state.step,
            self.model.state_dict(),
            [opt.state_dict() for opt in self.optimizers],
            meta,
            rank_state={"data": self.data_state(), "rng": capture_rng_state()},
            keep_last=self.args.keep_last or None,
        )

    def log(self, row: dict[str, Any]) -> None:
        if self.rank != 0 or self.dry_run:
            return
        append_jsonl(self.metrics_path, row)
        if self.wandb is not None:
            numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
            self.wandb.log({f"{row['kind']}/{k}": v for k, v in numbers.items()}, step=row["step"])

    def finish(self) -> dict[str, Any]:
        state = self.state
        steady = self.mfus[3:] or self.mfus  # the first steps include warm-up (allocation, compilation)
        summary = {
            "model_tag": self.model_tag,
            **self.summary_extra(),
            "processes": self.world_size,
            "device": self.device.type,
            "steps": state.step,
            "tokens": state.tokens,
            "flops": state.flops,
            "flops_per_token": self.flops_per_token,
            "train_minutes": state.train_seconds / 60,
            "mfu_percent": sum(steady) / len(steady) if steady else None,
            "peak_flops": self.peak,
            "peak_flops_source": self.peak_source,
            "metrics": str(self.metrics_path),
            "checkpoint_dir": str(self.ckpt_dir),
        }
        if self.rank == 0:
            if not self.dry_run:
                record(self.stage, summary)
                atomic_write_json(self.run_dir / "summary.json", summary)
            shown = ", ".join(
                f"{k} {show_figure(v)}" for k, v in state.figures.items() if isinstance(v, (int, float))
            )
            print0(f"done: {state.step} steps in {format_duration(state.train_seconds)}; {shown}")
            print0(f"checkpoints in {self.ckpt_dir}")
        if self.wandb is not None:
            self.wandb.finish()
        return summary


def start_afresh(rank: int, ckpt_dir: Path, metrics_path: Path) -> None:
    """A new run replaces the old run's metrics and (with --overwrite) its checkpoints."""
    if dist.is_initialized():
        dist.barrier()  # every rank has looked for checkpoints before rank 0 deletes them
    if rank == 0:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        metrics_path.unlink(missing_ok=True)


def trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (the killed run's lost steps)."""
    if not path.exists():
        return
    kept = [
        line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step
    ]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _init_wandb(args: argparse.Namespace, rank: int, stage: str) -> Any:
    if not args.run or rank != 0:
        return None
    try:
        import wandb
    except ImportError:
        print0("note: --run given but wandb is not installed; metrics go to metrics.jsonl only")
        return None
    return wandb.init(project="picochat", name=args.run, group=stage, config=vars(args))
