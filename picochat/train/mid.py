"""Mid-training: `picochat train mid` (or `torchrun ... -m picochat.train.mid`).

Continues a base model on conversations, so it learns the chat format, multiple-choice answers, tool
calls and who it is: SmolTalk chats, MMLU and ARC multiple choice, GSM8K with calculator calls,
spelling and identity conversations, shuffled together. Conversations are packed end to end into rows
like pretraining, with the chat loss mask. The LR is constant, then decays linearly over the last 20%.
Writes checkpoints/mid/<model_tag>/ and the report section "mid". See picochat.train.chat_train.
"""

from __future__ import annotations

import argparse
from typing import Any

from picochat.common import PicochatError, run_cli
from picochat.tasks import (
    ARC,
    GSM8K,
    MMLU,
    Identity,
    SimpleSpelling,
    SmolTalk,
    SpellingBee,
    Task,
    TaskMixture,
)
from picochat.train.chat_train import PackedRows, StageSpec, add_common_args, run_stage

AVERAGE_SAMPLE = 200  # conversations rendered to estimate the tokens in one pass


def train_mixture(source: str) -> Task:
    return TaskMixture([
        SmolTalk("train", source),
        MMLU("all", "train", source),
        ARC("ARC-Easy", "train", source),
        ARC("ARC-Challenge", "train", source),
        GSM8K("train", source),
        Identity(),
        SimpleSpelling("train", 1000),
        SpellingBee("train", 1000),
    ])  # fmt: skip


def val_mixture(source: str) -> Task:
    return TaskMixture([SmolTalk("test", source), GSM8K("test", source, stop=200)])


def grad_accum(args: argparse.Namespace, world_size: int, seq_len: int) -> int:
    """Micro-batches per step: --total-batch-size tokens over device batch x seq len x processes."""
    per_micro = args.device_batch_size * seq_len * world_size
    if args.total_batch_size == -1:
        return 1
    if args.total_batch_size % per_micro:
        raise PicochatError(
            f"--total-batch-size {args.total_batch_size} must be a multiple of --device-batch-size x "
            f"row length x processes = {per_micro}"
        )
    return args.total_batch_size // per_micro


def steps_per_pass(task: Task, tokenizer: Any, seq_len: int, rows_per_step: int) -> int:
    """One pass over the mixture, estimated from the mean length of its first conversations."""
    sample = [task[i] for i in range(min(AVERAGE_SAMPLE, len(task)))]
    tokens = sum(len(tokenizer.render_conversation(c, max_tokens=4 * seq_len)[0]) for c in sample)
    return int(tokens / len(sample) * len(task) / (rows_per_step * seq_len))


SPEC = StageSpec(
    name="mid",
    default_input="base",
    rows=PackedRows,
    warmdown_ratio=0.2,
    train_mixture=train_mixture,
    val_mixture=val_mixture,
    grad_accum=grad_accum,
    steps_per_pass=steps_per_pass,
)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Mid-training: teach a base model conversations, multiple choice, calculator tool "
        "use and its identity, on packed rows of task conversations.",
    )
    g = add_common_args(p, SPEC)
    g["batch and horizon"].add_argument(
        "--total-batch-size",
        type=int,
        default=-1,
        help="tokens per optimiser step over all processes; -1 = device batch x seq len x processes",
    )
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return run_stage(SPEC, build_parser(prog), argv)


if __name__ == "__main__":
    run_cli(main)
