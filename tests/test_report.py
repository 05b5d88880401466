"""The report card: stages record typed, versioned sections (bad ones are refused with the reason); the
report puts each figure in its cell beside reference rows, shows samples as conversations, one unit per
kind of figure, no absolute path, smoothed curves against steps and FLOPs, and the cost of the hardware."""

from __future__ import annotations

import json
import math
import re
import struct
import time
from pathlib import Path

import pytest

from picochat import report, report_machine, report_plots, report_schema
from picochat.common import PicochatError, append_jsonl, atomic_write_json

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
        noise = 0.3 * math.sin(step * 1.7)
        row = {
            "step": step,
            "kind": "train",
            "loss": 6 * math.exp(-step / 20) + 3 + noise,
            "train_seconds": 2.0 * step,
        }
        append_jsonl(path, row)
        if step % 20 == 0:
            append_jsonl(
                path, {"step": step, "kind": "val", "val_bpb": 2.0 - step / 100, "train_seconds": 2.0 * step}
            )


def chat_eval(**accuracies: float) -> dict:
    """A section shaped like `picochat eval chat` records it (run_chat_eval's result plus settings)."""
    tasks = {
        n: {"accuracy": a, "centered": a, "baseline": 0.0, "n": 100, "too_long": 0}
        for n, a in accuracies.items()
    }
    return {"stage": "sft", "model_tag": "d4", "step": 10, "tasks": tasks, "ChatCORE": None, "missing": [],
            "max_per_task": 100, "source": "bundled", "temperature": 0.0, "top_k": 50, "max_new_tokens": 256,
            "num_samples": 1, "seed": 42, "seconds": 75.5}  # fmt: skip


def record_full_run(home: Path) -> None:
    """Sections with the fields today's stages record (see the call sites in train/ and evals/)."""
    report.reset_report()
    report.record("tokenizer", {"vocab_size": 8192, "requested_vocab_size": 8192, "train_seconds": 30.5})
    write_metrics(home / "runs" / "d4" / "metrics.jsonl")
    report.record(
        "base",
        {"model_tag": "d4", "num_params": 1_234_567, "steps": 60, "total_batch_size": 2048,
         "flops_per_token": 4.2e7, "train_minutes": 2.0, "final_val_bpb": 1.41, "min_val_bpb": 1.40,
         "core_metric": None, "mfu_percent": 12.5,
         "metrics": str(home / "runs/d4/metrics.jsonl"), "checkpoint_dir": str(home / "checkpoints/base/d4"),
         "samples": ["The capital of France is Paris."]},
    )  # fmt: skip
    report.record(
        "base-eval",
        {"core": 0.1234, "core_summary": "CORE over 20/22 tasks; missing: squad, coqa",
         "tasks": {"arc_easy": {"accuracy": 0.9, "centered": 0.8667, "n": 100}}},
    )  # fmt: skip
    write_metrics(home / "runs" / "mid" / "metrics.jsonl", steps=10)
    report.record(
        "mid",
        {"steps": 10, "train_minutes": 0.5, "final_val_loss": 2.5, "accuracy_SpellingBee": 0.5,
         "metrics": str(home / "runs/mid/metrics.jsonl"),
         "samples": [{"prompt": "What is 2+2?", "reply": "4\nfour", "ended": True, "tool_call": False}]},
    )  # fmt: skip
    report.record("chat-eval-mid", {**chat_eval(**{"ARC-Easy": 0.31, "ARC-Challenge": 0.27, "MMLU": 0.26}),
                                    "ChatCORE": 0.05})  # fmt: skip
    report.record(
        "chat-eval-sft", chat_eval(**{"ARC-Easy": 0.35, "HumanEval": 0.06, "GSM8K": 0.02, "SpellingBee": 0.6})
    )
    report.record(
        "rl", {"steps": 4, "train_minutes": 1.0, "final_reward": 0.25, "pass_at_k": {"pass@1": 0.2}}
    )
    report.record("chat-eval-rl", chat_eval(GSM8K=0.08))


