"""Test helpers for the server: a scripted fake `Backend` and a real uvicorn server in a thread.

Shared by tests/test_serve_api.py and tests/test_webui.py (not a test module itself).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

from picochat.serve.backend import Delta, QueueFullError, SamplingParams, TokenLogprob

LONG_WORDS = 400
RICH_REPLY = (
    "Here is a table:\n\n| name | value |\n|------|-------|\n| a | 1 |\n| b | 2 |\n\n"
    "See [the docs](https://example.com/docs), [a script](javascript:alert(1)) and ![pic](https://example.com/x.png).\n\n"
    "> A wise quote.\n\n"
    "```python\ndef add(a, b):\n    return a + b  # sum\n```\n\n"
    "#### 42"
)
NOTICE = "oldest turns dropped to fit the context"


def last_user_text(messages: list[dict]) -> str:
    content = messages[-1]["content"]
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


def scripted_reply(messages: list[dict], params: SamplingParams) -> list[tuple[str, str]]:
    """The fake model's reply as (kind, text) tokens; chosen by keywords in the last user message."""
    question = last_user_text(messages)
    if "calc" in question:
        return [
            ("text", "Let me compute. "),
            ("python", "2+"),
            ("python", "3"),
            ("python_output", "5"),
            ("text", "The answer is "),
            ("text", "5."),
        ]
    if "long" in question:
        return [("text", f"word{i} ") for i in range(LONG_WORDS)]
    if "markdown" in question:
        text = (
            "Here is **bold**, *italic* and `inline code`.\n\n"
            "- first item\n- second item\n\n"
            "```python\nprint('hi')\n```\n\n"
            '<script>window.hacked = 1</script> <img src=x onerror="window.hacked = 2">'
        )
        return [("text", line) for line in text.splitlines(keepends=True)]
    if "rich" in question:
        return [("text", line) for line in RICH_REPLY.splitlines(keepends=True)]
    return [("text", word) for word in _spaced(echo_text(question, params.seed))]


def _spaced(text: str) -> list[str]:
    """Split into word tokens that keep their following space, so joining them gives `text` back."""
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]]


def echo_text(question: str, seed: int | None = None) -> str:
    return f"Echo: {question}. This is a fake reply." + ("" if seed is None else f" seed={seed}")


class ByteTokenizer:
    """A tokenizer for the fake backend: token 0 is <|bos|>, token b + 1 is byte b."""

    def get_vocab_size(self) -> int:
        return 257

    def get_bos_token_id(self) -> int:
        return 0

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 1 for i in ids if i > 0).decode(errors="replace")


def fake_logprob(text: str, top_logprobs: int, logprob: float = -0.5) -> TokenLogprob:
    """The fake model's log-prob of a token: `logprob`, with alternatives "alt0", "alt1", ... below it."""
    alternatives = [(text, logprob)] + [(f"alt{i}", logprob - 1 - i) for i in range(top_logprobs)]
    top = tuple(TokenLogprob(t, tuple(t.encode()), lp) for t, lp in alternatives[:top_logprobs])
    return TokenLogprob(text, tuple(text.encode()), logprob, top)


def completion_words(prompt_text: str) -> list[str]:
    """What the fake model appends to a raw prompt."""
    return [f" w{i}" for i in range(6)] + [f" (after {len(prompt_text)} chars)"]


class FakeBackend:
    """Streams `scripted_reply` one token per `delay` seconds, with `slots` concurrent generations and
    `max_queue` waiting ones; beyond that `generate` raises QueueFullError. Keywords in the last user
    message trigger the other paths: "busy" (queue full), "notice" (a notice on the first delta),
    "explode" (an error after two tokens). Records every request and counts cancelled generations.
    Also the raw-text side of the interface: `complete` (appends `completion_words`), `score`, `tokenizer`;
    with params.logprobs every sampled token carries `fake_logprob` (tool outputs carry none)."""

    max_context = 1024
    tokenizer = ByteTokenizer()

    def __init__(
        self,
        slots: int = 64,
        max_queue: int = 0,
        delay: float = 0.002,
        long_delay: float = 0.02,
        model_name: str = "fake-d4",
    ):
        self.slots, self.max_queue, self.delay, self.long_delay = slots, max_queue, delay, long_delay
        self.model_name = model_name
        self.active = 0
        self.waiting = 0
        self.requests: list[tuple[list[dict], SamplingParams]] = []
        self.cancelled = 0
        self.cancel_event = threading.Event()  # set (from the server thread) on every cancellation
        self._slot_free: asyncio.Condition | None = None

    def stats(self) -> dict:
        return {"active": self.active, "queued": self.waiting}

    def generate(self, messages: list[dict], params: SamplingParams):
        question = last_user_text(messages)
        self.requests.append((messages, params))
        tokens = scripted_reply(messages, params)
        delay = self.long_delay if len(tokens) == LONG_WORDS else self.delay
        prompt_tokens = sum(len(str(m["content"]).split()) for m in messages)
        return self._stream(tokens, params, question, delay, prompt_tokens)

    def complete(self, prompt: list[int], params: SamplingParams):
        text = self.tokenizer.decode(prompt)
        self.requests.append((text, params))
        tokens = [("text", word) for word in completion_words(text)]
        return self._stream(tokens, params, text, self.delay, len(prompt))

    async def score(self, prompt: list[int], top_logprobs: int) -> list[TokenLogprob | None]:
        await asyncio.sleep(0)
        return [None] + [fake_logprob(self.tokenizer.decode([t]), top_logprobs, -t / 100) for t in prompt[1:]]

    async def _stream(self, tokens, params: SamplingParams, question: str, delay: float, prompt_tokens: int):
        if "busy" in question or self.active + self.waiting >= self.slots + self.max_queue:
            raise QueueFullError("the fake backend's queue is full", retry_after=2)
        self._slot_free = self._slot_free or asyncio.Condition()
        self.waiting += 1
        holding_slot = False
        try:
            yield Delta()  # accepted: lets the server answer 200 while this request waits for a slot
            async with self._slot_free:
                await self._slot_free.wait_for(lambda: self.active < self.slots)
                self.waiting -= 1
                self.active += 1
                holding_slot = True
            for i, (kind, text) in enumerate(tokens[: params.max_tokens]):
                await asyncio.sleep(delay)
                if i == 2 and "explode" in question:
                    raise RuntimeError("the fake model exploded")
                logprobs = (
                    (fake_logprob(text, params.top_logprobs),)
                    if params.logprobs and kind != "python_output"
                    else ()
                )
                notice = NOTICE if i == 0 and "notice" in question else None
                yield Delta(text=text, kind=kind, notice=notice, logprobs=logprobs)
            finish = "length" if len(tokens) > params.max_tokens else "stop"
            yield Delta(
                finish_reason=finish,
                prompt_tokens=prompt_tokens,
                completion_tokens=min(len(tokens), params.max_tokens),
            )
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            self.cancel_event.set()
            raise
        finally:
            if holding_slot:
                self.active -= 1
                async with self._slot_free:
                    self._slot_free.notify_all()
            else:
                self.waiting -= 1


class ServerThread:
    """A real uvicorn server for `app` on 127.0.0.1 (a free port), run in a daemon thread."""

    def __init__(self, app):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
