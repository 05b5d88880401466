"""What mid-training and SFT share: conversation batches, the resumable training loop, evaluation, samples.

Both stages start from a checkpoint of an earlier stage (`-i`), train on a mixture of task conversations
with the chat loss mask (targets are -1, ignored, wherever the mask is 0: user turns, tool outputs,
special tokens the model does not write), and save their own checkpoints. They differ in how rows are
built and in the learning-rate schedule, which each stage module states in its `StageSpec`:
- mid-training packs conversations end to end into rows of T tokens like pretraining (`PackedRows`),
  and keeps the LR constant before a linear warm-down;
- SFT gives every row one whole conversation, padded to the longest of the batch (`PaddedRows`),
  and decays the LR linearly to 0.

Each rank reads every world_size-th conversation of the (deterministically shuffled) mixture. The
position of the row builder is saved in every checkpoint, so `--resume` continues exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from picochat.checkpoint import (
    capture_rng_state,
    check_resume,
    checkpoint_dir_for,
    find_model_tag,
    load_checkpoint,
    load_model,
    restore_optimizers,
    restore_rng_state,
    save_checkpoint,
)
from picochat.common import (
    PicochatError,
    append_jsonl,
    atomic_write_json,
    autocast_context,
    distributed_runtime,
    get_base_dir,
    print0,
)
from picochat.engine import Engine
from picochat.report import record
from picochat.tasks import GSM8K, Task
from picochat.train.base import (
    every,
    lr_multiplier,
    start_afresh,
    synced_max,
    train_step,
    trim_metrics,
    wrap_model,
)

IGNORE = -1  # target value the loss skips
SAMPLE_PROMPTS = [
    "Hi! Who are you?",
    "What is the capital of France?",
    "How many 'r' are there in the word strawberry?",
]

# ---------------------------------------------------------------------------------------------
# Rows


def render(tokenizer: Any, conversation: dict, max_tokens: int) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its loss mask, at most `max_tokens` long."""
    return tokenizer.render_conversation(conversation, max_tokens=max_tokens)


