"""Checkpoints: exact round trips, atomic publication, pruning, RNG states and refusing damaged files."""

from __future__ import annotations

import hashlib
import json
import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from picochat.checkpoint import (
    capture_rng_state,
    list_steps,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    step_dir,
)
from picochat.common import PicochatError
from picochat.state_tree import flatten_state, unflatten_state


def _trained_pair(seed: int = 0) -> tuple[torch.nn.Module, list[torch.optim.Optimizer]]:
    """A tiny model and two optimisers (as base training has) after two real steps."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizers = [
        torch.optim.AdamW(model[0].parameters(), lr=1e-2, betas=(0.8, 0.95)),
        torch.optim.SGD(model[1].parameters(), lr=1e-2, momentum=0.9),
    ]
    for group in optimizers[0].param_groups:
        group["initial_lr"] = group["lr"]
    for _ in range(2):
        _step(model, optimizers)
    return model, optimizers


def _step(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
    x = torch.linspace(-1, 1, 12).reshape(3, 4)
    model(x).square().sum().backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)


def _save(tmp_path, step, model, optimizers, **kw):
    meta = {"model_config": {"n_layer": 2}, "loader": {"pos": step}}
    return save_checkpoint(
        tmp_path, step, model.state_dict(), [o.state_dict() for o in optimizers], meta, **kw
    )


def test_flatten_roundtrip_keeps_int_keys_tuples_and_scalars():
    state = {
        "state": {0: {"step": torch.tensor(3.0), "m": torch.ones(2)}},
        "groups": [{"betas": (0.9, 0.95)}],
    }
    tensors, tree = flatten_state([state, None])
    back = unflatten_state(tensors, json.loads(json.dumps(tree)))
    assert back[1] is None
    assert list(back[0]["state"]) == [0]
    assert back[0]["groups"][0]["betas"] == (0.9, 0.95)
    assert torch.equal(back[0]["state"][0]["m"], torch.ones(2))
    with pytest.raises(TypeError, match="object"):
        flatten_state({"x": object()})


def test_roundtrip_resumes_identically(tmp_path):
    model, optimizers = _trained_pair()
    folder = _save(tmp_path, 2, model, optimizers, rank_state={"rng": "r0"})
    assert folder == step_dir(tmp_path, 2)
    assert sorted(os.listdir(folder)) == ["meta.json", "model.safetensors", "optim.safetensors"]

    model_state, optim_state, meta = load_checkpoint(tmp_path)
    assert meta["step"] == 2 and meta["loader"] == {"pos": 2} and meta["rank_state"] == {"rng": "r0"}
    assert set(meta["files"]) == {"model.safetensors", "optim.safetensors"}
    assert all(len(rec["sha256"]) == 64 for rec in meta["files"].values())

    clone, clone_opts = _trained_pair(seed=1)  # different weights and optimiser state
    clone.load_state_dict(model_state)
    for opt, state in zip(clone_opts, optim_state, strict=True):
        opt.load_state_dict(state)
    assert clone_opts[0].param_groups[0]["betas"] == (0.8, 0.95)
    assert clone_opts[0].param_groups[0]["initial_lr"] == 1e-2
    # One more step from the restored state must match one more step of the original exactly.
    _step(model, optimizers)
    _step(clone, clone_opts)
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


def test_latest_skips_incomplete_and_keep_last_prunes(tmp_path):
    model, optimizers = _trained_pair()
    for step in (10, 20, 30):
        _save(tmp_path, step, model, optimizers, keep_last=2)
    assert list_steps(tmp_path) == [20, 30]
    (tmp_path / ".tmp_step_000040").mkdir()  # a save killed half-way
    (tmp_path / "step_000050").mkdir()  # no meta.json: never published by save_checkpoint
    assert load_checkpoint(tmp_path).meta["step"] == 30
    assert load_checkpoint(tmp_path, step=20).meta["step"] == 20
    with pytest.raises(PicochatError, match="available steps: 20, 30"):
        load_checkpoint(tmp_path, step=40)
    _save(tmp_path, 30, model, optimizers)  # re-saving a step replaces it and clears stale temp dirs
    assert list_steps(tmp_path) == [20, 30]
    assert not (tmp_path / ".tmp_step_000040").exists()


def test_empty_dir_is_refused_with_a_hint(tmp_path):
    with pytest.raises(PicochatError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "nothing")


def test_truncated_checkpoint_is_refused(tmp_path):
    model, optimizers = _trained_pair()
    _save(tmp_path, 1, model, optimizers)
    path = _save(tmp_path, 2, model, optimizers) / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PicochatError) as err:
        load_checkpoint(tmp_path)
    msg = str(err.value)
    assert str(path) in msg and "truncated" in msg
    assert "delete" in msg and "previous checkpoint (step 1)" in msg


def test_corrupt_checkpoint_is_refused(tmp_path):
    model, optimizers = _trained_pair()
    path = _save(tmp_path, 1, model, optimizers) / "optim.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # same size, one flipped byte inside a tensor
    path.write_bytes(bytes(data))
    with pytest.raises(PicochatError, match=r"optim\.safetensors is corrupt \(its sha256"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path, load_optim=False).optim_state is None  # model alone still loads
    (path.parent / "meta.json").write_text("{not json")
    with pytest.raises(PicochatError, match=r"meta\.json cannot be read as JSON"):
        load_checkpoint(tmp_path)


def test_rng_state_roundtrip_through_json():
    state = json.loads(json.dumps(capture_rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == got[:2] and torch.equal(expected[2], got[2])


def _distributed_save_worker(rank: int, world_size: int, folder: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        optim = [{"state": {0: {"buf": torch.full((2,), 3.0)}}, "param_groups": []}]
        model_state = {"w": torch.arange(3.0)} if rank == 0 else None
        save_checkpoint(folder, 7, model_state, optim, {"x": 1}, rank_state={"rank": rank})
        ckpt = load_checkpoint(folder)
        assert ckpt.meta["rank_state"] == {"rank": rank}  # each rank gets its own data/RNG state back
        assert torch.equal(ckpt.optim_state[0]["state"][0]["buf"], torch.full((2,), 3.0))
    finally:
        dist.destroy_process_group()


def test_distributed_save_writes_one_optimiser_state_and_every_rank_state(tmp_path):
    port = 29500 + os.getpid() % 1000
    mp.spawn(_distributed_save_worker, args=(2, str(tmp_path), port), nprocs=2)
    folder = step_dir(tmp_path, 7)
    assert sorted(os.listdir(folder)) == ["meta.json", "model.safetensors", "optim.safetensors"]
    ckpt = load_checkpoint(tmp_path)  # a single process takes over the replicated optimiser state
    assert ckpt.meta["ranks"] == [{"rank": 0}, {"rank": 1}] and ckpt.optim_state is not None


def test_load_model_rebuilds_the_deepest_tag(tmp_path, monkeypatch):
    from picochat.checkpoint import checkpoint_dir_for, load_model
    from picochat.gpt import GPT, GPTConfig
    from picochat.tokenizer import Tokenizer, tokenizer_dir

    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    tokenizer = Tokenizer.train_from_iterator(["hello world, the quick brown fox"] * 20, 300)
    tokenizer.save(tokenizer_dir())
    vocab = tokenizer.get_vocab_size()
    models = {}
    for tag, seed in (("d2", 0), ("d10", 1)):  # d10 must win over d2 (numeric, not string order)
        torch.manual_seed(seed)
        config = GPTConfig(sequence_len=16, vocab_size=vocab, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
        models[tag] = GPT(config)
        models[tag].init_weights()
        torch.nn.init.normal_(models[tag].lm_head.weight)  # so the two models' logits differ
        meta = {"model_config": {k: getattr(config, k) for k in config.__dataclass_fields__}}
        save_checkpoint(checkpoint_dir_for("base", tag), 5, models[tag].state_dict(), None, meta)

    model, tok, meta = load_model("base", device="cpu")
    assert meta["step"] == 5 and not model.training and tok.get_vocab_size() == vocab
    idx = torch.tensor([tokenizer.encode("hello fox")])
    with torch.no_grad():
        torch.testing.assert_close(model(idx), models["d10"](idx))
    assert load_model("base", "d2", phase="train")[0].training
    with pytest.raises(PicochatError, match="no sft checkpoints"):
        load_model("sft")


def _tiny_gpt_home(tmp_path, monkeypatch):
    """A PICOCHAT_HOME with a tokenizer and a tiny GPT saved as base/d1 step 3; returns the step folder."""
    from picochat.checkpoint import checkpoint_dir_for
    from picochat.gpt import GPT, GPTConfig
    from picochat.tokenizer import Tokenizer, tokenizer_dir

    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    Tokenizer.train_from_iterator(["hello world, the quick brown fox"] * 20, 300).save(tokenizer_dir())
    config = GPTConfig(sequence_len=16, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    model = GPT(config)
    model.init_weights()
    meta = {"model_config": {k: getattr(config, k) for k in config.__dataclass_fields__}}
    return save_checkpoint(checkpoint_dir_for("base", "d1"), 3, model.state_dict(), None, meta)


def _edit_meta(folder, edit) -> None:
    path = folder / "meta.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m["model_config"].update(n_layer=3), r"model\.safetensors disagree with meta\.json's "
         r"model_config \(\d+ tensors missing \(e\.g\. transformer\.h\.1\."),
        (lambda m: m["model_config"].update(n_embd=64), r"model\.safetensors disagree.*is \(\d+, 32\), not"),
        (lambda m: m["model_config"].update(n_layer=1000), "disagree with meta.json's model_config"),
        (lambda m: m["model_config"].update(dropout=0.1), r"has unknown model_config keys dropout"),
        (lambda m: m["model_config"].update(n_layer="2"), r"has model_config n_layer='2', expected int"),
        (lambda m: m["model_config"].update(n_head=2.0), r"n_head=2\.0, expected int"),
        (lambda m: m["model_config"].update(softcap=float("nan")), r"softcap=nan, expected float"),
        (lambda m: m["model_config"].update(n_head=-2), "expected a positive number"),
        (lambda m: m["model_config"].update(n_head=3), r"meta\.json has an impossible model_config"),
        (lambda m: m.pop("model_config"), r"meta\.json has model_config None"),
        (lambda m: m["files"]["model.safetensors"].pop("sha256"), r"meta\.json has no sha256 for model"),
        (lambda m: m["files"]["model.safetensors"].update(size="12"), r"meta\.json has no size for model"),
        (lambda m: m["files"].pop("model.safetensors"), r"meta\.json does not list model\.safetensors"),
        (lambda m: m.update(files=[]), r"meta\.json has no file list"),
        (lambda m: m.update(step="3"), r"meta\.json has \"step\": '3', expected int"),
        (lambda m: m.update(ranks={}), r"meta\.json has \"ranks\": \{\}, expected list"),
    ],
)  # fmt: skip
def test_meta_that_disagrees_with_the_weights_is_one_clear_error(tmp_path, monkeypatch, edit, message):
    from picochat.checkpoint import load_model

    folder = _tiny_gpt_home(tmp_path, monkeypatch)
    load_model("base", device="cpu")  # loads before the edit
    _edit_meta(folder, edit)
    with pytest.raises(PicochatError, match=message) as err:
        load_model("base", device="cpu")
    assert str(folder) in str(err.value) and "Fix: copy the checkpoint again" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_tensors_are_refused(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from picochat.checkpoint import load_model

    folder = _tiny_gpt_home(tmp_path, monkeypatch)
    path = folder / "model.safetensors"
    state = load_file(str(path))
    state.pop("lm_head.weight")
    save_file(state, str(path))
    _edit_meta(folder, lambda m: m["files"]["model.safetensors"].update(
        size=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest()))  # fmt: skip
    with pytest.raises(PicochatError, match=r"1 tensors missing \(e\.g\. lm_head\.weight\)"):
        load_model("base", device="cpu")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_on_load(tmp_path, bad):
    model, optimizers = _trained_pair()
    _save(tmp_path, 1, model, optimizers)
    with torch.no_grad():
        model[1].weight[0, 3] = bad
    folder = _save(tmp_path, 2, model, optimizers)
    with pytest.raises(PicochatError) as err:
        load_checkpoint(tmp_path)
    message = str(err.value)
    assert f"{folder / 'model.safetensors'} holds non-finite values (NaN or inf) in 1.weight" in message
    assert "diverged" in message and "fall back to the previous checkpoint (step 1)" in message


# ---------------------------------------------------------------------------------------------
# The optimiser state: a malformed structure header or non-finite moments are refused in one line


def _rewrite_optim(folder, tensors, header) -> None:
    """Replace optim.safetensors (keeping meta.json's size and sha256 in step, as a hand edit would)."""
    from safetensors.torch import save_file

    path = folder / "optim.safetensors"
    save_file(tensors, str(path), metadata=header)
    _edit_meta(folder, lambda m: m["files"]["optim.safetensors"].update(
        size=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest()))  # fmt: skip


def _one_clear_line(err, path, *fragments) -> None:
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "Fix: copy the checkpoint again" in message
    assert all(f in message for f in fragments), message


@pytest.mark.parametrize(
    "header,message",
    [
        ({"format": "picochat-optim-v1"}, "has no picochat optimiser structure in its header"),
        ({"format": "another-format", "structure": "[]"}, "has no picochat optimiser structure"),
        ({"format": "picochat-optim-v1", "structure": "{not json"}, "malformed optimiser structure"),
        ({"format": "picochat-optim-v1", "structure": '[{"__tensor__": "/9/nowhere"}]'}, "KeyError"),
        ({"format": "picochat-optim-v1", "structure": '[{"__items__": 5}]'}, "TypeError"),
        ({"format": "picochat-optim-v1", "structure": '[{"__items__": [[1, 2, 3]]}]'}, "ValueError"),
        ({"format": "picochat-optim-v1", "structure": '[{"__tensor__": ["/0"]}]'}, "TypeError"),
    ],
)
def test_malformed_optimiser_structure_is_one_clear_error(tmp_path, header, message):
    from safetensors.torch import load_file

    model, optimizers = _trained_pair()
    folder = _save(tmp_path, 1, model, optimizers)
    _rewrite_optim(folder, load_file(str(folder / "optim.safetensors")), header)
    with pytest.raises(PicochatError) as err:
        load_checkpoint(tmp_path)
    _one_clear_line(err, folder / "optim.safetensors", message)
    assert load_checkpoint(tmp_path, load_optim=False).model_state is not None  # the weights still load


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_optimiser_state_is_refused_on_restore(tmp_path, bad):
    model, optimizers = _trained_pair()
    _save(tmp_path, 1, model, optimizers)
    first_param = optimizers[0].param_groups[0]["params"][0]
    optimizers[0].state[first_param]["exp_avg_sq"][0, 0] = bad  # an AdamW second moment
    folder = _save(tmp_path, 2, model, optimizers)
    with pytest.raises(PicochatError) as err:
        load_checkpoint(tmp_path)
    _one_clear_line(err, folder / "optim.safetensors", "holds non-finite values (NaN or inf) in /0/state/")
    assert "diverged" in str(err.value) and "previous checkpoint (step 1)" in str(err.value)


def test_optimiser_state_of_another_layout_is_one_clear_error(tmp_path):
    from picochat.checkpoint import restore_optimizers

    model, optimizers = _trained_pair()
    folder = _save(tmp_path, 1, model, optimizers)
    other = torch.nn.Linear(4, 8)
    split = [torch.optim.AdamW([other.weight], lr=1e-2), torch.optim.SGD([other.bias], lr=1e-2)]
    split[0].add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})  # one group too many
    with pytest.raises(PicochatError) as err:
        restore_optimizers(split, load_checkpoint(tmp_path))
    _one_clear_line(err, folder / "optim.safetensors", "does not fit this run's optimisers")