def summary_rows(markdown: str) -> list[tuple[str, dict[str, str]]]:
    lines = markdown[markdown.index("| Metric |") :].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append((cells[0], dict(zip(header[1:], cells[1:], strict=True))))
    return rows


def summary_table(markdown: str) -> dict[str, dict[str, str]]:
    """{metric: {column: cell}} of this run's rows, without the (italic) reference rows."""
    return {k: v for k, v in summary_rows(markdown) if not k.startswith("_")}


def reference_rows(markdown: str, metric: str) -> dict[str, dict[str, str]]:
    """{reference label: {column: cell}} of the rows under `metric`."""
    rows, found = {}, False
    for label, cells in summary_rows(markdown):
        if not label.startswith("_"):
            found = label == metric
        elif found:
            rows[label] = cells
    return rows


def png_width(png: bytes) -> int:
    assert png.startswith(PNG_MAGIC)
    return struct.unpack(">I", png[16:20])[0]


def test_report_puts_each_number_in_its_cell_beside_the_references_and_draws_pngs(home, tmp_path):
    record_full_run(home)
    assert report.main(["--out", "out/report.md"]) == 0
    for md in (home / "report" / "report.md", tmp_path / "out" / "report.md"):
        text = md.read_text()
        table = summary_table(text)
        assert list(table) == report.SUMMARY_METRICS
        assert table["Validation bpb"] == {"BASE": "1.4100", "MID": "-", "SFT": "-", "RL": "-"}
        assert table["CORE"] == {"BASE": "0.1234", "MID": "-", "SFT": "-", "RL": "-"}
        assert table["ARC-Easy"] == {"BASE": "-", "MID": "0.3100", "SFT": "0.3500", "RL": "-"}
        assert table["ARC-Challenge"] == {"BASE": "-", "MID": "0.2700", "SFT": "-", "RL": "-"}
        assert table["MMLU"]["MID"] == "0.2600" and table["ChatCORE"]["MID"] == "0.0500"
        assert table["HumanEval"] == {"BASE": "-", "MID": "-", "SFT": "0.0600", "RL": "-"}
        assert table["GSM8K"] == {"BASE": "-", "MID": "-", "SFT": "0.0200", "RL": "0.0800"}
        assert table["SpellingBee"] == {"BASE": "-", "MID": "-", "SFT": "0.6000", "RL": "-"}
        # Reference rows follow their metric: GPT-2's CORE, nanochat's $100 run, runs/cpu.sh's README figures.
        core = reference_rows(text, "CORE")
        assert core["_GPT-2 (1.6B)_ [3]"] == {"BASE": "0.2565", "MID": "-", "SFT": "-", "RL": "-"}
        assert core["_nanochat d20 $100 speedrun, 8xH100_ [2]"]["BASE"] == "0.2219"
        assert core["_runs/cpu.sh, 2 CPU cores_ [1]"]["BASE"] == "-0.0300"
        chatcore = reference_rows(text, "ChatCORE")
        assert chatcore["_nanochat d20 $100 speedrun, 8xH100_ [2]"] == {
            "BASE": "-",
            "MID": "0.0730",
            "SFT": "0.0884",
            "RL": "-",
        }
        assert chatcore["_runs/cpu.sh, 2 CPU cores_ [1]"]["RL"] == "0.1289"
        assert reference_rows(text, "Validation bpb")["_runs/cpu.sh, 2 CPU cores_ [1]"]["BASE"] == "1.7700"
        assert reference_rows(text, "SpellingBee")["_runs/cpu.sh, 2 CPU cores_ [1]"]["SFT"] == "0.6400"
        assert "3a5e0bc" in text and "GPT-2 CORE score is 0.256525" in text
        # Sections appear in pipeline order with their details and units.
        order = ("tokenizer", "base", "base-eval", "mid", "chat-eval-rl")
        positions = [text.index(f"## {s}\n") for s in order]
        assert positions == sorted(positions)
        assert "- num_params: 1,234,567" in text and "- final_val_bpb: 1.4100 bits/byte" in text
        assert "- final_val_loss: 2.5000 nats/token" in text and "- mfu_percent: 12.5%" in text
        assert "| arc_easy | 0.9000 | 0.8667 | 100 |" in text
        # Every linked figure exists beside the markdown and is a real PNG.
        links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
        figures = ("base_loss.png", "base_val_bpb.png", "mid_loss.png", "mid_val_bpb.png")
        assert sorted(links) == [f"report_files/{n}" for n in figures]
        for link in links:
            assert len((md.parent / link).read_bytes()) > 5000 and png_width((md.parent / link).read_bytes())
    assert "Total wall-clock time: 0h 00m" in text and "Estimated cost: $0.00 at $" in text


