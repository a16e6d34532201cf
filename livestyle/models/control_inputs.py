"""Conditioning images for ControlNets, made from the stream's frames without extra weights.

Every function takes frames as the engine holds them, (B, 3, H, W) float RGB in [0, 1] on
any device, and returns the ControlNet's image, (B, 3, H, W) in [0, 1] on the same device
and dtype (ControlNet.forward takes it at 8x the latent size: the frame size).

- `canny`: Canny edges (Canny 1986) by OpenCV, white on black, as lllyasviel's canny
  annotator and diffusers' examples make them. Hysteresis is sequential, so this one runs
  on the CPU: one host round trip per frame.
- `soft_edges`: the Sobel gradient magnitude of the Gaussian-blurred luma, each frame
  scaled to a maximum of 1: soft, graded edges in the spirit of HED/PiDiNet "softedge"
  maps, without their networks. Written in torch (two small convolutions) so it runs where
  the frames are, with no host round trip; the tests check it against OpenCV's
  GaussianBlur + Sobel.
- `temporalnet_image`: TemporalNet (CiaraRowles, 2023) conditions on the previous output
  frame; optionally warped along the motion first (a grid from stream/flow.py).
- depth: its networks (MiDaS, Depth Anything) have weights that cannot ship, so a user
  plugs one in: `register_depth_estimator(name, fn)`, then `depth_image(frames, name)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, OpenCV's RGB2GRAY weights


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8 on the host."""
    return (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _check_frames(frames: torch.Tensor, what: str) -> None:
    if not (isinstance(frames, torch.Tensor) and frames.ndim == 4 and frames.shape[1] == 3):
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"{what}: frames must be (B, 3, H, W) RGB in [0, 1], got {shape}")


def canny(frames: torch.Tensor, low: int = 100, high: int = 200) -> torch.Tensor:
    """Canny edge images: (B, 3, H, W) in [0, 1] -> (B, 3, H, W) of 0 and 1 (edges are 1).

    low, high: hysteresis thresholds on the 0-255 grey gradient, 0 <= low <= high
    (100, 200: the ControlNet canny annotator's defaults).
    """
    _check_frames(frames, "canny")
    if not (isinstance(low, int) and isinstance(high, int) and 0 <= low <= high):
        raise ValueError(f"canny thresholds must be whole numbers with 0 <= low <= high, "
                         f"got low={low!r}, high={high!r}")
    edges = [canny_edges(rgb, low, high) for rgb in _to_uint8(frames)]
    out = torch.from_numpy(np.stack(edges))[:, None].to(frames.device, non_blocking=True)  # (B, 1, H, W) 0/255
    return (out.to(frames.dtype) / 255).expand(-1, 3, -1, -1).contiguous()


def canny_edges(rgb: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """`canny` on the host: uint8 (H, W, 3) RGB -> uint8 (H, W), 255 on an edge, 0 elsewhere
    (the engine makes them from the frame it already holds on the host)."""
    return cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), low, high)


