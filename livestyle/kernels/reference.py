"""Plain-torch references of the fused kernels: the readable definition, the CPU path and the test oracle.

Each function has the same signature as its Triton kernel (group_norm_triton.py,
layer_norm_triton.py, geglu_triton.py) and computes exactly what the models computed
before the kernels existed, so the default CPU path is unchanged bit for bit.
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
    a frame (the others are masked out), or None when all do: then no mask is passed, so
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
        valid_past = filled[:, None].expand(N, L).reshape(N * L)  # (N*L,)
        mask = torch.cat([torch.ones(L, dtype=torch.bool, device=q.device), valid_past])[None]  # (1, L + N*L)
    # (B, *, C) -> (B, heads, *, C / heads)
    q, k_all, v_all = (t.view(B, -1, heads, C // heads).transpose(1, 2) for t in (q, k_all, v_all))
    out = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)  # (B, heads, L, C / heads)
    return out.transpose(1, 2).reshape(B, L, C)
