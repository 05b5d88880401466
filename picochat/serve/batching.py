"""Continuous batching: the real `Backend` of `picochat serve` (see picochat/serve/backend.py).

One background thread owns the model. Requests wait in a bounded queue (`QueueFullError` when it is
full) and are given one of `max_batch_size` slots of a shared KV cache as slots free up. Each loop of the
thread:
  1. frees the slots of cancelled requests (a client that disconnected leaves here; a finished reply
     frees its slot as soon as it ends);
  2. prefills each waiting request on its own (batch 1) into a free slot and samples its first token,
     so a new request gets its first token without waiting for the others' replies to end;
  3. runs ONE batched forward pass that decodes one token for every active slot. Rows sit at different
     positions: the KV cache keeps a length per row, which sets each row's rotary position, where its
     new key/value are written, and the attention mask that hides other rows' longer histories.
The batch is the occupied prefix of the slots (slots are handed out lowest first), so a lone request
decodes at batch 1. Each request's rows go through the engine's `RowState` (sampling, tool calls,
stopping) exactly as in `picochat.engine.Engine`, and its text reaches the request's asyncio queue via
`loop.call_soon_threadsafe` (one call per step for all requests). On a 2-core CPU with a depth-4 model,
8 concurrent streams through the server get 4.4x the tokens/s of one (bench/serve.py).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from picochat.engine import (
    Engine,
    ReplyText,
    RowState,
    Step,
    context_notice,
    fit_conversation,
    load_engine,
    make_generator,
    prompt_budget,
    sample_next_token,
)
from picochat.gpt import KVCache
from picochat.serve.backend import Delta, QueueFullError, SamplingParams, ShuttingDownError

log = logging.getLogger("picochat.serve")


class _Request:
    """One reply being generated. The event loop reads `deltas`; the worker thread owns the rest."""

    def __init__(self, engine: Engine, prompt: list[int], params: SamplingParams, loop) -> None:
        self.prompt, self.params, self.loop = prompt, params, loop
        self.deltas: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # set by the event loop when the client goes away
        self.row = RowState(engine.tokens, engine.reply_budget(len(prompt), params.max_tokens))
        self.text = ReplyText(engine.tokenizer)
        self.generator = make_generator(params.seed, engine.device)
        self.last_token = 0  # the row's newest token, fed to the model at the next step

    def advance(self, sampled: int) -> list[Delta]:
        """Take this step's token (or a forced one); return the deltas for the client (the last one
        carries the finish_reason when the reply is over)."""
        step: Step = self.row.next_token(sampled)
        self.last_token = step.token
        pieces = self.text.feed(step.token, step.kind)
        if step.finish_reason:
            pieces += self.text.flush()
        deltas = [Delta(text=text, kind=kind) for kind, text in pieces]
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


def _deliver(
    loop: asyncio.AbstractEventLoop, items: list[tuple[_Request, list[Delta] | BaseException]]
) -> None:
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


def _first_rows(cache: KVCache, n: int) -> KVCache:
    """A KVCache over the first n rows of `cache`, sharing its tensors: a step costs n rows, not all."""
    view = copy.copy(cache)
    view.k, view.v, view.pos, view.batch_size = cache.k[:, :n], cache.v[:, :n], cache.pos[:n], n
    return view


class ContinuousBatchingBackend:
    """A `picochat.serve.backend.Backend` that decodes up to `max_batch_size` replies together."""

    def __init__(self, engine: Engine, model_name: str, max_batch_size: int = 8, max_queue: int = 32) -> None:
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError("max_batch_size must be at least 1 and max_queue at least 0")
        self.engine = engine
        self.model_name = model_name
        self.max_context = engine.max_context
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.cache = KVCache.for_model(engine.model, max_batch_size, engine.max_context)
        self.slots: list[_Request | None] = [None] * max_batch_size
        self._waiting: deque[_Request] = deque()
        self._lock = threading.Condition()  # guards slots, _waiting, _closing; wakes the idle worker
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
    ) -> ContinuousBatchingBackend:
        engine, meta = load_engine(source, model_tag, step, device_type)
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
        for request in leftovers:
            request.send(ShuttingDownError())

    async def generate(self, messages: list[dict], params: SamplingParams):
        self._start_worker()
        # Rendering a long chat is real work: keep it off the event loop.
        prompt, notice = await asyncio.to_thread(self._prompt, messages, params.max_tokens)
        request = _Request(self.engine, prompt, params, asyncio.get_running_loop())
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

    def _prompt(self, messages: list[dict], max_tokens: int) -> tuple[list[int], str | None]:
        budget = prompt_budget(self.max_context, max_tokens)
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
                while not self._closing and not self._waiting and not any(self.slots):
                    self._lock.wait()
                if self._closing:
                    return
                joining = self._assign_slots()
            for slot, request in joining:
                self._guarded([slot], self._prefill, slot, request)
            active = [i for i, request in enumerate(self.slots) if request is not None]
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

    def _guarded(self, slots: list[int], work: Callable[..., None], *args: object) -> None:
        """Run work(*args); if it fails, fail the requests of `slots` (not the whole server)."""
        try:
            work(*args)
        except Exception as e:
            log.exception("generation failed")
            for slot in slots:
                request = self.slots[slot]
                if request is not None:
                    request.send(RuntimeError(f"generation failed: {e}"))
                    request.cancelled = True

    def _prefill(self, slot: int, request: _Request) -> None:
        logits, prompt_cache = self.engine.prefill(request.prompt)
        self.cache.insert_prefill(prompt_cache, rows=[slot])
        self._sample([slot], logits)

    def _decode(self, active: list[int]) -> None:
        n = active[-1] + 1
        ids = [[0]] * n
        for i in range(n):
            request = self.slots[i]
            if request is None:
                self.cache.pos[i] = 0  # an idle row in the batch: it computes garbage at position 0
            else:
                ids[i] = [request.last_token]
        ids_tensor = torch.tensor(ids, dtype=torch.long, device=self.engine.device)
        logits = self.engine.last_logits(ids_tensor, _first_rows(self.cache, n))
        self._sample(active, logits if len(active) == n else logits[active])

    def _sample(self, slots: list[int], logits: torch.Tensor) -> None:
        """Sample each request's next token from its row of `logits`, hand the text to the clients."""
        requests = [self.slots[slot] for slot in slots]
        tokens = _sample_rows(requests, logits)
        outbox: dict[asyncio.AbstractEventLoop, list] = {}
        for slot, request, token in zip(slots, requests, tokens, strict=True):
            deltas = request.advance(token)
            if deltas:
                outbox.setdefault(request.loop, []).append((request, deltas))
            if request.row.finish_reason:
                with self._lock:
                    self.slots[slot] = None
        for loop, items in outbox.items():
            _deliver(loop, items)


def _sample_rows(requests: list[_Request], logits: torch.Tensor) -> list[int]:
    """Each request's sampled token, with its own settings. Rows with the same settings and no seed are
    sampled in one call; a seeded row gets its own call with its own generator (so its reply does not
    depend on what else is in the batch)."""
    groups: dict[object, list[int]] = {}
    for i, request in enumerate(requests):
        p = request.params
        if p.temperature == 0.0:
            key: object = "greedy"
        elif request.generator is not None:
            key = i
        else:
            key = (p.temperature, p.top_k, p.top_p)
        groups.setdefault(key, []).append(i)
    tokens = [0] * len(requests)
    for rows in groups.values():
        p, generator = requests[rows[0]].params, requests[rows[0]].generator
        group_logits = logits if len(rows) == len(requests) else logits[rows]
        picked = sample_next_token(group_logits, p.temperature, p.top_k, p.top_p, generator)
        for i, token in zip(rows, picked.tolist(), strict=True):
            tokens[i] = token
    return tokens
