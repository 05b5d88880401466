"""Chat evaluation: categorical scoring with a rigged model, HumanEval scoring through the sandbox,
the ChatCORE arithmetic, and `picochat eval chat` end to end on a tiny checkpoint."""

from __future__ import annotations

import functools
import json
import os

import pytest
import torch
from post_fixtures import make_home
from torchrun import run_torchrun

from picochat.common import REPO_DIR, PicochatError, get_base_dir
from picochat.evals.chat import (
    CHAT_TASKS,
    chat_core,
    evaluate_chat_task,
    main,
    parse_task_names,
    score_chat_task,
)
from picochat.tasks import HumanEval
from picochat.tasks.base import MultipleChoiceTask
from picochat.tokenizer import Tokenizer


@functools.cache
def small_tokenizer() -> Tokenizer:
    return Tokenizer.train_from_iterator(["Which answer is right? A. one B. two C. three D. four"] * 3, 300)


class FixedQuestions(MultipleChoiceTask):
    """A multiple-choice task over hand-written rows."""

    def __init__(self, rows: list[dict]):
        super().__init__()
        self._rows = rows

    @property
    def rows(self) -> list[dict]:
        return self._rows


def questions(answers: list[int]) -> FixedQuestions:
    # Different question lengths, so a batch is padded and each row's last real position differs.
    return FixedQuestions(
        [
            {"question": "Which one? " + "really " * i, "choices": ["w", "x", "y", "z"], "answer": a}
            for i, a in enumerate(answers)
        ]
    )


class PrefersLetter(torch.nn.Module):
    """Logits that favour one token, but only right after `<|assistant_start|>` (a prompt's last real
    token): read at a padding position instead, every letter ties and argmax falls back to "A"."""

    def __init__(self, tokenizer: Tokenizer, letter: str):
        super().__init__()
        self.vocab = tokenizer.get_vocab_size()
        self.trigger = tokenizer.encode_special("<|assistant_start|>")
        self.favourite = tokenizer.encode(letter)[0]
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*idx.shape, self.vocab)
        logits[..., self.favourite] = 50.0 * (idx == self.trigger)
        return logits


@pytest.mark.parametrize("batch_size", [1, 4])
def test_categorical_scoring_picks_the_letter_the_model_prefers(batch_size):
    tok = small_tokenizer()
    model = PrefersLetter(tok, "C")
    assert evaluate_chat_task(model, tok, questions([2] * 6), batch_size=batch_size) == 1.0
    assert evaluate_chat_task(model, tok, questions([0, 1, 3, 0, 1, 3]), batch_size=batch_size) == 0.0
    score = score_chat_task(model, tok, questions([2, 0, 2, 1, 2]), batch_size=batch_size)
    assert (score.correct, score.total, score.too_long) == (3, 5, 0)


class ReplyWith:
    """An engine stand-in whose every sample is the given reply text."""

    max_context = 10_000

    def __init__(self, tokenizer: Tokenizer, reply: str):
        self.reply = tokenizer.encode(reply)

    def generate_batch(self, tokens, num_samples, params):
        return [list(tokens) + self.reply for _ in range(num_samples)], None


def test_humaneval_passes_a_correct_solution_and_fails_a_wrong_one():
    tok = small_tokenizer()
    task = HumanEval(stop=1)
    reference = task[0]["messages"][-1]["content"]  # the prompt + canonical solution in a code block
    wrong = f"```python\n{task[0]['prompt']}    return None\n```"
    model = torch.nn.Linear(1, 1)  # unused: the engine stand-in does the generating
    assert evaluate_chat_task(model, tok, task, engine=ReplyWith(tok, reference)) == 1.0
    assert evaluate_chat_task(model, tok, task, engine=ReplyWith(tok, wrong)) == 0.0


