"""The OpenAI-compatible API against a real uvicorn server and a fake backend (tests/serve_fakes.py).

Clients: the official `openai` package for the happy paths, raw http.client for malformed requests,
auth, the bounded queue and clients that hang up mid-generation.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from serve_fakes import NOTICE, FakeBackend, ServerThread, echo_text

from picochat.serve import app as serve_app
from picochat.serve.app import create_app
from picochat.serve.backend import ShuttingDownError
from picochat.serve.protocol import Limits

MODEL = "fake-d4"
API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
LIMITS = Limits(max_messages=8, max_message_chars=200, max_tokens=64, default_max_tokens=32, max_n=3)
CALC_CONTENT = (
    "Let me compute. \n```python picochat-tool\n2+3\n```\n\n```text picochat-output\n5\n```\nThe answer is 5."
)


@pytest.fixture(scope="module")
def backend():
    return FakeBackend(slots=4, max_queue=32)  # more clients than slots: some wait in the queue


@pytest.fixture(scope="module")
def server(backend):
    with ServerThread(create_app(backend, api_key=API_KEY, limits=LIMITS)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key=API_KEY, base_url=server.url + "/v1", max_retries=0, timeout=30)


@pytest.fixture()
def small():
    """A server whose fake backend has one slot, no queue and slow tokens."""
    backend = FakeBackend(slots=1, max_queue=0, delay=0.02)
    with ServerThread(create_app(backend)) as running:
        running.backend = backend
        yield running


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def request_params(backend: FakeBackend, question: str):
    """The messages and SamplingParams the backend received for the request asking `question`."""
    found = [(m, p) for m, p in backend.requests if m[-1]["content"] == question]
    assert found, f"the backend never saw {question!r}"
    return found[-1]


def raw_post(url: str, body: bytes | dict, headers: dict | None = None, path: str = "/v1/chat/completions"):
    """POST with http.client; return (status, headers, parsed JSON body)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    status, response_headers, payload = response.status, response.headers, response.read()
    conn.close()
    return status, response_headers, json.loads(payload)


def assert_openai_error(payload: dict, param: str | None = None) -> None:
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    if param is not None:
        assert error["param"] == param, error


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


# ---------------------------------------------------------------------------------------------
# Happy paths with the official client


def test_plain_completion(client, backend):
    reply = client.chat.completions.create(model=MODEL, messages=user("hello"))
    assert reply.object == "chat.completion" and reply.model == "fake-d4"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == echo_text("hello")
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 7 and reply.usage.prompt_tokens == 1
    messages, params = request_params(backend, "hello")
    assert messages == [{"role": "user", "content": "hello"}]
    assert params.max_tokens == LIMITS.default_max_tokens and params.seed is None


def test_sampling_params_reach_the_backend(client, backend):
    client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, *user("params please")],
        temperature=0.3,
        top_p=0.9,
        max_completion_tokens=40,
        seed=11,
        extra_body={"top_k": 5},
    )
    messages, params = request_params(backend, "params please")
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens, params.seed) == (
        0.3,
        0.9,
        5,
        40,
        11,
    )


def test_streaming_reassembles_the_reply(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=user("stream me"), stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == echo_text("stream me")
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_n_choices_get_distinct_seeds(client):
    reply = client.chat.completions.create(model=MODEL, messages=user("twice"), n=2, seed=7)
    assert [c.index for c in reply.choices] == [0, 1]
    assert [c.message.content for c in reply.choices] == [echo_text("twice", 7), echo_text("twice", 8)]
    streamed = {0: "", 1: ""}
    for chunk in client.chat.completions.create(
        model=MODEL, messages=user("twice"), n=2, seed=7, stream=True
    ):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == {0: echo_text("twice", 7), 1: echo_text("twice", 8)}


def test_max_tokens_gives_length(client):
    reply = client.chat.completions.create(model=MODEL, messages=user("cut short"), max_tokens=3)
    assert reply.choices[0].message.content == "Echo: cut short. "
    assert reply.choices[0].finish_reason == "length"


def test_stop_sequence_spanning_tokens(client):
    # "ake rep" starts in the token "fake " and ends in "reply.": the server must hold text back.
    reply = client.chat.completions.create(model=MODEL, messages=user("hello"), stop=["ake rep", "zzz"])
    assert reply.choices[0].message.content == "Echo: hello. This is a f"
    assert reply.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=MODEL, messages=user("hello"), stop="ake rep", stream=True)
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Echo: hello. This is a f"
    )


