"""transformers code for picochat models with architecture extras (shipped as modeling_picochat.py).

`picochat export` copies this file, unchanged, into the folder of a model trained with value embeddings,
residual/x0 scalars, a QK scale, the smear, sliding windows, a bigram table or attention output gates,
and points config.json's `auto_map` at it, so that
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` builds the same model. It only adds
to transformers' `NanoChatForCausalLM` (the plain architecture, which needs no code of ours):

  - value embeddings: on the layers that have one, `v_proj` becomes `ValueWithEmbedding`, which adds
    2 * sigmoid(ve_gate(x)) times the token's value embedding to V (per key/value head), exactly as
    picochat.attention does; the model hands it the input ids before running the layers;
  - residual/x0 scalars: before layer i, x = resid_lambdas[i] * x + x0_lambdas[i] * x0, x0 being the
    normed token embedding (the first layer's input), applied by a forward pre-hook on each layer;
  - qk_scale: every attention's scaling is qk_scale / sqrt(head_dim);
  - smear: before the first layer (and before x0 is taken), x_t += scale * sigmoid(gate(x_t[:24])) *
    x_(t-1), zero at position 0; in generation the last embedding of each row rides on the cache object
    (`picochat_last_embedding`), so a search that reorders or crops the cache (beam search, assisted
    decoding) is not supported for such a model: use greedy or sampled generation;
  - bigram table: after the smear (and before x0 is taken), x_t += bigram_scale *
    rms_norm(bigram_embed[row(token_(t-1), token_t)]), `bigram_row` being picochat.gpt.bigram_rows; in
    generation the last token id of each row rides on the cache (`picochat_last_token`), with the
    same limits as the smear's;
  - attention output gates: every layer's o_proj becomes `GatedOutput`, which multiplies each head's
    output by 2 * sigmoid(gate(x)) before projecting, x being the attention's input (set by a forward
    pre-hook on self_attn), as picochat.attention does;
  - sliding windows: a layer with a window w (window_pattern tiled over the layers, S = short, the last
    layer always full; short_window = w) lets each token see itself and the w - 1 tokens before it,
    by narrowing that layer's attention mask in a forward pre-hook (sdpa and eager attention).

It imports nothing from picochat: a user of the exported folder needs only torch and transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.models.nanochat.configuration_nanochat import NanoChatConfig
from transformers.models.nanochat.modeling_nanochat import NanoChatForCausalLM, NanoChatModel


class PicochatConfig(NanoChatConfig):
    """NanoChatConfig plus picochat's architecture extras (their defaults are the plain model)."""

    model_type = "picochat"

    def __init__(
        self,
        value_embeds: bool = False,
        resid_scalars: bool = False,
        qk_scale: float = 1.0,
        smear: bool = False,
        window_pattern: str = "",
        short_window: int = 0,
        bigram_embeds: int = 0,
        attn_gate: bool = False,
        **kwargs: Any,
    ) -> None:
        self.bigram_embeds, self.attn_gate = bigram_embeds, attn_gate
        self.value_embeds, self.resid_scalars, self.qk_scale = value_embeds, resid_scalars, qk_scale
        self.smear, self.window_pattern, self.short_window = smear, window_pattern, short_window
        super().__init__(**kwargs)


def has_value_embed(config: PicochatConfig, layer_idx: int) -> bool:
    """Every other layer, counted back from the last (which always has one). The same rule as
    picochat.attention.has_value_embed, restated because this file must not import picochat."""
    return config.value_embeds and layer_idx % 2 == (config.num_hidden_layers - 1) % 2


def layer_window(config: PicochatConfig, layer_idx: int) -> int | None:
    """Tokens layer `layer_idx` sees (itself included), None for the full context: the rule of
    picochat.attention.layer_window, with the window size written out as short_window."""
    pattern = config.window_pattern
    if not pattern or layer_idx == config.num_hidden_layers - 1 or pattern[layer_idx % len(pattern)] == "L":
        return None
    return config.short_window


