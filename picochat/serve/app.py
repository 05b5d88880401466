"""`picochat serve`: the ChatGPT-like web UI at / and an OpenAI-compatible API at /v1.

Endpoints: `POST /v1/chat/completions` (streaming or not, n choices), `GET /v1/models`, `GET /health`,
and the static web UI. The model itself sits behind the `Backend` interface (picochat/serve/backend.py);
this module validates requests (picochat/serve/protocol.py), runs one backend generation per choice,
and makes sure a client that goes away frees its batch slot at once.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from picochat.common import PicochatError, run_cli
from picochat.serve.backend import Backend, Delta, QueueFullError, SamplingParams, ShuttingDownError
from picochat.serve.protocol import (
    ApiError,
    ChatRequest,
    ChoiceBuilder,
    Limits,
    error_body,
    parse_chat_request,
)

STATIC_DIR = Path(__file__).resolve().parent / "static"
log = logging.getLogger("picochat.serve")


class ClientGone(Exception):
    """The HTTP client disconnected before we could answer."""


class Generations:
    """The n backend generations of one request, run concurrently and merged into one event queue.

    Each choice is iterated by its own task ("pump"), so a slow choice never blocks another and any one
    of them can be cancelled (stop sequence matched, client gone) to free its slot in the backend.
    """

    _END = object()

    def __init__(self, backend: Backend, messages: list[dict], params: list[SamplingParams]):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._backlog: list[tuple[int, object]] = []
        self._tasks = [asyncio.create_task(self._pump(i, backend, messages, p)) for i, p in enumerate(params)]

    async def _pump(self, index: int, backend: Backend, messages: list[dict], params: SamplingParams) -> None:
        stream = None
        try:
            stream = backend.generate(messages, params)
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


async def _run_choices(
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


async def _unless_disconnected(request: Request, work: Awaitable):
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


def _usage(builders: list[ChoiceBuilder]) -> dict | None:
    """OpenAI usage from the backend's token counts, or None if it did not report them all."""
    prompt = next((b.prompt_tokens for b in builders if b.prompt_tokens is not None), None)
    completions = [b.completion_tokens for b in builders]
    if prompt is None or None in completions:
        return None
    total = sum(completions)
    return {"prompt_tokens": prompt, "completion_tokens": total, "total_tokens": prompt + total}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def create_app(backend: Backend, api_key: str | None = None, limits: Limits | None = None) -> FastAPI:
    """The FastAPI app serving `backend`. With api_key set, /v1 requires `Authorization: Bearer <key>`."""
    limits = limits or Limits()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if hasattr(backend, "start"):
            await backend.start()
        yield
        if hasattr(backend, "stop"):
            await backend.stop()

    app = FastAPI(title="picochat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    started_at = int(time.time())

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            what = "Wrong API key" if given else "Missing API key"
            raise ApiError(
                f"{what}: send the server's key as 'Authorization: Bearer <key>'.",
                401,
                type="authentication_error",
                code="invalid_api_key",
            )

    async def read_body(request: Request) -> bytes:
        too_big = ApiError(
            f"Request body larger than {limits.max_body_bytes} bytes.", 413, code="body_too_large"
        )
        if int(request.headers.get("content-length") or 0) > limits.max_body_bytes:
            raise too_big
        body = await request.body()
        if len(body) > limits.max_body_bytes:
            raise too_big
        return body

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, "invalid_request_error"), status_code=exc.status_code)

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
        body = error_body(
            f"Server busy: {exc}. Retry in {exc.retry_after} s.", "rate_limit_error", code="queue_full"
        )
        return JSONResponse(body, status_code=429, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(ShuttingDownError)
    async def shutting_down(request: Request, exc: ShuttingDownError) -> JSONResponse:
        body = error_body("The server is shutting down; retry on another instance or later.", "server_error")
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"Internal server error: {exc}", "server_error"), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        stats = backend.stats() if hasattr(backend, "stats") else {}
        return {
            "status": "ok",
            "model": backend.model_name,
            "max_context": backend.max_context,
            "auth_required": api_key is not None,
            **stats,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        model = {"id": backend.model_name, "object": "model", "created": started_at, "owned_by": "picochat"}
        return {"object": "list", "data": [model]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_key(request)
        chat = parse_chat_request(await read_body(request), limits, backend.max_context)
        # Distinct seeds per choice, so n > 1 with a seed gives n different (reproducible) replies.
        seeds = [None if chat.params.seed is None else chat.params.seed + i for i in range(chat.n)]
        gens = Generations(backend, chat.messages, [replace(chat.params, seed=s) for s in seeds])
        builders = [ChoiceBuilder(chat.stop) for _ in range(chat.n)]
        meta = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": backend.model_name,
        }
        streaming = False
        try:
            if chat.stream:
                await _unless_disconnected(request, gens.admit())
                streaming = True  # from here on the response closes the generations when it ends
                return _EventStream(gens, _stream(gens, builders, meta, chat))
            await _unless_disconnected(request, _drain(gens, builders))
            return JSONResponse(_completion(builders, meta))
        except ClientGone:
            return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
        finally:
            if not streaming:
                await gens.close()

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


async def _drain(gens: Generations, builders: list[ChoiceBuilder]) -> None:
    await gens.admit()
    async for _ in _run_choices(gens, builders):
        pass


def _completion(builders: list[ChoiceBuilder], meta: dict) -> dict:
    choices = []
    for i, b in enumerate(builders):
        extension = {"parts": b.parts, "notices": b.notices}
        message = {"role": "assistant", "content": b.content, "picochat": extension}
        choices.append({"index": i, "message": message, "finish_reason": b.finish_reason, "logprobs": None})
    body = {"object": "chat.completion", **meta, "choices": choices}
    usage = _usage(builders)
    if usage is not None:
        body["usage"] = usage
    return body


async def _stream(gens: Generations, builders: list[ChoiceBuilder], meta: dict, chat: ChatRequest):
    """The SSE body: a role chunk per choice, content chunks, a finish chunk per choice, [DONE]."""

    def chunk(index: int, delta: dict, finish_reason: str | None = None) -> str:
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return _sse({"object": "chat.completion.chunk", **meta, "choices": [choice]})

    try:
        for i in range(len(builders)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for index, deltas in _run_choices(gens, builders):
            for delta in deltas:
                yield chunk(index, delta)
            if builders[index].finish_reason:
                yield chunk(index, {}, builders[index].finish_reason)
        usage = _usage(builders)
        if chat.include_usage and usage is not None:
            yield _sse({"object": "chat.completion.chunk", **meta, "choices": [], "usage": usage})
    except Exception as e:  # the status line is sent already: report the failure in-band, as OpenAI does
        log.exception("generation failed mid-stream")
        yield _sse(error_body(f"Generation failed: {e}", "server_error"))
    yield _sse("[DONE]")


class _EventStream(StreamingResponse):
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


# ---------------------------------------------------------------------------------------------
# CLI


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _load_backend(args: argparse.Namespace) -> Backend:
    try:
        from picochat.serve.batching import ContinuousBatchingBackend
    except ModuleNotFoundError as e:
        if e.name != "picochat.serve.batching":
            raise
        raise PicochatError(
            "the generation backend (picochat/serve/batching.py) is not part of this install yet; "
            "update picochat to a version that has it"
        ) from e
    return ContinuousBatchingBackend.from_checkpoint(
        source=args.stage,
        model_tag=args.model_tag,
        step=args.step,
        device_type=args.device_type,
        max_batch_size=args.max_batch_size,
        max_queue=args.max_queue,
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    defaults = Limits()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve a chat model: a ChatGPT-like web UI at / and an OpenAI-compatible API at /v1.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("PICOCHAT_API_KEY"),
        help="require 'Authorization: Bearer <key>' on /v1 (default: $PICOCHAT_API_KEY; none = open)",
    )
    parser.add_argument(
        "-i",
        "--stage",
        default="sft",
        choices=["base", "mid", "sft", "rl"],
        help="which stage's checkpoint to load",
    )
    parser.add_argument(
        "--model-tag", default=None, help="checkpoint model tag, e.g. d4 (default: the deepest d<N>)"
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument(
        "--device-type", default="", choices=["cuda", "cpu", "mps"], help="device (default: autodetect)"
    )
    parser.add_argument("--max-batch-size", type=_positive_int, default=8, help="sequences decoded together")
    parser.add_argument(
        "--max-queue", type=int, default=32, help="requests that may wait for a slot before 429s"
    )
    parser.add_argument(
        "--max-messages", type=_positive_int, default=defaults.max_messages, help="messages per request"
    )
    parser.add_argument(
        "--max-message-chars",
        type=_positive_int,
        default=defaults.max_message_chars,
        help="characters per message",
    )
    parser.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=defaults.max_tokens,
        help="largest max_tokens a request may ask",
    )
    parser.add_argument(
        "--max-n", type=_positive_int, default=defaults.max_n, help="largest n (choices per request)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning"], help="server log level"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise PicochatError(f"--port must be between 0 and 65535, got {args.port}")
    if args.max_queue < 0:
        raise PicochatError(f"--max-queue must be 0 or more, got {args.max_queue}")
    limits = replace(
        defaults,
        max_messages=args.max_messages,
        max_message_chars=args.max_message_chars,
        max_tokens=args.max_tokens,
        default_max_tokens=min(defaults.default_max_tokens, args.max_tokens),
        max_n=args.max_n,
    )
    backend = _load_backend(args)
    app = create_app(backend, api_key=args.api_key or None, limits=limits)
    if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: listening on {args.host} without an API key; anyone who can reach it can use the model"
        )
    print(f"picochat: serving {backend.model_name} at http://{args.host}:{args.port}/ (API: /v1)", flush=True)

    import uvicorn

    # On Ctrl-C, streams still open after 5 s are cancelled, which frees their batch slots.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    run_cli(main)
