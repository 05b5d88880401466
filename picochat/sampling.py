"""Sampling settings (`SamplingParams`) and the batched sampler every generator shares.

`SamplingParams` is the one sampling type of the engine, the evals, RL, the server and the terminal chat.
It validates itself: every number finite, each in its range, and a temperature below 1e-5 becomes 0
(greedy), since dividing logits by a tinier one only overflows (issue 12: a request with temperature
1e-38 used to break every other request of its batch).

`BatchSampler` picks the next token of many rows at once, each row with its own settings, in a fixed
number of tensor operations per step whatever the mix of settings (no Python loop over the vocabulary,
and only a list comprehension over rows to draw their random numbers):
  1. logprobs (when asked for) come from the model's raw distribution, log_softmax(logits), as OpenAI's;
  2. logit_bias and the OpenAI penalties, logit[t] -= count[t] * frequency + (count[t] > 0) * presence,
     live together in one additive (rows x vocab) matrix updated with the tokens each row appends;
  3. greedy rows take the argmax; the others divide by their temperature, keep their top-k (one
     `torch.topk` with the batch's largest k, then a mask per row) and their top-p mass, and draw by
     inverse CDF with a uniform number from the row's own `random.Random`: a seeded row's reply depends
     only on its seed, never on what else shares the batch.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from picochat.gpt import soft_cap

GREEDY_BELOW = 1e-5  # temperatures under this are treated as 0 (greedy)
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one reply. top_k None or 0: no top-k; max_tokens None: up to the end of the
    context; seed None: nondeterministic. Raises ValueError naming the first bad field."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    max_tokens: int | None = None
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, not {value}")
        _check(self.temperature >= 0, "temperature must be >= 0 (0 = greedy)")
        _check(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        _check(self.top_k is None or _is_int(self.top_k) and self.top_k >= 0, "top_k must be None or >= 0")
        _check(self.max_tokens is None or _is_int(self.max_tokens) and self.max_tokens >= 0,
               "max_tokens must be None or >= 0")  # fmt: skip
        _check(self.seed is None or _is_int(self.seed), "seed must be None or an integer")
        for name in ("frequency_penalty", "presence_penalty"):
            _check(-2 <= getattr(self, name) <= 2, f"{name} must be in [-2, 2]")
        for pair in self.logit_bias:
            _check(
                isinstance(pair, tuple) and len(pair) == 2 and _is_int(pair[0]) and pair[0] >= 0,
                "logit_bias must be (token id >= 0, bias) pairs",
            )
            _check(
                math.isfinite(pair[1]) and -100 <= pair[1] <= 100, "logit_bias values must be in [-100, 100]"
            )
        _check(_is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
               f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")  # fmt: skip
        if self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)
        if self.top_k == 0:
            object.__setattr__(self, "top_k", None)

    @property
    def adjusts_logits(self) -> bool:
        """Whether logit_bias or a penalty changes the logits before sampling."""
        return bool(self.logit_bias) or self.frequency_penalty != 0 or self.presence_penalty != 0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model (natural log of its raw softmax), with the
    `top_logprobs` most likely alternatives at that position (most likely first, their own `top` empty)."""

    token: str  # the token decoded alone, errors replaced
    bytes: tuple[int, ...]  # its raw UTF-8 bytes
    logprob: float
    top: tuple[TokenLogprob, ...] = ()


class Logprobs(NamedTuple):
    """What the sampler measured at one position: the chosen token's log-prob and the top alternatives."""

    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log-prob), most likely first


def token_bytes(tokenizer: Any, token: int) -> bytes:
    """The raw bytes of one token (a special token's name for special tokens)."""
    enc = getattr(tokenizer, "enc", None)
    if enc is not None and hasattr(enc, "decode_single_token_bytes"):
        return enc.decode_single_token_bytes(token)
    return tokenizer.decode([token]).encode("utf-8")


