"""Pretraining batches: this rank's documents, tokenized in the background, packed into (B, T) rows.

Every document starts with `<|bos|>` and the documents of a unit (a parquet row group of this rank's
share, see picochat.dataset) are laid end to end as one token stream, so no token is wasted on padding.
The stream is cut into rows of T + 1 tokens that overlap by one (row i is stream[i*T : i*T + T + 1]):
inputs are a row's first T tokens and targets its last T, so every token of the unit is a target once
(the last partial row of a unit, fewer than T tokens, is dropped).

With `packing="bestfit"` (training only; validation always uses the stream cut, so every variant is
measured on the same tokens) rows instead start where a document starts: each unit's documents are
packed best-fit decreasing into rows of T + 1 tokens (the longest piece that still fits goes next), and
when no piece fits the rest of a row, the shortest piece is cut to fill it and its remainder goes back
into the pool for later rows; a document longer than a row gives whole rows first. Cuts overlap by one
token, so here too every token is a target once, no token is padding and only the unit's last partial
row is dropped. Fewer rows begin mid-document, so fewer targets are predicted without their context.

The rows of a unit are served in a shuffled order fixed by (epoch, unit). Without it a batch would be
B consecutive slices of one document, and the bundled corpus is mostly long books: batches that are all
one book make small-batch training noisy.

The position is (epoch, unit, row). `state_dict()` after a batch is exactly where the next batch
starts, and a loader built with that state continues with the same batches as the original would have.
"""

from __future__ import annotations

import bisect
import collections
import os
import queue
import threading
from typing import Any

import torch

from picochat.common import PicochatError
from picochat.dataset import check_shards, iter_document_batches

PREFETCH_UNITS = 2  # row groups tokenized ahead of the training loop
SHUFFLE_SEED = 1234
PACKINGS = ("stream", "bestfit")


def bestfit_rows(ids: list[list[int]], row_len: int) -> list[list[int]]:
    """Rows of exactly `row_len` tokens, packed best-fit decreasing from the unit's documents.

    A cut document's rest overlaps the cut by one token (the cut row's last token, already a target)
    and starts a later row, where that token is input only: every token but a document's first is a
    target exactly once. Once the whole documents are used up, rests also fill rows after other
    pieces (then without their first token).
    """
    rows: list[list[int]] = []
    pool: list[tuple[int, int, list[int]]] = []  # (length, order, document), sorted for bisect
    rests: collections.deque[list[int]] = collections.deque()  # cut documents' remainders
    for doc in ids:
        cut = False
        while len(doc) > row_len:  # a long document fills whole rows first
            rows.append(doc[:row_len])
            doc, cut = doc[row_len - 1 :], True
        if cut:
            rests.append(doc)
        elif len(doc) > 1:  # a lone token has nothing to predict
            pool.append((len(doc), len(pool), doc))
    pool.sort()
    row: list[int] = []
    while pool or rests:
        space = row_len - len(row)
        if not row and rests:  # a cut document continues at the start of a row
            row = rests.popleft()
        elif pool:
            fit = bisect.bisect_right(pool, (space, len(ids))) - 1  # the longest document that fits
            if fit >= 0:
                row += pool.pop(fit)[2]
            else:  # nothing fits: the shortest document fills the row, its rest waits for a later one
                piece = pool.pop(0)[2]
                row += piece[:space]
                rests.append(piece[space - 1 :])
        else:  # only rests are left: they fill rows after other pieces too
            piece = rests.popleft()[1:]
            row += piece[:space]
            if len(piece) > space:
                rests.append(piece[space - 1 :])
        if len(row) == row_len:
            rows.append(row)
            row = []
    return rows  # the unit's last, partial row is dropped


def unit_rows(
    ids: list[list[int]], seq_len: int, epoch: int, unit: int, packing: str = "stream"
) -> torch.Tensor:
    """The (rows, seq_len + 1) token rows of one unit's documents, in the shuffled order of (epoch, unit)."""
    if packing == "bestfit":
        packed = bestfit_rows(ids, seq_len + 1)
        rows = torch.tensor(packed, dtype=torch.long).reshape(len(packed), seq_len + 1)
    else:
        stream = torch.tensor([t for doc in ids for t in doc], dtype=torch.long)
        if len(stream) <= seq_len:
            return stream.new_empty((0, seq_len + 1))
        rows = stream.unfold(0, seq_len + 1, seq_len)
    generator = torch.Generator().manual_seed(SHUFFLE_SEED + 1_000_003 * epoch + unit)
    return rows[torch.randperm(len(rows), generator=generator)]