def test_durations_are_seconds_and_samples_are_conversations(home):
    record_full_run(home)
    problems = {}
    records = report.load_sections(problems=problems)
    assert not problems
    assert records["base"].data["train_seconds"] == 120.0 and "train_minutes" not in records["base"].data
    assert records["mid"].number("accuracy_SpellingBee") == 0.5
    text = report.write_report([home / "r.md"])
    assert "- train_seconds: 30.5 s" in text and "- train_seconds: 0h 02m 00s" in text
    assert "- seconds: 0h 01m 16s" in text  # chat eval's `seconds`: the same duration format
    # A chat sample is a user turn, an assistant turn (multi-line kept) and how it ended; never a dict repr.
    assert "> **User:** What is 2+2?\n>\n> **Assistant:** 4\n> four\n>\n> _(ended its turn)_" in text
    assert "> The capital of France is Paris." in text  # a base model's completion
    assert "{'prompt'" not in text and "'reply'" not in text
    # Model text is shown literally: a reply's "####" or special tokens do not become markdown.
    samples = [report_schema.Sample(reply="#### 42 <|python_end|> *x*", prompt="q_1")]
    shown = "\n".join(report.render_samples(samples))
    assert (
        "> **User:** q\\_1" in shown
        and "> **Assistant:** \\#\\#\\#\\# 42 \\<\\|python\\_end\\|\\> \\*x\\*" in shown
    )


def test_no_absolute_path_of_the_writing_machine(home, tmp_path):
    record_full_run(home)
    report.record(
        "download", {"base_url": "https://x/{i}", "dest": "/srv/data/hub", "shards": 2, "bytes": 10}
    )
    stored = json.loads((home / "report" / "base.json").read_text())
    assert stored["schema_version"] == report_schema.SCHEMA_VERSION and stored["section"] == "base"
    assert stored["metrics"] == "runs/d4/metrics.jsonl"
    assert stored["checkpoint_dir"] == "checkpoints/base/d4"
    text = report.write_report([home / "r.md"])
    assert str(tmp_path) not in text and str(Path.home()) not in text and "/srv/" not in text
    assert "- metrics: `$PICOCHAT_HOME/runs/d4/metrics.jsonl`" in text and "- dest: `.../data/hub`" in text


def test_unknown_or_malformed_sections_are_refused_with_the_reason(home):
    with pytest.raises(PicochatError, match="unknown report section 'bsae'; record one of: header"):
        report.record("bsae", {"steps": 1})
    with pytest.raises(PicochatError, match="'base' has an unknown field 'stpes'; declare it"):
        report.record("base", {"steps": 1, "stpes": 2})
    with pytest.raises(PicochatError, match="'base' lacks required field"):
        report.record("base", {"final_val_bpb": 1.0})
    with pytest.raises(PicochatError, match="field 'steps' should be an integer, got 2.5"):
        report.record("base", {"steps": 2.5})
    with pytest.raises(PicochatError, match="field 'final_val_bpb' should be a number"):
        report.record("base", {"steps": 2, "final_val_bpb": "low"})
    with pytest.raises(PicochatError, match="field 'tasks' should be a dict of per-row dicts"):
        report.record("chat-eval-sft", {"tasks": ["ARC-Easy"]})
    with pytest.raises(PicochatError, match="a sample should be a completion string or a dict with 'reply'"):
        report.record("sft", {"steps": 1, "samples": [{"text": "hi"}]})
    assert not (home / "report").exists()  # nothing half-written


