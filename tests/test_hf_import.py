"""`picochat import` of folders picochat did not write exactly: a reordered tokenizer.json and a
config.json with other valid fields import; unsupported ones are refused in one line naming what is
wrong, writing nothing. A model whose vocabulary is padded past the tokenizer's (ids with no token)
imports, and chat, serve, eval chat, train sft and train rl on it never sample those ids."""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from engine_fakes import random_model
from post_fixtures import corpus
from safetensors.torch import load_file, save_file

from picochat import cli
from picochat.checkpoint import checkpoint_dir_for, list_steps, load_model, save_checkpoint, step_dir
from picochat.common import PicochatError, get_base_dir
from picochat.engine import Engine
from picochat.gpt import GPTConfig
from picochat.hf_export import write_export
from picochat.hf_import import main as import_main
from picochat.sampling import SamplingParams
from picochat.tokenizer import Tokenizer, get_tokenizer

TEXTS = [
    "hello world, the quick brown fox 12345 jumps!",
    "def f(x):\n    return x * 2\n",
    "héllo 你好 🙂",
] * 20
PROBE = "the quick brown fox says héllo 🙂 to 12345 worlds"


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, Tokenizer, dict[str, torch.Tensor]]:
    """An export of a tiny random model (the folder, its tokenizer, its weights)."""
    tokenizer = Tokenizer.train_from_iterator(TEXTS, vocab_size=400)
    config = GPTConfig(
        sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=2, n_kv_head=1, n_embd=32
    )
    state = random_model(config).state_dict()
    folder = tmp_path_factory.mktemp("export")
    write_export(folder, state, config, tokenizer, "card\n")
    return folder, tokenizer, state


@pytest.fixture
def folder(export, tmp_path, monkeypatch) -> Path:
    """A private copy of the export, and an empty PICOCHAT_HOME to import into."""
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    copy = tmp_path / "published"
    shutil.copytree(export[0], copy)
    return copy


def _edit(path: Path, change: Callable[[dict], object]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def _imported_weights(tag: str = "d1") -> dict[str, torch.Tensor]:
    ckpt = checkpoint_dir_for("imported", tag)
    return load_file(str(step_dir(ckpt, list_steps(ckpt)[-1]) / "model.safetensors"))


def _republished(data: dict) -> None:
    """tokenizer.json as another writer might lay it out: same meaning, other order and merge syntax."""
    model = data["model"]
    items = list(model["vocab"].items())
    random.Random(0).shuffle(items)
    model["vocab"] = dict(items)
    model["merges"] = [" ".join(pair) for pair in model["merges"]]  # the older "a b" string form
    data["added_tokens"].reverse()


def _other_valid_config(data: dict) -> None:
    """config.json with keys dropped (transformers' defaults apply), renamed and added."""
    theta = data.pop("rope_parameters")["rope_theta"]
    data["rope_theta"] = theta  # the older top-level spelling
    for key in ("final_logit_softcapping", "rms_norm_eps", "hidden_act", "num_key_value_heads"):
        if key != "num_key_value_heads" or data[key] == data["num_attention_heads"]:
            data.pop(key)
    data.pop("dtype")
    data.update(torch_dtype="float32", use_cache=False, initializer_range=0.01, attention_dropout=0.0)


def test_a_republished_folder_imports_identically(folder, export):
    _edit(folder / "tokenizer.json", _republished)
    _edit(folder / "config.json", _other_valid_config)
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)  # still what transformers accepts
    assert hf_tok.encode(PROBE, add_special_tokens=False) == export[1].encode(PROBE)
    assert import_main([str(folder)]) == 0
    assert get_tokenizer().mergeable_ranks == export[1].mergeable_ranks
    assert get_tokenizer().encode(PROBE) == export[1].encode(PROBE)
    weights = _imported_weights()
    assert all(torch.equal(weights[k], v) for k, v in export[2].items())


