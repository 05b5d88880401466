"""Inference benchmark of picochat.engine: prefill and decode speed of a depth-4 model.

A randomly initialised depth-4 GPT (width 256, 4 heads, vocab 32768; `train base`'s default
architecture, value embeddings and smear included, or `--plain`) answers a 128-token prompt with
256 new tokens (temperature 1, top-k 50). Measured: prefill tokens/s, time to first token, and decode
tokens/s at batch 1, 8 and 32 (num_samples rows sharing one prefill). Each figure is the median of
--repeats runs (and the best run, the better estimate on a busy machine). `--profile` adds a
torch.profiler table of the decode steps at batch 8: where the time goes. `--floor` adds, per batch,
the memory floor of a step: the bytes it must read (weights and cached keys/values) over the read
speed measured just then, which bounds the decode speed of any implementation at that precision.
`--compile` also times the forward under torch.compile (dynamic shapes), interleaved with eager, and
prints what compiling cost the first reply of each batch size.

This prints picochat's own figures only; comparisons with nanochat come from bench/peer.py, which runs
both side by side on the same machine in one run.
Run: `nice .venv/bin/python bench/infer.py` (optionally --threads N, --profile).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from picochat.engine import Engine
from picochat.gpt import GPT, GPTConfig
from picochat.sampling import SamplingParams
from picochat.train.flags import default_architecture

SPECIAL_NAMES = (
    "bos user_start user_end assistant_start assistant_end python_start python_end output_start output_end"
).split()


class BenchTokenizer:
    """Just what the engine needs of a tokenizer. The special tokens sit just past the model's vocabulary,
    so the random model can never sample one: every run decodes exactly the requested number of tokens."""

    def __init__(self, vocab_size: int) -> None:
        self.special = {f"<|{name}|>": vocab_size + i for i, name in enumerate(SPECIAL_NAMES)}

    def get_vocab_size(self) -> int:
        return max(self.special.values()) + 1

    def encode_special(self, name: str) -> int:
        return self.special[name]

    def get_special_tokens(self) -> dict[str, int]:
        return dict(self.special)

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))

    def encode(self, text: str) -> list[int]:
        return []


def build_engine(
    depth: int,
    width: int,
    vocab: int,
    context: int,
    device: str = "cpu",
    plain: bool = False,
    bf16_head: bool = False,
) -> Engine:
    """A random model of `train base`'s default architecture (`plain`: the plain one) in an Engine."""
    torch.manual_seed(0)
    config = GPTConfig(
        sequence_len=context,
        vocab_size=vocab,
        n_layer=depth,
        n_head=width // 64,
        n_kv_head=width // 64,
        n_embd=width,
        **default_architecture(context, plain),
    )
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():  # init_weights zeroes the output projections: give every weight a value
        for p in model.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5)
    return Engine(model.to(device).eval(), BenchTokenizer(vocab), bf16_head=bf16_head)


def timed_generation(engine: Engine, prompt: list[int], batch: int, new_tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s after it) of one generation of `batch` rows."""
    start = time.perf_counter()
    first = None
    steps = 0
    for _ in engine.generate(prompt, batch, sampling(new_tokens)):
        steps += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    assert steps == new_tokens, f"expected {new_tokens} steps, got {steps}"
    return first - start, batch * (steps - 1) / (end - first)


def sampling(new_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_k=50, max_tokens=new_tokens, seed=0)


def time_prefill(engine: Engine, prompt: list[int]) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        engine.prefill(prompt)
        return time.perf_counter() - start


def read_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes/s this process reads memory at: the median time to sum a tensor far larger than the cache."""
    data = torch.ones(megabytes * 2**20 // 4)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(times)


def step_bytes(engine: Engine, batch: int, span: float) -> float:
    """Bytes a decode step must read at least: every weight but the embedding tables (only `batch` of
    their rows are read), the lm_head in the dtype the engine decodes it in, plus each row's cached
    keys and values over `span` positions (a short-window layer's over its window), in the cache's
    dtype."""
    model, c = engine.model, engine.model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # Embedding tables are read a row per token, not whole: token, value and bigram embeddings.
    weights -= sum(
        m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Embedding)
    )
    head = model.lm_head.weight
    if engine.head.bf16:
        weights -= head.numel() * (head.element_size() - 2)
    keys = sum(min(span, block.attn.window or span) for block in model.transformer.h)
    return weights + 2 * batch * keys * c.n_kv_head * c.head_dim * head.element_size()


