"""The report card: sections recorded by stages become report.md with a summary table per stage,
training-curve PNGs, the wall-clock time and its cost; missing sections read "-"; reset clears."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest

from picochat import report
from picochat.common import append_jsonl, atomic_write_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


def write_metrics(path: Path, steps: int = 60) -> None:
    """Training lines like the base trainer's (train_seconds) and validation lines every 20 steps."""
    for step in range(steps):
        append_jsonl(
            path,
            {
                "step": step,
                "kind": "train",
                "loss": 6 * math.exp(-step / 20) + 3,
                "train_seconds": 2.0 * step,
                "tok_per_sec": 5000.0,
                "mfu": 1.5,
            },
        )
        if step % 20 == 0:
            append_jsonl(path, {"step": step, "kind": "val", "val_bpb": 2.0 - step / 100, "time": 2.0 * step})


def record_full_run(home: Path) -> None:
    report.reset_report()
    report.record("tokenizer", {"vocab_size": 8192, "train_seconds": 30.5})
    write_metrics(home / "runs" / "d4" / "metrics.jsonl")
    report.record(
        "base",
        {
            "num_params": 1_234_567,
            "final_val_bpb": 1.41,
            "metrics": str(home / "runs/d4/metrics.jsonl"),
            "samples": ["The capital of France is Paris."],
        },
    )
    report.record(
        "base-eval",
        {
            "core": 0.1234,
            "core_summary": "CORE over 20/22 tasks; missing: squad, coqa",
            "tasks": {"arc_easy": {"accuracy": 0.9, "centered": 0.8667, "n": 100}},
        },
    )
    write_metrics(home / "runs" / "mid" / "metrics.jsonl", steps=10)
    report.record("mid", {"steps": 10, "metrics_path": "runs/mid/metrics.jsonl"})  # relative to PICOCHAT_HOME
    # Three shapes a chat eval might record: flat, per-task dicts, nested under another key.
    report.record("chat-eval-mid", {"ARC-Easy": 0.31, "ARC-Challenge": 0.27, "MMLU": 0.26, "ChatCORE": 0.05})
    report.record(
        "chat-eval-sft",
        {
            "tasks": {
                "arc_easy": {"accuracy": 0.35, "n": 100},
                "humaneval": {"accuracy": 0.06},
                "GSM8K": {"accuracy": 0.02},
            }
        },
    )
    report.record("chat-eval-rl", {"results": {"gsm8k": 0.08}})


def summary_table(markdown: str) -> dict[str, dict[str, str]]:
    lines = markdown[markdown.index("| Metric |") :].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:], strict=True))
    return rows


def test_report_puts_each_number_in_its_cell_and_draws_valid_pngs(home, tmp_path):
    record_full_run(home)
    assert report.main(["--out", "out/report.md"]) == 0
    for md in (home / "report" / "report.md", tmp_path / "out" / "report.md"):
        text = md.read_text()
        table = summary_table(text)
        assert list(table) == report.SUMMARY_METRICS
        assert table["CORE"] == {"BASE": "0.1234", "MID": "-", "SFT": "-", "RL": "-"}
        assert table["ARC-Easy"] == {"BASE": "-", "MID": "0.3100", "SFT": "0.3500", "RL": "-"}
        assert table["ARC-Challenge"] == {"BASE": "-", "MID": "0.2700", "SFT": "-", "RL": "-"}
        assert table["MMLU"]["MID"] == "0.2600" and table["ChatCORE"]["MID"] == "0.0500"
        assert table["HumanEval"] == {"BASE": "-", "MID": "-", "SFT": "0.0600", "RL": "-"}
        assert table["GSM8K"] == {"BASE": "-", "MID": "-", "SFT": "0.0200", "RL": "0.0800"}
        # Sections appear in pipeline order with their details.
        order = ("tokenizer", "base", "base-eval", "mid", "chat-eval-rl")
        positions = [text.index(f"## {s}\n") for s in order]
        assert positions == sorted(positions)
        assert "num_params: 1,234,567" in text and "The capital of France is Paris." in text
        assert "| arc_easy | 0.9000 | 0.8667 | 100 |" in text
        # Every linked figure exists beside the markdown and is a real PNG.
        links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
        figures = ("base_loss.png", "base_val_bpb.png", "mid_loss.png", "mid_val_bpb.png")
        assert sorted(links) == [f"report_files/{n}" for n in figures]
        for link in links:
            png = (md.parent / link).read_bytes()
            assert png.startswith(PNG_MAGIC) and len(png) > 5000
    assert "Total wall-clock time: 0h 00m" in text and "Estimated cost: $0.00 (CPU only" in text


