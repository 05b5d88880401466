"""CORE: the DCLM "core" in-context-learning score of a base model, and the `picochat eval base` command.

CORE (from the DCLM paper, used by nanochat) averages 22 few-shot tasks. Each task's accuracy is
centred on its random-guess baseline, (acc - baseline) / (1 - baseline), so 0 means "no better than
guessing" and 1 means perfect; CORE is the mean centred accuracy. Three kinds of task:
  - multiple_choice: one context, several continuations; the model picks the continuation with the
    lowest mean per-token loss;
  - schema: several contexts, one shared continuation; the model picks the context under which the
    continuation has the lowest mean loss;
  - language_modeling: the model's greedy output must reproduce the continuation token for token.
Prompts are rendered like llm-foundry's (context + delimiter + continuation, few-shot examples first,
separated by blank lines). A prompt is never cropped (that silently changes the task): one too long for
the context drops few-shot examples from the end until it fits ("fewer shots"); an item too long with
none is not scored ("skipped", not in `n`). Both counts are in every task's result and the summary.

Everything comes from the bundled `data/eval/core/` (see data/SOURCES.md, section 1a): the task list
is DCLM's `low_variance_datasets`, the per-task shots / type / delimiter come from `dclm_heavy.yaml`,
the random baselines from `eval_meta_data_v1.csv` (the values nanochat uses). The CORE bundle's squad
and coqa files are not bundled (over 4 MiB each) and no copy of them was found on the Hugging Face hub
(only the original SQuAD and CoQA, in other formats), so the score covers 20 of the 22 tasks and every
result, table and report section counts and names the two and says why (also with `--source hub`).

`picochat eval base` additionally measures bits per byte on the train and val shards and prints greedy
samples from fixed prompts, then records the "base-eval" report section.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from picochat.common import (
    DATA_DIR,
    PicochatError,
    autocast_context,
    distributed_runtime,
    get_rank,
    get_world_size,
    print0,
    run_cli,
)

CORE_DIR = DATA_DIR / "eval" / "core"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
DEFAULT_DELIMITER = " "  # llm-foundry's continuation delimiter when a task sets none
DATA_SEED = 1337  # the order of each task's items, so --max-per-task takes a fixed random subset
FEWSHOT_SEED = 1234  # + the item's index: which other items become its few-shot examples
MISSING_WHY = "not bundled, no hub copy found"  # squad and coqa, see the module docstring

Model = Callable[[torch.Tensor], torch.Tensor]  # idx (B, T) -> logits (B, T, vocab)


@dataclass(frozen=True)
class TaskSpec:
    """One CORE task: how to render it and what random guessing scores (in percent)."""

    label: str
    task_type: str
    num_fewshot: int
    delimiter: str
    path: Path
    baseline: float

    @property
    def available(self) -> bool:
        return self.path.is_file()


# ---------------------------------------------------------------------------------------------
# The task list and the data


def core_tasks(core_dir: Path = CORE_DIR) -> list[TaskSpec]:
    """All 22 CORE tasks in DCLM's order, bundled or not (see `TaskSpec.available`)."""
    import yaml  # PyYAML, installed with huggingface_hub

    labels = json.loads((core_dir / "dclm_additional_aggregation.json").read_text())["low_variance_datasets"]
    icl_tasks = {
        t["label"]: t for t in yaml.safe_load((core_dir / "dclm_heavy.yaml").read_text())["icl_tasks"]
    }
    with open(core_dir / "eval_meta_data_v1.csv", newline="", encoding="utf-8") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    specs = []
    for label in labels:
        task = icl_tasks[label]
        # dataset_uri is llm-foundry's "local_data/<category>/<task>.jsonl"; ours are gzip'd copies.
        relative = task["dataset_uri"].removeprefix("local_data/")
        specs.append(
            TaskSpec(
                label=label,
                task_type=task["icl_task_type"],
                num_fewshot=int(task["num_fewshot"][0]),
                delimiter=task.get("continuation_delimiter", DEFAULT_DELIMITER),
                path=core_dir / "eval_data" / f"{relative}.gz",
                baseline=baselines[label],
            )
        )
    return specs


