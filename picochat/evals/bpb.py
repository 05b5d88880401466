"""Bits per byte: a validation loss that does not depend on the tokenizer's vocabulary size.

Mean cross-entropy per token changes when the tokenizer changes (bigger tokens = more nats each), so
models with different tokenizers cannot be compared on it. Instead we sum the loss (in nats) over the
target tokens and divide by the number of UTF-8 bytes those tokens stand for, converted to bits:

    bpb = sum(loss_i over tokens with bytes_i > 0) / (ln 2 * sum(bytes_i))

Special tokens (<|bos|> and friends) stand for no text (byte length 0), so they are left out of both
sums; so are targets masked with a negative index.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist

from picochat.common import pass_bar


@torch.no_grad()
def evaluate_bpb(
    model: torch.nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    token_bytes: torch.Tensor,
) -> float:
    """Bits per byte of `model` over `steps` (inputs, targets) batches, summed over all ranks.

    `token_bytes` is the int tensor [vocab] of each token's UTF-8 byte length (0 for special tokens),
    from `picochat.tokenizer.get_token_bytes(device)`. The model must accept `loss_reduction="none"`.
    """
    device = token_bytes.device
    # float64 sums so millions of small per-token losses add up exactly enough (MPS has no float64).
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64
    total_nats = torch.zeros((), dtype=acc_dtype, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    for _ in pass_bar(range(steps), "val bpb"):
        inputs, targets = next(batches)
        loss = model(inputs, targets, loss_reduction="none").reshape(-1)
        targets = targets.reshape(-1)
        valid = targets >= 0  # negative targets are masked out (ignore_index)
        num_bytes = torch.where(valid, token_bytes[targets.clamp(min=0)], 0)
        total_nats += (loss.to(acc_dtype) * (num_bytes > 0)).sum()
        total_bytes += num_bytes.sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    if total_bytes.item() == 0:
        raise ValueError("no target token stands for any bytes; cannot compute bits per byte")
    return total_nats.item() / (math.log(2) * total_bytes.item())
