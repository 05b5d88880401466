"""`picochat export`: a checkpoint as a Hugging Face transformers model folder (NanoChatForCausalLM).

The folder holds config.json, model.safetensors, generation_config.json, tokenizer.json (byte-level
BPE with picochat's merges, split regex and special tokens: the same ids on any text),
tokenizer_config.json (a Jinja chat template rendering exactly like `render_for_completion`) and a
README.md model card. It is built in a temp folder beside OUT_DIR and renamed into place, so a failed
export leaves nothing half-written. See docs/huggingface.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from picochat.checkpoint import STAGES, checkpoint_dir_for, find_model_tag, load_checkpoint
from picochat.checkpoint_checks import model_config as parse_model_config
from picochat.common import PicochatError, atomic_write_json, atomic_write_text, get_base_dir, run_cli
from picochat.gpt import EXTRA_FIELDS, GPTConfig, architecture_extras, hf_config, hf_state_dict_mapping
from picochat.gpt_hf import REMOTE_CODE_EXTRAS, remote_code_extras
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer, get_tokenizer

# The GPTConfig fields NanoChatForCausalLM can express (hf_config maps each one). A new field added to
# GPTConfig is refused by name until hf_config learns it, rather than silently dropped.
SUPPORTED_FIELDS = {
    "sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd",
    "rope_theta", "softcap", "norm_eps",
}  # fmt: skip

# Jinja version of Tokenizer.render_for_completion / _render: the system message is merged into the
# first user turn; assistant content is a string or a list of text / python / python_output parts.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}{%- set ns.system = m.content ~ '\\n\\n' -%}"
    "{%- elif m.role == 'user' -%}<|user_start|>{{ ns.system ~ m.content }}<|user_end|>"
    "{%- set ns.system = '' -%}"
    "{%- else -%}<|assistant_start|>"
    "{%- if m.content is string -%}{{ m.content }}"
    "{%- else -%}{%- for p in m.content -%}"
    "{%- if p.type == 'text' -%}{{ p.text }}"
    "{%- elif p.type == 'python' -%}<|python_start|>{{ p.text }}<|python_end|>"
    "{%- else -%}<|output_start|>{{ p.text }}<|output_end|>{%- endif -%}"
    "{%- endfor -%}{%- endif -%}<|assistant_end|>"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what byte-level BPE vocabularies use)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tokenizer_json(tokenizer: Tokenizer) -> str:
    """A `tokenizers` tokenizer.json encoding every text to the same ids as `tokenizer`.

    BPE merges are recovered from the ranks: a token of rank r is the merge of two shorter tokens of
    lower rank, and applying merges in rank order reproduces tiktoken's (lowest rank first) encoding.
    """
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    to_char = byte_to_unicode()
    ranks = tokenizer.mergeable_ranks

    def chars(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    vocab = {chars(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if ranks.get(left, rank) < rank and ranks.get(right, rank) < rank:
                merges.append((rank, ranks[left], ranks[right], chars(left), chars(right)))
    merges.sort()
    model = models.BPE(
        vocab=vocab, merges=[(m[3], m[4]) for m in merges], fuse_unk=False, byte_fallback=False
    )
    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return hf.to_str(pretty=False)


def check_exportable(config: GPTConfig) -> None:
    """Refuse a model using a setting neither NanoChatForCausalLM nor picochat's exported model code
    (picochat.hf_modeling) can express, naming the setting. A padded vocabulary exports unpadded."""
    for name, value in architecture_extras(config).items():
        if name in REMOTE_CODE_EXTRAS or name == "vocab_multiple":
            continue
        raise PicochatError(
            f"--{name.replace('_', '-')} ({name}={value!r}) is an architecture extra transformers cannot "
            "express (NanoChatForCausalLM, or picochat's exported code for value embeddings, residual "
            "scalars, QK scale, smear, sliding windows, bigram table and attention gate); export a model "
            "trained without that flag"
        )
    for field in dataclasses.fields(GPTConfig):
        if field.name in EXTRA_FIELDS:  # judged above: a setting that changes nothing is plain
            continue
        if field.name not in SUPPORTED_FIELDS and getattr(config, field.name) != field.default:
            raise PicochatError(
                f"model setting {field.name}={getattr(config, field.name)!r} has no equivalent in "
                "transformers' NanoChatForCausalLM; export a model trained with the default "
                f"{field.default!r}"
            )


def unpadded(name: str, tensor: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """A tensor with a row per vocabulary id cut to the real vocabulary (padding rows are no tokens)."""
    per_token = name in ("transformer.wte.weight", "lm_head.weight") or name.startswith("value_embeds.")
    return tensor[: config.vocab_size] if per_token else tensor


def _model_card(stage: str, model_tag: str, step: int, config: GPTConfig) -> str:
    extras = remote_code_extras(config)
    remote = ", trust_remote_code=True" if extras else ""
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [picochat, nanochat]",
        "---",
        f"# picochat {model_tag} ({stage}, step {step})",
        "",
        "A small chat model trained with picochat, exported as transformers' `NanoChatForCausalLM`"
        + (
            f" plus picochat's {', '.join(extras)} (code in modeling_picochat.py: "
            "load with `trust_remote_code=True`)."
            if extras
            else "."
        ),
        "",
        f"Shape: {config.n_layer} layers, width {config.n_embd}, {config.n_head} heads "
        f"({config.n_kv_head} key/value), vocabulary {config.vocab_size}, context {config.sequence_len}.",
        "",
    ]
    reports = sorted((get_base_dir() / "report").glob("*.json"))
    if reports:
        lines += ["## Stages and metrics (from the picochat report)", ""]
    for path in reports:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(record, dict):
            continue
        # Report records are flat: every number besides the bookkeeping fields is a metric or setting.
        skip = {"schema_version", "section", "timestamp"}
        shown = ", ".join(
            f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}"
            for k, v in record.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)
        )
        lines.append(f"- **{record.get('section', path.stem)}**: {shown}")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained(PATH)",
        f"model = AutoModelForCausalLM.from_pretrained(PATH{remote})",
        'ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, '
        'return_tensors="pt", return_dict=True)',
        "out = model.generate(**ids, max_new_tokens=64, do_sample=False)",
        "```",
    ]
    return "\n".join(lines) + "\n"


def write_export(
    folder: Path, state: dict[str, torch.Tensor], config: GPTConfig, tokenizer: Tokenizer, card: str
) -> None:
    """Write every file of the export into `folder` (an empty folder)."""
    check_exportable(config)
    special = tokenizer.get_special_tokens()
    bos, end = special["<|bos|>"], special["<|assistant_end|>"]
    mapping = hf_state_dict_mapping(config)
    tensors = {mapping[k]: unpadded(k, v, config).detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    hf = {
        **hf_config(config),
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        "dtype": dtype,
        "bos_token_id": bos,
        "eos_token_id": end,
        "pad_token_id": bos,
    }
    if remote_code_extras(config):  # transformers builds it from the shipped code (trust_remote_code)
        hf |= {
            "architectures": ["PicochatForCausalLM"],
            "model_type": "picochat",
            "auto_map": {
                "AutoConfig": "modeling_picochat.PicochatConfig",
                "AutoModelForCausalLM": "modeling_picochat.PicochatForCausalLM",
            },
        }
        code = (Path(__file__).parent / "hf_modeling.py").read_text(encoding="utf-8")
        atomic_write_text(folder / "modeling_picochat.py", code)
    atomic_write_json(folder / "config.json", hf)
    generation = {"bos_token_id": bos, "eos_token_id": [end, bos], "pad_token_id": bos, "do_sample": False}
    if config.vocab_size > tokenizer.get_vocab_size():  # a padded lm_head: ids with no token, never sampled
        generation["suppress_tokens"] = list(range(tokenizer.get_vocab_size(), config.vocab_size))
    atomic_write_json(folder / "generation_config.json", generation)
    atomic_write_text(folder / "tokenizer.json", tokenizer_json(tokenizer))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>",
        "pad_token": "<|bos|>",
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.sequence_len,
        "chat_template": CHAT_TEMPLATE,
    }
    atomic_write_json(folder / "tokenizer_config.json", tok_config)
    atomic_write_text(folder / "README.md", card)


def publish_dir(build: Path, out_dir: Path, force: bool) -> None:
    """Rename the finished `build` folder to `out_dir` (replacing it only when `force`)."""
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old-export")
        out_dir.rename(old)
        build.rename(out_dir)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        build.rename(out_dir)


def push_to_hub(folder: Path, repo: str) -> None:
    """Upload an export to the hub (token from HF_TOKEN or `hf auth login`); one clear line on failure."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="picochat export")
    except Exception as e:  # network, auth and hub errors all end here: the local export stays
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PicochatError(
            f"could not push {folder} to the hub repo {repo} ({type(e).__name__}: {reason}); "
            "the local export is intact: check the network and `hf auth login` / HF_TOKEN, then push again"
        ) from e


