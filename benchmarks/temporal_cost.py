"""What the temporal parts cost in frame rate: the demo model on the CPU, one run, alternating.

    python benchmarks/temporal_cost.py                    # 512x512, 6 rounds of 8 frames each way
    python benchmarks/temporal_cost.py --size 256x256 --rounds 8
    python benchmarks/temporal_cost.py --parts            # each part alone against off, in the same run
    python benchmarks/temporal_cost.py --profile          # and the time in each part, per frame

Two file streams on one Engine, one with the temporal parts on (the default
TemporalSettings: a 2-frame cached self-attention, flow-guided latents and output
blend), one with them off. Each round restyles `--frames` frames on one, then on the
other (the order alternates between rounds), every frame restyled; fps per round is
frames over the wall time from the first submit() to flush(). On a shared machine the
load moves during a run, so the rounds alternate and the figures are medians; the cost
is 1 - median(fps on) / median(fps off), and also the median of the per-round ratios.
Beside the wall-clock fps, the process's CPU time per frame (time.process_time: the
worker and the submitting thread) is less moved by other processes' load; its ratio is
printed too.

The flow runs on the submitting thread (Stream.submit), as in `livestyle run`, so on a
2-core machine it competes with the model for the cores: it is counted here. Threads
as the CLI sets them (livestyle.threads.configure: passive OpenMP waits, one torch
thread per CPU, or --threads).

`--profile` times each temporal part where it runs, per frame of the stream it ran for
(wall and the calling thread's CPU time, time.thread_time): the flow estimate
(FlowEstimator.motion and flow.warp_inputs, on the submitting thread), the latent warp
and the image warp (flow.sampling_grid and flow.propagate, or kernels.propagate, on the
worker; told apart by size), and the U-Net's self-attention layers (unet.Attention
without context; with the cache on, the cached attention: its cost is the difference
to the stream with it off). The parts are timed by wrapping the functions, so the
profile costs a few microseconds per call; the fps figures of a --profile run include
that.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from livestyle import threads  # noqa: E402  (no torch yet: the thread policy comes first)

PARTS = ("flow estimate", "latent warp", "image warp", "self-attention")


class Profile:
    """Wall and thread-CPU seconds per (stream, part), accumulated by wrapped functions.

    `current` names the stream being fed: the rounds run one stream at a time (flush()
    between them), so every call in between is that stream's."""

    def __init__(self):
        self.current: str | None = None
        self.wall: dict = defaultdict(float)
        self.cpu: dict = defaultdict(float)

    def timed(self, fn, part):
        """fn wrapped to add its time to `part` (a name, or a function of fn's arguments giving one)."""
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            began, cpu_began = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.current is not None:
                    name = part(*args, **kwargs) if callable(part) else part
                    if name is not None:
                        self.wall[self.current, name] += time.perf_counter() - began
                        self.cpu[self.current, name] += time.thread_time() - cpu_began
        return wrapper

    def install(self, size: tuple[int, int]) -> None:
        """Wrap the temporal parts where the engine finds them (its module's names, unet.Attention)."""
        from livestyle import kernels
        from livestyle.models import unet
        from livestyle.stream import engine as engine_module
        from livestyle.stream import flow

        w, h = size

        def warp(size_or_tensor) -> str:
            tw = size_or_tensor[0] if isinstance(size_or_tensor, tuple) else size_or_tensor.shape[-1]
            return "image warp" if tw == w else "latent warp"

        wrapped = {
            flow.sampling_grid: self.timed(flow.sampling_grid, lambda motion, size, *a, **k: warp(size)),
            flow.propagate: self.timed(flow.propagate, lambda current, *a, **k: warp(current)),
            flow.warp_inputs: self.timed(flow.warp_inputs, "flow estimate"),
            kernels.propagate: self.timed(kernels.propagate, lambda current, *a, **k: warp(current)),
        }
        for module in (flow, engine_module, kernels):
            for name, value in list(vars(module).items()):
                if callable(value) and value in wrapped:
                    setattr(module, name, wrapped[value])
        flow.FlowEstimator.motion = self.timed(flow.FlowEstimator.motion, "flow estimate")
        unet.Attention.forward = self.timed(unet.Attention.forward, lambda attention, x, context=None, *a, **k:
                                            "self-attention" if context is None else None)

    def report(self, names, frames: int, frame_ms: dict) -> None:
        """ms per frame of each part, per stream, and as a share of that stream's frame time."""
        print(f"time in each part per frame (wall ms / thread CPU ms; share of the stream's median frame time):")
        for name in names:
            cells = [f"{part} {1e3 * self.wall[name, part] / frames:6.1f} / {1e3 * self.cpu[name, part] / frames:6.1f}"
                     f" ({100 * self.wall[name, part] / frames * 1e3 / frame_ms[name]:4.1f}%)" for part in PARTS]
            print(f"  {name:12s} frame {frame_ms[name]:6.0f} ms: " + "; ".join(cells))


