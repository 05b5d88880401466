"""Helper for test_train_base: a few optimiser steps of a tiny GPT on fixed batches, alone or under torchrun.

Alone it accumulates 2 micro-batches per step; with 2 processes each takes one of them. Both must end
with the same weights and losses. Rank 0 writes them to the safetensors file named on the command line.
"""

from __future__ import annotations

import contextlib
import json
import sys

import torch
from safetensors.torch import save_file

from picochat.common import cleanup_runtime, init_runtime
from picochat.gpt import GPT, GPTConfig
from picochat.train.base import model_shape, train_step, wrap_model

MICRO_BATCHES = 2
STEPS = 3
VOCAB = 64
SEQ_LEN = 16


def main(out_path: str) -> None:
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

    # The same two micro-batches every step, so that the loss visibly falls.
    rows = torch.randint(
        0, VOCAB, (MICRO_BATCHES, 4, SEQ_LEN + 1), generator=torch.Generator().manual_seed(1)
    )
    accum = MICRO_BATCHES // world_size
    mine = [rows[rank * accum + i] for _ in range(STEPS) for i in range(accum)]
    batches = iter((r[:, :-1], r[:, 1:]) for r in mine)
    trained = wrap_model(model, world_size, compile_model=False)
    losses = [
        train_step(trained, optimizers, batches, accum, 1.0, 0.9, 1.0, contextlib.nullcontext())
        for _ in range(STEPS)
    ]
    if rank == 0:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        save_file(state, out_path, metadata={"losses": json.dumps(losses)})
    cleanup_runtime()


if __name__ == "__main__":
    main(sys.argv[1])