def main(argv: list[str] | None = None, prog: str = "picochat export") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write (must be empty or absent unless --force)")
    parser.add_argument("-i", "--source", required=True, choices=STAGES, help="checkpoint stage to export")
    parser.add_argument("--model-tag", default=None, help="model tag, e.g. d12 (default: the deepest)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--push-to-hub", metavar="REPO", default=None, help="also upload to this hub repo")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir).resolve()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not args.force:
        raise PicochatError(f"{out_dir} is not empty; choose another folder or pass --force to replace it")
    model_tag = args.model_tag or find_model_tag(args.source)
    ckpt = load_checkpoint(checkpoint_dir_for(args.source, model_tag), args.step, "cpu", load_optim=False)
    config = parse_model_config(ckpt.meta.get("model_config"))
    check_exportable(config)
    card = _model_card(args.source, model_tag, ckpt.meta["step"], config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write_export(build, ckpt.model_state, config, get_tokenizer(), card)
        publish_dir(build, out_dir, args.force)
    finally:
        if build.exists():
            shutil.rmtree(build)
    print(f"exported {args.source}/{model_tag} step {ckpt.meta['step']} to {out_dir}")
    if args.push_to_hub:
        push_to_hub(out_dir, args.push_to_hub)
        print(f"pushed to https://huggingface.co/{args.push_to_hub}")
    return 0


if __name__ == "__main__":
    run_cli(main)
