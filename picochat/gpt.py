"""The GPT: a modern decoder-only transformer, its KV cache for inference, and its optimiser set-up.

The architecture is the one Hugging Face transformers calls `NanoChatForCausalLM` (see
picochat.gpt_hf for the one-to-one weight mapping):
  - token embedding -> RMSNorm -> n_layer pre-norm blocks -> RMSNorm -> lm_head (untied from the embedding);
  - RMSNorm has no learned parameters (`F.rms_norm`), and no Linear has a bias;
  - attention: rotary position embeddings, then RMSNorm of queries and keys (QK-norm), grouped-query
    attention (`n_kv_head` key/value heads shared by `n_head` query heads), causal
    `F.scaled_dot_product_attention` (flash kernels on GPU and CPU);
  - MLP: Linear(d, 4d) -> ReLU^2 -> Linear(4d, d);
  - logits are soft-capped: softcap * tanh(logits / softcap) with softcap 15.
Attention lives in picochat.attention, the fused training loss in picochat.fused_loss.

Architecture extras, each a GPTConfig field that is off by default (off = the plain architecture
above, the one transformers can load; `architecture_extras` names the ones a config uses):
  - value_embeds: every other layer (the last included) has its own token -> value embedding table,
    added to the attention values V through a learned per-token, per-head gate;
  - resid_scalars: before block i, x = resid_lambda[i] * x + x0_lambda[i] * x0 (x0 = the normed token
    embedding), both learnable scalars;
  - qk_scale: attention logits times this factor after QK-norm (SDPA's scale, so flash kernels stay);
  - vocab_multiple: embedding and lm_head rows padded to a multiple of this; the padding rows are no
    tokens: their logits are cut off before anything samples them and masked out of the loss;
  - window_pattern / short_window: sliding-window attention per layer (see picochat.attention);
  - smear: each position's normed token embedding gets a gated share of the previous token's (`Smear`),
    a bigram feature before the first block; a KV cache keeps each row's token ids for it;
  - bigram_embeds: a hashed (previous token, token) -> vector table of bigram_embeds * vocab_size rows
    (`bigram_rows`); its normed vector times a learned scale (0 at init, so the model starts plain) is
    added to the input embedding;
  - attn_gate: each attention layer's output, per head, times 2 * sigmoid(W x) of the layer's input x
    (W zero at init, so the gate starts at 1 and the model plain);
  - rope_theta (plain and exportable, but a candidate too): the rotary base.

Dtypes: on GPU the trainer runs the forward under bf16 autocast; on CPU everything is fp32. The rotary
tables are kept in fp32 and cast to the activations' dtype; logits are always returned in fp32.

Training loss: the lm_head, soft-cap and cross-entropy are fused into one chunked computation
(`picochat.fused_loss`) that never holds the (tokens x vocab) logits of the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from picochat.attention import (
    ROTARY_HEADROOM,
    CacheMasks,
    CausalSelfAttention,
    Masks,
    cache_masks,
    has_value_embed,
    layer_window,
    norm,
    rotary_tables,
    training_masks,
)
from picochat.fused_loss import LOSS_CHUNK_ELEMENTS, SoftcapCrossEntropySum, softcap_cross_entropy
from picochat.gpt_hf import hf_config, hf_state_dict_mapping
from picochat.kv_cache import KVCache

__all__ = [
    "GPT",
    "GPTConfig",
    "KVCache",
    "LOSS_CHUNK_ELEMENTS",
    "EXTRA_FIELDS",
    "architecture_extras",
    "hf_config",
    "hf_state_dict_mapping",
]


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
    # Architecture extras (module docstring); the defaults are the plain architecture.
    value_embeds: bool = False
    resid_scalars: bool = False
    qk_scale: float = 1.0
    vocab_multiple: int = 1
    window_pattern: str = ""  # S = short window, L = full context, tiled over layers; "" = all L
    # tokens a short-window layer sees, itself included; 0 = sequence_len // 16 (kept for checkpoints that
    # saved 0: train base now records the number, picochat.train.flags.architecture_config)
    short_window: int = 0
    smear: bool = False
    bigram_embeds: int = 0  # bigram hash table rows = this times vocab_size; 0 = no table
    attn_gate: bool = False

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} must be a multiple of n_head {self.n_head}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head {self.n_kv_head} must divide n_head {self.n_head}")
        if not 0 < self.softcap <= 80:  # the fused loss relies on exp(softcap) fitting in fp32
            raise ValueError(f"softcap {self.softcap} must be in (0, 80]")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head_dim {self.n_embd // self.n_head} must be even for rotary embeddings")
        if not isinstance(self.window_pattern, str) or set(self.window_pattern) - set("SL"):
            raise ValueError(f"window_pattern {self.window_pattern!r} may hold only S (short) and L (long)")
        if min(self.short_window, self.bigram_embeds) < 0 or self.vocab_multiple < 1 or not self.qk_scale > 0:
            raise ValueError("short_window and bigram_embeds must be >= 0, vocab_multiple >= 1, qk_scale > 0")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and lm_head: vocab_size rounded up to a multiple of vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


# The fields `architecture_extras` judges (short_window only matters with a window_pattern).
EXTRA_FIELDS = (
    "value_embeds",
    "resid_scalars",
    "qk_scale",
    "vocab_multiple",
    "window_pattern",
    "short_window",
    "smear",
    "bigram_embeds",
    "attn_gate",
)


def architecture_extras(config: GPTConfig) -> dict[str, Any]:
    """The extras `config` uses beyond the plain architecture, field -> value (empty = plain).

    Settings that change nothing leave the model plain: a vocab_multiple that pads nothing (vocab_size
    already a multiple), a window_pattern with no short window before the last layer.
    """
    extras = {
        name: getattr(config, name)
        for name in ("value_embeds", "resid_scalars", "qk_scale", "smear", "bigram_embeds", "attn_gate")
        if getattr(config, name) != GPTConfig.__dataclass_fields__[name].default
    }
    if config.padded_vocab_size != config.vocab_size:
        extras["vocab_multiple"] = config.vocab_multiple
    if any(layer_window(config, i) for i in range(config.n_layer)):
        extras["window_pattern"] = config.window_pattern
    return extras


def soft_cap(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    """The model's logit soft-cap: softcap * tanh(logits / softcap), squashing logits into (-cap, cap)."""
    return softcap * torch.tanh(logits / softcap)


