"""Thread policies on this CPU, quiet and beside one busy process, in one run.

    python benchmarks/thread_policy.py                     # the demo model, every policy, 3 rounds
    python benchmarks/thread_policy.py --workload unet --rounds 2 --policies half all spin
    python benchmarks/thread_policy.py --smoke             # seconds: that it still runs

Each measurement is its own process (OpenMP reads its wait policy once, when torch loads),
set up as the CLI does (livestyle.threads.configure) with the policy's thread count and
environment; "busy" runs it beside one `while True: pass` process. Rounds alternate every
(policy, quiet/busy) pair, so a slow spell of a shared machine hits all alike. Printed per
policy: the median [min-max] of frames per second (demo: the embedded demo model through
the engine, 256x256, 1 step, all temporal parts, as `livestyle run test:`) or U-Net calls
per second (unet: SD-Turbo's architecture, random weights, oneDNN-packed, 256x256,
batch 1, on a worker thread), quiet and busy, the busy rate's share of the quiet one, and
each policy's rate against the first policy's, per round. The machine's load average is
printed at the start and the end: other work on it counts as contention too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from suite import beside_busy  # noqa: E402  (imports no torch)

# name -> (torch threads, or None for livestyle's default; environment added before torch loads)
POLICIES = {
    "default": (None, {}),                                       # what livestyle does when not told
    "all": ("all", {"OMP_WAIT_POLICY": "PASSIVE"}),              # one thread per CPU, idle threads sleep at once
    "half": ("half", {"OMP_WAIT_POLICY": "PASSIVE"}),            # half the CPUs, idle threads sleep at once
    "one": (1, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "spin": ("all", {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"}),  # spin ~0.1 ms, then sleep
    "active": ("all", {"OMP_WAIT_POLICY": "ACTIVE"}),            # spin until work comes
}

CHILD = """
import json, os, sys, threading, time
sys.path.insert(0, {root!r})
from livestyle import threads
workload, count, size, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cpus = threads.usable_cpus()
named = {{"all": cpus, "half": max(1, cpus // 2), "None": None}}
count = named[count] if count in named else int(count)
used = threads.configure(count)
import torch
if workload == "demo":
    import cv2
    cv2.setNumThreads(1)  # as the CLI does
    from livestyle.capture.sources import SyntheticSource
    from livestyle.config import StreamSettings
    from livestyle.models.demo import load_demo
    from livestyle.stream.engine import Engine
    warm = 4
    clip = [f.to_ndarray(format="rgb24") for f in SyntheticSource("coffee", (size, size), 30, warm + n)]
    with Engine(lambda: load_demo("cpu"), "cpu") as engine:
        stream = engine.open_stream(StreamSettings(size=(size, size)), lambda f: None, live=False)
        for f in clip[:warm]: stream.submit(f)
        stream.flush(); start = time.perf_counter()
        for f in clip[warm:]: stream.submit(f)
        stream.flush()
        rate = n / (time.perf_counter() - start)
else:
    sys.path.insert(0, {benchmarks!r})
    from peers import sd_turbo_parts
    from livestyle.models.packed import pack
    parts = sd_turbo_parts(tiny=size < 256)
    unet = pack(parts.unet)
    del parts.diffusers_unet
    x, t = torch.randn(1, 4, size // 8, size // 8), torch.tensor([359.0])
    out = []
    def work():
        with torch.inference_mode():
            unet(x, t, parts.context)  # warm-up
            start = time.perf_counter()
            for _ in range(n): unet(x, t, parts.context)
            out.append(n / (time.perf_counter() - start))
    worker = threading.Thread(target=work); worker.start(); worker.join()
    rate = out[0]
print(json.dumps({{"rate": rate, "threads": used}}))
"""


def child(workload: str, policy: str, size: int, n: int, busy: bool) -> dict:
    count, extra = POLICIES[policy]
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    env.update(extra)
    code = CHILD.format(root=str(ROOT), benchmarks=str(ROOT / "benchmarks"))
    return beside_busy([sys.executable, "-c", code, workload, str(count), str(size), str(n)], env, busy, 900,
                       f"{policy} ({'busy' if busy else 'quiet'})")


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} [{min(values):.3g}-{max(values):.3g}]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=("demo", "unet"), default="demo")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=["all", "half", "spin", "active"],
                        help="the first is the baseline of the ratios (default: all half spin active)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, help="frames (demo, default 24) or calls (unet, default 2) per run")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round")
    args = parser.parse_args(argv)
    size = 64 if args.smoke else 256
    n = args.frames or (2 if args.smoke or args.workload == "unet" else 24)
    rounds = 1 if args.smoke else args.rounds
    unit = "fps" if args.workload == "demo" else "U-Net calls/s"

    print(f"load average at the start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"{len(os.sched_getaffinity(0))} CPUs", flush=True)
    runs = [(p, busy) for p in args.policies for busy in (False, True)]
    rates = {k: [] for k in runs}
    used = {}
    for r in range(rounds):
        for policy, busy in runs[r % len(runs):] + runs[:r % len(runs)]:
            result = child(args.workload, policy, size, n, busy)
            rates[(policy, busy)].append(result["rate"])
            used[policy] = result["threads"]
            print(f"  round {r + 1}: {policy:7s} {'busy ' if busy else 'quiet'} {result['rate']:.3g} {unit}",
                  flush=True)
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")

    base = args.policies[0]
    print(f"{args.workload}, {size}x{size}, {rounds} rounds: {unit} median [min-max]; ratios per round")
    for policy in args.policies:
        quiet, busy = rates[(policy, False)], rates[(policy, True)]
        env = " ".join(f"{k}={v}" for k, v in POLICIES[policy][1].items())
        print(f"  {policy:7s} {used[policy]} threads {env}")
        print(f"          quiet {spread(quiet)}  busy {spread(busy)}  "
              f"busy/quiet {spread([b / q for b, q in zip(busy, quiet)])}  "
              f"quiet vs {base} {spread([q / b for q, b in zip(quiet, rates[(base, False)])])}  "
              f"busy vs {base} {spread([q / b for q, b in zip(busy, rates[(base, True)])])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
