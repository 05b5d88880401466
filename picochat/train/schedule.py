"""Per-step schedules of a training run, and the learning-rate / weight-decay rules for the batch size.

- `lr_multiplier`: linear warm-up, constant, linear warm-down to a final fraction (every stage);
- `muon_momentum`: Muon's momentum, warmed up from 0.85 to its peak, optionally lowered again during
  the LR warm-down (nanochat 2026: 0.97 peak over 400 steps, down to 0.90 at the end);
- `weight_decay_multiplier`: Muon's weight decay decays with a cosine to 0 over the horizon;
- `batch_lr_scale` / `batch_weight_decay`: the AdamW rules nanochat follows for a total batch B
  away from its reference B_ref = 2^19 tokens: learning rates times sqrt(B / B_ref), and weight decay
  such that the "epoch time" B / (lr * wd * D) of arXiv 2405.13698 stays that of the reference.
  At B = B_ref and the reference horizon both are the identity, so GPU runs at nanochat's batch keep
  nanochat's settings.
"""

from __future__ import annotations

import math

REF_BATCH_TOKENS = 2**19  # nanochat's measured optimal batch for d12, where its LRs were tuned
MOMENTUM_START = 0.85


def lr_multiplier(
    step: int,
    horizon: int,
    warmup_ratio: float,
    warmdown_ratio: float,
    final_frac: float,
    warmup_steps: int = 0,
) -> float:
    """Linear warm-up to 1 (over `warmup_steps` if > 0, else a ratio of the horizon), constant, then
    linear warm-down to final_frac over the last steps."""
    warmup = warmup_steps if warmup_steps > 0 else round(warmup_ratio * horizon)
    warmdown = round(warmdown_ratio * horizon)
    if step < warmup:
        return (step + 1) / warmup
    if step <= horizon - warmdown or warmdown == 0:
        return 1.0
    progress = max(0.0, (horizon - step) / warmdown)
    return progress + (1 - progress) * final_frac


def muon_momentum(
    step: int,
    horizon: int = 0,
    peak: float = 0.95,
    warmup_steps: int = 300,
    final: float = -1.0,
    warmdown_ratio: float = 0.0,
) -> float:
    """0.85 -> `peak` linearly over `warmup_steps`; then, when `final` >= 0, linearly from the value
    reached to `final` over the LR warm-down (the last `warmdown_ratio` of `horizon` steps)."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    momentum = (1 - frac) * MOMENTUM_START + frac * peak
    warmdown = round(warmdown_ratio * horizon)
    start = horizon - warmdown
    if final < 0 or warmdown == 0 or step < start:
        return momentum
    progress = min(1.0, (step - start) / warmdown)
    return (1 - progress) * momentum + progress * final


def weight_decay_multiplier(step: int, horizon: int) -> float:
    """Cosine from 1 at step 0 to 0 at the horizon: decay matters early, and it must not fight the
    warm-down's last small steps."""
    return 0.5 * (1 + math.cos(math.pi * min(step, horizon) / max(1, horizon)))


def batch_lr_scale(total_batch: int) -> float:
    """sqrt(B / B_ref): the square-root rule for adaptive optimisers (used for Muon too, as nanochat)."""
    return math.sqrt(total_batch / REF_BATCH_TOKENS)


def batch_weight_decay(weight_decay: float, total_batch: int, tokens: float, ref_tokens: float) -> float:
    """Weight decay that keeps B / (lr * wd * D) at the reference's, given lr ~ sqrt(B): wd_ref *
    sqrt(B / B_ref) * D_ref / D for a run of D tokens whose reference horizon is D_ref tokens."""
    return weight_decay * batch_lr_scale(total_batch) * ref_tokens / max(1.0, tokens)