def test_missing_sections_render_as_dashes(home):
    report.record("base-eval", {"core": 0.2})
    text = report.write_report([home / "report.md"])
    table = summary_table(text)
    assert table["CORE"] == {"BASE": "0.2000", "MID": "-", "SFT": "-", "RL": "-"}
    assert all(v == "-" for m in report.SUMMARY_METRICS[1:] for v in table[m].values())
    assert "## base\n" not in text and "## mid\n" not in text
    assert "(no header)" in text  # no reset: the time is measured between recorded sections
    assert not (home / "report_files").exists()  # no metrics, no figures

    empty = report.render_report({}, {}, "report_files")
    assert all(v == "-" for row in summary_table(empty).values() for v in row.values())
    assert "Total wall-clock time: unknown" in empty


def test_a_vanished_metrics_file_or_a_torn_line_does_not_break_the_report(home):
    metrics = home / "runs" / "x" / "metrics.jsonl"
    write_metrics(metrics, steps=5)
    with open(metrics, "a") as f:
        f.write('{"step": 5, "loss": 1.')  # a crash mid-line
    assert len(report.read_metrics(metrics)) == 5 + 1
    report.record("sft", {"metrics_path": str(metrics)})
    report.record("rl", {"metrics_path": str(home / "gone.jsonl")})
    text = report.write_report([home / "r.md"])
    assert "r_files/sft_loss.png" in text and "rl_loss" not in text
    assert (home / "r_files" / "sft_loss.png").read_bytes().startswith(PNG_MAGIC)


def test_wall_clock_and_cost_from_the_header_on_8_h100(home):
    system = {**report.system_info(), "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_gb": 79.6}] * 8}
    atomic_write_json(
        home / "report" / "header.json",
        {
            "section": "header",
            "start_unix": time.time() - 7200,
            "timestamp": "2026-01-01 00:00:00",
            "system": system,
        },
    )
    report.record("base", {"steps": 1})
    text = report.write_report([home / "report.md"])
    # Section timestamps have whole seconds, the header's start does not.
    assert re.search(r"Total wall-clock time: (2h 00m 0\ds|1h 59m 5\ds)", text)
    cost = float(re.search(r"Estimated cost: \$([\d.]+)", text).group(1))
    assert 47.9 <= cost <= 48.2  # 8 x $3/h x 2 h
    assert "NVIDIA H100 80GB HBM3 $3.00/h" in text and "GPUs: NVIDIA H100 80GB HBM3 (79.6 GB)" in text
    assert report.hourly_cost({"gpus": []})[0] == 0.0


def test_reset_clears_and_records_a_header(home):
    report.record("base", {"steps": 3})
    (home / "report" / "report.md").write_text("old")
    report.reset_report()
    assert sorted(p.name for p in (home / "report").iterdir()) == ["header.json"]
    header = report.load_sections()["header"]
    assert abs(header["start_unix"] - time.time()) < 60
    assert header["system"]["code"]["files"] > 5 and header["system"]["code"]["approx_tokens"] > 1000
    assert header["system"]["python"] and header["system"]["cores_logical"] >= 1
    assert report.main(["--reset"]) == 0 and list(report.load_sections()) == ["header"]


def test_record_writes_one_json_per_section_on_rank_0_only(home, monkeypatch):
    report.record("tokenizer", {"vocab_size": 512})
    saved = json.loads((home / "report" / "tokenizer.json").read_text())
    assert saved["section"] == "tokenizer" and saved["vocab_size"] == 512
    time.strptime(saved["timestamp"], report.TIME_FORMAT)
    monkeypatch.setenv("RANK", "1")
    report.record("sft", {"steps": 1})
    assert not (home / "report" / "sft.json").exists()


def test_find_metric_accepts_the_usual_shapes():
    assert report.find_metric({"ARC-Easy": 0.5}, "ARC-Easy") == 0.5
    assert report.find_metric({"tasks": {"arc_easy": {"accuracy": 0.4}}}, "ARC-Easy") == 0.4
    assert report.find_metric({"results": {"Arc Challenge": {"acc": 0.3}}}, "ARC-Challenge") == 0.3
    assert report.find_metric({"ChatCORE": 0.1, "core": 0.9}, "ChatCORE") == 0.1
    assert report.find_metric({"done": True}, "done") is None and report.find_metric(None, "MMLU") is None
    # base-eval's own arc_easy (a CORE task) must not leak into the ARC-Easy row of the BASE column.
    cells = report.summary_cells({"base-eval": {"core": 0.3, "tasks": {"arc_easy": {"accuracy": 0.9}}}})
    assert cells["CORE"]["BASE"] == 0.3 and cells["ARC-Easy"]["BASE"] is None


def test_every_flag_has_help():
    for action in report.build_parser()._actions:
        assert action.help, action.option_strings
