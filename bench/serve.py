"""Serving benchmark: the real picochat server under concurrent streaming clients.

A child process runs `picochat.serve.app.create_app` with the `ContinuousBatchingBackend` on a randomly
initialised depth-4 model (width 256; `train base`'s default architecture, or `--plain`) and a
tokenizer trained on the bundled pretraining data, served by uvicorn on 127.0.0.1. This process then
drives it with plain asyncio HTTP clients (cheap, so they take little CPU from the server on a small
machine):

1. load: N concurrent streaming clients (default 16) send M requests (default 200) in total; prints
   requests/s, generated tokens/s, p50/p99 latency, time to first token and inter-token latency (the
   gap between two streamed content chunks), and the error count;
2. batching: 1, 8 and 32 concurrent streams (--streams), taking turns for --repeats rounds: tokens/s
   per stream and in total (medians), p50/p99 time to first token and inter-token latency, and the
   total throughput of 8 streams over one stream's (target: >= 5x).

The model's special tokens are made unlikely enough (zero lm_head rows, top-k 50) that every reply runs
to max_tokens, so all runs do the same work. Run: `nice .venv/bin/python bench/serve.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import statistics
import time
import urllib.request
from dataclasses import dataclass, field

TARGET_SPEEDUP = 5.0


def build_app(
    depth: int, vocab: int, max_batch_size: int, max_queue: int, context: int, plain: bool, bf16_head: bool
):
    """The server app: a random depth-`depth` model (train base's default architecture, or the plain one)
    and a freshly trained tokenizer behind the backend."""
    import pyarrow.parquet as pq
    import torch

    from picochat.common import DATA_DIR
    from picochat.engine import Engine
    from picochat.gpt import GPT, GPTConfig
    from picochat.serve.app import create_app
    from picochat.serve.batching import ContinuousBatchingBackend
    from picochat.tokenizer import Tokenizer
    from picochat.train.flags import default_architecture

    texts = pq.read_table(DATA_DIR / "pretrain" / "shard_00000.parquet", columns=["text"])["text"].to_pylist()
    tokenizer = Tokenizer.train_from_iterator(texts[:150], vocab)
    torch.manual_seed(0)
    width = 64 * depth
    config = GPTConfig(
        sequence_len=context,
        vocab_size=tokenizer.get_vocab_size(),
        n_layer=depth,
        n_head=width // 64,
        n_kv_head=width // 64,
        n_embd=width,
        **default_architecture(context, plain),
    )
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():  # init_weights zeroes the output projections: give all a value
            p.normal_(0.0, p.shape[-1] ** -0.5)
        model.lm_head.weight[list(tokenizer.get_special_tokens().values())] = 0.0  # never in the top 50
    engine = Engine(model.eval(), tokenizer, bf16_head=bf16_head)
    backend = ContinuousBatchingBackend(
        engine, f"bench-d{depth}", max_batch_size=max_batch_size, max_queue=max_queue
    )
    return create_app(backend)


def serve(port: int, threads: int | None, args: dict) -> None:
    """The child process: run the server until terminated."""
    import torch
    import uvicorn

    from picochat.serve.batching import leave_a_core_to_the_event_loop

    if threads:
        torch.set_num_threads(threads)
    else:
        leave_a_core_to_the_event_loop()  # as `picochat serve` does
    app = build_app(**args)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---------------------------------------------------------------------------------------------
# A minimal streaming HTTP client (chunked transfer encoding, server-sent events)


@dataclass
class Result:
    ok: bool
    latency: float = 0.0  # request sent -> last byte
    ttft: float = 0.0  # request sent -> first content token
    tokens: int = 0  # completion tokens (from the usage chunk)
    gaps: list[float] = field(default_factory=list)  # seconds between consecutive content chunks


async def stream_chat(port: int, question: str, max_tokens: int) -> Result:
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": question}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": max_tokens,
            "temperature": 1.0,
            "top_k": 50,
        }
    ).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        status = (await reader.readline()).split()[1]
        while (await reader.readline()) not in (b"\r\n", b""):  # headers
            pass
        if status != b"200":
            return Result(ok=False)
        result, buffer, last = Result(ok=True), b"", 0.0
        while True:
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                break
            buffer += (await reader.readexactly(size + 2))[:-2]
            *events, buffer = buffer.split(b"\n\n")
            for event in events:  # parse only the chunks we need: the clients share the server's CPU
                if b'"usage"' in event or b'"error"' in event:
                    chunk = json.loads(event.removeprefix(b"data: "))
                    result.ok = result.ok and "error" not in chunk
                    result.tokens = chunk.get("usage", {}).get("completion_tokens", 0)
                elif b'"content": "' in event and b'"content": ""' not in event:
                    now = time.perf_counter()
                    if result.ttft:
                        result.gaps.append(now - last)
                    else:
                        result.ttft = now - start
                    last = now
        result.latency = time.perf_counter() - start
        return result
    except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
        return Result(ok=False)
    finally:
        writer.close()


async def run_clients(port: int, clients: int, requests: int, max_tokens: int) -> tuple[list[Result], float]:
    """`clients` concurrent clients send `requests` requests in total; (results, wall time)."""
    remaining = iter(range(requests))
    results: list[Result] = []

    async def client() -> None:
        for i in remaining:
            results.append(await stream_chat(port, f"Question {i}: what is the weather like?", max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def report_load(results: list[Result], wall: float, clients: int) -> None:
    good = [r for r in results if r.ok]
    errors = len(results) - len(good)
    print(f"load: {clients} concurrent streaming clients, {len(results)} requests in {wall:.1f} s", end="")
    print(f", {errors} errors")
    if not good:
        return
    latency = [r.latency * 1e3 for r in good]
    ttft = [r.ttft * 1e3 for r in good]
    tokens = sum(r.tokens for r in good)
    print(f"  {len(good) / wall:.2f} requests/s, {tokens / wall:,.0f} generated tokens/s")
    print(f"  latency p50 {percentile(latency, 50):,.0f} ms, p99 {percentile(latency, 99):,.0f} ms")
    print(f"  time to first token p50 {percentile(ttft, 50):,.0f} ms, p99 {percentile(ttft, 99):,.0f} ms")
    print_itl(good)


def print_itl(results: list[Result]) -> None:
    gaps = [g * 1e3 for r in results for g in r.gaps]
    if gaps:
        print(f"  inter-token latency p50 {percentile(gaps, 50):,.1f} ms, p99 {percentile(gaps, 99):,.1f} ms")


async def stream_rates(port: int, streams: list[int], max_tokens: int, repeats: int) -> dict[int, float]:
    """Median aggregate tokens/s of each number of concurrent streams, the numbers taking turns
    (1 8 32 1 8 32 ...) so that all of them see the same machine load; prints the per-stream rate and
    the latencies of all runs."""
    rates: dict[int, list[float]] = {n: [] for n in streams}
    everything: dict[int, list[Result]] = {n: [] for n in streams}
    for _ in range(repeats):
        for n in streams:
            results, wall = await run_clients(port, n, n, max_tokens)
            if not all(r.ok for r in results):
                raise RuntimeError("a request failed during the throughput measurement")
            rates[n].append(sum(r.tokens for r in results) / wall)
            everything[n] += results
    totals = {n: statistics.median(rates[n]) for n in streams}
    for n in streams:
        ttft = [r.ttft * 1e3 for r in everything[n]]
        print(
            f"{n} concurrent streams: {totals[n]:,.0f} tokens/s in total, {totals[n] / n:,.0f} per stream; "
            f"time to first token p50 {percentile(ttft, 50):,.0f} ms, p99 {percentile(ttft, 99):,.0f} ms"
        )
        print_itl(everything[n])
    return totals


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(port: int, process: mp.Process, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.is_alive():
            raise RuntimeError("the server process died while starting")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent streaming clients (load test)")
    parser.add_argument("--requests", type=int, default=200, help="requests in total (load test)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per reply (load test)")
    parser.add_argument("--stream-tokens", type=int, default=256, help="tokens per reply (8 vs 1 streams)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each streams measurement (median kept)"
    )
    parser.add_argument(
        "--streams", type=int, nargs="+", default=[1, 8, 32], help="concurrent streams (1 and 8 needed)"
    )
    parser.add_argument("--max-batch-size", type=int, default=32, help="the server's batch slots")
    parser.add_argument("--max-queue", type=int, default=64, help="the server's queue (beyond: 429)")
    parser.add_argument("--depth", type=int, default=4, help="model depth (width = 64 x depth)")
    parser.add_argument("--vocab", type=int, default=8192, help="tokenizer / model vocabulary size")
    parser.add_argument(
        "--plain", action="store_true", help="the plain architecture instead of train base's default"
    )
    parser.add_argument(
        "--bf16-head", action="store_true", help="decode the lm_head in bf16 (picochat serve --bf16-head)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="the server's torch threads (default: as picochat serve, all cores but one)",
    )
    args = parser.parse_args()

    port = free_port()
    server_args = {
        "depth": args.depth,
        "vocab": args.vocab,
        "max_batch_size": args.max_batch_size,
        "max_queue": args.max_queue,
        "context": 1024,
        "plain": args.plain,
        "bf16_head": args.bf16_head,
    }
    process = mp.get_context("spawn").Process(
        target=serve, args=(port, args.threads, server_args), daemon=True
    )
    process.start()
    try:
        wait_until_up(port, process)
        print(
            f"server: depth-{args.depth} random model, vocab {args.vocab}, {args.max_batch_size} batch slots"
        )
        asyncio.run(run_clients(port, 2, 4, 8))  # warm-up
        results, wall = asyncio.run(run_clients(port, args.clients, args.requests, args.max_tokens))
        report_load(results, wall, args.clients)
        totals = asyncio.run(stream_rates(port, args.streams, args.stream_tokens, args.repeats))
        one, eight = totals[1], totals[8]
        verdict = "met" if eight >= TARGET_SPEEDUP * one else "NOT met"
        print(
            f"batching: 1 stream {one:,.0f} tokens/s, 8 concurrent streams {eight:,.0f} tokens/s in total: "
            f"{eight / one:.1f}x (target {TARGET_SPEEDUP:.0f}x {verdict})"
        )
    finally:
        process.terminate()
        process.join(timeout=10)


if __name__ == "__main__":
    main()
