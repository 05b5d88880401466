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

`bf16=True` (opt-in: `picochat chat/serve --bf16-head`) keeps one oneDNN copy in bfloat16 instead, for
every batch size: half the bytes to read, and with native bf16 arithmetic (AVX512-BF16 or AMX) fast to
multiply. On a 2-core AMD EPYC with AVX512-BF16 (1 thread, median of 7 x 20 calls, machine busy) it took
0.49 / 2.3 / 5.7 ms at batch 1 / 8 / 32 against the best fp32 layout's 1.08 / 3.8 / 9.1 ms. The logits
are still fp32 but come from bf16-rounded weights and activations (about 3 significant digits), so a
greedy reply can differ from the fp32 one where two tokens nearly tie; evaluations keep fp32.

Only the first `vocab_size` rows of the weight are used: a vocabulary padded for speed never produces
logits for the padding, so they can never be sampled.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from picochat.common import PicochatError

ONEDNN_BATCH_HINT = 8  # the batch size oneDNN lays the weight out for (measured: 8 and 32 do as well)


def _onednn_available() -> bool:
    ops = torch.ops.mkldnn
    return torch.backends.mkldnn.is_available() and all(
        hasattr(ops, name) for name in ("_linear_pointwise", "_reorder_linear_weight")
    )


def _bf16_supported() -> bool:
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bf16_head_problem() -> str | None:
    """Why this machine cannot run the bf16 head (one line naming the fix), or None if it can."""
    if not _onednn_available():
        return "--bf16-head needs torch built with oneDNN (mkldnn), which this torch lacks; drop the flag"
    if not _bf16_supported():
        return "--bf16-head needs a CPU with AVX512 or AMX bf16 support, which this one lacks; drop the flag"
    return None


class DecodeHead:
    """head(x) -> x @ lm_head.weight[:vocab_size].T for x (..., width), in the fastest layout for x's rows."""

    def __init__(self, model: Any, bf16: bool = False) -> None:
        self.model = model
        self.bf16 = bf16
        problem = bf16_head_problem() if bf16 and model.lm_head.weight.device.type == "cpu" else None
        if problem:
            raise PicochatError(problem)
        self.vocab_size = model.config.vocab_size
        self._layouts: dict[str, torch.Tensor] = {}
        self._source: tuple[int, int] | None = None  # (data_ptr, version) of the weight the copies came from

    def layout(self, rows: int) -> str:
        """Which kernel serves `rows` rows: "linear" (F.linear, GPU or non-fp32), "transposed" (x @ Wt),
        "onednn" (oneDNN's packed weight; "rowmajor", W @ x.T, where oneDNN is missing) or, with bf16,
        "onednn_bf16" (oneDNN's packed bf16 weight)."""
        weight = self.model.lm_head.weight
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            return "linear"
        if self.bf16:
            return "onednn_bf16"
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
            flat = flat.to(copy.dtype).contiguous()
            out = torch.ops.mkldnn._linear_pointwise(flat, copy, None, "none", [], "").to(x.dtype)
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
                    dtype = torch.bfloat16 if kind == "onednn_bf16" else weight.dtype
                    self._layouts[kind] = torch.ops.mkldnn._reorder_linear_weight(
                        weight.to(dtype).contiguous(), ONEDNN_BATCH_HINT
                    )
        return self._layouts[kind]
