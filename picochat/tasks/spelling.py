"""Synthetic spelling tasks that teach a small model to see the letters inside its tokens.

Words come from the bundled English word list (data/words/, lowercase a-z words only). Words are
split into train and test by a hash of the word (about 1 in 10 goes to test), so the splits never
share a word. Example `i` of a split is always the same: its random choices come from an RNG
seeded with the task name, the split and `i`.

- `SimpleSpelling`: "Spell the word apple." -> "a,p,p,l,e".
- `SpellingBee`: "How many 'r' are in strawberry?" -> the assistant spells the word, counts the
  letter by hand, double-checks with the calculator tool ('strawberry'.count('r')) and ends with
  "#### 3", the same final-answer format as GSM8K.
"""

from __future__ import annotations

import functools
import random
import re
import string
import zlib
from typing import Any

from picochat.common import PicochatError
from picochat.tasks.base import Conversation, Task, assistant_text
from picochat.tasks.gsm8k import extract_answer, same_number
from picochat.tasks.loading import bundled_lines, check_choice

SPLITS = ("train", "test")
WORD_LIST = "words/american-english.txt.gz"
TEST_EVERY = 10  # about 1 word in 10 is a test word
ABSENT_LETTER_RATE = 0.1  # how often SpellingBee asks about a letter drawn from the whole alphabet
QUOTES = ("{}", "'{}'", '"{}"')

SPELL_QUESTIONS = (
    "Spell the word {word}.",
    "How do you spell {word}?",
    "Can you spell {word} for me?",
    "Spell {word} letter by letter.",
    "spell {word}",
    "What are the letters of {word}, in order?",
    "Please spell out {word}.",
)
COUNT_QUESTIONS = (
    "How many {letter} are in {word}?",
    "How many times does the letter {letter} appear in {word}?",
    "Count how many times {letter} occurs in the word {word}.",
    "In the word {word}, how many {letter} are there?",
    "how many {letter} in {word}",
    "What is the number of {letter} letters in {word}?",
    "Can you count the letter {letter} in {word}?",
    "How often does {letter} show up in {word}?",
)


@functools.cache
def split_words(split: str) -> tuple[str, ...]:
    """The lowercase a-z words of the bundled list that belong to `split` (train or test)."""
    held_out = check_choice("spelling split", split, SPLITS) == "test"
    words = (w for w in bundled_lines(WORD_LIST) if re.fullmatch(r"[a-z]+", w))
    return tuple(w for w in words if (zlib.crc32(w.encode()) % TEST_EVERY == 0) == held_out)


def spell(word: str) -> str:
    return ",".join(word)


class _WordTask(Task):
    eval_type = "generative"

    def __init__(self, split: str = "train", size: int = 1000, **slicing: Any):
        super().__init__(**slicing)
        if size < 1:
            raise PicochatError(f"{type(self).__name__} size must be at least 1, got {size}")
        self.split = check_choice("spelling split", split, SPLITS)
        self.size = size

    def num_examples(self) -> int:
        return self.size

    def _rng(self, index: int) -> random.Random:
        # A string seed is hashed with SHA-512 by `random`, so it is stable across runs and machines.
        return random.Random(f"{type(self).__name__}/{self.split}/{index}")

    def _word(self, rng: random.Random) -> str:
        return rng.choice(split_words(self.split))


class SimpleSpelling(_WordTask):
    def get_example(self, index: int) -> Conversation:
        rng = self._rng(index)
        word = self._word(rng)
        question = rng.choice(SPELL_QUESTIONS).format(word=rng.choice(QUOTES).format(word))
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": spell(word)},
            ]
        }

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        """Exact spelling, ignoring whitespace ("a, p, p, l, e" counts)."""
        return "".join(completion.split()) == conversation["messages"][-1]["content"]


class SpellingBee(_WordTask):
    def get_example(self, index: int) -> Conversation:
        rng = self._rng(index)
        word = self._word(rng)
        pool = string.ascii_lowercase if rng.random() < ABSENT_LETTER_RATE else word
        letter = rng.choice(pool)
        question = rng.choice(COUNT_QUESTIONS).format(
            letter=rng.choice(QUOTES).format(letter), word=rng.choice(QUOTES).format(word)
        )
        return {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": count_letter_parts(word, letter)},
            ]
        }

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        """True when the number after "####" is the right count."""
        reference = extract_answer(assistant_text(conversation["messages"][-1]))
        predicted = extract_answer(completion)
        return predicted is not None and same_number(predicted, reference)


def count_letter_parts(word: str, letter: str) -> list[dict[str, str]]:
    """The reference answer: spell, count by hand, check with the calculator, give the answer."""
    positions = [str(i + 1) for i, c in enumerate(word) if c == letter]
    count = len(positions)
    if positions:
        where = positions[0] if count == 1 else ", ".join(positions[:-1]) + " and " + positions[-1]
        by_hand = f"'{letter}' is at position{'s' if count > 1 else ''} {where}, so I count {count}."
    else:
        by_hand = f"'{letter}' is not among them, so I count 0."
    return [
        {
            "type": "text",
            "text": f'Spelling "{word}" letter by letter: {spell(word)}\n{by_hand}\n'
            "Let me double-check with Python: ",
        },
        {"type": "python", "text": f"'{word}'.count('{letter}')"},
        {"type": "python_output", "text": str(count)},
        {
            "type": "text",
            "text": f"\nBoth counts agree: '{letter}' appears {count} time{'' if count == 1 else 's'} "
            f'in "{word}".\n#### {count}',
        },
    ]
