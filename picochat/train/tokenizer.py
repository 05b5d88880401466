"""`picochat tokenizer train`: learn the BPE vocabulary on the pretraining corpus and save it.

Reads the training shards (every parquet shard but the last, which is held out for validation), cuts
each document to `--doc-cap` characters so that a few long books do not dominate the merge statistics,
stops after `--max-chars` characters, trains with rustbpe and writes `$PICOCHAT_HOME/tokenizer/`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

from tqdm import tqdm

from picochat.common import PicochatError, run_cli
from picochat.dataset import count_documents, iter_documents
from picochat.report import record
from picochat.tokenizer import MIN_VOCAB_SIZE, SPECIAL_TOKENS, Tokenizer, tokenizer_dir


def capped_texts(documents: Iterator[str], doc_cap: int, max_chars: int | None, stats: dict) -> Iterator[str]:
    """Each document cut to `doc_cap` characters, stopping once `max_chars` characters were given out.
    Counts what was yielded into `stats` ("documents", "chars")."""
    for doc in documents:
        budget = doc_cap if max_chars is None else min(doc_cap, max_chars - stats["chars"])
        if budget <= 0:
            return
        text = doc[:budget]
        stats["documents"] += 1
        stats["chars"] += len(text)
        yield text


def positive_count(text: str) -> int:
    """argparse type for a count of characters; accepts scientific notation such as 2e9."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value < 1 or not value.is_integer():
        raise argparse.ArgumentTypeError(
            f"expected a positive whole number (e.g. 10000 or 2e9), got {text!r}"
        )
    return int(value)


def add_corpus_args(parser: argparse.ArgumentParser) -> None:
    """The flags choosing the training text (shared with `picochat tokenizer eval --compare-vocab-sizes`)."""
    parser.add_argument(
        "--source",
        default="bundled",
        help="pretraining shards to read: 'bundled' = the repository's data/pretrain, 'hub' = shards fetched "
        "by `picochat download` into $PICOCHAT_HOME/base_data, or a folder of parquet files with a `text` "
        "column (default: bundled). The last shard is validation and is never trained on",
    )
    parser.add_argument(
        "--max-chars",
        type=positive_count,
        default=None,
        help="train on at most this many characters in total (default: every training document; "
        "nanochat uses 2e9 on the hub data)",
    )
    parser.add_argument(
        "--doc-cap",
        type=positive_count,
        default=10_000,
        help="use at most this many characters from the start of each document, so long documents do not "
        "dominate the merges (default: 10000)",
    )


def train_on_corpus(
    args: argparse.Namespace, vocab_size: int, progress: bool = True
) -> tuple[Tokenizer, dict]:
    """Train on the corpus chosen by `args`; returns the tokenizer and {documents, chars, train_seconds}."""
    stats = {"documents": 0, "chars": 0}
    documents = iter_documents("train", args.source)
    total = count_documents("train", args.source)
    desc = f"training {vocab_size:,}-token BPE"
    with tqdm(documents, desc=desc, total=total, unit="doc", disable=None if progress else True) as docs:
        start = time.perf_counter()
        texts = capped_texts(docs, args.doc_cap, args.max_chars, stats)
        tokenizer = Tokenizer.train_from_iterator(texts, vocab_size)
        stats["train_seconds"] = time.perf_counter() - start
    return tokenizer, stats


# ---------------------------------------------------------------------------------------------
# The command


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train the byte-level BPE tokenizer (GPT-4 style split pattern, picochat's special "
        "tokens) on the pretraining corpus and save it to $PICOCHAT_HOME/tokenizer/.",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=8192,
        help="tokens in the vocabulary, special tokens included (default: 8192 for the bundled corpus; the "
        f"8xGPU speedrun uses 65536; at least {MIN_VOCAB_SIZE})",
    )
    add_corpus_args(parser)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.vocab_size < MIN_VOCAB_SIZE:
        raise PicochatError(f"--vocab-size must be at least {MIN_VOCAB_SIZE} (256 bytes + special tokens)")
    tokenizer, stats = train_on_corpus(args, args.vocab_size)
    chars_per_second = stats["chars"] / max(stats["train_seconds"], 1e-9)
    print(
        f"trained on {stats['chars']:,} characters from {stats['documents']:,} documents in "
        f"{stats['train_seconds']:.1f} s ({chars_per_second:,.0f} chars/s)"
    )
    if tokenizer.get_vocab_size() < args.vocab_size:
        print(
            f"warning: the text only had enough pairs for {tokenizer.get_vocab_size():,} tokens, not "
            f"{args.vocab_size:,}; train on more text (--max-chars, --doc-cap) for the full vocabulary"
        )
    out = tokenizer_dir()
    tokenizer.save(out)
    print(f"saved {tokenizer.get_vocab_size():,}-token tokenizer to {out}")
    lengths = tokenizer.token_byte_lengths()
    record(
        "tokenizer",
        {
            "vocab_size": tokenizer.get_vocab_size(),
            "requested_vocab_size": args.vocab_size,
            "num_special_tokens": len(SPECIAL_TOKENS),
            "source": args.source,
            "max_chars": args.max_chars,
            "doc_cap": args.doc_cap,
            "train_documents": stats["documents"],
            "train_chars": stats["chars"],
            "train_seconds": round(stats["train_seconds"], 3),
            "chars_per_second": round(chars_per_second),
            "mean_token_bytes": round(lengths[lengths > 0].float().mean().item(), 3),
            "max_token_bytes": int(lengths.max()),
        },
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
