"""The GPT: it learns, the fused loss equals the plain one, the KV cache reproduces the full forward
(also with GQA, rows at different positions, and its additive CPU masks bit for bit), the MLP's
one-pass ReLU^2 backward, FLOPs, meta-device init and the HF NanoChat mapping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from engine_fakes import random_model

import picochat.gpt as gpt
from picochat.gpt import GPT, GPTConfig, KVCache, hf_config, hf_state_dict_mapping

VOCAB = 64


def tiny_config(**overrides) -> GPTConfig:
    shape = {"sequence_len": 32, "vocab_size": VOCAB, "n_layer": 2, "n_head": 4, "n_kv_head": 4, "n_embd": 64}
    return GPTConfig(**{**shape, **overrides})


def learnable_batch(batch: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Rows following a fixed random successor table (next = table[current]): random but learnable."""
    gen = torch.Generator().manual_seed(seed)
    table = torch.randperm(VOCAB, generator=gen)
    rows = torch.empty(batch, seq_len + 1, dtype=torch.long)
    rows[:, 0] = torch.randint(0, VOCAB, (batch,), generator=gen)
    for t in range(seq_len):
        rows[:, t + 1] = table[rows[:, t]]
    return rows


def reference_losses(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token loss computed the obvious way: full logits, soft-cap, F.cross_entropy."""
    logits = model(idx)
    return F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=-1, reduction="none")


def test_loss_falls_in_30_steps():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    model.init_weights()
    optimizers = model.setup_optimizers()
    rows = learnable_batch(8, 32)
    x, y = rows[:, :-1], rows[:, 1:]
    losses = []
    for _ in range(30):
        loss = model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=0.1)  # near-uniform predictions at init
    assert losses[-1] < 0.3 * losses[0], losses


@pytest.mark.parametrize("chunk_tokens", [8, 1000])
def test_fused_loss_and_gradients_match_plain_autograd(monkeypatch, chunk_tokens):
    # 8 tokens per chunk: many chunks and a ragged last one; 1000: a single chunk
    monkeypatch.setitem(gpt.LOSS_CHUNK_ELEMENTS, "cpu", chunk_tokens * VOCAB)
    model = random_model(tiny_config())
    rows = learnable_batch(3, 13, seed=1)
    x, y = rows[:, :-1], rows[:, 1:].clone()
    y[0, :5] = -1  # masked (e.g. user turns in chat training)
    y[2, 7] = -1

    expected = reference_losses(model, x, y)
    expected_mean = expected.sum() / (y >= 0).sum()
    expected_mean.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    loss = model(x, y)
    loss.backward()
    assert loss.item() == pytest.approx(expected_mean.item(), rel=1e-5)
    for p, g in zip(model.parameters(), expected_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)

    with torch.no_grad():
        per_token = model(x, y, loss_reduction="none")
        total = model(x, y, loss_reduction="sum")
    assert per_token.shape == y.shape and (per_token[y < 0] == 0).all()
    torch.testing.assert_close(per_token.reshape(-1), expected.detach(), rtol=1e-5, atol=1e-5)
    assert total.item() == pytest.approx(expected.sum().item(), rel=1e-5)


def test_per_token_losses_take_any_upstream_gradient():
    """loss_reduction="none" with grad (RL weights each token differently) differentiates correctly."""
    model = random_model(tiny_config())
    rows = learnable_batch(2, 8)
    x, y = rows[:, :-1], rows[:, 1:]
    weights = torch.tensor([[1.0], [-2.0]])
    (model(x, y, loss_reduction="none") * weights).sum().backward()
    got = model.lm_head.weight.grad.clone()
    model.zero_grad()
    (reference_losses(model, x, y).view(2, 8) * weights).sum().backward()
    torch.testing.assert_close(got, model.lm_head.weight.grad)


def test_all_masked_targets_give_zero_loss_not_nan():
    model = random_model(tiny_config())
    x = torch.zeros(2, 5, dtype=torch.long)
    assert model(x, torch.full_like(x, -1)).item() == 0.0


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])  # MHA, GQA, MQA
def test_kv_cache_prefill_then_decode_matches_full_forward(n_kv_head):
    model = random_model(tiny_config(n_kv_head=n_kv_head))
    assert model.transformer.h[0].attn.c_k.weight.shape == (n_kv_head * 16, 64)
    seq = learnable_batch(3, 20, seed=2)[:, :20]
    seq[1] = torch.randint(0, VOCAB, (20,))  # rows differ
    with torch.no_grad():
        full = model(seq)
        cache = KVCache.for_model(model, batch_size=3, max_len=24)
        got = [model(seq[:, :12], kv_cache=cache)]  # prefill
        got += [model(seq[:, t : t + 1], kv_cache=cache) for t in range(12, 20)]  # one token at a time
    assert cache.pos.tolist() == [20, 20, 20]
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_rows_at_their_own_positions():
    """Prompts of different lengths prefilled alone, inserted into one batch, decoded together."""
    model = random_model(tiny_config(n_kv_head=2))
    prompts = [torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n)) for n in (5, 9)]
    batch = KVCache.for_model(model, batch_size=2, max_len=16)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            single = KVCache.for_model(model, batch_size=1, max_len=16)
            model(prompt, kv_cache=single)
            batch.insert_prefill(single, rows=[row])
        assert batch.pos.tolist() == [5, 9]
        nxt = torch.tensor([[3], [7]])
        steps = [model(nxt, kv_cache=batch) for _ in range(3)]  # feed the same tokens 3 times
        for row, prompt in enumerate(prompts):
            full = model(torch.cat([prompt, nxt[row : row + 1].repeat(1, 3)], dim=1))
            for i, logits in enumerate(steps):
                torch.testing.assert_close(logits[row, 0], full[0, prompt.size(1) + i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("window_pattern", ["", "SL"])
def test_additive_cache_masks_give_the_boolean_masks_logits_exactly(monkeypatch, window_pattern):
    """On CPU the cache's masks are made 0 / -inf once per forward instead of SDPA converting the
    boolean ones in every layer: rows at different positions (masked keys), windows or not, same bits."""
    model = random_model(tiny_config(n_kv_head=2, window_pattern=window_pattern, short_window=4))
    prompt = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))

    def decode() -> torch.Tensor:
        cache = KVCache.for_model(model, batch_size=2, max_len=16)
        with torch.no_grad():
            model(prompt, kv_cache=cache)
            cache.pos[0] = 5  # row 0 forgets its last 4 tokens: its mask hides them
            return torch.cat([model(torch.tensor([[3], [7]]), kv_cache=cache) for _ in range(3)], dim=1)

    additive = decode()
    real = gpt.cache_masks
    monkeypatch.setattr(gpt, "cache_masks", lambda w, c, p, additive=None: real(w, c, p, None))
    assert torch.equal(additive, decode())


def test_insert_prefill_broadcasts_one_row_and_cache_overflow_is_refused():
    model = random_model(tiny_config())
    single = KVCache.for_model(model, batch_size=1, max_len=8)
    with torch.no_grad():
        model(torch.arange(6)[None], kv_cache=single)
        batch = KVCache.for_model(model, batch_size=3, max_len=8)
        batch.insert_prefill(single)
        out = model(torch.tensor([[1], [1], [1]]), kv_cache=batch)
        assert (out == out[:1]).all()
        with pytest.raises(ValueError, match="KV cache overflow"):
            model(torch.zeros(3, 2, dtype=torch.long), kv_cache=batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_squared_gradient_is_bit_identical_to_autograds(dtype):
    x = torch.randn(4, 64, 256, dtype=dtype)
    x[0, 0, :8] = 0.0  # relu's kink: the gradient there is 0 both ways
    upstream = torch.randn_like(x)
    grads = []
    for fn in (gpt.relu_squared, lambda t: F.relu(t).square()):
        leaf = x.clone().requires_grad_()
        out = fn(leaf)
        grads.append((out.detach(), type(out.grad_fn).__name__))
        out.backward(upstream)
        grads.append(leaf.grad)
    (out, custom_fn), grad, (want_out, plain_fn), want_grad = grads
    assert "ReluSquared" in custom_fn and "ReluSquared" not in plain_fn  # the one-pass backward ran
    assert torch.equal(out, want_out) and torch.equal(grad, want_grad)
    with torch.no_grad():  # inference takes the plain path and saves nothing
        assert torch.equal(gpt.relu_squared(x), want_out)


def test_flops_estimate_is_positive_and_scales():
    small, deep = GPT(tiny_config()), GPT(tiny_config(n_layer=4))
    per_layer = 12 * 64 * 64  # attention (4*64*64 matrix params) + MLP (8*64*64)
    assert small.estimate_flops() == 6 * (2 * per_layer + VOCAB * 64) + 12 * 2 * 64 * 32
    assert deep.estimate_flops() > small.estimate_flops() > 0
    # the transformer part doubles with depth (the lm_head does not)
    head = 6 * VOCAB * 64
    assert deep.estimate_flops() - head == 2 * (small.estimate_flops() - head)
    assert small.num_params() == small.num_params(exclude_embedding=True) + VOCAB * 64


def test_meta_device_build_then_init_weights():
    config = tiny_config()
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    fresh = GPT(config)
    torch.testing.assert_close(model.cos, fresh.cos)
    torch.testing.assert_close(model.sin, fresh.sin)
    assert (model.transformer.h[0].attn.c_proj.weight == 0).all()
    x = torch.randint(0, VOCAB, (2, 8))
    assert model(x, x).item() == pytest.approx(math.log(VOCAB), abs=0.1)
    assert set(model.state_dict()) == set(dict(model.named_parameters()))  # no buffers saved


def test_bf16_autocast_forward_and_backward():
    model = random_model(tiny_config())
    rows = learnable_batch(2, 16)
    x, y = rows[:, :-1], rows[:, 1:]
    fp32 = model(x, y).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        loss = model(x, y)
    loss.backward()
    assert logits.dtype == torch.float32 and logits.abs().max() <= model.config.softcap
    assert loss.item() == pytest.approx(fp32, rel=0.05)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_weights_map_one_to_one_onto_hf_nanochat():
    transformers = pytest.importorskip("transformers")
    config = tiny_config(n_kv_head=2)
    model = random_model(config)
    hf = transformers.NanoChatForCausalLM(transformers.NanoChatConfig(**hf_config(config))).eval()
    mapping = hf_state_dict_mapping(config)
    ours = model.state_dict()
    assert set(mapping) == set(ours)
    missing, unexpected = hf.load_state_dict({mapping[k]: v for k, v in ours.items()}, strict=False)
    assert not unexpected and not [k for k in missing if "rotary" not in k]
    idx = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=1e-5)