def profile_decode(engine: Engine, prompt: list[int], batch: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in engine.generate(prompt, batch, sampling(64)):
            pass
    print(f"\ntorch.profiler: 64 decode steps at batch {batch}, by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4, help="transformer blocks")
    parser.add_argument("--width", type=int, default=256, help="model width (a multiple of 64)")
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary size")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens generated per row")
    parser.add_argument(
        "--repeats", type=int, default=5, help="runs per measurement (median and best reported)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="decode batch sizes")
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda (runs/gpu_check.sh measures the GPU decode with this)"
    )
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of decoding")
    parser.add_argument(
        "--plain", action="store_true", help="the plain architecture instead of train base's default"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the model's forward under torch.compile(dynamic=True), interleaved with eager",
    )
    parser.add_argument(
        "--bf16-head",
        action="store_true",
        help="decode the lm_head in bf16 (picochat chat/serve --bf16-head)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also print each batch's memory floor: the bytes a step must read over the measured read speed",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    context = args.prompt_tokens + args.new_tokens
    engine = build_engine(
        args.depth, args.width, args.vocab, context, args.device, args.plain, args.bf16_head
    )
    prompt = torch.randint(
        0, args.vocab, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    print(
        f"model: depth {args.depth}, width {args.width}, vocab {args.vocab}, "
        f"{sum(p.numel() for p in engine.model.parameters()) / 1e6:.1f}M parameters; "
        f"{torch.get_num_threads()} threads; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens"
    )
    timed_generation(engine, prompt, 8, min(16, args.new_tokens))  # warm-up: first-call allocations, kernels
    eager = engine.model.forward
    forwards = {"": eager}
    if args.compile:  # the lm_head (DecodeHead) stays eager inside the compiled forward
        forwards = {
            "eager ": eager,
            "compiled ": torch.compile(eager, dynamic=True),
        }
        for batch in args.batches:
            engine.model.forward = forwards["compiled "]
            start = time.perf_counter()
            timed_generation(engine, prompt, batch, min(16, args.new_tokens))
            took = time.perf_counter() - start
            print(f"compiled: batch {batch}'s first 16 tokens (compiling) took {took:.1f} s")

    prefill = [time_prefill(engine, prompt) for _ in range(args.repeats)]
    print(
        f"prefill: {args.prompt_tokens / statistics.median(prefill):,.0f} tokens/s median, "
        f"{args.prompt_tokens / min(prefill):,.0f} best ({statistics.median(prefill) * 1e3:.1f} ms)"
    )
    for batch in args.batches:
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in forwards}
        for _ in range(args.repeats):  # variants take turns, so they see the same machine load
            for name, forward in forwards.items():
                engine.model.forward = forward
                runs[name].append(timed_generation(engine, prompt, batch, args.new_tokens))
        for name in forwards:
            ttft = statistics.median(r[0] for r in runs[name])
            rates = [r[1] for r in runs[name]]
            median, best = statistics.median(rates), max(rates)
            print(
                f"{name}batch {batch}: decode {median:,.0f} tokens/s median, {best:,.0f} best "
                f"({1e3 * batch / median:.2f} ms/step); time to first token {ttft * 1e3:.1f} ms"
            )
        engine.model.forward = eager
        if args.floor:  # the mean cached span of a reply: the prompt plus half the new tokens
            needed = step_bytes(engine, batch, args.prompt_tokens + args.new_tokens / 2)
            bandwidth = read_bandwidth()
            print(
                f"  memory floor: {needed / 1e6:.1f} MB per step at {bandwidth / 1e9:.1f} GB/s read = "
                f"{1e3 * needed / bandwidth:.2f} ms/step, at most {batch * bandwidth / needed:,.0f} tokens/s"
            )
    if args.profile:
        profile_decode(engine, prompt, 8)


if __name__ == "__main__":
    main()
