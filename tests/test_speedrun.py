"""runs/speedrun.sh: --dry-run lists the real 8xH100 run's commands; --smoke runs every one of them, tiny,
on 2 CPU processes (gloo).

In --smoke the "hub" is the bundled corpus served by a local HTTP server, so the download step runs too.
"""

from __future__ import annotations

import os
import shlex
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


def dry_run_commands(**env: str) -> list[list[str]]:
    done = subprocess.run(
        ["bash", str(REPO_DIR / "runs" / "speedrun.sh"), "--dry-run"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return [shlex.split(line) for line in done.stdout.splitlines() if line.strip()]


def stage_of(argv: list[str]) -> str:
    """'picochat.train.mid' for a torchrun line, 'picochat download' for a picochat line."""
    if "-m" in argv:
        return argv[argv.index("-m") + 1]
    return "picochat " + argv[1]


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_speedrun_dry_run_reads_hub_data_everywhere_and_trains_base_at_2048(tmp_path):
    commands = dry_run_commands(WITH_RL="1", PICOCHAT_HOME=str(tmp_path / "home"))
    stages = [stage_of(c) for c in commands]
    for expected in ("picochat.train.base", "picochat.train.mid", "picochat.train.sft", "picochat.train.rl"):
        assert expected in stages, stages
    assert stages.count("picochat.evals.chat") == 3
    assert not (tmp_path / "home").exists(), "a dry run writes nothing"
    for argv, stage in zip(commands, stages, strict=True):
        assert argv[0].endswith(("picochat", "torchrun")), argv
        if stage.startswith(("picochat.train", "picochat.evals", "picochat tokenizer")):
            assert flag(argv, "--source") == "hub", argv
        if stage in ("picochat.train.base", "picochat plan"):
            assert flag(argv, "--max-seq-len") == "2048", argv
            assert flag(argv, "--depth") == "26", argv
        else:  # later stages inherit the context length from their input checkpoint
            assert "--max-seq-len" not in argv, argv
        if stage.startswith(("picochat.train", "picochat.evals")):
            assert flag(argv, "--nproc_per_node") is None and "--nproc_per_node=8" in argv, argv
    # The plan comes first, checks memory, and plans exactly the base run that follows.
    plan, base = commands[0], commands[stages.index("picochat.train.base")]
    assert stages[0] == "picochat plan" and "--check" in plan
    for name in (
        "--depth",
        "--max-seq-len",
        "--device-batch-size",
        "--target-param-data-ratio",
        "--window-pattern",
        "--bigram-embeds",
    ):  # the plan sizes the model base trains
        assert flag(plan, name) == flag(base, name), name
    assert flag(plan, "--nproc") == "8"


def test_speedrun_dry_run_follows_the_size_variables():
    commands = dry_run_commands(DEPTH="20", NPROC="4", SHARDS="240", WITH_RL="0")
    base = next(c for c in commands if stage_of(c) == "picochat.train.base")
    assert flag(base, "--depth") == "20" and "--nproc_per_node=4" in base
    assert "picochat.train.rl" not in [stage_of(c) for c in commands]
    downloads = [flag(c, "--shards") for c in commands if stage_of(c) == "picochat download"]
    assert downloads[-1] == "240"


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
