"""Continuous batching: the real `Backend` of `picochat serve` (see picochat/serve/backend.py).

One background thread owns the model. Requests wait in a bounded queue (`QueueFullError` when it is
full) and are given one of `max_batch_size` slots of a shared KV cache as slots free up. Each loop of the
thread:
  1. frees the slots of cancelled requests (a client that disconnected leaves here; a finished reply
     frees its slot as soon as it ends) and runs queued jobs (`score`);
  2. prefills the prompts of newly admitted requests, at most `PREFILL_CHUNK` tokens in all per loop
     (batch 1 each, into the request's own cache): a long prompt is spread over several loops, so it
     delays the running streams' next token by one chunk, not by the whole prompt. A request whose
     prompt is done moves its cache into its slot and samples its first token at once;
  3. runs ONE batched forward pass that decodes one token for every decoding slot. Rows sit at
     different positions: the KV cache keeps a length per row, which sets each row's rotary position,
     where its new key/value are written, and the attention mask that hides other rows' longer histories.
The batch is the occupied prefix of the slots (slots are handed out lowest first), so a lone request
decodes at batch 1. Sampling is one `picochat.sampling.BatchSampler` call for the whole batch, each row
with its own settings; each request's row then goes through the engine's `RowState` (tool calls,
stopping) and its text reaches the request's asyncio queue via `loop.call_soon_threadsafe` (one call
per step for all requests).

Failures are per request: anything that raises while handling one request's row (its prompt, its
sampling settings, its tool call, its text) ends that request with the error and the others go on.
Only a failure of the shared forward pass itself fails the requests in that batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from picochat.engine import (
    PREFILL_CHUNK,
    Engine,
    ReplyText,
    RowState,
    context_notice,
    fit_conversation,
    load_engine,
    prompt_budget,
)
from picochat.gpt import KVCache
from picochat.sampling import Logprobs, measure_logprobs, token_logprob
from picochat.serve.backend import Delta, QueueFullError, SamplingParams, ShuttingDownError, TokenLogprob

log = logging.getLogger("picochat.serve")


class _Request:
    """One reply being generated. The event loop reads `deltas`; the worker thread owns the rest."""

    def __init__(self, engine: Engine, prompt: list[int], params: SamplingParams, loop, chat: bool) -> None:
        if not prompt:
            raise ValueError("the prompt is empty; give at least one token")
        if min(prompt) < 0 or max(prompt) >= engine.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {engine.vocab_size})")
        self.engine, self.prompt, self.params, self.loop = engine, prompt, params, loop
        self.deltas: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # set by the event loop when the client goes away
        self.row = RowState(engine.tokens, engine.reply_budget(len(prompt), params.max_tokens), chat)
        self.text = ReplyText(engine.tokenizer)
        self.unsent: deque[TokenLogprob | None] = deque()  # one per token ReplyText holds back
        self.prefill_cache: KVCache | None = None  # the prompt's own cache while it is prefilled
        self.prefilled = 0  # prompt tokens in prefill_cache
        self.last_token = 0  # the row's newest token, fed to the model at the next step

    @property
    def decoding(self) -> bool:
        return self.prefill_cache is None

    def advance(self, sampled: int, logprobs: Logprobs | None) -> list[Delta]:
        """Take this step's token (or a forced one); return the deltas for the client (the last one
        carries the finish_reason when the reply is over)."""
        step = self.row.next_token(sampled)
        self.last_token = step.token
        if step.kind is not None:
            lp = None
            if step.mask and logprobs is not None:
                lp = token_logprob(self.engine.tokenizer, step.token, logprobs.logprob, logprobs.top)
            self.unsent.append(lp)
        pieces = self.text.feed(step.token, step.kind)
        if step.finish_reason:
            pieces += self.text.flush()
        deltas = []
        for piece in pieces:
            carried = [self.unsent.popleft() for _ in range(piece.tokens)]
            deltas.append(Delta(text=piece.text, kind=piece.kind, logprobs=tuple(x for x in carried if x)))
        if step.finish_reason:
            deltas.append(
                Delta(
                    finish_reason=step.finish_reason,
                    prompt_tokens=len(self.prompt),
                    completion_tokens=self.row.generated,
                )
            )
        return deltas

    def send(self, item: list[Delta] | BaseException) -> None:
        """Hand deltas (or an error to raise) to the request's coroutine, from any thread."""
        _deliver(self.loop, [(self, item)])


