"""Evaluate the demo model against its teacher, on images and clips training never saw.

    python training/evaluate_demo.py [--model livestyle/weights/demo] [--pictures docs/demo]

Prints, per style:
- fidelity: PSNR and SSIM of the student against the teacher on the held-out images,
  and of the input against the teacher (the floor the student must clearly beat);
- flicker: warp error (MSE between output frame t+1 and output frame t warped along
  the known motion, occluded pixels masked) on synthetic camera-motion clips of the
  held-out images, for the teacher run frame by frame and for the student with and
  without its temporal cache. The clips carry a little sensor-like noise, as a webcam's
  frames do, the same noise for every method.
Writes a side-by-side picture (input | teacher | student) per style.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from livestyle.metrics import psnr, ssim, warp_error  # noqa: E402
from livestyle.models.demo import DEMO_MODEL  # noqa: E402
from livestyle.models.loading import load_pipeline  # noqa: E402
from livestyle.models.temporal import TemporalCache  # noqa: E402
from livestyle.stream.restyle import restyle  # noqa: E402
from training.data import HELD_OUT, held_out_images, motion_clips  # noqa: E402
from training.teacher import Teacher  # noqa: E402
from training.train_demo import STYLES  # noqa: E402

NOISE = 0.01  # per-pixel sensor noise (std, on [0,1]) added to clip frames


def hwc(x: torch.Tensor) -> np.ndarray:
    """(3,H,W) tensor -> (H,W,3) float array."""
    return x.permute(1, 2, 0).float().numpy()


def fidelity(pipe, teacher, images: torch.Tensor, style: str) -> dict:
    """Mean PSNR/SSIM over the held-out images: student vs teacher, input vs teacher."""
    target = torch.from_numpy(teacher.stylize(images.numpy(), STYLES[style]))
    context = pipe.styles.context(style).expand(len(images), -1, -1)
    student = restyle(pipe, images, context, strength=1.0, steps=1)
    rows = [(psnr(hwc(s), hwc(t)), ssim(hwc(s), hwc(t)), psnr(hwc(x), hwc(t)), ssim(hwc(x), hwc(t)))
            for s, t, x in zip(student, target, images)]
    mean = np.mean(rows, axis=0)
    return {"student_psnr": mean[0], "student_ssim": mean[1], "input_psnr": mean[2], "input_ssim": mean[3],
            "student": student, "teacher": target}


def flicker(pipe, teacher, clips, style: str, cache_frames: int) -> dict:
    """Mean warp error over the clips, per method."""
    errors = {"teacher": [], "student": [], "student_temporal": []}
    rng = np.random.default_rng(1)
    for frames, flows, valid in clips:
        x = frames.astype(np.float32) / 255
        x = np.clip(x + rng.normal(0, NOISE, x.shape).astype(np.float32), 0, 1)
        x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # (T,3,H,W)
        context = pipe.styles.context(style)
        outs = {"teacher": torch.from_numpy(teacher.stylize(x.numpy(), STYLES[style]))}
        outs["student"] = torch.cat([restyle(pipe, f[None], context) for f in x])
        cache = TemporalCache.for_unet(pipe.unet, 1, (x.shape[2] // 8, x.shape[3] // 8), cache_frames)
        outs["student_temporal"] = torch.cat([restyle(pipe, f[None], context, temporal=cache) for f in x])
        for name, out in outs.items():
            errors[name].append(warp_error(out.permute(0, 2, 3, 1).numpy(), flows, valid))
    return {k: float(np.mean(v)) for k, v in errors.items()}


def side_by_side(images, teacher_out, student_out, path: Path) -> None:
    from PIL import Image

    rows = [np.concatenate([hwc(x), hwc(t), hwc(s)], axis=1) for x, t, s in zip(images, teacher_out, student_out)]
    sheet = (np.concatenate(rows, axis=0).clip(0, 1) * 255 + 0.5).astype(np.uint8)
    Image.fromarray(sheet).save(path, quality=88)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--clips", type=int, default=3, help="motion clips per held-out image")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--cache-frames", type=int, default=2)
    parser.add_argument("--pictures", type=Path, help="folder for the side-by-side pictures")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    pipe = load_pipeline(args.model)
    teacher = Teacher(threads=args.threads)
    images = torch.from_numpy(held_out_images(args.size))  # (3,3,S,S)
    clips = motion_clips(HELD_OUT, np.random.default_rng(0), args.clips, args.frames, (args.size, args.size))
    results = {}
    print(f"held-out images: {', '.join(HELD_OUT)}; {len(clips)} clips of {args.frames} frames at "
          f"{args.size}x{args.size}, noise {NOISE}")
    print("| style | student PSNR | input PSNR (floor) | student SSIM | input SSIM | warp error teacher | "
          "student | student + temporal cache |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for style in STYLES:
        f = fidelity(pipe, teacher, images, style)
        w = flicker(pipe, teacher, clips, style, args.cache_frames)
        results[style] = {k: round(float(v), 4) for k, v in f.items() if not isinstance(v, torch.Tensor)} | \
            {f"warp_{k}": round(v * 1e3, 3) for k, v in w.items()}
        r = results[style]
        print(f"| {style} | {r['student_psnr']:.2f} dB | {r['input_psnr']:.2f} dB | {r['student_ssim']:.3f} | "
              f"{r['input_ssim']:.3f} | {r['warp_teacher']:.2f} | {r['warp_student']:.2f} | "
              f"{r['warp_student_temporal']:.2f} |")
        if args.pictures:
            args.pictures.mkdir(parents=True, exist_ok=True)
            side_by_side(images, f["teacher"], f["student"], args.pictures / f"{style}.jpg")
    print("warp error: MSE x 1e3 on [0,1] images, lower is steadier")
    print(f"evaluated in {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