class TokenBatchLoader:
    """Iterator of (inputs, targets) int64 tensors of shape (batch_size, seq_len) on `device`."""

    def __init__(
        self,
        tokenizer: Any,
        batch_size: int,
        seq_len: int,
        split: str,
        device: torch.device | str,
        source: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        resume_state: dict[str, Any] | None = None,
        packing: str = "stream",
        prefetch: bool = False,
    ) -> None:
        if packing not in PACKINGS:
            raise PicochatError(f"unknown packing {packing!r}; use one of {', '.join(PACKINGS)}")
        self.tokenizer, self.batch_size, self.seq_len, self.packing = tokenizer, batch_size, seq_len, packing
        self.split, self.source, self.rank, self.world_size = split, source, rank, world_size
        self.device = torch.device(device)
        state = resume_state or {"epoch": 0, "unit": 0, "row": 0, "world_size": world_size}
        if state.get("world_size") != world_size:
            raise PicochatError(
                f"the saved data-loader position is for {state.get('world_size')} processes, not "
                f"{world_size}; "
                "resume with the same number of processes (torchrun --nproc_per_node) as the original run"
            )
        if split == "train":  # once per run (not per evaluation): a damaged shard stops it before training
            check_shards(source)
        self._cursor = (state["epoch"], state["unit"])
        self._row = state["row"]
        self.prefetch = prefetch  # assemble the next batch in a thread while this one trains
        self._ahead: tuple[threading.Thread, list[Any]] | None = None
        self._consumed: dict[str, Any] | None = None  # the position after the last batch handed out
        self._rows: torch.Tensor | None = None  # the current unit's shuffled rows
        self._queue: queue.Queue = queue.Queue(maxsize=PREFETCH_UNITS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(self._cursor,), daemon=True)
        self._thread.start()

    # -- background tokenization

    def _produce(self, start: tuple[int, int]) -> None:
        bos = self.tokenizer.get_bos_token_id()
        threads = max(1, os.cpu_count() or 1)
        try:
            batches = iter_document_batches(self.split, self.source, self.rank, self.world_size, start)
            empty_units = 0
            for texts, cursor in batches:
                ids = self.tokenizer.encode(texts, prepend=bos, num_threads=threads) if texts else []
                rows = unit_rows(ids, self.seq_len, *cursor, packing=self.packing)
                empty_units = 0 if len(rows) else empty_units + 1
                if empty_units > 1000:  # no unit holds a full row: the loop would never yield a batch
                    raise PicochatError(
                        f"the {self.split} documents are too short for rows of {self.seq_len} tokens; "
                        "lower --max-seq-len or use a larger corpus"
                    )
                if not self._put((cursor, rows)):
                    return
        except BaseException as exc:  # handed to the training loop, which re-raises it
            self._put(exc)

    def _put(self, item: Any) -> bool:
        """Queue an item unless the loader is closed (checked every 0.1 s so close() never hangs)."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _next_row(self) -> torch.Tensor:
        """The next row, moving on to the next unit(s) when this one is used up."""
        while self._rows is None or self._row >= len(self._rows):
            resuming = self._rows is None  # the first unit keeps the resumed row
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            self._cursor, self._rows = item
            if not resuming:
                self._row = 0
        self._row += 1
        return self._rows[self._row - 1]

    def __iter__(self) -> TokenBatchLoader:
        return self

    def _assemble(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """The next batch on the device, and the position after it."""
        batch = torch.stack([self._next_row() for _ in range(self.batch_size)])
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous(), self._position()

    def _assemble_ahead(self) -> None:
        """Start assembling the batch after this one in a thread (it runs during forward/backward)."""
        holder: list[Any] = []

        def work() -> None:
            try:
                holder.append(self._assemble())
            except BaseException as exc:  # handed to __next__, which re-raises it
                holder.append(exc)

        self._ahead = (threading.Thread(target=work, daemon=True), holder)
        self._ahead[0].start()

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.prefetch:
            inputs, targets, self._consumed = self._assemble()
            return inputs, targets
        if self._ahead is None:
            self._assemble_ahead()
        thread, holder = self._ahead
        thread.join()
        if isinstance(holder[0], BaseException):
            raise holder[0]
        inputs, targets, self._consumed = holder[0]
        self._assemble_ahead()  # only this thread touches the rows until the next __next__
        return inputs, targets

    def _position(self) -> dict[str, Any]:
        epoch, unit = self._cursor
        return {"epoch": epoch, "unit": unit, "row": self._row, "world_size": self.world_size}

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch starts (JSON-serialisable; pass it back as `resume_state`); with
        prefetch, after the last batch handed out, not the one assembled ahead."""
        return dict(self._consumed) if self._consumed is not None else self._position()

    def __enter__(self) -> TokenBatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the background threads and wait for them. The wait is bounded (the producer checks the
        stop flag after each unit it tokenizes, the batch assembled ahead is one batch), and it is
        needed: a daemon thread still inside the tokenizer's native code when the interpreter exits
        aborts the process ("terminate called without an active exception", exit status 134), which
        a heavily loaded machine once turned into a failed run after its checkpoint was written."""
        self._stop.set()
        self._thread.join()
        if self._ahead is not None:
            self._ahead[0].join()
