"""Test helpers for the engine and the batching server: a tiny tokenizer, tiny random GPTs, and a GPT
whose reply is rigged to follow a script (to force tool calls and stop tokens).

Shared by the engine, batching, model and Hugging Face tests (not a test module itself).
"""

from __future__ import annotations

from typing import Any

import torch

from picochat.gpt import GPT, GPTConfig
from picochat.tokenizer import Tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "What is 2+3? Let me compute: 2+3 = 5. The answer is 5.",
    "Hello there! How are you today? I am fine, thank you for asking.",
    "Calculators add numbers: 12*4 = 48 and 48/2 = 24.",
    "héllo wörld, naïve café, 😀 emoji and ünïcödé text.",
]
VOCAB = 320


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train_from_iterator(CORPUS, VOCAB)


def tiny_config(vocab_size: int, sequence_len: int = 64, **extras: Any) -> GPTConfig:
    """A 2-layer, 32-wide config; `extras` are architecture extras (e.g. smear=True)."""
    return GPTConfig(
        sequence_len=sequence_len,
        vocab_size=vocab_size,
        n_layer=2,
        n_head=2,
        n_kv_head=1,
        n_embd=32,
        **extras,
    )


def randomize(model: GPT, tokenizer: Tokenizer, seed: int = 0) -> GPT:
    """Give every weight a random value (init_weights zeroes the output projections, which would make
    attention, and so positions, irrelevant) and make special tokens never the most likely: a random
    model then writes long, position-dependent replies without stopping by chance."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        model.lm_head.weight.mul_(4.0)  # peaky enough that sampling at temperature 1 is not uniform
        model.lm_head.weight[list(tokenizer.get_special_tokens().values())] = 0.0
    return model.eval()


def random_model(config: GPTConfig, seed: int = 0) -> GPT:
    """A model with every weight random (init_weights zeroes output projections, hiding bugs)."""
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def tiny_model(
    tokenizer: Tokenizer,
    seed: int = 0,
    sequence_len: int = 64,
    cls: type = GPT,
    extras: dict | None = None,
    **kw,
) -> GPT:
    model = cls(tiny_config(tokenizer.get_vocab_size(), sequence_len, **(extras or {})), **kw)
    model.init_weights()
    return randomize(model, tokenizer, seed)


class ScriptedGPT(GPT):
    """A random GPT whose reply is rigged: a row about to write the token at position `start + i`
    puts (nearly) all its probability on script[i]. Rows at other positions are left alone."""

    def __init__(self, config: GPTConfig, start: int, script: list[int]) -> None:
        super().__init__(config)
        self.start, self.script = start, script

    def forward(self, idx: torch.Tensor, targets=None, kv_cache=None, loss_reduction: str = "mean", **kw):
        logits = super().forward(idx, targets, kv_cache, loss_reduction, **kw)
        lengths = kv_cache.pos.tolist() if kv_cache is not None else [idx.size(1)] * idx.size(0)
        for row, length in enumerate(lengths):
            i = length - self.start  # the next token is the i-th of the reply
            if 0 <= i < len(self.script):
                logits[row, -1, self.script[i]] = 1000.0
        return logits


def naive_greedy(model: GPT, tokens: list[int], n: int) -> list[int]:
    """Greedy decoding without a KV cache: a full forward pass over the whole sequence at every step."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(tokens) :].tolist()