def narrowed_to_window(
    mask: torch.Tensor | None, queries: int, keys: int, window: int, eager: bool
) -> torch.Tensor:
    """A layer's attention mask (None = causal, bool = may attend, float = added to the scores) with
    every key more than `window` - 1 positions before its query masked too. The queries are the last
    `queries` of the `keys` positions (transformers' dynamic cache)."""
    key_pos = torch.arange(keys, device=mask.device if mask is not None else None)
    offset = key_pos[keys - queries :, None] - key_pos[None, :]
    allowed = ((offset >= 0) & (offset < window))[None, None]  # (1, 1, queries, keys)
    if mask is not None and mask.dtype != torch.bool:
        return mask.masked_fill(~allowed, torch.finfo(mask.dtype).min)
    if mask is not None:
        allowed = mask & allowed
    if not eager:
        return allowed
    scores = torch.zeros(allowed.shape, device=allowed.device)
    return scores.masked_fill(~allowed, torch.finfo(torch.float32).min)


BIGRAM_HASH = (2654435761, 2246822519)  # picochat.gpt.BIGRAM_HASH


def bigram_row(previous: torch.Tensor, has_one: torch.Tensor, ids: torch.Tensor, rows: int) -> torch.Tensor:
    """The bigram table's row of each (previous token, token) pair: picochat.gpt.bigram_rows, restated."""
    first = torch.where(has_one, previous + 1, 0) * BIGRAM_HASH[0]
    return torch.bitwise_xor(first, ids * BIGRAM_HASH[1]) % rows


class ValueWithEmbedding(nn.Linear):
    """v_proj plus a gated token -> value embedding; `input_ids` is set by the model for each forward."""

    def __init__(self, config: PicochatConfig) -> None:
        head_dim = config.hidden_size // config.num_attention_heads
        kv_dim = config.num_key_value_heads * head_dim
        super().__init__(config.hidden_size, kv_dim, bias=False)
        self.n_kv_head, self.head_dim = config.num_key_value_heads, head_dim
        self.ve_gate = nn.Linear(config.hidden_size, config.num_key_value_heads, bias=False)
        self.value_embed = nn.Embedding(config.vocab_size, kv_dim)
        self.input_ids: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_ids is None:
            raise ValueError("a picochat model with value embeddings needs input_ids, not inputs_embeds")
        gate = 2.0 * torch.sigmoid(self.ve_gate(x))  # (B, T, n_kv_head)
        ve = self.value_embed(self.input_ids).view(*x.shape[:-1], self.n_kv_head, self.head_dim)
        return super().forward(x) + (gate[..., None] * ve).flatten(-2).to(x.dtype)


class GatedOutput(nn.Linear):
    """o_proj with each head's input gated by 2 * sigmoid(gate(x)); `gate_input` (x, the attention's input)
    is set by a pre-hook on the attention module for each forward."""

    def __init__(self, config: PicochatConfig) -> None:
        super().__init__(config.hidden_size, config.hidden_size, bias=False)
        self.gate = nn.Linear(config.hidden_size, config.num_attention_heads, bias=False)
        self.gate_input: torch.Tensor | None = None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        gate = 2.0 * torch.sigmoid(self.gate(self.gate_input))  # (B, T, n_head)
        heads = y.view(*y.shape[:-1], gate.shape[-1], -1)
        return super().forward((heads * gate[..., None].to(y.dtype)).flatten(-2))

    @staticmethod
    def keep_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        module.o_proj.gate_input = args[0] if args else kwargs["hidden_states"]


class Smear(nn.Module):
    """The previous token's normed embedding, gated, added to each token's (picochat.gpt.Smear)."""

    channels = 24

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(self.channels, 1, bias=False)
        self.scale = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        return x + self.scale * torch.sigmoid(self.gate(x[..., : self.channels])) * previous


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple]:
    """A decoder layer's hidden_states (positional or keyword) and its other positional arguments."""
    return (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())


