"""Process-wide numerics for a run on one device, set once by the CLI (importing livestyle sets nothing).

On CUDA:
- fp32 runs allow TF32 in matmuls and convolutions (10-bit mantissa products, fp32
  accumulation: the precision torch.set_float32_matmul_precision("high") names);
- cuDNN picks its convolution algorithms by timing them (`cudnn.benchmark`): the engine's
  fixed-shape step hands it the same shapes every frame, so the search runs once per shape;
- fp16/bf16 models are kept channels_last (NHWC), the layout of the tensor-core
  convolution kernels, so that no layout change runs around every convolution.

Elsewhere nothing changes and channels_last is not used (on the CPU it is not faster here).
"""

from __future__ import annotations

import torch


def configure(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Set the numerics for `device` and `dtype`; returns whether the models go channels_last."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    return dtype in (torch.float16, torch.bfloat16)
