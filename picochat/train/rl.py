"""Reinforcement learning on a task with checkable answers: `picochat train rl` (or `torchrun ... -m
picochat.train.rl`).

`--task` picks the questions and their reward (`RL_TASKS`): GSM8K word problems (nanochat's choice, the
default; a model of a few million parameters scores about 0 there, so its reward stays flat) or
SpellingBee letter counting (the laptop default of runs/cpu.sh: its depth-4 SFT model is right on about
64% of the questions, so a group of samples holds both right and wrong answers and RL has something to
push).

A simplified GRPO, on-policy, as in nanochat's chat_rl. Each step takes `--examples-per-step` training
questions of the task (split across ranks) and, for each question:
  1. samples `--num-samples` replies with the engine (tools on: calculator calls are answered mid-reply);
  2. rewards each reply 1 if its final answer ("#### 42") is right, else 0 (`Task.reward`);
  3. gives each reply the advantage `reward - mean reward of its group` (no std normalisation), so a
     right answer among wrong ones is pushed up, a wrong one among right ones pushed down, and a
     group that is all right or all wrong teaches nothing;
  4. accumulates the gradient of the policy-gradient loss -(log p(token) * advantage), averaged over
     the tokens the model sampled itself (not the prompt, not forced tool outputs, not padding), in
     chunks of `--device-batch-size` replies.
Then one Muon + AdamW step, with the learning rates scaled by `--init-lr-frac` and decayed linearly
to 0 over `--num-iterations`. Every `--eval-every` steps it measures pass@k (k = 1..num_samples: does any of
the first k samples answer right?) on the first `--eval-examples` test questions of the task. The mean
reward of each step's samples is a metrics line field (`reward`): the report plots it.

Questions whose prompt plus `--max-new-tokens` does not fit `--max-seq-len` (default: the model's context)
are left out, so every sampled sequence is one the model can be trained on. Sampling seeds come from the
question's position, so a `--resume`d run samples exactly what an uninterrupted one would have.

RL runs on the shared loop (train/loop.py `Trainer`): --max-minutes, step lines, the non-finite loss
stop, checkpoints and exact --resume, wandb with --run, and the summary work as in the other stages.

Input: a checkpoint of stage `-i` (default sft). Output: checkpoints/rl/<model_tag>/, metrics as JSON
lines in $PICOCHAT_HOME/runs/<run>/metrics.jsonl, and the report section "rl".
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

from picochat.checkpoint import checkpoint_dir_for, find_model_tag, load_model
from picochat.common import (
    PicochatError,
    autocast_context,
    distributed_runtime,
    pass_bar,
    print0,
    run_cli,
)
from picochat.engine import Engine
from picochat.sampling import SamplingParams
from picochat.tasks import GSM8K, SpellingBee, Task
from picochat.train import flags
from picochat.train.loop import Evaluation, Trainer, all_reduce_sum, sync_gradients, wrap_model

INPUT_STAGES = ("imported", "base", "mid", "sft", "rl")
SPELLING_TRAIN_QUESTIONS = 5000  # generated SpellingBee questions cycled through in training


def gsm8k(split: str, source: str) -> Task:
    return GSM8K(split, source=source)


def spellingbee(split: str, source: str) -> Task:
    """Letter counting on the bundled word list (`source` does not apply: there is one copy)."""
    return SpellingBee(split, size=SPELLING_TRAIN_QUESTIONS if split == "train" else 1000)


# --task name -> (split, source) -> the task; both score replies that end with "#### <number>".
RL_TASKS = {"gsm8k": gsm8k, "spellingbee": spellingbee}

# ---------------------------------------------------------------------------------------------
# Arguments


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Reinforcement learning on GSM8K or SpellingBee (--task): sample several answers per "
        "question (calculator on), reward the right final answers and push the model towards them "
        "(GRPO-style policy gradient against the group's mean reward). Defaults follow nanochat; on a CPU "
        "shrink --examples-per-step, --num-samples, --max-new-tokens and --num-iterations, and pick "
        "--task spellingbee, which a small model can learn.",
    )
    g = flags.groups(p)
    m = g["input and output"]
    flags.add_input_args(m, "sft", INPUT_STAGES)
    m.add_argument(
        "--task",
        choices=sorted(RL_TASKS),
        default="gsm8k",
        help="questions and reward: gsm8k word problems, or spellingbee letter counting (learnable by a "
        "small model)",
    )
    flags.add_source_arg(m, "GSM8K copy (SpellingBee is always bundled)")
    g["model"].add_argument(
        "--max-seq-len",
        type=int,
        default=-1,
        help="longest prompt + reply in tokens (longer questions are left out); -1 = the model's context",
    )
    r = g["batch and horizon"]
    flags.add_horizon_args(r, "one pass over the questions")
    r.add_argument("--examples-per-step", type=int, default=16, help="questions per step over all processes")
    r.add_argument("--num-samples", type=int, default=16, help="replies sampled per question (the group)")
    r.add_argument(
        "--device-batch-size", type=int, default=8, help="replies per forward/backward pass (memory only)"
    )
    r.add_argument("--max-new-tokens", type=int, default=256, help="longest reply sampled, in tokens")
    r.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    r.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0 = all)")
    r.add_argument("--seed", type=int, default=42, help="seed of the sampling")
    flags.add_optim_args(g["optimisation"], init_lr_frac=0.05)
    p.set_defaults(grad_clip=0.0)  # RL does not clip, as in nanochat
    e = g["evaluation, logging and checkpoints"]
    flags.add_output_args(e, "rl", eval_every=60, save_every=60)
    e.add_argument(
        "--eval-examples", type=int, default=400, help="test questions for pass@k (0 = no evaluation)"
    )
    flags.add_runtime_args(g["runtime"])
    return p


# ---------------------------------------------------------------------------------------------
# The maths, as small pure functions


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Advantage of each sample of one question's group: its reward minus the group's mean reward."""
    return rewards - rewards.mean()


