"""The byte-level BPE tokenizer (GPT-4 style) and the rendering of conversations into tokens.

Training goes through `rustbpe` (fast, parallel, Rust); encoding goes through `tiktoken`, built from the
learned merges, the split pattern and the special tokens. The trained tokenizer lives in
`$PICOCHAT_HOME/tokenizer/` as three plain files (no pickles):

- `tokenizer.tiktoken`: one `base64(token bytes) rank` line per mergeable token (tiktoken's own format),
- `tokenizer.json`: the split pattern, the special tokens with their ids and the vocabulary size,
- `token_bytes.safetensors`: each token's length in UTF-8 bytes (0 for special tokens), for bits-per-byte.

Plain text is always encoded "ordinarily": a document that happens to contain the string "<|bos|>" gets
the tokens for those characters, never the special token, so data cannot forge chat structure.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import rustbpe
import tiktoken
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from picochat.common import (
    PicochatError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    get_base_dir,
)

# GPT-4's pre-tokenization regex, except that digit runs are split into chunks of 1-2 digits rather
# than 1-3 (as nanochat does). 3-digit chunks would spend up to 1,000 merges on numbers; with an
# 8K-65K vocabulary those merges buy more compression when spent on words, and 2-digit chunks also
# give the model a more regular view of multi-digit arithmetic.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
    r"""\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document and every conversation
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the python tool...
    "<|python_end|>",
    "<|output_start|>",  # ...and the tool's output comes back here (not trained on)
    "<|output_end|>",
]
RANKS_FILE = "tokenizer.tiktoken"
META_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.safetensors"
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte, plus the special tokens


