"""Plain-torch references of the fused kernels: the readable definition, the CPU path and the test oracle.

Each function has the same signature as its Triton kernel (group_norm_triton.py,
layer_norm_triton.py, geglu_triton.py, cached_attention_triton.py, frame_triton.py,
propagate_triton.py, sampler_step_triton.py); the models' functions compute exactly what
the models computed before the kernels existed, so the default CPU path is unchanged bit
for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "silu", "relu")


def group_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
               eps: float = 1e-5, activation: str | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
    """activation(GroupNorm(x + shift)) (Wu & He 2018).

    x (B, C, H, W), any memory format; weight, bias (C,) or None; `groups` divides C;
    shift (B, C) or None, added to every position of its channel before the statistics
    (the resnet block's time embedding); activation None, "silu" or "relu".
    Returns (B, C, H, W) in x's dtype.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"group_norm: activation {activation!r} is not one of {ACTIVATIONS}")
    if shift is not None:
        x = x + shift[:, :, None, None]
    y = F.group_norm(x, groups, weight, bias, eps)
    if activation == "silu":
        return F.silu(y)
    if activation == "relu":
        return F.relu(y)
    return y


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm (Ba et al. 2016) over the last dimension: x (..., D), weight, bias (D,) or None -> (..., D)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def geglu(h: torch.Tensor) -> torch.Tensor:
    """GEGLU (Shazeer 2020) after its projection: h (..., 2D) -> (..., D) = h[..., :D] * gelu(h[..., D:]).

    diffusers' order (`hidden_states, gate = proj(x).chunk(2, dim=-1)`): the second half
    is the gate; gelu is the exact (erf) one.
    """
    a, gate = h.chunk(2, dim=-1)
    return a * F.gelu(gate)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bank_k: torch.Tensor, bank_v: torch.Tensor,
                     filled: torch.Tensor | None, heads: int) -> torch.Tensor:
    """Self-attention of the current frame over its own keys/values and a ring of past frames'.

    q, k, v (B, L, C) of the current frame; bank_k, bank_v (B, N, L, C) a TemporalCache
    layer's ring (any dtype; cast to k's; N may be 0); filled (N,) bool, the slots that hold
    a frame (the others are masked out), or (B, N), one set of flags per row (rings at
    different fill levels: TemporalRings), or None when all do: then no mask is passed, so
    SDPA may take its flash kernel. Multi-head with `heads` heads of C / heads channels,
    softmax scale 1/sqrt(C / heads). Returns (B, L, C), before the output projection:
    what unet.Attention computes from the TemporalCache's concatenation and mask.
    """
    B, L, C = q.shape
    N = bank_k.shape[1]
    k_all = torch.cat([k, bank_k.reshape(B, N * L, C).to(k.dtype)], dim=1)  # (B, L + N*L, C)
    v_all = torch.cat([v, bank_v.reshape(B, N * L, C).to(v.dtype)], dim=1)
    mask = None
    if filled is not None:
        rows = filled.reshape(-1, N)  # (1 or B, N)
        valid_past = rows[:, :, None].expand(-1, N, L).reshape(-1, N * L)  # (1 or B, N*L)
        current = torch.ones(rows.shape[0], L, dtype=torch.bool, device=q.device)
        mask = torch.cat([current, valid_past], dim=1)[:, None, None]  # (1 or B, 1, 1, L + N*L)
    # (B, *, C) -> (B, heads, *, C / heads)
    q, k_all, v_all = (t.view(B, -1, heads, C // heads).transpose(1, 2) for t in (q, k_all, v_all))
    out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)  # (B, heads, L, C / heads)
    return out.transpose(1, 2).reshape(B, L, C)


def _check_frames(rgb: torch.Tensor) -> None:
    if rgb.dtype != torch.uint8 or rgb.ndim != 4 or rgb.shape[-1] != 3:
        raise ValueError(f"frame_in: expected uint8 (B, H, W, 3) RGB, got {rgb.dtype} {tuple(rgb.shape)}")


def frame_in(rgb: torch.Tensor, size: tuple[int, int], signed: bool, dtype: torch.dtype) -> torch.Tensor:
    """Video frames to model input: uint8 (B, H, W, 3) RGB -> (B, 3, h, w) contiguous NCHW of `dtype`.

    Values v / 255, in [0, 1], or 2 v / 255 - 1, in [-1, 1], when `signed` (the KL VAE's
    range). size (h, w): resized bilinearly when it differs from (H, W), as
    F.interpolate(mode="bilinear", align_corners=False) (half-pixel centres, no
    antialiasing). fp32 math, rounded once to `dtype`.
    """
    _check_frames(rgb)
    x = rgb.permute(0, 3, 1, 2).float() / 255  # (B, H, W, 3) -> (B, 3, H, W)
    if tuple(size) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    if signed:
        x = x * 2 - 1
    return x.to(dtype).contiguous()


def frame_out(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """Model output to video frames: (B, 3, h, w) float -> uint8 (B, h, w, 3) RGB.

    x in [0, 1], or [-1, 1] when `signed` ((x + 1) / 2 first); clamped, times 255, rounded
    half to even (torch.round, as frame.from_tensor), in fp32.
    """
    if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"frame_out: expected float (B, 3, h, w), got {x.dtype} {tuple(x.shape)}")
    v = x.float()
    if signed:
        v = (v + 1) * 0.5
    return v.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # (B, h, w, 3)


def _check_motion(current, previous, back, confidence, blend) -> None:
    B, _, h, w = current.shape
    fh, fw = back.shape[-2:]
    if (previous.shape != current.shape or back.shape != (B, 2, fh, fw) or confidence.shape != (B, 1, fh, fw)
            or blend.shape != (B,)):
        raise ValueError(f"propagate: current/previous (B, C, h, w), back (B, 2, fh, fw), confidence (B, 1, fh, fw), "
                         f"blend (B,); got {tuple(current.shape)}, {tuple(previous.shape)}, {tuple(back.shape)}, "
                         f"{tuple(confidence.shape)}, {tuple(blend.shape)}")


def propagate(current: torch.Tensor, previous: torch.Tensor, back: torch.Tensor, confidence: torch.Tensor,
              blend: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Warp `previous` along the backward flow and blend it into `current` by confidence.

    current, previous (B, C, h, w): this frame's and the last frame's output (latents or
    images). back (B, 2, fh, fw) fp32: the backward flow on the small flow grid, in
    small-grid pixels (x, y): pixel p of the current frame was at p + back[p] in the
    previous one (stream.flow.Motion). confidence (B, 1, fh, fw) fp32 in [0, 1]. blend
    (B,) fp32: the previous output's share where the flow is fully trusted; 0 returns
    current exactly. The flow and confidence are upsampled bilinearly (align_corners=False)
    to (h, w) and the flow scaled to (h, w) pixels; previous is sampled there (mode
    "bilinear" or "bicubic", grid_sample's), borders replicated: out = current + blend *
    confidence * (warped - current), fp32 math, in current's dtype.
    """
    _check_motion(current, previous, back, confidence, blend)
    B, _, h, w = current.shape
    fh, fw = back.shape[-2:]
    back = F.interpolate(back.float(), size=(h, w), mode="bilinear", align_corners=False)
    back = back * torch.tensor([w / fw, h / fh], device=back.device)[None, :, None, None]  # small-grid -> (h, w) px
    confidence = F.interpolate(confidence.float(), size=(h, w), mode="bilinear", align_corners=False)
    ys, xs = torch.meshgrid(torch.arange(h, device=back.device, dtype=torch.float32),
                            torch.arange(w, device=back.device, dtype=torch.float32), indexing="ij")
    grid = torch.stack([(xs + back[:, 0]) * (2 / max(w - 1, 1)) - 1,
                        (ys + back[:, 1]) * (2 / max(h - 1, 1)) - 1], dim=-1)  # (B, h, w, 2) in [-1, 1]
    warped = F.grid_sample(previous.float(), grid, mode=mode, padding_mode="border", align_corners=True)
    weight = blend.float()[:, None, None, None] * confidence  # (B, 1, h, w)
    return (current.float() + weight * (warped - current.float())).to(current.dtype)


def _check_step(x, out, noise, coeffs) -> None:
    B = x.shape[0]
    if out.shape != x.shape or (noise is not None and noise.shape != x.shape) or coeffs.shape != (4, B):
        raise ValueError(f"sampler_step: x, out, noise {tuple(x.shape)} and coeffs (4, B) = (4, {B}), got out "
                         f"{tuple(out.shape)}, noise {None if noise is None else tuple(noise.shape)}, "
                         f"coeffs {tuple(coeffs.shape)}")


def sampler_step(x: torch.Tensor, out: torch.Tensor, noise: torch.Tensor | None,
                 coeffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One few-step sampler update for a stream batch whose rows sit at different steps.

    x, out, noise (B, C, H, W): latents, the model's output, the noise to add (None: no
    noise, the last step). coeffs (4, B) fp32, one column per row: a, b, c, d with
        denoised = a * x + b * out
        x_next = c * denoised + d * noise
    e.g. multistep LCM (stream.samplers.lcm_step): a = c_skip + c_out * x0_from_x,
    b = c_out * x0_from_out, c = sqrt_alpha_next, d = sqrt_one_minus_alpha_next; an Euler
    step of a flow (bridge_step): a = 1, b = dt, c = 1, d = 0. fp32 math (denoised is not
    rounded before the re-noising); returns (x_next, denoised) in x's dtype.
    """
    _check_step(x, out, noise, coeffs)
    B = x.shape[0]
    a, b, c, d = (row.float().reshape(B, *(1,) * (x.ndim - 1)) for row in coeffs)  # each (B, 1, 1, 1)
    denoised = a * x.float() + b * out.float()
    x_next = c * denoised
    if noise is not None:
        x_next = x_next + d * noise.float()
    return x_next.to(x.dtype), denoised.to(x.dtype)
