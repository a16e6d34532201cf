"""Flicker, sharpness and speed of each temporal part, through the engine, with the demo model or --model's.

    python benchmarks/temporal_quality.py [--size 256] [--clips 3] [--frames 12] [--model DIR]

Synthetic camera-motion clips of the held-out images (known flow, a little sensor
noise, as in training/evaluate_demo.py) go through `Engine` as file streams with each
combination of temporal parts; prints the warp error (MSE x 1e3 between each output
frame and its predecessor warped along the true motion, occluded pixels masked: lower
is steadier), its change against everything off, the outputs' sharpness against
everything off (blending in past outputs can steady a texture by blurring it), and the
engine's frames per second (wall time of the whole stream: encode, U-Net, flow, decode;
median over the clips). --model measures another demo-family model, e.g. a candidate
from training/train_demo.py.
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

from livestyle.config import StreamSettings, TemporalSettings  # noqa: E402
from livestyle.metrics import sharpness, warp_error  # noqa: E402
from livestyle.errors import LivestyleError  # noqa: E402
from livestyle.models.demo import DEMO_MODEL  # noqa: E402
from livestyle.models.loading import load_pipeline  # noqa: E402
from livestyle.stream.engine import Engine  # noqa: E402
from training.data import HELD_OUT, motion_clips  # noqa: E402

NOISE = 0.01  # per-pixel sensor noise (std, on [0,1]), as training/evaluate_demo.py

CONFIGS = {
    "all off": TemporalSettings.off(),
    "cached attention (2 frames)": TemporalSettings(attention_frames=2, flow=False),
    "cached attention + feature fusion (0.8)": TemporalSettings(attention_frames=2, fusion=0.8, flow=False),
    "flow-guided latents": TemporalSettings(attention_frames=0, flow=True, output_blend=0.0),
    "flow-guided output": TemporalSettings(attention_frames=0, flow=True, flow_blend=0.0),
    "all on, bilinear warps": TemporalSettings(warp="bilinear"),
    "all on (default: bicubic warps)": TemporalSettings(),
}


def clips(size: int, count: int, frames: int) -> list:
    """`count` clips cycling through the held-out images, with sensor noise (uint8 frames)."""
    noise = np.random.default_rng(1)
    out = []
    for rgb, flows, valid in motion_clips(HELD_OUT, np.random.default_rng(0), count, frames, (size, size)):
        noisy = np.clip(rgb / 255 + noise.normal(0, NOISE, rgb.shape), 0, 1)
        out.append(((noisy * 255 + 0.5).astype(np.uint8), flows, valid))
    return out


def run(engine: Engine, settings: StreamSettings, frames: np.ndarray) -> tuple[np.ndarray, float]:
    """Output frames (T, H, W, 3) in [0, 1], and the engine's wall time per frame in ms."""
    outputs = []
    stream = engine.open_stream(settings, lambda f: outputs.append(f.to_ndarray(format="rgb24")), live=False)
    start = time.perf_counter()
    for rgb in frames:
        stream.submit(rgb)
    stream.flush()
    ms = 1e3 * (time.perf_counter() - start) / len(frames)
    stream.close()
    return np.stack(outputs).astype(np.float32) / 255, ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--clips", type=int, default=3, help="motion clips, cycling through the held-out images")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--styles", default="starry-night,sepia-oil,ink-sketch,fauve-red,pastel-wash")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, default=DEMO_MODEL, help="a demo-family model folder "
                        "(default: the embedded one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)  # as the livestyle command does (cli.main)
    try:
        names = load_pipeline(args.model).styles.names
    except LivestyleError as e:
        print(f"temporal_quality: error: {e}", file=sys.stderr)
        return 2
    if unknown := [s for s in args.styles.split(",") if s not in names]:
        print(f"temporal_quality: error: --styles: {unknown[0]!r} is not one of the model's styles "
              f"({', '.join(names)})", file=sys.stderr)
        return 2
    data = clips(args.size, args.clips, args.frames)
    print(f"model {args.model}: {len(data)} clips of {args.frames} frames at {args.size}x{args.size} "
          f"({', '.join(HELD_OUT)}), noise {NOISE}, styles {args.styles}, {args.threads} threads")
    with Engine(lambda: load_pipeline(args.model)) as engine:  # loaded again on the worker thread, as run does
        results, plain = {}, {}
        for name, temporal in CONFIGS.items():
            errors, times, mses, sharp = [], [], [], []
            for style in args.styles.split(","):
                settings = StreamSettings(size=(args.size, args.size), style=style, temporal=temporal)
                for i, (frames, flows, valid) in enumerate(data):
                    out, ms = run(engine, settings, frames)
                    errors.append(warp_error(out, flows, valid))
                    sharp.append(np.mean([sharpness(f) for f in out[1:]]))
                    times.append(ms)
                    reference = plain.setdefault((style, i), out)  # the first config is all off
                    mses.append(float(np.mean((out[1:] - reference[1:]) ** 2)))
            mse = float(np.mean(mses))
            db = float("inf") if mse == 0 else 10 * np.log10(1 / mse)
            results[name] = (1e3 * float(np.mean(errors)), float(np.median(times)), db, float(np.mean(sharp)))
    base, base_sharp = results["all off"][0], results["all off"][3]
    print("| temporal parts | warp error (x1e3) | vs all off | PSNR vs all off | sharpness vs all off | "
          "ms/frame | fps |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (err, ms, db, sharp) in results.items():
        same = "identical" if db == float("inf") else f"{db:.1f} dB"
        print(f"| {name} | {err:.4f} | {100 * (err - base) / base:+.0f}% | {same} | {sharp / base_sharp:.2f} | "
              f"{ms:.1f} | {1e3 / ms:.1f} |")
    print("PSNR vs all off: how far each output frame moved from the frame-by-frame result; sharpness: mean "
          "variance of the Laplacian over all off's (the first frame of each clip left out of both)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
