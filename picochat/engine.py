"""Inference: sample replies from a GPT with a KV cache, with calculator tool calls mid-reply.

`Engine(model, tokenizer).generate(tokens, num_samples, params)` prefills the prompt once (batch 1),
copies its KV cache into `num_samples` rows and decodes them together, one token per row per step,
streaming `(token, mask)` per row; `params` is a `picochat.sampling.SamplingParams`. The decode step is
kept lean because on a small model it is dominated by per-step overhead, not arithmetic: the KV cache
is preallocated (`picochat.gpt.KVCache`, written in place), logits are computed for the last position
only and by `picochat.decode_head.DecodeHead` (the lm_head weight in the layout fastest for the batch
size), the model's rotary tables are precomputed, everything runs under `torch.inference_mode`, sampling
is one batched `picochat.sampling.BatchSampler` call that also applies the logits' soft-cap (to the
top-k candidates only where it can), and the Python work per step is one short loop over rows.

The pieces shared with the continuous-batching server (picochat/serve/batching.py):
  - `RowState`: the per-row state machine: forced tokens, tool calls, stop tokens, the token budget.
    When a row writes `<|python_start|>code<|python_end|>`, the code is run with the calculator and
    `<|output_start|>result<|output_end|>` is force-fed into that row (streamed with mask 0) before it
    continues. A row stops at `<|assistant_end|>` or `<|bos|>` ("stop") or at its budget ("length").
    With `chat=False` (plain completion of raw text) only `<|bos|>` stops it and there are no tools;
  - `ReplyText`: turns a row's tokens into text pieces of kind "text" | "python" | "python_output";
  - `Engine.last_logits` / `Engine.prefill`: one forward pass appending tokens to a cache, prompts in
    chunks of `PREFILL_CHUNK` tokens;
  - `fit_conversation` / `prompt_budget`: keep long chats inside the model's context by dropping the
    oldest turns (never the system prompt).
"""

from __future__ import annotations

import contextlib
import random
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

from picochat.common import PicochatError, autodetect_device_type, get_base_dir, keep_freed_memory
from picochat.decode_head import DecodeHead
from picochat.execution import run_calculator
from picochat.gpt import KVCache
from picochat.sampling import BatchSampler, SamplingParams

Kind = Literal["text", "python", "python_output"]
FinishReason = Literal["stop", "length"]
PREFILL_CHUNK = 256  # prompt tokens per forward pass: bounds the attention's memory and, in the
# server, how long a long prompt holds up the other streams' next token
GREEDY = SamplingParams(temperature=0.0)
CACHE_GROWTH = 32  # reply tokens the decode cache first has room for (it doubles as needed)

# ---------------------------------------------------------------------------------------------
# The per-row state machine: forced tokens, tool calls, stopping


@dataclass(frozen=True)
class ChatTokens:
    """The special token ids generation reacts to, and the tool that answers `<|python_start|>` blocks."""

    tokenizer: Any
    bos: int
    assistant_end: int
    python_start: int
    python_end: int
    output_start: int
    output_end: int
    special: frozenset[int]
    tool: Callable[[str], str | None]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, tool: Callable[[str], str | None] = run_calculator) -> ChatTokens:
        ids = {name: tokenizer.encode_special(f"<|{name}|>") for name in _CONTROL_NAMES}
        return cls(tokenizer, **ids, special=frozenset(tokenizer.get_special_tokens().values()), tool=tool)

    def run_tool(self, code_tokens: list[int]) -> list[int]:
        """The tokens to force-feed after a python block: <|output_start|>result<|output_end|>, or none
        when the tool fails (the model then goes on without an output, as it would without a tool)."""
        result = self.tool(self.tokenizer.decode(code_tokens))
        if result is None:
            return []
        return [self.output_start, *self.tokenizer.encode(result), self.output_end]


_CONTROL_NAMES = ("bos", "assistant_end", "python_start", "python_end", "output_start", "output_end")


class Step(NamedTuple):
    """One token of one row. kind: how to show it (None for control tokens, which show nothing);
    finish_reason: set on the row's last token."""

    token: int
    mask: int  # 1 = sampled by the model, 0 = forced (a tool's output)
    kind: Kind | None
    finish_reason: FinishReason | None


