"""The GPT in Hugging Face transformers' terms: `NanoChatForCausalLM` is the same (plain) architecture
under other names; these map picochat's config and weight names onto it (used by `picochat export` and
`picochat import`). Value embeddings, residual/x0 scalars, a QK scale, the smear, a bigram table and
attention output gates are expressed by picochat.hf_modeling (transformers remote code an export ships
with the model), and so are sliding windows (a per-layer mask): hf_config then adds their fields and
hf_state_dict_mapping their weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from picochat.attention import has_value_embed, layer_window

if TYPE_CHECKING:
    from picochat.gpt import GPTConfig

# The architecture extras picochat.hf_modeling implements (PicochatConfig fields of the same names).
REMOTE_CODE_EXTRAS = (
    "value_embeds", "resid_scalars", "qk_scale", "smear", "window_pattern", "bigram_embeds", "attn_gate",
)  # fmt: skip
# PicochatConfig fields and their types (short_window goes with window_pattern, resolved to a size).
REMOTE_CODE_FIELDS = {"qk_scale": float, "window_pattern": str, "short_window": int, "bigram_embeds": int}


def remote_code_extras(config: GPTConfig) -> list[str]:
    """The extras of `config` that need picochat.hf_modeling in an export (empty: plain NanoChat)."""
    from picochat.gpt import architecture_extras  # gpt imports this module

    return [name for name in REMOTE_CODE_EXTRAS if name in architecture_extras(config)]


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
        **remote_code_fields(config),
    }


def remote_code_fields(config: GPTConfig) -> dict[str, Any]:
    """The PicochatConfig fields of `config`'s extras; a window is written as its size in tokens."""
    fields = {name: getattr(config, name) for name in remote_code_extras(config)}
    if "window_pattern" in fields:
        fields["short_window"] = next(w for i in range(config.n_layer) if (w := layer_window(config, i)))
    return fields


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
        if has_value_embed(config, i):  # picochat.hf_modeling.ValueWithEmbedding is that layer's v_proj
            value = f"model.layers.{i}.self_attn.v_proj"
            mapping[f"transformer.h.{i}.attn.ve_gate.weight"] = f"{value}.ve_gate.weight"
            mapping[f"value_embeds.{i}.weight"] = f"{value}.value_embed.weight"
        if config.attn_gate:  # picochat.hf_modeling.GatedOutput is that layer's o_proj
            gate = f"model.layers.{i}.self_attn.o_proj.gate.weight"
            mapping[f"transformer.h.{i}.attn.out_gate.weight"] = gate
    if config.resid_scalars:
        mapping |= {"resid_lambdas": "model.resid_lambdas", "x0_lambdas": "model.x0_lambdas"}
    if config.smear:
        mapping |= {"smear.gate.weight": "model.smear.gate.weight", "smear.scale": "model.smear.scale"}
    if config.bigram_embeds:
        mapping |= {"bigram_embed.weight": "model.bigram_embed.weight", "bigram_scale": "model.bigram_scale"}
    return mapping