def _gaussian_kernel(sigma: float, dtype, device) -> torch.Tensor:
    """1-D Gaussian of width 2 * ceil(3 sigma) + 1, summing to 1."""
    radius = math.ceil(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return (k / k.sum()).to(device=device, dtype=dtype)


def soft_edges(frames: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """Soft edge images: (B, 3, H, W) in [0, 1] -> (B, 3, H, W) in [0, 1].

    |Sobel| of the luma blurred by a Gaussian of `sigma` pixels (> 0; larger: thicker,
    fewer edges), borders reflected as OpenCV's default; each frame divided by its own
    maximum, so the strongest edge is 1 (a flat frame gives ~0). Computed in float32.
    """
    _check_frames(frames, "soft_edges")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"soft_edges sigma must be a positive number of pixels, got {sigma!r}")
    x = frames.float()
    luma = (x * torch.tensor(LUMA, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)  # (B, 1, H, W)
    k = _gaussian_kernel(sigma, torch.float32, x.device)
    r = len(k) // 2
    # Separable blur; "reflect" is OpenCV's BORDER_REFLECT_101 (the edge pixel not repeated).
    luma = F.conv2d(F.pad(luma, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    luma = F.conv2d(F.pad(luma, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device)
    kernels = torch.stack([sobel_x, sobel_x.T])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
    grad = F.conv2d(F.pad(luma, (1, 1, 1, 1), mode="reflect"), kernels)  # (B, 2, H, W)
    magnitude = grad.square().sum(1, keepdim=True).sqrt()
    # Per-frame maximum, kept on the device (no host sync). The floor keeps a flat frame, whose
    # gradients are rounding noise (~1e-8), near 0 instead of stretching the noise to 1; a
    # step of one grey level (1/255) is above it (|Sobel| 0.0075 at sigma 1.5, 0.0048 at 2.5).
    peak = magnitude.amax(dim=(2, 3), keepdim=True).clamp_min(1e-3)
    return (magnitude / peak).to(frames.dtype).expand(-1, 3, -1, -1).contiguous()


def temporalnet_image(previous_output: torch.Tensor | None, current: torch.Tensor,
                      grid: torch.Tensor | None = None) -> torch.Tensor:
    """TemporalNet's conditioning image: the previous output frame, (B, 3, H, W) in [0, 1].

    previous_output: the last frame the stream produced, or None right after a start or a
        reset: then the current input frame stands in for it (there is no past yet).
    current: the current input frames (B, 3, H, W), for the size and the first frame.
    grid: optional (1 or B, H, W, 2) grid_sample grid in [-1, 1] (align_corners=True) that
        says where each pixel of the current frame was in the previous one
        (stream/flow.sampling_grid): the previous output is warped along it first, so its
        content sits where it is now.
    """
    _check_frames(current, "temporalnet_image")
    if previous_output is None:
        return current
    if previous_output.shape != current.shape:
        raise ValueError(f"temporalnet_image: previous output {tuple(previous_output.shape)} and current frames "
                         f"{tuple(current.shape)} differ in size")
    if grid is None:
        return previous_output
    grid = grid.expand(previous_output.shape[0], -1, -1, -1)
    warped = F.grid_sample(previous_output.float(), grid.float(), mode="bilinear", padding_mode="border",
                           align_corners=True)
    return warped.to(previous_output.dtype)


# -- Depth: a hook, since its networks' weights cannot ship ---------------------------------

DepthEstimator = Callable[[torch.Tensor], torch.Tensor]
_DEPTH_ESTIMATORS: dict[str, DepthEstimator] = {}


def register_depth_estimator(name: str, estimator: DepthEstimator, replace: bool = False) -> None:
    """Make a depth network usable as `depth_image(frames, name)`.

    estimator(frames (B, 3, H, W) in [0, 1]) -> (B, 1, H, W) or (B, H, W) relative depth of
    any range and size, larger = nearer (MiDaS / Depth Anything inverse depth, what depth
    ControlNets were trained on). It is called under torch.no_grad, on the frames' device.
    """
    if not (isinstance(name, str) and name.strip()):
        raise ValueError(f"depth estimator name must be a non-empty string, got {name!r}")
    if not callable(estimator):
        raise ValueError(f"depth estimator {name!r} must be callable, got {type(estimator).__name__}")
    if name in _DEPTH_ESTIMATORS and not replace:
        raise ValueError(f"a depth estimator named {name!r} is already registered (replace=True replaces it)")
    _DEPTH_ESTIMATORS[name] = estimator


def unregister_depth_estimator(name: str) -> None:
    """Forget a registered depth estimator (KeyError-free: unknown names are named in a ValueError)."""
    if name not in _DEPTH_ESTIMATORS:
        raise ValueError(f"no depth estimator named {name!r} is registered")
    del _DEPTH_ESTIMATORS[name]


def depth_estimators() -> list[str]:
    """The names registered so far, sorted."""
    return sorted(_DEPTH_ESTIMATORS)


@torch.no_grad()
def depth_image(frames: torch.Tensor, estimator: str) -> torch.Tensor:
    """Depth conditioning image: (B, 3, H, W) in [0, 1] -> (B, 3, H, W) in [0, 1], near bright.

    The registered estimator's output is resized to the frames' size and stretched to
    [0, 1] per frame (a flat map gives 0).
    """
    _check_frames(frames, "depth_image")
    if estimator not in _DEPTH_ESTIMATORS:
        known = ", ".join(depth_estimators()) or "none registered"
        raise ValueError(f"no depth estimator named {estimator!r} (registered: {known}); "
                         "plug one in with register_depth_estimator")
    depth = _DEPTH_ESTIMATORS[estimator](frames)
    B, _, H, W = frames.shape
    if isinstance(depth, torch.Tensor) and depth.ndim == 3:
        depth = depth[:, None]
    if not (isinstance(depth, torch.Tensor) and depth.ndim == 4 and depth.shape[:2] == (B, 1)):
        shape = tuple(depth.shape) if isinstance(depth, torch.Tensor) else type(depth).__name__
        raise ValueError(f"depth estimator {estimator!r} returned {shape}; expected ({B}, 1, h, w) or ({B}, h, w)")
    depth = depth.float()
    if depth.shape[-2:] != (H, W):
        depth = F.interpolate(depth, size=(H, W), mode="bilinear", align_corners=False)
    low = depth.amin(dim=(2, 3), keepdim=True)
    span = (depth.amax(dim=(2, 3), keepdim=True) - low).clamp_min(1e-6)
    return ((depth - low) / span).to(frames.dtype).expand(-1, 3, -1, -1).contiguous()