def test_old_unversioned_sections_are_read_or_refused_with_a_clear_message(home):
    folder = home / "report"
    # Written by picochat before schema versions: fields at the top level, no "schema_version".
    old = {"section": "base", "timestamp": "2026-01-01 00:00:00", "steps": 5, "train_minutes": 1.5,
           "final_val_bpb": 1.9}  # fmt: skip
    atomic_write_json(folder / "base.json", old)
    atomic_write_json(
        folder / "chat-eval-mid.json", {"section": "chat-eval-mid", "ARC-Easy": 0.31}
    )  # fuzzy era
    atomic_write_json(folder / "sft.json", {"schema_version": 99, "section": "sft", "steps": 1})
    problems = {}
    records = report.load_sections(problems=problems)
    assert records["base"].data == {"steps": 5, "train_seconds": 90.0, "final_val_bpb": 1.9}
    assert "written by an older picochat (no schema version)" in problems["chat-eval-mid"]
    assert "rerun that stage" in problems["chat-eval-mid"]
    assert "schema version 99, this picochat reads 1" in problems["sft"]
    text = report.write_report([home / "r.md"])
    assert "## Sections left out" in text and "- sft: report section 'sft' has schema version 99" in text
    assert summary_table(text)["Validation bpb"]["BASE"] == "1.9000"


def test_missing_sections_render_as_dashes(home):
    report.record("base-eval", {"core": 0.2})
    text = report.write_report([home / "report.md"])
    table = summary_table(text)
    assert table["CORE"] == {"BASE": "0.2000", "MID": "-", "SFT": "-", "RL": "-"}
    assert all(v == "-" for m in report.SUMMARY_METRICS if m != "CORE" for v in table[m].values())
    assert "## base\n" not in text and "## mid\n" not in text
    assert "(no header)" in text  # no reset: the time is measured between recorded sections
    assert not (home / "report_files").exists()  # no metrics, no figures

    empty = report.render_report({}, {}, "report_files")
    assert all(
        v == "-" for k, row in summary_table(empty).items() if k.startswith("**") for v in row.values()
    )
    assert "Total wall-clock time: unknown" in empty


def test_curves_are_smoothed_and_drawn_against_steps_flops_and_time(home):
    flat = report_plots.smooth([2.0] * 50)
    assert flat == pytest.approx([2.0] * 50)  # bias-corrected: no pull towards 0 at the start
    noisy = [3 + (1 if i % 2 else -1) for i in range(200)]
    smoothed = report_plots.smooth(noisy)
    assert smoothed[0] == noisy[0] and max(abs(v - 3) for v in smoothed[100:]) < 0.2
    base = report_schema.make_record(
        "base", "t", {"steps": 1, "total_batch_size": 2048, "flops_per_token": 1e6}
    )
    assert report_plots.row_flops({"step": 10}, base) == 10 * 2048 * 1e6
    assert report_plots.row_flops({"step": 10, "tokens": 5}, base) == 5e6  # a logged token count wins
    assert report_plots.row_flops({"step": 10, "flops": 7.0}, base) == 7.0  # and a logged FLOP count more so
    sft = report_schema.make_record("sft", "t", {"steps": 1})
    assert report_plots.row_flops({"step": 10}, sft) is None  # SFT logs no tokens and no FLOPs per token
    rows = [{"step": s, "loss": 5 - s / 100, "train_seconds": s} for s in range(100)]
    width_with_flops = png_width(report_plots.plot_curves(base, rows)["loss"])
    width_without = png_width(report_plots.plot_curves(sft, rows)["loss"])
    assert width_with_flops == pytest.approx(1.5 * width_without, rel=0.02)  # 3 panels, not 2


