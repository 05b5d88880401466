"""The GPT: a modern decoder-only transformer, its KV cache for inference, and its optimiser set-up.

The architecture is the one Hugging Face transformers calls `NanoChatForCausalLM` (see
`hf_config` / `hf_state_dict_mapping` at the bottom for the one-to-one weight mapping):
  - token embedding -> RMSNorm -> n_layer pre-norm blocks -> RMSNorm -> lm_head (untied from the embedding);
  - RMSNorm has no learned parameters (`F.rms_norm`), and no Linear has a bias;
  - attention: rotary position embeddings, then RMSNorm of queries and keys (QK-norm), grouped-query
    attention (`n_kv_head` key/value heads shared by `n_head` query heads), causal
    `F.scaled_dot_product_attention` (flash kernels on GPU and CPU);
  - MLP: Linear(d, 4d) -> ReLU^2 -> Linear(4d, d);
  - logits are soft-capped: softcap * tanh(logits / softcap) with softcap 15.

Dtypes: on GPU the trainer runs the forward under bf16 autocast; on CPU everything is fp32. The rotary
tables are kept in fp32 and cast to the activations' dtype; logits are always returned in fp32.

Training loss: the lm_head, soft-cap and cross-entropy are fused into one chunked computation
(`softcap_cross_entropy`) that never holds the (tokens x vocab) logits of the whole batch: with a 32k
vocabulary those logits would be most of a small model's memory traffic and peak memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

# Logit elements per chunk of the fused loss. On CPU a (chunk x vocab) fp32 block of 32 MB stays in
# cache (256 tokens at vocab 32768); accelerators want bigger blocks to amortise kernel launches.
LOSS_CHUNK_ELEMENTS = {"cpu": 2**23}
LOSS_CHUNK_ELEMENTS_DEFAULT = 2**27


@dataclass
class GPTConfig:
    """Model shape and the few architecture constants (defaults: a 12-layer NanoChat)."""

    sequence_len: int = 2048  # training context; the rotary table covers ROTARY_HEADROOM times this
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 6  # query heads; head_dim = n_embd // n_head
    n_kv_head: int = 6  # key/value heads (grouped-query attention when < n_head)
    n_embd: int = 768
    rope_theta: float = 10000.0
    softcap: float = 15.0
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} must be a multiple of n_head {self.n_head}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head {self.n_kv_head} must divide n_head {self.n_head}")
        if not 0 < self.softcap <= 80:  # the fused loss relies on exp(softcap) fitting in fp32
            raise ValueError(f"softcap {self.softcap} must be in (0, 80]")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head_dim {self.n_embd // self.n_head} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


# Inference may run past the training context (long chats); rotary angles are tabulated this far.
ROTARY_HEADROOM = 10


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


class KVCache:
    """Keys and values of past tokens for every layer, for `batch_size` independent rows.

    Tensors k, v: (n_layer, batch_size, max_len, n_kv_head, head_dim). Each row has its own length
    `pos[row]` (the number of tokens cached), so rows may be at different positions: a row can be filled
    by `insert_prefill` from another cache (prefill a prompt once with batch 1, copy it into N rows to
    sample N continuations, or into a free row for continuous batching) while other rows keep decoding.
    A forward pass of T tokens appends them to every row at that row's own position.
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
    ) -> None:
        shape = (n_layer, batch_size, max_len, n_kv_head, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
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
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, span: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, T, H, D) at `positions` (B, T); return this layer's first `span` keys and values."""
        rows = torch.arange(self.batch_size, device=k.device)[:, None]
        self.k[layer][rows, positions] = k.to(self.k.dtype)
        self.v[layer][rows, positions] = v.to(self.v.dtype)
        return self.k[layer, :, :span], self.v[layer, :, :span]

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
        self.k[:, rows, :length] = src.k[:, :, :length]
        self.v[:, rows, :length] = src.v[:, :, :length]
        self.pos[rows] = src.pos


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.eps = config.norm_eps
        d, kv_dim = config.n_embd, config.n_kv_head * config.head_dim
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, kv_dim, bias=False)
        self.c_v = nn.Linear(d, kv_dim, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], cache: Any) -> torch.Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        # As in NanoChat: rotate first, then normalise (the norm is rotation-invariant per pair anyway).
        q = norm(apply_rotary(q, *rotary), self.eps)
        k = norm(apply_rotary(k, *rotary), self.eps)
        gqa = self.n_kv_head != self.n_head
        if cache is None:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            kv_cache, positions, mask = cache
            k, v = kv_cache.store(self.layer_idx, k, v, positions, mask.size(-1))
            q, k, v = q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.eps = config.norm_eps
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], cache: Any) -> torch.Tensor:
        x = x + self.attn(norm(x, self.eps), rotary, cache)
        return x + self.mlp(norm(x, self.eps))


