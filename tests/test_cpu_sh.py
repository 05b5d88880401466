"""runs/cpu.sh --dry-run: the laptop default is sized by steps, prints its time estimate first, keeps the
minute budgets one variable away, and every training command it would run parses with its stage's flags."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess

from picochat.cli import resolve
from picochat.common import REPO_DIR

TRAIN_STAGES = ("picochat.train.base", "picochat.train.mid", "picochat.train.sft", "picochat.train.rl")


def dry_run(tmp_path, **env: str) -> tuple[dict[str, float], list[list[str]]]:
    """({estimate row: minutes}, [command argv]) printed by `runs/cpu.sh --dry-run`."""
    done = subprocess.run(
        ["bash", str(REPO_DIR / "runs" / "cpu.sh"), "--dry-run"],
        env={**os.environ, "PICOCHAT_HOME": str(tmp_path / "home"), "STEP_SECONDS": "0.571", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("==> time estimate") and "0.571 s here" in lines[0]
    rows = {}
    for line in lines[1:]:
        if match := re.fullmatch(r"    (\S+(?: \S+)*?)\s{2,}.*?([\d.]+) min", line):
            rows[match.group(1)] = float(match.group(2))
    commands = [shlex.split(line) for line in lines if line.startswith("/")]
    assert not (tmp_path / "home").exists(), "a dry run writes nothing"
    return rows, commands


def command(commands: list[list[str]], *words: str) -> list[str]:
    found = [argv[1 + len(words) :] for argv in commands if tuple(argv[1 : 1 + len(words)]) == words]
    assert len(found) == 1, (words, commands)
    return found[0]


def test_stages_are_sized_by_steps_and_the_estimate_comes_first(tmp_path):
    rows, commands = dry_run(tmp_path, BASE_STEPS="1000", RL_STEPS="7")
    base = command(commands, "train", "base")
    assert base[base.index("--num-iterations") + 1] == "1000" and "--max-minutes" not in base
    for stage in ("mid", "sft", "rl"):
        assert "--num-iterations" in command(commands, "train", stage)
    rl = command(commands, "train", "rl")
    assert rl[rl.index("--task") + 1] == "spellingbee" and rl[rl.index("--num-iterations") + 1] == "7"
    assert rl[rl.index("--init-lr-frac") + 1] == "0.2"  # the measured setting (docs/recipe.md)
    # at the reference step time, 1,000 base steps are 1000 * 0.571 s; the total adds up every row
    assert rows["base training"] == round(1000 * 0.571 / 60, 1)
    parts = [minutes for name, minutes in rows.items() if name != "total"]
    assert abs(rows["total"] - sum(parts)) <= 0.05 * len(parts)  # up to the rounding of each row
    assert set(rows) >= {"tokenizer", "base eval", "mid-training", "SFT", "RL", "chat evals", "report"}


def test_default_run_is_about_45_minutes_at_the_reference_speed(tmp_path):
    rows, _ = dry_run(tmp_path)
    assert 40 <= rows["total"] <= 50, rows


def test_minute_budgets_still_work_per_stage(tmp_path):
    rows, commands = dry_run(tmp_path, BASE_MINUTES="20", SFT_MINUTES="4")
    base, sft = command(commands, "train", "base"), command(commands, "train", "sft")
    assert base[base.index("--max-minutes") + 1] == "20" and "--num-iterations" not in base
    assert sft[sft.index("--max-minutes") + 1] == "4" and "--num-iterations" not in sft
    assert "--num-iterations" in command(commands, "train", "mid")  # the others keep their steps
    assert rows["base training"] == 20.0 and rows["SFT"] == 4.0


def test_every_training_command_parses_with_its_stage_flags(tmp_path):
    _, commands = dry_run(tmp_path)
    parsed = set()
    for argv in commands:
        _, module, rest = resolve(argv[1:])
        if module in TRAIN_STAGES:
            importlib.import_module(module).build_parser().parse_args(rest)  # exits on an unknown flag
            parsed.add(module)
    assert parsed == set(TRAIN_STAGES)


def test_unknown_argument_is_refused(tmp_path):
    done = subprocess.run(
        ["bash", str(REPO_DIR / "runs" / "cpu.sh"), "--fast"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "usage" in done.stderr
