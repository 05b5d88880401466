"""bench/recipe.py: the ablation harness runs real tiny trainings, resumes from its file, prints a table."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from picochat.common import REPO_DIR


def load_bench():
    spec = importlib.util.spec_from_file_location("recipe_bench", REPO_DIR / "bench" / "recipe.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["recipe_bench"] = module
    spec.loader.exec_module(module)
    return module


def test_table_medians_spreads_and_ratios():
    bench = load_bench()
    rows = [
        {"variant": "baseline", "depth": 4, "val_bpb": 2.0, "tok_per_sec": 1000.0},
        {"variant": "baseline", "depth": 4, "val_bpb": 2.2, "tok_per_sec": 1200.0},
        {"variant": "x", "depth": 4, "val_bpb": 1.9, "tok_per_sec": 1078.0},
        {"variant": "x", "depth": 4, "val_bpb": 1.95, "tok_per_sec": 1078.0},
    ]
    lines = bench.table(rows).splitlines()
    assert lines[2] == "| baseline | 4 | 2 | 2.1000 | 0.2000 |  | 1,100 |  |"
    assert lines[3] == "| x | 4 | 2 | 1.9250 | 0.0500 | -0.1750 | 1,078 | 0.980x |"
    assert bench.parse_variants(["wd=--muon-weight-decay 0.1"]) == {
        "baseline": "",
        "wd": "--muon-weight-decay 0.1",
    }
    with pytest.raises(SystemExit, match="NAME=FLAGS"):
        bench.parse_variants(["--ns polar"])


def test_tiny_sweep_runs_resumes_and_prints_the_table(tmp_path, capsys):
    bench = load_bench()
    results = tmp_path / "sweep.jsonl"
    argv = ["--variants", "polar=--ns polar", "--depths", "1", "--seeds", "3", "--target-flops", "6e8"]
    argv += ["--vocab-size", "300", "--tokenizer-max-chars", "50000", "--max-seq-len", "64"]
    argv += ["--results", str(results), "--jobs", "2"]
    argv += ["--common", "--aspect-ratio 32 --head-dim 32 --total-batch-size 256 --eval-tokens 512"]
    assert bench.main(argv) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["variant"] for r in rows) == ["baseline", "polar"]
    for row in rows:  # the FLOP budget set the horizon: steps * batch * FLOPs/token ~ 6e8
        assert row["train_flops"] == pytest.approx(6e8, rel=0.1) and row["steps"] > 1
        assert 1.0 < row["val_bpb"] < 20 and row["tok_per_sec"] > 0
    out = capsys.readouterr().out
    assert "| polar | 1 | 1 |" in out and "| baseline | 1 | 1 |" in out

    assert bench.main(argv) == 0  # everything is in the file: nothing runs again
    assert "2 of 2 runs already" in capsys.readouterr().out
    assert len(results.read_text().splitlines()) == 2
