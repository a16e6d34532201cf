"""Evaluate the demo model against its teacher, on images and clips training never saw.

    python training/evaluate_demo.py [--model livestyle/weights/demo] [--pictures docs/demo]
    python training/evaluate_demo.py --autoencoder /tmp/ae3    # a new autoencoder beside --model's

With --autoencoder, only the round trips are measured, the model's autoencoder's and the
given one's, then their decoders' speed at --size, timed alternately in one run.

Prints the autoencoder's round trip first: PSNR, sharpness kept (variance of the
Laplacian, output over input) and the block-grid ratio, on the held-out photos and on
the teacher's stylisations of them. A guided decoder reads the image it reconstructs
there, so for a guided model the student's real ceiling is the latent ceiling below.
Then, per style:
- fidelity: PSNR and SSIM of the student against the teacher on the held-out images,
  and of the input against the teacher (the floor the student must clearly beat);
- sharpness: mean variance of the Laplacian of the student's outputs over the teacher's
  (1 is as sharp as the teacher; a regression student that blurs scores far below);
- latent ceiling: PSNR and sharpness of the teacher's stylisation encoded and decoded
  (reading the input frame, as when restyling): what a U-Net that lands exactly on the
  teacher's latents gives with this autoencoder;
- the teacher's crop agreement: its stylisation of a centre crop against the same region
  of its stylisation of the whole image (it normalises over all it is given): what strokes
  as sharp as its own, drawn from a crop's worth of context, score against it;
- flicker: warp error (MSE between output frame t+1 and output frame t warped along
  the known motion, occluded pixels masked) on synthetic camera-motion clips of the
  held-out images, for the teacher run frame by frame and for the student with and
  without its temporal cache. The clips carry a little sensor-like noise, as a webcam's
  frames do, the same noise for every method. Beside them, the "steady teacher"
  (steady_teacher): a stylisation as sharp as the teacher's that moves exactly with
  the scene, whose warp error is what resampling alone costs such an output.
Writes a side-by-side picture (input | teacher | student) per style.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from livestyle.capture.synthetic import CameraPath, motion_clip  # noqa: E402
from livestyle.metrics import psnr, sharpness, ssim, warp_error  # noqa: E402
from livestyle.models.demo import DEMO_MODEL  # noqa: E402
from livestyle.models.loading import decode_frames, load_autoencoder, load_pipeline  # noqa: E402
from livestyle.models.temporal import TemporalCache  # noqa: E402
from livestyle.stream.restyle import restyle  # noqa: E402
from training.data import HELD_OUT, camera_paths, held_out_images, load_image, motion_clips  # noqa: E402
from training.teacher import Teacher  # noqa: E402
from training.train_demo import STYLES  # noqa: E402

NOISE = 0.01  # per-pixel sensor noise (std, on [0,1]) added to clip frames


def hwc(x: torch.Tensor) -> np.ndarray:
    """(3,H,W) tensor -> (H,W,3) float array."""
    return x.permute(1, 2, 0).float().numpy()


def grid_ratio(output: np.ndarray, reference: np.ndarray, period: int = 8) -> float:
    """How much more the output's pixel steps vary with position mod `period` than the reference's.

    Profile: the mean absolute difference between neighbouring pixels (rows and columns
    together) at each phase k = 0..period-1, the step between pixel i and i + 1 counted
    at phase i % period. A decoder that draws a block grid (or any 2-, 4- or 8-px
    pattern) has a peaked profile. Returns (max / mean of the output's profile) over
    (max / mean of the reference's): 1.0 is no grid. Images (H, W, 3) in [0, 1].
    """
    def peak(x):
        x = np.asarray(x, np.float64)
        dx = np.abs(np.diff(x, axis=1)).mean(axis=(0, 2))  # (W - 1,)
        dy = np.abs(np.diff(x, axis=0)).mean(axis=(1, 2))  # (H - 1,)
        profile = [np.concatenate([dx[k::period], dy[k::period]]).mean() for k in range(period)]
        return max(profile) / np.mean(profile)

    return float(peak(output) / peak(reference))


@torch.inference_mode()
def round_trip(autoencoder, images: torch.Tensor) -> dict:
    """The autoencoder's decode(encode(x)) on images (B, 3, H, W) in [0, 1], against x (a guided
    decoder reads x too, as it reads the input frame when restyling).

    Returns mean PSNR (dB), sharpness kept (mean sharpness of the outputs over the inputs')
    and the mean grid_ratio.
    """
    out = decode_frames(autoencoder, autoencoder.encode(images), images)
    pairs = [(hwc(o), hwc(x)) for o, x in zip(out, images)]
    return {"psnr": float(np.mean([psnr(o, x) for o, x in pairs])),
            "sharpness": float(np.mean([sharpness(o) for o, _ in pairs]) / np.mean([sharpness(x) for _, x in pairs])),
            "grid": float(np.mean([grid_ratio(o, x) for o, x in pairs]))}


@torch.inference_mode()
def decoder_speed(autoencoders: dict, size: int, rounds: int = 30) -> dict:
    """Median milliseconds of each autoencoder's decode of one (1, C, size/8, size/8) latent (and
    of a size x size frame for a guided decoder, which reads it).

    The decoders take turns within each round, so a load that comes and goes on a shared
    machine falls on all of them alike; one warm-up round is not counted.
    """
    times = {name: [] for name in autoencoders}
    latents = {name: torch.randn(1, ae.latent_channels, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
               for name, ae in autoencoders.items()}
    frames = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    for r in range(rounds + 1):
        for name, ae in autoencoders.items():
            start = time.perf_counter()
            decode_frames(ae, latents[name], frames)
            if r:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: float(np.median(t)) for name, t in times.items()}


def compare_autoencoders(pipe, path: Path, teacher, images: torch.Tensor, size: int) -> dict:
    """Round trips (held-out photos, their stylisations) and decoder speed: the model's autoencoder and path's."""
    autoencoders = {"model": pipe.autoencoder, "new": load_autoencoder(path)}
    styled = torch.cat([torch.from_numpy(teacher.stylize(images.numpy(), index)) for index in STYLES.values()])
    results = {name: {"config": ae.config.to_diffusers(), "photos": round_trip(ae, images),
                      "teacher": round_trip(ae, styled)} for name, ae in autoencoders.items()}
    for name, ms in decoder_speed(autoencoders, size).items():
        results[name]["decode_ms"] = ms
    return results


def fidelity(pipe, teacher, images: torch.Tensor, style: str) -> dict:
    """Mean PSNR/SSIM over the held-out images: student vs teacher, input vs teacher;
    and the student's sharpness over the teacher's (mean variance of the Laplacian).

    Also the latent ceiling: the teacher's stylisation encoded and decoded (a guided decoder
    reading the input frame, as when restyling), which is what a U-Net that landed exactly
    on the teacher's latents would give. What the student lacks of it is the U-Net's share
    of the gap; what the ceiling lacks of the teacher is the autoencoder's.
    """
    target = torch.from_numpy(teacher.stylize(images.numpy(), STYLES[style]))
    context = pipe.styles.context(style).expand(len(images), -1, -1)
    student = restyle(pipe, images, context, strength=1.0, steps=1)
    with torch.inference_mode():
        ceiling = decode_frames(pipe.autoencoder, pipe.autoencoder.encode(target), images)
    rows = [(psnr(hwc(s), hwc(t)), ssim(hwc(s), hwc(t)), psnr(hwc(x), hwc(t)), ssim(hwc(x), hwc(t)),
             psnr(hwc(c), hwc(t))) for s, t, x, c in zip(student, target, images, ceiling)]
    mean = np.mean(rows, axis=0)
    teacher_sharpness = np.mean([sharpness(hwc(t)) for t in target])
    return {"student_psnr": mean[0], "student_ssim": mean[1], "input_psnr": mean[2], "input_ssim": mean[3],
            "sharpness": float(np.mean([sharpness(hwc(s)) for s in student]) / teacher_sharpness),
            "ceiling_psnr": mean[4], "ceiling_sharpness": float(np.mean([sharpness(hwc(c)) for c in ceiling])
                                                                 / teacher_sharpness),
            "student": student, "teacher": target}


CROP_SIDES = (96, 128, 192)  # teacher_crop_agreement's crops at 256x256: v3's, v2's training crops and a larger one


def teacher_crop_agreement(teacher, images: torch.Tensor, style: str, side: int) -> float:
    """Mean PSNR between the teacher's stylisation of each image's centre side x side crop and
    the same region of its stylisation of the whole image.

    The teacher normalises over the whole image it is given (instance norm) and sees all of
    it, so a crop's stylisation differs from the whole frame's there. It is what strokes as
    sharp as the teacher's, drawn from a crop's worth of context, score against the
    whole-frame teacher; a blurred output scores higher (a stroke in the wrong place costs
    twice: where it is and where it should be).
    """
    images = images.numpy()
    H, W = images.shape[-2:]
    y, x = (H - side) // 2, (W - side) // 2
    whole = teacher.stylize(images, STYLES[style])[..., y:y + side, x:x + side]
    crops = teacher.stylize(np.ascontiguousarray(images[..., y:y + side, x:x + side]), STYLES[style])
    return float(np.mean([psnr(c.transpose(1, 2, 0), w.transpose(1, 2, 0)) for c, w in zip(crops, whole)]))


def flicker(pipe, teacher, clips, style: str, cache_frames: int) -> dict:
    """Mean warp error over the clips, per method, and the mean sharpness of the teacher's frames."""
    errors, teacher_sharpness = {"teacher": [], "student": [], "student_temporal": []}, []
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
        teacher_sharpness.append(np.mean([sharpness(hwc(f)) for f in outs["teacher"]]))
    return {k: float(np.mean(v)) for k, v in errors.items()} | {"teacher_sharpness": float(np.mean(teacher_sharpness))}


