"""The training loss of the GPT: lm_head, soft-cap and cross-entropy fused into one chunked computation.

`softcap_cross_entropy` never holds the (tokens x vocab) logits of the whole batch: with a 32k
vocabulary those logits would be most of a small model's memory traffic and peak memory. Its gradients
are computed in the same pass (the loss ends the graph), and `SoftcapCrossEntropySum` hands them to
autograd. Rows of the lm_head past `vocab_size` (a vocabulary padded for matmul speed) are masked out:
their logits never enter the softmax and their gradient is zero.
"""

from __future__ import annotations

from typing import Any

import torch

# Logit elements per chunk of the fused loss. On CPU a (chunk x vocab) fp32 block of 32 MB stays in
# cache (256 tokens at vocab 32768); accelerators want bigger blocks to amortise kernel launches.
LOSS_CHUNK_ELEMENTS = {"cpu": 2**23}
LOSS_CHUNK_ELEMENTS_DEFAULT = 2**27


def softcap_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float,
    with_grads: bool,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-token cross-entropy of logits = softcap * tanh(h @ weight^T / softcap), chunk by chunk.

    Only the first `vocab_size` rows of `weight` are tokens (default: all); the rest is padding.

    h (N, d), targets (N,) with -1 = ignored (loss 0). With `with_grads`, also returns the gradients of
    the summed loss with respect to h and weight, computed here and now: the loss ends the graph, so
    its gradient is known up to the incoming scalar factor. Per counted token:
        dL/dz = (softmax(logits) - onehot(target)) * (1 - tanh^2),   z = h @ weight^T
    Working on a chunk of rows at a time (LOSS_CHUNK_ELEMENTS) in two reused buffers keeps the
    logits in cache, avoids the page faults of fresh large allocations, and never stores (N x vocab)
    tensors. Matmuls run in the autocast dtype when autocast is on (bf16 on GPU); the rest is fp32.
    """
    device, (n_tok, vocab) = h.device, (h.size(0), weight.size(0))
    padded = vocab_size is not None and vocab_size < vocab
    autocast_on = torch.is_autocast_enabled(device.type)
    mm_dtype = torch.get_autocast_dtype(device.type) if autocast_on else weight.dtype
    budget = LOSS_CHUNK_ELEMENTS.get(device.type, LOSS_CHUNK_ELEMENTS_DEFAULT)
    chunk = max(1, min(budget // vocab, n_tok))
    t_buf = torch.empty(chunk, vocab, dtype=torch.float32, device=device)  # tanh(z / softcap)
    z_buf = t_buf if mm_dtype == torch.float32 else torch.empty(chunk, vocab, dtype=mm_dtype, device=device)
    e_buf = torch.empty(chunk, vocab, dtype=torch.float32, device=device)  # exp(logits), then dL/dz
    minus_one = torch.full((chunk, 1), -1.0, device=device)
    w = weight.to(mm_dtype)
    valid = targets >= 0
    safe_targets = targets.clamp(min=0)[:, None]
    any_ignored = not bool(valid.all())
    losses = torch.empty(n_tok, dtype=torch.float32, device=device)
    grad_h = torch.empty(h.shape, dtype=mm_dtype, device=device) if with_grads else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=device) if with_grads else None
    with torch.autocast(device.type, enabled=False):
        for start in range(0, n_tok, chunk):
            rows = slice(start, min(start + chunk, n_tok))
            hc, tc = h[rows].to(mm_dtype), safe_targets[rows]
            m = hc.size(0)
            z, t, e = z_buf[:m], t_buf[:m], e_buf[:m]
            torch.addmm(z, hc, w.t(), beta=0, alpha=1.0 / softcap, out=z)
            torch.tanh(z, out=t)
            # |logits| <= softcap, so exp() needs no max-subtraction (GPTConfig bounds softcap).
            torch.mul(t, softcap, out=e).exp_()
            if padded:  # padding rows are no tokens: probability 0, so softmax and gradient are 0 there
                e[:, vocab_size:] = 0.0
            sum_e = e.sum(dim=1, keepdim=True)
            losses[rows] = (sum_e.log() - softcap * t.gather(1, tc)).squeeze(1)
            if not with_grads:
                continue
            g = e.div_(sum_e).scatter_add_(1, tc, minus_one[:m])  # softmax - onehot
            g.addcmul_(g, t.square_(), value=-1.0)  # times the soft-cap's derivative 1 - t^2
            if any_ignored:
                g.masked_fill_(~valid[rows, None], 0.0)
            g_mm = g.to(mm_dtype)
            torch.mm(g_mm, w, out=grad_h[rows])
            if grad_w.dtype == mm_dtype:
                grad_w.addmm_(g_mm.t(), hc)
            else:
                grad_w += (g_mm.t() @ hc).float()
    losses.masked_fill_(~valid, 0.0)
    return losses, grad_h.to(h.dtype) if with_grads else None, grad_w


class SoftcapCrossEntropySum(torch.autograd.Function):
    """The summed loss of `softcap_cross_entropy`, with its gradients precomputed in the forward."""

    @staticmethod
    def forward(
        ctx: Any,
        h: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        softcap: float,
        vocab_size: int,
    ):
        losses, grad_h, grad_w = softcap_cross_entropy(h, weight, targets, softcap, True, vocab_size)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return losses.sum()

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_total.to(grad_h.dtype),
            (grad_w * grad_total).to(ctx.weight_dtype),
            None,
            None,
            None,
        )
