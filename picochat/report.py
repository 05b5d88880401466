"""The report card: every stage records its parameters and metrics here; `picochat report` writes report.md.

Stages call `record(section, data)`, which saves `$PICOCHAT_HOME/report/<section>.json`. A run starts
with `picochat report --reset` (clears the folder, records a "header" with the start time and the
machine) and ends with `picochat report`, which renders every recorded section, in pipeline order, into
`report.md` with training curves as PNG files beside it, a summary table (one column per stage, one
row per headline metric) and the total wall-clock time and its estimated cost. Any section may be
missing: it is simply left out, and its cells in the summary read "-".
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from picochat.common import (
    REPO_DIR,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    get_base_dir,
    get_rank,
    run_cli,
)

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
SECTION_ORDER = [
    "header",
    "tokenizer",
    "tokenizer-eval",
    "base",
    "base-eval",
    "mid",
    "chat-eval-mid",
    "sft",
    "chat-eval-sft",
    "rl",
    "chat-eval-rl",
]
# Summary columns: column title -> the section holding that stage's evaluation.
STAGE_COLUMNS = {"BASE": "base-eval", "MID": "chat-eval-mid", "SFT": "chat-eval-sft", "RL": "chat-eval-rl"}
SUMMARY_METRICS = ["CORE", "ARC-Challenge", "ARC-Easy", "GSM8K", "HumanEval", "MMLU", "ChatCORE"]
# Assumed on-demand cloud prices in $ per GPU-hour (first match in the GPU's name wins); a CPU
# machine is taken to be one you already own, so it costs $0.
GPU_HOURLY_USD = [("H200", 3.50), ("H100", 3.00), ("A100", 1.80), ("L40", 1.00), ("A10", 0.75), ("L4", 0.70),
                  ("T4", 0.35), ("4090", 0.50), ("3090", 0.30)]  # fmt: skip
UNKNOWN_GPU_HOURLY_USD = 1.00
PLOTTED_METRICS = [
    ("loss", "training loss"),
    ("val_bpb", "validation bits per byte"),
    ("val_loss", "validation loss"),
    ("reward", "mean reward"),
]
MAX_VALUE_CHARS = 300  # longer nested values are cut in the report (the JSON keeps them whole)
_SKIPPED_KEYS = {"section", "timestamp", "samples", "metrics", "metrics_path", "system"}


def report_dir() -> Path:
    return get_base_dir() / "report"


def record(section: str, data: dict[str, Any]) -> None:
    """Save one stage's section (rank 0 only) as $PICOCHAT_HOME/report/<section>.json."""
    if get_rank() != 0:
        return
    payload = {"section": section, "timestamp": time.strftime(TIME_FORMAT), **data}
    atomic_write_json(report_dir() / f"{section}.json", payload)


def reset_report() -> None:
    """Start a new report: forget every recorded section, then record the start time and the machine."""
    if get_rank() != 0:
        return
    shutil.rmtree(report_dir(), ignore_errors=True)
    record("header", {"start_unix": time.time(), "system": system_info()})


def load_sections(folder: Path | None = None) -> dict[str, dict[str, Any]]:
    """Every recorded section, keyed by name (unreadable files are skipped with a warning)."""
    folder = folder or report_dir()
    sections = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            sections[path.stem] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            print(f"warning: skipping unreadable report section {path}: {e}", file=sys.stderr)
    return sections


# ---------------------------------------------------------------------------------------------
# The machine and the code


def system_info() -> dict[str, Any]:
    """Git state, hardware, software versions and the size of the code, as plain JSON."""
    import psutil
    import torch

    from picochat import __version__

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1)})
    return {
        "git": _git_info(),
        "cpu": _cpu_model(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpus,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "picochat": __version__,
        "code": codebase_stats(),
    }


def _git_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise OSError(out.stderr.strip())
        return out.stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "--short=12", "HEAD"),
            "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        }
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown (not a git checkout)", "branch": "-", "dirty": None}


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def codebase_stats(package_dir: Path = REPO_DIR / "picochat") -> dict[str, int]:
    """Files, lines and characters of the package's Python code; tokens ~ characters / 4."""
    files = sorted(package_dir.rglob("*.py"))
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    chars = sum(len(t) for t in texts)
    return {
        "files": len(files),
        "lines": sum(t.count("\n") for t in texts),
        "characters": chars,
        "approx_tokens": chars // 4,
    }


