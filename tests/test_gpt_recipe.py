"""The GPT's architecture extras (issue 11): each is off by default, changes the forward when on, trains,
survives a checkpoint round trip, decodes with the KV cache exactly like the full forward, and exports
(an extra the exported code cannot express would be refused by name); sliding windows see exactly
their window. The exported extras' logits are checked against transformers in test_hf_export. Also:
train base's adopted defaults (architecture and schedule), and the later stages keep their own."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from engine_fakes import random_model

from picochat.attention import CausalSelfAttention, cache_masks, layer_window, training_masks
from picochat.checkpoint import checkpoint_dir_for, load_model, save_checkpoint
from picochat.checkpoint_checks import model_config
from picochat.common import PicochatError
from picochat.gpt import GPT, GPTConfig, KVCache, architecture_extras
from picochat.hf_export import check_exportable
from picochat.tokenizer import Tokenizer, tokenizer_dir
from picochat.train import base, flags, mid, rl, sft

VOCAB = 60  # not a multiple of 64, so vocab_multiple=64 pads

# One setting per switch, chosen so that it changes a 16-token forward of a 3-layer model.
SWITCHES = {
    "value_embeds": {"value_embeds": True},
    "resid_scalars": {"resid_scalars": True},
    "rope_theta": {"rope_theta": 100000.0},
    "qk_scale": {"qk_scale": 1.6},
    "vocab_multiple": {"vocab_multiple": 64},
    "window_pattern": {"window_pattern": "SL", "short_window": 4},
    "smear": {"smear": True},
    "bigram_embeds": {"bigram_embeds": 2},
    "attn_gate": {"attn_gate": True},
}
ALL_ON = {k: v for setting in SWITCHES.values() for k, v in setting.items()}


def config_with(**overrides) -> GPTConfig:
    shape = {"sequence_len": 32, "vocab_size": VOCAB, "n_layer": 3, "n_head": 4, "n_kv_head": 2, "n_embd": 32}
    return GPTConfig(**{**shape, **overrides})


def test_the_config_is_plain_by_default_and_the_plain_model_has_no_extras():
    plain = config_with()
    assert architecture_extras(plain) == {}
    model = GPT(plain)
    assert not hasattr(model, "value_embeds") and not hasattr(model, "resid_lambdas")
    assert model.lm_head.weight.shape[0] == VOCAB and model.windows == {None}


def test_train_base_adopts_the_measured_extras_and_the_plain_model_is_one_switch_away():
    adopted = GPTConfig(**flags.architecture_config(base.build_parser().parse_args([]), 512))
    assert architecture_extras(adopted) == {
        "value_embeds": True, "qk_scale": 1.3, "smear": True, "window_pattern": "SSSL", "bigram_embeds": 5,
        "attn_gate": True,
    }  # fmt: skip
    assert adopted.short_window == 8
    for argv in (["--plain"], ["--plain", "--smear", "--qk-scale", "2"]):  # --plain wins over extras
        plain = flags.architecture_config(base.build_parser().parse_args(argv), 512)
        assert GPTConfig(**plain) == GPTConfig()
    one_off = flags.architecture_config(base.build_parser().parse_args(["--no-smear"]), 2048)
    assert architecture_extras(GPTConfig(**one_off)) == {
        "value_embeds": True, "qk_scale": 1.3, "window_pattern": "SSSL", "bigram_embeds": 5, "attn_gate": True
    }  # fmt: skip


def test_train_base_adopts_the_measured_schedule_and_the_later_stages_keep_theirs():
    """Warm-down 0.4 and Muon LR 0.025 won at depths 4 and 6 over two seeds (docs/recipe.md, session 12);
    they were measured for pretraining only, so mid-training, SFT and RL keep Muon LR 0.02."""
    args = base.build_parser().parse_args([])
    assert (args.warmdown_ratio, args.matrix_lr) == (0.4, 0.025)
    for stage in (mid, sft, rl):
        assert stage.build_parser().parse_args([]).matrix_lr == 0.02


def test_train_base_starts_the_mlp_input_smaller_and_nothing_else():
    """The MLP input projection at 0.4x the attention projections' scale won at depths 4 and 6 over two
    seeds (docs/recipe.md, session 17); every other weight is drawn as at scale 1, in the same order."""
    assert base.build_parser().parse_args([]).mlp_init_scale == 0.4
    models = []
    for scale in (1.0, 0.4):
        torch.manual_seed(0)
        model = GPT(config_with())
        model.init_weights(mlp_init_scale=scale)
        models.append(dict(model.named_parameters()))
    bound = math.sqrt(3.0 / 32)
    for name, weight in models[1].items():
        if name.endswith("mlp.c_fc.weight"):
            torch.testing.assert_close(weight, models[0][name] * 0.4)  # the same draws, scaled
            assert 0.35 * bound < weight.abs().max() <= 0.4 * bound
        else:
            assert torch.equal(weight, models[0][name]), name


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_changes_the_forward(switch):
    """The switched model, given the plain model's weights (new ones random), computes other logits."""
    plain = random_model(config_with())
    model = random_model(config_with(**SWITCHES[switch]), seed=1)
    state = plain.state_dict()
    if switch == "vocab_multiple":  # the plain rows, then padding rows that must change nothing
        for name in ("transformer.wte.weight", "lm_head.weight"):
            state[name] = torch.cat([state[name], 100.0 * torch.ones(64 - VOCAB, state[name].size(1))])
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(
        "value_embeds" in n or "lambdas" in n or "_gate" in n or "smear" in n or "bigram" in n
        for n in missing
    )
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(idx), plain(idx)
    assert ours.shape == theirs.shape == (2, 16, VOCAB)  # padded logits are cut off
    if switch == "vocab_multiple":  # the same model, only padded: identical logits and loss
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(model(idx, idx), plain(idx, idx))
    else:
        assert (ours - theirs).abs().max() > 1e-3
    assert bool(architecture_extras(model.config)) == (switch != "rope_theta")  # a new base is plain
    assert architecture_extras(plain.config) == {}


