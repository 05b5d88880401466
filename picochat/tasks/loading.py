"""Where task rows come from: the bundled copies in `data/`, or the Hugging Face hub when asked.

Hub files are fetched with huggingface_hub's `hf_hub_download` into its cache (HF_HOME), so HF_ENDPOINT,
HF_HUB_OFFLINE and HF_TOKEN work as everywhere in the Hugging Face tools, and a failed transfer is retried
with back-off as for the pretraining shards (picochat.retry). The real-scale datasets:
SmolTalk (HuggingFaceTB/smol-smoltalk), MMLU auxiliary-train and test (cais/mmlu), GSM8K (openai/gsm8k),
ARC (allenai/ai2_arc) and HumanEval (openai/openai_humaneval); each task module names its files.

Tasks call these on first use (never in their constructor), and every file is read once per process
and cached, so building a dozen task objects costs nothing until an example is actually requested.
Cached rows are shared between tasks: treat them as read-only.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from picochat.common import DATA_DIR, PicochatError

SOURCES = ("bundled", "hub")


def check_source(source: str) -> str:
    if source not in SOURCES:
        raise PicochatError(f"unknown data source {source!r}; use one of {', '.join(SOURCES)}")
    return source


def check_choice(what: str, value: str, allowed: Sequence[str]) -> str:
    """Validate a constructor argument such as a split name against its allowed values."""
    if value not in allowed:
        raise PicochatError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}")
    return value


@functools.cache
def bundled_rows(relative_path: str) -> tuple[dict[str, Any], ...]:
    """All JSON objects of the gzip'd JSON-lines file `DATA_DIR / relative_path`."""
    path = Path(DATA_DIR) / relative_path
    if not path.is_file():
        raise PicochatError(
            f"bundled data file {path} is missing; restore the repository's data/ folder "
            "(or point PICOCHAT_DATA at a copy), or load the task with source='hub'"
        )
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


@functools.cache
def bundled_lines(relative_path: str) -> tuple[str, ...]:
    """The stripped lines of the gzip'd text file `DATA_DIR / relative_path`."""
    path = Path(DATA_DIR) / relative_path
    if not path.is_file():
        raise PicochatError(f"bundled data file {path} is missing; restore the repository's data/ folder")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(line.strip() for line in f)


class ParquetRows(Sequence):
    """Read-only row access to parquet tables without turning them all into Python objects at once.

    SmolTalk's training split is about a gigabyte of text: as Arrow data it stays compact, and a row
    becomes a dict only when it is asked for.
    """

    def __init__(self, paths: Sequence[str]):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.table = pa.concat_tables([pq.read_table(p) for p in paths]).combine_chunks()

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        return self.table.slice(index % len(self), 1).to_pylist()[0]


def hub_endpoint() -> str | None:
    """HF_ENDPOINT read now (huggingface_hub reads it once, at import), None for the default hub."""
    return os.environ.get("HF_ENDPOINT") or None


HUB_RETRIES, HUB_BACKOFF = 5, 1.0  # a failed download is tried again 5 times, after 1, 2, 4, 8, 16 s


@functools.cache
def hub_rows(repo_id: str, filenames: tuple[str, ...]) -> ParquetRows:
    """Rows of parquet files in a Hugging Face dataset repository (downloaded once, then cached).

    A network error or HTTP 5xx/429 is retried with back-off (picochat.retry, as for pretraining shards);
    a missing file, a refused token or HF_HUB_OFFLINE fails at once."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise PicochatError("loading from the hub needs huggingface_hub: pip install huggingface_hub") from e
    from picochat.download import hub_error  # imported here: picochat.download imports this module
    from picochat.retry import Retry, with_retries

    def fetch(filename: str) -> str:
        try:
            return hf_hub_download(repo_id, filename, repo_type="dataset", endpoint=hub_endpoint())
        except Exception as e:  # huggingface_hub raises many types; hub_error sorts them
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
            if hub_error(e, f"{filename} of {repo_id}") is None:
                raise Retry(
                    reason, "check the internet connection, or use the bundled copy (source='bundled')"
                ) from e
            raise PicochatError(
                f"could not download {filename} of the dataset {repo_id} from the Hugging Face hub "
                f"({reason}); check the internet connection, or use the bundled copy (source='bundled')"
            ) from e

    paths = []
    for filename in filenames:
        what = f"{filename} of the dataset {repo_id}"
        paths.append(with_retries(functools.partial(fetch, filename), what, HUB_RETRIES, HUB_BACKOFF))
    return ParquetRows(paths)
