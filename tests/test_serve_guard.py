"""Server hardening (issue 12 item 4): request bodies counted while they stream in, Host/Origin checks
against DNS rebinding and cross-site requests, CORS only with --cors-origin, the Bearer scheme in any case,
the API key from $PICOCHAT_API_KEY. Raw sockets and http.client against a real uvicorn server."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest
from serve_fakes import FakeBackend, ServerThread

from picochat.serve import app as serve_app
from picochat.serve.app import create_app
from picochat.serve.protocol import Limits

BODY = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})


@pytest.fixture(scope="module")
def server():
    app = create_app(
        FakeBackend(),
        api_key="k",
        limits=Limits(max_body_bytes=10_000),
        allowed_hosts=["picochat.lan"],
        cors_origins=["http://localhost:3000"],
    )
    with ServerThread(app) as running:
        yield running


@pytest.fixture(scope="module")
def closed():
    """A server without --cors-origin."""
    with ServerThread(create_app(FakeBackend())) as running:
        yield running


def request(port: int, method: str, path: str, headers: dict, body: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for key, value in headers.items():
        conn.putheader(key, value)
    if body is not None:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body.encode() if body is not None else None)
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, response.headers, payload


def post(port: int, headers: dict, auth: str = "Bearer k"):
    base = {"Host": f"127.0.0.1:{port}", "Content-Type": "application/json", "Authorization": auth}
    return request(port, "POST", "/v1/chat/completions", {**base, **headers}, BODY)


@pytest.mark.parametrize("auth", ["Bearer k", "bearer k", "BEARER   k", "BeArEr k "])
def test_bearer_scheme_is_case_insensitive(server, auth):
    assert post(server.port, {}, auth)[0] == 200


@pytest.mark.parametrize("auth", ["Basic k", "k", "Bearer", "Bearerk", "Bearer K"])
def test_other_authorizations_are_refused(server, auth):
    status, _, payload = post(server.port, {}, auth)
    assert status == 401 and json.loads(payload)["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "host",
    ["localhost:{port}", "127.0.0.1:{port}", "[::1]:{port}", "app.localhost", "PicoChat.LAN.", "10.1.2.3"],
)
def test_known_hosts_are_served(server, host):
    assert post(server.port, {"Host": host.format(port=server.port)})[0] == 200


@pytest.mark.parametrize(
    "host", ["evil.example:{port}", "localhost.evil.example", "picochat.lan.evil.example"]
)
def test_unknown_host_names_are_refused(server, host):
    """DNS rebinding: the attacker's own name, resolved to 127.0.0.1, reaches the server with its Host."""
    for method, path in [("POST", "/v1/chat/completions"), ("GET", "/"), ("GET", "/health")]:
        headers = {"Host": host.format(port=server.port), "Authorization": "Bearer k"}
        status, _, payload = request(server.port, method, path, headers, BODY if method == "POST" else None)
        assert status == 403
        assert "--allow-host" in json.loads(payload)["error"]["message"]


def test_cross_site_origins_are_refused(server, closed):
    for running in (server, closed):
        status, _, payload = post(running.port, {"Origin": "http://evil.example"}, "Bearer k")
        assert status == 403 and "--cors-origin" in json.loads(payload)["error"]["message"]
        assert post(running.port, {"Origin": "null"})[0] == 403  # sandboxed iframes, file:// pages
    # The web UI itself (same origin) and the configured front end are served.
    assert post(server.port, {"Origin": f"http://127.0.0.1:{server.port}"})[0] == 200
    assert post(closed.port, {"Origin": f"http://127.0.0.1:{closed.port}"}, "")[0] == 200


def test_cors_only_with_cors_origin(server, closed):
    origin = {"Origin": "http://localhost:3000"}
    status, headers, _ = post(server.port, origin)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    preflight = {
        "Host": f"127.0.0.1:{server.port}",
        **origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    status, headers, _ = request(server.port, "OPTIONS", "/v1/chat/completions", preflight)
    assert status == 200 and "POST" in headers["Access-Control-Allow-Methods"]
    assert "authorization" in headers["Access-Control-Allow-Headers"].lower()
    # Without --cors-origin: no CORS headers at all, even for the server's own pages.
    same = {"Origin": f"http://127.0.0.1:{closed.port}"}
    status, headers, _ = post(closed.port, same, "")
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    status, _, _ = request(
        closed.port, "OPTIONS", "/v1/chat/completions", {**preflight, "Host": same["Origin"][7:]}
    )
    assert status in (403, 405)


def test_chunked_body_is_refused_while_it_streams(server):
    """The server answers 413 once the limit is passed, without waiting for (or keeping) the rest."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nAuthorization: Bearer k\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
    )
    chunk = b"x" * 4096
    sock.settimeout(0.05)
    answer = b""
    started = time.monotonic()
    for _ in range(2000):  # up to 8 MB, never finishing the body
        try:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            answer += sock.recv(4096)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        if answer:
            break
    sock.settimeout(5)
    try:
        answer += sock.recv(4096)
    except (TimeoutError, ConnectionResetError):
        pass
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"body_too_large" in answer
    assert time.monotonic() - started < 30


def test_declared_length_over_the_limit_is_refused_unread(server):
    headers = {"Host": f"127.0.0.1:{server.port}", "Authorization": "Bearer k", "Content-Length": "99999999"}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.putrequest("POST", "/v1/chat/completions", skip_host=True)
    for key, value in headers.items():
        conn.putheader(key, value)
    conn.endheaders()
    assert conn.getresponse().status == 413


def test_help_says_the_flag_is_visible_in_ps(capsys):
    with pytest.raises(SystemExit):
        serve_app.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "PICOCHAT_API_KEY" in out and "ps" in out
    assert "--cors-origin" in out and "--allow-host" in out and "--model STAGE[:TAG]" in out
