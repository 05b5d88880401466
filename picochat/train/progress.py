"""Step lines of the training loop: a tqdm bar on a terminal, plain lines in a log file or pipe.

picochat.train.loop calls `Progress.step` after every optimiser step with the line's fields (loss, LR,
gradient norm, tokens/s, cumulative tokens and FLOPs, MFU) and `Progress.write` for evaluation results.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

if TYPE_CHECKING:
    from picochat.train.loop import LoopState


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A tqdm bar on a terminal; on a file or pipe (tee, nohup) plain lines (`--log-every`, or ~50 a run
    and one every 30 s at least)."""

    PLAIN_LINE_SECONDS = 30  # without --log-every, a plain line at least this often

    def __init__(self, state: LoopState, enabled: bool, log_every: int) -> None:
        self.enabled, self.tty = enabled, sys.stdout.isatty()
        self.log_every = log_every  # 0: about 50 lines over the run, and one every 30 s at least
        self.last_line = time.time()
        self.bar = None
        if enabled and self.tty:
            self.bar = tqdm(total=state.horizon, initial=state.step, unit="step", dynamic_ncols=True)

    def step(self, state: LoopState, fields: dict[str, str], eta: float) -> None:
        if self.bar is not None:
            self.bar.total = state.horizon
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(state.step - self.bar.n)
        elif self.enabled and self._line_due(state):
            shown = " | ".join(f"{k} {v}" for k, v in fields.items())
            times = f"{format_duration(state.train_seconds)} elapsed, ETA {format_duration(eta)}"
            print(f"step {state.step}/{state.horizon} | {shown} | {times}")
            sys.stdout.flush()
            self.last_line = time.time()

    def _line_due(self, state: LoopState) -> bool:
        if state.step in (1, state.horizon):
            return True
        if self.log_every > 0:
            return state.step % self.log_every == 0
        # the horizon moves with --max-minutes, so the cadence follows it, and time bounds the gap
        overdue = time.time() - self.last_line >= self.PLAIN_LINE_SECONDS
        return overdue or state.step % max(1, round(state.horizon / 50)) == 0

    def write(self, line: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(line)
            sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def show_figure(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
