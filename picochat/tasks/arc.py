"""ARC (AI2 Reasoning Challenge): grade-school science multiple choice, Easy and Challenge sets.

Bundled: the original ARC-V1-Feb2018 release in data/eval/arc/ (train/dev/test); hub: allenai/ai2_arc.
Choices are labelled A-E or 1-5 upstream; here they are always shown as A, B, C, ... in their
original order, and the answer is the letter at the answer key's position.
"""

from __future__ import annotations

import functools
from typing import Any

from picochat.tasks.base import MultipleChoiceTask
from picochat.tasks.loading import bundled_rows, check_choice, check_source, hub_rows

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")
BUNDLED_SPLIT_NAMES = {"train": "Train", "validation": "Dev", "test": "Test"}


class ARC(MultipleChoiceTask):
    def __init__(
        self, subset: str = "ARC-Easy", split: str = "test", source: str = "bundled", **slicing: Any
    ):
        super().__init__(**slicing)
        self.subset = check_choice("ARC subset", subset, SUBSETS)
        self.split = check_choice("ARC split", split, SPLITS)
        self.source = check_source(source)

    @functools.cached_property
    def rows(self) -> list[dict[str, Any]]:
        if self.source == "hub":
            raw = hub_rows("allenai/ai2_arc", (f"{self.subset}/{self.split}-00000-of-00001.parquet",))
        else:
            raw = bundled_rows(f"eval/arc/{self.subset}-{BUNDLED_SPLIT_NAMES[self.split]}.jsonl.gz")
        return [normalize_arc_row(row) for row in raw]


def normalize_arc_row(row: dict[str, Any]) -> dict[str, Any]:
    """The original release nests choices in the question ({"stem", "choices": [{"text","label"}]});
    the hub copy has a flat question and {"text": [...], "label": [...]} choices."""
    if isinstance(row["question"], dict):
        question = row["question"]["stem"]
        texts = [c["text"] for c in row["question"]["choices"]]
        labels = [c["label"] for c in row["question"]["choices"]]
    else:
        question, texts, labels = row["question"], row["choices"]["text"], row["choices"]["label"]
    return {"question": question, "choices": texts, "answer": labels.index(row["answerKey"])}
