"""The legacy `POST /v1/completions` wire format: raw-text continuation, for base models and for evaluation
harnesses (lm-evaluation-harness scores a prompt with `echo: true, logprobs: 1, max_tokens: 0 or 1`).

Pure functions with no I/O; `picochat.serve.app` runs them. A prompt is a string, a list of token ids, or a
list of either (a batch: choice `i * n + j` is the j-th sample for prompt i). `<|bos|>` is put in front of
every prompt that does not start with it (the model was trained on documents that start so), and is never
shown: with `echo`, the first prompt token gets its log-prob given `<|bos|>` alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from picochat.serve.backend import TokenLogprob
from picochat.serve.protocol import (
    ApiError,
    Limits,
    SamplingRequest,
    flag_field,
    number_field,
    parse_sampling,
    refuse_unsupported,
)

MAX_PROMPTS = 16
MAX_LEGACY_LOGPROBS = 5  # OpenAI's limit for the legacy endpoint


@dataclass(frozen=True)
class CompletionRequest(SamplingRequest):
    prompts: list[str | list[int]] = field(default_factory=list)
    echo: bool = False
    logprobs: int | None = None  # None: no logprobs; k: each token's and its k likeliest alternatives


def parse_completion_request(body: dict, limits: Limits, max_context: int) -> CompletionRequest:
    """Validate a /v1/completions body (a dict); raise ApiError naming the first bad field."""
    refuse_unsupported(body)
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise ApiError("best_of is not supported (only best_of equal to n).", param="best_of")
    prompts = _parse_prompts(body.get("prompt"))
    logprobs = number_field(body, "logprobs", None, 0, MAX_LEGACY_LOGPROBS, integer=True)
    echo = flag_field(body, "echo")
    # max_tokens 0 asks for no new tokens: only useful with echo (scoring the prompt), as on OpenAI's API.
    common = parse_sampling(
        body, limits, max_context, None, logprobs is not None, logprobs or 0, min_tokens=0 if echo else 1
    )
    if common.params.max_tokens == 0 and common.stream:
        raise ApiError("max_tokens 0 (scoring only) cannot be streamed.", param="max_tokens")
    return CompletionRequest(**vars(common), prompts=prompts, echo=echo, logprobs=logprobs)


def _parse_prompts(prompt) -> list[str | list[int]]:
    message = (
        "prompt must be a string, a list of token ids, or a list of up to "
        f"{MAX_PROMPTS} strings or token-id lists."
    )
    if isinstance(prompt, str) or _is_ids(prompt):
        return [prompt]
    if not isinstance(prompt, list) or not prompt or len(prompt) > MAX_PROMPTS:
        raise ApiError(message, param="prompt")
    if not all(isinstance(p, str) or _is_ids(p) for p in prompt):
        raise ApiError(message, param="prompt")
    return prompt


def _is_ids(value) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


def prompt_ids(prompt: str | list[int], tokenizer, bos: int) -> list[int]:
    """The prompt as token ids with `<|bos|>` first; ApiError for ids outside the vocabulary."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    vocab = tokenizer.get_vocab_size()
    bad = next((t for t in ids if t >= vocab), None)
    if bad is not None:
        raise ApiError(f"prompt: token id {bad} is not in the vocabulary (0 to {vocab - 1}).", param="prompt")
    return ids if ids[:1] == [bos] else [bos, *ids]


def check_fits(ids: list[int], max_tokens: int, max_context: int) -> None:
    if len(ids) + max_tokens > max_context:
        raise ApiError(
            f"The prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the model's context "
            f"of {max_context} tokens; shorten the prompt or lower max_tokens.",
            param="prompt",
            code="context_length_exceeded",
        )


def legacy_logprobs(entries: list[TokenLogprob], text_offset: int = 0) -> dict:
    """OpenAI's legacy `logprobs`: parallel lists of tokens, their log-probs, top alternatives, offsets."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for entry in entries:
        offsets.append(text_offset)
        tokens.append(entry.token)
        token_logprobs.append(entry.logprob)
        top: dict[str, float] = {}
        for alternative in entry.top:
            top.setdefault(alternative.token, alternative.logprob)
        tops.append(top)
        text_offset += len(entry.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
