"""HumanEval: 164 Python functions to complete, scored by running their unit tests in the sandbox.

The user message shows the function's signature and docstring in a code block; the reference reply
is the complete function (prompt + canonical solution) in a ```python block. `evaluate` takes the
code out of a completion (the first code block, or the raw text), runs it with the task's tests and
`check(<entry point>)` through `picochat.execution.execute_code`, and passes when nothing fails.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

from picochat.tasks.base import Conversation, Task
from picochat.tasks.loading import bundled_rows, check_source, hub_rows

# The first fenced block; an unclosed block (generation cut off) runs to the end of the text.
CODE_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
IMPORT_LINE = re.compile(r"^(?:import|from)\s+\S.*$", re.MULTILINE)


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, source: str = "bundled", timeout: float = 10.0, **slicing: Any):
        super().__init__(**slicing)
        self.source = check_source(source)
        self.timeout = timeout  # seconds per program, interpreter start-up included

    @functools.cached_property
    def rows(self) -> Sequence[dict[str, Any]]:
        if self.source == "hub":
            return hub_rows("openai/openai_humaneval", ("openai_humaneval/test-00000-of-00001.parquet",))
        return bundled_rows("eval/humaneval/HumanEval.jsonl.gz")

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> Conversation:
        row = self.rows[index]
        return {
            "messages": [
                {
                    "role": "user",
                    "content": f"Complete the following Python function.\n\n```python\n{row['prompt']}```",
                },
                {"role": "assistant", "content": f"```python\n{row['prompt']}{row['canonical_solution']}```"},
            ],
            # What scoring needs, kept with the conversation so `evaluate` is self-contained.
            "prompt": row["prompt"],
            "test": row["test"],
            "entry_point": row["entry_point"],
        }

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        from picochat.execution import execute_code  # lazy: only scoring needs the sandbox

        program = build_program(conversation, completion)
        return execute_code(program, timeout=self.timeout).success


def extract_code(completion: str) -> str:
    """The code inside the first ``` block of `completion`, or the whole completion if it has none."""
    block = CODE_BLOCK.search(completion)
    return block.group(1) if block else completion


def build_program(conversation: Conversation, completion: str) -> str:
    """The candidate function followed by the task's tests and the call that runs them.

    A completion that does not define the entry point is taken as the body continuing the prompt;
    otherwise the prompt's imports (e.g. `from typing import List`) are added when missing.
    """
    prompt, entry_point = conversation["prompt"], conversation["entry_point"]
    code = extract_code(completion)
    if not re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        code = prompt + code
    else:
        missing = [line for line in IMPORT_LINE.findall(prompt) if line not in code]
        code = "\n".join([*missing, code])
    return f"{code}\n\n{conversation['test']}\n\ncheck({entry_point})\n"
