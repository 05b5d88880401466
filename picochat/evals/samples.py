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


CHAT_PROMPTS = [
    "Hi! Who are you?",
    "What is the capital of France?",
    "How many 'r' are there in the word strawberry?",
]


@torch.no_grad()
def sample_replies(model: torch.nn.Module, tokenizer: Any, max_tokens: int = 128) -> list[dict[str, Any]]:
    """Greedy replies of a chat model to a few held-out prompts (one a GSM8K test question): the text,
    whether the turn ended with <|assistant_end|>, and whether the model called the calculator."""
    from picochat.engine import Engine
    from picochat.sampling import SamplingParams
    from picochat.tasks import GSM8K

    was_training = model.training
    model.eval()
    engine = Engine(model, tokenizer)
    question = GSM8K("test", stop=1)[0]["messages"][0]["content"]
    python_start = tokenizer.encode_special("<|python_start|>")
    samples = []
    for prompt in [*CHAT_PROMPTS, question]:
        conversation = {"messages": [{"role": "user", "content": prompt}]}
        tokens = tokenizer.render_for_completion(conversation)
        if len(tokens) >= engine.max_context:  # a small-context model cannot hold the GSM8K question
            continue
        reply, finish = [], None
        for (step,) in engine.stream(tokens, 1, SamplingParams(temperature=0.0, max_tokens=max_tokens)):
            if step is not None:
                reply.append(step.token)
                finish = step.finish_reason or finish
        samples.append(
            {
                "prompt": prompt,
                "reply": tokenizer.decode(reply),
                "ended": finish == "stop",
                "tool_call": python_start in reply,
            }
        )
    model.train(was_training)
    return samples