def test_optimiser_only_restore_reads_no_weights(tmp_path, monkeypatch):
    """`load_weights=False` (mid/SFT/RL --resume: the model was loaded already) neither reads nor hashes
    model.safetensors: damaging it after the first load changes nothing."""
    from picochat import checkpoint

    model, optimizers = _trained_pair()
    folder = _save(tmp_path, 1, model, optimizers)
    (folder / "model.safetensors").write_bytes(b"not read")
    read = []
    real_load_file = checkpoint.load_file
    monkeypatch.setattr(
        checkpoint, "load_file", lambda path, **kw: read.append(path) or real_load_file(path, **kw)
    )
    ckpt = load_checkpoint(tmp_path, 1, load_weights=False)
    assert ckpt.model_state is None and read == [str(folder / "optim.safetensors")]
    _, fresh = _trained_pair(seed=1)
    checkpoint.restore_optimizers(fresh, ckpt)
    for restored, saved in zip(fresh, optimizers, strict=True):
        for a, b in zip(restored.state.values(), saved.state.values(), strict=True):
            assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    with pytest.raises(PicochatError, match="model.safetensors is truncated"):
        load_checkpoint(tmp_path, 1)  # a full load still checks it


def test_resume_with_weights_checks_them_against_meta(tmp_path, monkeypatch):
    """The loop's own restore (base --resume: the weights come from the checkpoint) makes the same
    weights/meta.json agreement check as load_model."""
    import argparse

    from picochat.checkpoint import checkpoint_dir_for
    from picochat.gpt import GPT, GPTConfig
    from picochat.train.loop import Trainer

    folder = _tiny_gpt_home(tmp_path, monkeypatch)
    args = argparse.Namespace(resume=True, overwrite=False, dry_run=False, num_iterations=-1, max_minutes=0)
    trainer = Trainer(args, 0, 1, torch.device("cpu"), checkpoint_dir_for("base", "d1"), "resume-check")
    config = json.loads((folder / "meta.json").read_text())["model_config"]
    trainer.model = GPT(GPTConfig(**config))
    _edit_meta(folder, lambda m: m["model_config"].update(n_layer=2))
    with pytest.raises(PicochatError) as err:
        trainer.restore(check=lambda meta: pytest.fail("checked the flags before the weights"))
    message = str(err.value)
    assert f"{folder / 'model.safetensors'} disagree with meta.json's model_config" in message
    assert "tensors missing" in message and "\n" not in message
