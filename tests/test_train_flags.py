"""Every training stage refuses bad flag values with one clear line and exit status 1, before loading."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from picochat import cli
from picochat.common import REPO_DIR

STAGES = ["base", "mid", "sft", "rl"]
BAD = [
    (["--num-iterations", "-5"], "--num-iterations -5 must be at least 1"),
    (["--num-iterations", "0"], "--num-iterations 0 must be at least 1"),
    (["--device-batch-size", "0"], "--device-batch-size 0 must be at least 1"),
    (["--max-seq-len", "0"], "--max-seq-len 0 must be at least 1"),
    (["--save-every", "-1"], "--save-every -1 cannot be negative"),
    (["--keep-last", "-2"], "--keep-last -2 cannot be negative"),
    (["--eval-every", "-3"], "--eval-every -3 cannot be negative"),
    (["--max-minutes", "-1"], "--max-minutes -1.0 cannot be negative"),
    (["--max-minutes", "nan"], "--max-minutes nan is not a finite number"),
    (["--matrix-lr", "-0.1"], "--matrix-lr -0.1 cannot be negative"),
    (["--device-type", "tpu"], "--device-type 'tpu' is not one of"),
]
if not torch.cuda.is_available():
    BAD.append((["--device-type", "cuda"], "no CUDA GPU is visible"))


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize(("flags", "message"), BAD)
def test_bad_values_are_one_line_and_exit_1(stage, flags, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    assert cli.main(["train", stage, *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_help_of_every_stage_lists_the_groups_in_one_order():
    from picochat.train.flags import GROUPS

    for stage in STAGES:
        module = __import__(f"picochat.train.{stage}", fromlist=["build_parser"])
        text = module.build_parser().format_help()
        positions = [text.index(title + ":") for title in GROUPS if title + ":" in text]
        assert positions == sorted(positions) and len(positions) >= 5, stage


def test_cli_conventions():
    run = [sys.executable, "-m", "picochat"]
    for words in (["train", "--help"], ["eval", "--help"], ["tokenizer", "--help"], ["--help"]):
        done = subprocess.run([*run, *words], capture_output=True, text=True, cwd=REPO_DIR, timeout=120)
        assert done.returncode == 0 and "usage: picochat" in done.stdout, (words, done.stderr)
    piped = subprocess.run(
        f"{sys.executable} -m picochat --help | head -1", shell=True, capture_output=True, text=True,
        cwd=REPO_DIR, timeout=120,
    )  # fmt: skip
    assert piped.stdout.startswith("usage: picochat") and "Traceback" not in piped.stderr
    rl_help = subprocess.run([*run, "train", "rl", "--help"], capture_output=True, text=True, timeout=120)
    assert "--num-iterations" in rl_help.stdout and "--source" in rl_help.stdout


def test_depth_1000_is_refused_before_allocating():
    from picochat.common import PicochatError
    from picochat.gpt import GPT, GPTConfig
    from picochat.train.base import BYTES_PER_PARAM, model_shape
    from picochat.train.flags import check_memory

    with torch.device("meta"):  # no memory is allocated for the check
        model = GPT(GPTConfig(sequence_len=512, vocab_size=65536, **model_shape(1000, 64, 64)))
    with pytest.raises(PicochatError, match="lower --depth"):
        check_memory(model, torch.device("cpu"), BYTES_PER_PARAM)


def test_validation_passes_show_a_bar_on_a_terminal_only(monkeypatch, capsys):
    from tqdm import tqdm

    from picochat.common import pass_bar

    steps = range(3)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert pass_bar(steps, "val bpb") is steps  # a log file or pipe gets nothing from the pass
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    bar = pass_bar(steps, "val bpb")
    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2] and not bar.leave
    monkeypatch.setenv("RANK", "1")
    assert pass_bar(steps, "val bpb") is steps  # only rank 0 draws


def test_plain_step_lines_follow_the_refitted_horizon_and_the_clock(monkeypatch, capsys):
    """A log file gets a line at step 1, every horizon/50 steps of the (refitted) horizon, and at least
    every 30 s: a --max-minutes run planned for 51,200 steps must not go silent for 1,024 steps."""
    from picochat.train import progress
    from picochat.train.loop import LoopState
    from picochat.train.progress import Progress

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: clock[0])
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    state = LoopState(horizon=51_200, planned=51_200)
    printer = Progress(state, enabled=True, log_every=0)

    def lines_after(steps: range, seconds_each: float) -> list[str]:
        for step in steps:
            clock[0] += seconds_each
            state.step = step
            printer.step(state, {"loss": "1.0"}, eta=60.0)
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]

    assert [line.split(" |")[0] for line in lines_after(range(1, 12), 1.0)] == ["step 1/51200"]
    assert len(lines_after(range(12, 20), 5.0)) == 1  # 40 s passed: one line, not one per step
    state.horizon = 1000  # refitted to the budget: now every 20 steps
    assert [line.split(" |")[0] for line in lines_after(range(20, 61), 0.01)] == [
        "step 20/1000",
        "step 40/1000",
        "step 60/1000",
    ]
    printer = Progress(state, enabled=True, log_every=7)  # an explicit cadence is kept exactly
    assert [line.split(" |")[0] for line in lines_after(range(61, 71), 40.0)] == [
        "step 63/1000",
        "step 70/1000",
    ]