# The x0 scalars' start: a little of the token embedding re-enters the residual stream at every block.
X0_LAMBDA_INIT = 0.1
SMEAR_CHANNELS = 24  # the first channels of a token's embedding decide how much of the previous one it takes


class Smear(nn.Module):
    """x_t + scale * sigmoid(gate(x_t[:SMEAR_CHANNELS])) * x_(t-1): a cheap bigram feature. `scale`
    starts at 0, so the model starts plain; the previous embedding is zero at a row's first position."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        return x + self.scale * torch.sigmoid(self.gate(x[..., :SMEAR_CHANNELS])) * previous


# Odd 32-bit multipliers that scatter the two ids of a bigram over the hash table's rows.
BIGRAM_HASH = (2654435761, 2246822519)


def bigram_rows(previous: torch.Tensor, has_one: torch.Tensor, idx: torch.Tensor, rows: int) -> torch.Tensor:
    """The hash-table row of each (previous token, token) pair; a token without a predecessor (a row's
    first position) hashes as the pair (none, token). int64 arithmetic: no product overflows."""
    first = torch.where(has_one, previous + 1, 0) * BIGRAM_HASH[0]
    return torch.bitwise_xor(first, idx * BIGRAM_HASH[1]) % rows


class ReluSquared(torch.autograd.Function):
    """relu(x)^2 with a one-pass backward. Autograd would run relu's and square's backward separately
    (two passes over the MLP's widest activation); d/dx relu(x)^2 = 2 relu(x) needs only the saved
    relu(x), and the result is bit-identical (the factor 2 is exact)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r.square()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return (grad * r).mul_(2)


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return ReluSquared.apply(x)
    return F.relu(x).square()  # inference: nothing to save


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(relu_squared(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.eps = config.norm_eps
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        cache: Any,
        masks: Masks | CacheMasks,
        ve: torch.Tensor | None,
    ) -> torch.Tensor:
        x = x + self.attn(norm(x, self.eps), rotary, cache, masks, ve)
        return x + self.mlp(norm(x, self.eps))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        vocab, kv_dim = config.padded_vocab_size, config.n_kv_head * config.head_dim
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab, config.n_embd),
                "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, vocab, bias=False)
        self.windows = {block.attn.window for block in self.transformer.h}
        if config.value_embeds:  # keyed by layer index
            self.value_embeds = nn.ModuleDict(
                {
                    str(i): nn.Embedding(vocab, kv_dim)
                    for i in range(config.n_layer)
                    if has_value_embed(config, i)
                }
            )
        if config.smear:
            self.smear = Smear()
        if config.bigram_embeds:
            self.bigram_embed = nn.Embedding(config.bigram_embeds * config.vocab_size, config.n_embd)
            self.bigram_scale = nn.Parameter(torch.zeros(1))
        if config.resid_scalars:
            self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        # Rotary tables are derived, not learned: non-persistent buffers, recomputed by init_weights
        # (a model built on the meta device and moved with to_empty() has garbage buffers until then).
        cos, sin = rotary_tables(config.sequence_len * ROTARY_HEADROOM, config.head_dim, config.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self, mlp_init_scale: float = 1.0) -> None:
        """Initialise every weight (also after building on the meta device and `to_empty`).

        Embedding N(0, 1) (it is RMS-normed right away); input projections uniform with std
        1/sqrt(n_embd), the MLP's times `mlp_init_scale` (train base's adopted 0.4, measured in
        docs/recipe.md); output projections of attention and MLP zero, so each block
        starts as the identity and the residual stream is not disturbed; lm_head small (std 0.001) so the
        first predictions are near uniform. Extras: value embeddings like c_v's input, their gates zero (gate
        1), residual scalars 1 and x0 scalars X0_LAMBDA_INIT, the smear's scale 0 and gate small positive,
        the bigram table like the token embedding and its scale 0.
        """
        c = self.config
        bound = math.sqrt(3.0 / c.n_embd)  # uniform(-b, b) has std b / sqrt(3)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -bound, bound)
            mlp_bound = mlp_init_scale * bound
            nn.init.uniform_(block.mlp.c_fc.weight, -mlp_bound, mlp_bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            for gate in (block.attn.ve_gate, block.attn.out_gate):
                if gate is not None:
                    nn.init.zeros_(gate.weight)  # gate 1: V + value embedding, the attention output as is
        for table in getattr(self, "value_embeds", {}).values():
            nn.init.uniform_(table.weight, -bound, bound)  # the scale c_v gives V at init
        if c.resid_scalars:
            nn.init.ones_(self.resid_lambdas)
            nn.init.constant_(self.x0_lambdas, X0_LAMBDA_INIT)
        if c.smear:
            nn.init.uniform_(self.smear.gate.weight, 0.0, 0.02)
            nn.init.zeros_(self.smear.scale)
        if c.bigram_embeds:
            nn.init.normal_(self.bigram_embed.weight, mean=0.0, std=1.0)
            nn.init.zeros_(self.bigram_scale)
        device = self.lm_head.weight.device
        self.cos, self.sin = rotary_tables(self.cos.size(0), c.head_dim, c.rope_theta, device)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """All parameters, or without the embedding tables (token and value embeddings)."""
        n = sum(p.numel() for p in self.parameters())
        if not exclude_embedding:
            return n
        return n - sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))

    def estimate_flops(self) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight used in a matmul, plus attention.

        Embeddings are lookups, not matmuls, so they are left out, as are the residual scalars.
        Attention scores and the weighted sum cost 2 * 2 * n_head * head_dim * T per token forward
        (counted over the full T x T square, as nanochat does; a sliding-window layer over min(window,
        T) keys), times 3 for forward + backward.
        """
        c = self.config
        scalars = c.n_layer * 2 if c.resid_scalars else 0
        matmul_params = self.num_params(exclude_embedding=True) - scalars
        keys = sum(min(b.attn.window or c.sequence_len, c.sequence_len) for b in self.transformer.h)
        return 6 * matmul_params + 12 * c.n_head * c.head_dim * keys

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        loss_reduction: str = "mean",
        last_only: bool = False,
        head: Any = None,
        capped: bool = True,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in fp32, or with `targets` (B, T) the cross-entropy loss.

        `last_only` (inference): logits (B, 1, vocab) of the last position only. `head` (inference):
        a callable computing lm_head(x) in its place (picochat.decode_head keeps faster weight layouts).
        `capped=False` (inference): the logits before the soft-cap, for a sampler that applies it
        itself, to its top-k candidates only (picochat.sampling.BatchSampler with `softcap`).

        Targets equal to -1 are ignored (masked chat training). loss_reduction: "mean" (over counted
        tokens), "sum", or "none" (per-token losses (B, T), 0 at ignored tokens). With a `kv_cache`
        the T tokens of every row are appended at that row's position and attend to its cached tokens.
        """
        T, c = idx.size(1), self.config
        if kv_cache is None:
            if T > self.cos.size(0):
                raise ValueError(f"{T} tokens exceed the rotary table ({self.cos.size(0)} positions)")
            rotary = (self.cos[None, :T, None], self.sin[None, :T, None])
            cache = positions = None
            masks = training_masks(self.windows, T, idx.device) if len(self.windows) > 1 else {None: None}
        else:
            if kv_cache.max_len > self.cos.size(0):
                raise ValueError(f"KV cache max_len exceeds the rotary table ({self.cos.size(0)} positions)")
            positions, causal = kv_cache.next_positions(T)  # each row continues from its own length
            rotary = (self.cos[positions][:, :, None], self.sin[positions][:, :, None])
            cache = (kv_cache, positions)
            # on CPU (no autocast: the queries have the cache's dtype) the masks are made additive once
            additive = kv_cache.k.dtype if idx.device.type == "cpu" else None
            masks = cache_masks(self.windows, causal, positions, additive)

        x = x0 = norm(self.transformer.wte(idx), c.norm_eps)
        if c.smear or c.bigram_embeds:
            previous, has_one = self._previous_tokens(idx, kv_cache, positions)
        if c.smear:
            x = x0 = self.smear(x, self._previous_embeddings(x, previous, has_one, kv_cache))
        if c.bigram_embeds:
            rows = bigram_rows(previous, has_one, idx, self.bigram_embed.num_embeddings)
            x = x0 = x + self.bigram_scale * norm(self.bigram_embed(rows), c.norm_eps)
        for i, block in enumerate(self.transformer.h):
            if c.resid_scalars:
                x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if block.attn.ve_gate is not None else None
            x = block(x, rotary, cache, masks, ve)
        x = norm(x, c.norm_eps)
        if kv_cache is not None:
            kv_cache.advance(T)
        if last_only and targets is None:
            x = x[:, -1:]
        if targets is None:
            return self._logits(x, head, capped)
        return self._loss(x, targets, loss_reduction)

    @staticmethod
    def _previous_tokens(
        idx: torch.Tensor, kv_cache: KVCache | None, positions: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's predecessor in its row (B, T) and whether it has one (not at a row's first
        position); with a cache, the predecessor of a call's first token is the row's last cached one."""
        if kv_cache is not None:
            return kv_cache.previous_tokens(idx, positions)
        has_one = torch.ones_like(idx, dtype=torch.bool)
        has_one[:, 0] = False
        return F.pad(idx[:, :-1], (1, 0)), has_one

    def _previous_embeddings(
        self, x: torch.Tensor, previous: torch.Tensor, has_one: torch.Tensor, kv_cache: KVCache | None
    ) -> torch.Tensor:
        """The normed embedding (x) of each token's predecessor, zero at a row's first position."""
        if kv_cache is None:  # the predecessors' embeddings are x shifted by one
            return F.pad(x[:, :-1], (0, 0, 1, 0))
        return norm(self.transformer.wte(previous), self.config.norm_eps) * has_one[..., None]

    def _logits(self, x: torch.Tensor, head: Any = None, capped: bool = True) -> torch.Tensor:
        logits = (head or self.lm_head)(x)
        if logits.size(-1) != self.config.vocab_size:  # padding rows are no tokens: never sampled
            logits = logits[..., : self.config.vocab_size]
        return soft_cap(logits.float(), self.config.softcap) if capped else logits.float()

    @torch.compiler.disable  # a chunk loop with out= buffers: left eager when the model is compiled
    def _loss(self, x: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
        weight, softcap, vocab = self.lm_head.weight, self.config.softcap, self.config.vocab_size
        h, flat_targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
        differentiable = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
        if reduction == "none" and differentiable:
            # Per-token losses with arbitrary upstream gradients (e.g. RL advantages): plain autograd.
            logits = self._logits(x).flatten(0, 1)
            losses = F.cross_entropy(logits, flat_targets, ignore_index=-1, reduction="none")
            return losses.view(targets.shape)
        if differentiable:
            total = SoftcapCrossEntropySum.apply(h, weight, flat_targets, softcap, vocab)
        else:
            losses = softcap_cross_entropy(h, weight, flat_targets, softcap, False, vocab)[0]
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
        scalar_lr: float = 0.01,
    ) -> list[torch.optim.Optimizer]:
        """[AdamW for the embeddings, lm_head and scalars, Muon for the blocks' matrices]; see
        picochat.optim.

        The embedding and lm_head learning rates are given for a 768-wide model and scaled by
        (n_embd / 768)^-0.5 (value and bigram embeddings share the token embedding's); `scalar_lr` is the
        residual scalars' (resid_scalars), unscaled. Every param group records its starting lr as `initial_lr`
        for the trainer's LR schedule.
        """
        from picochat.optim import build_optimizers

        width_scale = (self.config.n_embd / 768) ** -0.5
        embeddings = [
            *self.transformer.wte.parameters(),
            *getattr(self, "value_embeds", nn.ModuleDict()).parameters(),
            *(self.bigram_embed.parameters() if self.config.bigram_embeds else ()),
        ]
        adam_groups = [
            (list(self.lm_head.parameters()), unembedding_lr * width_scale),
            (embeddings, embedding_lr * width_scale),
        ]
        if self.config.resid_scalars:
            adam_groups.append(([self.resid_lambdas, self.x0_lambdas], scalar_lr))
        if self.config.smear:  # a gate on raw embedding channels: the embedding LR, unscaled
            adam_groups.append((list(self.smear.parameters()), embedding_lr))
        if self.config.bigram_embeds:  # a scale on a normed vector, like the smear's
            adam_groups.append(([self.bigram_scale], embedding_lr))
        return build_optimizers(
            adam_groups=adam_groups,
            muon_params=list(self.transformer.h.parameters()),
            matrix_lr=matrix_lr,
            weight_decay=weight_decay,
            adam_betas=adam_betas,
        )