def policy_gradient_loss(logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """-(log-probability * advantage), summed over the valid tokens and divided by their number.

    logp (B, T): log-probabilities of the sequences' tokens; mask (B, T): 1 on tokens the model sampled;
    advantages (B,): one per sequence. Minimising it raises the log-probability of the tokens of
    sequences with a positive advantage and lowers those with a negative one.
    """
    weighted = logp * mask * advantages[:, None]
    return -weighted.sum() / mask.sum().clamp(min=1)


def pad_rollouts(
    sequences: list[list[int]], masks: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, mask) tensors (B, T-1) for next-token log-probabilities of padded sequences.

    targets[b, t] is token t+1 of sequence b; mask is 1 where that token was sampled by the model
    (the engine's mask: 0 on the prompt and on forced tool output) and 0 on padding. Masked targets are
    -1, which the model's loss ignores.
    """
    length = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_id] * (length - len(s)) for s in sequences], dtype=torch.long)
    valid = torch.tensor([m + [0] * (length - len(m)) for m in masks], dtype=torch.long)
    targets = ids[:, 1:].masked_fill(valid[:, 1:] == 0, -1)
    return ids[:, :-1].to(device), targets.to(device), valid[:, 1:].float().to(device)


def pass_at_k_counts(outcomes: torch.Tensor) -> torch.Tensor:
    """outcomes (N questions, S samples) of 0/1 -> (S,): how many questions have a right answer among
    their first k samples, for k = 1..S (divide by N for pass@k)."""
    return outcomes.cummax(dim=1).values.sum(dim=0)


def sampling_seed(seed: int, stream: str, index: int) -> int:
    """A distinct, reproducible sampling seed for question `index` of a stream ("train" or "eval"):
    even numbers for training questions, odd ones for evaluation questions."""
    return (seed * 1_000_003 + index) * 2 + (stream == "eval")


# ---------------------------------------------------------------------------------------------
# The run


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = flags.parse(build_parser(prog), argv)
    with distributed_runtime(args.device_type) as (rank, world_size, device):
        RLTrainer(args, rank, world_size, device).run()
    return 0


class RLTrainer(Trainer):
    """One RL run on the shared loop: a step's batch is the rollouts of its questions with their
    advantages, its evaluation pass@k; the data position is the next training question."""

    stage = "rl"

    def __init__(self, args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> None:
        _check_args(args, world_size)
        model_tag = args.model_tag or find_model_tag(args.stage)
        run_name = args.run or f"rl_{model_tag}"
        super().__init__(args, rank, world_size, device, checkpoint_dir_for("rl", model_tag), run_name)
        self.model_tag = model_tag
        stage, step = ("rl", None) if self.resumed else (args.stage, args.step)
        self.model, self.tokenizer, meta = load_model(stage, model_tag, step, device, phase="train")
        # the checkpoint this run started from (a resumed run keeps its original input)
        started_from = {"stage": args.stage, "model_tag": model_tag, "step": meta["step"]}
        self.input = meta["input"] if self.resumed else started_from
        context = self.model.config.sequence_len
        self.seq_len = args.max_seq_len if args.max_seq_len > 0 else context
        if self.seq_len > context:
            raise PicochatError(
                f"--max-seq-len {self.seq_len} is longer than the model's context ({context}); lower it"
            )
        self.engine = Engine(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.encode_special("<|assistant_end|>")
        make_task = RL_TASKS[args.task]
        self.task = make_task("train", args.source)  # scores replies to any question of the task
        self.train_questions = self._fitting(self.task, args.task)
        self.eval_questions = self._fitting(make_task("test", args.source), args.task)[: args.eval_examples]
        self.flops_per_token = float(self.model.estimate_flops())
        self.schedule = (0.0, 1.0, 0.0)  # linear decay from 1 to 0 over the run
        self.optimizers = self.model.setup_optimizers(
            unembedding_lr=args.unembedding_lr * args.init_lr_frac,
            embedding_lr=args.embedding_lr * args.init_lr_frac,
            matrix_lr=args.matrix_lr * args.init_lr_frac,
            weight_decay=args.weight_decay,
        )
        default_steps = max(1, len(self.train_questions) // args.examples_per_step)
        self.start(args.num_iterations if args.num_iterations > 0 else default_steps)
        data = self.restore(weights_from=meta, check=self._check_resume) if self.resumed else None
        self.next_question = data["next_question"] if data else 0  # position in the endless cycle
        self.train_model = wrap_model(self.model, world_size, compile_model=False)
        print0(
            f"RL on {args.task} from {self.input['stage']}/{model_tag} step {self.input['step']}: "
            f"{len(self.train_questions):,} training questions, {len(self.eval_questions)} for pass@k, "
            f"{self.state.horizon} steps of {args.examples_per_step} questions x {args.num_samples} samples"
        )

    def _fitting(self, task: Task, name: str) -> list[dict[str, Any]]:
        """The task's questions whose prompt leaves room for --max-new-tokens within --max-seq-len."""
        room = self.seq_len - self.args.max_new_tokens
        questions = [conv for conv in task if len(self.tokenizer.render_for_completion(conv)) <= room]
        if not questions:
            raise PicochatError(
                f"no {name} {task.split} question fits in {self.seq_len} tokens with --max-new-tokens "
                f"{self.args.max_new_tokens}; lower --max-new-tokens (or raise --max-seq-len)"
            )
        return questions

    # -- the stage's hooks

    def forward_backward(self) -> tuple[float, int]:
        """Roll out this rank's questions and accumulate their gradients; (loss, tokens) over all ranks."""
        args = self.args
        positions = range(
            self.next_question + self.rank, self.next_question + args.examples_per_step, self.world_size
        )
        # sums over this rank's samples: reward, sequence tokens, reply tokens, samples, loss, passes
        totals = torch.zeros(6, dtype=torch.float64, device=self.device)
        for i, position in enumerate(positions):
            last_question = i == len(positions) - 1
            totals += self.learn_from(position, len(positions), last_question).to(self.device)
        totals = all_reduce_sum(totals)
        self.next_question += args.examples_per_step
        samples = totals[3].item()
        self.step_extra = {
            "reward": totals[0].item() / samples,
            "seq_len": totals[1].item() / samples,
            "reply_len": totals[2].item() / samples,
        }
        self.state.figures["reward"] = self.step_extra["reward"]  # kept across --resume for the summary
        return totals[4].item() / totals[5].item(), int(totals[1].item())

    def step(self) -> None:
        super().step()
        self.step_fields["reward"] = f"{self.step_extra['reward']:.3f}"

    def data_state(self) -> dict[str, int]:
        return {"next_question": self.next_question}

    def evaluations(self) -> list[Evaluation]:
        return [Evaluation(self.args.eval_every if self.eval_questions else -1, self.evaluate_pass_at_k)]

    def sampling(self, seed: int) -> SamplingParams:
        """The rollouts' sampling settings, with this question's seed."""
        args = self.args
        return SamplingParams(
            temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_new_tokens, seed=seed
        )

    def learn_from(self, position: int, questions_per_rank: int, last_question: bool) -> torch.Tensor:
        """Sample a group of replies to one question and accumulate its policy-gradient gradient.

        Returns this question's sums [reward, sequence tokens, reply tokens, samples, loss, passes].
        """
        args = self.args
        conversation = self.train_questions[position % len(self.train_questions)]
        prompt = self.tokenizer.render_for_completion(conversation)
        sequences, masks = self.engine.generate_batch(
            prompt, args.num_samples, self.sampling(sampling_seed(args.seed, "train", position))
        )
        rewards = torch.tensor(
            [self.task.reward(conversation, self.tokenizer.decode(s[len(prompt) :])) for s in sequences]
        )
        advantages = group_advantages(rewards).to(self.device)
        inputs, targets, mask = pad_rollouts(sequences, masks, self.pad_id, self.device)
        chunks = range(0, args.num_samples, args.device_batch_size)
        loss_sum = 0.0
        for c, start in enumerate(chunks):
            rows = slice(start, start + args.device_batch_size)
            # DDP averages gradients over ranks only on the step's very last backward pass.
            sync = last_question and c == len(chunks) - 1
            with sync_gradients(self.train_model, sync):
                with autocast_context(self.device):
                    logp = -self.train_model(inputs[rows], targets[rows], loss_reduction="none")
                loss = policy_gradient_loss(logp, mask[rows], advantages[rows])
                (loss / (len(chunks) * questions_per_rank)).backward()
            loss_sum += loss.item()
        seq_tokens = sum(len(s) for s in sequences)
        reply_tokens = seq_tokens - len(prompt) * len(sequences)
        return torch.tensor(
            [rewards.sum().item(), seq_tokens, reply_tokens, len(sequences), loss_sum, len(chunks)],
            dtype=torch.float64,
        )

    @torch.no_grad()
    def evaluate_pass_at_k(self) -> dict[str, float]:
        """pass@k for k = 1..num_samples on the held-out questions (split across ranks)."""
        args = self.args
        outcomes = []
        mine = range(self.rank, len(self.eval_questions), self.world_size)
        for index in pass_bar(mine, "pass@k"):
            conversation = self.eval_questions[index]
            prompt = self.tokenizer.render_for_completion(conversation)
            sequences, _ = self.engine.generate_batch(
                prompt, args.num_samples, self.sampling(sampling_seed(args.seed, "eval", index))
            )
            replies = [self.tokenizer.decode(s[len(prompt) :]) for s in sequences]
            outcomes.append([float(self.task.evaluate(conversation, r)) for r in replies])
        outcomes_t = torch.tensor(outcomes, dtype=torch.float64, device=self.device)
        counts = pass_at_k_counts(outcomes_t.view(-1, args.num_samples))
        count = torch.tensor([len(outcomes)], dtype=torch.float64, device=self.device)
        totals = all_reduce_sum(torch.cat([counts, count]))
        n = max(1.0, totals[-1].item())
        return {f"pass@{k + 1}": c / n for k, c in enumerate(totals[:-1].tolist())}

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"input": self.input, "task": self.args.task}

    def _check_resume(self, meta: dict[str, Any]) -> None:
        saved = meta.get("task", "gsm8k")  # checkpoints from before --task existed trained on GSM8K
        if saved != self.args.task:
            raise PicochatError(
                f"cannot resume: {meta['path']} is RL on {saved}, not {self.args.task}; "
                f"pass --task {saved} (or start a new run without --resume)"
            )

    def summary_extra(self) -> dict[str, Any]:
        args, figures = self.args, self.state.figures
        return {
            "input": self.input,
            "task": args.task,
            "examples_per_step": args.examples_per_step,
            "num_samples": args.num_samples,
            "max_new_tokens": args.max_new_tokens,
            "init_lr_frac": args.init_lr_frac,
            "final_reward": figures.get("reward", math.nan),
            "eval_examples": len(self.eval_questions),
            "pass_at_k": {k: v for k, v in figures.items() if k.startswith("pass@")},
        }


def _check_args(args: argparse.Namespace, world_size: int) -> None:
    positive = ("examples_per_step", "num_samples", "device_batch_size", "max_new_tokens")
    for name in positive:
        if getattr(args, name) < 1:
            raise PicochatError(f"--{name.replace('_', '-')} must be at least 1")
    if args.num_samples % args.device_batch_size:  # every chunk of a group must weigh the same
        raise PicochatError(
            f"--device-batch-size {args.device_batch_size} must divide --num-samples {args.num_samples}"
        )
    if args.examples_per_step % world_size:
        # DDP needs the same number of backward passes on every rank.
        raise PicochatError(
            f"--examples-per-step {args.examples_per_step} must be a multiple of the {world_size} processes"
        )


if __name__ == "__main__":
    run_cli(main)
