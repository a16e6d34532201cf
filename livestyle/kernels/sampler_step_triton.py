"""A few-step sampler's update for a whole stream batch in one pass; reference: reference.sampler_step.

Reads x, the model's output and the noise once and writes x_next and denoised once,
each row with its own four coefficients (rows of a stream batch sit at different
steps): torch eager makes five float temporaries on the way (upcasts, products, sums).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from livestyle.kernels import reference
from livestyle.kernels.tuning import autotune, config

# Elementwise: the block and warps; the best choice follows the elements per row.
_CONFIGS = [config(BLOCK=1024, num_warps=4), config(BLOCK=2048, num_warps=8), config(BLOCK=512, num_warps=4)]


@autotune(_CONFIGS, key=["N"])
@triton.jit
def _sampler_step_kernel(x_ptr, out_ptr, noise_ptr, coeffs_ptr, next_ptr, denoised_ptr, N, B,
                         HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    """Program (row b, block of its N elements): denoised = a x + b out; x_next = c denoised + d noise."""
    row = tl.program_id(0)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = i < N
    offs = row.to(tl.int64) * N + i
    a = tl.load(coeffs_ptr + row)
    b = tl.load(coeffs_ptr + B + row)
    c = tl.load(coeffs_ptr + 2 * B + row)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    denoised = a * x + b * out
    x_next = c * denoised
    if HAS_NOISE:
        d = tl.load(coeffs_ptr + 3 * B + row)
        x_next = x_next + d * tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(denoised_ptr + offs, denoised.to(denoised_ptr.dtype.element_ty), mask=mask)
    tl.store(next_ptr + offs, x_next.to(next_ptr.dtype.element_ty), mask=mask)


def sampler_step(x: torch.Tensor, out: torch.Tensor, noise: torch.Tensor | None,
                 coeffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as reference.sampler_step: (x_next, denoised), contiguous, in x's dtype."""
    reference._check_step(x, out, noise, coeffs)
    B = x.shape[0]
    x, out = x.contiguous(), out.contiguous()
    has_noise = noise is not None
    noise = noise.contiguous() if has_noise else x  # x: a valid pointer never read (HAS_NOISE False)
    coeffs = coeffs.float().contiguous()
    x_next, denoised = torch.empty_like(x), torch.empty_like(x)
    N = x[0].numel() if B else 0
    if N:
        grid = lambda meta: (B, triton.cdiv(N, meta["BLOCK"]))  # noqa: E731
        _sampler_step_kernel[grid](x, out, noise, coeffs, x_next, denoised, N, B, HAS_NOISE=has_noise)
    return x_next, denoised
