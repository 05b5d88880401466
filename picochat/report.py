"""The report card: every stage records its parameters and metrics here; `picochat report` writes report.md.

Stages call `record(section, data)`, which checks `data` against the section's record type
(picochat/report_schema.py: declared fields, units, schema version) and saves it as
`$PICOCHAT_HOME/report/<section>.json`. A run starts with `picochat report --reset` (clears the folder,
records a "header" with the start time and the machine) and ends with `picochat report`, which renders
every recorded section, in pipeline order, into `report.md`: each section's figures with their units,
samples as conversations, training curves as PNG files beside it (smoothed, against steps, FLOPs and
time), a summary table (one column per stage, one row per headline metric, each followed by reference
rows to compare against), the total wall-clock time and its estimated cost on the hardware it ran on.
Any section may be missing: it is simply left out, and its cells in the summary read "-". No absolute
path of the machine that wrote the records appears in the report.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from picochat.common import (
    PicochatError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    get_base_dir,
    get_rank,
    run_cli,
)
from picochat.report_machine import hourly_cost, system_info
from picochat.report_plots import plot_curves, read_metrics
from picochat.report_schema import (
    BPB,
    CHAT_TASK_NAMES,
    COUNT,
    FLAG,
    FLOPS,
    JSON,
    NATS,
    PATH,
    PERCENT,
    RATE,
    SAMPLES,
    SCORE,
    SECONDS,
    SECTION_TYPES,
    TABLE,
    Record,
    Sample,
    make_record,
    parse_record,
    resolve_path,
    shown_path,
)  # fmt: skip

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
SECTION_ORDER = ["header", "download", "tokenizer", "tokenizer-eval", "base", "base-eval",
                 "mid", "chat-eval-mid", "sft", "chat-eval-sft", "rl", "chat-eval-rl"]  # fmt: skip
# Summary columns: column title -> the section holding that stage's evaluation.
STAGE_COLUMNS = {"BASE": "base-eval", "MID": "chat-eval-mid", "SFT": "chat-eval-sft", "RL": "chat-eval-rl"}
CHAT_METRICS = sorted(CHAT_TASK_NAMES)  # the chat evals' tasks, alphabetically as nanochat's table
SUMMARY_METRICS = ["Validation bpb", "CORE", *CHAT_METRICS, "ChatCORE"]
GPT2_CORE = 0.256525  # GPT-2 (1.6B)'s CORE as nanochat's README states it


@dataclass(frozen=True)
class Reference:
    """A published run to compare against: its summary cells {metric: {column: value}}, and its source."""

    label: str
    source: str
    cells: dict[str, dict[str, float]]


def _stages(*values: float | None) -> dict[str, float]:
    return {c: v for c, v in zip(STAGE_COLUMNS, values, strict=True) if v is not None}


REFERENCES = [
    Reference(
        "runs/cpu.sh, 2 CPU cores",
        "picochat README (\"What to expect on a 2-core CPU\": 1.770 bits/byte, ChatCORE 0.117/0.126/0.129, "
        "40 min) and the per-task figures of that run's report card (docs/example_report.md at 78fe86d)",
        {"Validation bpb": _stages(1.770, None, None, None), "CORE": _stages(-0.0300, None, None, None),
         "ARC-Challenge": _stages(None, 0.18, 0.27, 0.27), "ARC-Easy": _stages(None, 0.30, 0.24, 0.25),
         "GSM8K": _stages(None, 0.01, 0.01, 0.00), "HumanEval": _stages(None, 0.0, 0.0, 0.0),
         "MMLU": _stages(None, 0.31, 0.32, 0.33), "SpellingBee": _stages(None, 0.64, 0.64, 0.64),
         "ChatCORE": _stages(None, 0.1172, 0.1261, 0.1289)},
    ),
    Reference(
        "nanochat d20 $100 speedrun, 8xH100",
        "karpathy/nanochat README.md, summary table of its speedrun.sh report card (3h51m), from the first "
        "commit 3a5e0bc (2025-10-13) until 1ddaad1 (2026-01-31) removed it",
        {"CORE": _stages(0.2219, None, None, None), "ARC-Challenge": _stages(None, 0.2875, 0.2807, None),
         "ARC-Easy": _stages(None, 0.3561, 0.3876, None), "GSM8K": _stages(None, 0.0250, 0.0455, 0.0758),
         "HumanEval": _stages(None, 0.0671, 0.0854, None), "MMLU": _stages(None, 0.3111, 0.3151, None),
         "ChatCORE": _stages(None, 0.0730, 0.0884, None)},
    ),
    Reference(
        "GPT-2 (1.6B)",
        "karpathy/nanochat README.md: \"The GPT-2 CORE score is 0.256525\"",
        {"CORE": _stages(GPT2_CORE, None, None, None)},
    ),
]  # fmt: skip
_MARKDOWN_SPECIALS = set("\\`*_{}[]<>#|!")
MAX_VALUE_CHARS = 300  # longer nested values are cut in the report (the JSON keeps them whole)


def report_dir() -> Path:
    return get_base_dir() / "report"


def record(section: str, data: dict[str, Any]) -> None:
    """Check `data` against the section's record type (a PicochatError names what is wrong) and save it,
    on rank 0 only, as $PICOCHAT_HOME/report/<section>.json. Every rank checks, so all fail alike."""
    checked = make_record(section, time.strftime(TIME_FORMAT), data)
    if get_rank() == 0:
        atomic_write_json(report_dir() / f"{section}.json", checked.to_json())


def reset_report() -> None:
    """Start a new report: forget every recorded section, then record the start time and the machine."""
    if get_rank() != 0:
        return
    shutil.rmtree(report_dir(), ignore_errors=True)
    record("header", {"start_unix": time.time(), "system": system_info()})


def load_sections(folder: Path | None = None, problems: dict[str, str] | None = None) -> dict[str, Record]:
    """Every readable recorded section keyed by name; each one left out is warned about on stderr and, if
    `problems` is given, noted there as {section: why}."""
    folder = folder or report_dir()
    records, left_out = {}, {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            records[path.stem] = parse_record(path.stem, json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as e:
            left_out[path.stem] = f"unreadable ({type(e).__name__}: {e})"
        except PicochatError as e:
            left_out[path.stem] = str(e)
    for section, why in left_out.items():
        print(f"warning: report section {section} left out: {why}", file=sys.stderr)
    if problems is not None:
        problems.update(left_out)
    return records


# ---------------------------------------------------------------------------------------------
# The summary: this run's headline figures beside the reference runs'


def summary_cells(records: dict[str, Record]) -> dict[str, dict[str, float | None]]:
    """{metric: {column: value or None}}, each read from the one field that holds it. The BASE column shows
    CORE and bits per byte only: base-eval's per-task accuracies come from CORE's few-shot completion
    format, not the chat evals'."""
    cells: dict[str, dict[str, float | None]] = {m: dict.fromkeys(STAGE_COLUMNS) for m in SUMMARY_METRICS}
    base = records.get("base")
    cells["Validation bpb"]["BASE"] = base.number("final_val_bpb") if base else None
    if (base_eval := records.get("base-eval")) is not None:
        cells["CORE"]["BASE"] = base_eval.number("core")
    for column, section in STAGE_COLUMNS.items():
        if column == "BASE" or (chat_eval := records.get(section)) is None:
            continue
        tasks = chat_eval.data["tasks"]
        for metric in CHAT_METRICS:
            accuracy = (tasks.get(metric) or {}).get("accuracy")
            cells[metric][column] = float(accuracy) if isinstance(accuracy, (int, float)) else None
        cells["ChatCORE"][column] = chat_eval.number("ChatCORE")
    return cells


