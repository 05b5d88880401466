"""What the server checks before a request reaches an endpoint: who may call it and how much it may send.

- Host / Origin (DNS rebinding, cross-site requests). A web page on another site can make the browser
  send requests to a server on localhost: directly (a "simple" POST needs no CORS preflight, and the
  server parses JSON whatever the Content-Type), or through DNS rebinding, where the attacker's own name
  starts resolving to 127.0.0.1 so the page counts as same-origin. So a request's `Host` must be an IP
  address (rebinding needs a name), a localhost name, the host the server was bound to, or a name given
  with `--allow-host`; and a request carrying an `Origin` must come from the server's own origin or one
  given with `--cors-origin`. Scripts and API clients send no Origin and are not affected.
- CORS headers only when `--cors-origin` is given (for browser front ends such as Open WebUI that call
  the API directly).
- The request body is counted while it streams in, so a chunked upload cannot make the server hold more
  than `max_body_bytes` before it answers 413.
- The API key: `Authorization: Bearer <key>`, the scheme matched case-insensitively (RFC 9110).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from fastapi import Request

from picochat.serve.protocol import ApiError, error_body

LOCAL_NAMES = ("localhost", "localhost.localdomain")


def host_name(host: str) -> str:
    """'example.com:8000' -> 'example.com', '[::1]:80' -> '::1', lower-cased, without a trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":")[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostGuard:
    """ASGI middleware refusing requests whose Host or Origin the server does not recognise (403)."""

    def __init__(self, app, allowed_hosts: Iterable[str] = (), cors_origins: Iterable[str] = ()):
        self.app = app
        self.allowed = {host_name(h) for h in allowed_hosts}
        self.any_host = "*" in self.allowed
        self.cors_origins = {o.rstrip("/").lower() for o in cors_origins}

    def host_allowed(self, host: str) -> bool:
        name = host_name(host)
        return (
            self.any_host
            or not name  # no Host header (HTTP/1.0): not a browser, so not a rebinding attack
            or _is_ip(name)
            or name in self.allowed
            or name in LOCAL_NAMES
            or name.endswith(".localhost")
        )

    def origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.rstrip("/").lower()
        if "*" in self.cors_origins or origin in self.cors_origins:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc == host.strip().lower()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin = headers.get("host", ""), headers.get("origin")
        if not self.host_allowed(host):
            message = (
                f"Host {host!r} is not one this server answers to (protection against DNS rebinding); "
                "start it with --allow-host NAME to allow that name."
            )
        elif origin is not None and not self.origin_allowed(origin, host):
            message = (
                f"Requests from the web page at {origin!r} are refused; start the server with "
                f"--cors-origin {origin} to let that front end call it."
            )
        else:
            return await self.app(scope, receive, send)
        body = json.dumps(error_body(message, "invalid_request_error", code="forbidden_host")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole request body, or a 413 as soon as more than `max_bytes` have arrived."""
    too_big = ApiError(f"Request body larger than {max_bytes} bytes.", 413, code="body_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def check_api_key(request: Request, api_key: str | None) -> None:
    """401 unless the request carries `Authorization: Bearer <api_key>` (any case of "Bearer")."""
    if api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
    given = given.strip() if scheme.lower() == "bearer" else ""
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        what = "Wrong API key" if given else "Missing API key"
        raise ApiError(
            f"{what}: send the server's key as 'Authorization: Bearer <key>'.",
            401,
            type="authentication_error",
            code="invalid_api_key",
        )
