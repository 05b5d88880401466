"""What only a GPU can show: the model under bf16 autocast, its KV-cache decode and torch.compile on CUDA.

Skipped without CUDA; runs/gpu_check.sh runs this file first on the GPU machine. The reference for each
check is the same model in fp32 (eager, on the CPU or the GPU), so a wrong kernel, dtype or device
placement shows up as a mismatch, not just as a crash.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from picochat.common import autocast_context
from picochat.gpt import GPT, GPTConfig, KVCache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
VOCAB = 512
CUDA = torch.device("cuda")


def random_model(seed: int = 0) -> GPT:
    """A small GPT with every weight random (init_weights zeroes some projections, hiding bugs)."""
    config = GPTConfig(sequence_len=128, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=128)
    model = GPT(config)
    model.init_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model.eval()


def tokens(rows: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def test_cuda_bf16_forward_and_loss_match_fp32_on_the_cpu():
    model, idx = random_model(), tokens(4, 96)
    with torch.no_grad():
        reference = model(idx).float()
        gpu = model.to(CUDA)
        with autocast_context(CUDA):
            logits = gpu(idx.to(CUDA)).float().cpu()
            loss = gpu(idx[:, :-1].to(CUDA), targets=idx[:, 1:].to(CUDA)).float().item()
    scale = reference.abs().max().item()
    assert (logits - reference).abs().max().item() < 0.05 * scale  # bf16 keeps ~3 significant digits
    expected = F.cross_entropy(model.cpu()(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten()).item()
    assert loss == pytest.approx(expected, rel=0.02)


def test_cuda_kv_cache_decode_matches_the_full_forward():
    model = random_model().to(CUDA)
    prompt, nxt = tokens(2, 20).to(CUDA), tokens(2, 1, seed=2).to(CUDA)
    cache = KVCache.for_model(model, batch_size=2, max_len=32)
    with torch.no_grad():
        model(prompt, kv_cache=cache)
        steps = [model(nxt, kv_cache=cache)[:, 0] for _ in range(4)]
        full = model(torch.cat([prompt, nxt.repeat(1, 4)], dim=1))
    for i, step in enumerate(steps):
        torch.testing.assert_close(step, full[:, prompt.size(1) + i], atol=1e-4, rtol=1e-4)


def test_cuda_compiled_training_step_matches_eager_and_learns():
    idx = tokens(8, 65).to(CUDA)
    inputs, targets = idx[:, :-1], idx[:, 1:]
    eager = random_model().to(CUDA).train()
    compiled_model = random_model().to(CUDA).train()
    compiled = torch.compile(compiled_model)
    with autocast_context(CUDA):
        eager_loss = eager(inputs, targets=targets)
        compiled_loss = compiled(inputs, targets=targets)
    eager_loss.backward()
    compiled_loss.backward()
    assert compiled_loss.item() == pytest.approx(eager_loss.item(), rel=1e-2)
    for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-2, rtol=5e-2), name
    optimizer = torch.optim.AdamW(compiled_model.parameters(), lr=3e-3)
    first = compiled_loss.item()
    for _ in range(20):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(CUDA):
            loss = compiled(inputs, targets=targets)
        loss.backward()
    assert loss.item() < 0.7 * first  # memorising one batch: the compiled backward really trains