def test_tool_calls_are_readable_text_and_tagged_parts(client, backend):
    reply = client.chat.completions.create(model=MODEL, messages=user("calc 2+3"))
    message = reply.choices[0].message
    assert message.content == CALC_CONTENT
    assert message.model_extra["picochat"]["parts"] == [
        {"type": "text", "text": "Let me compute. "},
        {"type": "python", "text": "2+3"},
        {"type": "python_output", "text": "5"},
        {"type": "text", "text": "The answer is 5."},
    ]
    kinds = []
    for chunk in client.chat.completions.create(model=MODEL, messages=user("calc 2+3"), stream=True):
        extension = chunk.choices[0].delta.model_extra.get("picochat") if chunk.choices else None
        if extension and extension["text"]:
            kinds.append((extension["kind"], extension["text"]))
    assert kinds == [
        ("text", "Let me compute. "),
        ("python", "2+"),
        ("python", "3"),
        ("python_output", "5"),
    ] + [
        ("text", "The answer is "),
        ("text", "5."),
    ]
    # A plain client sends the reply back as history: the fences become tool parts again.
    history = [*user("calc 2+3"), {"role": "assistant", "content": CALC_CONTENT}, *user("and again")]
    client.chat.completions.create(model=MODEL, messages=history)
    messages, _ = request_params(backend, "and again")
    assert messages[1]["content"] == message.model_extra["picochat"]["parts"]


def test_notices_reach_the_client(client):
    reply = client.chat.completions.create(model=MODEL, messages=user("notice this"))
    assert reply.choices[0].message.model_extra["picochat"]["notices"] == [NOTICE]
    assert reply.choices[0].message.content == echo_text("notice this")
    stream = client.chat.completions.create(model=MODEL, messages=user("notice this"), stream=True)
    extensions = [c.choices[0].delta.model_extra.get("picochat") or {} for c in stream if c.choices]
    assert [e["notice"] for e in extensions if "notice" in e] == [NOTICE]


def test_backend_failure_is_an_error_not_a_hang(client, server):
    with pytest.raises(openai.APIError, match="exploded"):
        for _ in client.chat.completions.create(model=MODEL, messages=user("explode"), stream=True):
            pass
    status, _, payload = raw_post(server.url, {"messages": user("explode")}, AUTH)
    assert status == 500
    assert_openai_error(payload)
    assert payload["error"]["type"] == "server_error"


def test_shutting_down_backend_gives_503():
    class ShuttingDown(FakeBackend):
        def generate(self, messages, params):  # refuses when called, before any iteration
            raise ShuttingDownError()

    with ServerThread(create_app(ShuttingDown())) as running:
        status, headers, payload = raw_post(running.url, {"messages": user("hi"), "stream": True})
    assert status == 503 and headers["Retry-After"]
    assert_openai_error(payload)


