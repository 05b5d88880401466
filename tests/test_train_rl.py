"""RL on GSM8K and SpellingBee: the policy-gradient maths by hand, and short real runs of `train rl`."""

from __future__ import annotations

import json
import os

import pytest
import torch
from post_fixtures import MODEL_TAG, make_home, tiny_config
from torchrun import run_torchrun

from picochat.checkpoint import checkpoint_dir_for, list_steps, load_model
from picochat.common import REPO_DIR, PicochatError, get_base_dir
from picochat.gpt import GPT
from picochat.tasks.base import assistant_text
from picochat.train.rl import (
    RL_TASKS,
    RLTrainer,
    build_parser,
    group_advantages,
    main,
    pad_rollouts,
    pass_at_k_counts,
    policy_gradient_loss,
)

TINY = [
    "--examples-per-step", "2", "--num-samples", "4", "--device-batch-size", "2", "--max-new-tokens", "12",
    "--eval-examples", "2", "--eval-every", "2", "--save-every", "2", "--init-lr-frac", "1",
]  # fmt: skip

# ---------------------------------------------------------------------------------------------
# The maths


def test_advantages_are_rewards_minus_group_mean():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0]))
    assert adv.tolist() == pytest.approx([0.4, -0.6, -0.6, 0.4, 0.4])
    assert group_advantages(torch.tensor([0.0, 0.0, 0.0])).abs().sum() == 0  # nothing to learn


def test_policy_gradient_loss_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -1.0, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    advantages = torch.tensor([0.5, -0.5])
    # -(0.5 * (-1 - 2) + (-0.5) * (-0.5)) / 3 valid tokens = -(-1.5 + 0.25) / 3
    assert policy_gradient_loss(logp, mask, advantages).item() == pytest.approx(1.25 / 3)
    # masked tokens (padding, forced tool output) do not count, whatever their log-probability
    logp_masked_changed = logp.clone()
    logp_masked_changed[0, 2] = -100.0
    assert policy_gradient_loss(logp_masked_changed, mask, advantages).item() == pytest.approx(1.25 / 3)
    assert policy_gradient_loss(logp, torch.zeros_like(mask), advantages).item() == 0.0


def test_pad_rollouts_masks_prompt_forced_tokens_and_padding():
    # prompt [1, 2]; row 0 sampled 3, 4, then a forced tool-output token 5; row 1 sampled 6 only
    sequences = [[1, 2, 3, 4, 5], [1, 2, 6]]
    masks = [[0, 0, 1, 1, 0], [0, 0, 1]]
    inputs, targets, mask = pad_rollouts(sequences, masks, pad_id=9)
    assert inputs.tolist() == [[1, 2, 3, 4], [1, 2, 6, 9]]
    assert targets.tolist() == [[-1, 3, 4, -1], [-1, 6, -1, -1]]
    assert mask.tolist() == [[0, 1, 1, 0], [0, 1, 0, 0]]


def test_pass_at_k():
    outcomes = torch.tensor([[0, 1, 0], [0, 0, 0], [1, 0, 1], [0, 0, 1]])
    assert pass_at_k_counts(outcomes).tolist() == [1, 2, 3]  # any right among the first k samples


def test_positive_advantage_raises_log_probability():
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size=64, sequence_len=16))
    model.init_weights()
    seqs = torch.randint(0, 64, (2, 9))
    inputs, targets = seqs[:, :-1], seqs[:, 1:]
    mask = torch.ones(2, 8)

    def logp_sums() -> torch.Tensor:
        with torch.no_grad():
            return -model(inputs, targets, loss_reduction="none").sum(dim=1)

    before = logp_sums()
    logp = -model(inputs, targets, loss_reduction="none")
    policy_gradient_loss(logp, mask, torch.tensor([1.0, -1.0])).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    after = logp_sums()
    assert after[0] > before[0] + 1e-3  # the rewarded sequence became more likely
    assert after[1] < before[1] - 1e-3  # the penalised one less likely


def test_every_flag_has_help():
    for action in build_parser()._actions:
        assert action.help, action.option_strings


# ---------------------------------------------------------------------------------------------
# Real runs on a tiny model


def _metrics() -> list[dict]:
    path = get_base_dir() / "runs" / f"rl_{MODEL_TAG}" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_short_run_saves_reloads_records_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    make_home("sft")
    assert main([*TINY, "--num-iterations", "3"]) == 0

    ckpt_dir = checkpoint_dir_for("rl", MODEL_TAG)
    assert list_steps(ckpt_dir) == [2, 3]
    model, _, meta = load_model("rl", device="cpu")
    assert meta["step"] == 3 and meta["input"] == {"stage": "sft", "model_tag": MODEL_TAG, "step": 0}
    rows = _metrics()
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(0.0 <= r["reward"] <= 1.0 and r["seq_len"] > r["reply_len"] > 0 for r in train)
    if all(r["reward"] == 0 for r in train):  # (the random model's usual case) no advantage, no update
        sft_model, _, _ = load_model("sft", device="cpu")
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), sft_model.parameters(), strict=True))
    assert [r["lr_mult"] for r in train] == pytest.approx([1.0, 2 / 3, 1 / 3])
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 3]
    assert set(evals[0]) >= {"pass@1", "pass@4"}

    section = json.loads((get_base_dir() / "report" / "rl.json").read_text())
    assert section["steps"] == 3 and section["model_tag"] == MODEL_TAG
    assert set(section["pass_at_k"]) == {"pass@1", "pass@2", "pass@3", "pass@4"}
    assert 0.0 <= section["final_reward"] <= 1.0 and section["final_reward"] == train[-1]["reward"]

    with pytest.raises(PicochatError, match="--resume"):  # refuses to silently replace the run
        main([*TINY, "--num-iterations", "3"])

    with pytest.raises(PicochatError, match="is RL on gsm8k, not spellingbee; pass --task gsm8k"):
        main([*TINY, "--num-iterations", "5", "--resume", "--task", "spellingbee"])
    assert list_steps(ckpt_dir) == [2, 3]  # the refused resume wrote nothing
    assert main([*TINY, "--num-iterations", "5", "--resume"]) == 0
    assert list_steps(ckpt_dir) == [2, 3, 4, 5]
    train = [r for r in _metrics() if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]  # continued, nothing repeated
    assert [r["lr_mult"] for r in train[3:]] == pytest.approx([2 / 5, 1 / 5])  # the new horizon
    _, _, meta = load_model("rl", device="cpu")
    assert meta["rank_state"]["data"] == {"next_question": 10} and meta["input"]["stage"] == "sft"


