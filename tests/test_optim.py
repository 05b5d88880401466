"""Optimisers: Newton-Schulz orthogonalises, Muon steps as specified, the GPT's groups cover every
parameter once with width-scaled LRs, state round-trips, and 2 gloo processes update like 1."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from picochat.gpt import GPT, GPTConfig
from picochat.optim import Muon, orthogonalize

# Shapes with counts that do not divide evenly over 2 ranks, so the padding path runs.
DIST_SHAPES = [(16, 8)] * 3 + [(8, 32)] + [(12, 12)] * 2


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (3, 48, 48)])
def test_newton_schulz_output_is_near_orthogonal(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x = orthogonalize(g)
    assert x.shape == g.shape
    s = torch.linalg.svdvals(x)
    assert s.min() > 0.6 and s.max() < 1.3, s  # the quintic settles singular values near 1
    # ... while keeping the singular vectors: x is close to the exact polar factor U V^T
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    cosine = (x * polar).sum(dim=(-2, -1)) / (x.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert (cosine > 0.95).all(), cosine


def test_muon_step_is_scaled_orthogonalised_nesterov_momentum():
    torch.manual_seed(0)
    tall = torch.nn.Parameter(torch.randn(32, 8))  # rows/cols = 4: scale 2
    start = tall.detach().clone()
    opt = Muon([tall], lr=0.1, momentum=0.9)
    grads = [torch.randn(32, 8) for _ in range(2)]
    buf = torch.zeros(32, 8)
    expected = start
    for g in grads:
        tall.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + 0.1 * g
        expected = expected - 0.1 * 2 * orthogonalize(0.1 * g + 0.9 * buf)
    torch.testing.assert_close(tall.detach(), expected)
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(4))])


def test_gpt_optimizer_groups_cover_every_parameter_once():
    model = GPT(GPTConfig(sequence_len=16, vocab_size=32, n_layer=2, n_head=3, n_kv_head=1, n_embd=192))
    adamw, muon = model.setup_optimizers(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02)
    seen = [id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    assert {id(p) for g in muon.param_groups for p in g["params"]} == {
        id(p) for p in model.transformer.h.parameters()
    }
    scale = (192 / 768) ** -0.5  # AdamW LRs grow as the model narrows
    head, embedding = adamw.param_groups
    assert head["params"] == [model.lm_head.weight] and head["initial_lr"] == pytest.approx(0.004 * scale)
    assert embedding["params"] == [model.transformer.wte.weight]
    assert embedding["initial_lr"] == pytest.approx(0.2 * scale)
    assert all(g["initial_lr"] == 0.02 and "momentum" in g for g in muon.param_groups)


def _make_params_and_grads(step: int) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + step)
    params = [
        torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
        for i, s in enumerate(DIST_SHAPES)
    ]
    return params, [torch.randn(s, generator=gen) for s in DIST_SHAPES]


def _run_muon(steps: int = 3) -> dict[str, torch.Tensor]:
    """Muon on fixed parameters and gradients; the same call alone or on every rank."""
    params, _ = _make_params_and_grads(0)
    opt = Muon(params, lr=0.05, momentum=0.9)
    for step in range(steps):
        for p, g in zip(params, _make_params_and_grads(step)[1], strict=True):
            p.grad = g
        opt.step()
    return {f"p{i}": p.detach().clone() for i, p in enumerate(params)}


def _muon_worker(rank: int, world_size: int, init_file: str, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        save_file(_run_muon(), f"{out_path}.rank{rank}")
    finally:
        dist.destroy_process_group()


def test_muon_on_two_gloo_processes_equals_one_process(tmp_path):
    single = _run_muon()
    out = tmp_path / "two.safetensors"
    mp.spawn(_muon_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    for rank in range(2):
        two = load_file(f"{out}.rank{rank}")
        assert set(two) == set(single)
        for name, expected in single.items():
            torch.testing.assert_close(two[name], expected, rtol=1e-6, atol=1e-6)
    start = _make_params_and_grads(0)[0][0]
    assert not torch.allclose(single["p0"], start)  # the parameters really moved


def test_optimizer_state_round_trips_through_state_dict():
    def fresh() -> tuple[GPT, list[torch.optim.Optimizer]]:
        torch.manual_seed(0)
        model = GPT(GPTConfig(sequence_len=8, vocab_size=16, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
        model.init_weights()
        return model, model.setup_optimizers()

    def step(model: GPT, optimizers: list[torch.optim.Optimizer], seed: int) -> None:
        x = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(seed))
        model(x, x).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    model_a, opts_a = fresh()
    step(model_a, opts_a, 0)
    states = copy.deepcopy([opt.state_dict() for opt in opts_a])  # state_dict() shares live tensors
    assert all(isinstance(v, torch.Tensor) for s in states for st in s["state"].values() for v in st.values())
    model_b, opts_b = fresh()
    model_b.load_state_dict(model_a.state_dict())
    for opt, state in zip(opts_b, states, strict=True):
        opt.load_state_dict(state)
    step(model_a, opts_a, 1)
    step(model_b, opts_b, 1)
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert math.isfinite(sum(p.sum().item() for p in model_a.parameters()))


def test_polar_express_lands_closer_to_the_polar_factor_than_the_fixed_quintic():
    g = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    errors = {ns: (orthogonalize(g, ns=ns) - polar).norm() / polar.norm() for ns in ("jordan", "polar")}
    assert errors["polar"] < 0.5 * errors["jordan"], errors
    s = torch.linalg.svdvals(orthogonalize(g, ns="polar"))
    assert s.min() > 0.85 and s.max() < 1.15, s


def test_cautious_weight_decay_shrinks_only_where_the_step_already_shrinks():
    p = torch.nn.Parameter(torch.tensor([[1.0, -1.0], [1.0, -1.0]]))
    opt = Muon([p], lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.5)
    p.grad = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])  # agrees with p's sign on the diagonal only
    update = orthogonalize(p.grad.clone())
    start = p.detach().clone()
    opt.step()
    agree = (update * start) >= 0
    expected = start - 0.1 * update - 0.1 * 0.5 * start * agree
    torch.testing.assert_close(p.detach(), expected)
    assert agree.tolist() == [[True, False], [False, True]]


def test_normuon_equalises_neuron_sizes_and_keeps_the_update_norm():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(48, 16))  # tall: one statistic per row
    opt = Muon([p], lr=1.0, momentum=0.0, nesterov=False, normuon_beta2=0.5)
    g = torch.randn(48, 16) * torch.linspace(0.1, 3.0, 48)[:, None]
    p.grad = g
    plain = orthogonalize(g)
    opt.step()
    step = -p.detach() / math.sqrt(48 / 16)  # Muon scales tall updates by sqrt(rows / cols)
    assert step.norm() == pytest.approx(plain.norm().item(), rel=1e-4)
    row_rms = step.square().mean(dim=1).sqrt()
    assert row_rms.std() / row_rms.mean() < 0.01 < plain.square().mean(dim=1).sqrt().std() / plain.norm()
    assert opt.state[p]["second_moment"].shape == (48, 1)


def test_configure_muon_sets_the_switches_on_every_muon_group():
    from picochat.optim import configure_muon

    model = GPT(GPTConfig(sequence_len=16, vocab_size=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    optimizers = model.setup_optimizers()
    configure_muon(optimizers, ns="polar", weight_decay=0.2, normuon_beta2=0.95)
    muon = [opt for opt in optimizers if isinstance(opt, Muon)][0]
    for group in muon.param_groups:
        assert (group["ns"], group["weight_decay"], group["initial_weight_decay"]) == ("polar", 0.2, 0.2)
    adamw = [opt for opt in optimizers if not isinstance(opt, Muon)][0]
    assert all("ns" not in group for group in adamw.param_groups)
    with pytest.raises(ValueError, match="Newton-Schulz"):
        configure_muon(optimizers, ns="cubic")


def test_a_muon_state_saved_before_the_switches_existed_loads_with_them_off():
    p = torch.nn.Parameter(torch.randn(8, 4))
    opt = Muon([p], lr=0.1)
    p.grad = torch.randn(8, 4)
    opt.step()
    old = opt.state_dict()
    for group in old["param_groups"]:
        for key in ("ns", "weight_decay", "normuon_beta2"):
            del group[key]
    fresh = Muon([p], lr=0.1)
    fresh.load_state_dict(old)
    group = fresh.param_groups[0]
    assert (group["ns"], group["weight_decay"], group["normuon_beta2"]) == ("jordan", 0.0, 0.0)
    p.grad = torch.randn(8, 4)
    fresh.step()
