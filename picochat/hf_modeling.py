"""transformers code for picochat models with architecture extras (shipped as modeling_picochat.py).

`picochat export` copies this file, unchanged, into the folder of a model trained with value embeddings,
residual/x0 scalars or a QK scale, and points config.json's `auto_map` at it, so that
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` builds the same model. It only
adds to transformers' `NanoChatForCausalLM` (the plain architecture, which needs no code of ours):

  - value embeddings: on the layers that have one, `v_proj` becomes `ValueWithEmbedding`, which adds
    2 * sigmoid(ve_gate(x)) times the token's value embedding to V (per key/value head), exactly as
    picochat.attention does; the model hands it the input ids before running the layers;
  - residual/x0 scalars: before layer i, x = resid_lambdas[i] * x + x0_lambdas[i] * x0, x0 being the
    normed token embedding (the first layer's input), applied by a forward pre-hook on each layer;
  - qk_scale: every attention's scaling is qk_scale / sqrt(head_dim).

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
        self, value_embeds: bool = False, resid_scalars: bool = False, qk_scale: float = 1.0, **kwargs: Any
    ) -> None:
        self.value_embeds, self.resid_scalars, self.qk_scale = value_embeds, resid_scalars, qk_scale
        super().__init__(**kwargs)


def has_value_embed(config: PicochatConfig, layer_idx: int) -> bool:
    """Every other layer, counted back from the last (which always has one). The same rule as
    picochat.attention.has_value_embed, restated because this file must not import picochat."""
    return config.value_embeds and layer_idx % 2 == (config.num_hidden_layers - 1) % 2


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


class PicochatModel(NanoChatModel):
    config_class = PicochatConfig

    def __init__(self, config: PicochatConfig) -> None:
        super().__init__(config)
        head_dim = config.hidden_size // config.num_attention_heads
        for i, layer in enumerate(self.layers):
            layer.self_attn.scaling = config.qk_scale / head_dim**0.5
            if has_value_embed(config, i):
                layer.self_attn.v_proj = ValueWithEmbedding(config)
        if config.resid_scalars:
            self.resid_lambdas = nn.Parameter(torch.ones(config.num_hidden_layers))
            self.x0_lambdas = nn.Parameter(torch.zeros(config.num_hidden_layers))
            self._x0: torch.Tensor | None = None
            for i, layer in enumerate(self.layers):
                layer.register_forward_pre_hook(self._mix_x0(i), with_kwargs=True)
        self.post_init()

    def _mix_x0(self, i: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                x, rest = args[0], args[1:]
            else:
                x, rest = kwargs.pop("hidden_states"), ()
            if i == 0:  # the first layer's input is the normed embedding, x0
                self._x0 = x
            return (self.resid_lambdas[i] * x + self.x0_lambdas[i] * self._x0, *rest), kwargs

        return hook

    def forward(self, input_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        for layer in self.layers:
            if isinstance(layer.self_attn.v_proj, ValueWithEmbedding):
                layer.self_attn.v_proj.input_ids = input_ids
        try:
            return super().forward(input_ids=input_ids, **kwargs)
        finally:
            for layer in self.layers:
                if isinstance(layer.self_attn.v_proj, ValueWithEmbedding):
                    layer.self_attn.v_proj.input_ids = None
            self._x0 = None


class PicochatForCausalLM(NanoChatForCausalLM):
    config_class = PicochatConfig

    def __init__(self, config: PicochatConfig) -> None:
        super().__init__(config)
        self.model = PicochatModel(config)
        self.post_init()
