"""Speed of the embedded demo model, per stage: encode, denoise (U-Net steps), decode.

    python benchmarks/demo_speed.py [--threads 2] [--sizes 256 512] [--steps 1 2]

Goal: at least 24 fps at 256x256 with 1 step on a 2-core CPU, for encode + denoise +
decode together. Prints the median and the spread of each stage over --runs runs, and of
the three called one after another ("end to end": timed as one, not the sum of the
stages' medians; fps is 1000 / its median), one frame at a time (batch 1), as a live
stream runs it. The engine adds the rest of a frame (flow, conversions, the sink):
benchmarks/stream_speed.py and `livestyle bench` measure that.
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

from livestyle.models.demo import load_demo  # noqa: E402
from livestyle.models.temporal import TemporalCache  # noqa: E402
from livestyle.stream.samplers import sample_bridge  # noqa: E402


def timed(fn, runs: int, warmup: int = 5) -> list[float]:
    """Wall times (ms) of `fn` over `runs` runs; on a GPU each ends with a synchronize."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_demo(device=args.device)
    style = pipe.styles.names[0]
    context = pipe.styles.context(style).to(args.device)
    print(f"demo model, style {style}, device {args.device}, {args.threads} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}; median [min-max] of {args.runs} runs, ms")
    print("| size | steps | temporal cache | encode | denoise | decode | end to end | fps (end to end) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    with torch.inference_mode():
        for size in args.sizes:
            images = torch.rand(1, 3, size, size, device=args.device)
            z0 = pipe.autoencoder.encode(images)
            for steps in args.steps:
                for use_cache in (False, True):
                    cache = TemporalCache.for_unet(pipe.unet, 1, (size // 8, size // 8), 2, device=args.device) \
                        if use_cache else None

                    def denoise():
                        z = sample_bridge(lambda z, t: pipe.unet(z, t, context, temporal=cache), z0, 1.0, steps)
                        if cache is not None:
                            cache.advance()
                        return z

                    def frame():
                        z = sample_bridge(lambda z, t: pipe.unet(z, t, context, temporal=cache),
                                          pipe.autoencoder.encode(images), 1.0, steps)
                        if cache is not None:
                            cache.advance()
                        return pipe.autoencoder.decode(z)

                    stages = {"encode": timed(lambda: pipe.autoencoder.encode(images), args.runs),
                              "denoise": timed(denoise, args.runs),
                              "decode": timed(lambda: pipe.autoencoder.decode(z0), args.runs),
                              "end to end": timed(frame, args.runs)}
                    cells = " | ".join(f"{statistics.median(v):.1f} [{min(v):.1f}-{max(v):.1f}]"
                                       for v in stages.values())
                    print(f"| {size}x{size} | {steps} | {'on' if use_cache else 'off'} | {cells} | "
                          f"{1e3 / statistics.median(stages['end to end']):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
