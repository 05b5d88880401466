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
    names = ["tokenizer", "imports", "tests", "bench_train", "bench_infer", "base", "sft", "serve"]
    assert steps == dict.fromkeys(names, 0)
    bench = result["bench_train"][0]
    assert result["ok"] and bench["tok_per_sec"] > 0 and 0 < bench["mfu"] <= 100 and not bench["peak_cuda_gb"]
    assert result["bench_infer"]["prefill_tok_per_sec"] > 0 and set(
        result["bench_infer"]["decode_tok_per_sec"]
    ) == {"1", "2"}
    assert (
        result["base_run"]["steps"] == 2
        and result["base_run"]["tok_per_sec"] > 0
        and result["base_run"]["mfu"] > 0
    )
    assert "answered" in (out / "serve.log").read_text()  # the openai client got a reply
    table = done.stdout[done.stdout.index("step ") :]
    assert all(name in table for name in steps) and "FAILED" not in table


def test_gpu_check_refuses_an_unknown_flag():
    done = subprocess.run(
        ["bash", str(REPO_DIR / "runs" / "gpu_check.sh"), "--fast"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "usage: bash runs/gpu_check.sh [--dry] [OUT_DIR]" in done.stderr


def test_carried_wheels_are_every_missing_package_pinned_to_the_tested_version():
    """runs/gpu_wheels.sh downloads exactly these; a pydantic apart from its pydantic-core fails at import."""
    from importlib.metadata import version

    sys.path.insert(0, str(REPO_DIR / "runs"))
    try:
        import gpu_check_wheels
    finally:
        sys.path.remove(str(REPO_DIR / "runs"))
    pins = dict(line.split("==") for line in gpu_check_wheels.wheel_pins())
    for root in ("rustbpe", "fastapi", "uvicorn", "pydantic", "openai", "pytest"):
        assert pins[root] == version(root), root
    # Their own requirements come along (the image has none of them), each at the installed version...
    assert pins["pydantic-core"] == version("pydantic-core") and "starlette" in pins and "h11" in pins
    # ... and what the image already has (torch and what must match it) never does.
    assert not {"torch", "numpy", "transformers", "pyarrow", "tiktoken", "safetensors"} & set(pins)
