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

from picochat.serve.backend import Delta, SamplingParams, TokenLogprob

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


# Parameters of OpenAI's API that picochat refuses (400 naming the parameter) rather than ignore.
REFUSED = {
    "tools": "picochat's only tool is its built-in calculator, which the model calls by itself",
    "tool_choice": "picochat's only tool is its built-in calculator, which the model calls by itself",
    "functions": "picochat's only tool is its built-in calculator, which the model calls by itself",
    "function_call": "picochat's only tool is its built-in calculator, which the model calls by itself",
    "parallel_tool_calls": "picochat has no client-side tools",
    "audio": "picochat reads and writes text only",
    "modalities": "picochat reads and writes text only",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "picochat has no web search",
    "suffix": "picochat's models cannot fill in the middle",
    "reasoning_effort": "picochat's models do not reason before answering",
    "verbosity": "picochat's models have no verbosity control",
}
# Accepted with no effect on a local server: user, metadata, prompt_cache_key, safety_identifier,
# service_tier, and store when false (there is nothing to store, so store: true is refused).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingRequest:
    """What chat and legacy completions requests share: sampling, choices, streaming, stop sequences."""

    params: SamplingParams
    model: str | None = None  # None: the server's default model
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ChatRequest(SamplingRequest):
    messages: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Requests


