"""LayerNorm over the last dimension as one Triton kernel; reference: reference.layer_norm.

One program per row; the row (D <= 1280 in SD's transformers) sits in registers, so the
statistics are two-pass (mean, then the mean squared deviation from it) in fp32 at the
cost of a single read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from livestyle.kernels.tuning import autotune, config

# The whole row in one program: only the warps over it vary; the best count follows D.
_CONFIGS = [config(num_warps=4), config(num_warps=8), config(num_warps=2)]


@autotune(_CONFIGS, key=["D"])
@triton.jit
def _layer_norm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, D, eps,
                       HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    d = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / D + eps)
    y = d * rstd
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=mask, other=1.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5) -> torch.Tensor:
    """x (..., D), weight, bias (D,) or None -> (..., D) contiguous, in x's dtype; as reference.layer_norm."""
    D = x.shape[-1]
    x = x.contiguous()
    y = torch.empty_like(x)
    rows = x.numel() // D if D else 0
    if rows:
        block_d = triton.next_power_of_2(D)
        _layer_norm_kernel[(rows,)](x, weight if weight is not None else x, bias if bias is not None else x, y,
                                    D, eps, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                                    BLOCK_D=block_d)
    return y