def test_list_content_is_accepted(server, backend):
    parts = [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]
    status, _, payload = raw_post(server.url, {"messages": [{"role": "user", "content": parts}]}, AUTH)
    assert status == 200, payload
    assert payload["choices"][0]["message"]["content"] == echo_text("part one\npart two")


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["fake-d4"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/health")
    response = conn.getresponse()
    health = json.loads(response.read())
    assert response.status == 200
    assert health["status"] == "ok" and health["model"] == "fake-d4" and health["auth_required"] is True
    assert health["max_context"] == 1024 and "active" in health and "queued" in health


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b"\xff\xfe", None),
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": [{"role": "user", "content": "x" * 201}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "hi"}] * 9}, "messages"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            "messages[1].role",
        ),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
            "messages[1].role",
        ),
        ({"messages": user("hi"), "max_tokens": 0}, "max_tokens"),
        ({"messages": user("hi"), "max_tokens": 65}, "max_tokens"),
        ({"messages": user("hi"), "max_tokens": "5"}, "max_tokens"),
        ({"messages": user("hi"), "temperature": 2.5}, "temperature"),
        ({"messages": user("hi"), "temperature": -0.1}, "temperature"),
        ({"messages": user("hi"), "top_p": 0}, "top_p"),
        ({"messages": user("hi"), "top_k": -1}, "top_k"),
        ({"messages": user("hi"), "n": 4}, "n"),
        ({"messages": user("hi"), "stream": "yes"}, "stream"),
        ({"messages": user("hi"), "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
def test_bad_requests_get_openai_errors(server, backend, body, param):
    seen = len(backend.requests)
    status, _, payload = raw_post(server.url, body, AUTH)
    assert status == 400, payload
    assert_openai_error(payload, param)
    assert payload["error"]["type"] == "invalid_request_error"
    assert len(backend.requests) == seen  # rejected before reaching the model


def test_unknown_routes_are_json(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for method, path, status in [
        ("GET", "/v1/nope", 404),
        ("POST", "/health", 405),
        ("GET", "/static/x.js", 404),
    ]:
        conn.request(method, path)
        response = conn.getresponse()
        assert response.status == status
        assert_openai_error(json.loads(response.read()))


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key-but-no-bearer"}]
)
def test_api_key_required(server, headers):
    status, _, payload = raw_post(server.url, {"messages": user("hi")}, headers)
    assert status == 401
    assert_openai_error(payload)
    assert payload["error"]["code"] == "invalid_api_key"


def test_wrong_key_with_official_client(server):
    bad = openai.OpenAI(api_key="nope", base_url=server.url + "/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ---------------------------------------------------------------------------------------------
# Capacity, cancellation and concurrency


def open_stream(port: int, question: str, stream: bool = True) -> tuple[http.client.HTTPConnection, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"messages": user(question), "stream": stream, "max_tokens": 1024})
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    return conn, conn.getresponse() if stream else None


def test_queue_full_gives_429_then_recovers(small):
    conn, response = open_stream(small.port, "long story")
    assert response.status == 200
    response.fp.readline()  # the first event: the slot is taken
    status, headers, payload = raw_post(small.url, {"messages": user("me too")})
    assert status == 429 and headers["Retry-After"] == "2"
    assert_openai_error(payload)
    assert payload["error"]["type"] == "rate_limit_error"
    conn.close()
    assert wait_until(lambda: small.backend.active == 0), "the disconnected stream kept its slot"
    status, _, payload = raw_post(small.url, {"messages": user("me too")})
    assert status == 200 and payload["choices"][0]["message"]["content"] == echo_text("me too")


def test_client_disconnect_mid_stream_cancels_generation(small):
    conn, response = open_stream(small.port, "long story")
    received = b""
    while received.count(b"word") < 3:
        received += response.fp.readline()
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert small.backend.cancel_event.wait(5), "the backend generator was not cancelled"
    assert wait_until(lambda: small.backend.active == 0)
    assert small.backend.cancelled == 1


def test_client_disconnect_while_waiting_for_a_full_reply_cancels_it(small):
    conn, _ = open_stream(small.port, "long story", stream=False)
    assert wait_until(lambda: small.backend.active == 1)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert small.backend.cancel_event.wait(5), "the backend generator was not cancelled"
    assert wait_until(lambda: small.backend.active == 0)


def test_sixteen_concurrent_streams(client):
    def chat(i: int) -> str:
        stream = client.chat.completions.create(model=MODEL, messages=user(f"client {i}"), stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(chat, range(16)))
    assert replies == [echo_text(f"client {i}") for i in range(16)]


# ---------------------------------------------------------------------------------------------
# The CLI


def test_main_builds_backend_and_runs_uvicorn(monkeypatch):
    calls = {}

    class Loader:
        @staticmethod
        def from_checkpoint(**kwargs):
            calls["backend"] = kwargs
            return FakeBackend()

    monkeypatch.setitem(
        sys.modules, "picochat.serve.batching", types.SimpleNamespace(ContinuousBatchingBackend=Loader)
    )
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: calls.update(app=app, uvicorn=kwargs))
    monkeypatch.setenv("PICOCHAT_API_KEY", "from-env")
    argv = [
        "-i",
        "mid",
        "--model-tag",
        "d4",
        "--step",
        "5",
        "--max-batch-size",
        "4",
        "--max-queue",
        "2",
        "--port",
        "9",
        "--bf16-head",
    ]
    assert serve_app.main(argv) == 0
    assert calls["backend"] == {
        "source": "mid",
        "model_tag": "d4",
        "step": 5,
        "device_type": "",
        "max_batch_size": 4,
        "max_queue": 2,
        "bf16_head": True,
    }
    assert calls["uvicorn"]["host"] == "127.0.0.1" and calls["uvicorn"]["port"] == 9
    with ServerThread(calls["app"]) as running:  # the env key protects the app main built
        status, _, _ = raw_post(running.url, {"messages": user("hi")})
        assert status == 401


def test_a_failing_request_ends_only_itself(client):
    """Issue 12: an attacker whose generation fails gets its error; a victim streaming beside it goes on."""

    def victim() -> str:
        stream = client.chat.completions.create(model=MODEL, messages=user("long victim"), stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    def attacker() -> str:
        try:
            for _ in client.chat.completions.create(model=MODEL, messages=user("explode"), stream=True):
                pass
        except openai.APIError as e:
            return str(e)
        return "no error"

    with ThreadPoolExecutor(4) as pool:
        victims = [pool.submit(victim) for _ in range(2)]
        attackers = [pool.submit(attacker) for _ in range(2)]
        assert all("exploded" in a.result() for a in attackers)
        whole = "".join(f"word{i} " for i in range(LIMITS.default_max_tokens))  # the reply cut at max_tokens
        assert [v.result() for v in victims] == [whole, whole]
