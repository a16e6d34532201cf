"""Frames per second and latency of the streaming engine: per-frame vs stream batch vs temporal.

    python benchmarks/stream_speed.py                 # the demo model on the CPU
    python benchmarks/stream_speed.py --sd-turbo      # + SD-Turbo's architecture at 512x512 (CUDA only)

For each configuration a synthetic camera clip goes through `Engine`, in `--rounds`
round-robin rounds (medians):
- throughput: a file stream (every frame restyled), frames per second over the run,
  after a warm-up;
- live: the same clip paced at a camera's rate (`--live-fps`, or 80% of the measured
  throughput if that is lower), latest frame wins; the median latency from submit()
  to the restyled frame, and how many frames were dropped.

The SD-Turbo rows use random weights in SD-Turbo's shapes (SD 2.1 U-Net, 1024-d
context, TAESD): speed does not depend on the weights, and no checkpoint can be
downloaded here. They need CUDA; without it they are printed as "not measured".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import cv2
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from livestyle.capture.sources import SyntheticSource  # noqa: E402
from livestyle.config import StreamSettings, TemporalSettings  # noqa: E402
from livestyle.models.demo import load_demo  # noqa: E402
from livestyle.stream.engine import Engine  # noqa: E402

OFF = TemporalSettings.off()


def demo_configs(size: int) -> dict[str, StreamSettings]:
    base = StreamSettings(size=(size, size), temporal=OFF)
    return {
        "1 step, temporal off": base,
        "1 step, + cached attention": base.replace(temporal=TemporalSettings(flow=False)),
        "1 step, + cached attention and feature fusion": base.replace(
            temporal=TemporalSettings(flow=False, fusion=0.8)),
        "1 step, + flow-guided latents and output": base.replace(temporal=TemporalSettings(attention_frames=0)),
        "1 step, all temporal parts": base.replace(temporal=TemporalSettings()),
        "2 steps, per frame": base.replace(steps=2, stream_batch=False),
        "2 steps, stream batch": base.replace(steps=2),
        "3 steps, per frame": base.replace(steps=3, stream_batch=False),
        "3 steps, stream batch": base.replace(steps=3),
    }


def sd_turbo_pipeline(device: str, dtype: torch.dtype):
    """SD-Turbo's architecture (SD 2.1 U-Net, OpenCLIP-H-sized context, TAESD) with random weights."""
    from livestyle.models.clip import TextEncoder, TextEncoderConfig
    from livestyle.models.loading import NoiseSchedule, Pipeline, TextModel
    from livestyle.models.taesd import TinyAutoencoder
    from livestyle.models.tokenizer import Tokenizer
    from livestyle.models.unet import UNet, UNetConfig

    unet = UNet(UNetConfig(num_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True))
    text = TextEncoder(TextEncoderConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                         num_attention_heads=16, hidden_act="gelu"))
    pipe = Pipeline("sd2", unet, TinyAutoencoder(4), TextModel(text, Tokenizer.bundled(pad_token="!")),
                    NoiseSchedule(), Path("sd-turbo-architecture"))
    return pipe


def sd_configs() -> dict[str, StreamSettings]:
    base = StreamSettings(size=(512, 512), prompt="an oil painting", strength=0.5, temporal=OFF)
    return {
        "1 step, temporal off": base,
        "1 step, all temporal parts": base.replace(temporal=TemporalSettings()),
        "2 steps, per frame": base.replace(steps=2, stream_batch=False),
        "2 steps, stream batch": base.replace(steps=2),
        "4 steps, per frame": base.replace(steps=4, strength=1.0, stream_batch=False),
        "4 steps, stream batch": base.replace(steps=4, strength=1.0),
        "4 steps, stream batch, all temporal parts": base.replace(steps=4, strength=1.0, temporal=TemporalSettings()),
    }


def frames(size: int, n: int) -> list:
    return list(SyntheticSource("coffee", (size, size), 30, n))


def throughput(engine: Engine, settings: StreamSettings, clip: list, warmup: int) -> float:
    stream = engine.open_stream(settings, lambda f: None, live=False)
    for f in clip[:warmup]:
        stream.submit(f)
    stream.flush()
    start = time.perf_counter()
    for f in clip[warmup:]:
        stream.submit(f)
    stream.flush()
    fps = (len(clip) - warmup) / (time.perf_counter() - start)
    stream.close()
    return fps