def _deliver(loop: asyncio.AbstractEventLoop, items: list[tuple[_Request, Any]]) -> None:
    """Put each item in its request's queue, with one wake-up of the event loop for all of them."""

    def put_all() -> None:
        for request, item in items:
            request.deltas.put_nowait(item)

    try:
        loop.call_soon_threadsafe(put_all)
    except RuntimeError:  # the event loop is closed: nobody is listening any more
        pass


def leave_a_core_to_the_event_loop() -> None:
    """Let torch use every core but one when serving on CPU. The server's event loop formats every
    streamed token while the worker decodes, and torch's worker threads busy-wait between ops; with
    all cores to torch they fight, and on 2 cores 1 torch thread serves more (measured: 1,500 vs 1,080
    tokens/s with 16 streaming clients; a single stream 400 vs 200 tokens/s)."""
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))


class _Job:
    """Work for the worker thread that is not a generation (`score`): its result goes to a future."""

    def __init__(self, work: Callable[[], Any], loop: asyncio.AbstractEventLoop) -> None:
        self.work, self.loop = work, loop
        self.future: asyncio.Future = loop.create_future()

    def run(self) -> None:
        try:
            outcome, ok = self.work(), True
        except Exception as e:
            outcome, ok = e, False
        future = self.future

        def settle() -> None:
            if not future.done():
                future.set_result(outcome) if ok else future.set_exception(outcome)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass


