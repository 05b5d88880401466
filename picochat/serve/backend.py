"""The interface between the HTTP server (`picochat.serve.app`) and whatever generates text.

The server never touches the model: it validates requests, calls `Backend.generate` once per
requested choice and turns the `Delta`s it yields into OpenAI-shaped responses. The real backend
(`picochat.serve.batching.ContinuousBatchingBackend`) runs a KV-cache engine with continuous batching;
tests use a small fake. A backend must follow these rules:

- `generate(messages, params)` returns an async iterator (normally an `async def ... yield` generator).
  `messages` is the conversation in docs/architecture.md's format, already validated: an optional
  leading system message, then user/assistant turns alternating and ending with a user turn; user
  and system content is a `str`, assistant content a `str` or a list of parts
  (`{"type": "text" | "python" | "python_output", "text": ...}`).
- `generate` is called, and its iterator consumed, in the server's asyncio event loop: never block it
  (run the model in a thread or executor and hand tokens over, e.g. with `loop.call_soon_threadsafe`).
- `params.max_tokens` is already capped at min(limit, max_context). Fitting prompt + reply into
  `max_context` is the backend's job (e.g. drop the oldest turns and say so in a `notice`).
- `complete(prompt, params)`: the same for a plain continuation of raw prompt tokens (no chat
  template, no tool calls; `POST /v1/completions`): it stops at `<|bos|>` ("stop") or at max_tokens or
  the context ("length"), with the same admission and cancellation rules.
- `score(prompt, top_logprobs)`: the log-prob of each prompt token given those before it (None for the
  first), for `echo` with `logprobs`.
- `params` is a `picochat.sampling.SamplingParams` (re-exported here), already validated; the server
  passes its own defaults explicitly. With `params.logprobs`, deltas carry a `TokenLogprob` per token
  of their text.
- A failure while generating one request ends that request only: its iterator raises the error (the
  server reports it to that client); every other request goes on.
- Deltas carry the reply in order. Tool calls are deltas of kind "python" (the code the model writes,
  streamed token by token) followed by "python_output" (the calculator's result).
- The last delta has `finish_reason` set ("stop" at `<|assistant_end|>`, "length" at max_tokens or the
  context limit) and should carry the token counts; its `text` may be empty. Nothing follows it.
- Admission: raise `QueueFullError` (or `ShuttingDownError`) either when `generate` is called or from
  the first `__anext__`, before yielding anything. The server waits for the first delta (or that error)
  before it sends the HTTP status, so a full queue becomes a clean 429 and shutdown a 503. Yield an
  empty `Delta()` as soon as a request is accepted into the queue, so its client gets the 200 at once.
- Cancellation: when the client disconnects, or a stop sequence matched, the server cancels the task
  iterating the generator (`asyncio.CancelledError` is raised at the generator's current `await`) and
  then calls `aclose()` (`GeneratorExit` if it is suspended at a `yield`). Free the batch slot in a
  `finally:` block so both paths release it.

`picochat serve` builds the real backend with `ContinuousBatchingBackend.from_checkpoint(source=...,
model_tag=..., step=..., device_type=..., max_batch_size=..., max_queue=...)` (keyword arguments).

Optional hooks, used when present: `stats() -> dict` (merged into `GET /health`, e.g. `{"active": 3,
"queued": 1}`); `async start()` / `async stop()`, awaited in the server's event loop at startup and
shutdown (create asyncio tasks and queues in `start`, not in `__init__`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from picochat.sampling import SamplingParams, TokenLogprob

__all__ = [
    "Backend",
    "Delta",
    "QueueFullError",
    "SamplingParams",
    "ShuttingDownError",
    "TokenLogprob",
]

DeltaKind = Literal["text", "python", "python_output"]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Delta:
    """A piece of a reply. The final delta has finish_reason set and, ideally, the token counts."""

    text: str = ""
    kind: DeltaKind = "text"
    finish_reason: FinishReason | None = None
    notice: str | None = None  # shown to the user, e.g. "oldest turns dropped to fit the context"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # with params.logprobs: one per token whose text this delta carries (tool outputs carry none)
    logprobs: tuple[TokenLogprob, ...] = ()


class QueueFullError(Exception):
    """The backend's bounded queue is full; the client should retry after `retry_after` seconds."""

    def __init__(
        self, message: str = "the server is busy: too many requests in flight", retry_after: int = 1
    ):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDownError(Exception):
    """The backend is shutting down and accepts no new requests."""


class Backend(Protocol):
    model_name: str
    max_context: int  # tokens of prompt + reply the model can attend to
    tokenizer: Any  # encode / decode, for the completions endpoint

    def generate(self, messages: list[dict], params: SamplingParams) -> AsyncIterator[Delta]: ...

    def complete(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Delta]: ...

    async def score(self, prompt: list[int], top_logprobs: int) -> list[TokenLogprob | None]: ...
