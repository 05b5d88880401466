"""The report card: every stage records its parameters and metrics here; `picochat report` writes report.md."""

from __future__ import annotations

import time
from typing import Any

from picochat.common import atomic_write_json, get_base_dir, get_rank


def record(section: str, data: dict[str, Any]) -> None:
    """Save one stage's section (rank 0 only) as $PICOCHAT_HOME/report/<section>.json."""
    if get_rank() != 0:
        return
    payload = {"section": section, "timestamp": time.strftime("%Y-%m-%d %H:%M:%S"), **data}
    atomic_write_json(get_base_dir() / "report" / f"{section}.json", payload)