class Tokenizer:
    """A trained BPE vocabulary: ids 0..n-1 are byte sequences (by merge rank), then the special tokens."""

    def __init__(
        self, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN, name: str = "picochat"
    ) -> None:
        if sorted(mergeable_ranks.values()) != list(range(len(mergeable_ranks))):
            raise ValueError("mergeable ranks must be the ids 0..n-1, each used once")
        first = len(mergeable_ranks)
        self.special_tokens = {token: first + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        self.enc = tiktoken.Encoding(
            name, pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=self.special_tokens
        )

    # -----------------------------------------------------------------------------------------
    # Training, saving, loading

    @classmethod
    def train_from_iterator(
        cls, texts: Iterable[str], vocab_size: int, pattern: str = SPLIT_PATTERN
    ) -> Tokenizer:
        """Learn BPE merges on `texts` until the vocabulary (special tokens included) has `vocab_size`
        tokens, or fewer if the text runs out of pairs to merge. Deterministic: the same texts in the
        same order give the same merges."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + special tokens)")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=pattern)
        return cls(dict(trainer.get_mergeable_ranks()), pattern)

    def save(self, directory: str | Path) -> None:
        """Write the ranks, the metadata and the token byte lengths into `directory` (each atomically)."""
        directory = Path(directory)
        by_rank = sorted(self.mergeable_ranks.items(), key=lambda item: item[1])
        lines = [f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in by_rank]
        atomic_write_text(directory / RANKS_FILE, "".join(lines))
        atomic_write_bytes(directory / TOKEN_BYTES_FILE, save({"token_bytes": self.token_byte_lengths()}))
        meta = {
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "vocab_size": self.get_vocab_size(),
        }
        atomic_write_json(directory / META_FILE, meta)

    @classmethod
    def from_directory(cls, directory: str | Path) -> Tokenizer:
        """Load a tokenizer written by `save`."""
        directory = Path(directory)
        ranks_path, meta_path = directory / RANKS_FILE, directory / META_FILE
        for path in (ranks_path, meta_path):
            if not path.is_file():
                raise PicochatError(f"no tokenizer file {path}; run `picochat tokenizer train` to create it")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            ranks = {}
            for line in ranks_path.read_text(encoding="ascii").splitlines():
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            tokenizer = cls(ranks, meta["pattern"])
        except (ValueError, KeyError, TypeError) as e:  # JSON/base64/int errors are ValueErrors
            message = f"corrupt tokenizer in {directory} ({e}); run `picochat tokenizer train`"
            raise PicochatError(message) from e
        expected = {"special_tokens": tokenizer.special_tokens, "vocab_size": tokenizer.get_vocab_size()}
        if any(meta.get(key) != value for key, value in expected.items()):
            raise PicochatError(
                f"{meta_path} does not match {ranks_path} or this picochat's special tokens; "
                "retrain with `picochat tokenizer train`"
            )
        return tokenizer

    # -----------------------------------------------------------------------------------------
    # Vocabulary

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_special_tokens(self) -> dict[str, int]:
        """{special token name: id}, in SPECIAL_TOKENS order."""
        return dict(self.special_tokens)

    def encode_special(self, name: str) -> int:
        """The id of a special token, e.g. encode_special("<|bos|>")."""
        if name not in self.special_tokens:
            raise ValueError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}")
        return self.special_tokens[name]

    def get_bos_token_id(self) -> int:
        return self.special_tokens["<|bos|>"]

    def id_to_token(self, token_id: int) -> str:
        """The text of one token (a special token's name; U+FFFD for a byte that is not valid UTF-8 alone)."""
        return self.enc.decode([token_id])

    def token_byte_lengths(self) -> torch.Tensor:
        """int32 [vocab]: each token's length in bytes, 0 for special tokens (they stand for no text)."""
        lengths = [0] * self.get_vocab_size()
        for token, rank in self.mergeable_ranks.items():
            lengths[rank] = len(token)
        return torch.tensor(lengths, dtype=torch.int32)

    # -----------------------------------------------------------------------------------------
    # Encoding and decoding

    def _resolve_id(self, token: int | str) -> int:
        if isinstance(token, str):
            return self.encode_special(token)
        if not 0 <= token < self.get_vocab_size():
            raise ValueError(f"token id {token} is outside the vocabulary [0, {self.get_vocab_size()})")
        return int(token)

    def encode(
        self,
        text: str | list[str],
        prepend: int | str | None = None,
        append: int | str | None = None,
        num_threads: int = 8,
    ) -> list[int] | list[list[int]]:
        """Token ids of a string, or a list of id lists for a list of strings (encoded in parallel on
        `num_threads` threads). `prepend`/`append` add a token (an id or a special token name such as
        "<|bos|>") around each text. Special-token strings inside the text are encoded as plain text."""
        before = [] if prepend is None else [self._resolve_id(prepend)]
        after = [] if append is None else [self._resolve_id(append)]
        if isinstance(text, str):
            return before + self.enc.encode_ordinary(text) + after
        if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
            raise TypeError(f"encode() takes a str or a list of str, not {type(text).__name__}")
        rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        return [before + row + after for row in rows] if before or after else rows

    def decode(self, ids: Iterable[int]) -> str:
        """The text of a token sequence; bytes that do not form valid UTF-8 become U+FFFD."""
        return self.enc.decode(list(ids))

    # -----------------------------------------------------------------------------------------
    # Conversations

    def render_conversation(
        self, conversation: dict[str, Any], max_tokens: int = 2048
    ) -> tuple[list[int], list[int]]:
        """Tokens of a whole conversation and the loss mask (1 = the model is trained to predict it),
        both cut to `max_tokens`. The mask is 1 on assistant text, python tool calls (with their
        start/end tokens) and <|assistant_end|>; 0 on <|bos|>, user turns, <|assistant_start|> and tool
        outputs (with their start/end tokens), which the model reads but does not have to produce."""
        ids, mask = self._render(_validated_messages(conversation))
        return ids[:max_tokens], mask[:max_tokens]

    def render_for_completion(self, conversation: dict[str, Any]) -> list[int]:
        """Prompt tokens for sampling the next assistant reply: the conversation without its final
        assistant message (if any), ending with <|assistant_start|>."""
        messages = _validated_messages(conversation)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        ids, _ = self._render(messages)
        return ids + [self.special_tokens["<|assistant_start|>"]]

    def _render(self, messages: list[dict[str, Any]]) -> tuple[list[int], list[int]]:
        """Render validated messages (system already merged) with no length limit."""
        ids: list[int] = []
        mask: list[int] = []

        def add(tokens: int | list[int], trained: bool) -> None:
            tokens = [tokens] if isinstance(tokens, int) else tokens
            ids.extend(tokens)
            mask.extend([int(trained)] * len(tokens))

        special = self.special_tokens
        add(special["<|bos|>"], False)
        for message in messages:
            if message["role"] == "user":
                add(special["<|user_start|>"], False)
                add(self.encode(message["content"]), False)
                add(special["<|user_end|>"], False)
                continue
            add(special["<|assistant_start|>"], False)
            for part in message["content"]:
                text = self.encode(part["text"])
                if part["type"] == "text":
                    add(text, True)
                elif part["type"] == "python":
                    add([special["<|python_start|>"], *text, special["<|python_end|>"]], True)
                else:  # python_output: produced by the tool, so never a training target
                    add([special["<|output_start|>"], *text, special["<|output_end|>"]], False)
            add(special["<|assistant_end|>"], True)
        return ids, mask

    def visualize_tokens(self, ids: list[int], mask: list[int] | None = None) -> str:
        """Debugging aid: the tokens separated by '|', trained ones (mask 1) in green, others in grey."""
        mask = mask if mask is not None else [1] * len(ids)
        green, grey, reset = "\033[92m", "\033[90m", "\033[0m"
        return "|".join(
            f"{green if m else grey}{self.id_to_token(i)}{reset}" for i, m in zip(ids, mask, strict=True)
        )


# ---------------------------------------------------------------------------------------------
# Conversation validation (shared by both render functions)

PART_TYPES = ("text", "python", "python_output")


def _validated_messages(conversation: dict[str, Any]) -> list[dict[str, Any]]:
    """Check a conversation against docs/architecture.md and return its messages normalised: the system
    message merged into the first user turn, and every assistant content as a list of parts."""
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError('a conversation must be a dict {"messages": [...]}')
    messages = conversation["messages"]
    if not messages:
        raise ValueError("the conversation has no messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        if message["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} has unknown role {message['role']!r} (system, user or assistant)")
        if message["role"] == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only be the first message")
    messages = copy.deepcopy(messages)
    if messages[0]["role"] == "system":
        system = _text_content(messages[0], 0)
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("the system message must be followed by a user message")
        messages = messages[1:]
        messages[0]["content"] = system + "\n\n" + _text_content(messages[0], 1)
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(
                f"turn {i} is {message['role']!r} but should be {expected!r}: "
                "roles must alternate user/assistant, starting with the user"
            )
        if expected == "user":
            message["content"] = _text_content(message, i)
        else:
            message["content"] = list(_assistant_parts(message["content"], i))
    return messages


def _text_content(message: dict[str, Any], index: int) -> str:
    if not isinstance(message["content"], str):
        raise ValueError(f"{message['role']} message {index}: content must be a string")
    return message["content"]


def _assistant_parts(content: Any, index: int) -> Iterator[dict[str, str]]:
    if isinstance(content, str):
        yield {"type": "text", "text": content}
        return
    if not isinstance(content, list):
        raise ValueError(f"assistant message {index}: content must be a string or a list of parts")
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(
                f"assistant message {index}: unknown part type {kind!r} (one of {', '.join(PART_TYPES)})"
            )
        if not isinstance(part.get("text"), str):
            raise ValueError(f"assistant message {index}: a {part['type']} part needs a string 'text'")
        yield part


# ---------------------------------------------------------------------------------------------
# The trained tokenizer of this PICOCHAT_HOME


def tokenizer_dir() -> Path:
    return get_base_dir() / "tokenizer"


def get_tokenizer() -> Tokenizer:
    """The tokenizer trained by `picochat tokenizer train` (in $PICOCHAT_HOME/tokenizer)."""
    return Tokenizer.from_directory(tokenizer_dir())


def get_token_bytes(device: str | torch.device = "cpu") -> torch.Tensor:
    """int32 [vocab]: each token's length in UTF-8 bytes (0 for special tokens), for bits-per-byte."""
    path = tokenizer_dir() / TOKEN_BYTES_FILE
    if not path.is_file():
        raise PicochatError(f"no {path}; run `picochat tokenizer train` to create it")
    try:
        token_bytes = load_file(path)["token_bytes"]
    except (SafetensorError, KeyError, OSError) as e:
        raise PicochatError(f"corrupt {path} ({e}); retrain: `picochat tokenizer train`") from e
    return token_bytes.to(device)
