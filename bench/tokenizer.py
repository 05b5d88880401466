"""Tokenizer throughput on the bundled corpus: BPE training speed, and encoding speed one text at a time
versus batched on several threads (what the dataloader uses).

    .venv/bin/python bench/tokenizer.py                      # full bundled corpus (~1 minute on 2 cores)
    .venv/bin/python bench/tokenizer.py --max-chars 2e6      # a quick check
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import TypeVar

from picochat.common import run_cli
from picochat.dataset import iter_documents
from picochat.tokenizer import Tokenizer
from picochat.train.tokenizer import capped_texts, positive_count

T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """fn's result and the seconds it took."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def corpus(max_chars: int | None, doc_cap: int) -> list[str]:
    """Training documents of the bundled corpus, each cut to `doc_cap` characters, `max_chars` in total."""
    stats = {"documents": 0, "chars": 0}
    return list(capped_texts(iter_documents("train", "bundled"), doc_cap, max_chars, stats))


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary to train (default: 8192)")
    parser.add_argument(
        "--max-chars", type=positive_count, default=None, help="characters of corpus to use (default: all)"
    )
    parser.add_argument(
        "--train-doc-cap",
        type=positive_count,
        default=10_000,
        help="characters per document for training, as `picochat tokenizer train` (default: 10000)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="threads for batched encoding (default: all cores)",
    )
    args = parser.parse_args(argv)

    train_texts = corpus(args.max_chars, args.train_doc_cap)
    train_chars = sum(len(t) for t in train_texts)
    tok, train_s = timed(lambda: Tokenizer.train_from_iterator(train_texts, args.vocab_size))

    texts = corpus(args.max_chars, doc_cap=10**12)  # whole documents for encoding
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    tok.encode(texts[:10])  # warm up tiktoken's regex and caches
    rows = [
        (
            "BPE training",
            f"{train_chars / train_s / 1e6:.2f} M chars/s",
            f"{train_chars:,} chars, {train_s:.1f} s",
        ),
    ]
    encoders = {
        "encode, one text at a time": lambda: [tok.encode(t) for t in texts],
        "encode batch, 1 thread": lambda: tok.encode(texts, num_threads=1),
        f"encode batch, {args.threads} threads": lambda: tok.encode(texts, num_threads=args.threads),
    }
    for name, fn in encoders.items():
        _, seconds = timed(fn)
        rows.append((name, f"{megabytes / seconds:.2f} MB/s", f"{megabytes:.1f} MB, {seconds:.2f} s"))

    print(f"tokenizer throughput (vocab {tok.get_vocab_size():,}, {len(texts):,} documents)\n")
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


if __name__ == "__main__":
    run_cli(main)
