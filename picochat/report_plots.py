"""Training curves for the report card: each stage's per-step JSONL metrics drawn as PNGs.

Each plotted metric gets one figure with a panel per x-axis: step, training compute (FLOPs, where the
stage lets us count it) and training time. Noisy per-step curves are drawn smoothed (a bias-corrected
exponential moving average) over the raw curve drawn faint behind; a few validation points are dots.

FLOPs come from the metrics line's own `flops` (the cumulative count every training stage logs on its
step and eval lines, see picochat/train/loop.py). Metrics written before stages logged it fall back to
the line's `tokens` x the section's `flops_per_token`, else `step` x `total_batch_size` x
`flops_per_token`; a stage that records none of these has no FLOPs panel.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from picochat.report_schema import Record

PLOTTED_METRICS = [
    ("loss", "training loss (nats/token)"),
    ("val_bpb", "validation bits per byte"),
    ("val_loss", "validation loss (nats/token)"),
    ("reward", "mean reward"),
]
SMOOTH_MIN_POINTS = 20  # fewer points than this are drawn as they are


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


def smooth(values: list[float], beta: float | None = None) -> list[float]:
    """Bias-corrected exponential moving average (the first values are not pulled towards 0). The default
    beta averages over about a twentieth of the curve, so short and long runs look alike."""
    if beta is None:
        beta = 1 - min(1.0, 20 / max(len(values), 1))
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i) if beta < 1 else v)
    return out


def row_flops(row: dict[str, Any], record: Record) -> float | None:
    """Training FLOPs done by the time of this metrics line (see the module docstring), or None."""
    if isinstance(row.get("flops"), (int, float)):
        return float(row["flops"])
    per_token = record.number("flops_per_token")
    if per_token is None:
        return None
    if isinstance(row.get("tokens"), (int, float)):
        return row["tokens"] * per_token
    batch = record.number("total_batch_size")
    if batch is not None and isinstance(row.get("step"), (int, float)):
        return row["step"] * batch * per_token
    return None


def _axes(record: Record) -> list[tuple[str, Any]]:
    def minutes(row: dict[str, Any]) -> float | None:
        seconds = row.get("train_seconds")
        return seconds / 60 if isinstance(seconds, (int, float)) else None

    return [
        ("step", lambda row: row.get("step")),
        ("training compute (FLOPs)", lambda row: row_flops(row, record)),
        ("training time (minutes)", minutes),
    ]


def plot_curves(record: Record, rows: list[dict[str, Any]]) -> dict[str, bytes]:
    """PNG bytes per plotted metric found in `rows` ({"loss": ..., "val_bpb": ...})."""
    from matplotlib.figure import Figure  # the object API needs no global backend (renders with Agg)

    images = {}
    for key, label in PLOTTED_METRICS:
        points = [r for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if not points:
            continue
        panels = []
        for name, x_of in _axes(record):
            pairs = [(x, r[key]) for r in points if isinstance(x := x_of(r), (int, float))]
            if pairs:
                panels.append((name, pairs))
        if not panels:
            continue
        fig = Figure(figsize=(4.5 * len(panels), 3.4), layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (name, pairs) in zip(axes, panels, strict=True):
            xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
            if len(pairs) < SMOOTH_MIN_POINTS:
                ax.plot(xs, ys, lw=1, marker="o", ms=3)
            else:
                ax.plot(xs, ys, lw=0.8, alpha=0.25, color="tab:blue", label="raw")
                ax.plot(xs, smooth(ys), lw=1.6, color="tab:blue", label="smoothed")
                ax.legend(loc="upper right", fontsize=8)
            ax.set_xlabel(name)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        fig.suptitle(f"{record.section}: {label}")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        images[key] = buf.getvalue()
    return images
