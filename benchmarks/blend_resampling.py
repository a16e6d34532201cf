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
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--blend", type=float, default=0.5, help="the previous output's share (the engine's "
                        "output_blend, 0.5 by default)")
    args = parser.parse_args(argv)
    if not 0 < args.blend < 1:
        parser.error(f"--blend must be in (0, 1), got {args.blend}")
    if args.frames <= SETTLE + 1 or args.size < 16:
        parser.error(f"need --frames > {SETTLE + 1} and --size >= 16")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
