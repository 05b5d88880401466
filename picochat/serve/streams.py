"""How the server drives backend generations: n choices of one request run concurrently, merged into
one event stream, cancelled (freeing their batch slots) when the client goes away or a choice ends.

Shared by the chat-completions and legacy completions endpoints of `picochat.serve.app`: `respond` answers
with one JSON body or an SSE stream, in the endpoint's format (`ChatFormat`, `TextFormat`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from picochat.serve.backend import Delta
from picochat.serve.completions import CompletionRequest, legacy_logprobs
from picochat.serve.protocol import ChatRequest, ChoiceBuilder, SamplingRequest, chat_logprobs, error_body

log = logging.getLogger("picochat.serve")


class ClientGone(Exception):
    """The HTTP client disconnected before we could answer."""


class Generations:
    """The n backend generations of one request, run concurrently and merged into one event queue.

    Each choice is iterated by its own task ("pump"), so a slow choice never blocks another and any one
    of them can be cancelled (stop sequence matched, client gone) to free its slot in the backend.
    """

    _END = object()

    def __init__(self, starts: list[Callable[[], AsyncIterator[Delta]]]):
        """`starts[i]()` begins choice i (e.g. `lambda: backend.generate(messages, params)`)."""
        self._queue: asyncio.Queue = asyncio.Queue()
        self._backlog: list[tuple[int, object]] = []
        self._tasks = [asyncio.create_task(self._pump(i, start)) for i, start in enumerate(starts)]

    async def _pump(self, index: int, start: Callable[[], AsyncIterator[Delta]]) -> None:
        stream = None
        try:
            stream = start()
            async for delta in stream:
                self._queue.put_nowait((index, delta))
                if delta.finish_reason:
                    break
            self._queue.put_nowait((index, self._END))
        except Exception as e:  # QueueFullError on admission, or a backend failure: re-raised by next()
            self._queue.put_nowait((index, e))
        finally:
            if stream is not None and hasattr(stream, "aclose"):
                await stream.aclose()  # no-op if the generator already ended or was cancelled

    async def admit(self) -> None:
        """Wait until every choice has its first delta; raise (e.g. QueueFullError) if one was refused."""
        started: set[int] = set()
        while len(started) < len(self._tasks):
            index, item = await self._queue.get()
            if isinstance(item, Exception):
                raise item
            self._backlog.append((index, item))
            started.add(index)

    async def next(self) -> tuple[int, Delta | None]:
        """The next (choice index, delta); delta None means that choice's generator ended."""
        index, item = self._backlog.pop(0) if self._backlog else await self._queue.get()
        if isinstance(item, Exception):
            raise item
        return index, (None if item is self._END else item)

    def cancel(self, index: int) -> None:
        self._tasks[index].cancel()

    async def close(self) -> None:
        """Cancel every generation still running and wait until the backend has seen it."""
        for task in self._tasks:
            task.cancel()
        with anyio.CancelScope(shield=True):  # we may be inside a cancelled scope (client gone)
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def run_choices(
    gens: Generations, builders: list[ChoiceBuilder]
) -> AsyncIterator[tuple[int, list[dict]]]:
    """Drive all choices to their end, yielding (index, chunk deltas) as the backend produces them."""
    unfinished = set(range(len(builders)))
    while unfinished:
        index, delta = await gens.next()
        if index not in unfinished:
            continue  # a choice we already ended on a stop sequence
        builder = builders[index]
        yield index, builder.feed(delta or Delta(finish_reason="stop"))
        if builder.finish_reason:
            unfinished.discard(index)
            gens.cancel(index)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable):
    """Await `work`, but give up (cancelling it) and raise ClientGone if the client disconnects first."""
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        task.cancel()
    if task not in done:
        raise ClientGone()
    return task.result()


def usage(builders: list[ChoiceBuilder]) -> dict | None:
    """OpenAI usage from the backend's token counts, or None if it did not report them all."""
    prompt = next((b.prompt_tokens for b in builders if b.prompt_tokens is not None), None)
    completions = [b.completion_tokens for b in builders]
    if prompt is None or None in completions:
        return None
    total = sum(completions)
    return {"prompt_tokens": prompt, "completion_tokens": total, "total_tokens": prompt + total}


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


class EventStream(StreamingResponse):
    """An SSE response that closes its generations however it ends: done, failed or client gone.

    (Starlette cancels the body iterator when the client disconnects, possibly before its first step,
    so a `finally` inside the iterator alone would not always run.)
    """

    def __init__(self, gens: Generations, body: AsyncIterator[str]):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self._gens = gens

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._gens.close()


