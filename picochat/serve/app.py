"""`picochat serve`: the ChatGPT-like web UI at / and an OpenAI-compatible API at /v1.

Endpoints: `POST /v1/chat/completions` and the legacy `POST /v1/completions` (streaming or not, n choices,
logprobs), `GET /v1/models` and `/v1/models/{id}`, `GET /health`, and the static web UI. Several models
can be served at once (one backend each, chosen by the request's `model`; the first is the default).
Each model sits behind the `Backend` interface (picochat/serve/backend.py); this module validates
requests (picochat/serve/protocol.py, completions.py), runs one backend generation per choice
(picochat/serve/streams.py), and checks callers (picochat/serve/guard.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from picochat.checkpoint import STAGES
from picochat.common import BF16_HEAD_HELP, PicochatError, run_cli
from picochat.serve.backend import Backend, QueueFullError, SamplingParams, ShuttingDownError
from picochat.serve.completions import (
    check_fits,
    parse_completion_request,
    prompt_ids,
)
from picochat.serve.guard import HostGuard, check_api_key, read_body
from picochat.serve.protocol import (
    ApiError,
    ChoiceBuilder,
    Limits,
    check_token_ids,
    error_body,
    load_json_object,
    parse_chat_request,
)
from picochat.serve.streams import (
    ChatFormat,
    Generations,
    TextFormat,
    respond,
)

STATIC_DIR = Path(__file__).resolve().parent / "static"
log = logging.getLogger("picochat.serve")


def create_app(
    backends: Backend | Sequence[Backend],
    api_key: str | None = None,
    limits: Limits | None = None,
    *,
    allowed_hosts: Sequence[str] = (),
    cors_origins: Sequence[str] = (),
) -> FastAPI:
    """The FastAPI app serving `backends` (the first is the default model). With api_key set, /v1 requires
    `Authorization: Bearer <key>`. `allowed_hosts`/`cors_origins`: see picochat/serve/guard.py."""
    limits = limits or Limits()
    served = [backends] if hasattr(backends, "model_name") else list(backends)
    by_name = {b.model_name: b for b in served}
    if len(by_name) != len(served):
        raise PicochatError("two served models have the same name; serve each checkpoint once")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for backend in served:
            if hasattr(backend, "start"):
                await backend.start()
        yield
        for backend in served:
            if hasattr(backend, "stop"):
                await backend.stop()

    app = FastAPI(title="picochat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(HostGuard, allowed_hosts=allowed_hosts, cors_origins=cors_origins)
    if cors_origins:  # added last, so it runs first and answers preflights itself
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
    started_at = int(time.time())

    def model_card(backend: Backend) -> dict:
        return {"id": backend.model_name, "object": "model", "created": started_at, "owned_by": "picochat"}

    def pick(name: str | None) -> Backend:
        if name is None:
            return served[0]
        if name not in by_name:
            raise ApiError(
                f"The model {name!r} does not exist; this server has {', '.join(by_name)} (GET /v1/models).",
                404,
                param="model",
                code="model_not_found",
            )
        return by_name[name]

    async def request_body(request: Request) -> tuple[dict, Backend]:
        check_api_key(request, api_key)
        body = load_json_object(await read_body(request, limits.max_body_bytes))
        model = body.get("model")
        return body, pick(model if isinstance(model, str) and model else None)

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
        default = served[0]
        stats = default.stats() if hasattr(default, "stats") else {}
        return {
            "status": "ok",
            "model": default.model_name,
            "max_context": default.max_context,
            "models": [{"id": b.model_name, "max_context": b.max_context} for b in served],
            "auth_required": api_key is not None,
            **stats,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_api_key(request, api_key)
        return {"object": "list", "data": [model_card(b) for b in served]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict:
        check_api_key(request, api_key)
        return model_card(pick(model_id))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body, backend = await request_body(request)
        chat = parse_chat_request(body, limits, backend.max_context)
        _check_bias(chat.params, backend)
        starts = [lambda p=p: backend.generate(chat.messages, p) for p in _choice_params(chat.params, chat.n)]
        meta = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": backend.model_name,
        }
        return await respond(request, chat, Generations(starts), meta, ChatFormat(chat))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body, backend = await request_body(request)
        req = parse_completion_request(body, limits, backend.max_context)
        _check_bias(req.params, backend)
        tokenizer = backend.tokenizer
        bos = tokenizer.get_bos_token_id()
        # Tokenizing up to a 2 MB body is real work: keep it off the event loop.
        prompts = await asyncio.to_thread(lambda: [prompt_ids(p, tokenizer, bos) for p in req.prompts])
        for ids in prompts:
            check_fits(ids, req.params.max_tokens, backend.max_context)
        echoed: list[tuple[str, list]] = []
        if req.echo:  # the prompt's own text and (with logprobs) each token's log-prob, <|bos|> left out
            for ids in prompts:
                scores = (await backend.score(ids, req.logprobs or 0))[1:] if req.logprobs is not None else []
                echoed.append((tokenizer.decode(ids[1:]), scores))
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": backend.model_name}
        echo = [echoed[i // req.n] for i in range(len(prompts) * req.n)] if req.echo else []
        fmt = TextFormat(req, echo, len(prompts))
        if req.params.max_tokens == 0:  # scoring only (echo): nothing to generate
            choices = [fmt.whole(i, ChoiceBuilder()) for i in range(fmt.choices)]
            for choice in choices:
                choice["finish_reason"] = "length"
            prompt_tokens = sum(len(ids) for ids in prompts)
            counts = {"prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}
            return JSONResponse({"object": fmt.object, **meta, "choices": choices, "usage": counts})
        params = _choice_params(req.params, req.n)
        starts = [lambda ids=ids, p=p: backend.complete(ids, p) for ids in prompts for p in params]
        return await respond(request, req, Generations(starts), meta, fmt)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _check_bias(params: SamplingParams, backend: Backend) -> None:
    if params.logit_bias:  # (only then is the tokenizer needed)
        check_token_ids(params, backend.tokenizer.get_vocab_size())


def _choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """Distinct seeds per choice, so n > 1 with a seed gives n different (reproducible) replies."""
    return [replace(params, seed=None if params.seed is None else params.seed + i) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# CLI


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _model_spec(text: str) -> tuple[str, str | None]:
    stage, _, tag = text.partition(":")
    if stage not in STAGES or (":" in text and not tag):
        raise argparse.ArgumentTypeError(
            f"expected STAGE[:TAG] with STAGE one of {', '.join(STAGES)}, got {text!r}"
        )
    return stage, tag or None


def _own_names(host: str) -> list[str]:
    """Listening on every interface: this machine's own names are expected in Host headers too."""
    if host not in ("0.0.0.0", "::", ""):
        return []
    return [socket.gethostname(), socket.getfqdn()]