def test_device_batch_must_divide_the_group(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    make_home("sft")
    with pytest.raises(PicochatError, match="must divide --num-samples"):
        main(["--num-samples", "4", "--device-batch-size", "3", "--num-iterations", "1"])


def test_missing_input_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    make_home("base")
    with pytest.raises(PicochatError, match="no sft checkpoints found.*picochat train sft"):
        main([*TINY, "--num-iterations", "1"])
    with pytest.raises(PicochatError, match="--resume: no checkpoint"):
        main([*TINY, "-i", "base", "--resume"])


def test_rigged_reward_changes_the_policy(tmp_path, monkeypatch):
    """Reward replies that start with a space: RL must make such first tokens more likely."""
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    tokenizer, sft_model = make_home("sft")
    from picochat.tasks import GSM8K

    monkeypatch.setattr(GSM8K, "reward", lambda self, conv, completion: float(completion.startswith(" ")))
    prompt = torch.tensor([tokenizer.render_for_completion(GSM8K("test")[0])])
    spaced = [t for t in range(tokenizer.get_vocab_size()) if tokenizer.decode([t]).startswith(" ")]

    def spaced_mass(model: GPT) -> float:
        with torch.no_grad():
            return model(prompt)[0, -1].softmax(-1)[spaced].sum().item()

    args = ["--num-iterations", "6", "--num-samples", "8", "--device-batch-size", "8",
            "--max-new-tokens", "2",
            "--examples-per-step", "2", "--eval-every", "0", "--eval-examples", "1",
            "--init-lr-frac", "1"]  # fmt: skip
    assert main(args) == 0
    before, after = spaced_mass(sft_model), spaced_mass(load_model("rl", device="cpu")[0])
    assert after > before + 0.05, (before, after)
    # the mean reward is recorded per step (the report plots it) and rises as the policy learns
    rewards = [r["reward"] for r in _metrics() if r["kind"] == "train"]
    assert len(rewards) == 6 and sum(rewards[-2:]) > sum(rewards[:2]), rewards


def test_spellingbee_task_is_selectable_and_rewards_the_right_count(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    make_home("sft")
    task = RL_TASKS["spellingbee"]("train", "bundled")
    conversation = task[0]
    reference = assistant_text(conversation["messages"][-1])
    count = int(reference.rsplit("#### ", 1)[1])
    assert task.reward(conversation, f"I count them.\n#### {count}") == 1.0
    assert task.reward(conversation, f"#### {count + 1}") == 0.0
    assert task.reward(conversation, "no final answer") == 0.0

    trainer = RLTrainer(build_parser().parse_args([*TINY, "--task", "spellingbee", "--num-iterations", "2"]),
                        0, 1, torch.device("cpu"))  # fmt: skip
    assert trainer.train_questions[0] == conversation  # the questions are SpellingBee's, in order
    assert trainer.eval_questions[0] == RL_TASKS["spellingbee"]("test", "bundled")[0]
    trainer.run()
    section = json.loads((get_base_dir() / "report" / "rl.json").read_text())
    assert section["task"] == "spellingbee" and section["steps"] == 2
    assert all(0.0 <= r["reward"] <= 1.0 for r in _metrics() if r["kind"] == "train")
    with pytest.raises(SystemExit):  # an unknown task is refused by the parser
        build_parser().parse_args(["--task", "chess"])


def test_two_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    make_home("sft")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_torchrun(["-m", "picochat.train.rl", *TINY, "--num-iterations", "2"], env, timeout=120, cwd=REPO_DIR)
    rows = [json.loads(line) for line in (tmp_path / "runs" / f"rl_{MODEL_TAG}" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]  # rank 0 alone writes
    evals = [r for r in rows if r["kind"] == "eval"]
    assert len(evals) == 2
    section = json.loads((tmp_path / "report" / "rl.json").read_text())
    assert section["processes"] == 2 and section["eval_examples"] == 2


def test_shared_loop_max_minutes_and_plain_step_lines(tmp_path, monkeypatch, capsys):
    """RL runs on the shared Trainer: --max-minutes stops it cleanly, with plain step lines in a log."""
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    make_home("sft")
    assert main([*TINY, "--num-iterations", "50", "--max-minutes", "0.0001", "--eval-examples", "0"]) == 0
    section = json.loads((get_base_dir() / "report" / "rl.json").read_text())
    assert 1 <= section["steps"] < 50 and "mfu_percent" in section
    assert list_steps(checkpoint_dir_for("rl", MODEL_TAG)) == [section["steps"]]
    out = capsys.readouterr().out
    assert "step 1/" in out and "reward" in out and "tok/s" in out