def test_chat_core_is_the_mean_of_baseline_centred_accuracies():
    accuracies = {"ARC-Easy": 0.5, "ARC-Challenge": 0.25, "MMLU": 0.625,
                  "GSM8K": 0.1, "HumanEval": 0.2, "SpellingBee": 0.3}  # fmt: skip
    # centred: (0.5-0.25)/0.75 = 1/3, 0, (0.625-0.25)/0.75 = 0.5, then the generative accuracies as-is
    assert chat_core(accuracies) == pytest.approx((1 / 3 + 0 + 0.5 + 0.1 + 0.2 + 0.3) / 6)
    assert chat_core({"ARC-Easy": 1.0}) is None
    assert list(CHAT_TASKS) == list(accuracies)


def test_task_names_are_parsed_case_insensitively_and_checked():
    assert parse_task_names(None) == list(CHAT_TASKS)
    assert parse_task_names("gsm8k|ARC-Easy") == ["GSM8K", "ARC-Easy"]
    with pytest.raises(PicochatError, match="unknown chat eval task.*TriviaQA"):
        parse_task_names("GSM8K|TriviaQA")


def test_eval_chat_runs_every_task_and_records_the_report_section(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    make_home("sft")
    assert main(["-i", "sft", "--max-per-task", "2", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    for name in CHAT_TASKS:
        assert name in out
    assert "ChatCORE" in out

    section = json.loads((get_base_dir() / "report" / "chat-eval-sft.json").read_text())
    assert set(section["tasks"]) == set(CHAT_TASKS)
    assert all(r["n"] == 2 and 0 <= r["accuracy"] <= 1 for r in section["tasks"].values())
    assert isinstance(section["ChatCORE"], float) and section["missing"] == []
    assert section["model_tag"] == "d2" and section["step"] == 0

    from picochat.report import load_sections, summary_cells

    cells = summary_cells(load_sections())
    assert cells["ChatCORE"]["SFT"] == pytest.approx(section["ChatCORE"])
    assert cells["GSM8K"]["SFT"] == section["tasks"]["GSM8K"]["accuracy"]


def test_a_partial_run_says_which_tasks_chatcore_misses(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    make_home("mid")
    assert main(["-i", "mid", "-a", "ARC-Easy", "--max-per-task", "3"]) == 0
    out = capsys.readouterr().out
    assert "ChatCORE: not computed" in out and "GSM8K" in out
    section = json.loads((get_base_dir() / "report" / "chat-eval-mid.json").read_text())
    assert list(section["tasks"]) == ["ARC-Easy"] and section["ChatCORE"] is None


def test_missing_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    make_home("sft")
    with pytest.raises(PicochatError, match="no rl model.*picochat train rl"):
        main(["-i", "rl"])
    with pytest.raises(PicochatError, match="max-per-task"):
        main(["-i", "sft", "--max-per-task", "0"])


def test_two_processes_agree_with_one(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    make_home("sft")
    flags = ["-i", "sft", "-a", "ARC-Easy|SpellingBee", "--max-per-task", "3", "--max-new-tokens", "4"]
    main(flags)
    one = json.loads((get_base_dir() / "report" / "chat-eval-sft.json").read_text())["tasks"]
    env = {**os.environ, "PICOCHAT_HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    run_torchrun(["-m", "picochat.evals.chat", *flags], env, timeout=150, cwd=REPO_DIR)
    two = json.loads((get_base_dir() / "report" / "chat-eval-sft.json").read_text())["tasks"]
    assert {n: (r["n"], r["accuracy"]) for n, r in two.items()} == {
        n: (r["n"], r["accuracy"]) for n, r in one.items()
    }


def test_sample_replies_skip_prompts_longer_than_a_small_context(tmp_path, monkeypatch):
    """A tiny-context model (SFT's end-of-run samples) cannot hold the GSM8K question: it is skipped,
    the short chat prompts are still answered."""
    from picochat.evals.samples import CHAT_PROMPTS, sample_replies

    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    tokenizer, model = make_home("sft", sequence_len=64)
    samples = sample_replies(model.eval(), tokenizer, max_tokens=4)
    assert [s["prompt"] for s in samples] == CHAT_PROMPTS