def hourly_cost(system: dict[str, Any]) -> tuple[float, str]:
    """($ per hour, how it was worked out) for the machine described by `system_info()`."""
    gpus = system.get("gpus") or []
    if not gpus:
        return 0.0, "CPU only: assumed to be a machine you already own, $0/h"
    total, parts = 0.0, []
    for gpu in gpus:
        rate = next((r for key, r in GPU_HOURLY_USD if key in gpu["name"]), UNKNOWN_GPU_HOURLY_USD)
        total += rate
        parts.append(f"{gpu['name']} ${rate:.2f}/h")
    return total, f"{len(gpus)} GPU(s) at assumed on-demand cloud prices: " + ", ".join(sorted(set(parts)))


# ---------------------------------------------------------------------------------------------
# Metrics


def _norm(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def _as_number(value: Any) -> float | None:
    """A metric's number: the value itself, or the accuracy/score inside a per-task dict."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        for key in ("accuracy", "acc", "score", "value", "mean"):
            if key in value:
                return _as_number(value[key])
    return None


def find_metric(section: dict[str, Any] | None, name: str) -> float | None:
    """Look `name` up (case, '-', '_' and spaces ignored) at the top of the section or one level down
    (e.g. section["tasks"]["ARC-Easy"]["accuracy"] or section["results"]["arc_easy"])."""
    if not section:
        return None
    target = _norm(name)
    nested = [v for v in section.values() if isinstance(v, dict)]
    for table in [section, *nested]:
        for key, value in table.items():
            if _norm(key) == target and (number := _as_number(value)) is not None:
                return number
    return None


def summary_cells(sections: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """{metric: {column: value or None}}. The BASE column shows CORE only: base-eval's per-task
    accuracies (e.g. arc_easy) come from CORE's few-shot completion format, not the chat evals'."""
    cells: dict[str, dict[str, float | None]] = {}
    for metric in SUMMARY_METRICS:
        row = {}
        for column, eval_section in STAGE_COLUMNS.items():
            section = sections.get(eval_section)
            if column == "BASE":
                row[column] = _as_number((section or {}).get("core")) if metric == "CORE" else None
            else:
                row[column] = find_metric(section, metric)
        cells[metric] = row
    return cells


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a metrics file; a torn or malformed line (a crash mid-write) is skipped."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def metrics_path(section: dict[str, Any]) -> Path | None:
    value = section.get("metrics_path") or section.get("metrics")
    if not isinstance(value, str):
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else get_base_dir() / path


def _minutes(row: dict[str, Any]) -> float | None:
    for key in ("time", "train_seconds", "elapsed"):  # seconds since the start of training
        if isinstance(row.get(key), (int, float)):
            return row[key] / 60
    return None


def plot_curves(stage: str, rows: list[dict[str, Any]]) -> dict[str, bytes]:
    """PNG bytes per plotted metric ({"loss": ..., "val_bpb": ...}): each against step and time."""
    from matplotlib.figure import Figure  # the object API needs no global backend (renders with Agg)

    images = {}
    for key, label in PLOTTED_METRICS:
        points = [r for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if not points:
            continue
        fig = Figure(figsize=(10, 3.6), layout="constrained")
        by_step, by_time = fig.subplots(1, 2)
        marker = "o" if len(points) <= 50 else None  # a few validation points read better as dots
        steps = [r.get("step", i) for i, r in enumerate(points)]
        by_step.plot(steps, [r[key] for r in points], lw=1, marker=marker, ms=3)
        by_step.set_xlabel("step")
        timed = [r for r in points if _minutes(r) is not None]
        by_time.plot(
            [_minutes(r) for r in timed],
            [r[key] for r in timed],
            lw=1,
            marker=marker,
            ms=3,
            color="tab:orange",
        )
        by_time.set_xlabel("training time (minutes)")
        for ax in (by_step, by_time):
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        fig.suptitle(f"{stage}: {label}")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        images[key] = buf.getvalue()
    return images


# ---------------------------------------------------------------------------------------------
# Rendering


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-" if math.isnan(value) else str(value)
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
        return ", ".join(_fmt(v) for v in value)
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


def _is_row_table(value: Any) -> bool:
    """A dict of flat dicts, like {"arc_easy": {"accuracy": .., "centered": ..}, ...}."""
    return (
        isinstance(value, dict)
        and bool(value)
        and all(
            isinstance(v, dict) and all(not isinstance(x, (dict, list)) for x in v.values())
            for v in value.values()
        )
    )


def render_section(name: str, section: dict[str, Any], figures: list[str]) -> list[str]:
    """One section as markdown: scalar fields as a list, per-task dicts as tables, samples, figures."""
    lines = [f"## {name}", "", f"_recorded {section.get('timestamp', '?')}_", ""]
    tables = []
    for key, value in section.items():
        if key in _SKIPPED_KEYS:
            continue
        if _is_row_table(value):
            columns = list(dict.fromkeys(c for row in value.values() for c in row))
            rows = [[k, *(_fmt(row.get(c)) for c in columns)] for k, row in value.items()]
            tables += ["", f"**{key}**", "", *_table([key, *columns], rows)]
        else:
            lines.append(f"- {key}: {_fmt(value)}")
    lines += tables
    if section.get("samples"):
        lines += [
            "",
            "Samples:",
            "",
            "```",
            *(str(s).replace("\n", "\\n") for s in section["samples"]),
            "```",
        ]
    if metrics_path(section) is not None:
        lines += ["", f"Metrics: `{metrics_path(section)}`"]
    lines += [""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return lines + [""]


def _duration(seconds: float) -> str:
    h, rem = divmod(int(round(seconds)), 3600)
    return f"{h}h {rem // 60:02d}m {rem % 60:02d}s"


def _section_time(section: dict[str, Any]) -> float | None:
    try:
        return time.mktime(time.strptime(section["timestamp"], TIME_FORMAT))
    except (KeyError, TypeError, ValueError):
        return None


def wall_clock(sections: dict[str, dict[str, Any]]) -> tuple[float | None, str]:
    """(seconds from the reset header to the last recorded section, note on how it was measured)."""
    times = [t for s in sections.values() if (t := _section_time(s)) is not None]
    start = (sections.get("header") or {}).get("start_unix")
    note = "from `picochat report --reset` to the last recorded section"
    if not isinstance(start, (int, float)):
        start, note = (
            (min(times) if times else None),
            "from the first to the last recorded section (no header)",
        )
    if start is None or not times:
        return None, "unknown"
    return max(max(times) - start, 0.0), note


def render_header(sections: dict[str, dict[str, Any]]) -> list[str]:
    header = sections.get("header") or {}
    system = header.get("system") or system_info()
    git, code = system.get("git", {}), system.get("code", {})
    gpus = ", ".join(f"{g['name']} ({g['memory_gb']} GB)" for g in system.get("gpus", [])) or "none"
    dirty = {True: " (uncommitted changes)", False: " (clean)"}.get(git.get("dirty"), "")
    started = header.get("timestamp", "unknown (run `picochat report --reset` at the start of a run)")
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


def render_summary(sections: dict[str, dict[str, Any]]) -> list[str]:
    cells = summary_cells(sections)
    columns = list(STAGE_COLUMNS)
    rows = [[metric, *(_fmt(cells[metric][c]) for c in columns)] for metric in SUMMARY_METRICS]
    seconds, note = wall_clock(sections)
    system = (sections.get("header") or {}).get("system") or system_info()
    rate, how = hourly_cost(system)
    lines = ["## Summary", "", *_table(["Metric", *columns], rows), ""]
    if seconds is None:
        lines.append("Total wall-clock time: unknown (no timestamps recorded)")
    else:
        lines += [
            f"Total wall-clock time: {_duration(seconds)} ({note})",
            "",
            f"Estimated cost: ${rate * seconds / 3600:.2f} ({how})",
        ]
    return lines + [""]


def collect_figures(sections: dict[str, dict[str, Any]]) -> dict[str, dict[str, bytes]]:
    """{section: {"<section>_<metric>.png": png bytes}} for every section with a metrics file."""
    figures = {}
    for name, section in sections.items():
        path = metrics_path(section)
        if path is not None and path.is_file():
            pngs = plot_curves(name, read_metrics(path))
            figures[name] = {f"{name}_{key}.png": png for key, png in pngs.items()}
    return figures


def render_report(
    sections: dict[str, dict[str, Any]], figure_names: dict[str, list[str]], figures_dir: str
) -> str:
    """The whole report.md; figures are linked as `figures_dir/<file name>`."""
    lines = render_header(sections)
    order = [s for s in SECTION_ORDER if s in sections] + sorted(set(sections) - set(SECTION_ORDER))
    for name in order:
        if name != "header":
            links = [f"{figures_dir}/{f}" for f in figure_names.get(name, [])]
            lines += render_section(name, sections[name], links)
    return "\n".join(lines + render_summary(sections))


def write_report(destinations: list[Path]) -> str:
    """Render the report and write it, with its figures in `<stem>_files/` beside it, to every destination."""
    sections = load_sections()
    figures = collect_figures(sections)
    text = ""
    for dest in destinations:
        figures_dir = f"{dest.stem}_files"
        for pngs in figures.values():
            for file_name, png in pngs.items():
                atomic_write_bytes(dest.parent / figures_dir / file_name, png)
        text = render_report(sections, {k: list(v) for k, v in figures.items()}, figures_dir)
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
