"""MMLU: four-way multiple choice over 57 subjects (knowledge and reasoning).

Bundled (offline) data is partial, see data/SOURCES.md:
- split="train": the full MMLU validation split (1,531 questions), used for training;
- split="test": the MMLU-Redux re-annotated test subset, keeping only the questions its annotators
  marked "ok" (5,329 of 5,700), so that wrong or ambiguous questions do not blur the score.
Hub (source="hub", cais/mmlu): train is auxiliary_train (~100k questions), test is the full test set.
`subset` is "all" or one subject name (e.g. "high_school_physics").
"""

from __future__ import annotations

import functools
from typing import Any

from picochat.common import PicochatError
from picochat.tasks.base import MultipleChoiceTask
from picochat.tasks.loading import bundled_rows, check_choice, check_source, hub_rows

SPLITS = ("train", "test")
HUB_FILES = {"train": "all/auxiliary_train-00000-of-00001.parquet", "test": "all/test-00000-of-00001.parquet"}


class MMLU(MultipleChoiceTask):
    def __init__(self, subset: str = "all", split: str = "test", source: str = "bundled", **slicing: Any):
        super().__init__(**slicing)
        self.subset = subset
        self.split = check_choice("MMLU split", split, SPLITS)
        self.source = check_source(source)

    @functools.cached_property
    def rows(self) -> list[dict[str, Any]]:
        if self.source == "hub":
            raw = [row.get("train", row) for row in hub_rows("cais/mmlu", (HUB_FILES[self.split],))]
        elif self.split == "train":
            raw = bundled_rows("eval/mmlu/mmlu_validation.jsonl.gz")
        else:
            raw = bundled_rows("eval/mmlu/mmlu_redux_test_subset.jsonl.gz")
            raw = [row for row in raw if row["error_type"].lower() == "ok"]
        rows = [row for row in raw if self.subset in ("all", row["subject"])]
        if not rows:
            raise PicochatError(
                f"MMLU has no {self.split} questions for subset {self.subset!r}; use 'all' or "
                "a subject name like 'high_school_physics'"
            )
        return rows
