"""General chat conversations for supervised fine-tuning.

source="hub": HuggingFaceTB/smol-smoltalk (about 460k train / 24k test conversations written for
small models). source="bundled" (the default, offline): the 2,026 short ChatterBot corpus
conversations in data/chat/, far smaller and quirkier, but in the same messages format. The bundled
file has no splits, so every 10th conversation is held out as "test" and the rest is "train".
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from picochat.tasks.base import Conversation, Task
from picochat.tasks.loading import bundled_rows, check_choice, check_source, hub_rows

SPLITS = ("train", "test")
HUB_FILES = {
    "train": tuple(f"data/train-{i:05d}-of-00004.parquet" for i in range(4)),
    "test": ("data/test-00000-of-00001.parquet",),
}
BUNDLED_TEST_EVERY = 10


class SmolTalk(Task):
    eval_type = "generative"  # free-form chat: used for training and loss, not scored automatically

    def __init__(self, split: str = "train", source: str = "bundled", **slicing: Any):
        super().__init__(**slicing)
        self.split = check_choice("SmolTalk split", split, SPLITS)
        self.source = check_source(source)

    @functools.cached_property
    def rows(self) -> Sequence[dict[str, Any]]:
        if self.source == "hub":
            return hub_rows("HuggingFaceTB/smol-smoltalk", HUB_FILES[self.split])
        rows = bundled_rows("chat/chatterbot_corpus_english.jsonl.gz")
        held_out = self.split == "test"
        return [row for i, row in enumerate(rows) if (i % BUNDLED_TEST_EVERY == 0) == held_out]

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> Conversation:
        messages = self.rows[index]["messages"]
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
