"""Side-by-side benchmark: picochat and nanochat on the same workloads, interleaved, in one run.

    .venv/bin/python bench/peer.py --nanochat /path/to/nanochat

PATH is a local checkout of karpathy/nanochat with its own virtual environment (PATH/.venv, or give
--nanochat-python); nothing is installed into picochat. Every measurement runs in a fresh subprocess:
picochat's with this interpreter, nanochat's with nanochat's interpreter and nanochat's own code (the
worker functions below import only that project's modules). The two sides alternate, A B A B, for
--repeats rounds, and the medians and their ratios are printed, so both sides see the same machine
load. Workloads, identical on both sides (randomly initialised weights, fp32 on CPU):
  - training: depths 4 and 6 (width 64 x depth, head dim 64, vocab 32,768, sequence 512, steps of
    16,384 tokens in micro-batches of 8 rows, AdamW + Muon): tokens/s and peak RSS;
  - inference: depth 4, width 256, vocab 32,768, a 128-token prompt, 256 new tokens, temperature 1,
    top-k 50: decode tokens/s at batch 1, 8 and 32, time to first token and prefill tokens/s
    (prompt tokens over the time to first token, at batch 1).
Each side builds its own default architecture (picochat: `train base`'s defaults, value embeddings,
smear, QK scale, bigram table, attention gates and sliding windows SSSL with a short window of a
sixty-fourth of the context; nanochat: value embeddings, smear, backout, residual scalars and sliding
windows SSSL with a short window of a quarter of the context rounded up to 128), so each trains and
decodes the model its users get. `--plain` gives picochat the plain architecture instead;
`--bf16-head` decodes picochat's lm_head in bf16 (`picochat chat/serve --bf16-head`; nanochat has no
such option, so the rows then compare fp32 nanochat with it).
`--only train|infer` runs one half. The machine's other load moves absolute figures; ratios of
interleaved runs are what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULT_PREFIX = "PEER_RESULT "
HERE = Path(__file__).resolve().parent
SPECIALS = (
    "bos user_start user_end assistant_start assistant_end python_start python_end output_start output_end"
)


# ---------------------------------------------------------------------------------------------
# Workers: run in a subprocess, print one JSON result line


def random_weights(torch, model) -> None:
    """Every weight N(0, 1/fan_in): init schemes zero some projections, which would skip work."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5)


class FakeTokenizer:
    """What both engines need of a tokenizer; special ids lie past the model's vocabulary, so a random
    model never samples one and every run decodes exactly the requested number of tokens."""

    def __init__(self, vocab_size: int) -> None:
        self.special = {f"<|{name}|>": vocab_size + i for i, name in enumerate(SPECIALS.split())}

    def get_vocab_size(self) -> int:
        return max(self.special.values()) + 1

    def encode_special(self, name: str) -> int:
        return self.special[name]

    def get_special_tokens(self) -> dict[str, int]:
        return dict(self.special)

    def get_bos_token_id(self) -> int:
        return self.special["<|bos|>"]

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))

    def encode(self, text, *args, **kwargs) -> list[int]:
        return []


def build_model(torch, side: str, depth: int, vocab: int, seq_len: int, plain: bool):
    width = 64 * depth
    kw = dict(
        sequence_len=seq_len, vocab_size=vocab, n_layer=depth, n_head=width // 64, n_kv_head=width // 64
    )
    if side == "picochat":
        from picochat.gpt import GPT, GPTConfig
        from picochat.train.flags import default_architecture

        model = GPT(GPTConfig(n_embd=width, **kw, **default_architecture(seq_len, plain)))
    else:
        from nanochat.gpt import GPT, GPTConfig

        model = GPT(GPTConfig(n_embd=width, **kw))
    model.init_weights()
    return model


def infer_worker(
    side: str, batch: int, prompt_len: int, new_tokens: int, plain: bool, bf16_head: bool = False
) -> dict:
    import torch

    torch.manual_seed(0)
    vocab = 32768
    model = build_model(torch, side, 4, vocab, prompt_len + new_tokens, plain)
    random_weights(torch, model)
    model.eval()
    tokenizer = FakeTokenizer(vocab)
    prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    if side == "picochat":
        from picochat.engine import Engine
        from picochat.sampling import SamplingParams

        engine = Engine(model, tokenizer, bf16_head=bf16_head)

        def run(n: int, max_tokens: int):
            params = SamplingParams(temperature=1.0, top_k=50, max_tokens=max_tokens, seed=0)
            return engine.generate(prompt, n, params)
    else:
        from nanochat.engine import Engine

        engine = Engine(model, tokenizer)

        def run(n: int, max_tokens: int):
            return engine.generate(
                prompt, num_samples=n, max_tokens=max_tokens, temperature=1.0, top_k=50, seed=0
            )

    for _ in run(batch, 8):  # warm-up: first-call allocations and kernel selection
        pass
    start = time.perf_counter()
    first, steps = None, 0
    for _ in run(batch, new_tokens):
        steps += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    if steps != new_tokens:
        raise SystemExit(f"expected {new_tokens} steps, got {steps}")
    ttft = first - start
    return {
        "ttft_ms": ttft * 1e3,
        "decode_tok_s": batch * (steps - 1) / (end - first),
        "prefill_tok_s": prompt_len / ttft,
    }


