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
from collections.abc import Callable
from typing import Any

import torch

from picochat.checkpoint import checkpoint_dir_for, find_model_tag, load_model
from picochat.common import PicochatError, autocast_context, distributed_runtime, pass_bar, print0
from picochat.tasks import Task
from picochat.train import flags
from picochat.train.loop import IGNORE, Evaluation, Trainer, accumulate_gradients, all_reduce_sum, wrap_model

VAL_ROWS = 80  # default validation rows (over all processes), whatever the device batch size

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


def add_common_args(p: argparse.ArgumentParser, spec: StageSpec) -> dict[str, argparse._ArgumentGroup]:
    """The flags both stages share; returns the groups, for the stage's own flags."""
    g = flags.groups(p)
    flags.add_input_args(g["input and output"], spec.default_input, ("imported", "base", "mid", "sft"))
    flags.add_source_arg(g["input and output"], "task data")
    g["model"].add_argument(
        "--max-seq-len", type=int, default=-1, help="row length in tokens; -1 = the input model's context"
    )
    b = g["batch and horizon"]
    b.add_argument("--device-batch-size", type=int, default=8, help="rows per forward pass per process")
    flags.add_horizon_args(b, "one pass over the data")
    flags.add_optim_args(g["optimisation"], init_lr_frac=1.0)
    e = g["evaluation, logging and checkpoints"]
    flags.add_output_args(e, spec.name, eval_every=100, save_every=0)
    e.add_argument(
        "--eval-tokens",
        type=int,
        default=-1,
        help=f"validation rows x row length per evaluation (a row is one conversation in SFT); "
        f"-1 = {VAL_ROWS} rows",
    )
    if spec.accuracy_every:
        e.add_argument(
            "--eval-metrics-every",
            type=int,
            default=0,
            help="ARC-Easy and GSM8K accuracy every N steps (0 = end only, -1 = never)",
        )
        e.add_argument("--eval-metrics-examples", type=int, default=50, help="questions per accuracy task")
    e.add_argument("--dry-run", action="store_true", help="train but write no checkpoint or report")
    flags.add_runtime_args(g["runtime"])
    return g


