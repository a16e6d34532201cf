"""The file path's I/O against the model: decoding + encoding per frame, and the whole run.

    python benchmarks/io_speed.py [--sizes 640x360 1280x720 1920x1080] [--frames 96] [--threads 2] [--device cuda]

For each input size, on a generated H.264 + AAC clip, with the demo model at its
default processing size (short side 256):

    decode  FileSource (demux, decode) and the reader's conversion to RGB at the
            processing size (one swscale pass), on one thread: ms per frame
    encode  the engine's output (processing size) through FileSink: scaled back to the
            input size and converted to yuv420p in one pass, H.264 CRF 18 at
            --encoder-preset, muxed: ms per frame
    model   the engine alone, fed frames at the processing size, outputs discarded:
            ms per frame (wall time per frame over the clip)
    run     the whole `livestyle run clip.mp4 -o out.mp4` path (reader, engine and
            writer threads): frames per second, against the model alone

The I/O is not the bottleneck when `run` reaches the model's frame rate. Decoding and
encoding run on their own threads, so on a GPU they overlap the model; on a CPU they
share its cores, which is what the `run` column shows.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from livestyle.capture.files import FileSource  # noqa: E402
from livestyle.capture.sinks import FileSink, VideoEncoding  # noqa: E402
from livestyle.capture.sources import SyntheticSource  # noqa: E402
from livestyle.capture.threads import Reader, Writer  # noqa: E402
from livestyle.config import DEFAULT_PRESET, StreamSettings, find_preset, processing_size  # noqa: E402
from livestyle.models.demo import load_demo  # noqa: E402
from livestyle.stream.engine import Engine  # noqa: E402


def make_clip(path: Path, size: tuple[int, int], frames: int, rate: int = 24) -> Path:
    """An H.264 (CRF 18) + AAC clip of the synthetic camera over a shipped image."""
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=rate, options={"crf": "18", "preset": "veryfast"})
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        audio = container.add_stream("aac", rate=48000)
        for frame in SyntheticSource("coffee", size, rate, frames):
            container.mux(video.encode(frame.reformat(format="yuv420p")))
        container.mux(video.encode(None))
        for start in range(0, round(frames / rate * 48000), 1024):
            tone = (0.2 * np.sin(np.arange(start, start + 1024) * 2 * np.pi * 440 / 48000)).astype(np.float32)
            chunk = av.AudioFrame.from_ndarray(np.stack([tone, tone]), format="fltp", layout="stereo")
            chunk.sample_rate, chunk.pts = 48000, start
            container.mux(audio.encode(chunk))
        container.mux(audio.encode(None))
    return path


def shrink(frame: av.VideoFrame, work: tuple[int, int]) -> av.VideoFrame:
    """What `livestyle run`'s reader does to each frame: to RGB at the processing size, one pass."""
    return frame.reformat(width=work[0], height=work[1], format="rgb24", interpolation="AREA")


def decode_ms(path: Path, work: tuple[int, int]) -> tuple[float, list[av.VideoFrame]]:
    """ms per frame to decode and bring to the processing size; the frames (pts kept)."""
    start = time.perf_counter()
    with FileSource(path) as source:
        small = [shrink(frame, work) for frame in source]
    return 1e3 * (time.perf_counter() - start) / len(small), small


def encode_ms(path: Path, size: tuple[int, int], small: list[av.VideoFrame], encoding: VideoEncoding) -> float:
    """ms per frame to scale the engine's output (processing size) to the input size and encode it."""
    start = time.perf_counter()
    with FileSink(path, size, small[0].time_base, 24, encoding) as sink:
        for frame in small:
            sink.write(frame)
    return 1e3 * (time.perf_counter() - start) / len(small)


def model_ms(engine: Engine, settings: StreamSettings, small: list[av.VideoFrame]) -> float:
    """ms per frame of the engine alone (frames already at the processing size)."""
    outputs = []
    stream = engine.open_stream(settings, on_output=outputs.append, live=False)
    for frame in small[:4]:  # warm-up
        stream.submit(frame)
    stream.flush()
    stream.reset()
    start = time.perf_counter()
    for frame in small:
        stream.submit(frame)
    stream.flush()
    elapsed = time.perf_counter() - start
    stream.close()
    return 1e3 * elapsed / len(small)


def run_fps(engine: Engine, settings: StreamSettings, clip: Path, out: Path, encoding: VideoEncoding) -> float:
    """Frames per second of the file path as `livestyle run` composes it."""
    with FileSource(clip) as source:
        info = source.info
        writer = Writer(FileSink(out, info.size, info.time_base, info.rate, encoding, source.audio))
        stream = engine.open_stream(settings, on_output=writer.put, live=False)
        start = time.perf_counter()
        reader = Reader(source.read(audio=True), lambda frame: stream.submit(shrink(frame, settings.size)),
                        writer.put_audio, pace=lambda frame: writer.wait_for_room(8)).start()
        reader.join()
        stream.flush()
        stream.close()
        writer.close()
        elapsed = time.perf_counter() - start
    if reader.error is not None:
        raise reader.error
    return writer.written / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["640x360", "1280x720", "1920x1080"])
    parser.add_argument("--frames", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="median of this many runs per figure")
    parser.add_argument("--preset", default=DEFAULT_PRESET)
    parser.add_argument("--encoder-preset", default="veryfast", help="x264 speed preset (as livestyle run)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    encoding = VideoEncoding(preset=args.encoder_preset)
    torch.set_num_threads(args.threads)
    preset = find_preset(args.preset)
    print(f"demo model, preset {preset.name}, {args.device}, {args.threads} torch threads, torch {torch.__version__}, "
          f"PyAV {av.__version__}, x264 {encoding.preset} CRF {encoding.crf}, "
          f"{platform.processor() or platform.machine()}; {args.frames}-frame clips, "
          f"median of {args.runs} runs")
    print("| input | processing | decode ms/frame | encode ms/frame | model ms/frame | I/O / model "
          "| run fps | model fps | run / model |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp, \
            Engine(lambda: load_demo(args.device, dtype), args.device, dtype) as engine:
        for text in args.sizes:
            size = tuple(int(v) for v in text.split("x"))
            work = processing_size(*size, 256)
            settings = StreamSettings.from_preset(preset, work)
            clip = make_clip(Path(tmp) / f"clip-{text}.mp4", size, args.frames)
            small = decode_ms(clip, work)[1]
            dec = statistics.median(decode_ms(clip, work)[0] for _ in range(args.runs))
            runs = range(args.runs)
            enc = statistics.median(encode_ms(Path(tmp) / "enc.mp4", size, small, encoding) for _ in runs)
            mod = statistics.median(model_ms(engine, settings, small) for _ in runs)
            fps = statistics.median(run_fps(engine, settings, clip, Path(tmp) / "run.mp4", encoding) for _ in runs)
            print(f"| {text} | {work[0]}x{work[1]} | {dec:.1f} | {enc:.1f} | {mod:.1f} | {(dec + enc) / mod:.2f} "
                  f"| {fps:.1f} | {1e3 / mod:.1f} | {fps * mod / 1e3:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
