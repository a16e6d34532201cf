"""Flow-guided propagation: carry the previous output along the motion of the inputs.

Optical flow between two consecutive input frames is estimated on small grey copies
on the CPU (OpenCV's DIS, Kroeger et al. 2016, "Fast Optical Flow using Dense Inverse
Search"), so the device never waits for it. The previous output (a latent, or the
decoded image) is warped along that flow to where its content sits in the current
frame, and blended in by a confidence map:

    confidence = forward-backward agreement * photometric agreement * in view

- forward-backward (Sundaram et al. 2010): following the backward flow and then the
  forward flow should come back to the start; where it does not (occlusions, flow
  failures) the previous output is not trusted;
- photometric: the warped previous grey frame should look like the current one
  (catches scene cuts and lighting jumps);
- in view: content that entered the frame has no past.

So static regions stay put and moving ones follow the motion, while anything new is
taken from the current frame alone.

This is the host path: on the CPU the engine builds the warp grid here (sampling_grid)
and warps with `propagate`, which samples with cv2.remap (exact bilinear weights with
OpenCV 4.11 and later; see `propagate`) and blends in numpy, without torch's OpenMP
team, whose every parallel region waits for the cores on a busy machine (with OpenMP's
default spinning waits, a 512x512 blend took 30 ms on two threads against 1 ms on one,
beside other processes on 2 cores). A 512x512 frame's two warps (latent and image),
grids included: 4.8 ms against 7.3 ms with grid_sample and numpy grids, with passive
waits on the shared 2-core machine (medians of 30, alternating). On other devices
`propagate` is F.grid_sample, and the engine prefers kernels.propagate from the small
flow.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

FLOW_SHORT_SIDE = 128  # flow resolution: the short side of the grey copies, in pixels
FB_TOLERANCE = 1.0  # forward-backward disagreement (small-grid pixels) at which trust falls to 1/e
PHOTO_TOLERANCE = 24.0  # grey-level difference (0-255) at which trust falls to 1/e


def small_grey(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H,W,3) RGB -> uint8 (h,w) grey at size = (w, h)."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, size, interpolation=cv2.INTER_AREA)


@functools.lru_cache(maxsize=16)
def pixel_grid(w: int, h: int) -> np.ndarray:
    """(h, w, 2) float32: each pixel's own (x, y). Shared between calls (read-only): the
    sizes of a stream's frames, latents and flow do not change from frame to frame."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    grid = np.stack([xs, ys], axis=-1)
    grid.flags.writeable = False
    return grid


def flow_size(width: int, height: int) -> tuple[int, int]:
    """(w, h) of the grey copies for a processing size: the short side at most FLOW_SHORT_SIDE."""
    scale = min(1.0, FLOW_SHORT_SIDE / min(width, height))
    return max(8, round(width * scale)), max(8, round(height * scale))


@dataclass(frozen=True)
class Motion:
    """Where each pixel of the current frame was in the previous one, and how sure we are.

    back: (h, w, 2) float32, flow from the current grey frame to the previous one, in
        small-grid pixels (x, y): pixel p of the current frame was at p + back[p].
    confidence: (h, w) float32 in [0, 1].
    """

    back: np.ndarray
    confidence: np.ndarray


