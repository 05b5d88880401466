"""Run `torchrun --standalone --nproc_per_node=2` from a test, and never let a hang eat the CI budget.

gloo on a loaded 2-core machine very rarely hangs a run that normally takes seconds (once in CI, in the
process-group teardown or the agent, never reproduced in 50 runs here; see pytorch/pytorch#75097). So a
run that outlives `timeout` is stopped with SIGABRT to the agent and every worker (PYTHONFAULTHANDLER=1
makes each print its Python stacks), reported as a warning with those stacks, and started once more. A
second hang, or a non-zero exit, fails the test with the output.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import warnings

import psutil
import pytest

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _stop_tree(pid: int) -> None:
    """SIGABRT (stacks), then SIGKILL, to a process and all its descendants (each worker has its own
    session, so a process-group kill would miss them)."""
    try:
        root = psutil.Process(pid)
        tree = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for sig in (signal.SIGABRT, signal.SIGKILL):
        for proc in tree:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        time.sleep(3)  # let faulthandler write the stacks before the kill


def _run_once(args: list[str], env: dict, timeout: float, cwd) -> tuple[subprocess.CompletedProcess, bool]:
    """One torchrun; (the finished or stopped run, whether it hung)."""
    proc = subprocess.Popen(
        [*TORCHRUN, *args], env={**env, "PYTHONFAULTHANDLER": "1"}, cwd=cwd, text=True,
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
        hung = False
    except subprocess.TimeoutExpired:
        _stop_tree(proc.pid)
        out, err = proc.communicate()
        hung = True
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), hung


def run_torchrun(args: list[str], env: dict, timeout: float, cwd=None) -> subprocess.CompletedProcess:
    """torchrun `args` (a script and its arguments, or -m module ...); the finished run, exit code 0."""
    done, hung = _run_once(args, env, timeout, cwd)
    if hung:
        stacks = done.stderr[-6000:]
        warnings.warn(f"torchrun hung for {timeout:.0f} s, ran it again; stacks:\n{stacks}", stacklevel=2)
        done, hung = _run_once(args, env, timeout, cwd)
        if hung:
            pytest.fail(f"torchrun hung twice for {timeout:.0f} s; its stacks:\n{done.stderr[-6000:]}")
    output = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, f"torchrun exited {done.returncode}:\n{output}"
    return done
