"""End-to-end latency and frame rate of `livestyle serve` with 1, 2 and 4 sessions.

    python benchmarks/server_latency.py [--sessions 1 2 4] [--seconds 10] [--size 320x240]
        [--short-side 256] [--device cpu] [--codec video/VP8]

The server (the embedded demo model on the engine) runs in its own process, as
`livestyle serve` would; this process runs N aiortc clients on loopback that each send
a synthetic 30 fps camera (a camera gliding over a shipped photo) to /offer and
receive the restyled video back.

Latency is per frame: the server gives each restyled frame the pts of the frame it
restyles, so a client pairs the time it handed a frame to its encoder (its capture
time) with the time the restyled frame came out of its decoder (client.pair_frames). That covers encode,
loopback network, the server's decode, the model, the server's encode, and the
client's decode. fps is restyled frames received per second per session. Medians over
every frame of every session after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def serve(port: int, short_side: int, device: str, max_sessions: int) -> None:
    """The server process: the demo model, the engine, the app on 127.0.0.1:port (0: any free port)."""
    import torch

    from livestyle.models.demo import load_demo
    from livestyle.server.app import App, ServerSettings
    from livestyle.server.app import serve as run
    from livestyle.stream.engine import Engine

    with Engine(lambda: load_demo(device), device=device) as engine:
        settings = ServerSettings(port=port, short_side=short_side, max_sessions=max_sessions)
        print(f"serving with torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
        asyncio.run(run(App(engine, settings), lambda url: print(f"ready {url}", flush=True)))


def camera_size(text: str) -> tuple[int, int]:
    """argparse type: 'WxH' -> (W, H), each 16 to 4096 pixels."""
    match = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not match or not all(16 <= int(v) <= 4096 for v in match.groups()):
        raise argparse.ArgumentTypeError(f"size {text!r}: expected WxH, 16 to 4096 pixels a side, e.g. 160x120")
    return int(match.group(1)), int(match.group(2))


class ServerProcess:
    """`serve` in a process of its own, as `livestyle serve` runs: its memory is its own
    (rss_mb), and the clients' codecs do not share its interpreter.

        with ServerProcess(short_side=64, max_sessions=8) as server:
            ... server.url, server.rss_mb() ...
    """

    def __init__(self, short_side: int = 256, device: str = "cpu", max_sessions: int = 4, port: int = 0,
                 echo=print):
        self.command = [sys.executable, __file__, "--serve", "--port", str(port), "--short-side", str(short_side),
                        "--device", device, "--sessions", str(max_sessions)]
        self.echo = echo
        self.process: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> ServerProcess:
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, text=True,
                                        env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            for line in self.process.stdout:  # two lines, then nothing: the pipe cannot fill up
                self.echo(f"server: {line.strip()}")
                if line.startswith("ready "):
                    self.url = line.split()[1]
                    return self
            raise RuntimeError(f"the server exited ({self.process.wait()}) before it was ready")
        except BaseException:
            self.__exit__()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mb(self) -> float:
        """The server's resident memory (VmRSS), MiB."""
        with open(f"/proc/{self.process.pid}/status") as status:
            kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
        return kib / 1024

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def measure(url: str, sessions: int, seconds: float, warmup: float, size: tuple[int, int],
                  codec: str | None) -> dict:
    import aiohttp

    from livestyle.capture.sources import SyntheticSource
    from livestyle.server.client import CameraClient, SyntheticTrack, pair_frames

    frames = [f.to_ndarray(format="rgb24") for f in SyntheticSource("coffee", size, fps=30, frames=60)]
    clients = [CameraClient(url, SyntheticTrack(frames, 30), codec=codec) for _ in range(sessions)]
    await asyncio.gather(*(c.connect() for c in clients))
    await asyncio.sleep(warmup)
    start = time.monotonic()
    counts = [c.receiver.frames for c in clients]
    await asyncio.sleep(seconds)
    end = time.monotonic()
    async with aiohttp.ClientSession() as http, http.get(f"{url}/stats") as response:
        stats = await response.json()
    latencies, fps, unmatched = [], [], 0
    for client, count in zip(clients, counts):
        fps.append((client.receiver.frames - count) / (end - start))
        pairs = pair_frames(client.track.sent, client.receiver.received)
        unmatched += len(client.receiver.received) - len(pairs)
        latencies += [received - sent for sent, received in pairs if start <= sent and received <= end]
    await asyncio.gather(*(c.close() for c in clients))
    server = stats["sessions"]
    latencies.sort()
    return {
        "sessions": sessions,
        "fps": statistics.median(fps),
        "latency_ms": 1e3 * statistics.median(latencies) if latencies else None,
        "latency_p90_ms": 1e3 * latencies[int(0.9 * (len(latencies) - 1))] if latencies else None,
        "server_ms": _median([s["latency_ms"] for s in server]),
        "model_ms": _median([s["model_ms"] for s in server]),
        "dropped": sum(s["dropped"] for s in server) / max(1, sum(s["frames_received"] for s in server)),
        "load": stats["engine"]["load"],
        "frames": len(latencies),
        "unmatched": unmatched,
        "processing": server[0]["settings"]["size"] if server else None,
    }


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per session count")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--size", type=camera_size, default="320x240", help="the clients' camera size, WxH")
    parser.add_argument("--short-side", type=int, default=256, help="the server's processing short side")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--codec", choices=("video/VP8", "video/H264"), help="default: aiortc's choice (VP8)")
    parser.add_argument("--port", type=int, default=0, help="the server's port (default: any free one)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.port, args.short_side, args.device, max(args.sessions))
        return 0

    failed = False
    with ServerProcess(args.short_side, args.device, max(args.sessions), args.port) as server:
        url = server.url
        print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, "
              f"clients send {args.size[0]}x{args.size[1]} at 30 fps"
              f"{', ' + args.codec if args.codec else ''}; {args.seconds:g} s measured after {args.warmup:g} s")
        print("| sessions | processing | fps per session | latency median (ms) | latency p90 (ms) | server ms "
              "| model ms | dropped | engine load |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for n in args.sessions:
            r = asyncio.run(measure(url, n, args.seconds, args.warmup, args.size, args.codec))
            w, h = r["processing"]
            print(f"| {n} | {w}x{h} | {r['fps']:.1f} | {_ms(r['latency_ms'])} | {_ms(r['latency_p90_ms'])} "
                  f"| {_ms(r['server_ms'])} | {_ms(r['model_ms'])} | {100 * r['dropped']:.0f}% | {r['load']:.2f} |",
                  flush=True)
            if r["latency_ms"] is None:
                print(f"  no frame came back within the {args.seconds:g} s measured: no latency (try --seconds)")
                failed = True
            if r["unmatched"]:
                print(f"  warning: {r['unmatched']} received frames could not be matched to a sent frame")
            time.sleep(1.0)  # let the server free the sessions
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