def live(engine: Engine, settings: StreamSettings, clip: list, fps: float) -> tuple[float, float, int, int]:
    stream = engine.open_stream(settings, lambda f: None, live=True)
    period = 1.0 / fps
    start = time.perf_counter()
    for i, f in enumerate(clip):
        delay = start + i * period - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        stream.submit(f)
    stream.flush()
    stats = stream.stats()
    stream.close()
    return stats.latency_ms, stats.fps_out, stats.dropped, stats.latency_frames


def table(title: str, engine: Engine, configs: dict[str, StreamSettings], size: int, n: int,
          live_fps: float, rounds: int) -> None:
    """Each configuration `rounds` times, round-robin (so a slow spell of a shared machine
    hits every configuration alike); medians, with the throughput's range."""
    clip = frames(size, n)
    runs: dict[str, list] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, settings in configs.items():
            fps = throughput(engine, settings, clip, warmup=min(8, n // 4))
            pace = min(live_fps, 0.8 * fps)
            runs[name].append((fps, pace) + live(engine, settings, clip, pace))
    print(f"\n{title}, median of {rounds} rounds; the live run is paced at min({live_fps:g} fps, 80% of the "
          f"measured throughput), below what the engine keeps up with, so it shows latency, not drops")
    print("| configuration | throughput fps [min-max] | live: paced input fps | latency ms (median) | latency frames "
          "| dropped (paced below throughput) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, results in runs.items():
        fps = sorted(r[0] for r in results)
        pace, latency, dropped = (statistics.median(r[i] for r in results) for i in (1, 2, 4))
        print(f"| {name} | {statistics.median(fps):.1f} [{fps[0]:.1f}-{fps[-1]:.1f}] | {pace:.1f} | {latency:.0f} | "
              f"{results[0][5]} | {dropped:.0f}/{len(clip)} |", flush=True)


def many_streams(engine: Engine, settings: StreamSettings, size: int, n: int, counts=(1, 2, 4)) -> None:
    """Several file streams at once: total frames per second, batched into shared U-Net calls."""
    import threading

    print("\n| streams | total fps | fps per stream | U-Net calls per frame |")
    print("| --- | --- | --- | --- |")
    clip = frames(size, n)
    for count in counts:
        streams = [engine.open_stream(settings, lambda f: None, live=False) for _ in range(count)]
        batches, done = engine.batches, engine.frames
        start = time.perf_counter()
        threads = [threading.Thread(target=lambda s=s: [s.submit(f) for f in clip]) for s in streams]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for s in streams:
            s.flush()
        elapsed = time.perf_counter() - start
        calls = (engine.batches - batches) / max(engine.frames - done, 1)
        total = count * len(clip) / elapsed
        print(f"| {count} | {total:.1f} | {total / count:.1f} | {calls:.2f} |", flush=True)
        for s in streams:
            s.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="demo model processing size (square)")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--live-fps", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each configuration (medians)")
    parser.add_argument("--sd-turbo", action="store_true", help="also SD-Turbo's architecture at 512x512 (CUDA)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)  # as the livestyle command does (cli.main)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {args.threads} threads"
    print(f"livestyle engine, torch {torch.__version__}, {name}")
    with Engine(lambda: load_demo(device), device) as engine:
        table(f"demo model, {args.size}x{args.size}, {device}", engine, demo_configs(args.size), args.size,
              args.frames, args.live_fps, args.rounds)
        many_streams(engine, StreamSettings(size=(args.size, args.size)), args.size, args.frames // 2)
    if args.sd_turbo:
        if device != "cuda":
            print("\nSD-Turbo architecture, 512x512: not measured (no CUDA device)")
        else:
            dtype = torch.float16
            with Engine(lambda: sd_turbo_pipeline(device, dtype), device, dtype) as engine:
                table("SD-Turbo architecture (random weights), 512x512, fp16, cuda", engine, sd_configs(), 512,
                      args.frames, args.live_fps, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