def coverage_summary(specs: Sequence[TaskSpec], covered: Sequence[str] | None = None) -> str:
    """E.g. 'CORE over 20/22 tasks; 2 missing (...): squad, coqa'. `covered` defaults to every bundled
    task; a narrower selection (--tasks) is counted as such."""
    missing = [s.label for s in specs if not s.available]
    n_covered = len(specs) - len(missing) if covered is None else len(covered)
    text = f"CORE over {n_covered}/{len(specs)} tasks"
    if covered is not None and n_covered < len(specs) - len(missing):
        text += " (a selection)"
    return text + (f"; {len(missing)} missing ({MISSING_WHY}): {', '.join(missing)}" if missing else "")


def load_examples(spec: TaskSpec) -> list[dict[str, Any]]:
    """The task's items in a fixed shuffled order (so any prefix is a fair random subset)."""
    with gzip.open(spec.path, "rt", encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    random.Random(DATA_SEED).shuffle(data)
    return data


# ---------------------------------------------------------------------------------------------
# Prompts


def fewshot_examples(data: Sequence[dict[str, Any]], idx: int, k: int) -> list[dict[str, Any]]:
    """k other items of the task, drawn by a generator seeded with the item's index (reproducible)."""
    if k == 0:
        return []
    others = [i for i in range(len(data)) if i != idx]
    return [data[i] for i in random.Random(FEWSHOT_SEED + idx).sample(others, min(k, len(others)))]


def render_prompts(spec: TaskSpec, item: dict[str, Any], fewshot: Sequence[dict[str, Any]]) -> list[str]:
    """The texts to score: one per choice (multiple_choice), per context (schema), or for
    language_modeling [prompt without the continuation, prompt with it]."""
    d = spec.delimiter
    if spec.task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{d}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{d}{choice}" for choice in item["choices"]]
    if spec.task_type == "schema":
        shots = "".join(f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}\n\n" for ex in fewshot)
        return [f"{shots}{context}{d}{item['continuation']}" for context in item["context_options"]]
    if spec.task_type == "language_modeling":
        shots = "".join(f"{ex['context'].strip()}{d}{ex['continuation']}\n\n" for ex in fewshot)
        prompt = f"{shots}{item['context'].strip()}{d}"
        # The delimiter's trailing space goes with the continuation (" Paris", a single token).
        return [prompt.strip(), prompt + item["continuation"]]
    raise ValueError(f"unknown ICL task type {spec.task_type!r}; expected one of {TASK_TYPES}")


def example_prompts(spec: TaskSpec, data: Sequence[dict[str, Any]], idx: int) -> list[str]:
    """The rendered prompts of item `idx`, with its few-shot examples drawn from the rest of `data`."""
    return render_prompts(spec, data[idx], fewshot_examples(data, idx, spec.num_fewshot))


# ---------------------------------------------------------------------------------------------
# Tokens: which positions hold the part being scored


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def tokenize_prompts(
    tokenizer: Any, task_type: str, prompts: Sequence[str]
) -> tuple[list[list[int]], list[int], list[int]]:
    """(token rows, start, end): row i is scored on its tokens [start_i, end_i)."""
    bos = tokenizer.get_bos_token_id()
    rows = [tokenizer.encode(p, prepend=bos) for p in prompts]
    if task_type == "language_modeling":
        without, with_ = rows
        # A BPE merge across the boundary makes `without` not quite a prefix: score from where they part.
        start = min(_common_prefix([without, with_]), len(with_) - 1)
        return [with_], [start], [len(with_)]
    if task_type == "multiple_choice":
        # Continuations begin where the choices part; each keeps at least one token.
        start = min(_common_prefix(rows), min(len(r) for r in rows) - 1)
        return rows, [start] * len(rows), [len(r) for r in rows]
    # schema: the shared continuation is the common suffix of all options.
    suffix = min(_common_prefix([r[::-1] for r in rows]), min(len(r) for r in rows) - 1)
    return rows, [len(r) - suffix for r in rows], [len(r) for r in rows]


class Fitted(NamedTuple):
    """An item's token rows fitted to the context, with the few-shot examples kept (None: skipped)."""

    rows: list[list[int]]
    starts: list[int]
    ends: list[int]
    shots: int | None


def fit_prompts(
    tokenizer: Any, spec: TaskSpec, item: dict, fewshot: Sequence[dict], max_len: int | None
) -> Fitted:
    """Tokenize the item with as many of its few-shot examples (a prefix of `fewshot`) as fit in
    `max_len` tokens; every row of the item has to fit, since its choices are compared with each other."""
    for shots in range(len(fewshot), -1, -1):
        prompts = render_prompts(spec, item, fewshot[:shots])
        rows, starts, ends = tokenize_prompts(tokenizer, spec.task_type, prompts)
        if max_len is None or max(len(r) for r in rows) <= max_len:
            return Fitted(rows, starts, ends, shots)
    return Fitted(rows, starts, ends, None)


# ---------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def score_example(
    model: Model,
    rows: list[list[int]],
    starts: list[int],
    ends: list[int],
    task_type: str,
    gold: int,
    pad_id: int,
    vocab_size: int,
    device: torch.device,
) -> bool:
    """Run the rows as one padded batch and say whether the model gets this item right."""
    width = max(len(r) for r in rows)
    idx = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        idx[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
    logits = model(idx)[..., :vocab_size].float()  # drop any padding of the model's vocabulary
    # Position t predicts token t+1, so token span [s, e) is scored by positions [s-1, e-1).
    if task_type == "language_modeling":
        s, e = starts[0], ends[0]
        return bool(torch.equal(logits[0, s - 1 : e - 1].argmax(-1), idx[0, s:e]))
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), idx[:, 1:], reduction="none")
    means = torch.stack(
        [losses[i, s - 1 : e - 1].mean() for i, (s, e) in enumerate(zip(starts, ends, strict=True))]
    )
    # argmin returns the first of equal losses: ties always go to the lowest index.
    return int(means.argmin().item()) == gold


