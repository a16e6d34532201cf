"""Convolutions and linear layers whose weights are reordered for oneDNN once, for fp32
inference on a CPU.

Eager PyTorch hands oneDNN a plain weight (OIHW for a convolution) on every call, and
oneDNN first copies it into its blocked layout: for SD's U-Net at 256x256 that copy
costs about as much as the convolution itself at the two lowest levels (the 1280->1280
3x3 convolutions on 8x8 latents: 226 ms per U-Net call, 129 ms packed). Linear layers go
to MKL's sgemm, which repacks its operand on each call too. pack() reorders every weight
once and calls oneDNN's kernels with it, as inductor does with freezing on
(torch/_inductor/fx_passes/mkldnn_fusion.py: `_convolution_pointwise` and
`_linear_pointwise` with a weight reordered for the traced input's shape), without
compiling anything: each layer packs its weight at its first call, for that call's shape.

    unet = pack(unet)   # after loading and LoRA fusing: CPU, fp32, inference only

The packed weights replace the plain ones (no second copy is kept once a layer has run),
so a packed module no longer has them in its state_dict: pack last, and reload to change
weights. Warm up at the shape that will run (an engine's first frame). Outputs match the
plain modules' to float rounding (oneDNN may sum in another order).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.flop_counter import conv_flop_count


class PackedConv2d(nn.Module):
    """nn.Conv2d with its weight in oneDNN's blocked layout: (B, C_in, h, w) -> (B, C_out, h', w').

    The weight is reordered at the first call, for that call's input shape: oneDNN picks
    the layout for a shape, and SD's 1x1 convolutions packed without one ran 4x to 20x
    slower than the plain module. Another shape later is still right (oneDNN reorders
    what it needs on the fly), only not faster.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"pack: a convolution with padding={conv.padding!r}, padding_mode={conv.padding_mode!r} "
                             "cannot be packed (only explicit zero padding)")
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.plain: torch.Tensor | None = conv.weight.detach()  # until the first call
        # Not persistent: an opaque oneDNN tensor, meaningless in a state_dict.
        self.register_buffer("weight", None, persistent=False)
        self.bias = conv.bias

    def forward(self, x):
        if self.weight is None:
            self.weight = torch._C._nn.mkldnn_reorder_conv2d_weight(
                self.plain.to_mkldnn(), self.padding, self.stride, self.dilation, self.groups, list(x.shape))
            self.plain = None
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, self.padding, self.stride,
                                                       self.dilation, self.groups, "none", [], "")

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, oneDNN-packed")


class PackedLinear(nn.Module):
    """nn.Linear with its weight packed for oneDNN's matmul: (..., in) -> (..., out).

    Packed at the first call, for that call's number of rows (all dimensions but the
    last), as PackedConv2d."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.plain: torch.Tensor | None = linear.weight.detach()  # until the first call
        self.register_buffer("weight", None, persistent=False)
        self.bias = linear.bias

    def forward(self, x):
        if self.weight is None:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(self.plain, x.numel() // x.shape[-1])
            self.plain = None
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed"


def _conv_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(list(x_shape), list(w_shape), list(out_shape), transposed=False)


def _linear_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]  # a multiply and an add per weight and row


# torch.utils.flop_counter knows aten's convolution and matmul, not oneDNN's pointwise ops, and
# would count a packed model as 0 FLOPs: FlopCounterMode(custom_mapping=FLOP_FORMULAS) counts them.
# (A packed weight keeps its logical shape: (O, I/groups, kh, kw) and (out, in).)
FLOP_FORMULAS = {torch.ops.mkldnn._convolution_pointwise: _conv_flops,
                 torch.ops.mkldnn._linear_pointwise: _linear_flops}


def pack(module: nn.Module) -> nn.Module:
    """Replace every nn.Conv2d and nn.Linear inside `module` (in place) by its packed form;
    returns `module`. ValueError where it cannot run: weights not on the CPU or not fp32,
    a PyTorch without oneDNN, or gradients wanted (the packed kernels have none)."""
    if not torch.backends.mkldnn.is_available():
        raise ValueError("pack: this PyTorch was built without oneDNN (torch.backends.mkldnn)")
    if type(module) in (nn.Conv2d, nn.Linear):
        raise ValueError(f"pack: give the model that holds this {type(module).__name__}; it is replaced in its parent")
    layers = [(name, m) for name, m in module.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    for name, m in layers:
        if m.weight.device.type != "cpu" or m.weight.dtype != torch.float32:
            raise ValueError(f"pack: {name} is {m.weight.dtype} on {m.weight.device}; packing is for fp32 on the CPU")
        if m.weight.requires_grad:
            raise ValueError(f"pack: {name} requires grad; packed layers are for inference (requires_grad_(False))")
    for name, m in layers:
        parent, _, child = name.rpartition(".")
        packed = PackedConv2d(m) if isinstance(m, nn.Conv2d) else PackedLinear(m)
        setattr(module.get_submodule(parent), child, packed)
    return module
