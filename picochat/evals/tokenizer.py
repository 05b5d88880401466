"""`picochat tokenizer eval`: how well the trained tokenizer compresses text, in UTF-8 bytes per token.

More bytes per token means shorter sequences, so a model sees more text for the same compute. We measure
the held-out validation shard and samples of each bundled eval and chat set (maths, multiple choice,
code, small talk), since a tokenizer trained on books may compress code or numbers much worse.
GPT-2/GPT-4's encodings are a download away, so instead `--compare-vocab-sizes` trains other vocabulary
sizes in memory on the same text for comparison.
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from picochat.common import DATA_DIR, PicochatError, run_cli
from picochat.dataset import iter_documents
from picochat.report import record
from picochat.tokenizer import MIN_VOCAB_SIZE, Tokenizer, get_tokenizer
from picochat.train.tokenizer import add_corpus_args, train_on_corpus


def _jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _arc_text(row: dict[str, Any]) -> str:
    return "\n".join([row["question"]["stem"], *(c["text"] for c in row["question"]["choices"])])


# name -> (files, how one row becomes text). Paths are relative to the bundled data folder.
EVAL_SETS: dict[str, tuple[list[str], Callable[[dict[str, Any]], str]]] = {
    "gsm8k": (["eval/gsm8k/test.jsonl.gz"], lambda r: r["question"] + "\n" + r["answer"]),
    "mmlu": (["eval/mmlu/mmlu_validation.jsonl.gz"], lambda r: "\n".join([r["question"], *r["choices"]])),
    "arc": (["eval/arc/ARC-Easy-Test.jsonl.gz", "eval/arc/ARC-Challenge-Test.jsonl.gz"], _arc_text),
    "humaneval": (["eval/humaneval/HumanEval.jsonl.gz"], lambda r: r["prompt"] + r["canonical_solution"]),
    "chat": (
        ["chat/chatterbot_corpus_english.jsonl.gz"],
        lambda r: "\n".join(m["content"] for m in r["messages"]),
    ),
}


def eval_texts(name: str, max_examples: int) -> list[str]:
    """The first `max_examples` rows of one bundled eval/chat set, each rendered as plain text."""
    files, to_text = EVAL_SETS[name]
    texts: list[str] = []
    for file in files:
        path = DATA_DIR / file
        if not path.is_file():
            raise PicochatError(f"missing bundled data file {path}; restore the repository's data/ folder")
        texts += [to_text(row) for row in _jsonl(path)]
    return texts[:max_examples]


def count_tokens(tokenizer: Tokenizer, texts: list[str]) -> int:
    """Tokens of `texts` as plain text (no bos or other special tokens), encoded in parallel."""
    return sum(len(ids) for ids in tokenizer.encode(texts))


def parse_vocab_sizes(text: str) -> list[int]:
    """argparse type for a comma-separated list of vocabulary sizes, e.g. "4096,16384"."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < MIN_VOCAB_SIZE:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated vocabulary sizes of at least {MIN_VOCAB_SIZE} (e.g. 4096,16384), "
            f"got {text!r}"
        )
    return sizes


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Print the trained tokenizer's compression (UTF-8 bytes per token, higher is better) on "
        "the validation shard and on samples of the bundled eval and chat sets.",
    )
    parser.add_argument(
        "--max-examples",
        type=int,
        default=1000,
        help="rows taken from the start of each eval/chat set (default: 1000)",
    )
    parser.add_argument(
        "--compare-vocab-sizes",
        type=parse_vocab_sizes,
        default=[],
        help="also train tokenizers of these comma-separated vocabulary sizes (e.g. 4096,16384) in memory, "
        "on the text chosen by --source/--max-chars/--doc-cap, and add them to the table",
    )
    add_corpus_args(parser)
    return parser


def format_table(vocab_sizes: list[int], rows: dict[str, dict[str, Any]]) -> str:
    """One line per text set: its bytes, then tokens and bytes/token for each tokenizer."""
    columns = "".join(f" {f'tokens@{v}':>15} {'bytes/tok':>9}" for v in vocab_sizes)
    header = f"{'text':<12} {'bytes':>12}{columns}"
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        cells = "".join(f" {row[f'tokens@{v}']:>15,} {row[f'bytes/token@{v}']:>9.3f}" for v in vocab_sizes)
        lines.append(f"{name:<12} {row['bytes']:>12,}" + cells)
    return "\n".join(lines)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.max_examples <= 0:
        raise PicochatError(f"--max-examples must be positive, got {args.max_examples}")
    tokenizer = get_tokenizer()
    tokenizers = {tokenizer.get_vocab_size(): tokenizer}
    for size in args.compare_vocab_sizes:
        if size not in tokenizers:
            tokenizers[size], _ = train_on_corpus(args, size)
    texts = {"val-shard": list(iter_documents("val", args.source))}
    texts.update({name: eval_texts(name, args.max_examples) for name in EVAL_SETS})

    rows: dict[str, dict[str, Any]] = {}
    for name, sample in texts.items():
        rows[name] = {"bytes": sum(len(t.encode("utf-8")) for t in sample)}
        for size, tok in tokenizers.items():
            tokens = count_tokens(tok, sample)
            rows[name][f"tokens@{size}"] = tokens
            rows[name][f"bytes/token@{size}"] = round(rows[name]["bytes"] / max(tokens, 1), 4)
    print(format_table(list(tokenizers), rows))

    trained = tokenizer.get_vocab_size()
    val_bytes_per_token = rows["val-shard"][f"bytes/token@{trained}"]
    print(f"\nvalidation shard: {val_bytes_per_token:.3f} bytes/token (vocab {trained:,})")
    record(
        "tokenizer-eval",
        {
            "vocab_size": trained,
            "val_bytes_per_token": val_bytes_per_token,
            "compared_vocab_sizes": [s for s in tokenizers if s != trained],
            "max_examples": args.max_examples,
            "compression": rows,
        },
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