class PicochatModel(NanoChatModel):
    config_class = PicochatConfig

    def __init__(self, config: PicochatConfig) -> None:
        super().__init__(config)
        head_dim = config.hidden_size // config.num_attention_heads
        for i, layer in enumerate(self.layers):
            layer.self_attn.scaling = config.qk_scale / head_dim**0.5
            if has_value_embed(config, i):
                layer.self_attn.v_proj = ValueWithEmbedding(config)
            if config.attn_gate:
                layer.self_attn.o_proj = GatedOutput(config)
                layer.self_attn.register_forward_pre_hook(GatedOutput.keep_input, with_kwargs=True)
        if config.smear:  # registered first: the x0 hook must see the smeared embedding
            self.smear = Smear()
            self.layers[0].register_forward_pre_hook(self._smear_hook, with_kwargs=True)
        self._input_ids: torch.Tensor | None = None
        if config.bigram_embeds:  # after the smear, before x0: the order of picochat.gpt.GPT.forward
            self.bigram_embed = nn.Embedding(config.bigram_embeds * config.vocab_size, config.hidden_size)
            self.bigram_scale = nn.Parameter(torch.zeros(1))
            self.layers[0].register_forward_pre_hook(self._bigram_hook, with_kwargs=True)
        if config.resid_scalars:
            self.resid_lambdas = nn.Parameter(torch.ones(config.num_hidden_layers))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.num_hidden_layers))
            self._x0: torch.Tensor | None = None
            for i, layer in enumerate(self.layers):
                layer.register_forward_pre_hook(self._mix_x0(i), with_kwargs=True)
        for i, layer in enumerate(self.layers):
            if window := layer_window(config, i):
                layer.register_forward_pre_hook(self._windowed(window), with_kwargs=True)
        self.post_init()

    def _windowed(self, window: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            x = args[0] if args else kwargs["hidden_states"]
            mask, cache = kwargs.get("attention_mask"), kwargs.get("cache", kwargs.get("past_key_values"))
            past = cache.get_seq_length(module.self_attn.layer_idx) if cache is not None else 0
            keys = mask.shape[-1] if mask is not None else past + x.shape[1]
            eager = self.config._attn_implementation == "eager"
            kwargs["attention_mask"] = narrowed_to_window(mask, x.shape[1], keys, window, eager).to(x.device)
            return args, kwargs

        return hook

    def _smear_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x, rest = _split(args, kwargs)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        last = getattr(cache, "picochat_last_embedding", None)
        if last is None:  # a fresh cache, or none: nothing came before this call's tokens
            last = torch.zeros_like(x[:, :1])
        previous = torch.cat([last.to(x.dtype), x[:, :-1]], dim=1)
        previous = previous * (kwargs["position_ids"] > 0)[..., None].to(x.dtype)
        if cache is not None:
            cache.picochat_last_embedding = x[:, -1:]
        return (self.smear(x, previous), *rest), kwargs

    def _bigram_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x, rest = _split(args, kwargs)
        ids, cache = self._input_ids, kwargs.get("cache", kwargs.get("past_key_values"))
        if ids is None:
            raise ValueError("a picochat model with a bigram table needs input_ids, not inputs_embeds")
        last = getattr(cache, "picochat_last_token", None)
        if last is None:  # a fresh cache, or none: nothing came before this call's tokens
            last = torch.zeros_like(ids[:, :1])
        previous = torch.cat([last, ids[:, :-1]], dim=1)
        has_one = (kwargs["position_ids"] > 0).expand_as(ids)
        if cache is not None:
            cache.picochat_last_token = ids[:, -1:]
        rows = bigram_row(previous, has_one, ids, self.bigram_embed.num_embeddings)
        vectors = nn.functional.rms_norm(self.bigram_embed(rows), (x.size(-1),), eps=self.config.rms_norm_eps)
        return (x + (self.bigram_scale * vectors).to(x.dtype), *rest), kwargs

    def _mix_x0(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            x, rest = _split(args, kwargs)
            if i == 0:  # the first layer's input is the normed embedding, x0
                self._x0 = x
            return (self.resid_lambdas[i] * x + self.x0_lambdas[i] * self._x0, *rest), kwargs

        return hook

    def forward(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        self._input_ids = input_ids
        for layer in self.layers:
            if isinstance(layer.self_attn.v_proj, ValueWithEmbedding):
                layer.self_attn.v_proj.input_ids = input_ids
        try:
            return super().forward(input_ids=input_ids, **kwargs)
        finally:
            for layer in self.layers:
                if isinstance(layer.self_attn.v_proj, ValueWithEmbedding):
                    layer.self_attn.v_proj.input_ids = None
            self._x0 = self._input_ids = None


class PicochatForCausalLM(NanoChatForCausalLM):
    config_class = PicochatConfig

    def __init__(self, config: PicochatConfig) -> None:
        super().__init__(config)
        self.model = PicochatModel(config)
        self.post_init()