def shifted_targets(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets of (B, T+1) rows; targets are IGNORE where the mask is 0."""
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)
    return ids[:, :-1].contiguous(), targets.contiguous()


class ConversationRows:
    """Batches built from this rank's conversations (`indices` into the task), in order, looping over
    epochs. `state` is the position ({"epoch", "conv", "offset"}): save it, pass it back to resume."""

    def __init__(
        self,
        tokenizer: Any,
        conversations: Task,
        indices: list[int],
        batch_size: int,
        seq_len: int,
        device: torch.device,
        state: dict[str, int] | None = None,
    ) -> None:
        self.tokenizer, self.conversations, self.indices = tokenizer, conversations, indices
        self.batch_size, self.seq_len, self.device = batch_size, seq_len, device
        self.state = dict(state or {"epoch": 0, "conv": 0, "offset": 0})

    def __iter__(self) -> ConversationRows:
        return self

    def _advance(self) -> None:
        """Move on to the next conversation (the first one again after the last)."""
        self.state["conv"], self.state["offset"] = self.state["conv"] + 1, 0
        if self.state["conv"] == len(self.indices):
            self.state["epoch"], self.state["conv"] = self.state["epoch"] + 1, 0

    def _to_device(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = shifted_targets(ids, mask)
        return inputs.to(self.device), targets.to(self.device)


class PackedRows(ConversationRows):
    """(B, T) batches of conversations laid end to end, like pretraining rows (for mid-training).

    Rows overlap by one token, so every token is a target once.
    """

    _cached: tuple[int, tuple[list[int], list[int]]] | None = None

    def _rendered(self) -> tuple[list[int], list[int]]:
        conv = self.state["conv"]
        if self._cached is None or self._cached[0] != conv:
            example = self.conversations[self.indices[conv]]
            self._cached = (conv, render(self.tokenizer, example, 4 * self.seq_len))
        return self._cached[1]

    def _take(self, n: int, consume: bool = True) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []
        saved = dict(self.state)
        while len(ids) < n:
            conv_ids, conv_mask = self._rendered()
            start = self.state["offset"]
            end = min(len(conv_ids), start + n - len(ids))
            ids += conv_ids[start:end]
            mask += conv_mask[start:end]
            self.state["offset"] = end
            if end >= len(conv_ids):
                self._advance()
        if not consume:
            self.state = saved
        return ids, mask

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for _ in range(self.batch_size):
            ids, mask = self._take(self.seq_len)
            next_id, next_mask = self._take(1, consume=False)  # the row's last target
            rows.append((ids + next_id, mask + next_mask))
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long)
        mask = torch.tensor([r[1] for r in rows], dtype=torch.long)
        return self._to_device(ids, mask)


class PaddedRows(ConversationRows):
    """(B, L) batches of whole conversations (cut at T+1 tokens), right-padded to the batch's longest
    with IGNORE targets (for SFT)."""

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rendered = []
        for _ in range(self.batch_size):
            example = self.conversations[self.indices[self.state["conv"]]]
            rendered.append(render(self.tokenizer, example, self.seq_len + 1))
            self._advance()
        width = max(len(ids) for ids, _ in rendered)
        pad_id = self.tokenizer.encode_special("<|assistant_end|>")  # any id: padding is never a target
        ids = torch.full((len(rendered), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rendered), width), dtype=torch.long)
        for row, (conv_ids, conv_mask) in enumerate(rendered):
            ids[row, : len(conv_ids)] = torch.tensor(conv_ids)
            mask[row, : len(conv_mask)] = torch.tensor(conv_mask)
        return self._to_device(ids, mask)


# ---------------------------------------------------------------------------------------------
# What each stage states


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str  # "mid" | "sft": the checkpoint stage and report section written
    default_input: str  # the stage `-i` loads by default
    rows: type[ConversationRows]  # PackedRows | PaddedRows
    warmdown_ratio: float  # fraction of the steps over which the LR decays linearly to 0
    train_mixture: Callable[[str], Task]  # data source -> training conversations
    val_mixture: Callable[[str], Task]  # data source -> held-out conversations for the val loss
    grad_accum: Callable[
        [argparse.Namespace, int, int], int
    ]  # (args, processes, row length) -> micro-batches
    steps_per_pass: Callable[[Task, Any, int, int], int]  # (task, tokenizer, row length, rows per step)
    accuracy_every: bool = False  # SFT: quick ARC/GSM8K accuracy during training


def add_common_args(p: argparse.ArgumentParser, spec: StageSpec) -> None:
    """The flags both stages share (names as nanochat's)."""
    io = p.add_argument_group("input and output")
    io.add_argument(
        "-i",
        "--stage",
        default=spec.default_input,
        choices=("imported", "base", "mid", "sft"),
        help=f"stage of the checkpoint to start from (default: {spec.default_input})",
    )
    io.add_argument(
        "--model-tag", default=None, help="model tag to load and save under (default: the deepest d<N>)"
    )
    io.add_argument("--step", type=int, default=None, help="step of the input checkpoint (default: latest)")
    io.add_argument(
        "--source",
        choices=("bundled", "hub"),
        default="bundled",
        help="task data: bundled copies (offline) or the Hugging Face hub",
    )
    b = p.add_argument_group("batch and horizon")
    b.add_argument("--device-batch-size", type=int, default=8, help="rows per forward pass per process")
    b.add_argument(
        "--max-seq-len", type=int, default=-1, help="row length in tokens; -1 = the model's context"
    )
    b.add_argument(
        "--num-iterations", type=int, default=-1, help="optimiser steps; -1 = one pass over the data"
    )
    b.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop after this many minutes, LR decay fitted into the budget (0 = no limit)",
    )
    o = p.add_argument_group("optimisation")
    o.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW LR of the token embedding")
    o.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW LR of the lm_head")
    o.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR of the transformer matrices")
    o.add_argument("--weight-decay", type=float, default=0.0, help="weight decay of the AdamW groups")
    o.add_argument("--init-lr-frac", type=float, default=1.0, help="scale every LR above by this factor")
    o.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm (0 = off)")
    e = p.add_argument_group("evaluation, logging and checkpoints")
    e.add_argument("--eval-every", type=int, default=100, help="validation loss every N steps (0 = end only)")
    e.add_argument("--eval-batches", type=int, default=20, help="batches per rank in each validation loss")
    if spec.accuracy_every:
        e.add_argument(
            "--eval-metrics-every",
            type=int,
            default=0,
            help="ARC-Easy and GSM8K accuracy every N steps (0 = end only, -1 = never)",
        )
        e.add_argument("--eval-metrics-examples", type=int, default=50, help="questions per accuracy task")
    e.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0 = end only)")
    e.add_argument("--keep-last", type=int, default=0, help="keep only the last K checkpoints (0 = all)")
    e.add_argument("--run", default=None, help=f"metrics folder name (default: {spec.name}_<model tag>)")
    e.add_argument("--resume", action="store_true", help=f"continue the latest {spec.name} checkpoint")
    e.add_argument(
        "--overwrite",
        action="store_true",
        help=f"start afresh even if this model tag already has {spec.name} checkpoints",
    )
    e.add_argument("--dry-run", action="store_true", help="train but write no checkpoint or report")
    e.add_argument("--device-type", default="", help="cuda | cpu | mps (default: autodetect)")


