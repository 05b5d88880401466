"""OpenAI chat-completions wire format for picochat: request validation and reply formatting.

Pure functions and small classes with no I/O, so `picochat.serve.app` stays about HTTP and concurrency.

Tool calls. The model can write python (the calculator) and read its output. Plain OpenAI clients see
them inside `content` as fenced blocks whose info string marks them:

    ```python picochat-tool        ```text picochat-output
    2+3                            5
    ```                            ```

and every content delta also carries a `"picochat": {"kind": "text" | "python" | "python_output",
"text": <raw text>}` extension, which the web UI uses to draw tool-call boxes. When a client sends such
a reply back as history, the fences are turned back into parts, so the model sees its own tool tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from picochat.serve.backend import Delta, SamplingParams

ROLES = ("system", "user", "assistant")
TOOL_KINDS = ("python", "python_output")
FENCE_OPEN = {"python": "\n```python picochat-tool\n", "python_output": "\n```text picochat-output\n"}
FENCE_CLOSE = "\n```\n"
_FENCE_RE = re.compile(
    r"(?:^|\n)```(python picochat-tool|text picochat-output)\n(.*?)\n```(?:\n|$)", re.DOTALL
)
_FENCE_KIND = {"python picochat-tool": "python", "text picochat-output": "python_output"}
MAX_STOP_SEQUENCES = 4


@dataclass(frozen=True)
class Limits:
    """What a single request may ask for; requests beyond these get a 400 naming the limit."""

    max_messages: int = 100
    max_message_chars: int = 20_000
    max_tokens: int = 2048  # largest max_tokens a request may ask for (also capped by the model's context)
    default_max_tokens: int = 512
    max_n: int = 4
    max_body_bytes: int = 2_000_000


class ApiError(Exception):
    """An error returned to the client as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        *,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.type, self.code = message, status, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict]
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Requests


def parse_chat_request(raw: bytes, limits: Limits, max_context: int) -> ChatRequest:
    """Validate a /v1/chat/completions body; raise ApiError naming the first bad field."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(
            f"The request body is not valid JSON ({e}). Send a JSON object.", code="invalid_json"
        ) from e
    if not isinstance(body, dict):
        raise ApiError("The request body must be a JSON object.", code="invalid_json")
    if not isinstance(body.get("model", ""), str):
        raise ApiError("model must be a string.", param="model")
    messages = parse_messages(body.get("messages"), limits)
    token_cap = max(1, min(limits.max_tokens, max_context))
    max_tokens = _number(body, "max_completion_tokens", None, 1, token_cap, integer=True)
    if max_tokens is None:
        max_tokens = _number(
            body, "max_tokens", min(limits.default_max_tokens, token_cap), 1, token_cap, integer=True
        )
    defaults = SamplingParams(temperature=0.8, top_k=50)  # the server's own defaults
    params = SamplingParams(
        temperature=_number(body, "temperature", defaults.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", defaults.top_p, 0.0, 1.0, low_open=True),
        top_k=_number(body, "top_k", defaults.top_k, 0, 1_000_000, integer=True) or None,
        max_tokens=max_tokens,
        seed=_number(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
    )
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(
            'stream_options must be an object like {"include_usage": true}.', param="stream_options"
        )
    return ChatRequest(
        messages=messages,
        params=params,
        n=_number(body, "n", 1, 1, limits.max_n, integer=True),
        stream=_flag(body, "stream"),
        include_usage=_flag(stream_options, "include_usage"),
        stop=_parse_stop(body.get("stop")),
    )


def _number(body: dict, name: str, default, low, high, *, integer: bool = False, low_open: bool = False):
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ApiError(f"{name} must be {kind} (got {json.dumps(value)}).", param=name)
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ApiError(f"{name} must be in {bracket}{low}, {high}] (got {value}).", param=name)
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(f"{name} must be true or false (got {json.dumps(value)}).", param=name)
    return value


def _parse_stop(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise ApiError(
            f"stop must be a non-empty string or a list of up to {MAX_STOP_SEQUENCES} of them.", param="stop"
        )
    return stops


def parse_messages(messages, limits: Limits) -> list[dict]:
    """Check roles, order and sizes; return messages in docs/architecture.md's conversation format."""
    if messages is None:
        raise ApiError("messages is required: a non-empty list of {role, content} objects.", param="messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list of {role, content} objects.", param="messages")
    if len(messages) > limits.max_messages:
        raise ApiError(
            f"Too many messages: {len(messages)} (limit {limits.max_messages}). Start a new conversation.",
            param="messages",
        )
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(f"{where} must be an object with role and content.", param=where)
        role = "system" if message.get("role") == "developer" else message.get("role")
        if role not in ROLES:
            raise ApiError(
                f"{where}.role must be one of {', '.join(ROLES)} (got {json.dumps(message.get('role'))}).",
                param=f"{where}.role",
            )
        content = _parse_content(message.get("content"), role, f"{where}.content", limits)
        out.append({"role": role, "content": content})
    _check_turn_order(out)
    return out


