"""Test helpers for post-training and chat evaluation: a PICOCHAT_HOME holding a tiny tokenizer and a
tiny GPT checkpoint saved under a stage name, as `picochat train base` would leave it.

Shared by the mid/SFT/RL and chat-eval tests (not a test module itself).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from picochat.checkpoint import checkpoint_dir_for, save_checkpoint
from picochat.common import get_base_dir
from picochat.gpt import GPT, GPTConfig
from picochat.tasks import GSM8K, SimpleSpelling
from picochat.tokenizer import Tokenizer

VOCAB = 600
MODEL_TAG = "d2"


def corpus() -> list[str]:
    """Text the tiny tokenizer learns from: a few task conversations so chat text encodes compactly."""
    texts = []
    for task in (GSM8K("train", stop=40), SimpleSpelling("train", stop=40)):
        for conv in task:
            for message in conv["messages"]:
                content = message["content"]
                parts = [content] if isinstance(content, str) else [p["text"] for p in content]
                texts.extend(parts)
    return texts


def tokenizer_and_shards(shards: Path) -> None:
    """Train the tiny tokenizer into $PICOCHAT_HOME and write the corpus as 3 pretraining shards to
    `shards` (row groups of 40 texts, so a resumed loader continues inside a shard)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = corpus()
    Tokenizer.train_from_iterator(texts, VOCAB).save(get_base_dir() / "tokenizer")
    shards.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"text": texts[i::3]}), shards / f"shard_{i:05d}.parquet", row_group_size=40)


def tiny_config(vocab_size: int, sequence_len: int = 256) -> GPTConfig:
    return GPTConfig(
        sequence_len=sequence_len, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64
    )


def make_home(stage: str = "base", seed: int = 0, sequence_len: int = 256) -> tuple[Tokenizer, GPT]:
    """Write `$PICOCHAT_HOME/tokenizer/` and a freshly initialised tiny model as checkpoint step 0 of
    `stage` (tag "d2"). Point PICOCHAT_HOME at a temporary folder (monkeypatch.setenv) first."""
    tokenizer = Tokenizer.train_from_iterator(corpus(), VOCAB)
    tokenizer.save(get_base_dir() / "tokenizer")
    torch.manual_seed(seed)
    config = tiny_config(tokenizer.get_vocab_size(), sequence_len)
    model = GPT(config)
    model.init_weights()
    save_checkpoint(
        checkpoint_dir_for(stage, MODEL_TAG),
        0,
        model.state_dict(),
        None,
        {"model_config": dataclasses.asdict(config)},
    )
    return tokenizer, model
