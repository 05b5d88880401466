"""runs/speedrun.sh --smoke: every command of the 8xH100 reference run, tiny, on 2 CPU processes (gloo).

The "hub" is the bundled corpus served by a local HTTP server, so the download step runs for real too.
"""

from __future__ import annotations

import os
import subprocess
import sys

from picochat.common import REPO_DIR


def test_speedrun_smoke_runs_every_stage_and_writes_the_report(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "PICOCHAT_HOME": str(home), "PICOCHAT_VENV": sys.prefix, "WITH_RL": "1"}
    done = subprocess.run(
        ["bash", str(REPO_DIR / "runs" / "speedrun.sh"), "--smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    shards = sorted(p.name for p in (home / "base_data").iterdir())
    assert shards == [f"shard_{i:05d}.parquet" for i in (0, 1, 2, 3, 9)]  # 4 + the validation shard
    for stage in ("base", "mid", "sft", "rl"):
        assert any((home / "checkpoints" / stage).glob("*/step_*/model.safetensors")), stage
    report = (home / "report.md").read_text()
    summary = {cells[0]: cells[1:] for cells in table_rows(report)}
    assert summary["Metric"] == ["BASE", "MID", "SFT", "RL"]
    assert is_number(summary["CORE"][0])
    assert all(is_number(cell) for cell in summary["ChatCORE"][1:3])  # MID and SFT ran every chat eval
    assert is_number(summary["GSM8K"][3])  # RL is evaluated on GSM8K
    assert list((home / "report_files").glob("*.png")), "training curves are drawn"


def table_rows(markdown: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in markdown.splitlines()
        if line.startswith("|") and not set(line) <= set("|-: ")
    ]


def is_number(cell: str) -> bool:
    try:
        float(cell.rstrip("%"))
    except ValueError:
        return False
    return True
