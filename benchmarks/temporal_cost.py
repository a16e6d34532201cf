"""What the temporal parts cost in frame rate: the demo model on the CPU, one run, alternating.

    python benchmarks/temporal_cost.py                    # 512x512, 6 rounds of 8 frames each way
    python benchmarks/temporal_cost.py --size 256x256 --rounds 8
    python benchmarks/temporal_cost.py --parts            # each part alone against off, in the same run

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
2-core machine it competes with the model for the cores: it is counted here.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from livestyle.capture.sources import SyntheticSource  # noqa: E402
from livestyle.config import StreamSettings, TemporalSettings  # noqa: E402
from livestyle.models.demo import load_demo  # noqa: E402
from livestyle.stream.engine import Engine  # noqa: E402


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
    args = parser.parse_args()
    w, h = args.size
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
                began, cpu_began = time.perf_counter(), time.process_time()
                for f in chunk:
                    streams[name].submit(f)
                streams[name].flush()
                if r:
                    fps[name].append(len(chunk) / (time.perf_counter() - began))
                    cpu[name].append(1e3 * (time.process_time() - cpu_began) / len(chunk))
        host = engine.stats()["host_ms_mean"]
        for s in streams.values():
            s.close()
    on, off = statistics.median(fps["on"]), statistics.median(fps["off"])
    ratios = statistics.median(a / b for a, b in zip(fps["on"], fps["off"]))
    print(f"demo model, cpu ({torch.get_num_threads()} threads), {w}x{h}, {args.rounds} rounds of {args.frames} "
          f"frames each way (medians)")
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


if __name__ == "__main__":
    main()