def test_an_export_with_architecture_extras_imports_back_identically(tmp_path, monkeypatch):
    """Value embeddings, residual/x0 scalars, a QK scale, the smear, sliding windows, a bigram table and
    attention gates survive export -> import: same config, same weights (the shipped modeling_picochat.py
    is read by transformers only, never run by the import)."""
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    tokenizer = Tokenizer.train_from_iterator(TEXTS, vocab_size=400)
    config = GPTConfig(
        sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=1,
        n_embd=32, value_embeds=True, resid_scalars=True, qk_scale=1.25, smear=True, window_pattern="S",
        short_window=8, bigram_embeds=2, attn_gate=True,
    )  # fmt: skip
    state = random_model(config).state_dict()
    (tmp_path / "out").mkdir()
    write_export(tmp_path / "out", state, config, tokenizer, "card\n")
    assert import_main([str(tmp_path / "out")]) == 0
    model, _, _ = load_model("imported", "d2", device="cpu")
    assert model.config == config
    weights = _imported_weights("d2")
    assert weights.keys() == state.keys() and all(torch.equal(weights[k], v) for k, v in state.items())
    _edit(tmp_path / "out" / "config.json", lambda c: c.update(value_embeds="yes"))
    with pytest.raises(PicochatError, match="value_embeds='yes'; picochat needs a bool"):
        import_main([str(tmp_path / "out"), "--model-tag", "again"])
    _edit(tmp_path / "out" / "config.json", lambda c: c.update(value_embeds=True, short_window=2.5))
    with pytest.raises(PicochatError, match="short_window=2.5; picochat needs a int"):
        import_main([str(tmp_path / "out"), "--model-tag", "again"])
    _edit(tmp_path / "out" / "config.json", lambda c: c.update(short_window=8, window_pattern=3))
    with pytest.raises(PicochatError, match="window_pattern=3; picochat needs a str"):
        import_main([str(tmp_path / "out"), "--model-tag", "again"])


def test_sharded_weights_import(folder, export):
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / file))
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert import_main([str(folder)]) == 0
    weights = _imported_weights()
    assert all(torch.equal(weights[k], v) for k, v in export[2].items())


