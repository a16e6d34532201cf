"""GEGLU's gate after its projection as one Triton kernel; reference: reference.geglu.

Reads the (..., 2D) projection once and writes (..., D): torch eager writes gelu(gate)
and reads it back before the product. gelu is the exact one, x * (1 + erf(x / sqrt 2)) / 2,
computed in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from livestyle.kernels.tuning import autotune, config

# Elementwise over (rows, D): the column block and warps; the best choice follows D.
_CONFIGS = [config(BLOCK=1024, num_warps=4), config(BLOCK=512, num_warps=4), config(BLOCK=2048, num_warps=8)]


@autotune(_CONFIGS, key=["D"])
@triton.jit
def _geglu_kernel(h_ptr, y_ptr, D, BLOCK: tl.constexpr):
    """Program (row, column block): y[row, cols] = h[row, cols] * gelu(h[row, D + cols])."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < D
    a = tl.load(h_ptr + row * 2 * D + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(h_ptr + row * 2 * D + D + cols, mask=mask, other=0.0).to(tl.float32)
    y = a * 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def geglu(h: torch.Tensor) -> torch.Tensor:
    """h (..., 2D) -> (..., D) = h[..., :D] * gelu(h[..., D:]), in h's dtype; as reference.geglu."""
    if h.shape[-1] % 2:
        raise ValueError(f"geglu: the last dimension ({h.shape[-1]}) must be even, two halves of D")
    D = h.shape[-1] // 2
    h = h.contiguous()
    y = torch.empty((*h.shape[:-1], D), device=h.device, dtype=h.dtype)
    rows = h.numel() // (2 * D) if D else 0
    if rows:
        grid = lambda meta: (rows, triton.cdiv(D, meta["BLOCK"]))  # noqa: E731
        _geglu_kernel[grid](h, y, D)
    return y
