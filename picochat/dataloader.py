"""Pretraining batches: this rank's documents, tokenized in the background, packed into (B, T) rows.

Every document starts with `<|bos|>` and the documents are laid end to end as one token stream, so no
token is wasted on padding. A batch takes the next B*T + 1 tokens of the stream: inputs are the first
B*T, targets the same shifted by one. Its last token is only looked at, not consumed: it becomes the
first input of the next batch, so every token of the stream is a target exactly once.

The position in the stream is (epoch, unit, document, offset) with "unit" a parquet row group of this
rank's share (see picochat.dataset). `state_dict()` after a batch is exactly where the next batch starts,
and a loader built with that state continues with the same batches as the original would have.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any

import torch

from picochat.common import PicochatError
from picochat.dataset import iter_document_batches

PREFETCH_UNITS = 2  # row groups tokenized ahead of the training loop


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
    ) -> None:
        self.tokenizer, self.batch_size, self.seq_len = tokenizer, batch_size, seq_len
        self.split, self.source, self.rank, self.world_size = split, source, rank, world_size
        self.device = torch.device(device)
        state = resume_state or {"epoch": 0, "unit": 0, "doc": 0, "offset": 0, "world_size": world_size}
        if state.get("world_size") != world_size:
            raise PicochatError(
                f"the saved data-loader position is for {state.get('world_size')} processes, not "
                f"{world_size}; "
                "resume with the same number of processes (torchrun --nproc_per_node) as the original run"
            )
        self._cursor = (state["epoch"], state["unit"])
        self._doc, self._offset = state["doc"], state["offset"]
        self._docs: list[list[int]] | None = None  # token ids of the current unit's documents
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
            for texts, cursor in batches:
                ids = self.tokenizer.encode(texts, prepend=bos, num_threads=threads) if texts else []
                if not self._put((cursor, ids)):
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

    def _current(self) -> list[int]:
        """The document under the cursor, moving on to the next unit(s) when this one is used up."""
        while self._docs is None or self._doc >= len(self._docs):
            resuming = self._docs is None  # the first unit keeps the resumed doc/offset
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            self._cursor, self._docs = item
            if not resuming:
                self._doc = self._offset = 0
        return self._docs[self._doc]

    # -- the token stream

    def _take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            ids = self._current()
            piece = ids[self._offset : self._offset + n - len(out)]
            out.extend(piece)
            self._offset += len(piece)
            if self._offset >= len(ids):
                self._doc, self._offset = self._doc + 1, 0
        return out

    def __iter__(self) -> TokenBatchLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        tokens = self._take(B * T)
        tokens.append(self._current()[self._offset])  # peeked: the next batch starts with it
        buf = torch.tensor(tokens, dtype=torch.long)
        if self.device.type == "cuda":
            buf = buf.pin_memory().to(self.device, non_blocking=True)
        else:
            buf = buf.to(self.device)
        return buf[:-1].view(B, T), buf[1:].view(B, T)

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch starts (JSON-serialisable; pass it back as `resume_state`)."""
        epoch, unit = self._cursor
        return {
            "epoch": epoch,
            "unit": unit,
            "doc": self._doc,
            "offset": self._offset,
            "world_size": self.world_size,
        }

    def close(self) -> None:
        """Stop the background thread (it also stops by itself when the process ends)."""
        self._stop.set()
        self._thread.join(timeout=5)
