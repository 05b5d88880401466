"""Test helpers for the server: a scripted fake `Backend` and a real uvicorn server in a thread.

Shared by tests/test_serve_api.py and tests/test_webui.py (not a test module itself).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn

from picochat.serve.backend import Delta, QueueFullError, SamplingParams

LONG_WORDS = 400
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
    return [("text", word) for word in _spaced(echo_text(question, params.seed))]


def _spaced(text: str) -> list[str]:
    """Split into word tokens that keep their following space, so joining them gives `text` back."""
    words = text.split(" ")
    return [w + " " for w in words[:-1]] + [words[-1]]


def echo_text(question: str, seed: int | None = None) -> str:
    return f"Echo: {question}. This is a fake reply." + ("" if seed is None else f" seed={seed}")


class FakeBackend:
    """Streams `scripted_reply` one token per `delay` seconds, with `slots` concurrent generations and
    `max_queue` waiting ones; beyond that `generate` raises QueueFullError. Keywords in the last user
    message trigger the other paths: "busy" (queue full), "notice" (a notice on the first delta),
    "explode" (an error after two tokens). Records every request and counts cancelled generations."""

    model_name = "fake-d4"
    max_context = 1024

    def __init__(self, slots: int = 64, max_queue: int = 0, delay: float = 0.002, long_delay: float = 0.02):
        self.slots, self.max_queue, self.delay, self.long_delay = slots, max_queue, delay, long_delay
        self.active = 0
        self.waiting = 0
        self.requests: list[tuple[list[dict], SamplingParams]] = []
        self.cancelled = 0
        self.cancel_event = threading.Event()  # set (from the server thread) on every cancellation
        self._slot_free: asyncio.Condition | None = None

    def stats(self) -> dict:
        return {"active": self.active, "queued": self.waiting}

    async def generate(self, messages: list[dict], params: SamplingParams):
        question = last_user_text(messages)
        if "busy" in question or self.active + self.waiting >= self.slots + self.max_queue:
            raise QueueFullError("the fake backend's queue is full", retry_after=2)
        self.requests.append((messages, params))
        self._slot_free = self._slot_free or asyncio.Condition()
        tokens = scripted_reply(messages, params)
        delay = self.long_delay if len(tokens) == LONG_WORDS else self.delay
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
                yield Delta(text=text, kind=kind, notice=NOTICE if i == 0 and "notice" in question else None)
            finish = "length" if len(tokens) > params.max_tokens else "stop"
            prompt_tokens = sum(len(str(m["content"]).split()) for m in messages)
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