def at_frame_scale(image: np.ndarray, path: CameraPath) -> tuple[np.ndarray, CameraPath]:
    """The source image resized so that frame 0 of `path` shows it at 1 source px per output
    px (bicubic), and the same camera path over the resized image: the same views, the
    source now at the scale the frames show it."""
    H, W = image.shape[:2]
    big = cv2.resize(image, (round(W / path.scale), round(H / path.scale)), interpolation=cv2.INTER_CUBIC)
    kx, ky = big.shape[1] / W, big.shape[0] / H  # pixel centres: u' = k (u + 0.5) - 0.5
    return big, dataclasses.replace(
        path, image_size=(big.shape[1], big.shape[0]), scale=path.scale * kx,
        center=(kx * (path.center[0] + 0.5) - 0.5, ky * (path.center[1] + 0.5) - 0.5),
        pan=(path.pan[0] * kx, path.pan[1] * ky))


def steady_clip(teacher, name: str, path: CameraPath, frames: int, size: tuple[int, int], style: str):
    """The teacher's stylisation of image `name`, made once at the scale `path`'s frames show
    it (at_frame_scale), rendered along `path`: frames (T, h, w, 3) float32 in [0, 1] (from
    uint8, as the clips), flows and valid as motion_clip's. Its strokes move exactly with the scene."""
    big, big_path = at_frame_scale(load_image(name), path)
    styled = teacher.stylize(big.astype(np.float32).transpose(2, 0, 1)[None] / 255, STYLES[style])[0]
    styled = (styled.transpose(1, 2, 0).clip(0, 1) * 255 + 0.5).astype(np.uint8)
    clip, flows, valid = motion_clip(styled, big_path, frames, size)
    return clip.astype(np.float32) / 255, flows, valid


