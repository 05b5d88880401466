"""The KV cache for inference: keys and values of past tokens, per layer and row, written in place."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from picochat.gpt import GPT


class KVCache:
    """Keys and values of past tokens for every layer, for `batch_size` independent rows.

    Tensors k, v: (n_layer, batch_size, n_kv_head, max_len, head_dim): each head's keys are contiguous,
    the layout attention reads them in (at batch 8 this made decode attention ~20% faster than keeping
    heads interleaved per position, see docs/performance.md). Each row has its own length
    `pos[row]` (the number of tokens cached), so rows may be at different positions: a row can be filled
    by `insert_prefill` from another cache (prefill a prompt once with batch 1, copy it into N rows to
    sample N continuations, or into a free row for continuous batching) while other rows keep decoding.
    A forward pass of T tokens appends them to every row at that row's own position. For a model with
    `smear` or `bigram_embeds` (`keep_tokens`), `tokens` (batch_size, max_len) also holds the token
    ids, so each token's predecessor is known at any position (`previous_tokens`).
    """

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        n_layer: int,
        n_kv_head: int,
        head_dim: int,
        device: Any = None,
        dtype: torch.dtype = torch.float32,
        keep_tokens: bool = False,
    ) -> None:
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.tokens = torch.zeros(batch_size, max_len if keep_tokens else 0, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.batch_size, self.max_len = batch_size, max_len

    @classmethod
    def for_model(
        cls, model: GPT, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """A cache shaped for `model` (max_len defaults to its training context), on its device."""
        c, weight = model.config, model.lm_head.weight
        return cls(
            batch_size,
            max_len or c.sequence_len,
            c.n_layer,
            c.n_kv_head,
            c.head_dim,
            device=weight.device,
            dtype=dtype or weight.dtype,
            keep_tokens=c.smear or c.bigram_embeds > 0,
        )

    def reset(self, rows: list[int] | None = None) -> None:
        """Forget the cached tokens of `rows` (default: all rows); old entries are masked, not cleared."""
        if rows is None:
            self.pos.zero_()
        else:
            self.pos[rows] = 0

    def next_positions(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (B, T) the next `num_tokens` tokens of each row take, and the attention mask
        (B, 1, T, span) letting each of them see its row's cached tokens and itself, not later ones."""
        span = int(self.pos.max()) + num_tokens
        if span > self.max_len:
            raise ValueError(
                f"KV cache overflow: {span} tokens do not fit in max_len {self.max_len}; "
                "make the cache longer or generate fewer tokens"
            )
        positions = self.pos[:, None] + torch.arange(num_tokens, device=self.pos.device)
        keys = torch.arange(span, device=self.pos.device)
        return positions, (keys[None, None, :] <= positions[:, :, None])[:, None]

    def store(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        keys: slice | torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, T, H, D) at `positions` (B, T); return this layer's keys and values at `keys`
        (a slice of positions, the same for every row, or each row's own positions (B, n)), as (B, H, n,
        D), the layout attention takes them in."""
        rows = torch.arange(self.batch_size, device=k.device)[:, None]
        # indices (B, 1) and (B, T) around a full slice: the indexed view is (B, T, H, D), like k and v
        self.k[layer][rows, :, positions] = k.to(self.k.dtype)
        self.v[layer][rows, :, positions] = v.to(self.v.dtype)
        if isinstance(keys, slice):
            return self.k[layer, :, :, keys], self.v[layer, :, :, keys]
        return self.k[layer][rows, :, keys].transpose(1, 2), self.v[layer][rows, :, keys].transpose(1, 2)

    def previous_tokens(
        self, idx: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Record idx (B, T) at `positions`; return each token's predecessor in its row (B, T) and
        whether it has one (False at position 0)."""
        rows = torch.arange(self.batch_size, device=idx.device)[:, None]
        self.tokens[rows, positions] = idx
        return self.tokens[rows, (positions - 1).clamp(min=0)], positions > 0

    def first_rows(self, n: int) -> KVCache:
        """A cache over the first n rows, sharing this one's tensors: a step then costs n rows, not all."""
        view = copy.copy(self)
        view.k, view.v, view.tokens, view.pos = self.k[:, :n], self.v[:, :n], self.tokens[:n], self.pos[:n]
        view.batch_size = n
        return view

    def grown(self, max_len: int) -> KVCache:
        """A copy of this cache with room for `max_len` tokens per row, its cached tokens kept."""
        n_layer, _, n_kv_head, _, head_dim = self.k.shape
        keep_tokens = self.tokens.size(1) > 0
        bigger = KVCache(
            self.batch_size, max_len, n_layer, n_kv_head, head_dim, self.k.device, self.k.dtype, keep_tokens
        )
        bigger.insert_prefill(self)  # every row's cached tokens, row for row
        return bigger

    def advance(self, num_tokens: int) -> None:
        self.pos += num_tokens

    def insert_prefill(self, src: KVCache, rows: list[int] | None = None) -> None:
        """Copy `src`'s cached tokens into `rows` of this cache (default: all rows).

        `src` has one row (copied into every target row) or one row per target row.
        """
        rows = list(range(self.batch_size)) if rows is None else rows
        if src.batch_size not in (1, len(rows)):
            raise ValueError(f"cannot copy a batch of {src.batch_size} cached rows into {len(rows)} rows")
        length = int(src.pos.max())
        if length > self.max_len:
            raise ValueError(f"the prefill holds {length} tokens but this cache's max_len is {self.max_len}")
        self.k[:, rows, :, :length] = src.k[:, :, :, :length]
        self.v[:, rows, :, :length] = src.v[:, :, :, :length]
        self.tokens[rows, :length] = src.tokens[:, :length]
        self.pos[rows] = src.pos