class TaskCounts(NamedTuple):
    """Items right, scored, scored with fewer shots (to fit), and skipped (too long even with none)."""

    correct: int
    total: int
    fewer_shots: int = 0
    skipped: int = 0


def evaluate_task(
    model: Model,
    tokenizer: Any,
    spec: TaskSpec,
    data: Sequence[dict[str, Any]],
    device: torch.device,
    max_per_task: int | None = None,
    max_seq_len: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
) -> TaskCounts:
    """Counts over this rank's share of the first max_per_task items: every world_size-th item from
    `rank` on. Few-shot examples are drawn from all of `data`; see `fit_prompts` for long prompts."""
    n = len(data) if max_per_task is None else min(max_per_task, len(data))
    vocab_size = tokenizer.get_vocab_size()
    pad_id = tokenizer.get_bos_token_id()  # any id works: padding sits after every scored position
    correct = total = fewer_shots = skipped = 0
    indices = range(rank, n, world_size)
    for idx in tqdm(indices, desc=spec.label, leave=False, disable=None if progress else True):
        fewshot = fewshot_examples(data, idx, spec.num_fewshot)
        fitted = fit_prompts(tokenizer, spec, data[idx], fewshot, max_seq_len)
        if fitted.shots is None:
            skipped += 1
            continue
        fewer_shots += fitted.shots < len(fewshot)
        gold = data[idx].get("gold", 0)
        correct += score_example(
            model, fitted.rows, fitted.starts, fitted.ends, spec.task_type, gold, pad_id, vocab_size, device
        )
        total += 1
    return TaskCounts(correct, total, fewer_shots, skipped)


def centered_accuracy(accuracy: float, baseline_percent: float) -> float:
    """0 = random guessing, 1 = perfect."""
    b = baseline_percent / 100
    return (accuracy - b) / (1 - b)