async def respond(request: Request, req: SamplingRequest, gens: Generations, meta: dict, fmt) -> Response:
    """Run the generations; answer with an SSE stream or one JSON body, in `fmt`'s format."""
    builders = [ChoiceBuilder(req.stop) for _ in range(fmt.choices)]
    streaming = False
    try:
        if req.stream:
            await unless_disconnected(request, gens.admit())
            streaming = True  # from here on the response closes the generations when it ends
            return EventStream(gens, _stream(gens, builders, meta, req, fmt))
        await unless_disconnected(request, _drain(gens, builders))
        body = {"object": fmt.object, **meta, "choices": [fmt.whole(i, b) for i, b in enumerate(builders)]}
        total = usage(builders)
        if total is not None:
            body["usage"] = total
        return JSONResponse(body)
    except ClientGone:
        return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
    finally:
        if not streaming:
            await gens.close()


async def _drain(gens: Generations, builders: list[ChoiceBuilder]) -> None:
    await gens.admit()
    async for _ in run_choices(gens, builders):
        pass


async def _stream(gens: Generations, builders: list[ChoiceBuilder], meta: dict, req: SamplingRequest, fmt):
    """The SSE body: an opening chunk per choice, content chunks, a finish chunk per choice, [DONE]."""

    # Every chunk is {"object": ..., **meta, "choices": [choice]}: its JSON up to the choice is encoded
    # once per stream, so each token costs one small json.dumps (the bytes are the same).
    head = json.dumps({"object": fmt.chunk_object, **meta, "choices": []})[: -len("]}")]

    def chunk(choice: dict) -> str:
        return f"data: {head}{json.dumps(choice)}]}}\n\n"

    try:
        for i in range(len(builders)):
            yield chunk(fmt.opening(i))
        async for index, deltas in run_choices(gens, builders):
            builder = builders[index]
            for delta in deltas:
                yield chunk(fmt.piece(index, delta, builder.take_logprobs(), builder))
            if builder.finish_reason:
                yield chunk(fmt.finish(index, builder))
        total = usage(builders)
        if req.include_usage and total is not None:
            yield sse({"object": fmt.chunk_object, **meta, "choices": [], "usage": total})
    except Exception as e:  # the status line is sent already: report the failure in-band, as OpenAI does
        log.exception("generation failed mid-stream")
        yield sse(error_body(f"Generation failed: {e}", "server_error"))
    yield sse("[DONE]")


class ChatFormat:
    """Chat completions: `message` / `delta` objects with the picochat tool-call extension."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, req: ChatRequest):
        self.choices, self.logprobs = req.n, req.params.logprobs

    def whole(self, i: int, b: ChoiceBuilder) -> dict:
        extension = {"parts": b.parts, "notices": b.notices}
        message = {"role": "assistant", "content": b.content, "picochat": extension}
        logprobs = chat_logprobs(b.logprobs) if self.logprobs else None
        return {"index": i, "message": message, "finish_reason": b.finish_reason, "logprobs": logprobs}

    def opening(self, i: int) -> dict:
        return {
            "index": i,
            "delta": {"role": "assistant", "content": ""},
            "finish_reason": None,
            "logprobs": None,
        }

    def piece(self, i: int, delta: dict, logprobs: list, b: ChoiceBuilder) -> dict:
        chunk_logprobs = chat_logprobs(logprobs) if self.logprobs else None
        return {"index": i, "delta": delta, "finish_reason": None, "logprobs": chunk_logprobs}

    def finish(self, i: int, b: ChoiceBuilder) -> dict:
        return {"index": i, "delta": {}, "finish_reason": b.finish_reason, "logprobs": None}


class TextFormat:
    """Legacy completions: `text` choices, the echoed prompt first, logprobs in the legacy shape."""

    object = chunk_object = "text_completion"

    def __init__(self, req: CompletionRequest, echo: list[tuple[str, list]], prompts: int):
        self.choices, self.echo, self.logprobs = prompts * req.n, echo, req.logprobs is not None

    def _echo(self, i: int) -> tuple[str, list]:
        return self.echo[i] if self.echo else ("", [])

    def whole(self, i: int, b: ChoiceBuilder) -> dict:
        text, scores = self._echo(i)
        logprobs = legacy_logprobs([*scores, *b.logprobs]) if self.logprobs else None
        return {"index": i, "text": text + b.content, "logprobs": logprobs, "finish_reason": b.finish_reason}

    def opening(self, i: int) -> dict:
        text, scores = self._echo(i)
        return {
            "index": i,
            "text": text,
            "logprobs": legacy_logprobs(scores) if self.logprobs else None,
            "finish_reason": None,
        }

    def piece(self, i: int, delta: dict, logprobs: list, b: ChoiceBuilder) -> dict:
        offset = len(self._echo(i)[0]) + len(b.content) - len(delta["content"])
        lp = legacy_logprobs(logprobs, offset) if self.logprobs else None
        return {"index": i, "text": delta["content"], "logprobs": lp, "finish_reason": None}

    def finish(self, i: int, b: ChoiceBuilder) -> dict:
        return {"index": i, "text": "", "logprobs": None, "finish_reason": b.finish_reason}
