"""Supervised fine-tuning: `picochat train sft` (or `torchrun ... -m picochat.train.sft`).

Fine-tunes a mid-trained model on whole conversations, one per row, padded to the longest of the batch
(padding is never a target): ARC-Easy and ARC-Challenge, GSM8K with calculator calls, SmolTalk chats,
identity and spelling conversations. The LR decays linearly to 0; the validation loss, and ARC-Easy and
GSM8K accuracy, are measured during training. Writes checkpoints/sft/<model_tag>/ and the report
section "sft". See picochat.train.chat_train.
"""

from __future__ import annotations

import argparse
from typing import Any

from picochat.common import PicochatError, run_cli
from picochat.tasks import ARC, GSM8K, Identity, SimpleSpelling, SmolTalk, SpellingBee, Task, TaskMixture
from picochat.train.chat_train import PaddedRows, StageSpec, add_common_args, run_stage


def train_mixture(source: str) -> Task:
    return TaskMixture([
        ARC("ARC-Easy", "train", source),
        ARC("ARC-Challenge", "train", source),
        GSM8K("train", source),
        SmolTalk("train", source),
        Identity(),
        SimpleSpelling("train", 300),
        SpellingBee("train", 300),
    ])  # fmt: skip


def val_mixture(source: str) -> Task:
    return TaskMixture([SmolTalk("test", source), GSM8K("test", source, stop=200)])


def grad_accum(args: argparse.Namespace, world_size: int, seq_len: int) -> int:
    """Micro-batches per step: --target-examples-per-step over device batch x processes."""
    per_micro = args.device_batch_size * world_size
    if args.target_examples_per_step % per_micro:
        raise PicochatError(
            f"--target-examples-per-step {args.target_examples_per_step} must be a multiple of "
            f"--device-batch-size x processes = {per_micro}"
        )
    return args.target_examples_per_step // per_micro


def steps_per_pass(task: Task, tokenizer: Any, seq_len: int, rows_per_step: int) -> int:
    return len(task) // rows_per_step


SPEC = StageSpec(
    name="sft",
    default_input="mid",
    rows=PaddedRows,
    warmdown_ratio=1.0,
    train_mixture=train_mixture,
    val_mixture=val_mixture,
    grad_accum=grad_accum,
    steps_per_pass=steps_per_pass,
    accuracy_every=True,
)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Supervised fine-tuning on single conversations (padded batches, assistant tokens "
        "only), with validation loss and ARC-Easy/GSM8K accuracy during training.",
    )
    g = add_common_args(p, SPEC)
    p.set_defaults(device_batch_size=4, init_lr_frac=0.02)  # nanochat: SFT gently
    g["batch and horizon"].add_argument(
        "--target-examples-per-step",
        type=int,
        default=32,
        help="conversations per optimiser step over all processes (gradient accumulation fills the rest)",
    )
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return run_stage(SPEC, build_parser(prog), argv)


if __name__ == "__main__":
    run_cli(main)
