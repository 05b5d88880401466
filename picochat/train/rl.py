"""Reinforcement learning on GSM8K: `picochat train rl` (or `torchrun ... -m picochat.train.rl`).

A simplified GRPO, on-policy, as in nanochat's chat_rl. Each step takes `--examples-per-step` GSM8K
training questions (split across ranks) and, for each question:
  1. samples `--num-samples` replies with the engine (tools on: calculator calls are answered mid-reply);
  2. rewards each reply 1 if its final answer ("#### 42") is right, else 0 (`GSM8K.reward`);
  3. gives each reply the advantage `reward - mean reward of its group` (no std normalisation), so a
     right answer among wrong ones is pushed up, a wrong one among right ones pushed down, and a
     group that is all right or all wrong teaches nothing;
  4. accumulates the gradient of the policy-gradient loss -(log p(token) * advantage), averaged over
     the tokens the model sampled itself (not the prompt, not forced tool outputs, not padding), in
     chunks of `--device-batch-size` replies.
Then one Muon + AdamW step, with the learning rates scaled by `--init-lr-frac` and decayed linearly
to 0 over `--num-steps`. Every `--eval-every` steps it measures pass@k (k = 1..num_samples: does any of
the first k samples answer right?) on the first `--eval-examples` GSM8K test questions.

Questions whose prompt plus `--max-new-tokens` does not fit the model's context are left out, so every
sampled sequence is one the model can be trained on. Sampling seeds come from the question's position,
so a `--resume`d run samples exactly what an uninterrupted one would have.

Input: a checkpoint of stage `-i` (default sft). Output: checkpoints/rl/<model_tag>/, metrics as JSON
lines in $PICOCHAT_HOME/runs/<run>/metrics.jsonl, and the report section "rl".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from picochat.checkpoint import (
    check_resume,
    checkpoint_dir_for,
    find_model_tag,
    load_checkpoint,
    load_model,
    restore_optimizers,
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
    run_cli,
)
from picochat.engine import Engine
from picochat.report import record
from picochat.tasks import GSM8K
from picochat.train.base import every, start_afresh, trim_metrics, wrap_model

INPUT_STAGES = ("imported", "base", "mid", "sft", "rl")

# ---------------------------------------------------------------------------------------------
# Arguments


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Reinforcement learning on GSM8K: sample several answers per question (calculator on), "
        "reward the right final answers and push the model towards them (GRPO-style policy gradient "
        "against the group's mean reward). Defaults follow nanochat; on a CPU shrink --examples-per-step, "
        "--num-samples, --max-new-tokens and --num-steps.",
    )
    m = p.add_argument_group("input and output")
    m.add_argument(
        "-i", "--stage", choices=INPUT_STAGES, default="sft", help="stage of the checkpoint to start from"
    )
    m.add_argument(
        "--model-tag", default=None, help="model tag to load and save under (default: the deepest d<N>)"
    )
    m.add_argument("--step", type=int, default=None, help="step of the input checkpoint (default: latest)")
    m.add_argument(
        "--data", choices=("bundled", "hub"), default="bundled", help="GSM8K copy: bundled or the HF hub"
    )
    r = p.add_argument_group("rollouts")
    r.add_argument(
        "--num-steps", type=int, default=-1, help="optimiser steps; -1 = one pass over the questions"
    )
    r.add_argument("--examples-per-step", type=int, default=16, help="questions per step over all processes")
    r.add_argument("--num-samples", type=int, default=16, help="replies sampled per question (the group)")
    r.add_argument(
        "--device-batch-size", type=int, default=8, help="replies per forward/backward pass (memory only)"
    )
    r.add_argument("--max-new-tokens", type=int, default=256, help="longest reply sampled, in tokens")
    r.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    r.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (0 = all)")
    r.add_argument("--seed", type=int, default=42, help="seed of the sampling")
    o = p.add_argument_group("optimisation")
    o.add_argument("--embedding-lr", type=float, default=0.2, help="AdamW LR of the token embedding")
    o.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW LR of the lm_head")
    o.add_argument("--matrix-lr", type=float, default=0.02, help="Muon LR of the transformer matrices")
    o.add_argument("--weight-decay", type=float, default=0.0, help="weight decay of the AdamW groups")
    o.add_argument("--init-lr-frac", type=float, default=0.05, help="start at this fraction of the LRs above")
    e = p.add_argument_group("evaluation, logging and checkpoints")
    e.add_argument(
        "--eval-every", type=int, default=60, help="pass@k on held-out questions every N steps (0 = end only)"
    )
    e.add_argument(
        "--eval-examples", type=int, default=400, help="GSM8K test questions for pass@k (0 = no evaluation)"
    )
    e.add_argument("--save-every", type=int, default=60, help="checkpoint every N steps (0 = end only)")
    e.add_argument("--keep-last", type=int, default=0, help="keep only the last K checkpoints (0 = all)")
    e.add_argument("--run", default=None, help="metrics folder name (default: rl_<model tag>)")
    e.add_argument("--resume", action="store_true", help="continue from the latest rl checkpoint of this tag")
    e.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh even if this model tag already has rl checkpoints",
    )
    e.add_argument("--device-type", default="", help="cuda | cpu | mps (default: autodetect)")
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


def lr_decay(step: int, num_steps: int) -> float:
    """The learning-rate multiplier: linear from 1 at step 0 to 0 at num_steps."""
    return 1.0 - step / num_steps


def sampling_seed(seed: int, stream: str, index: int) -> int:
    """A distinct, reproducible sampling seed for question `index` of a stream ("train" or "eval"):
    even numbers for training questions, odd ones for evaluation questions."""
    return (seed * 1_000_003 + index) * 2 + (stream == "eval")


# ---------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class LoopState:
    """What a resumed run must continue besides weights and optimiser state."""

    step: int = 0
    num_steps: int = 0
    next_question: int = 0  # position in the endless cycle over the training questions
    train_seconds: float = 0.0
    reward: float = float("nan")  # mean reward of the last step
    pass_at_k: dict[str, float] = dataclasses.field(default_factory=dict)  # of the last evaluation


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    with distributed_runtime(args.device_type) as (rank, world_size, device):
        RLTrainer(args, rank, world_size, device).run()
    return 0


class RLTrainer:
    """One RL run: load the input (or the run to resume), roll out, update, evaluate, save."""

    def __init__(self, args: argparse.Namespace, rank: int, world_size: int, device: torch.device) -> None:
        _check_args(args, world_size)
        self.args, self.rank, self.world_size, self.device = args, rank, world_size, device
        self.model_tag = args.model_tag or find_model_tag(args.stage)
        self.ckpt_dir = checkpoint_dir_for("rl", self.model_tag)
        self.run_dir = get_base_dir() / "runs" / (args.run or f"rl_{self.model_tag}")
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.resumed = check_resume(self.ckpt_dir, args.resume, args.overwrite)

        stage, step = ("rl", None) if self.resumed else (args.stage, args.step)
        self.model, self.tokenizer, meta = load_model(stage, self.model_tag, step, device, phase="train")
        # the checkpoint this run started from (a resumed run keeps its original input)
        started_from = {"stage": args.stage, "model_tag": self.model_tag, "step": meta["step"]}
        self.input = meta["input"] if self.resumed else started_from
        self.engine = Engine(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.encode_special("<|assistant_end|>")
        self.task = GSM8K("train", source=args.data)  # scores replies to any GSM8K question
        self.train_questions = self._fitting(self.task)
        self.eval_questions = self._fitting(GSM8K("test", source=args.data))[: args.eval_examples]

        self.optimizers = self.model.setup_optimizers(
            unembedding_lr=args.unembedding_lr * args.init_lr_frac,
            embedding_lr=args.embedding_lr * args.init_lr_frac,
            matrix_lr=args.matrix_lr * args.init_lr_frac,
            weight_decay=args.weight_decay,
        )
        default_steps = max(1, len(self.train_questions) // args.examples_per_step)
        self.state = LoopState(num_steps=args.num_steps if args.num_steps > 0 else default_steps)
        if self.resumed:
            self._restore(meta)
        self.train_model = wrap_model(self.model, world_size, compile_model=False)
        print0(
            f"RL from {self.input['stage']}/{self.model_tag} step {self.input['step']}: "
            f"{len(self.train_questions):,} training questions, {len(self.eval_questions)} for pass@k, "
            f"{self.state.num_steps} steps of {args.examples_per_step} questions x {args.num_samples} samples"
        )

    # -- set-up helpers

    def _fitting(self, task: GSM8K) -> list[dict[str, Any]]:
        """The task's questions whose prompt leaves room for --max-new-tokens in the model's context."""
        room = self.model.config.sequence_len - self.args.max_new_tokens
        questions = [conv for conv in task if len(self.tokenizer.render_for_completion(conv)) <= room]
        if not questions:
            raise PicochatError(
                f"no GSM8K {task.split} question fits the model's context ({self.model.config.sequence_len} "
                f"tokens) with --max-new-tokens {self.args.max_new_tokens}; lower --max-new-tokens"
            )
        return questions

    def _restore(self, meta: dict[str, Any]) -> None:
        ckpt = load_checkpoint(self.ckpt_dir, meta["step"], self.device)
        restore_optimizers(self.optimizers, ckpt)
        num_steps = self.state.num_steps
        self.state = LoopState(**ckpt.meta["loop"])
        if self.args.num_steps > 0:  # --num-steps may extend (or shorten) a run
            self.state.num_steps = num_steps
        print0(f"resuming from {ckpt.meta['path']} (step {self.state.step})")
        if self.rank == 0:
            trim_metrics(self.metrics_path, self.state.step)

    # -- the loop

    def run(self) -> dict[str, Any]:
        args, state = self.args, self.state
        start_step = state.step
        if not self.resumed:
            start_afresh(self.rank, self.ckpt_dir, self.metrics_path)
        loop_t0 = time.time() - state.train_seconds
        bar = tqdm(
            total=state.num_steps, initial=state.step, disable=self.rank != 0, unit="step", dynamic_ncols=True
        )
        while True:
            last = state.step >= state.num_steps
            handled = self.resumed and state.step == start_step  # evaluated and saved before the stop
            if not handled and (last or every(args.eval_every, state.step)):
                self.evaluate()
            if not handled and state.step > 0 and (last or every(args.save_every, state.step)):
                self.save()
            if last:
                break
            metrics = self.step()
            state.train_seconds = time.time() - loop_t0
            self.log({**metrics, "train_seconds": state.train_seconds})
            bar.set_postfix(
                reward=f"{metrics['reward']:.3f}", seq_len=f"{metrics['seq_len']:.0f}", refresh=False
            )
            bar.update(1)
        bar.close()
        return self.finish()

    def step(self) -> dict[str, Any]:
        """Roll out this rank's questions, accumulate their gradients, step; metrics over all ranks."""
        args, state = self.args, self.state
        t0 = time.time()
        positions = range(
            state.next_question + self.rank, state.next_question + args.examples_per_step, self.world_size
        )
        # sums over this rank's samples: reward, sequence tokens, reply tokens, samples, loss, passes
        totals = torch.zeros(6, dtype=torch.float64, device=self.device)
        for i, position in enumerate(positions):
            last_question = i == len(positions) - 1
            totals += self.learn_from(position, len(positions), last_question).to(self.device)
        totals = _all_reduce_sum(totals, self.world_size)
        lrm = lr_decay(state.step, state.num_steps)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
            opt.step()
        self.model.zero_grad(set_to_none=True)
        state.step += 1
        state.next_question += args.examples_per_step
        samples = totals[3].item()
        state.reward = totals[0].item() / samples
        return {
            "step": state.step,
            "kind": "train",
            "reward": state.reward,
            "seq_len": totals[1].item() / samples,
            "reply_len": totals[2].item() / samples,
            "loss": totals[4].item() / totals[5].item(),
            "lr_mult": lrm,
            "dt": time.time() - t0,
        }

    def learn_from(self, position: int, questions_per_rank: int, last_question: bool) -> torch.Tensor:
        """Sample a group of replies to one question and accumulate its policy-gradient gradient.

        Returns this question's sums [reward, sequence tokens, reply tokens, samples, loss, passes].
        """
        args = self.args
        conversation = self.train_questions[position % len(self.train_questions)]
        prompt = self.tokenizer.render_for_completion(conversation)
        sequences, masks = self.engine.generate_batch(
            prompt,
            args.num_samples,
            args.max_new_tokens,
            args.temperature,
            args.top_k or None,
            seed=sampling_seed(args.seed, "train", position),
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
            no_sync = isinstance(self.train_model, DDP) and not sync
            with self.train_model.no_sync() if no_sync else contextlib.nullcontext():
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
    def evaluate(self) -> None:
        """pass@k for k = 1..num_samples on the held-out questions (split across ranks)."""
        args = self.args
        if not self.eval_questions:
            return
        outcomes = []
        for index in range(self.rank, len(self.eval_questions), self.world_size):
            conversation = self.eval_questions[index]
            prompt = self.tokenizer.render_for_completion(conversation)
            sequences, _ = self.engine.generate_batch(
                prompt,
                args.num_samples,
                args.max_new_tokens,
                args.temperature,
                args.top_k or None,
                seed=sampling_seed(args.seed, "eval", index),
            )
            replies = [self.tokenizer.decode(s[len(prompt) :]) for s in sequences]
            outcomes.append([float(self.task.evaluate(conversation, r)) for r in replies])
        outcomes_t = torch.tensor(outcomes, dtype=torch.float64, device=self.device)
        counts = pass_at_k_counts(outcomes_t.view(-1, args.num_samples))
        count = torch.tensor([len(outcomes)], dtype=torch.float64, device=self.device)
        totals = _all_reduce_sum(torch.cat([counts, count]), self.world_size)
        n = max(1.0, totals[-1].item())
        self.state.pass_at_k = {f"pass@{k + 1}": c / n for k, c in enumerate(totals[:-1].tolist())}
        if self.rank == 0:
            shown = ", ".join(f"{name} {value:.4f}" for name, value in self.state.pass_at_k.items())
            tqdm.write(f"step {self.state.step:5d} | {shown}")
        self.log(
            {
                "step": self.state.step,
                "kind": "eval",
                **self.state.pass_at_k,
                "train_seconds": self.state.train_seconds,
            }
        )

    def save(self) -> None:
        meta = {
            "model_config": dataclasses.asdict(self.model.config),
            "train_config": vars(self.args),
            "loop": dataclasses.asdict(self.state),
            "input": self.input,
        }
        save_checkpoint(
            self.ckpt_dir,
            self.state.step,
            self.model.state_dict(),
            [opt.state_dict() for opt in self.optimizers],
            meta,
            shard_optim=any(getattr(opt, "sharded_state", False) for opt in self.optimizers),
            keep_last=self.args.keep_last or None,
        )

    def log(self, row: dict[str, Any]) -> None:
        if self.rank == 0:
            append_jsonl(self.metrics_path, row)

    def finish(self) -> dict[str, Any]:
        state, args = self.state, self.args
        summary = {
            "input": self.input,
            "model_tag": self.model_tag,
            "steps": state.step,
            "examples_per_step": args.examples_per_step,
            "num_samples": args.num_samples,
            "max_new_tokens": args.max_new_tokens,
            "init_lr_frac": args.init_lr_frac,
            "processes": self.world_size,
            "device": self.device.type,
            "train_minutes": state.train_seconds / 60,
            "final_reward": state.reward,
            "eval_examples": len(self.eval_questions),
            "pass_at_k": state.pass_at_k,
            "metrics": str(self.metrics_path),
            "checkpoint_dir": str(self.ckpt_dir),
        }
        if self.rank == 0:
            record("rl", summary)
            atomic_write_json(self.run_dir / "summary.json", summary)
            pass1 = state.pass_at_k.get("pass@1", math.nan)
            print0(f"done: {state.step} steps, pass@1 {pass1:.4f}; checkpoints in {self.ckpt_dir}")
        return summary


def _check_args(args: argparse.Namespace, world_size: int) -> None:
    positive = ("examples_per_step", "num_samples", "device_batch_size", "max_new_tokens")
    for name in positive:
        if getattr(args, name) < 1:
            raise PicochatError(f"--{name.replace('_', '-')} must be at least 1")
    if args.examples_per_step % world_size:
        # DDP needs the same number of backward passes on every rank.
        raise PicochatError(
            f"--examples-per-step {args.examples_per_step} must be a multiple of the {world_size} processes"
        )


def _all_reduce_sum(t: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1:
        dist.all_reduce(t)
    return t


if __name__ == "__main__":
    run_cli(main)