def evaluate_core(
    model: Model,
    tokenizer: Any,
    device: torch.device | str,
    max_per_task: int | None = None,
    tasks: Sequence[str] | None = None,
    max_seq_len: int | None = None,
) -> dict[str, Any]:
    """CORE of `model` over the bundled tasks (or the labels in `tasks`), split over all ranks.

    Returns {"core", "tasks": {label: {accuracy, centered, baseline, n, fewer_shots, skipped, ...}},
    "covered", "missing", "summary", "fewer_shots", "skipped"}. max_seq_len defaults to
    model.config.sequence_len; prompts longer than it lose few-shot examples (see `fit_prompts`).
    Pass the plain model, not a torch.compile'd one: every prompt has a different length.
    """
    device = torch.device(device)
    all_specs = core_tasks()
    labels = [s.label for s in all_specs]
    unknown = [t for t in tasks or [] if t not in labels]
    if unknown:
        raise PicochatError(f"unknown CORE task(s) {', '.join(unknown)}; choose from: {', '.join(labels)}")
    specs = [s for s in all_specs if s.available and (tasks is None or s.label in tasks)]
    if max_seq_len is None:
        max_seq_len = getattr(getattr(model, "config", None), "sequence_len", None)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    was_training = isinstance(model, torch.nn.Module) and model.training
    if isinstance(model, torch.nn.Module):
        model.eval()
    results: dict[str, dict[str, Any]] = {}
    try:
        for spec in specs:
            data = load_examples(spec)
            with autocast_context(torch.device(device)):
                share = dict(rank=rank, world_size=world_size, progress=rank == 0)
                counts = evaluate_task(
                    model, tokenizer, spec, data, device, max_per_task, max_seq_len, **share
                )
            counts = _all_reduce_counts(counts, device, distributed)
            accuracy = counts.correct / max(counts.total, 1)
            results[spec.label] = dict(
                accuracy=accuracy, centered=centered_accuracy(accuracy, spec.baseline), n=counts.total,
                baseline=spec.baseline, type=spec.task_type, shots=spec.num_fewshot,
                fewer_shots=counts.fewer_shots, skipped=counts.skipped,
            )  # fmt: skip
    finally:
        if was_training:
            model.train()
    covered = list(results)
    scored = [r["centered"] for r in results.values() if r["n"]]  # a task whose every item was skipped
    core = sum(scored) / len(scored) if scored else float("nan")  # has no accuracy to average
    fewer_shots = sum(r["fewer_shots"] for r in results.values())
    skipped = sum(r["skipped"] for r in results.values())
    summary = coverage_summary(all_specs, None if tasks is None else covered)
    if fewer_shots or skipped:
        summary += f"; {fewer_shots} prompt(s) lost few-shot examples and {skipped} item(s) were skipped"
        summary += f" to fit the {max_seq_len}-token context"
    return {
        "core": core,
        "tasks": results,
        "covered": covered,
        "missing": [s.label for s in all_specs if not s.available],
        "summary": summary,
        "max_per_task": max_per_task,
        "fewer_shots": fewer_shots,
        "skipped": skipped,
    }


def _all_reduce_counts(counts: TaskCounts, device: torch.device, distributed: bool) -> TaskCounts:
    if not distributed:
        return counts
    t = torch.tensor(counts, dtype=torch.long, device=device)
    dist.all_reduce(t)
    return TaskCounts(*(int(v) for v in t.tolist()))