def render_summary(records: dict[str, Record]) -> list[str]:
    cells, columns = summary_cells(records), list(STAGE_COLUMNS)
    rows = []
    for metric in SUMMARY_METRICS:
        unit = BPB if metric == "Validation bpb" else SCORE
        rows.append([metric, *(_fmt(cells[metric][c], unit, bare=True) for c in columns)])
        for i, ref in enumerate(REFERENCES, start=1):
            if metric in ref.cells:
                values = (_fmt(ref.cells[metric].get(c), unit, bare=True) for c in columns)
                rows.append([f"_{ref.label}_ [{i}]", *values])
    seconds, note = wall_clock(records)
    rate, how = hourly_cost(_system(records))
    lines = [
        "## Summary",
        "",
        "Scores are fractions (accuracy, CORE, ChatCORE); bits per byte: lower is better.",
        "",
    ]
    lines += [*_table(["Metric", *columns], rows), ""]
    lines += [f"[{i}] {ref.label}: {ref.source}." for i, ref in enumerate(REFERENCES, start=1)]
    lines.append("")
    if seconds is None:
        lines.append("Total wall-clock time: unknown (no timestamps recorded)")
    else:
        lines += [
            f"Total wall-clock time: {_duration(seconds)} ({note})",
            "",
            f"Estimated cost: ${rate * seconds / 3600:.2f} at ${rate:.2f}/h ({how})",
        ]
    return lines + [""]


