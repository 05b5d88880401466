"""`picochat import`: a transformers NanoChat folder (or hub model id) as a picochat checkpoint.

The inverse of `picochat export`: the weights land unchanged in
`$PICOCHAT_HOME/checkpoints/<stage>/<model_tag>/` (stage "imported" by default) and the tokenizer in
`$PICOCHAT_HOME/tokenizer/`, where every stage finds it, so `picochat chat -i imported`, `serve`,
`eval chat` and `train sft/rl -i imported` work on it. See docs/huggingface.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from picochat.checkpoint import STAGES, checkpoint_dir_for, list_steps, save_checkpoint
from picochat.common import PicochatError, run_cli
from picochat.gpt import GPT, GPTConfig, hf_config, hf_state_dict_mapping
from picochat.gpt_hf import REMOTE_CODE_EXTRAS, REMOTE_CODE_FIELDS
from picochat.hf_tokenizer import tokenizer_from_hf
from picochat.tokenizer import Tokenizer, tokenizer_dir

# transformers' NanoChatConfig defaults (transformers 5.24): a published config.json that leaves a
# key out gets this value in transformers, so the import reads it the same way.
NANOCHAT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50304, "hidden_size": 768, "intermediate_size": 8192, "num_hidden_layers": 12,
    "num_attention_heads": 6, "max_position_embeddings": 2048, "hidden_act": "relu2",
    "rms_norm_eps": 1e-6, "final_logit_softcapping": 15.0, "attention_bias": False,
    "tie_word_embeddings": False,
}  # fmt: skip
WEIGHTS, SHARD_INDEX = "model.safetensors", "model.safetensors.index.json"


def resolve_source(source: str) -> Path:
    """A local export folder as is; anything else is a hub model id, downloaded to the hub cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise PicochatError(f"{source} is not a folder (nor a hub model id like user/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # offline, unknown repo, gated: one line, nothing written
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PicochatError(f"{source} is neither a folder nor a reachable hub model ({reason})") from e


def check_files(folder: Path) -> None:
    """Refuse, naming the file, a folder that lacks what an import reads."""
    for name in ("config.json", "tokenizer.json"):
        if not (folder / name).is_file():
            raise PicochatError(
                f"{folder} has no {name}; import a transformers model folder (`picochat export` writes one)"
            )
    if not (folder / WEIGHTS).is_file() and not (folder / SHARD_INDEX).is_file():
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        why = f" ({pickled[0]} is a pickle, never loaded: convert it to safetensors)" if pickled else ""
        raise PicochatError(f"{folder} has no {WEIGHTS} or {SHARD_INDEX}{why}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PicochatError(f"cannot read {path} ({e}); is this a `picochat export` folder?") from e


def gpt_config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """The GPTConfig whose hf_config is `hf`; refuses (naming the key) any setting picochat lacks."""
    # "picochat": an export with architecture extras (its modeling_picochat.py is never run here)
    if not isinstance(hf, dict) or hf.get("model_type") not in ("nanochat", "picochat"):
        kind = hf.get("model_type") if isinstance(hf, dict) else hf
        raise PicochatError(f"model_type is {kind!r}; only transformers NanoChat models import")
    extras = hf.get("model_type") == "picochat"
    expected = ["PicochatForCausalLM"] if extras else ["NanoChatForCausalLM"]
    architectures = hf.get("architectures") or expected
    if architectures != expected:
        raise PicochatError(f"architectures is {architectures!r}; only {expected[0]} imports")
    if hf.get("rope_scaling"):
        raise PicochatError(
            f"config.json has rope_scaling={hf['rope_scaling']!r}; picochat has plain rotary only"
        )
    hf = {**NANOCHAT_DEFAULTS, "num_key_value_heads": hf.get("num_attention_heads", 6), **hf}
    # older configs keep rope_theta at the top level instead of in rope_parameters
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0)}
    if not isinstance(rope, dict):
        raise PicochatError(f"config.json has rope_parameters={rope!r}; picochat needs a mapping")
    hf["rope_parameters"] = {"rope_type": "default", **rope}

    def setting(key: str, kind: type) -> Any:
        value = hf["rope_parameters"].get("rope_theta") if key == "rope_theta" else hf.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != kind(value):
            raise PicochatError(f"config.json has {key}={value!r}; picochat needs a {kind.__name__} here")
        return kind(value)

    try:
        config = GPTConfig(
            sequence_len=setting("max_position_embeddings", int),
            vocab_size=setting("vocab_size", int),
            n_layer=setting("num_hidden_layers", int),
            n_head=setting("num_attention_heads", int),
            n_kv_head=setting("num_key_value_heads", int),
            n_embd=setting("hidden_size", int),
            rope_theta=setting("rope_theta", float),
            softcap=setting("final_logit_softcapping", float),
            norm_eps=setting("rms_norm_eps", float),
            **{
                name: extra_setting(hf, name)
                for name in (*REMOTE_CODE_EXTRAS, "short_window")
                if extras and name in hf
            },
        )
    except ValueError as e:  # GPTConfig's own checks (heads dividing the width, softcap range, ...)
        raise PicochatError(f"config.json describes a model picochat cannot build ({e})") from e
    if hf.get("head_dim", config.n_embd // config.n_head) * config.n_head != config.n_embd:
        raise PicochatError(
            f"config.json has head_dim={hf['head_dim']!r}; picochat needs hidden_size / heads"
        )
    for key, value in hf_config(config).items():
        if hf[key] != value:
            raise PicochatError(f"config.json has {key}={hf[key]!r}; picochat models need {value!r}")
    return config


def extra_setting(hf: dict[str, Any], name: str) -> bool | float | int | str:
    """An architecture extra of a picochat export's config.json: a bool, the float qk_scale, the
    window_pattern string or the int short_window."""
    value, kind = hf[name], REMOTE_CODE_FIELDS.get(name, bool)
    accepted = {bool: (bool,), str: (str,), int: (int,), float: (int, float)}[kind]
    if not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool)):
        raise PicochatError(f"config.json has {name}={value!r}; picochat needs a {kind.__name__} here")
    return kind(value)


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors, or of every shard a model.safetensors.index.json lists."""
    if (folder / WEIGHTS).is_file():
        files = [folder / WEIGHTS]
    else:
        index = _read_json(folder / SHARD_INDEX)
        try:
            files = [folder / name for name in sorted(set(index["weight_map"].values()))]
        except (KeyError, TypeError, AttributeError) as e:
            raise PicochatError(f"{folder / SHARD_INDEX} has no weight_map ({e})") from e
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError) as e:
            raise PicochatError(f"cannot read {path} ({e})") from e
    return tensors


def install_tokenizer(tokenizer: Tokenizer) -> None:
    """Save the tokenizer in $PICOCHAT_HOME/tokenizer, unless an identical one is already there."""
    folder = tokenizer_dir()
    if (folder / "tokenizer.tiktoken").exists():
        existing = Tokenizer.from_directory(folder)
        if existing.mergeable_ranks != tokenizer.mergeable_ranks or existing.pattern != tokenizer.pattern:
            raise PicochatError(
                f"{folder} already holds a different tokenizer; import into a fresh PICOCHAT_HOME "
                "(export PICOCHAT_HOME=/some/new/dir) so the models here keep theirs"
            )
        return
    tokenizer.save(folder)


def main(argv: list[str] | None = None, prog: str = "picochat import") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a `picochat export` folder or a hub model id (user/name)")
    parser.add_argument("--stage", default="imported", choices=STAGES, help="stage to file it under")
    parser.add_argument("--model-tag", default=None, help="model tag (default: d<layers>)")
    args = parser.parse_args(argv)
    folder = resolve_source(args.source)
    check_files(folder)
    config = gpt_config_from_hf(_read_json(folder / "config.json"))
    tokenizer = tokenizer_from_hf(folder / "tokenizer.json")
    n_tokens = tokenizer.get_vocab_size()
    if config.vocab_size < n_tokens:
        raise PicochatError(
            f"config.json has vocab_size {config.vocab_size} but tokenizer.json has {n_tokens} tokens; "
            "the model must have a row for every token"
        )
    theirs = read_weights(folder)
    mapping = hf_state_dict_mapping(config)
    missing = sorted(set(mapping.values()) - set(theirs))
    if missing or set(theirs) - set(mapping.values()):
        names = missing or sorted(set(theirs) - set(mapping.values()))
        raise PicochatError(f"the weights do not match config.json (first mismatch: {names[0]})")
    with torch.device("meta"):  # the shapes config.json implies, allocating nothing
        shapes = {name: tuple(t.shape) for name, t in GPT(config).state_dict().items()}
    for ours, name in mapping.items():
        if tuple(theirs[name].shape) != shapes[ours]:
            raise PicochatError(
                f"the weight {name} is {tuple(theirs[name].shape)} but config.json implies {shapes[ours]}"
            )
    state = {ours: theirs[name] for ours, name in mapping.items()}
    model_tag = args.model_tag or f"d{config.n_layer}"
    ckpt_dir = checkpoint_dir_for(args.stage, model_tag)
    if list_steps(ckpt_dir):
        raise PicochatError(f"{ckpt_dir} already has checkpoints; pick another --model-tag or --stage")
    install_tokenizer(tokenizer)
    meta = {"model_config": dataclasses.asdict(config), "imported_from": str(args.source)}
    path = save_checkpoint(ckpt_dir, 0, state, None, meta)
    print(f"imported {args.source} as {args.stage}/{model_tag} ({path})")
    if config.vocab_size > n_tokens:  # a padded vocabulary: the engine never samples those ids
        print(
            f"note: ids {n_tokens}..{config.vocab_size - 1} of the model have no token and are never sampled"
        )
    return 0


if __name__ == "__main__":
    run_cli(main)
