"""GSM8K: grade-school math word problems, solved step by step with the calculator tool.

Each reference answer is written with calculator annotations, e.g.
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n...\n#### 72"
In the conversation every annotation becomes a tool call and its output:
    text "Natalia sold 48/2 = ", python "48/2", python_output "24", text " clips in May.\n..."
The "24" written right after the annotation is dropped from the text, because at inference the
tool's output is already shown there; the model continues after it rather than copying it. So the
text parts joined with the tool outputs read exactly like the original answer without annotations
(up to number formatting: "22,500" after an annotation becomes the tool's "22500").

The final answer follows "####"; `extract_answer` reads it from a completion for scoring.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

from picochat.tasks.base import Conversation, Task, assistant_text
from picochat.tasks.loading import bundled_rows, check_choice, check_source, hub_rows

SPLITS = ("train", "test")
CALCULATION = re.compile(r"<<([^<>]*)>>")
NUMBER = re.compile(r"-?[\d,]*\.?\d+")
FINAL_ANSWER = re.compile(r"####\s*(-?)\s*\$?\s*(-?[\d,]*\.?\d+)")


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, split: str = "test", source: str = "bundled", **slicing: Any):
        super().__init__(**slicing)
        self.split = check_choice("GSM8K split", split, SPLITS)
        self.source = check_source(source)

    @functools.cached_property
    def rows(self) -> Sequence[dict[str, Any]]:
        if self.source == "hub":
            return hub_rows("openai/gsm8k", (f"main/{self.split}-00000-of-00001.parquet",))
        return bundled_rows(f"eval/gsm8k/{self.split}.jsonl.gz")

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        return {
            "messages": [
                {"role": "user", "content": row["question"]},
                {"role": "assistant", "content": answer_to_parts(row["answer"])},
            ]
        }

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        """True when the number after "####" in the completion equals the reference answer."""
        reference = extract_answer(assistant_text(conversation["messages"][-1]))
        predicted = extract_answer(completion)
        return predicted is not None and same_number(predicted, reference)


def answer_to_parts(answer: str) -> list[dict[str, str]]:
    """Turn an annotated GSM8K answer into assistant parts: text, python, python_output, text, ..."""
    parts, position = [], 0
    for match in CALCULATION.finditer(answer):
        expression, result = match.group(1).rsplit("=", 1)
        if match.start() > position:
            parts.append({"type": "text", "text": answer[position : match.start()]})
        parts.append({"type": "python", "text": expression})
        parts.append({"type": "python_output", "text": result})
        position = match.end() + _echo_length(answer, match.end(), result)
    if position < len(answer):
        parts.append({"type": "text", "text": answer[position:]})
    return parts


def _echo_length(text: str, at: int, result: str) -> int:
    """Length of the copy of `result` the answer writes right after an annotation (0 if none)."""
    number = NUMBER.match(text, at)
    if number and same_number(number.group(), result):  # "<<4500*5=22500>>22,500"
        return number.end() - at
    if not NUMBER.fullmatch(result) and text.startswith(result, at):  # "<<3/4=3/4>>3/4"
        return len(result)
    return 0


def extract_answer(text: str) -> str | None:
    """The number after the first "####", without "$", thousands commas or a trailing period."""
    match = FINAL_ANSWER.search(text)
    if match is None:
        return None
    return match.group(1) + match.group(2).replace(",", "")


def same_number(a: str, b: str | None) -> bool:
    """Numeric equality of two number strings, ignoring thousands commas ("1,200" equals "1200.0")."""
    if b is None:
        return False
    try:
        return float(a.replace(",", "")) == float(b.replace(",", ""))
    except ValueError:
        return False
