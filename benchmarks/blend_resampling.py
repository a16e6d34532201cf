"""What the flow-guided output blend's resampling alone costs a steady texture's sharpness.

    python benchmarks/blend_resampling.py [--size 256] [--clips 3] [--frames 12] [--blend 0.5]

The engine's flow-guided output blend is recursive: out_t = (1 - w) current_t +
w warp(out_{t-1}) where the flow is trusted, so each output carries a share of every
earlier one, resampled once per frame since. To separate what that resampling costs
from what averaging textures that do not line up costs, this runs the blend with full
confidence and the true motion on clips that are steady by construction (the teacher's
stylisation rendered along each camera path, training/evaluate_demo.py's
steady_clip), where averaging aligned frames would change nothing; prints the
output's sharpness (variance of the Laplacian) over the clip's own, per style and
interpolation (OpenCV remap, replicated borders), frames 4 to 11 of each clip (after
the blend has settled). Deterministic; needs the style teacher (extra "train").

Then what each mode costs in time: the engine's host warp (stream.flow.propagate, one
thread) of an image and of a demo latent at --size, the modes taking turns, median of
--runs calls each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from livestyle.metrics import sharpness  # noqa: E402
from training.data import HELD_OUT, camera_paths  # noqa: E402
from training.evaluate_demo import steady_clip  # noqa: E402
from training.train_demo import STYLES  # noqa: E402

INTERPOLATIONS = {"bilinear": cv2.INTER_LINEAR, "bicubic (the engine's default)": cv2.INTER_CUBIC}
SETTLE = 3  # blended frames left out before the blend has carried a few frames


def warp(image: np.ndarray, flow: np.ndarray, interpolation: int) -> np.ndarray:
    """image (H, W, 3) sampled at each pixel p + flow[p] (flow (H, W, 2), to the previous frame)."""
    h, w = flow.shape[:2]
    x, y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(image, x + flow[..., 0], y + flow[..., 1], interpolation, borderMode=cv2.BORDER_REPLICATE)


def blended_sharpness(clip: np.ndarray, flows: np.ndarray, blend: float, interpolation: int) -> float:
    """Mean over frames SETTLE+1.. of sharpness(blended output) / sharpness(clip frame)."""
    out, ratios = clip[0], []
    for t in range(1, len(clip)):
        out = (1 - blend) * clip[t] + blend * warp(out, flows[t - 1], interpolation)
        if t > SETTLE:
            ratios.append(sharpness(out) / sharpness(clip[t]))
    return float(np.mean(ratios))


def warp_ms(channels: int, size: int, runs: int) -> dict[str, float]:
    """Median ms of stream.flow.propagate (the engine's host warp and blend) per mode on a
    (1, channels, size, size) tensor along a random flow of a few pixels, modes in turn."""
    from livestyle.stream.flow import Motion, propagate, sampling_grid

    rng = np.random.default_rng(0)
    motion = Motion((rng.standard_normal((128, 128, 2)) * 2).astype(np.float32),
                    rng.random((128, 128)).astype(np.float32))
    grid, confidence = sampling_grid(motion, (size, size), "cpu")
    current, previous = torch.rand(2, 1, channels, size, size, generator=torch.Generator().manual_seed(0))
    times = {mode: [] for mode in ("bilinear", "bicubic")}
    with torch.inference_mode():
        for r in range(runs + 1):
            for mode, out in times.items():
                start = time.perf_counter()
                propagate(current, previous, grid, confidence, 0.5, mode)
                if r:  # the first round warms up
                    out.append((time.perf_counter() - start) * 1e3)
    return {mode: float(np.median(t)) for mode, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--blend", type=float, default=0.5, help="the previous output's share (the engine's "
                        "output_blend, 0.5 by default)")
    parser.add_argument("--runs", type=int, default=60, help="timed calls per mode")
    args = parser.parse_args(argv)
    if not 0 < args.blend < 1:
        parser.error(f"--blend must be in (0, 1), got {args.blend}")
    if args.frames <= SETTLE + 1 or args.size < 16 or args.size % 8 or args.runs < 1:
        parser.error(f"need --frames > {SETTLE + 1}, --size a multiple of 8 and >= 16, --runs >= 1")
    from training.teacher import Teacher

    teacher = Teacher(threads=2)
    size = (args.size, args.size)
    paths = camera_paths(HELD_OUT, np.random.default_rng(0), args.clips, args.frames, size)
    print(f"{args.clips} steady clips of {args.frames} frames at {args.size}x{args.size} ({', '.join(HELD_OUT)}), "
          f"blend {args.blend}, full confidence, true motion")
    print("| style | " + " | ".join(f"sharpness kept, {name}" for name in INTERPOLATIONS) + " |")
    print("| --- |" + " --- |" * len(INTERPOLATIONS))
    for style in STYLES:
        kept = {name: [] for name in INTERPOLATIONS}
        for name, path in paths:
            clip, flows, _ = steady_clip(teacher, name, path, args.frames, size, style)
            for label, interpolation in INTERPOLATIONS.items():
                kept[label].append(blended_sharpness(clip, flows, args.blend, interpolation))
        print(f"| {style} | " + " | ".join(f"{np.mean(v):.3f}" for v in kept.values()) + " |")
    torch.set_num_threads(1)
    print(f"host warp and blend (stream.flow.propagate), 1 thread, median of {args.runs} calls, modes in turn:")
    print("| what | bilinear ms | bicubic ms | bicubic / bilinear |")
    print("| --- | --- | --- | --- |")
    for what, channels, side in ((f"image {args.size}x{args.size}", 3, args.size),
                                 (f"latent {args.size // 8}x{args.size // 8}x16", 16, args.size // 8)):
        ms = warp_ms(channels, side, args.runs)
        print(f"| {what} | {ms['bilinear']:.3f} | {ms['bicubic']:.3f} | {ms['bicubic'] / ms['bilinear']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