def _drop(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def _pickled_only(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


def _config(change: Callable[[dict], object]) -> Callable[[Path], None]:
    return lambda folder: _edit(folder / "config.json", change)


def _tokenizer(change: Callable[[dict], object]) -> Callable[[Path], None]:
    return lambda folder: _edit(folder / "tokenizer.json", change)


def _move_special(data: dict) -> None:
    first, second = data["added_tokens"][:2]
    first["id"], second["id"] = second["id"], first["id"]


def _shuffle_merges(data: dict) -> None:
    data["model"]["merges"].reverse()


def _gpt2_pre_tokenizer(data: dict) -> None:
    data["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                             "use_regex": True}  # fmt: skip


def _extra_token(data: dict) -> None:
    data["added_tokens"].append({**data["added_tokens"][-1], "id": 9999, "content": "<|pad|>"})


def _other_shape(folder: Path) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:, :16].contiguous()
    save_file(tensors, str(folder / "model.safetensors"))


REFUSALS = {
    "no config": (_drop("config.json"), "has no config.json"),
    "no tokenizer": (_drop("tokenizer.json"), "has no tokenizer.json"),
    "no weights": (_drop("model.safetensors"), "has no model.safetensors"),
    "pickled weights": (_pickled_only, "pytorch_model.bin is a pickle"),
    "another model type": (_config(lambda c: c.update(model_type="llama")), "model_type is 'llama'"),
    "another architecture": (
        _config(lambda c: c.update(architectures=["NanoChatModel"])),
        "architectures is ['NanoChatModel']",
    ),
    "tied embeddings": (_config(lambda c: c.update(tie_word_embeddings=True)), "tie_word_embeddings=True"),
    "another activation": (_config(lambda c: c.update(hidden_act="gelu")), "hidden_act='gelu'"),
    "default mlp width": (_config(lambda c: c.pop("intermediate_size")), "intermediate_size=8192"),
    "rope scaling": (_config(lambda c: c.update(rope_scaling={"type": "linear"})), "rope_scaling"),
    "no soft-cap": (_config(lambda c: c.update(final_logit_softcapping=None)), "final_logit_softcapping"),
    "vocab below the tokenizer": (_config(lambda c: c.update(vocab_size=300)), "a row for every token"),
    "weights of another shape": (_other_shape, "model.embed_tokens.weight"),
    "no special tokens": (_tokenizer(lambda t: t.update(added_tokens=[])), "<|bos|> is missing"),
    "special tokens elsewhere": (_tokenizer(_move_special), "<|bos|> is at id"),
    "an extra added token": (_tokenizer(_extra_token), "'<|pad|>'"),
    "a normalizer": (_tokenizer(lambda t: t.update(normalizer={"type": "NFC"})), "normalizer ('NFC')"),
    "GPT-2 pre-tokenizer": (_tokenizer(_gpt2_pre_tokenizer), "pre_tokenizer is 'ByteLevel'"),
    "merges out of order": (_tokenizer(_shuffle_merges), "merges"),
    "a WordPiece model": (_tokenizer(lambda t: t["model"].update(type="WordPiece")), "model is 'WordPiece'"),
}


@pytest.mark.parametrize("name", REFUSALS)
def test_unsupported_folders_are_refused_naming_what_and_write_nothing(folder, name):
    damage, message = REFUSALS[name]
    damage(folder)
    with pytest.raises(PicochatError, match=re.escape(message)):
        import_main([str(folder)])
    assert not (get_base_dir() / "checkpoints").exists() and not (get_base_dir() / "tokenizer").exists()


def test_a_missing_folder_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    assert cli.main(["import", str(tmp_path / "nope")]) == 1
    with pytest.raises(PicochatError, match="is not a folder"):
        import_main(["./nope/export"])


# ---------------------------------------------------------------------------------------------
# A padded vocabulary: the model has rows for ids the tokenizer lacks


PAD_TO = 64  # nanochat-style padding of the vocabulary to a multiple of 64


@pytest.fixture
def padded(tmp_path, monkeypatch) -> tuple[Path, int]:
    """An imported model whose lm_head rows past the tokenizer's last id dominate every logit, as if
    they were trained to: a sampler that forgets the tokenizer's size picks them almost always."""
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "published"))
    tokenizer = Tokenizer.train_from_iterator(corpus(), 600)
    tokenizer.save(get_base_dir() / "tokenizer")
    n = tokenizer.get_vocab_size()
    config = GPTConfig(sequence_len=256, vocab_size=-(-n // PAD_TO) * PAD_TO + PAD_TO, n_layer=2,
                       n_head=2, n_kv_head=2, n_embd=64)  # fmt: skip
    model = random_model(config)
    with torch.no_grad():
        model.lm_head.weight[:n] *= 0.01
        model.lm_head.weight[n:] *= 30.0
    save_checkpoint(checkpoint_dir_for("sft", "d2"), 3, model.state_dict(), None,
                    {"model_config": dataclasses.asdict(config)})  # fmt: skip
    out = tmp_path / "out"
    assert cli.main(["export", "-i", "sft", str(out)]) == 0
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    assert cli.main(["import", str(out)]) == 0
    return out, n


def test_padded_ids_are_never_sampled_by_picochat_or_transformers(padded, capsys):
    out, n = padded
    model, tokenizer, _ = load_model("imported")
    assert model.config.vocab_size > n == tokenizer.get_vocab_size()
    with torch.no_grad():
        assert (model(torch.tensor([[1, 2, 3]]))[0].argmax(-1) >= n).all(), "the padded rows do dominate"
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "hi"}]})
    engine = Engine(model, tokenizer)
    sampled, _ = engine.generate_batch(
        prompt, 4, params=SamplingParams(temperature=1.0, max_tokens=30, seed=1)
    )
    greedy, _ = engine.generate_batch(prompt, 1, params=SamplingParams(temperature=0.0, max_tokens=12))
    assert all(t < n for row in sampled + greedy for t in row)
    assert cli.main(["chat", "-i", "imported", "-p", "hi", "-t", "1", "--max-new-tokens", "30"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # generation_config suppresses them
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12)[0, len(prompt) :].tolist()
    stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    assert [t for t in theirs if t not in stops] == greedy[0][len(prompt) :]  # picochat drops the stop


def test_imported_model_trains_evaluates_and_serves(padded, monkeypatch):
    """train sft / train rl / eval chat / serve -i imported, a couple of steps or questions each, on
    the padded model (any sampled id without a token would crash them at decoding)."""
    from openai import OpenAI
    from serve_fakes import ServerThread

    sft = ["train", "sft", "-i", "imported", "--num-iterations", "1", "--device-batch-size", "2",
           "--target-examples-per-step", "2", "--max-seq-len", "128", "--eval-every", "0",
           "--eval-tokens", "256", "--eval-metrics-every", "-1"]  # fmt: skip
    assert cli.main(sft) == 0
    assert list_steps(checkpoint_dir_for("sft", "d2")) == [1]
    rl = ["train", "rl", "-i", "imported", "--num-iterations", "1", "--examples-per-step", "1",
          "--num-samples", "2", "--device-batch-size", "2", "--max-new-tokens", "8",
          "--eval-examples", "1", "--eval-every", "0"]  # fmt: skip
    assert cli.main(rl) == 0
    assert list_steps(checkpoint_dir_for("rl", "d2")) == [1]
    evaluate = ["eval", "chat", "-i", "imported", "-a", "ARC-Easy|SpellingBee", "--max-per-task", "2",
                "--max-new-tokens", "8", "--temperature", "1", "--num-samples", "2"]  # fmt: skip
    assert cli.main(evaluate) == 0
    served = {}
    monkeypatch.delenv("PICOCHAT_API_KEY", raising=False)
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: served.update(app=app))
    assert cli.main(["serve", "-i", "imported"]) == 0
    with ServerThread(served["app"]) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused")
        (model,) = [m.id for m in client.models.list().data]
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
            temperature=1.0, logprobs=True, top_logprobs=3,
        )  # fmt: skip
        scored = client.completions.create(model=model, prompt="hello", max_tokens=1, echo=True, logprobs=3)
    assert isinstance(chat.choices[0].message.content, str) and chat.choices[0].logprobs.content
    assert scored.choices[0].logprobs.top_logprobs[-1]