class RowState:
    """One sequence being generated: which token comes next, and when it ends.

    Each step, `next_token(sampled)` takes the next forced token if any (mask 0), else the sampled one
    (mask 1), and updates the state: the code of a python block is collected and, at its end, the tool's
    output is queued as forced tokens. The row finishes at a stop token or after `max_tokens` tokens.
    """

    def __init__(self, tokens: ChatTokens, max_tokens: int, chat: bool = True) -> None:
        self.tokens, self.max_tokens, self.chat = tokens, max_tokens, chat
        self.forced: deque[int] = deque()
        self.block: Kind | None = None  # inside <|python_start|>... ("python") or <|output_start|>...
        self.code: list[int] = []
        self.generated = 0
        self.finish_reason: FinishReason | None = None

    def next_token(self, sampled: int) -> Step:
        token, mask = (self.forced.popleft(), 0) if self.forced else (sampled, 1)
        kind = self._observe(token)
        self.generated += 1
        if self.finish_reason is None and self.generated >= self.max_tokens:
            self.finish_reason = "length"
        return Step(token, mask, kind, self.finish_reason)

    def _observe(self, token: int) -> Kind | None:
        t = self.tokens
        if not self.chat:  # plain text: everything is text, only <|bos|> (a new document) ends it
            if token == t.bos:
                self.finish_reason = "stop"
                return None
            return "text"
        if token == t.assistant_end or token == t.bos:
            self.finish_reason = "stop"
        elif token == t.python_start:
            self.block, self.code = "python", []
        elif token == t.python_end and self.block == "python":
            self.block = None
            self.forced.extend(t.run_tool(self.code))
        elif token == t.output_start:
            self.block = "python_output"
        elif token == t.output_end:
            self.block = None
        elif token not in t.special:
            if self.block == "python":
                self.code.append(token)
            return self.block or "text"
        return None


class Piece(NamedTuple):
    """Text of one kind, made of the `tokens` last tokens fed to a `ReplyText`."""

    kind: Kind
    text: str
    tokens: int


class ReplyText:
    """Turns one row's steps into `Piece`s (kind, text, token count) for display, never splitting a
    UTF-8 character (a byte-level BPE token can hold half of one: such tokens wait for the rest)."""

    MAX_PENDING = 8  # give up waiting for the rest of a character after this many tokens

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.kind: Kind | None = None
        self.pending: list[int] = []

    def feed(self, token: int, kind: Kind | None) -> list[Piece]:
        pieces = self.flush() if kind != self.kind else []
        self.kind = kind
        if kind is not None:
            self.pending.append(token)
            text = self.tokenizer.decode(self.pending)
            if not text.endswith("\ufffd") or len(self.pending) >= self.MAX_PENDING:
                pieces.append(Piece(kind, text, len(self.pending)))
                self.pending = []
        return pieces

    def flush(self) -> list[Piece]:
        """Whatever is still pending (call at the end of the reply)."""
        if not self.pending:
            return []
        piece = Piece(self.kind, self.tokenizer.decode(self.pending), len(self.pending))
        self.pending = []
        return [piece]


# ---------------------------------------------------------------------------------------------
# The engine


