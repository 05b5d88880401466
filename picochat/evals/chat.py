"""Chat evaluation: `picochat eval chat -i mid|sft|rl` scores a chat model on six tasks and ChatCORE.

Tasks (held-out splits; see picochat/tasks/):
  - categorical (multiple choice): ARC-Easy, ARC-Challenge, MMLU. Each question is rendered up to
    `<|assistant_start|>`, a batch of questions goes through the model in one forward pass (right-padded:
    with causal attention the padding after a row's last real token cannot change that token's logits),
    and the answer is the letter whose token scores highest at the row's last real position;
  - generative: GSM8K, HumanEval, SpellingBee. The Engine samples `--num-samples` replies (greedy by
    default), with the calculator tool, and `task.evaluate` scores them; a question counts as solved
    when any of its samples is right (pass@num_samples).

ChatCORE (nanochat's summary number) is the mean over the six tasks of the accuracy centred on the
task's random-guess baseline, (acc - baseline) / (1 - baseline): 0.25 for the 4-way multiple choice
tasks, 0 for the generative ones. So 0 means "no better than guessing" and 1 means perfect.

Questions are split across ranks (every world_size-th from `rank`) and the counts are all-reduced, so
the same command works in one process and under `torchrun --nproc_per_node=N`; rank 0 alone prints
and records the "chat-eval-<stage>" report section. `evaluate_chat_task` and `run_chat_eval` are also
what RL training calls for its held-out accuracy.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from picochat.common import (
    PicochatError,
    compute_dtype,
    distributed_runtime,
    print0,
    run_cli,
)
from picochat.sampling import SamplingParams
from picochat.tasks import (
    ARC,
    GSM8K,
    MMLU,
    HumanEval,
    SpellingBee,
    Task,
    categorical_choice,
    letter_token_ids,
)

SPELLING_TEST_SIZE = 256  # SpellingBee is synthetic: this many held-out questions (nanochat's number)
STAGES = ("imported", "mid", "sft", "rl")


@dataclass(frozen=True)
class ChatTask:
    """One evaluation task: how to build its held-out split and what random guessing scores."""

    name: str
    build: Callable[..., Task]  # build(source, **slicing) -> Task
    baseline: float


CHAT_TASKS = {
    t.name: t
    for t in (
        ChatTask("ARC-Easy", lambda source, **s: ARC("ARC-Easy", "test", source, **s), 0.25),
        ChatTask("ARC-Challenge", lambda source, **s: ARC("ARC-Challenge", "test", source, **s), 0.25),
        ChatTask("MMLU", lambda source, **s: MMLU("all", "test", source, **s), 0.25),
        ChatTask("GSM8K", lambda source, **s: GSM8K("test", source, **s), 0.0),
        ChatTask("HumanEval", lambda source, **s: HumanEval(source, **s), 0.0),
        # Synthetic from the bundled word list whatever the source: there is nothing to download.
        ChatTask("SpellingBee", lambda source, **s: SpellingBee("test", SPELLING_TEST_SIZE, **s), 0.0),
    )
}


@dataclass(frozen=True)
class TaskScore:
    """A task's counts summed over all ranks. too_long: prompts that did not fit the model's context
    (a generative one leaves no room for a reply and is scored wrong; a categorical one is cropped)."""

    correct: int
    total: int
    too_long: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


# ---------------------------------------------------------------------------------------------
# Scoring one task


def _dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where `compute_dtype` picks it (CUDA), nothing on CPU."""
    dtype = compute_dtype(device.type)
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