def test_a_vanished_metrics_file_or_a_torn_line_does_not_break_the_report(home):
    metrics = home / "runs" / "x" / "metrics.jsonl"
    write_metrics(metrics, steps=5)
    with open(metrics, "a") as f:
        f.write('{"step": 5, "loss": 1.')  # a crash mid-line
    assert len(report_plots.read_metrics(metrics)) == 5 + 1
    report.record("sft", {"steps": 5, "metrics": str(metrics)})
    report.record("rl", {"steps": 5, "metrics": str(home / "gone.jsonl")})
    text = report.write_report([home / "r.md"])
    assert "r_files/sft_loss.png" in text and "rl_loss" not in text
    assert (home / "r_files" / "sft_loss.png").read_bytes().startswith(PNG_MAGIC)


def test_wall_clock_and_cost_on_8_h100_and_on_a_cpu(home):
    system = {**report.system_info(), "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_gb": 79.6}] * 8}
    atomic_write_json(
        home / "report" / "header.json",
        {"schema_version": 1, "section": "header", "timestamp": "2026-01-01 00:00:00",
         "start_unix": time.time() - 7200, "system": system},
    )  # fmt: skip
    report.record("base", {"steps": 1})
    text = report.write_report([home / "report.md"])
    # Section timestamps have whole seconds, the header's start does not.
    assert re.search(r"Total wall-clock time: (2h 00m 0\ds|1h 59m 5\ds)", text)
    cost = float(re.search(r"Estimated cost: \$([\d.]+)", text).group(1))
    assert 47.9 <= cost <= 48.2  # 8 x $3/h x 2 h
    assert "NVIDIA H100 80GB HBM3 $3.00/h" in text and "GPUs: NVIDIA H100 80GB HBM3 (79.6 GB)" in text
    rate, how = report.hourly_cost({"gpus": [], "cores_logical": 2})
    assert rate == pytest.approx(2 * report_machine.CPU_CORE_HOURLY_USD) and "$0.045 per core-hour" in how


def test_reset_clears_and_records_a_header(home):
    report.record("base", {"steps": 3})
    (home / "report" / "report.md").write_text("old")
    report.reset_report()
    assert sorted(p.name for p in (home / "report").iterdir()) == ["header.json"]
    header = report.load_sections()["header"].data
    assert abs(header["start_unix"] - time.time()) < 60
    assert header["system"]["code"]["files"] > 5 and header["system"]["code"]["approx_tokens"] > 1000
    assert header["system"]["python"] and header["system"]["cores_logical"] >= 1
    assert report.main(["--reset"]) == 0 and list(report.load_sections()) == ["header"]


def test_record_writes_one_json_per_section_on_rank_0_only(home, monkeypatch):
    report.record("tokenizer", {"vocab_size": 512})
    saved = json.loads((home / "report" / "tokenizer.json").read_text())
    assert saved["section"] == "tokenizer" and saved["schema_version"] == report_schema.SCHEMA_VERSION
    assert {k: v for k, v in saved.items() if k not in ("section", "schema_version", "timestamp")} == {
        "vocab_size": 512
    }
    time.strptime(saved["timestamp"], report.TIME_FORMAT)
    monkeypatch.setenv("RANK", "1")
    report.record("sft", {"steps": 1})
    assert not (home / "report" / "sft.json").exists()
    with pytest.raises(PicochatError):  # every rank checks, so a bad section fails on all of them alike
        report.record("sft", {"steps": "one"})


def test_the_chat_task_names_are_the_chat_evals():
    from picochat.evals.chat import CHAT_TASKS

    assert report_schema.CHAT_TASK_NAMES == tuple(CHAT_TASKS)
    assert set(report.CHAT_METRICS) == set(CHAT_TASKS)  # SpellingBee included


def test_every_flag_has_help():
    for action in report.build_parser()._actions:
        assert action.help, action.option_strings