def softcap_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float, with_grads: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-token cross-entropy of logits = softcap * tanh(h @ weight^T / softcap), chunk by chunk.

    h (N, d), targets (N,) with -1 = ignored (loss 0). With `with_grads`, also returns the gradients of
    the summed loss with respect to h and weight, computed here and now: the loss ends the graph, so
    its gradient is known up to the incoming scalar factor. Per counted token:
        dL/dz = (softmax(logits) - onehot(target)) * (1 - tanh^2),   z = h @ weight^T
    Working on a chunk of rows at a time (LOSS_CHUNK_ELEMENTS) in two reused buffers keeps the
    logits in cache, avoids the page faults of fresh large allocations, and never stores (N x vocab)
    tensors. Matmuls run in the autocast dtype when autocast is on (bf16 on GPU); the rest is fp32.
    """
    device, (n_tok, vocab) = h.device, (h.size(0), weight.size(0))
    autocast_on = torch.is_autocast_enabled(device.type)
    mm_dtype = torch.get_autocast_dtype(device.type) if autocast_on else weight.dtype
    budget = LOSS_CHUNK_ELEMENTS.get(device.type, LOSS_CHUNK_ELEMENTS_DEFAULT)
    chunk = max(1, min(budget // vocab, n_tok))
    t_buf = torch.empty(chunk, vocab, dtype=torch.float32, device=device)  # tanh(z / softcap)
    z_buf = t_buf if mm_dtype == torch.float32 else torch.empty(chunk, vocab, dtype=mm_dtype, device=device)
    e_buf = torch.empty(chunk, vocab, dtype=torch.float32, device=device)  # exp(logits), then dL/dz
    minus_one = torch.full((chunk, 1), -1.0, device=device)
    w = weight.to(mm_dtype)
    valid = targets >= 0
    safe_targets = targets.clamp(min=0)[:, None]
    any_ignored = not bool(valid.all())
    losses = torch.empty(n_tok, dtype=torch.float32, device=device)
    grad_h = torch.empty(h.shape, dtype=mm_dtype, device=device) if with_grads else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=device) if with_grads else None
    with torch.autocast(device.type, enabled=False):
        for start in range(0, n_tok, chunk):
            rows = slice(start, min(start + chunk, n_tok))
            hc, tc = h[rows].to(mm_dtype), safe_targets[rows]
            m = hc.size(0)
            z, t, e = z_buf[:m], t_buf[:m], e_buf[:m]
            torch.addmm(z, hc, w.t(), beta=0, alpha=1.0 / softcap, out=z)
            torch.tanh(z, out=t)
            # |logits| <= softcap, so exp() needs no max-subtraction (GPTConfig bounds softcap).
            torch.mul(t, softcap, out=e).exp_()
            sum_e = e.sum(dim=1, keepdim=True)
            losses[rows] = (sum_e.log() - softcap * t.gather(1, tc)).squeeze(1)
            if not with_grads:
                continue
            g = e.div_(sum_e).scatter_add_(1, tc, minus_one[:m])  # softmax - onehot
            g.addcmul_(g, t.square_(), value=-1.0)  # times the soft-cap's derivative 1 - t^2
            if any_ignored:
                g.masked_fill_(~valid[rows, None], 0.0)
            g_mm = g.to(mm_dtype)
            torch.mm(g_mm, w, out=grad_h[rows])
            if grad_w.dtype == mm_dtype:
                grad_w.addmm_(g_mm.t(), hc)
            else:
                grad_w += (g_mm.t() @ hc).float()
    losses.masked_fill_(~valid, 0.0)
    return losses, grad_h.to(h.dtype) if with_grads else None, grad_w


class _SoftcapCrossEntropySum(torch.autograd.Function):
    """The summed loss of `softcap_cross_entropy`, with its gradients precomputed in the forward."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float):
        losses, grad_h, grad_w = softcap_cross_entropy(h, weight, targets, softcap, with_grads=True)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return losses.sum()

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_total.to(grad_h.dtype), (grad_w * grad_total).to(ctx.weight_dtype), None, None


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Rotary tables are derived, not learned: non-persistent buffers, recomputed by init_weights
        # (a model built on the meta device and moved with to_empty() has garbage buffers until then).
        cos, sin = rotary_tables(config.sequence_len * ROTARY_HEADROOM, config.head_dim, config.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every weight (also after building on the meta device and `to_empty`).

        Embedding N(0, 1) (it is RMS-normed right away); input projections uniform with std
        1/sqrt(n_embd); output projections of attention and MLP zero, so each block starts as the
        identity and the residual stream is not disturbed; lm_head small (std 0.001) so the first
        predictions are near uniform.
        """
        c = self.config
        bound = math.sqrt(3.0 / c.n_embd)  # uniform(-b, b) has std b / sqrt(3)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        device = self.lm_head.weight.device
        self.cos, self.sin = rotary_tables(self.cos.size(0), c.head_dim, c.rope_theta, device)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wte.weight.numel() if exclude_embedding else n

    def estimate_flops(self) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight used in a matmul, plus attention.

        The embedding is a lookup, not a matmul, so it is left out. Attention scores and the weighted
        sum cost 2 * 2 * n_head * head_dim * T per token forward (counted over the full T x T square, as
        nanochat does), times 3 for forward + backward.
        """
        c = self.config
        matmul_params = self.num_params(exclude_embedding=True)
        attention = 12 * c.n_layer * c.n_head * c.head_dim * c.sequence_len
        return 6 * matmul_params + attention

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        loss_reduction: str = "mean",
        last_only: bool = False,
        head: Any = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in fp32, or with `targets` (B, T) the cross-entropy loss.

        `last_only` (inference): logits (B, 1, vocab) of the last position only. `head` (inference):
        a callable computing lm_head(x) in its place (picochat.decode_head keeps faster weight layouts).

        Targets equal to -1 are ignored (masked chat training). loss_reduction: "mean" (over counted
        tokens), "sum", or "none" (per-token losses (B, T), 0 at ignored tokens). With a `kv_cache`
        the T tokens of every row are appended at that row's position and attend to its cached tokens.
        """
        T = idx.size(1)
        if kv_cache is None:
            if T > self.cos.size(0):
                raise ValueError(f"{T} tokens exceed the rotary table ({self.cos.size(0)} positions)")
            rotary = (self.cos[None, :T, None], self.sin[None, :T, None])
            cache = None
        else:
            if kv_cache.max_len > self.cos.size(0):
                raise ValueError(f"KV cache max_len exceeds the rotary table ({self.cos.size(0)} positions)")
            positions, mask = kv_cache.next_positions(T)  # each row continues from its own length
            rotary = (self.cos[positions][:, :, None], self.sin[positions][:, :, None])
            cache = (kv_cache, positions, mask)

        x = norm(self.transformer.wte(idx), self.config.norm_eps)
        for block in self.transformer.h:
            x = block(x, rotary, cache)
        x = norm(x, self.config.norm_eps)
        if kv_cache is not None:
            kv_cache.advance(T)
        if last_only and targets is None:
            x = x[:, -1:]
        return self._logits(x, head) if targets is None else self._loss(x, targets, loss_reduction)

    def _logits(self, x: torch.Tensor, head: Any = None) -> torch.Tensor:
        softcap = self.config.softcap
        return softcap * torch.tanh((head or self.lm_head)(x).float() / softcap)

    @torch.compiler.disable  # a chunk loop with out= buffers: left eager when the model is compiled
    def _loss(self, x: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
        weight, softcap = self.lm_head.weight, self.config.softcap
        h, flat_targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
        differentiable = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
        if reduction == "none" and differentiable:
            # Per-token losses with arbitrary upstream gradients (e.g. RL advantages): plain autograd.
            logits = self._logits(x).flatten(0, 1)
            losses = F.cross_entropy(logits, flat_targets, ignore_index=-1, reduction="none")
            return losses.view(targets.shape)
        if differentiable:
            total = _SoftcapCrossEntropySum.apply(h, weight, flat_targets, softcap)
        else:
            losses = softcap_cross_entropy(h, weight, flat_targets, softcap, with_grads=False)[0]
            if reduction == "none":
                return losses.view(targets.shape)
            total = losses.sum()
        if reduction == "sum":
            return total
        return total / (flat_targets >= 0).sum().clamp(min=1)

    def setup_optimizers(
        self,
        unembedding_lr: float = 0.004,
        embedding_lr: float = 0.2,
        matrix_lr: float = 0.02,
        weight_decay: float = 0.0,
        adam_betas: tuple[float, float] = (0.8, 0.95),
    ) -> list[torch.optim.Optimizer]:
        """[AdamW for the embedding and lm_head, Muon for the blocks' matrices]; see picochat.optim.

        The AdamW learning rates are given for a 768-wide model and scaled by (n_embd / 768)^-0.5;
        every param group records its starting lr as `initial_lr` for the trainer's LR schedule.
        """
        from picochat.optim import build_optimizers

        width_scale = (self.config.n_embd / 768) ** -0.5
        return build_optimizers(
            adam_groups=[
                (list(self.lm_head.parameters()), unembedding_lr * width_scale),
                (list(self.transformer.wte.parameters()), embedding_lr * width_scale),
            ],
            muon_params=list(self.transformer.h.parameters()),
            matrix_lr=matrix_lr,
            weight_decay=weight_decay,
            adam_betas=adam_betas,
        )


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers `NanoChatForCausalLM`: the same architecture, other names.


def hf_config(config: GPTConfig) -> dict[str, Any]:
    """Keyword arguments of transformers' `NanoChatConfig` describing the same model.

    An exporter adds the tokenizer's bos_token_id / eos_token_id / pad_token_id. Rotary tables are not
    weights: transformers recomputes them from rope_theta (same frequencies, same half-split pairing).
    """
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2",
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "final_logit_softcapping": config.softcap,
        "attention_bias": False,
        "tie_word_embeddings": False,
    }


def hf_state_dict_mapping(config: GPTConfig) -> dict[str, str]:
    """picochat parameter name -> `NanoChatForCausalLM` parameter name (same shapes, same layout).

    Both sides store Linear weights as (out_features, in_features) and split rotary pairs as the two
    halves of each head, so the tensors copy over unchanged.
    """
    mapping = {
        "transformer.wte.weight": "model.embed_tokens.weight",
        "lm_head.weight": "lm_head.weight",
    }
    per_layer = {
        "attn.c_q": "self_attn.q_proj",
        "attn.c_k": "self_attn.k_proj",
        "attn.c_v": "self_attn.v_proj",
        "attn.c_proj": "self_attn.o_proj",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for i in range(config.n_layer):
        for ours, theirs in per_layer.items():
            mapping[f"transformer.h.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return mapping