def test_padding_rows_get_no_gradient_and_never_win_the_argmax():
    model = random_model(config_with(vocab_multiple=64)).train()
    with torch.no_grad():
        model.lm_head.weight[VOCAB:] = 50.0  # padding rows that would dominate if they were logits
    idx = torch.randint(0, VOCAB, (2, 16))
    model(idx, idx).backward()
    assert model.lm_head.weight.grad[VOCAB:].abs().max() == 0
    assert model.lm_head.weight.grad[:VOCAB].abs().max() > 0
    with torch.no_grad():
        assert int(model(idx).argmax(-1).max()) < VOCAB


def test_sliding_window_attention_sees_exactly_its_window():
    """A token's output depends on the `window` tokens ending at it and on nothing earlier."""
    config = config_with(window_pattern="S", short_window=5)
    torch.manual_seed(0)
    attn = CausalSelfAttention(config, 0)
    assert attn.window == 5
    T = 12
    x = torch.randn(1, T, config.n_embd)
    model = GPT(config)
    rotary = (model.cos[None, :T, None], model.sin[None, :T, None])
    masks = training_masks({5}, T, x.device)
    with torch.no_grad():
        base_out = attn(x, rotary, None, masks)
        for t in range(T):
            changed = x.clone()
            changed[:, t] += 1.0
            moved = (attn(changed, rotary, None, masks) - base_out).abs().amax(dim=-1)[0] > 1e-6
            assert moved.tolist() == [t <= s < t + 5 for s in range(T)]


def test_window_pattern_is_tiled_and_the_last_layer_is_always_long():
    config = GPTConfig(sequence_len=64, n_layer=6, n_head=1, n_kv_head=1, n_embd=8, window_pattern="SSL")
    assert [layer_window(config, i) for i in range(6)] == [4, 4, None, 4, 4, None]  # a sixteenth
    assert layer_window(dataclasses.replace(config, short_window=16), 0) == 16
    all_short = dataclasses.replace(config, window_pattern="S")
    assert [layer_window(all_short, i) for i in range(6)][-1] is None
    single = dataclasses.replace(config, n_layer=1)  # only the last layer: no window anywhere
    assert architecture_extras(single) == {}
    with pytest.raises(ValueError, match="only S"):
        GPTConfig(window_pattern="SXL")


