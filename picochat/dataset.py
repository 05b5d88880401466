"""The pretraining corpus: parquet shards with a `text` column, read the same way from every source.

Sources:
- "bundled": the repository's `data/pretrain/` (a small offline corpus, FineWeb-Edu's schema),
- "hub": shards fetched by `picochat download` into `$PICOCHAT_HOME/base_data/`,
- any other value: a folder of your own parquet files with a `text` column.

Files are taken in name order; the last one is the validation split, every other one is training data.
Documents are read one parquet row group (a "unit") at a time. For distributed training each rank reads
a disjoint share: whole units dealt round-robin when there are enough of them, otherwise every rank
reads every unit and keeps every world_size-th document of the split (the bundled validation shard is
one unit).

A reader can start at any (epoch, unit) cursor, which is what makes data-loader resume exact.
A shard that is not parquet, cut short or damaged is reported by name (PicochatError), never as a raw
pyarrow error; `check_shards` finds such a shard before training starts rather than hours into it.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from picochat.common import DATA_DIR, PicochatError, get_base_dir

SOURCES = ("bundled", "hub")
SPLITS = ("train", "val")

Unit = tuple[Path, int]  # (parquet file, row group index)


def resolve_data_dir(source: str | None) -> Path:
    """The folder holding a source's shards (None means "bundled")."""
    if source in (None, "bundled"):
        return DATA_DIR / "pretrain"
    if source == "hub":
        return get_base_dir() / "base_data"
    return Path(source).expanduser()


def list_parquet_files(data_dir: Path) -> list[Path]:
    """The finished parquet files of a folder, in name order (downloads in progress end in .part)."""
    return sorted(p for p in Path(data_dir).glob("*.parquet") if p.is_file())


def split_files(split: str, source: str | None) -> list[Path]:
    """The files of one split: "val" is the last file, "train" every other one."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    folder = resolve_data_dir(source)
    files = list_parquet_files(folder)
    if len(files) < 2:
        if source == "hub":
            hint = "run `picochat download --shards 8` (or more) first"
        elif source in (None, "bundled"):
            hint = "restore the repository's data/pretrain folder (git checkout data/)"
        else:
            hint = "put at least two parquet files with a `text` column there (the last one is validation)"
        raise PicochatError(
            f"need at least 2 parquet files (train + val) in {folder}, found {len(files)}; {hint}"
        )
    return files[:-1] if split == "train" else files[-1:]


def _unreadable(path: Path, error: Exception) -> PicochatError:
    return PicochatError(
        f"{path} is not a readable parquet file ({type(error).__name__}: {error}); it is probably cut "
        "short or damaged: delete it and fetch it again (`picochat download` for hub shards)"
    )


def _open(path: Path) -> pq.ParquetFile:
    """Open a shard, reading its footer (schema, row groups); a damaged file is named in the error."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise _unreadable(path, e) from e
    if "text" not in parquet.schema_arrow.names:
        names = ", ".join(parquet.schema_arrow.names)
        raise PicochatError(f"{path} has no `text` column (it has: {names}); pretraining reads `text`")
    return parquet


@lru_cache(maxsize=4096)
def _row_group_sizes(path: Path) -> tuple[int, ...]:
    metadata = _open(path).metadata
    return tuple(metadata.row_group(g).num_rows for g in range(metadata.num_row_groups))


def check_shards(source: str | None) -> None:
    """Fail fast, naming the file, on a damaged shard: every footer is read and the validation shard
    is read whole, so a bad file is found before training rather than at the first evaluation."""
    for path in split_files("train", source):
        _row_group_sizes(path)
    for path in split_files("val", source):
        for group in range(len(_row_group_sizes(path))):
            read_unit((path, group))


def rank_units(split: str, source: str | None, rank: int = 0, world_size: int = 1) -> tuple[list[Unit], int]:
    """The units this rank reads and the stride it takes documents at within each unit (1 or world_size)."""
    units = [(path, g) for path in split_files(split, source) for g in range(len(_row_group_sizes(path)))]
    if len(units) >= world_size:
        return units[rank::world_size], 1
    return units, world_size


def read_unit(unit: Unit) -> list[str]:
    """The `text` column of one row group."""
    path, group = unit
    parquet = _open(path)
    try:
        return parquet.read_row_group(group, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError) as e:  # a damaged data page behind an intact footer
        raise _unreadable(path, e) from e


def iter_document_batches(
    split: str,
    source: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    start: tuple[int, int] = (0, 0),
    loop: bool = True,
) -> Iterator[tuple[list[str], tuple[int, int]]]:
    """This rank's documents, one unit at a time, as (texts, (epoch, unit index)) from the `start` cursor.

    With `loop` the data repeats forever (epoch counts the passes); otherwise it stops after one pass.
    """
    units, stride = rank_units(split, source, rank, world_size)
    if not units:
        raise PicochatError(f"the {split} split of {resolve_data_dir(source)} has no data for rank {rank}")
    # Position of each unit's first document in the split, so a stride keeps every world_size-th document
    # of the whole split rather than of each unit (a unit may hold fewer documents than there are ranks).
    first_doc = [0]
    for path, group in units[:-1]:
        first_doc.append(first_doc[-1] + _row_group_sizes(path)[group])
    epoch, index = start
    while True:
        for i in range(index, len(units)):
            texts = read_unit(units[i])
            if stride > 1:
                texts = texts[(rank - first_doc[i]) % stride :: stride]
            yield texts, (epoch, i)
        if not loop:
            return
        epoch, index = epoch + 1, 0


def iter_documents(
    split: str, source: str | None = None, rank: int = 0, world_size: int = 1
) -> Iterator[str]:
    """Every document of this rank's share of a split, once, in order."""
    for texts, _ in iter_document_batches(split, source, rank, world_size, loop=False):
        yield from texts


def count_documents(split: str, source: str | None = None) -> int:
    return sum(_open(path).metadata.num_rows for path in split_files(split, source))