@torch.no_grad()
def _categorical_batch(
    model: torch.nn.Module, tokenizer: Any, task: Task, conversations: list[dict], max_len: int | None
) -> tuple[int, int]:
    """(correct, cropped) for one batch of multiple-choice questions, in one forward pass."""
    device = _model_device(model)
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    # Too long for the context: keep the end, which holds the choices and the answer instruction.
    cropped = sum(max_len is not None and len(p) > max_len for p in prompts)
    if max_len is not None:
        prompts = [p[-max_len:] for p in prompts]
    idx = torch.full((len(prompts), max(map(len, prompts))), tokenizer.get_bos_token_id(), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        idx[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    with _autocast(device):
        logits = model(idx.to(device))
    last = torch.tensor([len(p) - 1 for p in prompts], device=device)
    rows = logits[torch.arange(len(prompts), device=device), last].float()
    correct = 0
    for conversation, row in zip(conversations, rows, strict=True):
        letters = conversation["letters"]
        choice = categorical_choice(row, letter_token_ids(tokenizer, letters))
        correct += bool(task.evaluate(conversation, letters[choice]))
    return correct, cropped


def _generative_one(
    engine: Any,
    tokenizer: Any,
    task: Task,
    conversation: dict,
    index: int,
    sampling: dict[str, Any],
) -> tuple[bool, bool]:
    """(solved, too_long) for one question: solved when any of the sampled replies is right."""
    prompt = tokenizer.render_for_completion(conversation)
    if len(prompt) >= engine.max_context:
        return False, True
    params = SamplingParams(
        temperature=sampling["temperature"],
        top_k=sampling["top_k"],
        max_tokens=sampling["max_new_tokens"],
        seed=sampling["seed"] + index,  # per question, so results do not depend on the number of ranks
    )
    sequences, _ = engine.generate_batch(prompt, sampling["num_samples"], params)
    replies = [tokenizer.decode(s[len(prompt) :]) for s in sequences]
    return any(bool(task.evaluate(conversation, r)) for r in replies), False


def score_chat_task(
    model: torch.nn.Module,
    tokenizer: Any,
    task: Task,
    *,
    batch_size: int = 8,
    num_samples: int = 1,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int = 0,
    engine: Any = None,
    desc: str | None = None,
    progress: bool = False,
) -> TaskScore:
    """Score `model` on every question of `task` (split across ranks when distributed) -> TaskScore.

    Pass the plain model (not DDP-wrapped or compiled). `engine` reuses an existing `Engine` for the
    generative tasks (default: a new one). The model is put in eval mode and restored afterwards.
    """
    from picochat.engine import Engine

    rank, world_size = _dist_rank_world()
    indices = list(range(rank, len(task), world_size))
    was_training = model.training
    model.eval()
    correct = too_long = done = 0
    bar = tqdm(
        total=len(indices), desc=desc or type(task).__name__, leave=False, disable=None if progress else True
    )
    try:
        if task.eval_type == "categorical":
            max_len = getattr(getattr(model, "config", None), "sequence_len", None)
            for start in range(0, len(indices), batch_size):
                batch = [task[i] for i in indices[start : start + batch_size]]
                right, cropped = _categorical_batch(model, tokenizer, task, batch, max_len)
                correct, too_long, done = correct + right, too_long + cropped, done + len(batch)
                bar.update(len(batch))
                bar.set_postfix(acc=f"{correct / done:.3f}")
        else:
            engine = engine or Engine(model, tokenizer)
            sampling = {"num_samples": num_samples, "max_new_tokens": max_new_tokens,
                        "temperature": temperature, "top_k": top_k, "seed": seed}  # fmt: skip
            for i in indices:
                solved, skipped = _generative_one(engine, tokenizer, task, task[i], i, sampling)
                correct, too_long, done = correct + solved, too_long + skipped, done + 1
                bar.update(1)
                bar.set_postfix(acc=f"{correct / done:.3f}")
    finally:
        bar.close()
        model.train(was_training)
    return _all_reduce_score(TaskScore(correct, len(indices), too_long), _model_device(model))


def _all_reduce_score(score: TaskScore, device: torch.device) -> TaskScore:
    if _dist_rank_world()[1] == 1:
        return score
    counts = torch.tensor([score.correct, score.total, score.too_long], dtype=torch.long, device=device)
    dist.all_reduce(counts)
    return TaskScore(*(int(c) for c in counts.tolist()))


def evaluate_chat_task(model: torch.nn.Module, tokenizer: Any, task: Task, **options: Any) -> float:
    """Accuracy of `model` on `task` over all ranks (options: see `score_chat_task`)."""
    return score_chat_task(model, tokenizer, task, **options).accuracy


# ---------------------------------------------------------------------------------------------
# Several tasks and ChatCORE


def centered(accuracy: float, baseline: float) -> float:
    """Accuracy rescaled so that random guessing is 0 and perfect is 1."""
    return (accuracy - baseline) / (1 - baseline)


def chat_core(accuracies: dict[str, float]) -> float | None:
    """Mean centred accuracy over all of CHAT_TASKS, or None when any task is missing."""
    if any(name not in accuracies for name in CHAT_TASKS):
        return None
    return sum(centered(accuracies[n], t.baseline) for n, t in CHAT_TASKS.items()) / len(CHAT_TASKS)


def parse_task_names(spec: str | None) -> list[str]:
    """'ARC-Easy|GSM8K' -> canonical task names (case-insensitive); None or '' -> all tasks."""
    if not spec:
        return list(CHAT_TASKS)
    by_lower = {name.lower(): name for name in CHAT_TASKS}
    names = [part.strip() for part in spec.split("|") if part.strip()]
    unknown = [n for n in names if n.lower() not in by_lower]
    if unknown or not names:
        raise PicochatError(
            f"unknown chat eval task(s) {', '.join(unknown) or repr(spec)}; choose from "
            f"{', '.join(CHAT_TASKS)} (several: separate them with '|')"
        )
    return list(dict.fromkeys(by_lower[n.lower()] for n in names))


def run_chat_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str] | None = None,
    max_per_task: int = -1,
    source: str = "bundled",
    progress: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate several tasks (default: all) on `max_per_task` questions each (-1 = all), spread evenly
    over the task so that a quick run still sees every MMLU subject and ARC difficulty.

    Returns {"tasks": {name: {accuracy, centered, baseline, n, too_long}}, "ChatCORE": float or None
    (None unless every task ran), "missing": [task names not run]}. options: see `score_chat_task`.
    """
    names = list(tasks) if tasks is not None else list(CHAT_TASKS)
    results = {}
    for name in names:
        spec = CHAT_TASKS[name]
        task = spec.build(source)
        if 0 < max_per_task < len(task):
            step = len(task) // max_per_task
            task = spec.build(source, stop=step * max_per_task, step=step)
        score = score_chat_task(model, tokenizer, task, desc=name, progress=progress, **options)
        results[name] = {
            "accuracy": score.accuracy,
            "centered": centered(score.accuracy, spec.baseline),
            "baseline": spec.baseline,
            "n": score.total,
            "too_long": score.too_long,
        }
        if progress:
            tqdm.write(f"{name}: {score.accuracy:.4f} ({score.correct}/{score.total})")
    return {
        "tasks": results,
        "ChatCORE": chat_core({n: r["accuracy"] for n, r in results.items()}),
        "missing": [n for n in CHAT_TASKS if n not in results],
    }


def format_results(result: dict[str, Any]) -> str:
    """A plain-text table (task, accuracy, centred, n), then ChatCORE or the tasks it still needs."""
    lines = [f"{'task':<14} {'accuracy':>9} {'centred':>9} {'n':>6}"]
    for name, r in result["tasks"].items():
        note = f"  ({r['too_long']} prompts longer than the context)" if r["too_long"] else ""
        lines.append(f"{name:<14} {r['accuracy']:>9.4f} {r['centered']:>9.4f} {r['n']:>6}{note}")
    if result["ChatCORE"] is None:
        lines.append(f"ChatCORE: not computed, needs every task; missing: {', '.join(result['missing'])}")
    else:
        lines.append(f"{'ChatCORE':<14} {'':>9} {result['ChatCORE']:>9.4f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# `picochat eval chat`


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Evaluate a chat model on ARC-Easy, ARC-Challenge, MMLU (multiple choice), GSM8K, "
        "HumanEval and SpellingBee (generated answers), print each task's accuracy and ChatCORE, and "
        "record the 'chat-eval-<stage>' report section. Runs under torchrun too.",
    )
    p.add_argument("-i", "--stage", required=True, choices=STAGES, help="which checkpoint stage to evaluate")
    p.add_argument(
        "-a",
        "--task",
        default=None,
        help=f"task name or '|'-separated names (default: all): {'|'.join(CHAT_TASKS)}",
    )
    p.add_argument(
        "--max-per-task",
        type=int,
        default=-1,
        help="evaluate only each task's first N questions, for a quick run (-1 = all)",
    )
    p.add_argument(
        "-g", "--model-tag", default=None, help="model folder, e.g. d4 (default: the deepest d<N>)"
    )
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument(
        "--source",
        default="bundled",
        choices=("bundled", "hub"),
        help="task data: bundled copy or the HF hub",
    )
    p.add_argument(
        "--device-batch-size", type=int, default=8, help="multiple-choice questions per forward pass"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest generated reply, in tokens")
    p.add_argument(
        "--num-samples", type=int, default=1, help="replies per generative question; any right one counts"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (question i uses seed + i)")
    p.add_argument("--device-type", default="", help="cuda | cpu | mps (default: autodetect)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    problems = {
        "--max-per-task must be -1 (all) or at least 1": args.max_per_task == 0 or args.max_per_task < -1,
        "--device-batch-size must be at least 1": args.device_batch_size < 1,
        "--num-samples must be at least 1": args.num_samples < 1,
        "--max-new-tokens must be at least 1": args.max_new_tokens < 1,
        "--temperature must be 0 (greedy) or positive": args.temperature < 0,
        "--top-k must be 0 (no limit) or positive": args.top_k < 0,
    }
    for message, bad in problems.items():
        if bad:
            raise PicochatError(message)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    _check_args(args)
    names = parse_task_names(args.task)
    from picochat.engine import load_engine
    from picochat.report import record

    with distributed_runtime(args.device_type) as (rank, _, device):
        engine, meta = load_engine(args.stage, args.model_tag, args.step, str(device))  # cuda:<local rank>
        t0 = time.time()
        result = run_chat_eval(
            engine.model,
            engine.tokenizer,
            names,
            args.max_per_task,
            args.source,
            progress=rank == 0,
            batch_size=args.device_batch_size,
            num_samples=args.num_samples,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k or None,
            seed=args.seed,
            engine=engine,
        )
        print0(format_results(result))
        settings = {k: getattr(args, k) for k in ("max_per_task", "source", "temperature", "top_k",
                                                   "max_new_tokens", "num_samples", "seed")}  # fmt: skip
        record(
            f"chat-eval-{args.stage}",
            {
                "stage": args.stage,
                "model_tag": Path(meta["path"]).parent.name,
                "step": meta.get("step"),
                **result,
                **settings,
                "seconds": time.time() - t0,
            },
        )
    return 0


if __name__ == "__main__":
    run_cli(main)