def test_flops_count_windows_and_leave_value_embeddings_out():
    plain = GPT(config_with(sequence_len=64))
    windowed = GPT(config_with(sequence_len=64, window_pattern="S", short_window=16))
    c = plain.config
    saved = 12 * c.n_head * c.head_dim * (64 - 16) * 2  # two of the three layers see 16 keys, not 64
    assert plain.estimate_flops() - windowed.estimate_flops() == saved
    ve = GPT(config_with(sequence_len=64, value_embeds=True))
    gates = sum(b.attn.ve_gate.weight.numel() for b in ve.transformer.h if b.attn.ve_gate is not None)
    assert ve.estimate_flops() - plain.estimate_flops() == 6 * gates
    assert sorted(ve.value_embeds) == ["0", "2"]  # every other layer, the last included


@pytest.mark.parametrize("switch", [*SWITCHES, "all"])
def test_cached_decoding_equals_the_full_forward(switch):
    """Prefill past the short window, then decode token by token, rows at different positions."""
    config = config_with(**(ALL_ON if switch == "all" else SWITCHES[switch]))
    model = random_model(config)
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.for_model(model, 2, 32)
        steps = [model(idx[:, :9], kv_cache=cache)]
        steps += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(9, 20)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-4, rtol=1e-4)
        # Row 1 restarts and is prefilled alone: its own positions, its own window.
        one = KVCache.for_model(model, 1, 32)
        model(idx[1:, :13], kv_cache=one)
        cache.reset([1])
        cache.insert_prefill(one, rows=[1])
        cache.pos[0] = 13
        last = model(idx[:, 13:14], kv_cache=cache)
        torch.testing.assert_close(last, full[:, 13:14], atol=2e-4, rtol=1e-4)