class Engine:
    """KV-cache generation for a `picochat.gpt.GPT` and its tokenizer."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        tool: Callable[[str], str | None] = run_calculator,
        bf16_head: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.tokens = ChatTokens.from_tokenizer(tokenizer, tool)
        self.device = model.lm_head.weight.device
        # A model's lm_head may have more rows than the tokenizer has tokens (a padded vocabulary, e.g.
        # an imported nanochat model): ids without a token are cut off the logits, never sampled.
        self.vocab_size = min(model.config.vocab_size, tokenizer.get_vocab_size())
        self.max_context = model.config.sequence_len  # prompt + reply tokens the model was trained on
        # the lm_head in the weight layout fastest for each batch size (bf16_head: in bf16, opt-in)
        self.head = DecodeHead(model, bf16=bf16_head)
        if self.device.type == "cpu":
            keep_freed_memory()  # a reply's cache memory is reused by the next without page faults

    def last_logits(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Append `ids` (B, T) to `cache` and return the logits (B, V) of each row's last token (the
        lm_head runs on that position only: for a prompt, the other positions' logits would cost more
        than the whole rest of the model). They are the logits before the model's soft-cap: the
        engine's samplers (`self.sampler`) apply it, to the top-k candidates only where they can."""
        # bf16 on GPU, as in training (a fresh context each call: autocast objects are not reentrant)
        cuda = self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
            logits = self.model(ids, kv_cache=cache, last_only=True, head=self.head, capped=False)
            return logits[:, -1, : self.vocab_size]

    def sampler(self, capacity: int) -> BatchSampler:
        """A sampler for `capacity` rows of this engine's `last_logits` (it applies the soft-cap)."""
        return BatchSampler(capacity, self.vocab_size, self.device, softcap=self.model.config.softcap)

    def prefill(self, tokens: list[int]) -> tuple[torch.Tensor, KVCache]:
        """Run a prompt through the model, PREFILL_CHUNK tokens at a time: its last logits (1, V) and a
        1-row cache holding it."""
        cache = KVCache.for_model(self.model, 1, len(tokens))
        for start in range(0, len(tokens), PREFILL_CHUNK):
            chunk = tokens[start : start + PREFILL_CHUNK]
            logits = self.last_logits(torch.tensor([chunk], dtype=torch.long, device=self.device), cache)
        return logits, cache

    def reply_budget(self, prompt_len: int, max_tokens: int | None) -> int:
        """How many tokens a reply to a `prompt_len`-token prompt may have: max_tokens, cut at the context."""
        room = self.max_context - prompt_len
        if room < 1:
            raise ValueError(
                f"the prompt has {prompt_len} tokens, which leaves no room in the model's context of "
                f"{self.max_context}; shorten it (fit_conversation drops the oldest turns of a chat)"
            )
        return room if max_tokens is None else max(0, min(max_tokens, room))

    @torch.inference_mode()
    def stream(
        self, tokens: list[int], num_samples: int = 1, params: SamplingParams = GREEDY
    ) -> Iterator[list[Step | None]]:
        """Like `generate`, but each row's entry is a full `Step` (token, mask, kind, finish_reason)."""
        budget = self.reply_budget(len(tokens), params.max_tokens)
        if budget == 0:
            return
        if not tokens:
            raise ValueError("the prompt is empty; give at least one token (e.g. <|bos|>)")
        sampler = self.sampler(num_samples)
        rng = random.Random(params.seed)  # one stream of random numbers for all rows: reproducible
        slots = list(range(num_samples))
        for slot in slots:
            sampler.assign(slot, params, rng)
        logits, prompt_cache = self.prefill(tokens)
        # The rows' cache starts with room for CACHE_GROWTH tokens and doubles when full: the first
        # token does not wait for the whole budget's memory (tens of ms at batch 32, where first-touch
        # page faults are slow), and a reply that stops early never pays for the rest.
        full_len = len(tokens) + budget - 1
        cache = KVCache.for_model(self.model, num_samples, min(full_len, len(tokens) + CACHE_GROWTH))
        cache.insert_prefill(prompt_cache)  # one prefill, shared by every row
        logits = logits.expand(num_samples, -1)
        rows = [RowState(self.tokens, budget) for _ in slots]
        while True:
            live = [i for i in slots if not rows[i].finish_reason]
            sampled, _ = sampler.sample(logits if len(live) == num_samples else logits[live], live)
            steps: list[Step | None] = [None] * num_samples
            for i, token in zip(live, sampled, strict=True):
                steps[i] = rows[i].next_token(token)
            sampler.observe(live, [steps[i].token for i in live])
            yield steps
            if all(row.finish_reason for row in rows):
                return
            ids = [[step.token if step else self.tokens.bos] for step in steps]
            if int(cache.pos.max()) == cache.max_len:
                cache = cache.grown(min(full_len, 2 * cache.max_len))
            logits = self.last_logits(torch.tensor(ids, dtype=torch.long, device=self.device), cache)

    def generate(
        self, tokens: list[int], num_samples: int = 1, params: SamplingParams = GREEDY
    ) -> Iterator[list[tuple[int, int] | None]]:
        """Sample `num_samples` continuations of `tokens`, streaming: each step yields one entry per row,
        `(token, mask)` (mask 0 for forced tool-output tokens), or None for a row that already finished.

        A row's last token is its stop token (`<|assistant_end|>` / `<|bos|>`), unless it ran out of
        tokens: `params.max_tokens` (None = up to the end of the model's context). The default params
        are greedy; `params.seed` makes sampling reproducible.
        """
        for steps in self.stream(tokens, num_samples, params):
            yield [None if step is None else (step.token, step.mask) for step in steps]

    def generate_batch(
        self, tokens: list[int], num_samples: int = 1, params: SamplingParams = GREEDY
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Generate without streaming: (sequences, masks) per row, each sequence the prompt followed by
        the reply without its stop token; masks are 0 on the prompt and on forced tokens."""
        sequences = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        for steps in self.stream(tokens, num_samples, params):
            for sequence, mask, step in zip(sequences, masks, steps, strict=True):
                if step is not None and step.finish_reason != "stop":
                    sequence.append(step.token)
                    mask.append(step.mask)
        return sequences, masks


def load_engine(
    source: str,
    model_tag: str | None = None,
    step: int | None = None,
    device_type: str = "",
    bf16_head: bool = False,
) -> tuple[Engine, dict[str, Any]]:
    """(Engine, checkpoint meta) for a stage's checkpoint; a PicochatError saying how to train one if
    there is none. model_tag defaults to the deepest model, step to the latest, device to the best one;
    bf16_head: the lm_head in bf16 at decode time (picochat.decode_head)."""
    from picochat.checkpoint import checkpoint_dir_for, find_model_tag, list_steps, load_model

    how = f"train one with runs/cpu.sh or `picochat train {source}`"
    try:
        tag = model_tag or find_model_tag(source)
    except PicochatError:
        raise PicochatError(
            f"no {source} model under {get_base_dir() / 'checkpoints' / source}; {how}"
        ) from None
    folder = checkpoint_dir_for(source, tag)
    if not list_steps(folder):
        raise PicochatError(f"no {source} checkpoint in {folder}; {how}")
    model, tokenizer, meta = load_model(source, tag, step, device=device_type or autodetect_device_type())
    return Engine(model, tokenizer, bf16_head=bf16_head), meta


# ---------------------------------------------------------------------------------------------
# Fitting long conversations into the context


def prompt_budget(max_context: int, max_tokens: int) -> int:
    """Prompt tokens allowed when a reply of up to `max_tokens` should still fit: the reply gets its
    room, but never more than half of the context, so a long chat keeps its recent turns."""
    return max_context - min(max_tokens, max_context // 2)


def context_notice(dropped: int, max_context: int) -> str:
    """What to tell the user when `fit_conversation` had to drop `dropped` messages."""
    what = "message was" if dropped == 1 else "messages were"
    return f"{dropped} earlier {what} dropped or shortened to fit the model's {max_context}-token context"


def fit_conversation(
    tokenizer: Any, conversation: dict[str, Any], max_prompt_tokens: int
) -> tuple[dict[str, Any], int]:
    """Make `conversation`'s completion prompt fit in `max_prompt_tokens` -> (conversation, dropped_count).

    Drops the oldest user/assistant turns first, keeping the system prompt and the last user message.
    If that message alone is still too long, it keeps its end; only if the system prompt alone does not
    fit either is it dropped too. dropped_count counts the messages removed or shortened (0: unchanged).
    """
    messages = list(conversation["messages"])
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    dropped = 0

    def fits(msgs: list[dict]) -> bool:
        return len(tokenizer.render_for_completion({**conversation, "messages": msgs})) <= max_prompt_tokens

    while not fits(system + turns) and len(turns) > 2:  # keep at least the last user turn
        turns = turns[2:]
        dropped += 2
    if fits(system + turns):
        return {**conversation, "messages": system + turns}, dropped
    # Only the last exchange is left and it is still too long: keep the end of the last user message.
    text = next(m["content"] for m in reversed(turns) if m["role"] == "user")
    dropped += len(turns)  # the user message is shortened; a trailing assistant message goes
    for prefix in (system, []):
        kept = _longest_fitting_tail(text, lambda tail, p=prefix: fits(p + [_user(tail)]))
        if kept is not None:
            return {**conversation, "messages": prefix + [_user(kept)]}, dropped
        dropped += len(prefix)  # the system prompt alone is too long: drop it as well
    raise ValueError(f"max_prompt_tokens={max_prompt_tokens} is too small to hold even an empty user message")


def _user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def _longest_fitting_tail(text: str, fits: Callable[[str], bool]) -> str | None:
    """The longest suffix of `text` for which fits(suffix) holds (binary search), or None if not even ''."""
    if not fits(""):
        return None
    low, high = 0, len(text)  # fits(text[len(text) - low:]) holds; find the largest such low
    while low < high:
        mid = (low + high + 1) // 2
        if fits(text[len(text) - mid :]):
            low = mid
        else:
            high = mid - 1
    return text[len(text) - low :]
