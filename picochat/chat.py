"""`picochat chat`: talk to a trained model in the terminal.

Multi-turn, with the reply streamed token by token. Tool calls are shown dimmed, e.g.
`[python] 2+3 -> 5`. Commands: /clear starts a new conversation, /quit (or Ctrl-D) leaves.
`-p "prompt"` answers one prompt, prints the reply and exits (for scripts).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

import torch

from picochat.checkpoint import STAGES
from picochat.common import PicochatError, run_cli
from picochat.engine import Engine, ReplyText, context_notice, fit_conversation, load_engine, prompt_budget
from picochat.sampling import SamplingParams

DIM, RESET = "\033[2m", "\033[0m"
LABELS = {"python": " [python] ", "python_output": " -> "}  # shown before a tool call and its output


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Chat with a trained picochat model in the terminal."
    )
    parser.add_argument(
        "-i",
        "--stage",
        default="sft",
        choices=STAGES,
        help="which stage's checkpoint to load (default: sft)",
    )
    parser.add_argument(
        "--model-tag", default=None, help="checkpoint model tag, e.g. d4 (default: the deepest)"
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument(
        "-p", "--prompt", default=None, help="answer this one prompt, print the reply and exit"
    )
    parser.add_argument(
        "-t", "--temperature", type=float, default=0.6, help="sampling temperature (0 = greedy)"
    )
    parser.add_argument(
        "-k", "--top-k", type=int, default=50, help="sample among the k most likely tokens (0 = all)"
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling: keep this much probability mass"
    )
    parser.add_argument("--max-tokens", type=int, default=512, help="longest reply, in tokens")
    parser.add_argument("--system", default=None, help="system prompt, prepended to the first user message")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for reproducible replies")
    parser.add_argument(
        "--device-type", default="", choices=["cuda", "cpu", "mps"], help="device (default: autodetect)"
    )
    return parser


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The SamplingParams of the flags; a PicochatError naming the bad flag."""
    try:
        return SamplingParams(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            max_tokens=args.max_tokens,
            seed=args.seed,
        )
    except ValueError as e:
        raise PicochatError(f"bad sampling flag: {e}; see picochat chat --help") from None


class Chat:
    """One conversation: renders it, fits it into the context, streams each reply to `out`."""

    def __init__(self, engine: Engine, args: argparse.Namespace, out: TextIO) -> None:
        self.engine, self.args, self.out = engine, args, out
        self.dim = out.isatty()
        self.messages: list[dict[str, Any]] = []
        self.clear()

    def clear(self) -> None:
        self.messages = [{"role": "system", "content": self.args.system}] if self.args.system else []

    def reply(self, user_text: str) -> None:
        """Stream the assistant's reply to `user_text`; the exchange joins the conversation once complete
        (so a reply interrupted with Ctrl-C leaves the conversation as it was)."""
        messages = [*self.messages, {"role": "user", "content": user_text}]
        budget = prompt_budget(self.engine.max_context, self.args.max_tokens)
        conversation, dropped = fit_conversation(self.engine.tokenizer, {"messages": messages}, budget)
        if dropped:
            self._note(f"({context_notice(dropped, self.engine.max_context)})\n")
        tokens = self.engine.tokenizer.render_for_completion(conversation)
        parts: list[dict[str, str]] = []
        text = ReplyText(self.engine.tokenizer)
        finish = None
        for (step,) in self.engine.stream(tokens, params=sampling_params(self.args)):
            for kind, piece, _ in text.feed(step.token, step.kind):
                self._show(kind, piece, parts)
            finish = step.finish_reason
        for kind, piece, _ in text.flush():
            self._show(kind, piece, parts)
        self.out.write((RESET if self.dim else "") + "\n")
        if finish == "length":
            self._note("(reply cut: the token limit or the end of the context was reached)\n")
        self.messages = [*conversation["messages"], {"role": "assistant", "content": parts}]

    def _show(self, kind: str, piece: str, parts: list[dict[str, str]]) -> None:
        """Print a piece of the reply (tool calls dimmed) and add it to the reply's parts."""
        if not parts or parts[-1]["type"] != kind:
            parts.append({"type": kind, "text": ""})
            style = (RESET if kind == "text" else DIM) if self.dim else ""
            self.out.write(style + LABELS.get(kind, ""))
        parts[-1]["text"] += piece
        self.out.write(piece)
        self.out.flush()

    def _note(self, text: str) -> None:
        """A message about the chat, not part of the reply: on stderr, so `-p` output is the reply alone."""
        sys.stderr.write(f"{DIM}{text}{RESET}" if sys.stderr.isatty() else text)
        sys.stderr.flush()


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    sampling_params(args)  # refuse bad flags before loading the model
    if args.max_tokens < 1:
        raise PicochatError("need --max-tokens >= 1")
    engine, _ = load_engine(args.stage, args.model_tag, args.step, args.device_type)
    torch.set_grad_enabled(False)
    chat = Chat(engine, args, sys.stdout)
    if args.prompt is not None:
        chat.reply(args.prompt)
        return 0
    print(f"picochat ({args.stage} model). /clear: new conversation, /quit or Ctrl-D: leave.")
    while True:
        try:
            line = input("\nUser: ").strip()
        except EOFError:
            print()
            return 0
        if line == "/quit":
            return 0
        if line == "/clear":
            chat.clear()
            print("(new conversation)")
            continue
        if line:
            print("\nAssistant: ", end="", flush=True)
            try:
                chat.reply(line)
            except KeyboardInterrupt:
                print(f"{RESET if chat.dim else ''}\n(interrupted; this exchange is forgotten)")


if __name__ == "__main__":
    run_cli(main)
