"""Causal self-attention of the GPT: rotary embeddings, QK-norm, grouped-query SDPA, and the switchable
extras (value embeddings mixed into V, a QK scale, sliding windows, a gate on each head's output).

Plain attention (every extra off) is NanoChat's: rotate q and k, RMS-normalise them, then
`F.scaled_dot_product_attention(is_causal=True)` (flash kernels on GPU and CPU).

Sliding windows: a layer with window w lets each token see itself and the w - 1 tokens before it.
Training and evaluation pass SDPA a boolean (T, T) mask built once per (sequence length, window,
device) and cached; full-context layers keep `is_causal=True`, so they stay on the flash kernel. On
GPU a masked call runs SDPA's memory-efficient kernel (fused, no T x T scores in memory). With a KV
cache the engine's causal mask (B, 1, T, span) is narrowed to the window from each row's positions,
so cached decoding sees exactly the keys the full forward sees; a short-window layer reads only the
cached keys inside some query's window (w per row when decoding), not the whole cache.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

# Inference may run past the training context (long chats); rotary angles are tabulated this far.
ROTARY_HEADROOM = 10

# Per-forward attention masks by window (None = full context): a tensor, or None for `is_causal`.
Masks = dict[int | None, torch.Tensor | None]
# With a KV cache, per window: the mask and which cached keys it covers (a slice of positions, or
# each row's own positions (B, keys)).
CacheMasks = dict[int | None, tuple[torch.Tensor, slice | torch.Tensor]]


def norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without a learned scale."""
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def rotary_tables(
    seq_len: int, head_dim: int, theta: float, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos and sin of shape (seq_len, head_dim // 2): the angle of each position and frequency."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + D/2]) of x (B, T, H, D) by the angles in cos/sin (.., T, 1, D/2).

    The half-split pairing and the sign match NanoChat (and its transformers port): y1 = x1 cos + x2 sin,
    y2 = x2 cos - x1 sin.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def layer_window(config: Any, layer_idx: int) -> int | None:
    """Tokens layer `layer_idx` attends to (itself included), or None for the full context.

    `window_pattern` is tiled over the layers (S = short, L = long); the last layer is always long,
    so the final representation sees the whole context.
    """
    pattern = config.window_pattern
    if not pattern or layer_idx == config.n_layer - 1 or pattern[layer_idx % len(pattern)] == "L":
        return None
    return config.short_window or max(1, config.sequence_len // 16)


def has_value_embed(config: Any, layer_idx: int) -> bool:
    """Value embeddings go to every other layer, counted back from the last (which always has one)."""
    return config.value_embeds and layer_idx % 2 == (config.n_layer - 1) % 2


@functools.lru_cache(maxsize=32)
def _window_mask(seq_len: int, window: int, device: torch.device) -> torch.Tensor:
    # Built as an ordinary tensor even inside inference_mode: SDPA saves the mask for backward, and a
    # later training step may reuse a mask first built during evaluation.
    with torch.inference_mode(False):
        pos = torch.arange(seq_len, device=device)
        offset = pos[:, None] - pos[None, :]  # query position - key position
        return (offset >= 0) & (offset < window)


@torch.compiler.disable  # a cached lookup: left eager, once per forward, when the model is compiled
def training_masks(windows: set[int | None], seq_len: int, device: torch.device) -> Masks:
    """Masks for a forward without cache: None (is_causal) for full layers and windows >= seq_len."""
    return {w: None if w is None or w >= seq_len else _window_mask(seq_len, w, device) for w in windows}


def cache_masks(
    windows: set[int | None],
    causal: torch.Tensor,
    positions: torch.Tensor,
    additive: torch.dtype | None = None,
) -> CacheMasks:
    """Per window, the keys a forward with a KV cache attends to and their mask, from the cache's causal
    mask (B, 1, T, span) and the queries' positions (B, T). A full layer takes every key of the span
    under the causal mask. A short-window layer takes only keys within w - 1 positions before its
    queries: decoding one token per row, each row's own last w keys (gathered, so rows far apart still
    read w keys each, not the whole cache); for longer chunks, the span from the earliest key any query
    sees. The result is the same, since the keys left out are masked for every query. With `additive`
    (the queries' dtype), each mask is returned as 0 / -inf of that dtype: SDPA on CPU converts a
    boolean mask to that at every call, so converting once per forward saves it n_layer - 1 times."""
    span, length = causal.size(-1), positions.size(1)
    masks: CacheMasks = {}
    for w in windows:
        if w is None:
            mask, keys = causal, slice(0, span)
        elif length == 1:
            wanted = positions - (w - 1) + torch.arange(w, device=positions.device)  # (B, w), oldest first
            mask, keys = (wanted >= 0)[:, None, None, :], wanted.clamp(min=0)
        else:
            start = max(0, int(positions[:, 0].min()) - w + 1)  # no query sees a key before this one
            in_window = torch.arange(start, span, device=causal.device) > positions[:, :, None] - w
            mask, keys = causal[..., start:] & in_window[:, None], slice(start, span)
        if additive is not None:
            mask = torch.zeros(mask.shape, dtype=additive, device=mask.device).masked_fill_(~mask, -math.inf)
        masks[w] = (mask, keys)
    return masks


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.eps = config.norm_eps
        self.window = layer_window(config, layer_idx)
        # None keeps SDPA's own 1/sqrt(head_dim), so the plain model's numerics are untouched.
        self.scale = None if config.qk_scale == 1.0 else config.qk_scale / math.sqrt(config.head_dim)
        d, kv_dim = config.n_embd, config.n_kv_head * config.head_dim
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, kv_dim, bias=False)
        self.c_v = nn.Linear(d, kv_dim, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        # Per-token, per-kv-head gate of the value embedding, in (0, 2): 1 at init (zero weight).
        self.ve_gate = (
            nn.Linear(d, config.n_kv_head, bias=False) if has_value_embed(config, layer_idx) else None
        )
        # attn_gate: per-token, per-head gate of the attention output, in (0, 2): 1 at init (zero weight).
        self.out_gate = nn.Linear(d, self.n_head, bias=False) if config.attn_gate else None

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        cache: Any,
        masks: Masks | CacheMasks,
        ve: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 2.0 * torch.sigmoid(self.ve_gate(x))  # (B, T, n_kv_head)
            v = v + (gate[..., None] * ve.view(B, T, self.n_kv_head, self.head_dim)).to(v.dtype)
        # As in NanoChat: rotate first, then normalise (the norm is rotation-invariant per pair anyway).
        q = norm(apply_rotary(q, *rotary), self.eps)
        k = norm(apply_rotary(k, *rotary), self.eps)
        gqa = self.n_kv_head != self.n_head
        if cache is None:
            mask = masks[self.window]
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        else:
            kv_cache, positions = cache
            mask, keys = masks[self.window]
            k, v = kv_cache.store(self.layer_idx, k, v, positions, keys)  # (B, H, keys, D)
            q, k, v = q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=gqa
        )
        y = y.transpose(1, 2)  # (B, T, n_head, head_dim)
        if self.out_gate is not None:
            y = y * (2.0 * torch.sigmoid(self.out_gate(x)))[..., None].to(y.dtype)
        return self.c_proj(y.reshape(B, T, C))
