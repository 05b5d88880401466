"""`picochat chat`: talk to a trained model in the terminal.

Multi-turn, with the reply streamed token by token. Tool calls are shown dimmed, e.g.
`[python] 2+3 -> 5`. Line editing and history (arrow keys, Ctrl-R) come from readline; commands start
with "/" (`/help` lists them) and never reach the model. `-p "prompt"` answers one prompt, prints the
reply and exits (for scripts). Without `-i`, the newest trained stage is loaded (rl > sft > mid > base),
here and in `picochat serve` (`default_stage`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from typing import Any, TextIO

from picochat.checkpoint import STAGES, list_steps
from picochat.common import BF16_HEAD_HELP, PicochatError, get_base_dir, run_cli
from picochat.engine import Engine, ReplyText, context_notice, fit_conversation, load_engine, prompt_budget
from picochat.sampling import SamplingParams

DIM, RESET = "\033[2m", "\033[0m"
LABELS = {"python": " [python] ", "python_output": " -> "}  # shown before a tool call and its output
COMMANDS = {
    "/help": "list these commands",
    "/clear": "start a new conversation (the system prompt stays)",
    "/system TEXT": "set the system prompt and start a new conversation (/system alone clears it)",
    "/show": "show the stage, the system prompt and the sampling settings",
    "/quit": "leave (Ctrl-D too)",
}


def default_stage() -> str:
    """The newest stage in pipeline order (rl > sft > mid > base) that has a checkpoint; sft if none."""
    root = get_base_dir() / "checkpoints"
    for stage in reversed(STAGES):
        folder = root / stage
        if folder.is_dir() and any(list_steps(tag) for tag in folder.iterdir() if tag.is_dir()):
            return stage
    return "sft"  # nothing trained yet: loading it explains what to train


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    """The sampling flags as SamplingParams, or one PicochatError line naming the bad flag."""
    if args.max_new_tokens < 1:
        raise PicochatError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    try:
        return SamplingParams(
            temperature=args.temperature,
            top_k=args.top_k or None,
            top_p=args.top_p,
            max_tokens=args.max_new_tokens,
            seed=args.seed,
        )
    except ValueError as e:
        flag = {"temperature": "-t/--temperature", "top_k": "-k/--top-k", "top_p": "--top-p"}
        name = str(e).split()[0]
        raise PicochatError(f"{flag.get(name, name)}: {e}") from e


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Chat with a trained picochat model in the terminal."
    )
    parser.add_argument(
        "-i",
        "--stage",
        default=None,
        choices=STAGES,
        help="which stage's checkpoint to load (default: the newest trained, rl > sft > mid > base)",
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
    parser.add_argument("--max-new-tokens", type=int, default=512, help="longest reply, in tokens")
    parser.add_argument(
        "--system", default=None, help="system prompt, prepended to the first user message (/system in chat)"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed, for reproducible replies")
    parser.add_argument(
        "--device-type", default="", choices=["cuda", "cpu", "mps"], help="device (default: autodetect)"
    )
    parser.add_argument("--bf16-head", action="store_true", help=BF16_HEAD_HELP)
    return parser


class Chat:
    """One conversation: renders it, fits it into the context, streams each reply to `out`."""

    def __init__(self, engine: Engine, args: argparse.Namespace, out: TextIO) -> None:
        self.engine, self.args, self.out = engine, args, out
        self.params = sampling_from_args(args)
        self.dim = out.isatty()
        self.messages: list[dict[str, Any]] = []
        self.clear()

    def clear(self) -> None:
        self.messages = [{"role": "system", "content": self.args.system}] if self.args.system else []

    def reply(self, user_text: str) -> None:
        """Stream the assistant's reply to `user_text`; the exchange joins the conversation once complete
        (so a reply interrupted with Ctrl-C leaves the conversation as it was)."""
        messages = [*self.messages, {"role": "user", "content": user_text}]
        budget = prompt_budget(self.engine.max_context, self.params.max_tokens)
        conversation, dropped = fit_conversation(self.engine.tokenizer, {"messages": messages}, budget)
        if dropped:
            self._note(f"({context_notice(dropped, self.engine.max_context)})\n")
        tokens = self.engine.tokenizer.render_for_completion(conversation)
        parts: list[dict[str, str]] = []
        text = ReplyText(self.engine.tokenizer)
        finish = None
        for (step,) in self.engine.stream(tokens, params=self.params):
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


def command(chat: Chat, line: str, out: TextIO) -> bool:
    """Run a /command typed at the prompt; return False when the chat should end."""
    name, _, rest = line.partition(" ")
    if name == "/quit":
        return False
    if name == "/help":
        width = max(map(len, COMMANDS))
        out.write("".join(f"  {c.ljust(width)}  {what}\n" for c, what in COMMANDS.items()))
    elif name == "/clear":
        chat.clear()
        out.write("(new conversation)\n")
    elif name == "/system":
        chat.args.system = rest.strip() or None
        chat.clear()
        out.write(f"(system prompt {'set' if chat.args.system else 'cleared'}; new conversation)\n")
    elif name == "/show":
        settings = ", ".join(f"{k}={v}" for k, v in asdict(chat.params).items() if k in SHOWN)
        out.write(f"stage: {chat.args.stage}\nsystem prompt: {chat.args.system or '(none)'}\n{settings}\n")
    else:
        out.write(f"unknown command {name}; /help lists the commands\n")
    return True


SHOWN = ("temperature", "top_k", "top_p", "max_tokens", "seed")


def _enable_line_editing() -> None:
    """Arrow-key editing and history for input() (history kept in memory for this session)."""
    try:
        import readline  # noqa: F401  (importing it is what turns line editing on)
    except ImportError:  # Windows without pyreadline: plain input() still works
        pass


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    sampling_from_args(args)  # bad flags fail before the model loads
    if args.stage is None:
        args.stage = default_stage()
    engine, meta = load_engine(args.stage, args.model_tag, args.step, args.device_type, args.bf16_head)
    chat = Chat(engine, args, sys.stdout)
    if args.prompt is not None:
        chat.reply(args.prompt)
        return 0
    _enable_line_editing()
    print(f"picochat: {args.stage} model from {meta['path']}. /help lists the commands, Ctrl-D leaves.")
    while True:
        try:
            line = input("\nUser: ").strip()
        except EOFError:
            print()
            return 0
        if line.startswith("/"):
            if not command(chat, line, sys.stdout):
                return 0
            continue
        if line:
            print("\nAssistant: ", end="", flush=True)
            try:
                chat.reply(line)
            except KeyboardInterrupt:
                print(f"{RESET if chat.dim else ''}\n(interrupted; this exchange is forgotten)")


if __name__ == "__main__":
    run_cli(main)
