"""The `picochat` command: one entry point that dispatches to each stage's own `main(argv)`.

Each stage module owns its argparse parser (so `python -m picochat.train.base --help` and
`picochat train base --help` print the same thing); this file only maps command words to modules.
"""

from __future__ import annotations

import importlib
import os
import sys

from picochat.common import PicochatError, require_writable_home

# (command words, module, one-line description). Order is the order of the pipeline.
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("download",), "picochat.download", "download pretraining shards from the Hugging Face hub"),
    (("plan",), "picochat.plan", "size a base-training run: tokens, FLOPs, hours, memory per GPU, cost"),
    (("tokenizer", "train"), "picochat.train.tokenizer", "train the BPE tokenizer on the corpus"),
    (("tokenizer", "eval"), "picochat.evals.tokenizer", "report the tokenizer's compression (bytes/token)"),
    (("train", "base"), "picochat.train.base", "pretrain a GPT from scratch (--depth sets its size)"),
    (("train", "mid"), "picochat.train.mid", "mid-train on conversations, multiple choice and tool use"),
    (("train", "sft"), "picochat.train.sft", "supervised fine-tuning on single conversations"),
    (("train", "rl"), "picochat.train.rl", "reinforcement learning on GSM8K or SpellingBee"),
    (("eval", "base"), "picochat.evals.core", "CORE score, bits-per-byte and samples of a base model"),
    (("eval", "chat"), "picochat.evals.chat", "chat evals: ARC, MMLU, GSM8K, HumanEval, spelling, ChatCORE"),
    (("chat",), "picochat.chat", "talk to a model in the terminal"),
    (("serve",), "picochat.serve.app", "web UI and OpenAI-compatible API"),
    (("report",), "picochat.report", "write report.md from every stage's recorded metrics"),
    (("export",), "picochat.hf_export", "export a checkpoint as a Hugging Face transformers model"),
    (("import",), "picochat.hf_import", "import a transformers NanoChat model as a picochat checkpoint"),
]
# Commands that write under $PICOCHAT_HOME: checked writable before they start (not for --help).
WRITERS = {
    ("download",), ("tokenizer", "train"), ("tokenizer", "eval"), ("train", "base"), ("train", "mid"),
    ("train", "sft"), ("train", "rl"), ("eval", "base"), ("eval", "chat"), ("report",), ("import",),
}  # fmt: skip


def _usage() -> str:
    width = max(len(" ".join(words)) for words, _, _ in COMMANDS)
    lines = [
        "usage: picochat <command> [--help] [options]",
        "",
        "Train your own small ChatGPT, from raw text to a chat UI. Commands, in pipeline order:",
        "",
    ]
    lines += [f"  {' '.join(words):<{width}}  {desc}" for words, _, desc in COMMANDS]
    lines += [
        "",
        "Run `picochat <command> --help` for a command's options.",
        "Artifacts go under $PICOCHAT_HOME (default ~/.cache/picochat).",
    ]
    return "\n".join(lines)


def _group_usage(word: str) -> str:
    """`picochat train --help`: the commands that start with one word."""
    found = [(words, desc) for words, _, desc in COMMANDS if words[0] == word and len(words) > 1]
    width = max(len(" ".join(words)) for words, _ in found)
    lines = [f"usage: picochat {word} <command> [--help] [options]", "", "Commands:", ""]
    lines += [f"  {' '.join(words):<{width}}  {desc}" for words, desc in found]
    return "\n".join([*lines, "", f"Run `picochat {word} <command> --help` for a command's options."])


def resolve(argv: list[str]) -> tuple[tuple[str, ...], str, list[str]] | None:
    """Find the longest command whose words prefix argv; return (words, module, remaining args)."""
    for words, module, _ in sorted(COMMANDS, key=lambda c: -len(c[0])):
        if tuple(argv[: len(words)]) == words:
            return words, module, argv[len(words) :]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from picochat import __version__

        print(f"picochat {__version__}")
        return 0
    found = resolve(argv)
    groups = {words[0] for words, _, _ in COMMANDS if len(words) > 1}
    if found is None and argv[0] in groups and argv[1:2] in ([], ["-h"], ["--help"], ["help"]):
        print(_group_usage(argv[0]))
        return 0
    if found is None:
        print(f"picochat: unknown command {' '.join(argv[:2])!r}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    words, module, rest = found
    stage_main = importlib.import_module(module).main
    try:
        if words in WRITERS and not {"-h", "--help"} & set(rest):
            require_writable_home()
        return int(stage_main(rest, prog="picochat " + " ".join(words)) or 0)
    except PicochatError as e:
        print(f"picochat {' '.join(words)}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The console script: main(), with a closed pipe (`picochat --help | head -1`) ending quietly."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would print a traceback flushing stdout at exit; point it at /dev/null instead.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 0
    sys.exit(code)


if __name__ == "__main__":
    entry()
