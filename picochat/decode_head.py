"""The lm_head at decode time: the (rows x vocab) product in the weight layout fastest for the batch.

On a small model the lm_head is most of a decode step (vocab 32,768 x width 256 is 33 MB of fp32
weight, read once per step, against 12 MB for all four blocks of the depth-4 model), and on CPU how the
weight is laid out decides how fast the BLAS reads it. Measured on this project's 2-core AMD EPYC
(MKL, 1 thread, fp32, median of 20-50 calls; the machine was shared, so only ratios side by side count;
table in docs/performance.md):
  - batch 1: `x @ Wt` with a contiguous (width, vocab) copy Wt is 2-3x faster than `F.linear(x, W)`
    (2.6 vs 6.9 ms with the machine quiet), close to the ~3 ms it takes just to read 33 MB;
  - batch 2 and up: that same layout is the slowest (at batch 8 1.2-1.4x slower than F.linear); oneDNN's
    matmul on a weight it has re-laid-out itself (`torch.ops.mkldnn._linear_pointwise`) is 1.7-2.5x
    faster than F.linear at batch 8 and 32 (where MKL takes a slow path on this AMD CPU).
So `DecodeHead` keeps, next to the model's own weight (left untouched, so training is unaffected), a
copy in each layout it has used: about 33 MB each. The copies follow the weight: they are rebuilt when
the weight tensor is replaced or changed in place (its version counter moves, as after an optimiser
step in RL), so they are never stale. On GPU (and for a dtype other than fp32) it is plain F.linear.

Only the first `vocab_size` rows of the weight are used: a vocabulary padded for speed never produces
logits for the padding, so they can never be sampled.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

ONEDNN_BATCH_HINT = 8  # the batch size oneDNN lays the weight out for (measured: 8 and 32 do as well)


def _onednn_available() -> bool:
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("_linear_pointwise", "_reorder_linear_weight")
    )


class DecodeHead:
    """head(x) -> x @ lm_head.weight[:vocab_size].T for x (..., width), in the fastest layout for x's rows."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.vocab_size = model.config.vocab_size
        self._layouts: dict[str, torch.Tensor] = {}
        self._source: tuple[int, int] | None = None  # (data_ptr, version) of the weight the copies came from

    def layout(self, rows: int) -> str:
        """Which kernel serves `rows` rows: "linear" (F.linear, GPU or non-fp32), "transposed" (x @ Wt)
        or "onednn" (oneDNN's packed weight; "rowmajor", W @ x.T, where oneDNN is missing)."""
        weight = self.model.lm_head.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            return "linear"
        if rows == 1:
            return "transposed"
        return "onednn" if _onednn_available() else "rowmajor"

    @torch.compiler.disable  # a compiled forward (bench/infer.py --compile) runs it eager: inductor
    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # cannot trace mkldnn._linear_pointwise
        weight = self.model.lm_head.weight[: self.vocab_size]
        rows = x.numel() // x.size(-1)
        kind = self.layout(rows)
        if kind == "linear":
            return F.linear(x, weight)
        flat = x.reshape(rows, x.size(-1))
        if kind == "rowmajor":
            return (weight @ flat.t()).t().reshape(*x.shape[:-1], self.vocab_size)
        copy = self._copy(kind, weight)
        if kind == "transposed":
            out = flat @ copy
        else:
            out = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), copy, None, "none", [], "")
        return out.reshape(*x.shape[:-1], self.vocab_size)

    def _copy(self, kind: str, weight: torch.Tensor) -> torch.Tensor:
        """The weight in layout `kind`, rebuilt if the model's weight changed since it was made."""
        param = self.model.lm_head.weight
        source = (param.data_ptr(), param._version)
        if source != self._source:
            self._layouts.clear()
            self._source = source
        if kind not in self._layouts:
            with torch.no_grad():
                if kind == "transposed":
                    self._layouts[kind] = weight.t().contiguous()
                else:
                    self._layouts[kind] = torch.ops.mkldnn._reorder_linear_weight(
                        weight.contiguous(), ONEDNN_BATCH_HINT
                    )
        return self._layouts[kind]