def load_json_object(raw: bytes) -> dict:
    """The request body as a JSON object (non-finite numbers such as NaN refused), or ApiError."""

    def refuse_constant(name: str):
        raise ApiError(f"{name} is not a valid number in JSON; send a finite number.", code="invalid_json")

    try:
        body = json.loads(raw, parse_constant=refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ApiError(
            f"The request body is not valid JSON ({e}). Send a JSON object.", code="invalid_json"
        ) from e
    if not isinstance(body, dict):
        raise ApiError("The request body must be a JSON object.", code="invalid_json")
    return body


def parse_chat_request(body: dict, limits: Limits, max_context: int) -> ChatRequest:
    """Validate a /v1/chat/completions body (a dict); raise ApiError naming the first bad field."""
    refuse_unsupported(body)
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise ApiError(
            'response_format: picochat cannot constrain its output to JSON; only {"type": "text"} '
            "(the default) is supported.",
            param="response_format",
        )
    messages = parse_messages(body.get("messages"), limits)
    logprobs = flag_field(body, "logprobs")
    top_logprobs = number_field(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
    if top_logprobs and not logprobs:
        raise ApiError("top_logprobs needs logprobs: true.", param="top_logprobs")
    max_tokens = number_field(
        body, "max_completion_tokens", None, 1, _token_cap(limits, max_context), integer=True
    )
    common = parse_sampling(body, limits, max_context, max_tokens, logprobs, top_logprobs)
    return ChatRequest(**vars(common), messages=messages)


def refuse_unsupported(body: dict) -> None:
    for name, why in REFUSED.items():
        if body.get(name) is not None:
            raise ApiError(f"{name} is not supported: {why}. Remove it from the request.", param=name)
    if body.get("store"):
        raise ApiError("store is not supported: picochat keeps no completions; send false.", param="store")
    if not isinstance(body.get("model", ""), (str, type(None))):
        raise ApiError("model must be a string.", param="model")
    if not isinstance(body.get("user", ""), (str, type(None))):
        raise ApiError("user must be a string.", param="user")


def _token_cap(limits: Limits, max_context: int) -> int:
    return max(1, min(limits.max_tokens, max_context))


def parse_sampling(
    body: dict,
    limits: Limits,
    max_context: int,
    max_tokens: int | None,
    logprobs: bool,
    top_logprobs: int,
    min_tokens: int = 1,
) -> SamplingRequest:
    """The sampling fields both endpoints share. `max_tokens` (if already given) wins over body's."""
    cap = _token_cap(limits, max_context)
    if max_tokens is None:
        default = min(limits.default_max_tokens, cap)
        max_tokens = number_field(body, "max_tokens", default, min_tokens, cap, integer=True)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(
            'stream_options must be an object like {"include_usage": true}.', param="stream_options"
        )
    params = SamplingParams(
        # The server's defaults (OpenAI's are temperature 1 and no top-k: too wild for a small model).
        temperature=number_field(body, "temperature", 0.8, 0.0, 2.0),
        top_p=number_field(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=number_field(body, "top_k", 50, 0, 1_000_000, integer=True) or None,
        max_tokens=max_tokens,
        seed=number_field(body, "seed", None, -(2**63), 2**63 - 1, integer=True),
        frequency_penalty=number_field(body, "frequency_penalty", 0.0, -2.0, 2.0),
        presence_penalty=number_field(body, "presence_penalty", 0.0, -2.0, 2.0),
        logit_bias=_parse_logit_bias(body.get("logit_bias")),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    return SamplingRequest(
        params=params,
        model=body.get("model") or None,
        n=number_field(body, "n", 1, 1, limits.max_n, integer=True),
        stream=flag_field(body, "stream"),
        include_usage=flag_field(stream_options, "include_usage"),
        stop=_parse_stop(body.get("stop")),
    )


def _parse_logit_bias(bias) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias in [-100, 100]} as sorted (id, bias) pairs."""
    if bias is None:
        return ()
    message = (
        'logit_bias must be an object mapping token ids to numbers in [-100, 100], like {"50256": -100}.'
    )
    if not isinstance(bias, dict) or len(bias) > 1024:
        raise ApiError(message, param="logit_bias")
    pairs = []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isdigit()) or isinstance(value, bool):
            raise ApiError(message, param="logit_bias")
        if not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise ApiError(message, param="logit_bias")
        pairs.append((int(key), float(value)))
    return tuple(sorted(pairs))


def check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """logit_bias may only name tokens the model has."""
    for token, _ in params.logit_bias:
        if token >= vocab_size:
            raise ApiError(
                f"logit_bias: token id {token} is not in the vocabulary (0 to {vocab_size - 1}).",
                param="logit_bias",
            )


def number_field(body: dict, name: str, default, low, high, *, integer: bool = False, low_open: bool = False):
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


def flag_field(body: dict, name: str) -> bool:
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
        self.logprobs: list[TokenLogprob] = []  # of every token sent
        self.new_logprobs: list[TokenLogprob] = []  # of the tokens sent since take_logprobs()
        self.held_logprobs: list[TokenLogprob] = []  # of the held text

    def feed(self, delta: Delta) -> list[dict]:
        out: list[dict] = []
        if delta.kind != "text" and self.held:
            out.append(self._emit("text", self.held))
            self.held = ""
        text, logprobs = delta.text, [*self.held_logprobs, *delta.logprobs]
        self.held_logprobs = []
        if delta.kind == "text":
            text, hit_stop = self._cut_at_stop(self.held + text)
            logprobs, rest = _split_logprobs(logprobs, len(text))
            self.held_logprobs = [] if hit_stop else rest  # tokens past a stop sequence are not sent
        else:
            hit_stop = False
        self.logprobs += logprobs
        self.new_logprobs += logprobs
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
                self.logprobs += self.held_logprobs
                self.new_logprobs += self.held_logprobs
                self.held_logprobs = []
            if self.kind != "text":
                out.append(self._emit("text", ""))  # close the open tool fence
            self.finish_reason = "stop" if hit_stop else delta.finish_reason
        if delta.notice:
            self.notices.append(delta.notice)
            out = out or [self._emit(self.kind, "")]
            out[0]["picochat"]["notice"] = delta.notice
        return out

    def take_logprobs(self) -> list[TokenLogprob]:
        """The logprobs of the tokens sent since the last call (for the next streamed chunk)."""
        taken, self.new_logprobs = self.new_logprobs, []
        return taken

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


def _split_logprobs(
    logprobs: list[TokenLogprob], chars: int
) -> tuple[list[TokenLogprob], list[TokenLogprob]]:
    """Split into the tokens whose text lies within the first `chars` characters, and the rest."""
    used = 0
    for i, entry in enumerate(logprobs):
        used += len(entry.token)
        if used > chars:
            return logprobs[:i], logprobs[i:]
    return logprobs, []


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    """OpenAI's chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}], ...}."""

    def one(entry: TokenLogprob) -> dict:
        return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.bytes)}

    content = [{**one(e), "top_logprobs": [one(t) for t in e.top]} for e in entries]
    return {"content": content, "refusal": None}
