"""picochat/train/flops.py and bench/train.py: the peak FLOP/s behind MFU; MFU never reads above 100%."""

from __future__ import annotations

import importlib.util
import json

import torch

from picochat.common import REPO_DIR
from picochat.train import flops

CPU = torch.device("cpu")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_train", REPO_DIR / "bench" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_cached_peak_below_a_quick_probe_is_re_measured(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    key = flops._cpu_key(CPU)
    (tmp_path / "peak_flops.json").write_text(json.dumps({key: 1e3}))  # measured on a "busy" machine
    peak, source = flops.peak_flops(CPU)
    assert peak > 1e6 and "re-measured" in source and key in source
    assert json.loads((tmp_path / "peak_flops.json").read_text())[key] == peak
    again, source = flops.peak_flops(CPU)  # a good cached value is kept (the probe does not beat it often)
    assert again >= peak and "cached" in source


def test_throughput_above_the_peak_raises_the_cached_peak(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    peak, source = flops.raise_peak(CPU, 5e9, 2e9, "cpu x, measured matmul peak")
    assert peak == 5e9 and "raised to the observed 5.0 GFLOP/s" in source
    assert json.loads((tmp_path / "peak_flops.json").read_text()) == {flops._cpu_key(CPU): 5e9}
    assert flops.raise_peak(CPU, 1e9, 2e9, "kept") == (2e9, "kept")


def test_bench_mfu_is_at_most_100_percent_when_the_cached_peak_is_too_low(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    monkeypatch.setattr(flops, "measure_matmul_flops", lambda *a, **k: 1.0)  # a hopelessly low peak
    args = "--depth 2 --seq-len 32 --device-batch-size 2 --total-batch-size 64 --vocab-size 256 --steps 1"
    assert _bench().main(args.split()) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("BENCH_RESULT ")][-1]
    result = json.loads(line.removeprefix("BENCH_RESULT "))
    assert result["tok_per_sec"] > 0 and 99.9 < result["mfu"] <= 100.0
    assert "raised to the observed" in result["peak_source"] and result["peak_cuda_gb"] == 0.0
