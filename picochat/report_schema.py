"""The report card's record types: what each stage's section holds, with one unit per kind of figure.

Every section a stage records (`picochat.report.record(section, data)`) is checked against its type
here and saved as one flat JSON object: `schema_version`, `section`, `timestamp`, then its fields. A
type lists every field the section may hold, the unit it is in and whether it is required; an unknown
section, an unknown field, a missing required field or a value of the wrong kind is a `PicochatError`
that names it. Reading back needs no guessing: the report looks fields up by their declared names.

Normalisation makes the figures comparable: durations are seconds (`train_minutes` becomes
`train_seconds`), scores and accuracies are fractions in [0, 1] (CORE may be negative), paths are stored
relative to $PICOCHAT_HOME (never the writing machine's absolute path), and samples become `Sample`s: a
conversation (prompt, reply, whether the turn ended, whether the calculator was called) or a base
model's plain completion.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from picochat.common import PicochatError, get_base_dir

SCHEMA_VERSION = 1

# Units (one per kind of figure); the report renders each kind the same way everywhere.
SCORE = "score"  # accuracy, CORE, ChatCORE, pass@k, reward: a fraction, 4 decimals
BPB = "bits/byte"
NATS = "nats/token"  # cross-entropy loss
SECONDS = "seconds"  # every duration
PERCENT = "%"  # model FLOPs utilisation
COUNT = "count"  # steps, tokens, parameters, examples (integers)
RATE = "per second"
RATIO = "ratio"  # bytes per token and similar plain numbers
FLOPS = "FLOPs"
TEXT = "text"
PATH = "path"  # relative to $PICOCHAT_HOME when under it
FLAG = "flag"
TABLE = "table"  # {row: {column: scalar}}
SAMPLES = "samples"
JSON = "json"  # nested settings (model config, system info), shown as they are
NUMBERS = {SCORE, BPB, NATS, SECONDS, PERCENT, COUNT, RATE, RATIO, FLOPS}


@dataclass(frozen=True)
class Field:
    unit: str
    required: bool = False


def _fields(required: str = "", **fields: str) -> dict[str, Field]:
    names = set(required.split())
    return {name: Field(unit, name in names) for name, unit in fields.items()}


_TRAINED = {"model_tag": TEXT, "processes": COUNT, "device": TEXT, "train_seconds": SECONDS,
            "metrics": PATH, "checkpoint_dir": PATH, "samples": SAMPLES, "steps": COUNT,
            "mfu_percent": PERCENT, "peak_flops": RATE, "peak_flops_source": TEXT,
            "tokens": COUNT, "flops": FLOPS, "flops_per_token": FLOPS}  # fmt: skip
_CHAT_EVAL = _fields(
    "tasks",
    stage=TEXT, model_tag=TEXT, step=COUNT, tasks=TABLE, ChatCORE=SCORE, missing=JSON, max_per_task=COUNT,
    source=TEXT, temperature=RATIO, top_k=COUNT, max_new_tokens=COUNT, num_samples=COUNT, seed=COUNT,
    seconds=SECONDS,
)  # fmt: skip
# The chat evaluations' task names (evals/chat.py CHAT_TASKS): mid/SFT record accuracy_<task> for each.
CHAT_TASK_NAMES = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")
_CHAT_TRAIN = _fields(
    "steps",
    **_TRAINED, input=JSON, grad_accum_steps=COUNT, device_batch_size=COUNT, max_seq_len=COUNT,
    final_val_loss=NATS, train_conversations=COUNT,
    **{f"accuracy_{task}": SCORE for task in CHAT_TASK_NAMES},
)  # fmt: skip

# The record types, keyed by section name.
SECTION_TYPES: dict[str, dict[str, Field]] = {
    "header": _fields("start_unix system", start_unix=SECONDS, system=JSON),
    "download": _fields("shards bytes", source=TEXT, base_url=TEXT, dest=PATH, shards=COUNT, bytes=COUNT),
    "tokenizer": _fields(
        "vocab_size",
        vocab_size=COUNT, requested_vocab_size=COUNT, num_special_tokens=COUNT, source=TEXT, max_chars=COUNT,
        doc_cap=COUNT, train_documents=COUNT, train_chars=COUNT, train_seconds=SECONDS, chars_per_second=RATE,
        mean_token_bytes=RATIO, max_token_bytes=COUNT,
    ),
    "tokenizer-eval": _fields(
        "vocab_size val_bytes_per_token",
        vocab_size=COUNT, val_bytes_per_token=RATIO, compared_vocab_sizes=JSON, max_examples=COUNT,
        compression=TABLE,
    ),
    "base": _fields(
        "steps",
        **_TRAINED, model_config=JSON, total_batch_size=COUNT, device_batch_size=COUNT,
        grad_accum_steps=COUNT, num_iterations=COUNT, eval_steps=COUNT, num_params=COUNT,
        scaling_params=COUNT, target_tokens=COUNT, final_val_bpb=BPB,
        min_val_bpb=BPB, core_metric=SCORE,
    ),
    "base-eval": _fields(
        "core",
        stage=TEXT, model_tag=TEXT, step=COUNT, core=SCORE, core_summary=TEXT, core_covered=JSON,
        core_missing=JSON, max_per_task=COUNT, tasks=TABLE, core_seconds=SECONDS, train_bpb=BPB, val_bpb=BPB,
        samples=SAMPLES,
    ),
    "mid": _CHAT_TRAIN,
    "sft": _CHAT_TRAIN,
    "rl": _fields(
        "steps",
        **_TRAINED, input=JSON, task=TEXT, examples_per_step=COUNT, num_samples=COUNT, max_new_tokens=COUNT,
        init_lr_frac=RATIO, final_reward=SCORE, eval_examples=COUNT, pass_at_k=TABLE,
    ),
    **{f"chat-eval-{stage}": _CHAT_EVAL for stage in ("imported", "mid", "sft", "rl")},
}  # fmt: skip
# Old field names and the factor that turns their value into the declared field's unit.
RENAMED = {"train_minutes": ("train_seconds", 60.0)}


@dataclass(frozen=True)
class Sample:
    """One sample: a chat model's reply to `prompt`, or (prompt None) a base model's completion."""

    reply: str
    prompt: str | None = None
    ended: bool | None = None  # the reply ended its turn with <|assistant_end|>
    tool_call: bool | None = None  # the reply called the calculator


@dataclass(frozen=True)
class Record:
    """One recorded section, validated: `data` holds only fields declared in SECTION_TYPES[section]."""

    section: str
    timestamp: str
    data: dict[str, Any]

    def number(self, name: str) -> float | None:
        value = self.data.get(name)
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

    def samples(self) -> list[Sample]:
        return [Sample(**s) for s in self.data.get("samples") or []]

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "section": self.section, "timestamp": self.timestamp,
                **self.data}  # fmt: skip


def make_record(section: str, timestamp: str, data: dict[str, Any]) -> Record:
    """Check `data` against the section's type and normalise it (units, paths, samples)."""
    if section not in SECTION_TYPES:
        known = ", ".join(SECTION_TYPES)
        raise PicochatError(f"unknown report section {section!r}; record one of: {known}")
    if not isinstance(data, dict):
        raise PicochatError(f"report section {section!r} must be a dict of fields, not {type(data).__name__}")
    types, out = SECTION_TYPES[section], {}
    for name, value in data.items():
        if name in RENAMED:
            name, factor = RENAMED[name]
            value = value * factor if isinstance(value, (int, float)) else value
        if name not in types:
            raise PicochatError(
                f"report section {section!r} has an unknown field {name!r}; declare it with its unit in "
                "picochat/report_schema.py SECTION_TYPES (or stop recording it)"
            )
        out[name] = _check(section, name, types[name].unit, value)
    missing = [n for n, f in types.items() if f.required and out.get(n) is None]
    if missing:
        raise PicochatError(f"report section {section!r} lacks required field(s): {', '.join(missing)}")
    return Record(section, timestamp, out)


