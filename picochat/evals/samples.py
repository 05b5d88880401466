"""Greedy samples from fixed prompts: a quick look at what a base model knows, during and after training."""

from __future__ import annotations

from typing import Any

import torch

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]
SAMPLE_TOKENS = 16


@torch.no_grad()
def sample_greedy(
    model: torch.nn.Module, tokenizer: Any, prompt: str, max_tokens: int, device: torch.device
) -> str:
    """Greedy continuation of `prompt` (no KV cache: a few short forward passes)."""
    bos = tokenizer.get_bos_token_id()
    ids = tokenizer.encode(prompt, prepend=bos)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    seq_len = model.config.sequence_len
    for _ in range(max_tokens):
        logits = model(x[:, -seq_len:])
        nxt = logits[0, -1, : tokenizer.get_vocab_size()].argmax()
        if nxt.item() == bos:
            break
        x = torch.cat([x, nxt.view(1, 1)], dim=1)
    return prompt + tokenizer.decode(x[0, len(ids) :].tolist())