def test_a_short_window_layer_reads_only_its_window_of_the_cache():
    """Decoding, each row gathers its own last w keys (rows far apart included); a longer chunk reads
    from the earliest key any of its queries sees. Both still equal the full forward."""
    model = random_model(config_with(window_pattern="SL", short_window=4))
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache.for_model(model, 2, 32)
        model(idx[:, :17], kv_cache=cache)
        one = KVCache.for_model(model, 1, 32)
        model(idx[1:, :2], kv_cache=one)
        cache.reset([1])
        cache.insert_prefill(one, rows=[1])  # row 0 at position 17, row 1 at 2
        positions, causal = cache.next_positions(1)
        masks = cache_masks(model.windows, causal, positions)
        assert masks[None][0].shape[-1] == 18 and masks[None][1] == slice(0, 18)
        mask, keys = masks[4]
        assert keys.tolist() == [[14, 15, 16, 17], [0, 0, 1, 2]]  # row 1's window starts before 0
        assert mask[:, 0, 0].tolist() == [[True] * 4, [False, True, True, True]]
        step = model(torch.stack([idx[0, 17:18], idx[1, 2:3]]), kv_cache=cache)
        torch.testing.assert_close(step[0, 0], full[0, 17], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(step[1, 0], full[1, 2], atol=2e-4, rtol=1e-4)
        one.reset()
        model(idx[:1, :14], kv_cache=one)
        mask, keys = cache_masks(model.windows, *reversed(one.next_positions(3)))[4]
        assert keys == slice(11, 17) and mask.shape == (1, 1, 3, 6)  # queries 14..16 see keys 11..16
        chunk = model(idx[:1, 14:17], kv_cache=one)
        torch.testing.assert_close(chunk, full[:1, 14:17], atol=2e-4, rtol=1e-4)


# All switches at once in the default suite; one by one (a minute on a busy 2-core machine) as slow.
@pytest.mark.parametrize("switch", ["all", *(pytest.param(s, marks=pytest.mark.slow) for s in SWITCHES)])
def test_each_switch_trains(switch):
    torch.manual_seed(0)
    model = GPT(config_with(**(ALL_ON if switch == "all" else SWITCHES[switch])))
    model.init_weights()
    optimizers = model.setup_optimizers()
    params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))
    gen = torch.Generator().manual_seed(0)
    table = torch.randperm(VOCAB, generator=gen)
    rows = torch.randint(0, VOCAB, (8, 1), generator=gen)
    for _ in range(24):
        rows = torch.cat([rows, table[rows[:, -1:]]], dim=1)
    losses = []
    for _ in range(15):
        loss = model(rows[:, :-1], rows[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_bf16_autocast_forward_and_backward_with_every_switch():
    """As on GPU: bf16 matmuls, fp32 tables and scalars (the value embedding must not promote V)."""
    model = random_model(config_with(**ALL_ON)).train()
    idx = torch.randint(0, VOCAB, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_checkpoint_round_trip_with_every_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path))
    tokenizer = Tokenizer.train_from_iterator(["hello world, the quick brown fox"] * 20, 300)
    tokenizer.save(tokenizer_dir())
    config = config_with(vocab_size=tokenizer.get_vocab_size(), **{**ALL_ON, "vocab_multiple": 128})
    model = random_model(config)
    meta = {"model_config": dataclasses.asdict(config)}
    save_checkpoint(checkpoint_dir_for("base", "d3"), 1, model.state_dict(), None, meta)
    loaded, _, _ = load_model("base", "d3", device="cpu")
    assert loaded.config == config
    idx = torch.tensor([tokenizer.encode("hello fox")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx))


def test_meta_validation_accepts_the_switches_and_refuses_bad_values():
    raw = dataclasses.asdict(config_with(**ALL_ON))
    assert model_config(raw) == config_with(**ALL_ON)
    assert model_config({**raw, "short_window": 0}).short_window == 0  # 0 = derived, its default
    refused = {
        "value_embeds": ("yes", "expected bool"),
        "window_pattern": ("SQ", "impossible model_config"),
        "qk_scale": (0.0, "positive"),
        "vocab_multiple": (0, "positive"),
    }
    for key, (value, message) in refused.items():
        with pytest.raises(ValueError, match=message):
            model_config({**raw, key: value})
    with pytest.raises(ValueError, match="unknown model_config keys bogus"):
        model_config({**raw, "bogus": 1})


def test_hf_export_refuses_an_extra_its_code_cannot_express_by_name(monkeypatch):
    import picochat.hf_export as hf_export

    supported = tuple(name for name in hf_export.REMOTE_CODE_EXTRAS if name != "window_pattern")
    monkeypatch.setattr(hf_export, "REMOTE_CODE_EXTRAS", supported)
    with pytest.raises(PicochatError, match=r"--window-pattern .*export a model trained without that flag"):
        check_exportable(config_with(**SWITCHES["window_pattern"]))


@pytest.mark.parametrize("switch", SWITCHES)
def test_hf_export_accepts_every_extra(switch):
    check_exportable(config_with(**SWITCHES[switch]))


def test_hf_export_accepts_the_plain_architecture_and_a_window_pattern_with_no_short_window():
    check_exportable(config_with())
    check_exportable(config_with(window_pattern="L"))


def test_train_base_flags_set_the_config_and_refuse_bad_values():
    argv = ["--value-embeds", "--resid-scalars", "--rope-theta", "1e5", "--qk-scale", "1.2"]
    argv += ["--vocab-multiple", "64", "--window-pattern", "sssl", "--short-window", "128", "--smear"]
    got = flags.architecture_config(base.build_parser().parse_args([*argv, "--bigram-embeds", "3"]), 512)
    assert got == {
        "value_embeds": True, "resid_scalars": True, "rope_theta": 1e5, "qk_scale": 1.2,
        "vocab_multiple": 64, "window_pattern": "SSSL", "short_window": 128, "smear": True,
        "bigram_embeds": 3, "attn_gate": True,
    }  # fmt: skip
    bad_values = (["--window-pattern", "SXL"], ["--qk-scale", "0"], ["--vocab-multiple", "-64"])
    for bad in (*bad_values, ["--bigram-embeds", "-1"], ["--bigram-embeds", "1.5"]):
        with pytest.raises(SystemExit):
            base.build_parser().parse_args(bad)


def test_train_base_records_the_short_window_it_trains_with():
    """0 resolves to the adopted fraction of the context in the config a checkpoint saves, so a later
    change of the adopted window cannot change what an old checkpoint loads as."""
    parse = base.build_parser().parse_args
    assert flags.architecture_config(parse([]), 256)["short_window"] == 256 // flags.SHORT_WINDOW_FRACTION
    assert flags.architecture_config(parse(["--short-window", "8"]), 256)["short_window"] == 8
    assert flags.architecture_config(parse(["--window-pattern", "L"]), 256)["short_window"] == 0
    assert flags.architecture_config(parse(["--plain"]), 256)["short_window"] == 0
