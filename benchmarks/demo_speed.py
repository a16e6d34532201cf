"""Speed of the embedded demo model, per stage: encode, denoise (U-Net steps), decode.

    python benchmarks/demo_speed.py [--threads 2] [--sizes 256 512] [--steps 1 2]
    python benchmarks/demo_speed.py --model livestyle/weights/demo --model /tmp/v3   # two models, alternating

Goal: at least 24 fps at 256x256 with 1 step on a 2-core CPU, for encode + denoise +
decode together. Prints the median and the spread of each stage over --runs runs, and of
the three called one after another ("end to end": timed as one, not the sum of the
stages' medians; fps is 1000 / its median), one frame at a time (batch 1), as a live
stream runs it. The engine adds the rest of a frame (flow, conversions, the sink):
benchmarks/stream_speed.py and `livestyle bench` measure that. With more than one
--model, each run times every model once, in turn, so a busy spell hits them alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from livestyle.errors import LivestyleError  # noqa: E402
from livestyle.models.demo import DEMO_MODEL  # noqa: E402
from livestyle.models.loading import decode_frames, load_pipeline  # noqa: E402
from livestyle.models.temporal import TemporalCache  # noqa: E402
from livestyle.stream.samplers import sample_bridge  # noqa: E402


def timed(fns: list, runs: int, warmup: int = 5) -> list[list[float]]:
    """Wall times (ms) of each of `fns` over `runs` rounds, one call each per round, in turn.

    On a GPU each call ends with a synchronize.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            out.append((time.perf_counter() - start) * 1e3)
    return times


def stage_calls(pipe, size: int, steps: int, use_cache: bool, device: str) -> dict:
    """The four timed calls for one model: encode, denoise, decode and the whole frame."""
    context = pipe.styles.context(pipe.styles.names[0]).to(device)
    images = torch.rand(1, 3, size, size, device=device, generator=torch.Generator(device).manual_seed(0))
    z0 = pipe.autoencoder.encode(images)
    cache = TemporalCache.for_unet(pipe.unet, 1, (size // 8, size // 8), 2, device=device) if use_cache else None

    def denoise(z):
        z = sample_bridge(lambda z, t: pipe.unet(z, t, context, temporal=cache), z, 1.0, steps)
        if cache is not None:
            cache.advance()
        return z

    return {"encode": lambda: pipe.autoencoder.encode(images),
            "denoise": lambda: denoise(z0),
            "decode": lambda: decode_frames(pipe.autoencoder, z0, images),
            "end to end": lambda: decode_frames(pipe.autoencoder, denoise(pipe.autoencoder.encode(images)), images)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, action="append",
                        help="a demo-family model folder; repeat to compare (default: the embedded one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    folders = args.model or [DEMO_MODEL]
    try:
        pipes = [load_pipeline(folder, args.device, torch.float32) for folder in folders]
    except LivestyleError as e:
        print(f"demo_speed: error: {e}", file=sys.stderr)
        return 2
    print(f"demo-family models, first style, device {args.device}, {args.threads} threads, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}; "
          f"median [min-max] of {args.runs} runs, ms; models taking turns")
    print("| model | size | steps | temporal cache | encode | denoise | decode | end to end | fps (end to end) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with torch.inference_mode():
        for size in args.sizes:
            for steps in args.steps:
                for use_cache in (False, True):
                    calls = [stage_calls(pipe, size, steps, use_cache, args.device) for pipe in pipes]
                    stages = {name: timed([c[name] for c in calls], args.runs) for name in calls[0]}
                    for i, folder in enumerate(folders):
                        cells = " | ".join(f"{statistics.median(v[i]):.1f} [{min(v[i]):.1f}-{max(v[i]):.1f}]"
                                           for v in stages.values())
                        print(f"| {folder.name} | {size}x{size} | {steps} | {'on' if use_cache else 'off'} | "
                              f"{cells} | {1e3 / statistics.median(stages['end to end'][i]):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
