"""Frames in and out of the model, each in one pass; references: reference.frame_in, reference.frame_out.

frame_in reads the uint8 (B, H, W, 3) frames once and writes the model's (B, 3, h, w)
float input: the layout change, the scaling to [0, 1] or [-1, 1] and the bilinear
resize (F.interpolate's half-pixel centres, align_corners=False) together, where torch
eager writes and reads a float copy at each of those steps. frame_out reads the model's
output once and writes uint8 (B, h, w, 3): the range shift, the clamp, the scaling and
the rounding (half to even, as torch.round) together.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from livestyle.kernels import reference
from livestyle.kernels.tuning import autotune, config

# Memory-bound and per pixel: the block of pixels and the warps over it; the best choice
# follows the number of output pixels a frame has.
_CONFIGS = [config(BLOCK=1024, num_warps=4), config(BLOCK=512, num_warps=4), config(BLOCK=2048, num_warps=8)]


@autotune(_CONFIGS, key=["HW_OUT"])
@triton.jit
def _frame_in_kernel(rgb_ptr, y_ptr, H, W, h, w, HW_OUT, scale_y, scale_x,
                     RESIZE: tl.constexpr, SIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Program (b, block of output pixels): 3 channels of each pixel, read from the (H, W, 3) frame."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = p < HW_OUT
    src = rgb_ptr + b * H * W * 3
    dst = y_ptr + b * 3 * HW_OUT + p
    if RESIZE:
        oy = p // w
        ox = p % w
        # F.interpolate's source index: (dst + 0.5) * in / out - 0.5, clamped at 0
        sy = tl.maximum((oy.to(tl.float32) + 0.5) * scale_y - 0.5, 0.0)
        sx = tl.maximum((ox.to(tl.float32) + 0.5) * scale_x - 0.5, 0.0)
        y0 = sy.to(tl.int32)  # sy >= 0: truncation is floor
        x0 = sx.to(tl.int32)
        ly = sy - y0.to(tl.float32)
        lx = sx - x0.to(tl.float32)
        y1 = tl.minimum(y0 + 1, H - 1)
        x1 = tl.minimum(x0 + 1, W - 1)
        for c in tl.static_range(3):  # v / 255 correctly rounded (div_rn: `/` may be approximate on a GPU)
            v00 = tl.div_rn(tl.load(src + (y0 * W + x0) * 3 + c, mask=mask, other=0).to(tl.float32), 255.0)
            v01 = tl.div_rn(tl.load(src + (y0 * W + x1) * 3 + c, mask=mask, other=0).to(tl.float32), 255.0)
            v10 = tl.div_rn(tl.load(src + (y1 * W + x0) * 3 + c, mask=mask, other=0).to(tl.float32), 255.0)
            v11 = tl.div_rn(tl.load(src + (y1 * W + x1) * 3 + c, mask=mask, other=0).to(tl.float32), 255.0)
            # torch's order: rows first, each a weighted pair along x
            v = (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)
            if SIGNED:
                v = v * 2.0 - 1.0
            tl.store(dst + c * HW_OUT, v.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        for c in tl.static_range(3):
            v = tl.div_rn(tl.load(src + p * 3 + c, mask=mask, other=0).to(tl.float32), 255.0)
            if SIGNED:
                v = v * 2.0 - 1.0
            tl.store(dst + c * HW_OUT, v.to(y_ptr.dtype.element_ty), mask=mask)


@autotune(_CONFIGS, key=["HW"])
@triton.jit
def _frame_out_kernel(x_ptr, rgb_ptr, HW, SIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Program (b, block of pixels): the pixel's 3 channels, from (3, h*w) planes to (h*w, 3) bytes."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = p < HW
    for c in tl.static_range(3):
        v = tl.load(x_ptr + b * 3 * HW + c * HW + p, mask=mask, other=0.0).to(tl.float32)
        if SIGNED:
            v = (v + 1.0) * 0.5
        v = tl.minimum(tl.maximum(v, 0.0), 1.0) * 255.0
        # Round half to even (torch.round): floor(v + 0.5), one less on an exact tie
        # that landed on an odd number. v is in [0, 255], so v + 0.5 is exact; the launch
        # turns off FMA contraction, which would add 0.5 to the unrounded product.
        r = tl.floor(v + 0.5)
        odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
        r = tl.where(((r - v) == 0.5) & odd, r - 1.0, r)
        tl.store(rgb_ptr + (b * HW + p) * 3 + c, r.to(tl.uint8), mask=mask)


def frame_in(rgb: torch.Tensor, size: tuple[int, int], signed: bool, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> (B, 3, h, w) of `dtype`; same contract as reference.frame_in."""
    reference._check_frames(rgb)
    B, H, W, _ = rgb.shape
    h, w = size
    rgb = rgb.contiguous()
    y = torch.empty((B, 3, h, w), device=rgb.device, dtype=dtype)
    if y.numel():
        grid = lambda meta: (B, triton.cdiv(h * w, meta["BLOCK"]))  # noqa: E731
        _frame_in_kernel[grid](rgb, y, H, W, h, w, h * w, H / h, W / w,
                               RESIZE=(h, w) != (H, W), SIGNED=bool(signed))
    return y


def frame_out(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """(B, 3, h, w) float -> uint8 (B, h, w, 3); same contract as reference.frame_out."""
    if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"frame_out: expected float (B, 3, h, w), got {x.dtype} {tuple(x.shape)}")
    B, _, h, w = x.shape
    x = x.contiguous()
    rgb = torch.empty((B, h, w, 3), device=x.device, dtype=torch.uint8)
    if rgb.numel():
        grid = lambda meta: (B, triton.cdiv(h * w, meta["BLOCK"]))  # noqa: E731
        _frame_out_kernel[grid](x, rgb, h * w, SIGNED=bool(signed), enable_fp_fusion=False)
    return rgb