def train_worker(side: str, depth: int, steps: int, plain: bool) -> dict:
    import torch

    vocab, seq_len, total, micro = 32768, 512, 16384, 8
    if side == "picochat":
        from picochat.common import keep_freed_memory

        keep_freed_memory()  # as every picochat stage's init_runtime does
    model = build_model(torch, side, depth, vocab, seq_len, plain)
    if side == "picochat":
        optimizers = model.setup_optimizers()
    else:
        optimizers = [model.setup_optimizer()]
    accum = total // (seq_len * micro)
    data = torch.randint(0, vocab, (accum, micro, seq_len + 1), generator=torch.Generator().manual_seed(0))
    params = list(model.parameters())
    times = []
    for _ in range(steps + 1):  # the first step is a warm-up
        t0 = time.perf_counter()
        for batch in data:
            loss = model(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {
        "tok_s": total / statistics.median(times[1:]),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }


def worker_main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    kind = spec.pop("kind")
    result = infer_worker(**spec) if kind == "infer" else train_worker(**spec)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# The driver


def run_worker(python: str, root: Path, spec: dict, threads: int | None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(
        [python, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=1800,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{spec}: benchmark subprocess failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        return worker_main(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nanochat", type=Path, required=True, help="a nanochat checkout (with .venv inside)")
    p.add_argument(
        "--nanochat-python", default=None, help="nanochat's interpreter (default PATH/.venv/bin/python)"
    )
    p.add_argument("--repeats", type=int, default=3, help="A B rounds per measurement (medians reported)")
    p.add_argument(
        "--train-steps", type=int, default=2, help="timed training steps per run (after 1 warm-up)"
    )
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="decode batch sizes")
    p.add_argument("--only", choices=["train", "infer"], default=None, help="run only one half")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both sides")
    p.add_argument(
        "--train-depths", type=int, nargs="+", default=[4, 6], help="model depths of the training half"
    )
    p.add_argument(
        "--plain", action="store_true", help="picochat's plain architecture instead of train base's default"
    )
    p.add_argument(
        "--bf16-head", action="store_true", help="decode picochat's lm_head in bf16 (picochat.decode_head)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    p.add_argument(
        "--markdown",
        type=Path,
        default=None,
        help="rewrite the table between the peer markers of this file (docs/performance.md)",
    )
    args = p.parse_args()
    nano_python = args.nanochat_python or str(args.nanochat / ".venv" / "bin" / "python")
    if not Path(nano_python).exists():
        raise SystemExit(f"no interpreter at {nano_python}; create nanochat's venv or pass --nanochat-python")
    sides = {"picochat": (sys.executable, HERE.parent), "nanochat": (nano_python, args.nanochat.resolve())}
    specs: list[tuple[str, dict]] = []
    if args.only != "infer":
        specs += [
            (f"train depth {d}", {"kind": "train", "depth": d, "steps": args.train_steps})
            for d in args.train_depths
        ]
    if args.only != "train":
        specs += [
            (
                f"infer batch {b}",
                {
                    "kind": "infer",
                    "batch": b,
                    "prompt_len": 128,
                    "new_tokens": 256,
                    "bf16_head": args.bf16_head,
                },
            )
            for b in args.batches
        ]
    print(f"picochat vs nanochat ({args.nanochat}), {args.repeats} interleaved rounds, medians", flush=True)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, spec in specs:
        runs: dict[str, list[dict]] = {"picochat": [], "nanochat": []}
        for _ in range(args.repeats):
            for side, (python, root) in sides.items():
                spec_side = {**spec, "side": side, "plain": args.plain}
                runs[side].append(run_worker(python, root, spec_side, args.threads))
        results[name] = {
            side: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for side, rs in runs.items()
        }
        print_row(name, results[name])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.markdown:
        write_markdown(args.markdown, results, " ".join(sys.argv[1:]))
    return 0


MARKERS = ("<!-- peer:start -->", "<!-- peer:end -->")


def write_markdown(path: Path, results: dict[str, dict[str, dict[str, float]]], argv: str) -> None:
    """Replace the text between MARKERS in `path` by a table of the results (atomically)."""
    text = path.read_text()
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    lines = [
        "",
        f"`bench/peer.py {argv}`, {time.strftime('%Y-%m-%d')}, medians of interleaved runs:",
        "",
        "| workload | measure | picochat | nanochat | ratio |",
        "|---|---|---|---|---|",
    ]
    for name, result in results.items():
        for key, ours in result["picochat"].items():
            theirs = result["nanochat"][key]
            lines.append(f"| {name} | {key} | {ours:,.1f} | {theirs:,.1f} | {ours / theirs:.2f}x |")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text[:start] + "\n".join(lines) + "\n" + text[end:])
    os.replace(tmp, path)


LOWER_IS_BETTER = {"ttft_ms", "peak_rss_gb"}


def print_row(name: str, result: dict[str, dict[str, float]]) -> None:
    ours, theirs = result["picochat"], result["nanochat"]
    cells = []
    for key in ours:
        ratio = ours[key] / theirs[key]
        better = "lower" if key in LOWER_IS_BETTER else "higher"
        cells.append(f"{key} {ours[key]:,.1f} vs {theirs[key]:,.1f} ({ratio:.2f}x, {better} is better)")
    print(f"{name}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
