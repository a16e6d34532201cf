"""GroupNorm + activation (+ a per-channel shift before it) as two Triton kernels; reference: reference.group_norm.

One read of x for the statistics, one more for the output, one write: where torch eager
reads and writes the tensor once more for the shift add and once more for the
activation. Layouts: NCHW and channels_last (NHWC in memory), each walked in its own
memory order so that neighbouring lanes read neighbouring addresses.

Statistics are fp32 whatever x's dtype, two-pass per tile: each tile of a group
(BLOCK elements) gets its own mean, then its sum of squared deviations from that mean
(no E[x^2] - E[x]^2 cancellation); the tiles are merged with Chan, Golub & LeVeque's
parallel formula (1979), M2 = sum(M2_i) + sum(n_i (mean_i - mean)^2). Splitting a group
into tiles keeps the GPU busy at batch 1: SD-Turbo's 32 groups alone would fill a
quarter of an H100's SMs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from livestyle.kernels.reference import ACTIVATIONS
from livestyle.kernels.tuning import autotune, config

# The tile (BLOCK) sizes the statistics buffer, so it stays fixed; the warps over a tile
# vary, the best count following the group's size and the layout (strided or not).
_CONFIGS = [config(num_warps=4), config(num_warps=8), config(num_warps=2)]

BLOCK = 2048  # elements of one group per program: a tile of SD-Turbo's level 0 (40960 per group) is 1/20


@triton.jit
def _offsets(pid_bg, e, G, CG, HW, stride_b, stride_c, stride_s, CHANNELS_LAST: tl.constexpr):
    """Element e of group (b, g) -> (b, channel, memory offset); e walks the group in memory order."""
    b = (pid_bg // G).to(tl.int64)  # b * stride_b passes 2**31 for big batches of big frames
    g = pid_bg % G
    if CHANNELS_LAST:  # (position, channel-in-group): the group's CG channels are adjacent in memory
        s = e // CG
        c = g * CG + e % CG
    else:  # (channel-in-group, position): the group is one contiguous run
        c = g * CG + e // HW
        s = e % HW
    return b, c, b * stride_b + c * stride_c + s * stride_s


@triton.jit
def _tile(x_ptr, shift_ptr, pid_bg, tile, G, CG, HW, N, C, stride_b, stride_c, stride_s,
          HAS_SHIFT: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """One tile of group (b, g) plus its channels' shift, in fp32: (x, mask, channel, offset); masked lanes 0."""
    e = tile * BLOCK + tl.arange(0, BLOCK)
    mask = e < N
    b, c, offs = _offsets(pid_bg, e, G, CG, HW, stride_b, stride_c, stride_s, CHANNELS_LAST)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        x += tl.load(shift_ptr + b * C + c, mask=mask, other=0.0).to(tl.float32)
    return x, mask, c, offs


@autotune(_CONFIGS, key=["N", "CHANNELS_LAST"])
@triton.jit
def _stats_kernel(x_ptr, shift_ptr, mean_ptr, m2_ptr, G, CG, HW, N, C, stride_b, stride_c, stride_s, TILES,
                  HAS_SHIFT: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    """Program (b*G + g, tile): the tile's mean and sum of squared deviations, in fp32."""
    pid_bg = tl.program_id(0)
    tile = tl.program_id(1)
    x, mask, c, offs = _tile(x_ptr, shift_ptr, pid_bg, tile, G, CG, HW, N, C, stride_b, stride_c, stride_s,
                             HAS_SHIFT, CHANNELS_LAST, BLOCK)
    n = tl.minimum(N - tile * BLOCK, BLOCK).to(tl.float32)
    mean = tl.sum(x, axis=0) / n  # masked lanes loaded 0
    d = tl.where(mask, x - mean, 0.0)
    tl.store(mean_ptr + pid_bg * TILES + tile, mean)
    tl.store(m2_ptr + pid_bg * TILES + tile, tl.sum(d * d, axis=0))


@autotune(_CONFIGS, key=["N", "CHANNELS_LAST"])
@triton.jit
def _apply_kernel(x_ptr, shift_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, m2_ptr, G, CG, HW, N, C,
                  stride_b, stride_c, stride_s, TILES, eps,
                  HAS_SHIFT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                  ACTIVATION: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
                  TILES_P2: tl.constexpr):
    """Program (b*G + g, tile): merge the group's tile statistics, then normalize, scale, activate one tile."""
    pid_bg = tl.program_id(0)
    tile = tl.program_id(1)

    # Chan et al.'s merge of (n_i, mean_i, M2_i) over the group's tiles; each program
    # redoes it (TILES numbers, cheaper than a third launch).
    k = tl.arange(0, TILES_P2)
    kmask = k < TILES
    means = tl.load(mean_ptr + pid_bg * TILES + k, mask=kmask, other=0.0)
    m2s = tl.load(m2_ptr + pid_bg * TILES + k, mask=kmask, other=0.0)
    counts = tl.where(kmask, tl.minimum(N - k * BLOCK, BLOCK), 0).to(tl.float32)
    mean = tl.sum(counts * means, axis=0) / N
    dm = means - mean
    var = (tl.sum(m2s, axis=0) + tl.sum(counts * dm * dm, axis=0)) / N
    rstd = 1.0 / tl.sqrt(var + eps)

    x, mask, c, offs = _tile(x_ptr, shift_ptr, pid_bg, tile, G, CG, HW, N, C, stride_b, stride_c, stride_s,
                             HAS_SHIFT, CHANNELS_LAST, BLOCK)
    y = (x - mean) * rstd
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + c, mask=mask, other=1.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION == 1:
        y = y * tl.sigmoid(y)
    elif ACTIVATION == 2:
        y = tl.maximum(y, 0.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def group_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
               eps: float = 1e-5, activation: str | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
    """activation(GroupNorm(x + shift)); same contract as reference.group_norm. The output keeps x's memory format."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"group_norm: activation {activation!r} is not one of {ACTIVATIONS}")
    B, C, H, W = x.shape
    if C % groups:
        raise ValueError(f"group_norm: {groups} groups do not divide {C} channels")
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if not channels_last:
        x = x.contiguous()
    y = torch.empty_like(x)  # preserve_format: the same strides as x
    G, CG, HW = groups, C // groups, H * W
    N = CG * HW
    block = min(BLOCK, triton.next_power_of_2(N))
    tiles = triton.cdiv(N, block)
    stats = torch.empty((2, B * G, tiles), device=x.device, dtype=torch.float32)  # (mean, M2) per tile
    shift = shift.contiguous() if shift is not None else x  # x: a valid pointer never read (HAS_SHIFT False)
    # stride(3) is the step between positions in both layouts, since stride(2) == W * stride(3).
    strides = (x.stride(0), x.stride(1), x.stride(3))
    grid = (B * G, tiles)
    _stats_kernel[grid](x, shift, stats[0], stats[1], G, CG, HW, N, C, *strides, tiles,
                        HAS_SHIFT=shift is not x, CHANNELS_LAST=channels_last, BLOCK=block)
    _apply_kernel[grid](x, shift, weight if weight is not None else x, bias if bias is not None else x, y,
                        stats[0], stats[1], G, CG, HW, N, C, *strides, tiles, eps,
                        HAS_SHIFT=shift is not x, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                        ACTIVATION=ACTIVATIONS.index(activation), CHANNELS_LAST=channels_last, BLOCK=block,
                        TILES_P2=triton.next_power_of_2(tiles))
    return y
