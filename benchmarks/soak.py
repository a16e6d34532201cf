"""Soak: sessions stream to the server for minutes; its memory and their latency every 10 s.

    python benchmarks/soak.py [--minutes 30] [--interval 10] [--sessions 1] [--size 160x120]
        [--short-side 256] [--settle 60] [--after 20] [--device cpu]

The server (the demo model on the engine, as `livestyle serve` runs it) has a process of
its own, so its resident memory (VmRSS) is its alone; this process runs the clients: a
synthetic 30 fps camera each, sent to /offer, restyled video back (see
server_latency.py for how latency is paired per frame).

Every interval it records the server's memory and, per session, the frames received
per second, the server's median latency (a frame's arrival to its restyled frame, over
its last 90 frames) and the median end-to-end latency of the interval's frames (the
client's capture to the restyled frame decoded back). The end-to-end figure also holds
one output frame's interval, as aiortc's jitter buffer releases a frame only when the
next one's first packet arrives (2 s at 0.5 fps), so it follows the frame rate the
machine gives; the creep check uses the server's. After the run the sessions close and
the server's memory is sampled again.

Verdict (exit status 1 when one fails):
- growth: memory at the end of streaming within 5% of its level at --settle seconds
  (the first minute: codecs, the allocator's pools and the model's first calls);
- returned: memory --after seconds after the sessions closed within 10% of its level
  before they opened. That level is the idle server's after a --warmup session: a
  server's first session loads the codecs and runs the model's first calls at its size
  once for the process's life (+60 MB here, the same after the 2nd and 3rd sessions);
  the cold level is printed too;
- latency: the server's median latency over the last minute at most 25% above the
  first minute's (its first interval left out: warm-up), 20 ms of slack for timer
  noise; or, when the model itself got slower (a machine shared with other work), its
  latency in model times (latency / the engine's model ms per frame) at most 25% above
  the first minute's. Frames piling up anywhere raise both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.server_latency import ServerProcess, camera_size  # noqa: E402

GROWTH_LIMIT = 0.05  # memory growth after the first minute
RETURN_LIMIT = 0.10  # memory after the sessions close, against before
CREEP_LIMIT = 0.25  # last minute's latency median against the first's
CREEP_SLACK_MS = 20.0


@dataclass
class Sample:
    """One interval: t seconds since the sessions opened; per session fps and latency
    medians in ms (None when no frame of the interval could be paired)."""

    t: float
    rss_mb: float
    frames_out: int  # restyled frames so far, every session together
    fps: list[float]  # received by the client
    server_fps: list[float]  # restyled by the server (over its last ~2 s)
    latency_ms: list[float | None]
    server_ms: list[float | None]
    model_ms: list[float | None]  # the engine's model time per frame, recent median


@dataclass
class Soak:
    cold_mb: float  # the idle server before its first session
    before_mb: float  # the idle server after the warm-up session, before the sessions opened
    samples: list[Sample] = field(default_factory=list)
    closed: list[tuple[float, float]] = field(default_factory=list)  # (s after closing, MiB)
    errors: int = 0  # frames the engine failed, over every session
    dropped: int = 0
    frames: int = 0  # frames the server received


class Latency:
    """One client's per-interval latency: pairs the interval's received frames with the
    frames sent, then forgets both (a 30-minute run keeps seconds of history, not all of it)."""

    def __init__(self, client):
        self.client = client
        self.offset: int | None = None
        self.counted = 0  # frames received before this interval

    def interval(self) -> tuple[int, float | None]:
        from livestyle.server.client import pair_frames, pts_offset

        sent, received = self.client.track.sent, self.client.receiver.received
        frames = self.client.receiver.frames - self.counted
        self.counted += frames
        if self.offset is None:
            if len(received) < 10:  # too few to find the offset: keep them for the next interval
                return frames, None
            self.offset = pts_offset(sent, received)
        pairs = pair_frames(sent, dict(received), offset=self.offset)
        received.clear()
        horizon = time.monotonic() - 10.0  # a frame sent longer ago than this will not come back
        for pts in [p for p, t in sent.items() if t < horizon]:
            del sent[pts]
        latency = 1e3 * statistics.median(r - s for s, r in pairs) if pairs else None
        return frames, latency


async def soak(server: ServerProcess, minutes: float, interval: float = 10.0, sessions: int = 1,
               size: tuple[int, int] = (160, 120), after: float = 20.0, warmup: float = 10.0, echo=print,
               min_frames: int = 0, settle: float = 0.0, max_minutes: float | None = None) -> Soak:
    """Stream `sessions` synthetic cameras to `server` for `minutes`; sample every `interval` s.
    A warm-up session of `warmup` seconds comes first (0: none). With `min_frames`, streaming
    goes on past `minutes` (up to `max_minutes`) until that many frames were restyled after
    `settle` seconds: on a busy machine a minute may restyle too few frames to show a leak."""
    import aiohttp

    from livestyle.capture.sources import SyntheticSource
    from livestyle.server.client import CameraClient, SyntheticTrack

    frames = [f.to_ndarray(format="rgb24") for f in SyntheticSource("coffee", size, fps=30, frames=90)]
    await asyncio.sleep(2.0)  # the server settles after start-up
    cold = server.rss_mb()
    if warmup > 0:
        async with CameraClient(server.url, SyntheticTrack(frames, 30)):
            await asyncio.sleep(warmup)
        await asyncio.sleep(3.0)  # the server frees the session
    result = Soak(cold_mb=cold, before_mb=server.rss_mb())
    echo(f"idle server: {cold:.0f} MiB before its first session, {result.before_mb:.0f} MiB after a "
         f"{warmup:g} s warm-up session")
    clients = [CameraClient(server.url, SyntheticTrack(frames, 30)) for _ in range(sessions)]
    try:
        await asyncio.gather(*(c.connect() for c in clients))
        latencies = [Latency(c) for c in clients]
        start = last = time.monotonic()
        echo("| t (s) | server MiB | fps received | fps restyled | latency ms (client) | latency ms (server) "
             "| model ms |")
        echo("| --- | --- | --- | --- | --- | --- | --- |")
        async with aiohttp.ClientSession() as http:
            while last - start < 60 * minutes - 1e-6 or (
                    _restyled_since(result.samples, settle) < min_frames
                    and last - start < 60 * (max_minutes or minutes) - 1e-6):
                await asyncio.sleep(start + (len(result.samples) + 1) * interval - time.monotonic())
                now = time.monotonic()
                async with http.get(f"{server.url}/stats") as response:
                    stats = (await response.json())["sessions"]
                measured = [lat.interval() for lat in latencies]
                sample = Sample(round(now - start, 1), server.rss_mb(), sum(s["frames_out"] for s in stats),
                                [n / (now - last) for n, _ in measured], [s["fps_out"] for s in stats],
                                [ms for _, ms in measured], [s["latency_ms"] for s in stats],
                                [s["model_ms"] for s in stats])
                result.samples.append(sample)
                result.errors = sum(s["errors"] for s in stats)
                result.dropped = sum(s["dropped"] for s in stats)
                result.frames = sum(s["frames_received"] for s in stats)
                last = now
                echo(f"| {sample.t:.0f} | {sample.rss_mb:.0f} | {' '.join(f'{f:.1f}' for f in sample.fps)} "
                     f"| {' '.join(f'{f:.1f}' for f in sample.server_fps)} "
                     f"| {' '.join(_ms(v) for v in sample.latency_ms)} | {' '.join(_ms(v) for v in sample.server_ms)} "
                     f"| {' '.join(_ms(v) for v in sample.model_ms)} |")
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    closed = time.monotonic()
    for k in range(max(1, round(after / 5))):
        await asyncio.sleep(closed + 5.0 * (k + 1) - time.monotonic())
        result.closed.append((round(time.monotonic() - closed), server.rss_mb()))
    echo("after the sessions closed: " + ", ".join(f"{mb:.0f} MiB at {t} s" for t, mb in result.closed))
    return result


def _restyled_since(samples: list[Sample], settle: float) -> int:
    """Frames restyled from the first sample at `settle` seconds or later to the last sample."""
    settled = next((s for s in samples if s.t >= settle), None)
    return 0 if settled is None else samples[-1].frames_out - settled.frames_out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _median_latency(samples: list[Sample]) -> float | None:
    values = [v for s in samples for v in s.server_ms if v is not None]
    return statistics.median(values) if values else None


def _median_model_times(samples: list[Sample]) -> float | None:
    """Median server latency in model times (latency / model ms per frame)."""
    values = [v / m for s in samples for v, m in zip(s.server_ms, s.model_ms) if v is not None and m]
    return statistics.median(values) if values else None


def verdict(result: Soak, settle: float = 60.0) -> list[tuple[str, bool, str]]:
    """(check, passed, figures) for growth, returned memory and latency creep."""
    samples = result.samples
    settled = next((s for s in samples if s.t >= settle - 1e-6), samples[-1])
    end = samples[-1]
    growth = (end.rss_mb - settled.rss_mb) / settled.rss_mb
    checks = [("growth", growth < GROWTH_LIMIT,
               f"{settled.rss_mb:.0f} MiB at {settled.t:.0f} s -> {end.rss_mb:.0f} MiB at {end.t:.0f} s: "
               f"{100 * growth:+.1f}% ({(end.rss_mb - settled.rss_mb) / max(end.t - settled.t, 1e-6):+.3f} MiB/s; "
               f"limit {100 * GROWTH_LIMIT:.0f}%)")]
    after = result.closed[-1][1]
    returned = (after - result.before_mb) / result.before_mb
    checks.append(("returned", returned < RETURN_LIMIT,
                   f"{result.before_mb:.0f} MiB before the sessions, {after:.0f} MiB {result.closed[-1][0]} s after "
                   f"they closed: {100 * returned:+.1f}% (limit {100 * RETURN_LIMIT:.0f}%)"))
    first_minute = [s for s in samples[1:] if s.t <= 60.0 + 1e-6]
    last_minute = [s for s in samples if s.t > end.t - 60.0 + 1e-6]
    first, last = _median_latency(first_minute), _median_latency(last_minute)
    first_x, last_x = _median_model_times(first_minute), _median_model_times(last_minute)
    if first is None or last is None:
        checks.append(("latency", False, "the server gave no latency figure"))
    else:
        held = last <= first * (1 + CREEP_LIMIT) + CREEP_SLACK_MS
        held_x = first_x is not None and last_x is not None and last_x <= first_x * (1 + CREEP_LIMIT)
        in_model_times = f"; {first_x:.1f} and {last_x:.1f} model times" if first_x and last_x else ""
        checks.append(("latency", held or held_x,
                       f"server median {first:.0f} ms in the first minute, {last:.0f} ms in the last{in_model_times} "
                       f"(limit +{100 * CREEP_LIMIT:.0f}% + {CREEP_SLACK_MS:.0f} ms, or +{100 * CREEP_LIMIT:.0f}% "
                       "in model times)"))
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="streaming time (default 30)")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples (default 10)")
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--size", type=camera_size, default="160x120",
                        help="the clients' camera size, WxH (default 160x120)")
    parser.add_argument("--short-side", type=int, default=256, help="the server's processing short side")
    parser.add_argument("--settle", type=float, default=60.0, help="seconds of warm-up before growth counts")
    parser.add_argument("--after", type=float, default=20.0, help="seconds to watch memory after the sessions close")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of a warm-up session first (0: none)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if not 0 < args.settle < 60 * args.minutes or args.interval <= 0 or args.sessions < 1 or args.warmup < 0:
        parser.error("--settle must be shorter than the run; --interval and --sessions positive, --warmup >= 0")

    with ServerProcess(args.short_side, args.device, args.sessions) as server:
        print(f"python {platform.python_version()}, {os.cpu_count()} CPUs; {args.sessions} session(s) sending "
              f"{args.size[0]}x{args.size[1]} at 30 fps for {args.minutes:g} min; short side {args.short_side}")
        result = asyncio.run(soak(server, args.minutes, args.interval, args.sessions, args.size, args.after,
                                  args.warmup))
    print(f"server: {result.frames} frames received, {result.dropped} dropped, {result.errors} errors")
    checks = verdict(result, args.settle)
    for name, passed, figures in checks:
        print(f"{name}: {'pass' if passed else 'FAIL'}: {figures}")
    return 0 if all(passed for _, passed, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