def parse_record(section: str, payload: Any) -> Record:
    """A section read back from JSON. An unversioned file (picochat before schema versions) is read if its
    fields match today's type; a newer version, or an old file that does not match, is refused."""
    if not isinstance(payload, dict):
        raise PicochatError(
            f"report section {section!r} is not a JSON object; rerun the stage that writes it"
        )
    version = payload.get("schema_version")
    timestamp = str(payload.get("timestamp", "?"))
    data = {k: v for k, v in payload.items() if k not in ("schema_version", "section", "timestamp")}
    if version is None:
        try:
            return make_record(section, timestamp, data)
        except PicochatError as e:
            raise PicochatError(
                f"report section {section!r} was written by an older picochat (no schema version) and does "
                f"not match today's record type ({e}); rerun that stage to record it again"
            ) from None
    if version != SCHEMA_VERSION:
        raise PicochatError(
            f"report section {section!r} has schema version {version}, this picochat reads {SCHEMA_VERSION}; "
            "render it with the picochat that wrote it, or rerun the stage"
        )
    return make_record(section, timestamp, data)


def _check(section: str, name: str, unit: str, value: Any) -> Any:
    """`value` in the field's unit, or a PicochatError naming the field and what it should be."""
    if value is None and unit != SAMPLES:
        return None  # a figure not measured this run (e.g. no validation pass yet)
    ok = True
    if unit in NUMBERS:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and unit == COUNT:
            ok = float(value).is_integer()
            value = int(value) if ok else value
        elif ok:
            value = float(value)
    elif unit == TEXT:
        ok = isinstance(value, str)
    elif unit == PATH:
        ok = isinstance(value, (str, os.PathLike))
        value = portable_path(value) if ok else value
    elif unit == FLAG:
        ok = isinstance(value, bool)
    elif unit == TABLE:
        ok = isinstance(value, dict) and all(
            isinstance(row, dict)
            and all(isinstance(v, (int, float, str, bool, type(None))) for v in row.values())
            for row in value.values()
        )
        if not ok and isinstance(value, dict) and all(_is_number(v) for v in value.values()):
            value, ok = {k: {"value": v} for k, v in value.items()}, True  # e.g. {"pass@1": 0.2}
    elif unit == SAMPLES:
        value = _samples(section, value)
    if not ok:
        raise PicochatError(
            f"report section {section!r}: field {name!r} should be {_describe(unit)}, got {value!r:.80}"
        )
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _describe(unit: str) -> str:
    if unit in NUMBERS:
        return "an integer" if unit == COUNT else f"a number ({unit})"
    return {TEXT: "a string", PATH: "a path", FLAG: "true/false", TABLE: "a dict of per-row dicts"}.get(
        unit, unit
    )