def _load_backends(args: argparse.Namespace) -> list[Backend]:
    from picochat.chat import default_stage  # (imports torch: only when serving a real model)
    from picochat.serve.batching import ContinuousBatchingBackend

    if args.model:
        if args.stage or args.model_tag or args.step is not None:
            raise PicochatError("--model replaces -i/--stage, --model-tag and --step; use one or the other")
        specs = [(stage, tag, None) for stage, tag in args.model]
    else:
        stage = args.stage or default_stage()
        if args.stage is None:
            print(f"picochat: serving the {stage} model (the newest trained stage; -i chooses another)")
        specs = [(stage, args.model_tag, args.step)]
    return [
        ContinuousBatchingBackend.from_checkpoint(
            source=stage,
            model_tag=tag,
            step=step,
            device_type=args.device_type,
            max_batch_size=args.max_batch_size,
            max_queue=args.max_queue,
            bf16_head=args.bf16_head,
        )
        for stage, tag, step in specs
    ]


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
        default=None,
        help="require 'Authorization: Bearer <key>' on /v1. Prefer the PICOCHAT_API_KEY environment "
        "variable (the default): a key given here is visible to every user of the machine in `ps`",
    )
    parser.add_argument(
        "--model",
        action="append",
        type=_model_spec,
        metavar="STAGE[:TAG]",
        help="serve this checkpoint (e.g. sft:d4); repeat to serve several, chosen by the request's model "
        "(GET /v1/models lists them; the first is the default)",
    )
    parser.add_argument(
        "-i",
        "--stage",
        default=None,
        choices=STAGES,
        help="serve one stage's checkpoint (default: the newest trained, rl > sft > mid > base)",
    )
    parser.add_argument(
        "--model-tag", default=None, help="checkpoint model tag, e.g. d4 (default: the deepest d<N>)"
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests for this host name (IP addresses and localhost always work; names are "
        "refused by default against DNS rebinding; '*' allows any)",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let web pages from this origin (e.g. http://localhost:3000 for Open WebUI) call the API "
        "from the browser; repeatable, '*' for any. Without it, no CORS headers are sent",
    )
    parser.add_argument(
        "--device-type", default="", choices=["cuda", "cpu", "mps"], help="device (default: autodetect)"
    )
    parser.add_argument("--bf16-head", action="store_true", help=BF16_HEAD_HELP)
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
    api_key = args.api_key or os.environ.get("PICOCHAT_API_KEY") or None
    backends = _load_backends(args)
    app = create_app(
        backends,
        api_key=api_key,
        limits=limits,
        allowed_hosts=[args.host, *args.allow_host, *_own_names(args.host)],
        cors_origins=args.cors_origin,
    )
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: listening on {args.host} without an API key; anyone who can reach it can use the model"
        )
    names = ", ".join(b.model_name for b in backends)
    print(f"picochat: serving {names} at http://{args.host}:{args.port}/ (API: /v1)", flush=True)

    import uvicorn

    # On Ctrl-C, streams still open after 5 s are cancelled, which frees their batch slots.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    run_cli(main)