def token_logprob(
    tokenizer: Any, token: int, logprob: float, top: tuple[tuple[int, float], ...] = ()
) -> TokenLogprob:
    """A `TokenLogprob` for `token` with the text and bytes the tokenizer gives it."""
    raw = token_bytes(tokenizer, token)
    alternatives = tuple(token_logprob(tokenizer, t, lp) for t, lp in top)
    return TokenLogprob(raw.decode("utf-8", errors="replace"), tuple(raw), logprob, alternatives)


class BatchSampler:
    """Per-row sampling state for up to `capacity` rows (slots) and the batched `sample` of a step."""

    def __init__(
        self, capacity: int, vocab_size: int, device: torch.device | str, softcap: float | None = None
    ) -> None:
        """`softcap`: the logits `sample` gets are the model's before its soft-cap, which the sampler
        applies itself (picochat.gpt.soft_cap): when every row samples from a top-k with no logit
        adjustment and no logprobs, to the top-k candidates only. tanh is monotonic, so the raw logits'
        top-k are the capped ones'; this skips a tanh over the whole (rows x vocab) matrix per step
        (about 1 ms of a 25 ms step at batch 8, vocab 32,768 on this project's CPU)."""
        self.capacity, self.vocab_size, self.device = capacity, vocab_size, torch.device(device)
        self.softcap = softcap
        self.params: list[SamplingParams | None] = [None] * capacity
        self.rngs: list[random.Random | None] = [None] * capacity
        # Allocated on first use: the additive logit adjustment (bias + penalties) and which tokens
        # each row has produced (for the presence penalty).
        self.adjust: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None

    def assign(self, slot: int, params: SamplingParams, rng: random.Random | None = None) -> None:
        """Start a new row in `slot` with `params`; `rng` (default: one seeded with params.seed) draws
        its random numbers. Raises ValueError for a logit_bias token outside the vocabulary."""
        for token, _ in params.logit_bias:
            if token >= self.vocab_size:
                raise ValueError(f"logit_bias token {token} is outside the vocabulary of {self.vocab_size}")
        self.params[slot] = params
        self.rngs[slot] = rng or random.Random(params.seed)
        if params.adjusts_logits or self.adjust is not None:
            if self.adjust is None:
                shape = (self.capacity, self.vocab_size)
                self.adjust = torch.zeros(shape, device=self.device)
                self.seen = torch.zeros(shape, dtype=torch.bool, device=self.device)
            self.adjust[slot].zero_()
            self.seen[slot].zero_()
            for token, bias in params.logit_bias:
                self.adjust[slot, token] += bias

    def observe(self, slots: list[int], tokens: list[int]) -> None:
        """Count the token each row appended (sampled or forced), for the penalties."""
        rows = [(s, t) for s, t in zip(slots, tokens, strict=True) if self._penalised(s)]
        if not rows:
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device).t()
        frequency = torch.tensor([self.params[s].frequency_penalty for s, _ in rows], device=self.device)
        presence = torch.tensor([self.params[s].presence_penalty for s, _ in rows], device=self.device)
        first = ~self.seen[index[0], index[1]]
        self.adjust.index_put_((index[0], index[1]), -(frequency + presence * first), accumulate=True)
        self.seen[index[0], index[1]] = True

    def _penalised(self, slot: int) -> bool:
        p = self.params[slot]
        return p.frequency_penalty != 0 or p.presence_penalty != 0

    def sample(self, logits: torch.Tensor, slots: list[int]) -> tuple[list[int], list[Logprobs | None]]:
        """The next token of each row (logits (len(slots), V), row i for slots[i]) and, for rows whose
        params ask for logprobs, what the model gave the chosen token and its top alternatives."""
        logits = logits.float()
        params = [self.params[s] for s in slots]
        cap_candidates = self.softcap is not None and all(
            p.temperature != 0.0 and p.top_k and not p.adjusts_logits and not p.logprobs for p in params
        )
        if self.softcap is not None and not cap_candidates:
            logits = soft_cap(logits, self.softcap)
        raw = logits
        if self.adjust is not None and any(p.adjusts_logits for p in params):
            logits = logits + self.adjust[slots]
        tokens = [0] * len(slots)
        greedy = [i for i, p in enumerate(params) if p.temperature == 0.0]
        if greedy:
            # max().indices: the first maximum like argmax, ~3x faster on CPU
            picked = (logits if len(greedy) == len(slots) else logits[greedy]).max(dim=-1).indices
            for i, token in zip(greedy, picked.tolist(), strict=True):
                tokens[i] = token
        # Rows with a top-k share one partial selection; rows without one need the whole vocabulary.
        for with_top_k in (True, False):
            rows = [i for i, p in enumerate(params) if p.temperature != 0.0 and bool(p.top_k) == with_top_k]
            if rows:
                group = logits if len(rows) == len(slots) else logits[rows]
                cap = self.softcap if cap_candidates else None
                picked = self._draw(group, [slots[i] for i in rows], with_top_k, cap)
                for i, token in zip(rows, picked, strict=True):
                    tokens[i] = token
        return tokens, self._logprobs(raw, params, tokens)

    def _draw(
        self, logits: torch.Tensor, slots: list[int], with_top_k: bool, cap: float | None = None
    ) -> list[int]:
        """Each row's token; `cap`: soft-cap the top-k candidates (the logits are raw)."""
        params = [self.params[s] for s in slots]
        temperature = torch.tensor([p.temperature for p in params], device=logits.device)[:, None]
        top_p = [p.top_p for p in params]
        candidates = None
        if with_top_k:
            ks = [min(p.top_k, logits.size(-1)) for p in params]
            logits, candidates = torch.topk(logits, max(ks), dim=-1)  # sorted, most likely first
            if cap is not None:
                logits = soft_cap(logits, cap)
            if min(ks) < max(ks):
                limit = torch.tensor(ks, device=logits.device)[:, None]
                columns = torch.arange(logits.size(-1), device=logits.device)
                logits = logits.masked_fill(columns >= limit, float("-inf"))
        elif min(top_p) < 1.0:
            logits, candidates = torch.sort(logits, dim=-1, descending=True)
        probs = F.softmax(logits / temperature, dim=-1)
        if min(top_p) < 1.0:  # sorted here: drop tokens once the mass before them reaches top_p
            mass = torch.tensor(top_p, device=logits.device)[:, None]
            probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= mass, 0.0)
        cdf = probs.cumsum(dim=-1)
        uniform = torch.tensor([self.rngs[s].random() for s in slots], device=logits.device)[:, None]
        choice = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)
        choice = choice.clamp_(max=cdf.size(-1) - 1)  # u * total rounding up to the total itself
        if candidates is not None:
            # kept tokens are a prefix of the sorted candidates: never step past the last kept one
            choice = torch.minimum(choice, (probs > 0).sum(dim=-1, keepdim=True) - 1)
            choice = candidates.gather(-1, choice)
        return choice.squeeze(-1).tolist()

    def _logprobs(
        self, raw: torch.Tensor, params: list[SamplingParams], tokens: list[int]
    ) -> list[Logprobs | None]:
        rows = [i for i, p in enumerate(params) if p.logprobs]
        out: list[Logprobs | None] = [None] * len(params)
        if rows:
            measured = measure_logprobs(
                raw[rows], [tokens[i] for i in rows], [params[i].top_logprobs for i in rows]
            )
            for i, m in zip(rows, measured, strict=True):
                out[i] = m
        return out


def measure_logprobs(logits: torch.Tensor, tokens: list[int], tops: list[int]) -> list[Logprobs]:
    """Row i of `logits` (N, V): the log-prob the model gives tokens[i] and its tops[i] best tokens."""
    logp = F.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    k = max(tops)
    top_values, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [
        Logprobs(chosen[j], tuple(zip(top_ids[j][:n], top_values[j][:n], strict=True)))
        for j, n in enumerate(tops)
    ]