def _samples(section: str, value: Any) -> list[dict[str, Any]]:
    """Samples as plain dicts of `Sample`: strings are completions, dicts are conversations."""
    samples = []
    for item in value or []:
        if isinstance(item, str):
            samples.append(Sample(reply=item))
        elif isinstance(item, dict) and isinstance(item.get("reply"), str):
            samples.append(
                Sample(item["reply"], item.get("prompt"), item.get("ended"), item.get("tool_call"))
            )
        else:
            raise PicochatError(
                f"report section {section!r}: a sample should be a completion string or a dict with 'reply' "
                f"(and 'prompt', 'ended', 'tool_call'), got {item!r:.80}"
            )
    return [asdict(s) for s in samples]


def portable_path(path: str | os.PathLike) -> str:
    """A path as the report stores it: relative to $PICOCHAT_HOME when it lies under it, else unchanged."""
    absolute = Path(path).expanduser().absolute()
    try:
        return str(absolute.relative_to(get_base_dir().absolute()))
    except ValueError:
        return str(path)


def shown_path(stored: str) -> str:
    """A stored path as the report shows it: `$PICOCHAT_HOME/...`, or only its last parts for a path outside
    $PICOCHAT_HOME, so that no report carries the absolute paths of the machine that wrote it."""
    path = Path(stored)
    if not path.is_absolute():
        return f"$PICOCHAT_HOME/{path}"
    return f".../{'/'.join(path.parts[-2:])}" if len(path.parts) > 2 else path.name


def resolve_path(stored: str) -> Path:
    """Where a stored path is on this machine (relative ones are under $PICOCHAT_HOME)."""
    path = Path(stored)
    return path if path.is_absolute() else get_base_dir() / path