class FlowEstimator:
    """DIS optical flow with a forward-backward check, on small grey frames (CPU)."""

    def __init__(self, preset: int = cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST):
        # One DIS object per stream: it is not safe to share between threads.
        self.dis = cv2.DISOpticalFlow_create(preset)

    def motion(self, previous: np.ndarray, current: np.ndarray) -> Motion:
        """previous, current: uint8 (h, w) grey frames of the same size."""
        previous, current = np.ascontiguousarray(previous), np.ascontiguousarray(current)
        back = self.dis.calc(current, previous, None)  # (h, w, 2): current -> previous
        forward = self.dis.calc(previous, current, None)  # (h, w, 2): previous -> current
        h, w = current.shape
        where = cv2.add(pixel_grid(w, h), back)  # (h, w, 2): (x, y) each pixel came from, one remap map
        # forward flow read where each pixel came from; it should point back to the pixel
        forward_there = cv2.remap(forward, where, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        disagreement = np.linalg.norm(back + forward_there, axis=-1)
        previous_there = cv2.remap(previous, where, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        photo = np.abs(previous_there.astype(np.float32) - current.astype(np.float32))
        map_x, map_y = where[..., 0], where[..., 1]
        in_view = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
        confidence = np.exp(-(disagreement / FB_TOLERANCE) ** 2 - (photo / PHOTO_TOLERANCE) ** 2) * in_view
        return Motion(back, confidence.astype(np.float32))


def warp_inputs(motion: Motion, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The motion as kernels.propagate takes it for a warp at size = (w, h): back (1, 2, h', w')
    fp32 in its grid's pixels and confidence (1, 1, h', w') fp32, on the host.

    The flow grid as it is when size is no smaller (the kernel upsamples it bilinearly,
    as cv2.INTER_LINEAR does); brought down to size by area averaging when smaller (a
    latent), as `sampling_grid` does, so fine motion is averaged rather than sampled.
    Host work on small arrays: the engine's submit() does it, off the worker."""
    w, h = size
    fh, fw = motion.confidence.shape
    back, confidence = motion.back, motion.confidence
    if w < fw or h < fh:
        back = cv2.resize(back, (w, h), interpolation=cv2.INTER_AREA) * np.array([w / fw, h / fh], np.float32)
        confidence = cv2.resize(confidence, (w, h), interpolation=cv2.INTER_AREA)
    back = torch.from_numpy(np.ascontiguousarray(back.transpose(2, 0, 1)))[None]  # (1, 2, h', w')
    return back, torch.from_numpy(np.ascontiguousarray(confidence))[None, None]


def sampling_grid(motion: Motion, size: tuple[int, int], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The motion resampled to size = (w, h): a grid_sample grid (1, h, w, 2) in [-1, 1]
    (align_corners=True) and the confidence (1, 1, h, w), both on `device`.

    grid = (pixel + back * (w / fw, h / fh)) * (2 / (w - 1), 2 / (h - 1)) - 1, in float32,
    back resized to (w, h) (area averaging when smaller, bilinear when larger). Computed in
    place with OpenCV's per-channel arithmetic: numpy's broadcasting over a last axis of 2
    and the np.mgrid and np.stack temporaries cost several times as much. The scalars are
    float32 values, so each operation rounds as numpy's float32 arithmetic does: the grid
    is the numpy one's bit for bit (tests/test_flow.py).
    """
    w, h = size
    fh, fw = motion.confidence.shape
    interpolation = cv2.INTER_AREA if w < fw else cv2.INTER_LINEAR
    grid = cv2.resize(motion.back, (w, h), interpolation=interpolation)  # (h, w, 2), a new array
    cv2.multiply(grid, _pair(w / fw, h / fh), dst=grid)  # small-grid pixels -> target pixels
    cv2.add(grid, pixel_grid(w, h), dst=grid)  # where each target pixel came from
    cv2.multiply(grid, _pair(2 / max(w - 1, 1), 2 / max(h - 1, 1)), dst=grid)
    cv2.subtract(grid, _pair(1.0, 1.0), dst=grid)  # (h, w, 2) in [-1, 1] inside the frame
    confidence = cv2.resize(motion.confidence, (w, h), interpolation=interpolation)
    # Small host arrays: the copies overlap with device work (non_blocking) and never sync.
    grid = torch.from_numpy(grid)[None].to(device, non_blocking=True)
    confidence = torch.from_numpy(np.ascontiguousarray(confidence))[None, None].to(device, non_blocking=True)
    return grid, confidence


def _pair(x: float, y: float) -> tuple[float, float, float, float]:
    """An OpenCV scalar for a 2-channel array: (x, y) rounded to float32, as numpy would
    round them for float32 arithmetic."""
    return float(np.float32(x)), float(np.float32(y)), 0.0, 0.0


_REMAP = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}  # grid_sample's modes -> cv2.remap's


def propagate(current: torch.Tensor, previous: torch.Tensor, grid: torch.Tensor, confidence: torch.Tensor,
              blend: float, mode: str = "bilinear") -> torch.Tensor:
    """Blend `previous`, warped along `grid`, into `current` where `confidence` trusts it.

    current, previous: (1, C, h, w) latents or images of the same size; grid (1, h, w, 2),
    confidence (1, 1, h, w) from `sampling_grid`; blend in [0, 1): the previous output's
    share where the flow is fully trusted; mode "bilinear" or "bicubic" (TemporalSettings.warp).
    Returns (1, C, h, w) in current's dtype:

        warped = F.grid_sample(previous, grid, mode, padding_mode="border", align_corners=True)
        out = current + blend * confidence * (warped - current), in float32

    On the CPU (tensors that need no gradient) this samples with cv2.remap in the same
    mode with replicated borders (the same sample as grid_sample's "border" with
    align_corners; OpenCV's bicubic is torch's, a = -0.75, each tap clamped to the
    border), and blends in numpy; the grid goes back to pixels first, which rounds the
    positions differently in the last float32 bit. Tested equal to grid_sample within
    1e-4 (values in [-1, 1]), both modes. OpenCV's remap kernels before 4.11
    (opencv/opencv#26348) round the sample positions to 1/32 of a pixel: off by up to
    1/64 pixel's worth of the local gradient there.
    """
    if mode not in _REMAP:
        raise ValueError(f"propagate: mode {mode!r} is not one of {', '.join(_REMAP)}")
    if current.is_cpu and previous.is_cpu and current.shape[0] == 1 \
            and not (current.requires_grad or previous.requires_grad):
        return _propagate_host(current, previous, grid, confidence, blend, mode)
    warped = F.grid_sample(previous.float(), grid.float(), mode=mode, padding_mode="border",
                           align_corners=True)
    weight = blend * confidence.float()
    return (current.float() + weight * (warped - current.float())).to(current.dtype)


def _propagate_host(current: torch.Tensor, previous: torch.Tensor, grid: torch.Tensor, confidence: torch.Tensor,
                    blend: float, mode: str) -> torch.Tensor:
    """propagate on the CPU: cv2.remap per channel and a numpy blend, in float32, on this thread."""
    _, C, h, w = current.shape
    # [-1, 1] -> pixels (align_corners=True): x = (g + 1) * (w - 1) / 2; one (h, w, 2) remap map.
    where = cv2.add(grid[0].float().numpy(), (1.0, 1.0, 0.0, 0.0))
    cv2.multiply(where, ((w - 1) / 2, (h - 1) / 2, 0.0, 0.0), dst=where)
    weight = blend * confidence[0, 0].float().numpy()  # (h, w)
    cur, prev = current[0].float().numpy(), previous[0].float().numpy()  # (C, h, w), views
    out = np.empty((C, h, w), np.float32)
    for c in range(C):
        warped = cv2.remap(np.ascontiguousarray(prev[c]), where, None, _REMAP[mode],
                           borderMode=cv2.BORDER_REPLICATE)  # (h, w)
        np.subtract(warped, cur[c], out=warped)
        np.multiply(warped, weight, out=warped)
        np.add(cur[c], warped, out=out[c])
    return torch.from_numpy(out)[None].to(current.dtype)
