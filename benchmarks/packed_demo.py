"""The demo model through the engine, its modules as loaded against oneDNN-packed
(livestyle.models.packed: U-Net and autoencoder; Engine(pack=False) against pack=True, the
engine's default on a CPU in fp32), alternating in one process.

    python benchmarks/packed_demo.py               # livestyle's default threads
    python benchmarks/packed_demo.py --threads 1

Two engines, one per form, each with one file stream at 256x256 (1 step, all temporal
parts, as `livestyle run test:`): 4 warm-up frames, then frames per second over 24
frames, per round, in alternating order. Printed: each round's fps and the median of the
per-round speed-ups.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent.parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from livestyle import threads  # noqa: E402  (no torch yet: the thread policy comes first)

SIZE, WARM, FRAMES = 256, 4, 24


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, help="torch threads (default: livestyle's)")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    threads.configure(args.threads)
    import cv2

    cv2.setNumThreads(1)  # as the CLI does
    from livestyle.capture.sources import SyntheticSource
    from livestyle.config import StreamSettings
    from livestyle.models.demo import load_demo
    from livestyle.stream.engine import Engine
    from stream_speed import throughput

    clip = [f.to_ndarray(format="rgb24") for f in SyntheticSource("coffee", (SIZE, SIZE), 30, WARM + FRAMES)]

    def fps(engine) -> float:  # the warm-up frames are also the packed layers' first calls, where they pack
        return throughput(engine, StreamSettings(size=(SIZE, SIZE)), clip, WARM)

    rates = {"as loaded": [], "packed": []}
    with Engine(lambda: load_demo("cpu"), "cpu", pack=False) as plain, \
            Engine(lambda: load_demo("cpu"), "cpu", pack=True) as fast:
        engines = {"as loaded": plain, "packed": fast}
        for r in range(args.rounds):
            for name in (("as loaded", "packed") if r % 2 else ("packed", "as loaded")):
                rates[name].append(fps(engines[name]))
    print(f"demo model, {SIZE}x{SIZE}, engine, {FRAMES} frames a round; {threads.describe()}")
    for name, values in rates.items():
        print(f"  {name:9s} fps per round {', '.join(f'{v:.1f}' for v in values)}")
    ratio = [p / q for p, q in zip(rates["packed"], rates["as loaded"])]
    print(f"  packed speed-up {statistics.median(ratio):.2f} [{min(ratio):.2f}-{max(ratio):.2f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
