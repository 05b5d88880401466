"""Task library for post-training and chat evaluation: conversations to train on, answers to score.

See picochat/tasks/base.py for the `Task` interface, mixtures and categorical (multiple-choice)
scoring. Tasks load their data on first use, from the bundled `data/` copy unless `source="hub"`.
"""

from picochat.tasks.arc import ARC
from picochat.tasks.base import (
    Task,
    TaskMixture,
    TaskSequence,
    categorical_choice,
    letter_token_ids,
)
from picochat.tasks.gsm8k import GSM8K
from picochat.tasks.humaneval import HumanEval
from picochat.tasks.identity import Identity
from picochat.tasks.mmlu import MMLU
from picochat.tasks.smoltalk import SmolTalk
from picochat.tasks.spelling import SimpleSpelling, SpellingBee

__all__ = [
    "ARC", "GSM8K", "MMLU", "HumanEval", "Identity", "SimpleSpelling", "SmolTalk", "SpellingBee", "Task",
    "TaskMixture", "TaskSequence", "categorical_choice", "letter_token_ids",
]  # fmt: skip