def size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=size, default=(512, 512))
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--frames", type=int, default=8, help="frames per stream per round")
    parser.add_argument("--parts", action="store_true",
                        help="also the cached attention alone and the flow (latents + output blend) alone")
    parser.add_argument("--profile", action="store_true", help="also the time in each temporal part, per frame")
    parser.add_argument("--threads", type=int, help="torch threads (default: livestyle's, as the CLI sets them)")
    args = parser.parse_args()
    threads.configure(args.threads)  # the CLI's thread policy (passive OpenMP waits), before torch is imported

    from livestyle.capture.sources import SyntheticSource
    from livestyle.config import StreamSettings, TemporalSettings
    from livestyle.models.demo import load_demo
    from livestyle.stream.engine import Engine

    profile = Profile() if args.profile else None
    if profile:
        profile.install(args.size)
    w, h = args.size
    load_before = os.getloadavg()
    clip = list(SyntheticSource("coffee", (w, h), 24, args.frames * (args.rounds + 1)))
    configs = {"on": TemporalSettings(), "off": TemporalSettings.off()}
    if args.parts:
        configs["cache only"] = TemporalSettings(flow=False)
        configs["flow only"] = TemporalSettings(attention_frames=0)
    fps = {name: [] for name in configs}
    cpu = {name: [] for name in configs}  # CPU ms per frame
    with Engine(load_demo) as engine:
        streams = {name: engine.open_stream(StreamSettings(size=(w, h), style="starry-night", temporal=temporal),
                                            lambda f: None, live=False)
                   for name, temporal in configs.items()}
        for r in range(args.rounds + 1):  # round 0 warms up (allocation, first calls), not counted
            chunk = clip[r * args.frames:(r + 1) * args.frames]
            for name in (list(configs) if r % 2 else list(configs)[::-1]):
                if profile:
                    profile.current = name if r else None
                began, cpu_began = time.perf_counter(), time.process_time()
                for f in chunk:
                    streams[name].submit(f)
                streams[name].flush()
                if r:
                    fps[name].append(len(chunk) / (time.perf_counter() - began))
                    cpu[name].append(1e3 * (time.process_time() - cpu_began) / len(chunk))
        if profile:
            profile.current = None
        host = engine.stats()["host_ms_mean"]
        for s in streams.values():
            s.close()
    on, off = statistics.median(fps["on"]), statistics.median(fps["off"])
    ratios = statistics.median(a / b for a, b in zip(fps["on"], fps["off"]))
    print(f"demo model, cpu ({threads.describe()}), {w}x{h}, {args.rounds} rounds of {args.frames} "
          f"frames each way (medians); load average {' '.join(f'{v:.2f}' for v in load_before)} at the start, "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} at the end")
    print(f"temporal on  {on:6.2f} fps   per round: {', '.join(f'{v:.2f}' for v in fps['on'])}")
    print(f"temporal off {off:6.2f} fps   per round: {', '.join(f'{v:.2f}' for v in fps['off'])}")
    print(f"cost: {100 * (1 - on / off):.1f}% of the frame rate (median of per-round ratios: "
          f"{100 * (1 - ratios):.1f}%); engine host time {host:.1f} ms/frame")
    for name in list(configs)[2:]:
        part = statistics.median(a / b for a, b in zip(fps[name], fps["off"]))
        print(f"{name}: {statistics.median(fps[name]):.2f} fps, cost {100 * (1 - part):.1f}% (median of per-round "
              f"ratios)")
    for name in configs:
        extra = statistics.median(a / b for a, b in zip(cpu[name], cpu["off"]))
        print(f"CPU time per frame, {name}: {statistics.median(cpu[name]):.0f} ms ({100 * (extra - 1):+.1f}% "
              f"against off, median of per-round ratios)")
    if profile:
        profile.report(configs, args.rounds * args.frames, {n: 1e3 / statistics.median(fps[n]) for n in configs})


if __name__ == "__main__":
    main()
