"""The task abstraction shared by post-training (mid/SFT/RL) and chat evaluation.

A `Task` is a read-only, indexable list of conversations (the format of docs/architecture.md) that
can also score a model's answer: `evaluate(conversation, completion)`. Every task can be sliced at
construction (`start`, `stop`, `step`, like `range`), e.g. `step=world_size, start=rank` to shard a
task across data-parallel ranks. `TaskMixture` shuffles several tasks together for training and
`TaskSequence` chains them for a curriculum.

Two kinds of evaluation (`task.eval_type`):
- "generative": sample a completion and pass its text to `evaluate` (GSM8K, HumanEval, spelling).
- "categorical": multiple choice. The conversation has a `"letters"` key, e.g. ["A", "B", "C", "D"];
  render it with `tokenizer.render_for_completion(conversation)` (ends with `<|assistant_start|>`),
  run the model once, and pick the answer with `categorical_choice(logits[-1], letter_ids)` where
  `letter_ids = letter_token_ids(tokenizer, conversation["letters"])`. Then
  `evaluate(conversation, letters[choice])`.

Why the letter is a single token: the reference assistant message is the bare letter ("B", no
space, no punctuation), so the first token after `<|assistant_start|>` is the whole letter. A
single ASCII capital is always one token of a byte-level BPE vocabulary (each byte is a base token
and the pre-tokenizer never joins a lone letter with the special token before it), so comparing the
letters' logits at that one position ranks the choices. The prompt ends with an instruction to
answer with the letter only, so a fine-tuned model puts its probability mass on those tokens.
"""

from __future__ import annotations

import bisect
import functools
import random
from collections.abc import Sequence
from typing import Any

import torch

from picochat.common import PicochatError

Conversation = dict[str, Any]
LETTERS = "ABCDEFGHIJ"


class Task:
    """An indexable list of conversations, optionally sliced like `range(start, stop, step)`.

    Subclasses set `eval_type` and implement `num_examples()` (size of the whole underlying
    dataset), `get_example(index)` (a fresh conversation dict) and, for evaluation, `evaluate`.
    Data must be loaded lazily (on first `num_examples`/`get_example`), never in `__init__`.
    """

    eval_type: str  # "categorical" or "generative"

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or step < 1 or (stop is not None and stop < 0):
            raise PicochatError(
                f"bad task slice start={start} stop={stop} step={step}: need start, stop >= 0 and step >= 1"
            )
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self) -> int:
        raise NotImplementedError

    def get_example(self, index: int) -> Conversation:
        raise NotImplementedError

    def evaluate(self, conversation: Conversation, completion: str) -> bool | float:
        """Score `completion` (the model's assistant reply) against the reference `conversation`."""
        raise NotImplementedError(f"{type(self).__name__} has no automatic scoring")

    def reward(self, conversation: Conversation, completion: str) -> float:
        """RL reward for a sampled completion: 1.0 when `evaluate` accepts it, else 0.0."""
        return float(self.evaluate(conversation, completion))

    def _indices(self) -> range:
        total = self.num_examples()
        stop = total if self.stop is None else min(self.stop, total)
        return range(self.start, stop, self.step)

    def __len__(self) -> int:
        return len(self._indices())

    def __getitem__(self, index: int) -> Conversation:
        return self.get_example(self._indices()[index])  # range indexing: negatives, IndexError


class MultipleChoiceTask(Task):
    """A categorical task over rows {"question", "choices": [str], "answer": int, "subject"?}.

    Subclasses provide `rows` (a `functools.cached_property`, so data loads on first use);
    rendering and scoring are shared.
    """

    eval_type = "categorical"

    @property
    def rows(self) -> Sequence[dict[str, Any]]:
        raise NotImplementedError

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        return render_multiple_choice(row["question"], row["choices"], row["answer"], row.get("subject"))

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]


def render_multiple_choice(
    question: str, choices: Sequence[str], answer: int, subject: str | None = None
) -> Conversation:
    """A one-turn conversation: question, lettered choices, an instruction; the answer is the letter."""
    letters = list(LETTERS[: len(choices)])
    header = f"Multiple choice question ({subject.replace('_', ' ')}):\n\n" if subject else ""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices, strict=True))
    listed = ", ".join(letters[:-1]) + f" or {letters[-1]}"
    prompt = f"{header}{question.strip()}\n\n{options}\n\nAnswer with the letter ({listed}) only."
    return {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": letters[answer]}],
        "letters": letters,
    }


def categorical_choice(logits_row: torch.Tensor, letter_token_ids: Sequence[int]) -> int:
    """Index of the best-scoring letter: argmax of the next-token logits restricted to the letters.

    `logits_row` holds the logits at the position right after `<|assistant_start|>` (shape [vocab]).
    Ties go to the earliest letter.
    """
    ids = torch.as_tensor(list(letter_token_ids), dtype=torch.long, device=logits_row.device)
    return int(torch.argmax(logits_row[ids]).item())


def letter_token_ids(tokenizer: Any, letters: Sequence[str]) -> list[int]:
    """The token id of each answer letter, checking that each letter is exactly one token."""
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise PicochatError(
                f"answer letter {letter!r} is {len(encoded)} tokens with this tokenizer; "
                "categorical evaluation needs single-token letters (retrain the tokenizer)"
            )
        ids.append(encoded[0])
    return ids


def assistant_text(message: dict[str, Any]) -> str:
    """An assistant message as plain text: its string, or its text parts and tool outputs joined."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part["type"] in ("text", "python_output"))


class TaskMixture(Task):
    """All examples of several tasks in one deterministic shuffled order (same seed, same order).

    List a task twice to see its examples twice per epoch (oversampling).
    """

    def __init__(self, tasks: Sequence[Task], seed: int = 42, **slicing: Any):
        super().__init__(**slicing)
        if not tasks:
            raise PicochatError("TaskMixture needs at least one task")
        self.tasks, self.seed = list(tasks), seed

    @property
    def eval_type(self) -> str:  # type: ignore[override]
        return _common_eval_type(self.tasks)

    @functools.cached_property
    def _order(self) -> list[tuple[int, int]]:
        order = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(self.seed).shuffle(order)
        return order

    def num_examples(self) -> int:
        return len(self._order)

    def get_example(self, index: int) -> Conversation:
        task_index, example_index = self._order[index]
        return self.tasks[task_index][example_index]


class TaskSequence(Task):
    """The tasks one after another, in the given order (a curriculum)."""

    def __init__(self, tasks: Sequence[Task], **slicing: Any):
        super().__init__(**slicing)
        if not tasks:
            raise PicochatError("TaskSequence needs at least one task")
        self.tasks = list(tasks)

    @property
    def eval_type(self) -> str:  # type: ignore[override]
        return _common_eval_type(self.tasks)

    @functools.cached_property
    def _ends(self) -> list[int]:
        ends, total = [], 0
        for task in self.tasks:
            total += len(task)
            ends.append(total)
        return ends

    def num_examples(self) -> int:
        return self._ends[-1]

    def get_example(self, index: int) -> Conversation:
        task_index = bisect.bisect_right(self._ends, index)
        offset = self._ends[task_index - 1] if task_index else 0
        return self.tasks[task_index][index - offset]


def _common_eval_type(tasks: Sequence[Task]) -> str:
    kinds = {task.eval_type for task in tasks}
    if len(kinds) != 1:
        raise PicochatError(f"these tasks mix evaluation types {sorted(kinds)}; evaluate them one by one")
    return kinds.pop()
