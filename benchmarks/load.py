"""Load: a full server on loopback. N sessions at once, each served as fairly as the others;
the (N+1)th refused with 503 and a reason.

    python benchmarks/load.py [--sessions 8] [--seconds 20] [--warmup 5] [--size 128x96]
        [--short-side 64] [--max-latency MS] [--device cpu]

The server (the demo model on the engine, --max-sessions N) runs in its own process, as
`livestyle serve` does; this process runs N aiortc clients, each a synthetic 30 fps
camera sent to /offer with the restyled video coming back, then offers one more.

Per session: restyled frames received per second over the measured window, the median
and 90th percentile end-to-end latency of its frames (capture to the restyled frame
decoded back, paired by pts; it holds one output frame's interval of aiortc's jitter
buffer), and the server's counts. Verdict (exit status 1 when one fails):
- served: every session received frames;
- fair: the slowest session's fps at least 80% of the fastest's;
- bounded: every session's 90th percentile latency under --max-latency ms, by default
  under 4 of its output frame intervals + 500 ms: a frame waits for the one in the
  model, takes its own turn, and waits in the client's jitter buffer for the next (3
  intervals); one that queued behind others would take more;
- full: the extra offer answered 503 with a reason.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.server_latency import ServerProcess, camera_size  # noqa: E402

FAIRNESS = 0.8  # slowest session's fps / fastest's


@dataclass
class Load:
    fps: list[float]  # per session
    latency_ms: list[float | None]  # medians, per session
    latency_p90_ms: list[float | None]
    server: list[dict]  # /stats per session, in the clients' order ({} for one gone)
    engine: dict
    refused: tuple[int, str] | None  # the extra offer's status and reason; None if it was served
    processing: tuple[int, int] | None


async def load(url: str, sessions: int, seconds: float, warmup: float, size: tuple[int, int]) -> Load:
    """Open `sessions` sessions at once, then one more; measure `seconds` after `warmup`."""
    import aiohttp

    from livestyle.capture.sources import SyntheticSource
    from livestyle.server.client import CameraClient, OfferRefused, SyntheticTrack, pair_frames

    frames = [f.to_ndarray(format="rgb24") for f in SyntheticSource("coffee", size, fps=30, frames=60)]
    clients = [CameraClient(url, SyntheticTrack(frames, 30)) for _ in range(sessions)]
    try:
        await asyncio.gather(*(c.connect() for c in clients))
        refused = None
        extra = CameraClient(url, SyntheticTrack(frames, 30))
        try:
            await extra.connect()
        except OfferRefused as e:
            refused = (e.status, e.reason)
        finally:
            await extra.close()
        await asyncio.sleep(warmup)
        counts = [c.receiver.frames for c in clients]
        start = time.monotonic()
        await asyncio.sleep(seconds)
        end = time.monotonic()
        async with aiohttp.ClientSession() as http, http.get(f"{url}/stats") as response:
            stats = await response.json()
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    fps, medians, p90s = [], [], []
    for client, count in zip(clients, counts):
        fps.append((client.receiver.frames - count) / (end - start))
        pairs = pair_frames(client.track.sent, client.receiver.received)
        latencies = sorted(1e3 * (r - s) for s, r in pairs if start <= r <= end)
        medians.append(statistics.median(latencies) if latencies else None)
        p90s.append(latencies[int(0.9 * (len(latencies) - 1))] if latencies else None)
    by_label = {s["id"]: s for s in stats["sessions"]}
    server = [by_label.get(c.label, {}) for c in clients]
    return Load(fps, medians, p90s, server, stats["engine"], refused,
                tuple(server[0]["settings"]["size"]) if server and server[0] else None)


def latency_bound(fps: float, max_latency_ms: float | None = None) -> float:
    """The p90 latency a session at `fps` must stay under, ms (see the module docstring)."""
    return max_latency_ms if max_latency_ms else 4e3 / max(fps, 1e-3) + 500.0


def verdict(result: Load, max_latency_ms: float | None = None) -> list[tuple[str, bool, str]]:
    """(check, passed, figures) for served, fair, bounded and full."""
    fps = result.fps
    slowest, fastest = min(fps), max(fps)
    over = [(p90, latency_bound(f, max_latency_ms)) for f, p90 in zip(fps, result.latency_p90_ms)
            if p90 is None or p90 >= latency_bound(f, max_latency_ms)]
    worst = max((v for v in result.latency_p90_ms if v is not None), default=None)
    refused = result.refused
    return [
        ("served", slowest > 0, f"{sum(f > 0 for f in fps)} of {len(fps)} sessions received frames"),
        ("fair", fastest > 0 and slowest >= FAIRNESS * fastest,
         f"fps {slowest:.2f} to {fastest:.2f}: slowest/fastest {slowest / max(fastest, 1e-9):.2f} "
         f"(at least {FAIRNESS:.2f})"),
        ("bounded", worst is not None and not over,
         "no latency figure" if worst is None else
         f"worst session's p90 latency {worst:.0f} ms; {len(over)} session(s) over their bound "
         f"({'--max-latency' if max_latency_ms else '4 frame intervals + 500 ms'}: "
         f"{latency_bound(slowest, max_latency_ms):.0f} ms at the slowest session's fps)"),
        ("full", refused is not None and refused[0] == 503 and bool(refused[1]),
         f"the extra offer: {refused[0]} {refused[1]!r}" if refused else "the extra offer was served"),
    ]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=8, help="concurrent sessions = the server's --max-sessions")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured time")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--size", type=camera_size, default="128x96", help="the clients' camera size, WxH")
    parser.add_argument("--short-side", type=int, default=64, help="the server's processing short side")
    parser.add_argument("--max-latency", type=float, default=None,
                        help="bound on each session's p90 latency, ms (default: 4 frame intervals + 500 ms)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.seconds <= 0 or args.warmup < 0 or (args.max_latency or 1) <= 0:
        parser.error("--sessions, --seconds and --max-latency must be positive, --warmup >= 0")

    with ServerProcess(args.short_side, args.device, args.sessions) as server:
        print(f"python {platform.python_version()}, {os.cpu_count()} CPUs; {args.sessions} sessions sending "
              f"{args.size[0]}x{args.size[1]} at 30 fps, short side {args.short_side}; "
              f"{args.seconds:g} s after {args.warmup:g} s")
        result = asyncio.run(load(server.url, args.sessions, args.seconds, args.warmup, args.size))
    w, h = result.processing or (0, 0)
    print(f"processing {w}x{h}; engine load {result.engine['load']:.2f}")
    print("| session | fps | latency median (ms) | latency p90 (ms) | server latency (ms) | dropped | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for i, (fps, median, p90) in enumerate(zip(result.fps, result.latency_ms, result.latency_p90_ms)):
        s = result.server[i]
        print(f"| {i + 1} | {fps:.2f} | {_ms(median)} | {_ms(p90)} | {_ms(s.get('latency_ms'))} "
              f"| {s.get('dropped', '-')} | {s.get('errors', '-')} |")
    checks = verdict(result, args.max_latency)
    for name, passed, figures in checks:
        print(f"{name}: {'pass' if passed else 'FAIL'}: {figures}")
    return 0 if all(passed for _, passed, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
