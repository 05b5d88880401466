"""Optimisers for the GPT: Muon for the 2-D weight matrices of the transformer blocks, AdamW for the rest.

Muon ("MomentUm Orthogonalized by Newton-Schulz", Keller Jordan 2024) keeps an SGD momentum buffer per
matrix and, instead of stepping along the (Nesterov) momentum M itself, steps along the closest
semi-orthogonal matrix U V^T (M = U S V^T): every singular direction moves by the same amount, so
the rare directions that plain SGD/Adam under-train get as much update as the dominant ones. U V^T is
approximated with a few iterations of a quintic Newton-Schulz polynomial (`orthogonalize`), which
needs only matmuls. The update is scaled by sqrt(max(1, rows / cols)) so tall matrices (the MLP's
input projection) move as much per element as square ones.
Embeddings, the lm_head (and any scalar or vector parameters) are not hidden-layer matrices in this
sense and use AdamW.

Switches measured by bench/recipe.py (docs/recipe.md says which are on by default):
  - `ns="polar"`: Polar Express coefficients (Amsel, Persson, Musco, Gower 2025, arXiv 2505.16932):
    a different (a, b, c) per iteration, chosen so that five iterations get closer to U V^T than five
    of the fixed quintic.
  - `normuon_beta2 > 0`: NorMuon-style normalisation (arXiv 2510.05491): the orthogonalised update's
    rows (columns for wide matrices) have uneven sizes; an EMA of each neuron's mean squared update
    rescales them to the same size, then the whole update is rescaled back to its original norm.
  - `weight_decay > 0`: cautious decoupled weight decay, applied only to the entries whose update
    already moves them towards zero (update and weight of the same sign); the trainer schedules it.

Distributed design (torch.distributed initialised, e.g. under torchrun):
  - The trainer all-reduces (averages) every gradient before `step()`, so all ranks see the same
    gradients and hold the same weights and optimiser state.
  - Every rank updates every Muon momentum buffer (cheap elementwise work) so the state stays
    replicated: checkpoints hold one optimiser state that resumes on any number of ranks.
  - The expensive part, Newton-Schulz, is split: parameters are grouped by shape; within a group of
    n matrices rank r orthogonalises the r-th contiguous block of ceil(n / world) of them as one
    batched tensor, then one `all_gather` per group gives every rank all n updates, which every rank
    applies identically. The result equals the single-process update.
  - AdamW is elementwise and cheap: each rank runs it on the (already averaged) gradients.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

# Quintic Newton-Schulz coefficients (Keller Jordan): maximal slope at 0, so small singular values
# grow fast; the iteration then settles singular values in roughly [0.7, 1.2], which is enough.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
# Polar Express, one (a, b, c) per iteration (the paper's 5-step schedule with its safety margin):
# the first steps grow small singular values aggressively, the last ones land them close to 1.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NS_VARIANTS = ("jordan", "polar")


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS, ns: str = "jordan") -> torch.Tensor:
    """Approximately U V^T for g = U S V^T, batched over leading dimensions (..., rows, cols).

    Each iteration maps every singular value s to a*s + b*s^3 + c*s^5 while keeping the singular
    vectors. Starting below 1 (after dividing by the Frobenius norm), this pushes all of them near 1.
    `ns` picks the coefficients: "jordan" (the same quintic every step) or "polar" (Polar Express,
    whose first coefficients assume the norm over-estimates the top singular value by at least 1%).
    Runs in bf16 on GPUs (fast and accurate enough) and fp32 elsewhere (bf16 matmuls are slow on CPU).
    """
    coeffs = POLAR_EXPRESS_COEFFS[:steps] if ns == "polar" else (NS_COEFFS,) * steps
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: the X X^T products are then the small ones
        x = x.mT
    margin = 1.01 if ns == "polar" else 1.0
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * margin + 1e-7)
    for a, b, c in coeffs:
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return x.mT if tall else x


def _world() -> tuple[int, int]:
    """(rank, world_size), or (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters, with Newton-Schulz split across ranks when distributed.

    Parameters are put in one param group per shape (sorted, so every rank builds the same groups);
    each group has lr, momentum, nesterov, ns_steps, ns, weight_decay and normuon_beta2. State per
    parameter: "momentum_buffer", and "second_moment" (one value per neuron) with NorMuon.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = NS_STEPS,
        ns: str = "jordan",
        weight_decay: float = 0.0,
        normuon_beta2: float = 0.0,
    ) -> None:
        if ns not in NS_VARIANTS:
            raise ValueError(f"unknown Newton-Schulz variant {ns!r}; one of {NS_VARIANTS}")
        params = list(params)
        for p in params:
            if p.ndim != 2:
                raise ValueError(f"Muon only handles 2-D matrices, got a parameter of shape {tuple(p.shape)}")
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [{"params": [p for p in params if tuple(p.shape) == shape]} for shape in shapes]
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps, "ns": ns}
        defaults |= {"weight_decay": weight_decay, "normuon_beta2": normuon_beta2}
        super().__init__(groups, defaults)

    def __setstate__(self, state: dict) -> None:
        """load_state_dict ends here: groups saved before a switch existed get its default (off)."""
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        rank, world = _world()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:  # the same on every rank: gradients were all-reduced
                continue
            directions = [self._momentum_direction(p, group) for p in params]
            per_rank = math.ceil(len(params) / world)
            mine = directions[rank * per_rank : (rank + 1) * per_rank]
            rows, cols = params[0].shape
            out = torch.zeros(per_rank, rows, cols, device=params[0].device, dtype=directions[0].dtype)
            if mine:
                stacked = torch.stack(mine)
                out[: len(mine)] = orthogonalize(stacked, group["ns_steps"], group["ns"]).to(out.dtype)
            if world > 1:
                gathered = [torch.empty_like(out) for _ in range(world)]
                dist.all_gather(gathered, out)
                out = torch.cat(gathered)
            lr = group["lr"] * math.sqrt(max(1.0, rows / cols))
            for p, update in zip(params, out, strict=False):  # out may have padding rows at the end
                update = update.to(p.dtype)
                if group["normuon_beta2"] > 0:  # after the gather: every rank keeps the same state
                    update = self._normalize_neurons(p, update, group["normuon_beta2"])
                if group["weight_decay"] > 0:  # cautious: only where the step already shrinks p
                    p.sub_(p * (update * p >= 0), alpha=lr * group["weight_decay"])
                p.add_(update, alpha=-lr)

    def _normalize_neurons(self, p: torch.nn.Parameter, update: torch.Tensor, beta2: float) -> torch.Tensor:
        """NorMuon: divide each output neuron's update by the RMS of its recent updates, keep the norm."""
        rows, cols = update.shape
        dim = -1 if rows >= cols else -2  # one statistic per row of tall matrices, per column of wide
        mean_sq = update.square().mean(dim=dim, keepdim=True)
        state = self.state[p]
        if "second_moment" not in state:
            state["second_moment"] = torch.zeros_like(mean_sq)
        second = state["second_moment"]
        second.lerp_(mean_sq, 1 - beta2)
        scaled = update * second.clamp_min(1e-10).rsqrt()
        return scaled * (update.norm() / scaled.norm().clamp_min(1e-10))

    def _momentum_direction(self, p: torch.nn.Parameter, group: dict) -> torch.Tensor:
        """Update p's momentum buffer with its gradient; return the (Nesterov) direction to orthogonalise."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - group["momentum"])  # buf = momentum * buf + (1 - momentum) * grad
        if group["nesterov"]:
            return p.grad.lerp(buf, group["momentum"])
        return buf


def build_optimizers(
    adam_groups: list[tuple[list[torch.nn.Parameter], float]],
    muon_params: list[torch.nn.Parameter],
    matrix_lr: float,
    weight_decay: float = 0.0,
    adam_betas: tuple[float, float] = (0.8, 0.95),
    muon_options: dict | None = None,
) -> list[torch.optim.Optimizer]:
    """[AdamW over `adam_groups` ((params, lr) pairs), Muon over `muon_params` at `matrix_lr`].

    `weight_decay` applies to the AdamW groups; `muon_options` are Muon's switches (ns, weight_decay,
    normuon_beta2). Every param group gets `initial_lr` = its lr and `initial_weight_decay`, which the
    trainer multiplies by its schedules each step.
    """
    adamw = torch.optim.AdamW(
        [{"params": params, "lr": lr} for params, lr in adam_groups],
        betas=adam_betas,
        eps=1e-10,
        weight_decay=weight_decay,
        # The fused kernel does the whole update in one pass without temporaries (5x faster on CPU).
        fused=all(p.device.type in ("cpu", "cuda") for params, _ in adam_groups for p in params),
    )
    muon = Muon(muon_params, lr=matrix_lr, **(muon_options or {}))
    optimizers: list[torch.optim.Optimizer] = [adamw, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
            group["initial_weight_decay"] = group["weight_decay"]
    return optimizers


def configure_muon(optimizers: list[torch.optim.Optimizer], **options: object) -> None:
    """Set Muon switches (ns, weight_decay, normuon_beta2) on every Muon group of `optimizers`, after
    the model built them; weight_decay also becomes the group's initial_weight_decay (the schedule's
    base)."""
    for opt in optimizers:
        if not isinstance(opt, Muon):
            continue
        if options.get("ns", "jordan") not in NS_VARIANTS:
            raise ValueError(f"unknown Newton-Schulz variant {options['ns']!r}; one of {NS_VARIANTS}")
        for group in opt.param_groups:
            group.update(options)
            group["initial_weight_decay"] = group["weight_decay"]
