"""runs/gpu_check.sh --dry: every step of the one-GPU check, tiny, on the CPU, so the script cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from picochat.common import REPO_DIR


def test_gpu_check_dry_runs_every_step_and_writes_the_table_and_json(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "PICOCHAT_HOME": str(tmp_path / "home"), "OUT": str(out)}
    done = subprocess.run(
        ["bash", str(REPO_DIR / "runs" / "gpu_check.sh"), "--dry"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    steps = {s["step"]: s["rc"] for s in result["steps"]}
    assert steps == {"tests": 0, "bench_train": 0, "bench_infer": 0, "base": 0, "sft": 0, "serve": 0}
    bench = result["bench_train"][0]
    assert result["ok"] and bench["tok_per_sec"] > 0 and 0 < bench["mfu"] <= 100 and not bench["peak_cuda_gb"]
    assert "answered" in (out / "serve.log").read_text()  # the openai client got a reply
    table = done.stdout[done.stdout.index("step ") :]
    assert all(name in table for name in steps) and "FAILED" not in table