class ContinuousBatchingBackend:
    """A `picochat.serve.backend.Backend` that decodes up to `max_batch_size` replies together."""

    def __init__(self, engine: Engine, model_name: str, max_batch_size: int = 8, max_queue: int = 32) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be at least 1 and max_queue at least 0")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.max_context = engine.max_context
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.cache = KVCache.for_model(engine.model, max_batch_size, engine.max_context)
        self.sampler = engine.sampler(max_batch_size)
        self.slots: list[_Request | None] = [None] * max_batch_size
        self._waiting: deque[_Request] = deque()
        self._jobs: deque[_Job] = deque()
        self._lock = threading.Condition()  # guards slots, _waiting, _jobs, _closing; wakes the worker
        self._closing = False
        self._thread: threading.Thread | None = None

    @classmethod
    def from_checkpoint(
        cls,
        *,
        source: str = "sft",
        model_tag: str | None = None,
        step: int | None = None,
        device_type: str = "",
        max_batch_size: int = 8,
        max_queue: int = 32,
        bf16_head: bool = False,
    ) -> ContinuousBatchingBackend:
        engine, meta = load_engine(source, model_tag, step, device_type, bf16_head)
        if engine.device.type == "cpu":
            leave_a_core_to_the_event_loop()
        folder = Path(meta["path"])  # .../checkpoints/<stage>/<model_tag>/step_<N>
        name = f"picochat-{source}-{folder.parent.name}"
        return cls(engine, name, max_batch_size=max_batch_size, max_queue=max_queue)

    # -----------------------------------------------------------------------------------------
    # The event loop's side

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "active": self._active(),
                "queued": len(self._waiting),
                "max_batch_size": self.max_batch_size,
            }

    def _active(self) -> int:
        """Requests holding a slot, not counting cancelled ones (their slot is freed at the next step)."""
        return sum(request is not None and not request.cancelled for request in self.slots)

    async def start(self) -> None:
        self._start_worker()

    async def stop(self) -> None:
        """Stop the worker after its current step; requests still in flight get ShuttingDownError."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        with self._lock:
            leftovers = [*self._waiting, *(r for r in self.slots if r is not None)]
            self._waiting.clear()
            self.slots = [None] * self.max_batch_size
            jobs, self._jobs = list(self._jobs), deque()
        for request in leftovers:
            request.send(ShuttingDownError())
        for job in jobs:
            job.future.cancel()

    async def generate(self, messages: list[dict], params: SamplingParams):
        # Rendering a long chat is real work: keep it off the event loop.
        prompt, notice = await asyncio.to_thread(self._prompt, messages, params.max_tokens)
        async for delta in self._run(prompt, params, notice, chat=True):
            yield delta

    async def complete(self, prompt: list[int], params: SamplingParams):
        async for delta in self._run(list(prompt), params, None, chat=False):
            yield delta

    async def _run(self, prompt: list[int], params: SamplingParams, notice: str | None, chat: bool):
        self._start_worker()
        request = _Request(self.engine, prompt, params, asyncio.get_running_loop(), chat)
        self._enqueue(request)
        try:
            yield Delta(notice=notice)  # accepted: the server can answer 200 while the request waits
            while True:
                item = await request.deltas.get()
                if isinstance(item, BaseException):
                    raise item
                for delta in item:
                    yield delta
                if item and item[-1].finish_reason:
                    return
        finally:  # done, cancelled (client gone) or closed: free the slot at the worker's next step
            request.cancelled = True
            with self._lock:
                if request in self._waiting:
                    self._waiting.remove(request)

    async def score(self, prompt: list[int], top_logprobs: int) -> list[TokenLogprob | None]:
        """The log-prob of each prompt token given the ones before it (None for the first)."""
        if not 0 <= top_logprobs <= 20:
            raise ValueError("top_logprobs must be in [0, 20]")
        if not prompt or len(prompt) > self.max_context:
            raise ValueError(f"the prompt must have 1 to {self.max_context} tokens")
        if min(prompt) < 0 or max(prompt) >= self.engine.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.engine.vocab_size})")
        self._start_worker()
        job = _Job(lambda: self._score(list(prompt), top_logprobs), asyncio.get_running_loop())
        with self._lock:
            if self._closing:
                raise ShuttingDownError()
            self._jobs.append(job)
            self._lock.notify()
        return await job.future

    def _prompt(self, messages: list[dict], max_tokens: int | None) -> tuple[list[int], str | None]:
        budget = prompt_budget(self.max_context, max_tokens or self.max_context)
        conversation, dropped = fit_conversation(self.engine.tokenizer, {"messages": messages}, budget)
        notice = context_notice(dropped, self.max_context) if dropped else None
        return self.engine.tokenizer.render_for_completion(conversation), notice

    def _enqueue(self, request: _Request) -> None:
        with self._lock:
            if self._closing:
                raise ShuttingDownError()
            if len(self._waiting) + self._active() >= self.max_batch_size + self.max_queue:
                raise QueueFullError(
                    f"all {self.max_batch_size} slots are busy and {len(self._waiting)} requests are waiting"
                )
            self._waiting.append(request)
            self._lock.notify()

    def _start_worker(self) -> None:
        with self._lock:
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(target=self._work, name="picochat-batching", daemon=True)
                self._thread.start()

    # -----------------------------------------------------------------------------------------
    # The worker thread's side

    @torch.inference_mode()
    def _work(self) -> None:
        while True:
            with self._lock:
                self._release_cancelled()
                while not (self._closing or self._waiting or self._jobs or any(self.slots)):
                    self._lock.wait()
                if self._closing:
                    return
                joining = self._assign_slots()
                jobs, self._jobs = list(self._jobs), deque()
            for job in jobs:
                job.run()
            for slot, request in joining:
                self._guarded([slot], self._admit, slot, request)
            self._prefill_chunks()
            active = [i for i, r in enumerate(self.slots) if r is not None and r.decoding]
            if active:
                self._guarded(active, self._decode, active)

    def _release_cancelled(self) -> None:
        for i, request in enumerate(self.slots):
            if request is not None and request.cancelled:
                self.slots[i] = None

    def _assign_slots(self) -> list[tuple[int, _Request]]:
        """Move waiting requests into free slots (lowest first), skipping ones already cancelled."""
        joining = []
        free = [i for i, request in enumerate(self.slots) if request is None]
        while free and self._waiting:
            request = self._waiting.popleft()
            if not request.cancelled:
                slot = free.pop(0)
                self.slots[slot] = request
                joining.append((slot, request))
        return joining

    def _guarded(self, slots: Iterable[int], work: Callable[..., None], *args: object) -> None:
        """Run work(*args); if it fails, fail the requests of `slots` (not the whole server)."""
        try:
            work(*args)
        except Exception as e:
            log.exception("generation failed")
            for slot in slots:
                self._fail(slot, e)

    def _fail(self, slot: int, error: Exception) -> None:
        request = self.slots[slot]
        if request is not None:
            request.send(RuntimeError(f"generation failed: {error}"))
            request.cancelled = True
            with self._lock:
                self.slots[slot] = None

    def _admit(self, slot: int, request: _Request) -> None:
        self.sampler.assign(slot, request.params)  # ValueError for a bias outside the vocabulary
        request.prefill_cache = KVCache.for_model(self.engine.model, 1, len(request.prompt))

    def _prefill_chunks(self) -> None:
        """Prefill waiting prompts, PREFILL_CHUNK tokens in all; finished ones sample their first token."""
        budget = PREFILL_CHUNK
        for slot, request in enumerate(self.slots):
            if budget == 0:
                return
            if request is None or request.decoding:
                continue
            take = min(budget, len(request.prompt) - request.prefilled)
            budget -= take
            self._guarded([slot], self._prefill_chunk, slot, request, take)

    def _prefill_chunk(self, slot: int, request: _Request, take: int) -> None:
        start = request.prefilled
        chunk = request.prompt[start : start + take]
        ids = torch.tensor([chunk], dtype=torch.long, device=self.engine.device)
        logits = self.engine.last_logits(ids, request.prefill_cache)
        request.prefilled += take
        if request.prefilled == len(request.prompt):
            self.cache.insert_prefill(request.prefill_cache, rows=[slot])
            request.prefill_cache = None
            self._sample([slot], logits)

    def _decode(self, active: list[int]) -> None:
        n = active[-1] + 1
        ids = [[0]] * n
        for i in range(n):
            request = self.slots[i]
            if request is None or not request.decoding:
                self.cache.pos[i] = 0  # not decoding in this batch: it computes garbage at position 0
            else:
                ids[i] = [request.last_token]
        ids_tensor = torch.tensor(ids, dtype=torch.long, device=self.engine.device)
        logits = self.engine.last_logits(ids_tensor, self.cache.first_rows(n))
        self._sample(active, logits if len(active) == n else logits[active])

    def _sample(self, slots: list[int], logits: torch.Tensor) -> None:
        """Sample each request's next token from its row of `logits`, hand the text to the clients.
        A row that fails (its sampling, its tool call, its text) fails its request alone."""
        try:
            picks = list(zip(*self.sampler.sample(logits, slots), strict=True))
        except Exception:  # find the culprit: sample the rows one by one
            picks = []
            for i, slot in enumerate(slots):
                try:
                    tokens, logprobs = self.sampler.sample(logits[i : i + 1], [slot])
                    picks.append((tokens[0], logprobs[0]))
                except Exception as e:
                    log.exception("sampling failed")
                    self._fail(slot, e)
                    picks.append(None)
        outbox: dict[asyncio.AbstractEventLoop, list] = {}
        observed: tuple[list[int], list[int]] = ([], [])
        for slot, pick in zip(slots, picks, strict=True):
            request = self.slots[slot]
            if pick is None or request is None:
                continue
            try:
                deltas = request.advance(*pick)
            except Exception as e:
                log.exception("generation failed")
                self._fail(slot, e)
                continue
            observed[0].append(slot)
            observed[1].append(request.last_token)
            if deltas:
                outbox.setdefault(request.loop, []).append((request, deltas))
            if request.row.finish_reason:
                with self._lock:
                    self.slots[slot] = None
        self.sampler.observe(*observed)
        for loop, items in outbox.items():
            _deliver(loop, items)

    def _score(self, prompt: list[int], top_logprobs: int) -> list[TokenLogprob | None]:
        """Run the prompt through the model in chunks and read each token's log-prob off the logits
        of the position before it."""
        cache = KVCache.for_model(self.engine.model, 1, len(prompt))
        scores: list[TokenLogprob | None] = [None]
        tokenizer = self.engine.tokenizer
        for start in range(0, len(prompt), PREFILL_CHUNK):
            ids = torch.tensor([prompt[start : start + PREFILL_CHUNK]], device=self.engine.device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.engine.device.type == "cuda"):
                logits = self.engine.model(ids, kv_cache=cache)[0, :, : self.engine.vocab_size]
            targets = prompt[start + 1 : start + 1 + logits.size(0)]  # the next token of each position
            if targets:
                measured = measure_logprobs(logits[: len(targets)], targets, [top_logprobs] * len(targets))
                scores += [
                    token_logprob(tokenizer, t, m.logprob, m.top)
                    for t, m in zip(targets, measured, strict=True)
                ]
        return scores