def format_core_table(result: dict[str, Any]) -> str:
    """A plain-text table of per-task accuracy and centred accuracy, ending with the CORE line."""
    lines = [f"{'task':<34} {'shots':>5} {'n':>6} {'accuracy':>9} {'centred':>9} {'fewer shots':>11} skipped"]
    for label, r in result["tasks"].items():
        lines.append(
            f"{label:<34} {r['shots']:>5} {r['n']:>6} {r['accuracy']:>9.4f} {r['centered']:>9.4f} "
            f"{r.get('fewer_shots', 0):>11} {r.get('skipped', 0):>7}"
        )
    lines.append(f"{'CORE':<34} {'':>5} {'':>6} {'':>9} {result['core']:>9.4f}")
    lines.append(result["summary"])
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# `picochat eval base`


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Evaluate a base model: the CORE score (DCLM's 22 in-context-learning tasks, 20 of "
        "them bundled), bits per byte on the train and val shards, and greedy samples from fixed prompts. "
        "Records the 'base-eval' report section.",
    )
    p.add_argument(
        "-i", "--stage", default="base", choices=("base", "mid", "sft", "rl"), help="checkpoint stage to load"
    )
    p.add_argument("--model-tag", default=None, help="model folder, e.g. d4 (default: the deepest d<N>)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument(
        "--max-per-task",
        type=int,
        default=None,
        help="evaluate only the first N items of each task (a fixed random subset) for a quick estimate",
    )
    p.add_argument("--tasks", default=None, help="comma-separated CORE task labels (default: all)")
    p.add_argument("--core-only", action="store_true", help="skip bits per byte and samples")
    p.add_argument(
        "--split-tokens",
        type=int,
        default=-1,
        help="tokens per split for bits per byte; -1 = 20 * 2^19 on CUDA, 2^16 elsewhere",
    )
    p.add_argument("--device-batch-size", type=int, default=8, help="rows per forward pass for bits per byte")
    p.add_argument(
        "--source",
        default=None,
        help="pretraining shards for bits per byte: bundled (default), hub or a folder (CORE's tasks are "
        "always the bundled ones: squad and coqa have no hub copy and are counted as missing)",
    )
    p.add_argument("--device-type", default="", help="cuda | cpu | mps (default: autodetect)")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.max_per_task is not None and args.max_per_task < 1:
        raise PicochatError("--max-per-task must be at least 1 (leave it out to evaluate every item)")
    from picochat.checkpoint import load_model

    with distributed_runtime(args.device_type) as (_, _, device):
        model, tokenizer, meta = load_model(args.stage, args.model_tag, args.step, device)
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
        t0 = time.time()
        result = evaluate_core(model, tokenizer, device, args.max_per_task, tasks)
        print0(format_core_table(result))
        for spec in (s for s in core_tasks() if not s.available):
            print0(
                f"{spec.label}: not scored ({MISSING_WHY}); to score it, put the bundle's copy at {spec.path}"
            )
        section: dict[str, Any] = {
            "stage": args.stage, "model_tag": args.model_tag or Path(meta["path"]).parent.name,
            "step": meta.get("step"), "core": result["core"], "core_summary": result["summary"],
            "core_covered": result["covered"], "core_missing": result["missing"],
            "max_per_task": args.max_per_task, "tasks": result["tasks"], "core_seconds": time.time() - t0,
        }  # fmt: skip
        if not args.core_only:
            section.update(_bpb_and_samples(model, tokenizer, device, args))
        from picochat.report import record

        record("base-eval", section)
    return 0


def _bpb_and_samples(model: Any, tokenizer: Any, device: torch.device, args: argparse.Namespace) -> dict:
    """Bits per byte on the train and val shards, and greedy samples (rank 0) from fixed prompts."""
    from picochat.dataloader import TokenBatchLoader
    from picochat.evals.bpb import evaluate_bpb
    from picochat.evals.samples import SAMPLE_PROMPTS, SAMPLE_TOKENS, sample_greedy
    from picochat.tokenizer import get_token_bytes

    seq_len = model.config.sequence_len
    default_tokens = 20 * 2**19 if device.type == "cuda" else 2**16
    split_tokens = args.split_tokens if args.split_tokens > 0 else default_tokens
    world_size = get_world_size()
    steps = max(1, split_tokens // (args.device_batch_size * seq_len * world_size))
    token_bytes = get_token_bytes(device)
    out: dict[str, Any] = {}
    for split in ("train", "val"):
        loader = TokenBatchLoader(
            tokenizer, args.device_batch_size, seq_len, split, device, args.source, get_rank(), world_size
        )
        with loader, autocast_context(torch.device(device)):
            out[f"{split}_bpb"] = evaluate_bpb(model, iter(loader), steps, token_bytes)
        print0(f"{split} bpb: {out[f'{split}_bpb']:.4f}")
    if get_rank() == 0:
        with autocast_context(torch.device(device)):
            out["samples"] = [
                sample_greedy(model, tokenizer, q, SAMPLE_TOKENS, device) for q in SAMPLE_PROMPTS
            ]
        print0("samples:\n" + "\n".join(f"  {s!r}" for s in out["samples"]))
    return out


if __name__ == "__main__":
    run_cli(main)
