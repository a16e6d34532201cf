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
