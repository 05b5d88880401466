"""Helper for the DDP tests: a few optimiser steps of a tiny GPT on fixed batches, alone or under torchrun.

`python ddp_steps_worker.py OUT MICRO_PER_RANK [compile]`: every step uses the same 2 x MICRO_PER_RANK
micro-batches in total; each rank accumulates its MICRO_PER_RANK of them (alone, with MICRO_PER_RANK=2,
the process takes them all). Rank 0 writes the weights and losses to the safetensors file OUT, with the
number of DDP all-reduce calls (counted by a communication hook) and the number of gradient buckets.
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import save_file
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from picochat.common import cleanup_runtime, init_runtime
from picochat.gpt import GPT, GPTConfig
from picochat.train.base import model_shape
from picochat.train.loop import accumulate_gradients, ddp_module, optimizer_step, wrap_model

STEPS = 3
VOCAB = 64
SEQ_LEN = 16


def main(out_path: str, micro_per_rank: int, compile_model: bool) -> None:
    _, rank, _, world_size, device = init_runtime("cpu")
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=SEQ_LEN, vocab_size=VOCAB, **model_shape(2, 32, 16))
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    optimizers = model.setup_optimizers(
        unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0
    )

    # The same micro-batches every step, so that the loss visibly falls.
    total = 2 * micro_per_rank if world_size > 1 else micro_per_rank
    rows = torch.randint(0, VOCAB, (total, 4, SEQ_LEN + 1), generator=torch.Generator().manual_seed(1))
    mine = [rows[rank * micro_per_rank + i] for _ in range(STEPS) for i in range(micro_per_rank)]
    batches = iter((r[:, :-1], r[:, 1:]) for r in mine)
    trained = wrap_model(model, world_size, compile_model=compile_model)
    calls: list[int] = []  # the bucket index of every all-reduce DDP made

    def counting_hook(state, bucket):  # unannotated: DDP checks real annotations, not strings
        calls.append(bucket.index())
        return allreduce_hook(state, bucket)

    ddp = ddp_module(trained)
    if ddp is not None:
        ddp.register_comm_hook(None, counting_hook)
    losses = []
    for _ in range(STEPS):
        loss, _ = accumulate_gradients(trained, batches, micro_per_rank)
        optimizer_step(trained, optimizers, 1.0, 0.9, 1.0)
        losses.append(loss)
    if rank == 0:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        meta = {"losses": json.dumps(losses), "allreduces": str(len(calls)), "buckets": str(len(set(calls)))}
        save_file(state, out_path, metadata=meta)
    cleanup_runtime()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:] == ["compile"])
