"""Flow-guided propagation in one pass; reference: reference.propagate.

Each program takes a block of output pixels of one frame: it upsamples the small
backward flow and the confidence at those pixels on the fly (bilinear, half-pixel
centres, as F.interpolate), follows the flow into the previous output (bilinear, borders
replicated, as grid_sample with padding "border"), and blends into the current output,
every channel with the same weights. The reference builds a full-size flow, confidence
and sampling grid in memory first, then the warped copy, then the blend.

Coordinates go straight from flow to pixels (x + back_x); the reference goes through
grid_sample's [-1, 1] normalisation and back, which moves them by float rounding only
(~1e-7 of the width).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from livestyle.kernels import reference
from livestyle.kernels.tuning import autotune, config

# Per pixel, the channel loop inside: the block of pixels and warps; the best choice
# follows the pixels per frame and (the work per pixel) the channels.
_CONFIGS = [config(BLOCK=256, num_warps=4), config(BLOCK=128, num_warps=4), config(BLOCK=512, num_warps=8)]


@triton.jit
def _upsampled(ptr, y0, y1, x0, x1, ly, lx, fw, mask):
    """Bilinear read of a (fh, fw) plane at rows y0, y1 and columns x0, x1 with weights ly, lx."""
    v00 = tl.load(ptr + y0 * fw + x0, mask=mask, other=0.0)
    v01 = tl.load(ptr + y0 * fw + x1, mask=mask, other=0.0)
    v10 = tl.load(ptr + y1 * fw + x0, mask=mask, other=0.0)
    v11 = tl.load(ptr + y1 * fw + x1, mask=mask, other=0.0)
    return (1.0 - ly) * ((1.0 - lx) * v00 + lx * v01) + ly * ((1.0 - lx) * v10 + lx * v11)


@autotune(_CONFIGS, key=["HW", "C"])
@triton.jit
def _propagate_kernel(cur_ptr, prev_ptr, back_ptr, conf_ptr, blend_ptr, out_ptr, C, h, w, HW, fh, fw,
                      flow_scale_y, flow_scale_x, grid_scale_y, grid_scale_x, BLOCK: tl.constexpr):
    """Program (b, block of pixels): out[b, :, p] = cur + blend * conf * (previous at p + back - cur)."""
    b = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = p < HW
    oy = p // w
    ox = p % w

    # The flow grid's source position for this pixel: (dst + 0.5) * in / out - 0.5, clamped at 0
    # (grid_scale = fh / h, fw / w; flow_scale = h / fh, w / fw)
    sy = tl.maximum((oy.to(tl.float32) + 0.5) * grid_scale_y - 0.5, 0.0)
    sx = tl.maximum((ox.to(tl.float32) + 0.5) * grid_scale_x - 0.5, 0.0)
    fy0 = sy.to(tl.int32)
    fx0 = sx.to(tl.int32)
    ly = sy - fy0.to(tl.float32)
    lx = sx - fx0.to(tl.float32)
    fy1 = tl.minimum(fy0 + 1, fh - 1)
    fx1 = tl.minimum(fx0 + 1, fw - 1)
    back = back_ptr + b * 2 * fh * fw
    bx = _upsampled(back, fy0, fy1, fx0, fx1, ly, lx, fw, mask) * flow_scale_x  # small-grid -> (h, w) pixels
    by = _upsampled(back + fh * fw, fy0, fy1, fx0, fx1, ly, lx, fw, mask) * flow_scale_y
    conf = _upsampled(conf_ptr + b * fh * fw, fy0, fy1, fx0, fx1, ly, lx, fw, mask)
    weight = tl.load(blend_ptr + b) * conf

    # Where the pixel was in the previous frame, clamped to the frame (padding "border")
    px = tl.minimum(tl.maximum(ox.to(tl.float32) + bx, 0.0), (w - 1) * 1.0)
    py = tl.minimum(tl.maximum(oy.to(tl.float32) + by, 0.0), (h - 1) * 1.0)
    x0 = px.to(tl.int32)
    y0 = py.to(tl.int32)
    wx = px - x0.to(tl.float32)
    wy = py - y0.to(tl.float32)
    x1 = tl.minimum(x0 + 1, w - 1)  # weight wx is 0 where x0 is the last column
    y1 = tl.minimum(y0 + 1, h - 1)

    for c in range(0, C):
        plane = (b * C + c) * HW
        prev = prev_ptr + plane
        v00 = tl.load(prev + y0 * w + x0, mask=mask, other=0.0).to(tl.float32)
        v01 = tl.load(prev + y0 * w + x1, mask=mask, other=0.0).to(tl.float32)
        v10 = tl.load(prev + y1 * w + x0, mask=mask, other=0.0).to(tl.float32)
        v11 = tl.load(prev + y1 * w + x1, mask=mask, other=0.0).to(tl.float32)
        warped = (1.0 - wy) * ((1.0 - wx) * v00 + wx * v01) + wy * ((1.0 - wx) * v10 + wx * v11)
        cur = tl.load(cur_ptr + plane + p, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + plane + p, (cur + weight * (warped - cur)).to(out_ptr.dtype.element_ty), mask=mask)


def propagate(current: torch.Tensor, previous: torch.Tensor, back: torch.Tensor, confidence: torch.Tensor,
              blend: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Same contract as reference.propagate, bilinear only (kernels.propagate sends "bicubic" to the
    reference); returns (B, C, h, w) contiguous, in current's dtype."""
    if mode != "bilinear":
        raise ValueError(f"propagate_triton: samples bilinearly only, got mode {mode!r}")
    reference._check_motion(current, previous, back, confidence, blend)
    B, C, h, w = current.shape
    fh, fw = back.shape[-2:]
    current, previous = current.contiguous(), previous.contiguous()
    back, confidence, blend = (t.float().contiguous() for t in (back, confidence, blend))
    out = torch.empty_like(current)
    if out.numel():
        grid = lambda meta: (B, triton.cdiv(h * w, meta["BLOCK"]))  # noqa: E731
        _propagate_kernel[grid](current, previous, back, confidence, blend, out, C, h, w, h * w, fh, fw,
                                h / fh, w / fw, fh / h, fw / w)
    return out
