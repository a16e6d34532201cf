"""Frame <-> tensor: the only conversions between video frames and model tensors.

    to_tensor    av.VideoFrame(s) or uint8 (H,W,3) RGB arrays -> (B,3,H,W) float in [0,1]
    from_tensor  (B,3,H,W) in [0,1] -> av.VideoFrames carrying the sources' pts and time_base

Timestamps travel with the frames, so file output keeps its timing and latency can be
measured per frame.
"""

from __future__ import annotations

import av
import numpy as np
import torch


def rgb_array(frame: av.VideoFrame | np.ndarray) -> np.ndarray:
    """uint8 (H,W,3) RGB of a video frame (or the array itself)."""
    if isinstance(frame, av.VideoFrame):
        return frame.to_ndarray(format="rgb24")
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H,W,3) RGB array, got {frame.dtype} {frame.shape}")
    return frame


def to_tensor(frames, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """A frame or a list of same-size frames -> (B,3,H,W) in [0,1] on `device`."""
    frames = frames if isinstance(frames, (list, tuple)) else [frames]
    batch = np.stack([rgb_array(f) for f in frames])  # (B,H,W,3) uint8
    # The uint8 copy is what crosses to the device: 4x fewer bytes than float32.
    x = torch.from_numpy(batch).to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2).to(dtype).div_(255)  # (B,3,H,W)


def from_tensor(images: torch.Tensor, like: list[av.VideoFrame]) -> list[av.VideoFrame]:
    """(B,3,H,W) in [0,1] -> B frames, each with the pts and time_base of `like`'s frame."""
    rgb = images.clamp(0, 1).mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (B,H,W,3)
    out = []
    for array, source in zip(rgb, like):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
        frame.pts, frame.time_base = source.pts, source.time_base
        out.append(frame)
    return out