def run_stage(spec: StageSpec, parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse the flags and run the stage on every rank."""
    args = flags.parse(parser, argv)
    with distributed_runtime(args.device_type) as (rank, world_size, device):
        ChatTrainer(spec, args, rank, world_size, device).run()
    return 0


# ---------------------------------------------------------------------------------------------
# The trainer


class ChatTrainer(Trainer):
    """One mid-training or SFT run: conversation rows with the chat loss mask, val loss, accuracy."""

    def __init__(
        self, spec: StageSpec, args: argparse.Namespace, rank: int, world_size: int, device: torch.device
    ) -> None:
        model_tag = args.model_tag or find_model_tag(args.stage)
        run_name = args.run or f"{spec.name}_{model_tag}"
        super().__init__(args, rank, world_size, device, checkpoint_dir_for(spec.name, model_tag), run_name)
        self.spec, self.stage, self.model_tag = spec, spec.name, model_tag
        stage, step = (spec.name, None) if self.resumed else (args.stage, args.step)
        self.model, self.tokenizer, meta = load_model(stage, model_tag, step, device, phase="train")
        # the checkpoint this run started from (a resumed run keeps its original input)
        started_from = {"stage": args.stage, "model_tag": model_tag, "step": meta["step"]}
        self.input = meta["input"] if self.resumed else started_from
        context = self.model.config.sequence_len  # inherited from the input checkpoint
        self.seq_len = args.max_seq_len if args.max_seq_len > 0 else context
        if self.seq_len > context:
            raise PicochatError(
                f"--max-seq-len {self.seq_len} is longer than the model's context ({context}); lower it"
            )
        self.train_task, self.val_task = spec.train_mixture(args.source), spec.val_mixture(args.source)
        self.grad_accum = spec.grad_accum(args, world_size, self.seq_len)
        horizon = args.num_iterations
        if horizon <= 0:
            rows_per_step = self.grad_accum * args.device_batch_size * world_size
            horizon = max(
                1, spec.steps_per_pass(self.train_task, self.tokenizer, self.seq_len, rows_per_step)
            )
        self.flops_per_token = float(self.model.estimate_flops())
        self.schedule = (0.0, spec.warmdown_ratio, 0.0)
        scale = args.init_lr_frac
        self.optimizers = self.model.setup_optimizers(
            unembedding_lr=args.unembedding_lr * scale,
            embedding_lr=args.embedding_lr * scale,
            matrix_lr=args.matrix_lr * scale,
            weight_decay=args.weight_decay,
        )
        self.start(horizon)
        rows_state = self.restore(weights_from=meta) if self.resumed else None
        self.train_rows = self._rows(self.train_task, rows_state, args.device_batch_size)
        self.train_model = wrap_model(self.model, world_size, compile_model=False)
        self.samples: list[dict[str, Any]] = []
        print0(
            f"{spec.name} from {self.input['stage']}/{model_tag} step {self.input['step']}: "
            f"{len(self.train_task):,} training conversations, {len(self.val_task):,} held out; "
            f"{self.state.horizon:,} steps of {self.grad_accum} x {args.device_batch_size} rows x "
            f"{world_size} processes, rows up to {self.seq_len} tokens"
        )

    def _rows(self, task: Task, state: dict[str, int] | None, batch_size: int) -> ConversationRows:
        indices = list(range(self.rank, len(task), self.world_size))
        if not indices:
            raise PicochatError(
                f"no {self.spec.name} conversations for rank {self.rank}: the mixture is empty"
            )
        return self.spec.rows(self.tokenizer, task, indices, batch_size, self.seq_len, self.device, state)

    # -- the stage's hooks

    def forward_backward(self) -> tuple[float, int]:
        return accumulate_gradients(self.train_model, self.train_rows, self.grad_accum)

    def momentum(self, step: int) -> float:
        return 0.95

    def data_state(self) -> dict[str, int]:
        return dict(self.train_rows.state)

    def evaluations(self) -> list[Evaluation]:
        metrics_every = getattr(self.args, "eval_metrics_every", -1)
        return [
            Evaluation(self.args.eval_every, self.evaluate_loss),
            Evaluation(metrics_every, self.evaluate_accuracy, at_start=False),
        ]

    @torch.no_grad()
    def evaluate_loss(self) -> dict[str, float]:
        """Token-mean loss on the same held-out rows every time, in device-batch chunks (so the device
        batch size changes neither the rows nor the figure), over all ranks."""
        self.model.eval()
        rows = self.args.eval_tokens // self.seq_len if self.args.eval_tokens > 0 else VAL_ROWS
        mine = max(1, rows // self.world_size)
        val_rows = self._rows(self.val_task, None, self.args.device_batch_size)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for start in pass_bar(range(0, mine, self.args.device_batch_size), "val loss"):
            val_rows.batch_size = min(self.args.device_batch_size, mine - start)
            inputs, targets = next(val_rows)
            with autocast_context(self.device):
                loss = self.model(inputs, targets, loss_reduction="sum")
            total += torch.stack([loss.double(), (targets != IGNORE).sum().double()])
        all_reduce_sum(total)
        self.model.train()
        return {"val_loss": total[0].item() / max(1.0, total[1].item())}

    def evaluate_accuracy(self) -> dict[str, float]:
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
        return {name: r["accuracy"] for name, r in result["tasks"].items()}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"input": self.input}

    def summary_extra(self) -> dict[str, Any]:
        from picochat.evals.samples import sample_replies

        self.samples = sample_replies(self.model, self.tokenizer) if self.rank == 0 else []
        for sample in self.samples:
            ending = "ends its turn" if sample["ended"] else "no <|assistant_end|>"
            print(f"--- {sample['prompt']!r} ({ending})\n{sample['reply']}")
        figures = self.state.figures
        return {
            "input": self.input,
            "grad_accum_steps": self.grad_accum,
            "device_batch_size": self.args.device_batch_size,
            "max_seq_len": self.seq_len,
            "final_val_loss": figures.get("val_loss"),
            **{f"accuracy_{name}": figures[name] for name in ("ARC-Easy", "GSM8K") if name in figures},
            "train_conversations": len(self.train_task),
            "samples": self.samples,
        }