def _duration(seconds: float) -> str:
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h}h {rem // 60:02d}m {rem % 60:02d}s"


def _section_time(rec: Record) -> float | None:
    try:
        return time.mktime(time.strptime(rec.timestamp, TIME_FORMAT))
    except (TypeError, ValueError):
        return None


def wall_clock(records: dict[str, Record]) -> tuple[float | None, str]:
    """(seconds from the reset header to the last recorded section, note on how it was measured)."""
    times = [t for r in records.values() if (t := _section_time(r)) is not None]
    header = records.get("header")
    start = header.number("start_unix") if header else None
    note = "from `picochat report --reset` to the last recorded section"
    if start is None:
        start, note = (
            (min(times) if times else None),
            "from the first to the last recorded section (no header)",
        )
    if start is None or not times:
        return None, "unknown"
    return max(max(times) - start, 0.0), note


# ---------------------------------------------------------------------------------------------
# Sections


def _fmt(value: Any, unit: str = JSON, bare: bool = False) -> str:
    """A value in its unit's one format (`bare`: without the unit's name, as in the summary table)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == SECONDS:
        return f"{value:.1f} s" if value < 60 else _duration(value)
    if unit == PATH:
        return f"`{shown_path(value)}`"
    if unit == FLAG or isinstance(value, bool):
        return "yes" if value else "no"
    if unit == COUNT or isinstance(value, int):
        return f"{value:,}"
    if unit == PERCENT:
        return f"{value:.1f}%"
    if unit == FLOPS:
        return f"{value:.3e}" + ("" if bare else " FLOPs")
    if unit in (BPB, NATS):
        return f"{value:.4f}" + ("" if bare else f" {unit}")
    if unit == RATE:
        return f"{value:,.0f}/s"
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4f}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
        return ", ".join(_fmt(v) for v in value) or "none"
    if isinstance(value, dict) and all(not isinstance(v, (dict, list)) for v in value.values()):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    text = json.dumps(value, default=str)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def render_samples(samples: list[Sample]) -> list[str]:
    """Chat samples as conversations (user turn, assistant turn, how the turn ended); base ones as text."""
    lines = ["", "**Samples**", ""]
    for s in samples:
        if s.prompt is None:
            lines += [*_quote(_escaped(s.reply)), ""]
            continue
        notes = [{True: "ended its turn", False: "did not end its turn"}.get(s.ended, ""),
                 "called the calculator" if s.tool_call else ""]  # fmt: skip
        note = "; ".join(n for n in notes if n)
        lines += (
            _quote(f"**User:** {_escaped(s.prompt)}") + [">"] + _quote(f"**Assistant:** {_escaped(s.reply)}")
        )
        lines += ([">", f"> _({note})_"] if note else []) + [""]
    return lines


def _quote(text: str) -> list[str]:
    return [f"> {line}".rstrip() for line in text.splitlines() or [""]]


def _escaped(text: str) -> str:
    """Model text shown literally: a reply's `####` or `<|python_start|>` must not become markdown."""
    return "".join("\\" + c if c in _MARKDOWN_SPECIALS else c for c in text)


def render_section(rec: Record, figures: list[str]) -> list[str]:
    """One section as markdown: scalar fields with their units, tables, samples, then its figures."""
    lines = [f"## {rec.section}", "", f"_recorded {rec.timestamp}_", ""]
    tables = []
    for name, field in SECTION_TYPES[rec.section].items():
        value = rec.data.get(name)
        if name not in rec.data or field.unit == SAMPLES:
            continue
        if field.unit == TABLE and value:
            columns = list(dict.fromkeys(c for row in value.values() for c in row))
            rows = [
                [k, *(_fmt(row.get(c), SCORE if c == "accuracy" else JSON) for c in columns)]
                for k, row in value.items()
            ]
            tables += ["", f"**{name}**", "", *_table([name, *columns], rows)]
        else:
            lines.append(f"- {name}: {_fmt(value, field.unit)}")
    lines += tables
    if rec.data.get("samples"):
        lines += render_samples(rec.samples())
    lines += [""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return lines + [""]


def _system(records: dict[str, Record]) -> dict[str, Any]:
    header = records.get("header")
    return header.data["system"] if header else system_info()


def render_header(records: dict[str, Record]) -> list[str]:
    system = _system(records)
    git, code = system.get("git", {}), system.get("code", {})
    gpus = ", ".join(f"{g['name']} ({g['memory_gb']} GB)" for g in system.get("gpus", [])) or "none"
    dirty = {True: " (uncommitted changes)", False: " (clean)"}.get(git.get("dirty"), "")
    started = (
        records["header"].timestamp
        if "header" in records
        else "unknown (run `picochat report --reset` first)"
    )
    return [
        "# picochat report card",
        "",
        f"Generated: {time.strftime(TIME_FORMAT)}; run started: {started}",
        "",
        "## Environment",
        "",
        f"- git: {git.get('commit', '?')} on {git.get('branch', '?')}{dirty}",
        f"- CPU: {system.get('cpu')}; {system.get('cores_physical')} cores / "
        f"{system.get('cores_logical')} threads; RAM {system.get('ram_gb')} GB",
        f"- GPUs: {gpus}",
        f"- software: Python {system.get('python')}, torch {system.get('torch')}, "
        f"picochat {system.get('picochat')}; {system.get('os')}",
        f"- code: {_fmt(code.get('files'))} Python files, {_fmt(code.get('lines'))} lines, "
        f"{_fmt(code.get('characters'))} characters, ~{_fmt(code.get('approx_tokens'))} tokens (chars / 4)",
        "",
    ]


def collect_figures(records: dict[str, Record]) -> dict[str, dict[str, bytes]]:
    """{section: {"<section>_<metric>.png": png bytes}} for every section whose metrics file is here."""
    figures = {}
    for name, rec in records.items():
        stored = rec.data.get("metrics")
        if isinstance(stored, str) and (path := resolve_path(stored)).is_file():
            pngs = plot_curves(rec, read_metrics(path))
            figures[name] = {f"{name}_{key}.png": png for key, png in pngs.items()}
    return figures


def render_report(
    records: dict[str, Record],
    figure_names: dict[str, list[str]],
    figures_dir: str,
    problems: dict[str, str] | None = None,
) -> str:
    """The whole report.md; figures are linked as `figures_dir/<file name>`."""
    lines = render_header(records)
    order = [s for s in SECTION_ORDER if s in records] + sorted(set(records) - set(SECTION_ORDER))
    for name in order:
        if name != "header":
            links = [f"{figures_dir}/{f}" for f in figure_names.get(name, [])]
            lines += render_section(records[name], links)
    if problems:
        lines += ["## Sections left out", "", *(f"- {s}: {why}" for s, why in problems.items()), ""]
    return "\n".join(lines + render_summary(records))


def write_report(destinations: list[Path]) -> str:
    """Render the report and write it, with its figures in `<stem>_files/` beside it, to every destination."""
    problems: dict[str, str] = {}
    records = load_sections(problems=problems)
    figures = collect_figures(records)
    text = ""
    for dest in destinations:
        figures_dir = f"{dest.stem}_files"
        for pngs in figures.values():
            for file_name, png in pngs.items():
                atomic_write_bytes(dest.parent / figures_dir / file_name, png)
        text = render_report(records, {k: list(v) for k, v in figures.items()}, figures_dir, problems)
        atomic_write_text(dest, text)
    return text


# ---------------------------------------------------------------------------------------------
# `picochat report`


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Write report.md from every stage's recorded metrics (in $PICOCHAT_HOME/report/), with "
        "training curves, a summary table per stage, the wall-clock time and an estimated cost.",
    )
    p.add_argument(
        "--reset",
        action="store_true",
        help="start a new report instead: clear the recorded sections and note the start time and machine",
    )
    p.add_argument(
        "--out",
        default="report.md",
        help="also write the report here (its figures go in <name>_files/ beside it); '' to skip",
    )
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.reset:
        reset_report()
        print(f"report reset: {report_dir()}")
        return 0
    destinations = [report_dir() / "report.md"]
    if args.out:
        out = Path(args.out).expanduser().resolve()
        if out != destinations[0].resolve():
            destinations.append(out)
    write_report(destinations)
    print("report written: " + ", ".join(str(d) for d in destinations))
    return 0


if __name__ == "__main__":
    run_cli(main)
