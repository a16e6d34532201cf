"""One U-Net call on the CPU, fp32: livestyle's reference modules against its faster forms
and diffusers' U-Net, all holding the same weights, alternating in one process.

    python benchmarks/unet_speed.py                                  # packed vs reference vs diffusers, 256x256
    python benchmarks/unet_speed.py --systems livestyle channels_last --rounds 5
    python benchmarks/unet_speed.py --tiny --rounds 1                # seconds: that it still runs

SD-Turbo's architecture (the SD 2.1 U-Net config) with random weights (speed does not
depend on them), batch 1, timestep 359, a 77-token context. Every call runs on one
worker thread with livestyle's thread policy (threads.configure: the engine's setting),
after two warm-up calls per system; each round calls every system once, in a rotated
order, so a slow spell of a shared machine hits all alike. Printed: per system the median
ms per call [min-max], its speed-up over the first system per round (median [min-max]),
the process's CPU time per call (user + system, all threads: on a machine shared with
other jobs it counts the work done rather than the wait for a core; with livestyle's
passive OpenMP waits an idle thread adds none) and its speed-up, and the largest
difference of its output from the first system's.

Systems: livestyle (the modules as loaded), packed (livestyle.models.packed.pack: weights
reordered for oneDNN once), channels_last (the U-Net and its input in NHWC),
packed_channels_last, sdpa_math (attention through PyTorch's math backend instead of the
one it picks), diffusers (UNet2DConditionModel).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # python benchmarks/unet_speed.py from a checkout
    sys.path.insert(0, str(HERE.parent))

from livestyle import threads  # noqa: E402  (no torch yet: the thread policy comes first)

SYSTEMS = ("livestyle", "packed", "channels_last", "packed_channels_last", "sdpa_math", "diffusers")


def views(reference, names: list[str]):
    """A livestyle U-Net per name, sharing the reference's tensors where the form allows."""
    import torch

    from livestyle.models.packed import pack
    from livestyle.models.unet import UNet

    def copy():
        with torch.device("meta"):
            unet = UNet(reference.config)
        unet.load_state_dict(reference.state_dict(), assign=True)  # the same tensors, no copy
        return unet.eval().requires_grad_(False)

    made = {}
    for name in names:
        if name in ("livestyle", "sdpa_math"):
            made[name] = reference
        elif name == "packed":
            made[name] = pack(copy())
        elif name == "channels_last":
            made[name] = copy().to(memory_format=torch.channels_last)  # a copy of each 4-d weight
        elif name == "packed_channels_last":
            made[name] = pack(copy())
    return made


def spread(values: list[float], digits: str = ".2f") -> str:
    return f"{statistics.median(values):{digits}} [{min(values):{digits}}-{max(values):{digits}}]"


def ratios(times: dict, base: str, name: str) -> list[float]:
    """base's time over name's, per round: name's speed-up."""
    return [b / m for b, m in zip(times[base], times[name])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=["livestyle", "packed", "diffusers"],
                        help="the first is the baseline of the speed-ups (default: livestyle packed diffusers)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latents: size / 8)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: livestyle's)")
    parser.add_argument("--tiny", action="store_true", help="a small U-Net of the same kind (a smoke run)")
    args = parser.parse_args(argv)
    n_threads = threads.configure(args.threads)

    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from peers import sd_turbo_parts

    parts = sd_turbo_parts(tiny=args.tiny)
    unets = views(parts.unet, args.systems)
    side = args.size // 8
    x = torch.randn(args.batch, 4, side, side, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([359.0])
    c = parts.context.expand(args.batch, -1, -1)
    nhwc = x.contiguous(memory_format=torch.channels_last)

    def math_attention():
        with sdpa_kernel([SDPBackend.MATH]):
            return parts.unet(x, t, c)

    calls = {"diffusers": lambda: parts.diffusers_unet(x, t, encoder_hidden_states=c).sample,
             "sdpa_math": math_attention}
    for name, unet in unets.items():
        if name not in calls:
            calls[name] = (lambda u=unet, i=(nhwc if "channels_last" in name else x): u(i, t, c))
    calls = {name: calls[name] for name in args.systems}

    worker = ThreadPoolExecutor(max_workers=1)  # one long-lived thread, as the engine's worker

    def cpu_s():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def timed(fn):
        """fn once on the worker: (wall ms, CPU ms, output)."""
        def run():
            with torch.inference_mode():
                cpu, start = cpu_s(), time.perf_counter()
                out = fn()
                return (time.perf_counter() - start) * 1e3, (cpu_s() - cpu) * 1e3, out
        return worker.submit(run).result()

    print(f"U-Net call, fp32, cpu, {args.size}x{args.size}, batch {args.batch}, "
          f"{'tiny U-Net' if args.tiny else 'SD-Turbo architecture'}; {threads.describe()}", flush=True)
    outputs = {}
    for name, fn in calls.items():  # warm-up: oneDNN's primitives, the first allocations
        timed(fn)
        outputs[name] = timed(fn)[2]
    ms, cpu = {name: [] for name in calls}, {name: [] for name in calls}
    for r in range(args.rounds):
        order = args.systems[r % len(args.systems):] + args.systems[:r % len(args.systems)]
        for name in order:
            wall, used, _ = timed(calls[name])
            ms[name].append(wall)
            cpu[name].append(used)
    worker.shutdown()

    base = args.systems[0]
    print(f"{args.rounds} rounds, {n_threads} threads; ms per call median [min-max]; speed-up over {base} per round")
    for name in args.systems:
        diff = (outputs[name] - outputs[base]).abs().max().item()
        print(f"  {name:22s} {spread(ms[name], '.0f')} ms, speed-up {spread(ratios(ms, base, name))}; "
              f"CPU {spread(cpu[name], '.0f')} ms, speed-up {spread(ratios(cpu, base, name))}; "
              f"max |out - {base}| {diff:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
