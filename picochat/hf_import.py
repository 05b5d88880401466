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

from safetensors import SafetensorError
from safetensors.torch import load_file

from picochat.checkpoint import STAGES, checkpoint_dir_for, list_steps, save_checkpoint
from picochat.common import PicochatError, run_cli
from picochat.gpt import GPTConfig, hf_config, hf_state_dict_mapping
from picochat.hf_export import byte_to_unicode
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer, tokenizer_dir


def resolve_source(source: str) -> Path:
    """A local export folder as is; anything else is a hub model id, downloaded to the hub cache."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # offline, unknown repo, gated: one line, nothing written
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PicochatError(f"{source} is neither a folder nor a reachable hub model ({reason})") from e


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PicochatError(f"cannot read {path} ({e}); is this a `picochat export` folder?") from e


def gpt_config_from_hf(hf: dict[str, Any]) -> GPTConfig:
    """The GPTConfig whose hf_config is `hf`; refuses (naming the key) any setting picochat lacks."""
    if hf.get("model_type") != "nanochat":
        raise PicochatError(
            f"model_type is {hf.get('model_type')!r}; only transformers NanoChat models import"
        )
    rope = hf.get("rope_parameters") or {}
    try:
        config = GPTConfig(
            sequence_len=hf["max_position_embeddings"],
            vocab_size=hf["vocab_size"],
            n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"],
            n_kv_head=hf["num_key_value_heads"],
            n_embd=hf["hidden_size"],
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            softcap=float(hf["final_logit_softcapping"]),
            norm_eps=float(hf["rms_norm_eps"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise PicochatError(f"config.json lacks or has a bad NanoChat setting ({e})") from e
    for key, value in hf_config(config).items():
        if key in hf and hf[key] != value:
            raise PicochatError(f"config.json has {key}={hf[key]!r}; picochat models need {value!r}")
    return config


def tokenizer_from_hf(path: Path) -> Tokenizer:
    """Rebuild the picochat tokenizer (ranks, split pattern) from an exported tokenizer.json."""
    data = _read_json(path)
    to_byte = {char: b for b, char in byte_to_unicode().items()}
    try:
        ranks = {bytes(to_byte[c] for c in token): rank for token, rank in data["model"]["vocab"].items()}
        split = next(p for p in data["pre_tokenizer"]["pretokenizers"] if p["type"] == "Split")
        tokenizer = Tokenizer(ranks, split["pattern"]["Regex"])
        added = {t["content"]: t["id"] for t in data["added_tokens"]}
    except (KeyError, TypeError, StopIteration, ValueError) as e:
        raise PicochatError(
            f"{path} is not a byte-level BPE tokenizer written by `picochat export` ({e})"
        ) from e
    if any(added.get(name) != tokenizer.encode_special(name) for name in SPECIAL_TOKENS):
        raise PicochatError(f"{path} does not have picochat's special tokens right after its vocabulary")
    return tokenizer


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
    config = gpt_config_from_hf(_read_json(folder / "config.json"))
    tokenizer = tokenizer_from_hf(folder / "tokenizer.json")
    try:
        theirs = load_file(str(folder / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise PicochatError(f"cannot read {folder / 'model.safetensors'} ({e})") from e
    mapping = hf_state_dict_mapping(config)
    missing = sorted(set(mapping.values()) - set(theirs))
    if missing or set(theirs) - set(mapping.values()):
        names = missing or sorted(set(theirs) - set(mapping.values()))
        raise PicochatError(f"model.safetensors does not match config.json (first mismatch: {names[0]})")
    state = {ours: theirs[name] for ours, name in mapping.items()}
    model_tag = args.model_tag or f"d{config.n_layer}"
    ckpt_dir = checkpoint_dir_for(args.stage, model_tag)
    if list_steps(ckpt_dir):
        raise PicochatError(f"{ckpt_dir} already has checkpoints; pick another --model-tag or --stage")
    install_tokenizer(tokenizer)
    meta = {"model_config": dataclasses.asdict(config), "imported_from": str(args.source)}
    path = save_checkpoint(ckpt_dir, 0, state, None, meta)
    print(f"imported {args.source} as {args.stage}/{model_tag} ({path})")
    return 0


if __name__ == "__main__":
    run_cli(main)