def run_stage(spec: StageSpec, parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse the flags and run the stage on every rank."""
    args = parser.parse_args(argv)
    for name in ("device_batch_size", "eval_batches"):
        if getattr(args, name) < 1:
            raise PicochatError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("max_minutes", "eval_every", "save_every", "keep_last"):
        if getattr(args, name) < 0:
            raise PicochatError(f"--{name.replace('_', '-')} cannot be negative")
    with distributed_runtime(args.device_type) as (rank, world_size, device):
        ChatTrainer(spec, args, rank, world_size, device).run()
    return 0


# ---------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class LoopState:
    horizon: int
    step: int = 0
    train_seconds: float = 0.0
    val_loss: float | None = None
    accuracy: dict[str, float] = dataclasses.field(default_factory=dict)


class ChatTrainer:
    """One mid-training or SFT run: load the input (or the run to resume), train, evaluate, save."""

    def __init__(
        self, spec: StageSpec, args: argparse.Namespace, rank: int, world_size: int, device: torch.device
    ) -> None:
        self.spec, self.args, self.rank, self.world_size, self.device = spec, args, rank, world_size, device
        self.model_tag = args.model_tag or find_model_tag(args.stage)
        self.ckpt_dir = checkpoint_dir_for(spec.name, self.model_tag)
        self.run_dir = get_base_dir() / "runs" / (args.run or f"{spec.name}_{self.model_tag}")
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.resumed = check_resume(self.ckpt_dir, args.resume, args.overwrite or args.dry_run)
        stage, step = (spec.name, None) if self.resumed else (args.stage, args.step)
        self.model, self.tokenizer, meta = load_model(stage, self.model_tag, step, device, phase="train")
        # the checkpoint this run started from (a resumed run keeps its original input)
        started_from = {"stage": args.stage, "model_tag": self.model_tag, "step": meta["step"]}
        self.input = meta["input"] if self.resumed else started_from
        self.seq_len = args.max_seq_len if args.max_seq_len > 0 else self.model.config.sequence_len
        if self.seq_len > self.model.config.sequence_len:
            raise PicochatError(
                f"--max-seq-len {self.seq_len} is longer than the model's context "
                f"({self.model.config.sequence_len}); lower it"
            )
        self.train_task, self.val_task = spec.train_mixture(args.source), spec.val_mixture(args.source)
        self.grad_accum = spec.grad_accum(args, world_size, self.seq_len)
        horizon = args.num_iterations
        if horizon <= 0:
            rows_per_step = self.grad_accum * args.device_batch_size * world_size
            horizon = max(
                1, spec.steps_per_pass(self.train_task, self.tokenizer, self.seq_len, rows_per_step)
            )
        self.state = LoopState(horizon=horizon)
        self.planned = horizon
        scale = args.init_lr_frac
        self.optimizers = self.model.setup_optimizers(
            unembedding_lr=args.unembedding_lr * scale,
            embedding_lr=args.embedding_lr * scale,
            matrix_lr=args.matrix_lr * scale,
            weight_decay=args.weight_decay,
        )
        rows_state = self._restore() if self.resumed else None
        self.train_rows = self._rows(self.train_task, rows_state)
        self.train_model = wrap_model(self.model, world_size, compile_model=False)
        self.samples: list[dict[str, Any]] = []
        print0(
            f"{spec.name} from {self.input['stage']}/{self.model_tag} step {self.input['step']}: "
            f"{len(self.train_task):,} training conversations, {len(self.val_task):,} held out; "
            f"{self.state.horizon:,} steps of {self.grad_accum} x {args.device_batch_size} rows x "
            f"{world_size} processes, rows up to {self.seq_len} tokens"
        )

    def _rows(self, task: Task, state: dict[str, int] | None) -> Any:
        indices = list(range(self.rank, len(task), self.world_size))
        if not indices:
            raise PicochatError(
                f"no {self.spec.name} conversations for rank {self.rank}: the mixture is empty"
            )
        return self.spec.rows(
            self.tokenizer, task, indices, self.args.device_batch_size, self.seq_len, self.device, state
        )

    def _restore(self) -> dict[str, int]:
        ckpt = load_checkpoint(self.ckpt_dir, device=self.device)
        restore_optimizers(self.optimizers, ckpt)
        self.state = LoopState(**ckpt.meta["loop"])
        self.planned = ckpt.meta.get("planned", self.state.horizon)
        rank_state = ckpt.meta.get("rank_state") or {}
        if "rows" not in rank_state:
            raise PicochatError(f"{ckpt.meta['path']} was saved by a different number of processes")
        restore_rng_state(rank_state["rng"])
        print0(f"resuming from {ckpt.meta['path']} (step {self.state.step})")
        if self.rank == 0:
            trim_metrics(self.metrics_path, self.state.step)
        return rank_state["rows"]

    def run(self) -> dict[str, Any]:
        args, state = self.args, self.state
        budget = args.max_minutes * 60
        start_step, start_seconds = state.step, state.train_seconds
        if not self.resumed and not args.dry_run:
            start_afresh(self.rank, self.ckpt_dir, self.metrics_path)
        loop_t0 = time.time() - start_seconds
        bar = tqdm(
            total=state.horizon, initial=state.step, disable=self.rank != 0, unit="step", dynamic_ncols=True
        )
        while True:
            state.train_seconds = synced_max(time.time() - loop_t0, self.world_size, self.device)
            if budget and state.step > start_step:  # fit the remaining steps (and the LR decay) in the budget
                per_step = (state.train_seconds - start_seconds) / (state.step - start_step)
                fit = state.step + int(max(0.0, budget - state.train_seconds) / per_step)
                state.horizon = bar.total = min(self.planned, fit)
            last = state.step >= state.horizon
            handled = self.resumed and state.step == start_step  # evaluated and saved before the stop
            if not handled and (last or every(args.eval_every, state.step)):
                self.evaluate_loss()
            metrics_every = getattr(args, "eval_metrics_every", -1)
            accuracy_due = last or (state.step > 0 and every(metrics_every, state.step))
            if not handled and metrics_every >= 0 and accuracy_due:
                self.evaluate_accuracy()
            if not handled and state.step > 0 and (last or every(args.save_every, state.step)):
                self.save()
            if last:
                break
            lrm = lr_multiplier(state.step, state.horizon, 0.0, self.spec.warmdown_ratio, 0.0)
            t0 = time.time()
            loss = train_step(
                self.train_model,
                self.optimizers,
                self.train_rows,
                self.grad_accum,
                lrm,
                0.95,
                args.grad_clip,
                autocast_context(self.device),
            )
            state.step += 1
            self.log(
                {
                    "step": state.step,
                    "kind": "train",
                    "loss": loss,
                    "lr_mult": lrm,
                    "dt": time.time() - t0,
                    "train_seconds": state.train_seconds,
                }
            )
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.update(1)
        bar.close()
        return self.finish()

    @torch.no_grad()
    def evaluate_loss(self) -> None:
        """Mean loss on the held-out conversations (the same batches every time), averaged over ranks."""
        self.model.eval()
        rows = self._rows(self.val_task, None)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for _ in range(self.args.eval_batches):
            inputs, targets = next(rows)
            with autocast_context(self.device):
                losses = self.model(inputs, targets, loss_reduction="none")
            valid = targets != IGNORE
            total += torch.stack([losses[valid].double().sum(), valid.sum().double()])
        if self.world_size > 1:
            dist.all_reduce(total)
        self.model.train()
        self.state.val_loss = total[0].item() / max(1.0, total[1].item())
        if self.rank == 0:
            tqdm.write(f"step {self.state.step:5d} | val loss {self.state.val_loss:.4f}")
        self.log(
            {
                "step": self.state.step,
                "kind": "eval",
                "val_loss": self.state.val_loss,
                "train_seconds": self.state.train_seconds,
            }
        )

    def evaluate_accuracy(self) -> None:
        from picochat.evals.chat import run_chat_eval

        self.model.eval()
        result = run_chat_eval(
            self.model,
            self.tokenizer,
            ["ARC-Easy", "GSM8K"],
            self.args.eval_metrics_examples,
            self.args.source,
            max_new_tokens=256,
        )
        self.model.train()
        self.state.accuracy = {name: r["accuracy"] for name, r in result["tasks"].items()}
        if self.rank == 0:
            shown = ", ".join(f"{name} {acc:.4f}" for name, acc in self.state.accuracy.items())
            tqdm.write(f"step {self.state.step:5d} | {shown}")
        self.log({"step": self.state.step, "kind": "accuracy", **self.state.accuracy})

    def save(self) -> None:
        if self.args.dry_run:
            return
        meta = {
            "model_config": dataclasses.asdict(self.model.config),
            "train_config": vars(self.args),
            "loop": dataclasses.asdict(self.state),
            "planned": self.planned,
            "input": self.input,
        }
        save_checkpoint(
            self.ckpt_dir,
            self.state.step,
            self.model.state_dict(),
            [opt.state_dict() for opt in self.optimizers],
            meta,
            rank_state={"rows": dict(self.train_rows.state), "rng": capture_rng_state()},
            shard_optim=any(getattr(opt, "sharded_state", False) for opt in self.optimizers),
            keep_last=self.args.keep_last or None,
        )

    def log(self, row: dict[str, Any]) -> None:
        if self.rank == 0 and not self.args.dry_run:
            append_jsonl(self.metrics_path, row)

    def finish(self) -> dict[str, Any]:
        state = self.state
        self.samples = sample_replies(self.model, self.tokenizer) if self.rank == 0 else []
        summary = {
            "input": self.input,
            "model_tag": self.model_tag,
            "steps": state.step,
            "grad_accum_steps": self.grad_accum,
            "device_batch_size": self.args.device_batch_size,
            "max_seq_len": self.seq_len,
            "processes": self.world_size,
            "device": self.device.type,
            "train_minutes": state.train_seconds / 60,
            "final_val_loss": state.val_loss,
            **{f"accuracy_{name}": acc for name, acc in state.accuracy.items()},
            "train_conversations": len(self.train_task),
            "samples": self.samples,
            "metrics": str(self.metrics_path),
            "checkpoint_dir": str(self.ckpt_dir),
        }
        if self.rank == 0:
            for sample in self.samples:
                ending = "ends its turn" if sample["ended"] else "no <|assistant_end|>"
                print(f"--- {sample['prompt']!r} ({ending})\n{sample['reply']}")
            if not self.args.dry_run:
                record(self.spec.name, summary)
                atomic_write_json(self.run_dir / "summary.json", summary)
            print0(f"done: {state.step} steps, val loss {state.val_loss:.4f}; checkpoints in {self.ckpt_dir}")
        return summary


@torch.no_grad()
def sample_replies(model: torch.nn.Module, tokenizer: Any, max_tokens: int = 128) -> list[dict[str, Any]]:
    """Greedy replies to a few held-out prompts (one a GSM8K test question): the text, whether the turn
    ended with <|assistant_end|>, and whether the model called the calculator."""
    model.eval()
    engine = Engine(model, tokenizer)
    question = GSM8K("test", stop=1)[0]["messages"][0]["content"]
    python_start = tokenizer.encode_special("<|python_start|>")
    samples = []
    for prompt in [*SAMPLE_PROMPTS, question]:
        conversation = {"messages": [{"role": "user", "content": prompt}]}
        tokens = tokenizer.render_for_completion(conversation)
        reply, finish = [], None
        for (step,) in engine.stream(tokens, 1, max_tokens, temperature=0.0):
            if step is not None:
                reply.append(step.token)
                finish = step.finish_reason or finish
        samples.append(
            {
                "prompt": prompt,
                "reply": tokenizer.decode(reply),
                "ended": finish == "stop",
                "tool_call": python_start in reply,
            }
        )
    model.train()
    return samples