def _parse_content(content, role: str, where: str, limits: Limits) -> str | list[dict]:
    allowed = ("text", *TOOL_KINDS) if role == "assistant" else ("text",)
    if isinstance(content, str):
        parts = split_tool_fences(content) if role == "assistant" else [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") not in allowed
                or not isinstance(part.get("text"), str)
            ):
                raise ApiError(
                    f'{where}[{j}] must be an object {{"type": one of {"/".join(allowed)}, "text": string}}; '
                    "picochat reads text only.",
                    param=f"{where}[{j}]",
                )
            parts.append({"type": part["type"], "text": part["text"]})
    else:
        raise ApiError(
            f'{where} must be a string or a list of {{"type": "text", "text": ...}} parts.', param=where
        )
    size = sum(len(p["text"]) for p in parts)
    if size > limits.max_message_chars:
        raise ApiError(
            f"{where} is too long: {size} characters (limit {limits.max_message_chars}).",
            param=where,
            code="message_too_long",
        )
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def _check_turn_order(messages: list[dict]) -> None:
    start = 1 if messages[0]["role"] == "system" else 0
    for i, message in enumerate(messages[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ApiError(
                f"messages[{i}].role should be {expected!r}: after an optional first system message, "
                "turns alternate user, assistant, user, ...",
                param=f"messages[{i}].role",
            )
    if messages[-1]["role"] != "user":
        raise ApiError(
            "The last message must be from the user (there is nothing to reply to).", param="messages"
        )


def split_tool_fences(text: str) -> list[dict]:
    """Undo the tool-call fences of `ChoiceBuilder`: a reply string back into conversation parts."""
    parts, pos = [], 0
    for match in _FENCE_RE.finditer(text):
        if match.start() > pos:
            parts.append({"type": "text", "text": text[pos : match.start()]})
        parts.append({"type": _FENCE_KIND[match.group(1)], "text": match.group(2)})
        pos = match.end()
    if pos < len(text) or not parts:
        parts.append({"type": "text", "text": text[pos:]})
    return parts


# ---------------------------------------------------------------------------------------------
# Replies


class ChoiceBuilder:
    """Turns one choice's backend deltas into OpenAI delta dicts, applying stop sequences.

    `feed(delta)` returns the chunk deltas to send (possibly none); once `finish_reason` is set the
    choice is over. `content` and `parts` accumulate the whole reply for non-streaming responses.
    Stop sequences are matched in the model's text only (not inside tool calls); text that could be the
    start of a stop sequence is held back until it is known not to be.
    """

    def __init__(self, stop: list[str] | None = None):
        self.stop = stop or []
        self.kind = "text"
        self.held = ""
        self.content = ""
        self.parts: list[dict] = []
        self.notices: list[str] = []
        self.finish_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def feed(self, delta: Delta) -> list[dict]:
        out: list[dict] = []
        if delta.kind != "text" and self.held:
            out.append(self._emit("text", self.held))
            self.held = ""
        text = delta.text
        if delta.kind == "text":
            text, hit_stop = self._cut_at_stop(self.held + text)
        else:
            hit_stop = False
        if text or delta.kind != self.kind:
            out.append(self._emit(delta.kind, text))
        if delta.prompt_tokens is not None:
            self.prompt_tokens = delta.prompt_tokens
        if delta.completion_tokens is not None:
            self.completion_tokens = delta.completion_tokens
        if hit_stop or delta.finish_reason:
            if self.held:
                out.append(self._emit("text", self.held))
                self.held = ""
            if self.kind != "text":
                out.append(self._emit("text", ""))  # close the open tool fence
            self.finish_reason = "stop" if hit_stop else delta.finish_reason
        if delta.notice:
            self.notices.append(delta.notice)
            out = out or [self._emit(self.kind, "")]
            out[0]["picochat"]["notice"] = delta.notice
        return out

    def _cut_at_stop(self, text: str) -> tuple[str, bool]:
        """Return (text safe to send, whether a stop sequence was found); keep a possible prefix held."""
        self.held = ""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            return text[: min(hits)], True
        keep = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        if keep:
            self.held = text[-keep:]
            text = text[:-keep]
        return text, False

    def _emit(self, kind: str, text: str) -> dict:
        prefix = ""
        if kind != self.kind:
            prefix = (FENCE_CLOSE if self.kind != "text" else "") + FENCE_OPEN.get(kind, "")
            self.kind = kind
        if text:
            if self.parts and self.parts[-1]["type"] == kind and not prefix:
                self.parts[-1]["text"] += text
            else:
                self.parts.append({"type": kind, "text": text})
        self.content += prefix + text
        return {"content": prefix + text, "picochat": {"kind": kind, "text": text}}