def steady_teacher(teacher, paths, frames: int, size: tuple[int, int], style: str) -> dict:
    """A perfectly steady stylisation at the teacher's own stroke scale, as a reference for
    the warp error: steady_clip along each of `paths` ((image name, CameraPath) pairs).

    Its warp error is what resampling alone costs an output as sharp as this (the clips
    and the metric both interpolate bilinearly), about the least an output of its
    sharpness can score; flicker's student figures are to be read against it. Returns
    the mean warp error and the mean sharpness of its frames.
    """
    errors, sharp = [], []
    for name, path in paths:
        clip, flows, valid = steady_clip(teacher, name, path, frames, size, style)
        errors.append(warp_error(clip, flows, valid))
        sharp.append(np.mean([sharpness(f) for f in clip]))
    return {"warp": float(np.mean(errors)), "sharpness": float(np.mean(sharp))}


def side_by_side(images, teacher_out, student_out, path: Path) -> None:
    from PIL import Image

    rows = [np.concatenate([hwc(x), hwc(t), hwc(s)], axis=1) for x, t, s in zip(images, teacher_out, student_out)]
    sheet = (np.concatenate(rows, axis=0).clip(0, 1) * 255 + 0.5).astype(np.uint8)
    Image.fromarray(sheet).save(path, quality=88)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--clips", type=int, default=3, help="motion clips, cycling through the held-out images")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--cache-frames", type=int, default=2)
    parser.add_argument("--pictures", type=Path, help="folder for the side-by-side pictures")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    parser.add_argument("--autoencoder", type=Path, help="only compare this LiteAutoencoder folder's round trip "
                        "and decoder speed with --model's autoencoder")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.size < 8 or args.size % 8:
        parser.error(f"--size must be a positive multiple of 8, got {args.size}")
    if args.autoencoder is not None and not (args.autoencoder / "config.json").is_file():
        parser.error(f"--autoencoder {args.autoencoder}: not an autoencoder folder (no config.json)")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    pipe = load_pipeline(args.model)
    teacher = Teacher(threads=args.threads)
    images = torch.from_numpy(held_out_images(args.size))  # (3,3,S,S)
    if args.autoencoder is not None:
        results = compare_autoencoders(pipe, args.autoencoder, teacher, images, args.size)
        print(f"autoencoder round trips at {args.size}x{args.size} on {', '.join(HELD_OUT)} (photos | their "
              f"stylisations, all styles) and decoder speed ({args.threads} threads, median of 30, alternating):")
        for name, r in results.items():
            print(f"  {name} {json.dumps(r['config'])}: decode {r['decode_ms']:.1f} ms")
            for what in ("photos", "teacher"):
                t = r[what]
                print(f"    {what}: PSNR {t['psnr']:.2f} dB, sharpness kept {t['sharpness']:.3f}, "
                      f"grid ratio {t['grid']:.3f}")
        print(f"evaluated in {time.perf_counter() - start:.0f} s")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return 0
    clips = motion_clips(HELD_OUT, np.random.default_rng(0), args.clips, args.frames, (args.size, args.size))
    paths = camera_paths(HELD_OUT, np.random.default_rng(0), args.clips, args.frames, (args.size, args.size))
    results = {}
    sides = [side for side in CROP_SIDES if side < args.size]  # teacher_crop_agreement's crops that fit
    styled = torch.cat([torch.from_numpy(teacher.stylize(images.numpy(), index)) for index in STYLES.values()])
    results["autoencoder"] = {"photos": round_trip(pipe.autoencoder, images),
                              "teacher": round_trip(pipe.autoencoder, styled)}
    print(f"autoencoder round trip at {args.size}x{args.size} (held-out photos | their stylisations, all styles):")
    for name, r in results["autoencoder"].items():
        print(f"  {name}: PSNR {r['psnr']:.2f} dB, sharpness kept {r['sharpness']:.3f}, grid ratio {r['grid']:.3f}")
    print(f"held-out images: {', '.join(HELD_OUT)}; {len(clips)} clips of {args.frames} frames at "
          f"{args.size}x{args.size}, noise {NOISE}")
    print("| style | student PSNR | input PSNR (floor) | student SSIM | input SSIM | sharpness / teacher's | "
          "latent ceiling PSNR (sharpness / teacher's) | warp error teacher | student | student + temporal cache | "
          "steady teacher (sharpness / teacher's) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for style in STYLES:
        f = fidelity(pipe, teacher, images, style)
        w = flicker(pipe, teacher, clips, style, args.cache_frames)
        steady = steady_teacher(teacher, paths, args.frames, (args.size, args.size), style)
        results[style] = {k: round(float(v), 4) for k, v in f.items() if not isinstance(v, torch.Tensor)} | \
            {f"warp_{k}": round(w[k] * 1e3, 3) for k in ("teacher", "student", "student_temporal")} | \
            {"warp_steady_teacher": round(steady["warp"] * 1e3, 3),
             "steady_teacher_sharpness": round(steady["sharpness"] / w["teacher_sharpness"], 3)}
        r = results[style]
        print(f"| {style} | {r['student_psnr']:.2f} dB | {r['input_psnr']:.2f} dB | {r['student_ssim']:.3f} | "
              f"{r['input_ssim']:.3f} | {r['sharpness']:.3f} | {r['ceiling_psnr']:.2f} dB ({r['ceiling_sharpness']:.3f}) | "
              f"{r['warp_teacher']:.2f} | {r['warp_student']:.2f} | "
              f"{r['warp_student_temporal']:.2f} | "
              f"{r['warp_steady_teacher']:.2f} ({r['steady_teacher_sharpness']:.2f}) |")
        r["teacher_crop_agreement"] = {side: round(teacher_crop_agreement(teacher, images, style, side), 2)
                                       for side in sides}
        if args.pictures:
            args.pictures.mkdir(parents=True, exist_ok=True)
            side_by_side(images, f["teacher"], f["student"], args.pictures / f"{style}.jpg")
    print(f"teacher's crop agreement (its stylisation of a centre crop against the same region of the whole "
          f"image's, PSNR), crops of {', '.join(map(str, sides))} px: " + "; ".join(
              f"{style} " + " / ".join(f"{v:.2f}" for v in results[style]["teacher_crop_agreement"].values())
              for style in STYLES) + " dB")
    print("latent ceiling: the teacher's stylisation through the autoencoder (decoding with the input frame), "
          "what a U-Net landing exactly on the teacher's latents would give")
    print("warp error: MSE x 1e3 on [0,1] images, lower is steadier; steady teacher: the teacher's stylisation of "
          "each source image rendered along the clip's camera path, steady by construction (its sharpness over "
          "the frame-by-frame teacher's on the clips in brackets)")
    print(f"evaluated in {time.perf_counter() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
