"""The `livestyle` command. The only place that sets process-wide state (logging, torch flags).

    livestyle run INPUT [-o OUTPUT] [--preset NAME|FILE] ...   restyle a camera, file, stream or folder
    livestyle presets [show NAME]                              the presets, or one of them
    livestyle info                                             versions, devices, where things are looked for
    livestyle inspect PATH                                     what a checkpoint holds

Errors meant for the user (LivestyleError) are printed as one line on stderr with a
non-zero exit status and no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import logging
import math
import os
import platform
import re
import signal
import sys
import threading
import time
from pathlib import Path

from livestyle import __version__
from livestyle.config import DEFAULT_PRESET, WARPS
from livestyle.errors import LivestyleError

log = logging.getLogger("livestyle")

OPEN_TIMEOUT_S = 10.0  # network sources: the default of --timeout
TEST_SECONDS = 4.0  # the length of the test: clip unless --seconds says otherwise
FILE_BACKLOG = 8  # frames the file encoder may fall behind before the reader waits
LIVE_SINKS = ("vcam", "window")
MAX_INPUT_SIDE = 8192  # --input-size: 8K is the largest camera or test: frame worth asking for
MAX_UPSCALE = 2  # an explicit --size may be at most this many times the input on a side
# Memory a processing pixel costs the demo model's engine at fp32 (activations, latents,
# flow and frame copies), rounded up from the peak RSS of `livestyle run test:` at equal
# --input-size and --size on the 2-core CPU: 329, 374, 637 and 1039 MB at 64, 512, 1024
# and 2048 px square, so 335 B/px between 512 and 1024 and 170 B/px from 64 to 2048.
BYTES_PER_PIXEL = 400
NO_DEMO_CONTROLS = ("the demo model takes no ControlNets (--control, a preset's [[control]]); use an SD or SDXL "
                    "checkpoint (--model)")
# `livestyle bench` runs the suite of a source checkout (an editable install is one).
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the run stops reading, and what was read is restyled and written."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _count(module) -> str:
    n = sum(p.numel() for p in module.parameters())
    return f"{n / 1e6:.1f}M parameters" if n >= 1e5 else f"{n} parameters"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# -- info, presets, inspect -----------------------------------------------------------------

def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from livestyle.capture.camera import camera_help
    from livestyle.capture.window import display_problem
    from livestyle.config import BUILTIN_PRESETS, find_model, model_names, models_dir, preset_files, user_preset_dir
    from livestyle.models.demo import DEMO_MODEL

    opencv = next((v for v in map(_version, ("opencv-python", "opencv-python-headless", "opencv-contrib-python"))
                   if v != "not installed"), "not installed")
    print(f"livestyle    {__version__}")
    print(f"python       {platform.python_version()} ({platform.platform()})")
    print(f"torch        {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else ""))
    for name, dist in (("triton", "triton"), ("av", "av"), ("aiortc", "aiortc"), ("aiohttp", "aiohttp"),
                       ("pyvirtualcam", "pyvirtualcam"), ("numpy", "numpy")):
        print(f"{name:12} {_version(dist)}")
    print(f"opencv       {opencv}")
    print(f"devices      cpu ({os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads)")
    cuda = torch.cuda.is_available()
    for i in range(torch.cuda.device_count() if cuda else 0):
        props = torch.cuda.get_device_properties(i)
        print(f"             cuda:{i} {props.name}, {props.total_memory / 2**30:.0f} GiB")
    from livestyle import kernels

    try:
        print(f"kernels      {kernels.describe('cuda' if cuda else 'cpu')}")
    except LivestyleError as e:  # a bad LIVESTYLE_KERNELS: info is where one looks for it
        print(f"kernels      {e}")
    user_dir = user_preset_dir()
    files = preset_files()
    print(f"presets      {BUILTIN_PRESETS} (built-in)")
    print(f"             {user_dir} (user{'' if user_dir.is_dir() else ', not created yet'}); "
          f"{len(files)} presets: {', '.join(files)}")
    source = "$LIVESTYLE_MODELS" if os.environ.get("LIVESTYLE_MODELS") else "default; set LIVESTYLE_MODELS to move it"
    names = model_names()
    nets = [name for name in names if _is_controlnet(find_model(name))]
    models = [name for name in names if name not in nets]
    print(f"models       {models_dir()} ({source}): {', '.join(models) if models else 'none'}")
    if nets:
        print(f"controlnets  {', '.join(nets)} (there too: --control INPUT=NAME)")
    print(f"demo model   {DEMO_MODEL}" + ("" if (DEMO_MODEL / "model_index.json").is_file() else " (missing!)"))
    print(f"cameras      {camera_help()}")
    vcam = _version("pyvirtualcam")
    print("vcam         " + (f"pyvirtualcam {vcam}" if vcam != "not installed"
                              else 'not installed (pip install "livestyle[vcam]")'))
    print(f"window       {display_problem() or 'available'}")
    return 0


def _is_controlnet(path: Path) -> bool:
    """Does `path` hold a ControlNet (read from its config or its file's header, not its weights)?"""
    import json

    from livestyle.models.checkpoint import classify, read_header

    try:
        if path.is_dir():
            config = path / "config.json"
            return config.is_file() and json.loads(config.read_text())["_class_name"] == "ControlNetModel"
        return classify(read_header(path).keys())[0] == "controlnet"
    except (OSError, ValueError, KeyError, TypeError, LivestyleError):  # unreadable or not ours: listed as a model
        return False


def cmd_presets(args: argparse.Namespace) -> int:
    """List the presets (built-in, then user ones), or print one with `show NAME`."""
    from livestyle.config import PresetError, find_preset, load_preset, preset_files, preset_origin

    if args.action == "show":
        preset = find_preset(args.name)  # checks it, and names the file if it is broken
        path = Path(args.name) if args.name.endswith(".toml") or os.sep in args.name else preset_files()[args.name]
        print(f"# {preset.name} ({preset_origin(path)}: {path})")
        print(path.read_text(encoding="utf-8").rstrip())
        return 0
    rows = []
    for name, path in preset_files().items():
        try:
            preset = load_preset(path)
        except PresetError as e:
            rows.append((name, preset_origin(path), "-", f"(broken: {e})"))
            continue
        look = f"style {preset.style}" if preset.style else f"prompt {preset.prompt!r}"
        if preset.controls:
            look += f", {len(preset.controls)} ControlNet{'s' * (len(preset.controls) > 1)}"
        rows.append((name, preset_origin(path), preset.model, f"{look}; {preset.description}"))
    width = max(len(r[0]) for r in rows)
    for name, origin, model, text in rows:
        print(f"{name:{width}}  {origin:8}  {model:6}  {text}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Load a checkpoint the way `run` will, and say what it holds."""
    from livestyle.errors import CheckpointError
    from livestyle.models import load_autoencoder, load_pipeline
    from livestyle.models.checkpoint import classify, read_header
    from livestyle.models.loading import describe_controlnet

    path = Path(args.path)
    if args.path == "demo" and not path.exists():  # the name `run --model demo` takes
        from livestyle.models.demo import DEMO_MODEL

        path = DEMO_MODEL
    dtype = _torch_dtype(args.dtype)
    if (controlnet := describe_controlnet(path, dtype)) is not None:
        print(controlnet)
        return 0
    if path.is_file():
        kind, what = classify(read_header(path).keys())
        if kind == "unsupported":
            raise CheckpointError(f"{path}: this looks like {what}")
        if kind != "pipeline":  # one component on its own: say what it is
            print(f"{path}: {what}")
            if kind == "autoencoder":
                vae = load_autoencoder(path, dtype=dtype)
                guide = ", its decoder reads the input frame" if vae.guided else ""
                print(f"  autoencoder  {type(vae).__name__}, {vae.latent_channels} latent channels, {_count(vae)}{guide}")
            return 0
    pipe = load_pipeline(path, dtype=dtype, autoencoder=args.autoencoder,
                         loras=tuple((p, args.lora_scale) for p in args.lora))
    unet = pipe.unet.config
    print(f"{path}: {pipe.family.upper()} pipeline, prediction {pipe.schedule.prediction_type}")
    print(f"  unet         {_count(pipe.unet)}, channels {unet.block_out_channels}, "
          f"context {unet.cross_attention_dim}")
    vae_dtype = next(pipe.autoencoder.parameters()).dtype
    print(f"  autoencoder  {type(pipe.autoencoder).__name__}, {pipe.autoencoder.latent_channels} latent channels, "
          f"{_count(pipe.autoencoder)}{', kept in fp32 (fp16 overflows it)' if vae_dtype != dtype else ''}"
          f"{', its decoder reads the input frame' if pipe.autoencoder.guided else ''}")
    for name, text in (("text", pipe.text), ("text_2", pipe.text_2)):  # SDXL has two encoders
        if text is not None:
            text_cfg = text.encoder.config
            pooled = f", pooled projection {text_cfg.projection_dim}-d" if text_cfg.projection_dim else ""
            print(f"  {name:<12} {_count(text.encoder)}, {text_cfg.num_hidden_layers} transformer layers, "
                  f"{text_cfg.hidden_size}-d{pooled}")
    if pipe.styles is not None:
        print(f"  styles       {', '.join(pipe.styles.names)} ({pipe.styles.tokens} tokens x {pipe.styles.dim})")
    return 0


# -- run ------------------------------------------------------------------------------------

def _output_target(args: argparse.Namespace, preset_name: str) -> tuple[str, str | None]:
    """(kind, where) for -o: ("file", path), ("images", pattern), ("vcam", device or None) or
    ("window", None). Without -o: a camera previews in a window, test: writes livestyle-demo.mp4,
    anything else writes NAME.PRESET.mp4 next to the input (URLs: in the current folder)."""
    from livestyle.capture.folder import is_sequence_pattern
    from livestyle.capture.sources import camera_index, is_url

    out, spec = args.output, args.input
    if out is None:
        if spec.startswith("test:"):
            out = "livestyle-demo.mp4"
        elif camera_index(spec) is not None:
            out = "window"
        elif is_url(spec):
            out = f"{Path(spec.split('?')[0]).stem or 'stream'}.{preset_name}.mp4"
        elif any(c in spec for c in "*?["):  # a glob: beside the folder it looks in
            out = str(Path(spec).parent / f"images.{preset_name}.mp4")
        else:  # a file, or a folder of images: beside it
            path = Path(spec.rstrip("/\\"))
            out = str(path.with_name(f"{path.stem if path.is_file() else path.name}.{preset_name}.mp4"))
    if out == "window":
        return "window", None
    if out == "vcam" or out.startswith("vcam:"):
        return "vcam", out[5:] or None
    if is_sequence_pattern(out):
        try:
            first = out % 1
        except (TypeError, ValueError):
            raise LivestyleError(f"-o {out}: a numbered-image pattern holds one %d (e.g. frames/%05d.png) "
                                 "and no other % field (write %% for a percent sign)") from None
        _refuse_overwriting_input(spec, [first], out)
        return "images", out
    if Path(out).is_dir():
        raise LivestyleError(f"-o {out}: is a folder; name a file in it (e.g. {Path(out) / 'out.mp4'}) "
                             "or numbered images (frames/%05d.png)")
    _refuse_overwriting_input(spec, [out], out)
    return "file", out


def _refuse_overwriting_input(spec: str, outputs: list[str], given: str) -> None:
    """Refuse an output that is the input, or one of its images, under any name: the same
    file through a symlink, a hard link or another spelling of the path (st_dev + st_ino)."""
    from livestyle.capture.folder import list_images
    from livestyle.capture.sources import is_url

    if is_url(spec) or spec.startswith(("test:", "cam:")):
        return
    inputs = list_images(spec) if any(c in spec for c in "*?[") or Path(spec).is_dir() else [Path(spec)]
    existing = [Path(o) for o in outputs if Path(o).exists()]
    for out in existing:
        for path in inputs:
            try:
                same = os.path.samefile(out, path)
            except OSError:
                continue
            if same:
                raise LivestyleError(f"-o {given}: {out} is the input {path} (the same file): writing it "
                                     "would destroy the input; choose another output")


def _make_folder(folder: Path) -> list[Path]:
    """Create `folder` and any missing parents (as `mkdir -p`); returns the folders made,
    deepest first, so a run that wrote nothing can take them away again."""
    made = []
    if folder.exists() and not folder.is_dir():
        raise LivestyleError(f"cannot create the output folder {folder}: a file of that name is there")
    while not folder.exists():
        made.append(folder)
        folder = folder.parent
    for path in reversed(made):
        try:
            path.mkdir()
        except OSError as e:
            raise LivestyleError(f"cannot create the output folder {path} ({e.strerror})") from None
    return made


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # something was written in it: keep it
            return


def _open_sink(kind: str, where: str | None, source, args: argparse.Namespace):
    info = source.info
    if kind == "file":
        from livestyle.capture.sinks import FileSink, VideoEncoding

        encoding = VideoEncoding(codec=args.codec, crf=args.crf, bitrate=args.bitrate, preset=args.encoder_preset)
        audio = None if args.no_audio else getattr(source, "audio", None)
        return FileSink(where, info.size, info.time_base, info.rate, encoding, audio)
    if kind == "images":
        from livestyle.capture.folder import ImageSequenceSink

        return ImageSequenceSink(where, info.size)
    if kind == "vcam":
        from livestyle.capture.vcam import VirtualCameraSink

        return VirtualCameraSink(info.size, info.rate, where)
    from livestyle.capture.window import WindowSink

    return WindowSink(info.size, side_by_side=args.side_by_side)


def _device(args: argparse.Namespace):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no device found"
        raise LivestyleError(f"--device {device}: CUDA is not available here (torch {torch.__version__}, {build})")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise LivestyleError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if device == "mps" and not torch.backends.mps.is_available():
        raise LivestyleError("--device mps: Metal (MPS) is not available here")
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    return device, _torch_dtype(dtype)


def check_acceleration(args: argparse.Namespace, device: str) -> None:
    """--cuda-graphs needs CUDA: refused in one line before anything opens (run and serve)."""
    if args.cuda_graphs and not device.startswith("cuda"):
        raise LivestyleError(f"--cuda-graphs: CUDA graphs need a CUDA device, not {device}")


def _acceleration(stats: dict) -> str:
    """', step compiled Nx, N CUDA graphs' for the summary line, when there were any."""
    return (f", step compiled {stats['compiles']}x" if stats["compiles"] else "") + \
        (f", {stats['captures']} CUDA graphs" if stats["captures"] else "")


def add_acceleration(group) -> None:
    """--compile and --cuda-graphs (run and serve)."""
    group.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                       help="torch.compile the engine's fixed-shape step (BACKEND default inductor); "
                            "it compiles at the first frames, once per bucket size")
    group.add_argument("--cuda-graphs", action="store_true",
                       help="capture the fixed-shape step in CUDA graphs (CUDA only)")


def control(text: str):
    """`--control INPUT=NET[@SCALE]` -> config.Control, for argparse (run and serve).

    The text after the last @ is the scale when it holds no path separator (a path such
    as ~/nets/v@2/cn keeps its @); without one the scale is 1."""
    from livestyle.config import Control, SettingsError

    kind, eq, rest = text.partition("=")
    if not eq or not kind.strip() or not rest.strip():
        raise argparse.ArgumentTypeError(f"control {text!r} is not INPUT=NET[@SCALE], e.g. canny=cn-canny@0.8")
    net, at, scale = rest.rpartition("@")
    if not at or "/" in scale or os.sep in scale:
        net, scale = rest, "1"
    try:
        value = float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"control {text!r}: scale {scale!r} is not a number "
                                         "(INPUT=NET[@SCALE], e.g. canny=cn-canny@0.8)") from None
    try:
        return Control(net=net.strip(), input=kind.strip(), scale=value)
    except SettingsError as e:
        raise argparse.ArgumentTypeError(f"control {text!r}: {e}") from None


def add_controls(group, more: str = "") -> None:
    """--control (run and serve); `more` ends its help."""
    group.add_argument("--control", type=control, action="append", metavar="INPUT=NET[@SCALE]",
                       help="a ControlNet (repeatable, up to 4; replaces the preset's): INPUT is what it sees: "
                            "canny, soft_edges (edges of the input), temporalnet (the previous output) or "
                            "depth:NAME; NET a ControlNet folder, .safetensors file or a name under "
                            "$LIVESTYLE_MODELS; SCALE its strength, 0 to 2 (default 1), e.g. "
                            "--control canny=~/models/cn-canny@0.8 (start and end steps: a preset's [[control]])"
                            + more)


def _settings(args: argparse.Namespace, preset, size: tuple[int, int]):
    """The stream's settings: the preset's look, then each flag given on top."""
    from livestyle.config import StreamSettings, TemporalSettings

    on = preset.temporal if args.temporal is None else args.temporal
    temporal = TemporalSettings() if on else TemporalSettings.off()
    finer = {"attention_frames": args.cache_frames, "fusion": args.fusion, "flow": args.flow,
             "flow_blend": args.flow_blend, "output_blend": args.output_blend, "similarity": args.skip_similar,
             "warp": args.warp}
    temporal = dataclasses.replace(temporal, **{k: v for k, v in finer.items() if v is not None})
    changes = {"style": args.style, "prompt": args.prompt, "negative": args.negative, "strength": args.strength,
               "steps": args.steps, "seed": args.seed, "guidance": args.guidance,
               "guidance_scale": args.guidance_scale, "timesteps": args.timesteps}
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.no_stream_batch:
        changes["stream_batch"] = False
    if args.control:
        changes["controls"] = tuple(args.control)
    return StreamSettings.from_preset(preset, size, temporal=temporal, **changes)


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """On stderr, when it is a terminal: a progress bar for files (frames, fps, ETA) or a
    live status line for cameras and streams (fps in and out, latency, dropped frames)."""

    def __init__(self, total: int | None, live: bool, out=None, every: float = 0.25):
        self.total, self.live, self.out, self.every = total, live, out or sys.stderr, every
        self.enabled = self.out.isatty()
        self.start = time.monotonic()
        self.shown = 0.0

    def line(self, done: int, stats, dropped: int) -> str:
        elapsed = time.monotonic() - self.start
        failed = f"  failed {stats.errors}" if stats.errors else ""
        if self.live:
            return (f"in {stats.fps_in:5.1f} fps  out {stats.fps_out:5.1f} fps  latency {stats.latency_ms:4.0f} ms  "
                    f"dropped {dropped}{failed}  frames {done}  (Ctrl-C to stop)")
        fps = done / elapsed if elapsed > 0 else 0.0
        if not self.total:
            return f"{done} frames  {fps:5.1f} fps  {_clock(elapsed)}{failed}"
        share = min(done / self.total, 1.0)
        bar = "=" * int(24 * share) + ">" * (share < 1) + " " * (24 - int(24 * share) - (share < 1))
        eta = _clock((self.total - done) / fps) if fps > 0 else "?"
        return f"{100 * share:3.0f}% [{bar}] {done}/{self.total} frames  {fps:5.1f} fps  ETA {eta}{failed}"

    def update(self, done: int, stats, dropped: int) -> None:
        now = time.monotonic()
        if self.enabled and now - self.shown >= self.every:
            self.shown = now
            self.out.write("\r" + self.line(done, stats, dropped) + "\x1b[K")
            self.out.flush()

    def finish(self) -> None:
        if self.enabled and self.shown:
            self.out.write("\n")
            self.out.flush()


def _pump(reader, stream, writer, window, progress: Progress) -> int | None:
    """Wait for the run to end, keeping the window and the progress line alive (main thread).

    Returns None when the input ran to its end, 0 when the preview window was closed, or
    the signal that stopped it (SIGINT for Ctrl-C, SIGTERM). Everything read so far is
    still restyled and written.
    """
    stopped = None
    try:
        while not reader.join(0.01 if window is not None else 0.1):
            if window is not None and not window.pump():
                reader.stop()
                stopped = 0
            if writer.error is not None:
                reader.stop()
            stats = stream.stats()
            progress.update(writer.written, stats, stats.dropped + writer.dropped)
        stream.flush()
    except KeyboardInterrupt as e:
        stopped = getattr(e, "signum", signal.SIGINT)
        reader.stop()
        reader.join(reader.timeout + 2)  # a network read in hand ends within its timeout
        stream.flush(timeout=10.0)
    progress.finish()
    return stopped


class _HeldBack(logging.Filter):
    """Holds back the per-frame warnings of the engine and the sinks during a file run, so
    that a run with failed frames ends in one line that counts them and quotes the first
    (a live run, watched as it goes, logs each as it happens)."""

    def __init__(self):
        super().__init__()
        self.first: str | None = None
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        self.first = self.first or record.getMessage()
        self.count += 1
        return False

    @contextlib.contextmanager
    def over(self, *prefixes: str):
        loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
                   if name.startswith(prefixes)]
        for logger in loggers:
            logger.addFilter(self)
        try:
            yield self
        finally:
            for logger in loggers:
                logger.removeFilter(self)


def _free_memory(device: str) -> int | None:
    """Bytes the device can still give, or None where that cannot be told."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    if device == "cpu":
        try:
            with open("/proc/meminfo") as f:
                fields = dict(line.split(":", 1) for line in f)
            return int(fields["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def _check_size(size: tuple[int, int], explicit: bool, info, device: str, dtype) -> None:
    """Refuse a processing size the device cannot hold, or one far beyond the input, before
    anything is allocated. The estimate is the demo model's, measured (BYTES_PER_PIXEL): a
    floor for the wider SD U-Nets, which fail later with the device's own out-of-memory error."""
    import torch

    w, h = size
    iw, ih = info.size
    if explicit and (w > MAX_UPSCALE * iw or h > MAX_UPSCALE * ih):
        most = f"{min(w, MAX_UPSCALE * iw // 8 * 8)}x{min(h, MAX_UPSCALE * ih // 8 * 8)}"
        raise LivestyleError(f"--size {w}x{h}: more than {MAX_UPSCALE}x the input's {iw}x{ih} on a side, which "
                             f"adds no detail at {w * h / (iw * ih):.0f}x the cost of the input's size "
                             f"(use --size {most} or smaller" + (", or a larger --input-size)" if
                                                                  info.name.startswith("test:") else ")"))
    need = w * h * BYTES_PER_PIXEL // (2 if dtype in (torch.float16, torch.bfloat16) else 1)
    free = _free_memory(device)
    if free is not None and need > free:
        raise LivestyleError(f"--size {w}x{h}: needs at least {need / 2**30:.1f} GiB on {device}, "
                             f"{free / 2**30:.1f} GiB is free; use a smaller --size")


def cmd_run(args: argparse.Namespace) -> int:
    """Restyle INPUT into OUTPUT with a preset; prints what was done and the frame rate reached.

    Exit status: 0 when every frame came out; 1 when any frame failed (the engine's error
    count, or damaged input that was skipped): the frames that came out are kept and one
    line says how many failed; 2 for an error that ended the run; 128 + the signal (130
    for Ctrl-C, 143 for SIGTERM) when a file run was stopped (what was done is kept).
    """
    import torch

    from livestyle.capture.sources import open_source
    from livestyle.capture.threads import Reader, RealTime, Writer
    from livestyle.config import MIN_SIDE, find_model, find_preset
    from livestyle.models import load_pipeline
    from livestyle.models.demo import load_demo
    from livestyle.stream import precision
    from livestyle.stream.engine import Engine

    preset = find_preset(args.preset)
    model = args.model or preset.model
    model_path = None if model == "demo" else find_model(model)  # a missing model fails before anything opens
    if args.threads is None and model == "demo":
        from livestyle import threads

        # The demo model's short operations gain less from a second thread than waking it costs
        # (threads.py: 1.33x quiet, 1.21x beside a busy process on one thread of two).
        torch.set_num_threads(threads.default_threads(small_model=True))
    device, dtype = _device(args)
    check_acceleration(args, device)
    from livestyle import kernels

    kernels.use(args.kernels, device)  # --kernels triton where it cannot run fails here, not on every frame
    look = _settings(args, preset, args.size or (256, 256))  # the look's values, checked before anything opens
    if model_path is None and look.controls:
        raise LivestyleError(NO_DEMO_CONTROLS)
    made: list[Path] = []
    held_back = _HeldBack()
    try:
        with contextlib.ExitStack() as stack:
            source = stack.enter_context(open_source(args.input, args.input_size, args.fps,
                                                     args.seconds or TEST_SECONDS, args.timeout))
            info = source.info
            if min(info.size) < MIN_SIDE:
                raise LivestyleError(f"{args.input}: {info.size[0]}x{info.size[1]} frames are too small to "
                                     f"restyle (at least {MIN_SIDE} px on a side)")
            # The look is checked before anything is written; the size is settled once the model is known.
            _check_size(args.size or _auto_size(info.size, model_path is None), args.size is not None, info,
                        device, dtype)
            settings = _settings(args, preset, args.size or _auto_size(info.size, model_path is None))
            kind, where = _output_target(args, preset.name)
            if kind not in LIVE_SINKS and not info.live and not args.verbose:
                stack.enter_context(held_back.over("livestyle.stream", "livestyle.capture"))
            if kind in ("file", "images"):
                made = _make_folder(Path(where).parent)
            sink = _open_sink(kind, where, source, args)
            writer = Writer(sink, latest_only=kind in LIVE_SINKS)
            stack.callback(writer.close)  # last out: the file is finished whatever happens after this
            # The engine's worker loads the model: all torch work stays on one thread (see Engine).
            def load():
                return load_demo(device, dtype) if model_path is None else load_pipeline(model_path, device, dtype)

            engine = stack.enter_context(Engine(load, device=device, dtype=dtype, compile=args.compile,
                                                cuda_graphs=args.cuda_graphs,
                                                channels_last=precision.configure(device, dtype)))
            pipe = engine.pipe
            settings = settings.replace(size=args.size or _auto_size(info.size, pipe.family == "demo"))
            if pipe.family != "demo" and not settings.prompt:
                raise LivestyleError(f"preset {preset.name}: an SD checkpoint needs a prompt "
                                     '(pass --prompt "..." or use a preset with prompt = "...")')
            # A file played to a window or virtual camera runs at its own speed, like a player.
            live = info.live or kind in LIVE_SINKS
            stream = engine.open_stream(settings, on_output=writer.put, live=live)
            stack.callback(stream.close)
            window = sink if kind == "window" else None
            pace = RealTime() if kind in LIVE_SINKS and not info.live else None

            def wait_for_encoder(frame):  # files: every frame is kept, so the reader waits for a slow encoder
                writer.wait_for_room(FILE_BACKLOG)

            w, h = settings.size

            def on_frame(frame):
                if window is not None:
                    window.remember_input(frame)
                # Down to the processing size here, in one pass with the colour conversion, so the
                # engine's worker neither converts nor scales; the sinks scale back to the input size.
                stream.submit(frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA"))

            audio = kind == "file" and getattr(sink, "audio_out", None) is not None
            items = source.read(audio=True) if audio else iter(source)
            seconds = args.seconds if not args.input.startswith("test:") else None
            total = info.frames
            if seconds and info.rate:
                total = min(total or 10**9, round(seconds * info.rate))
            progress = Progress(total, live=info.live)
            reader = Reader(items, on_frame, writer.put_audio if audio else None, seconds,
                            pace if kind in LIVE_SINKS else wait_for_encoder, timeout=args.timeout).start()
            began = time.perf_counter()
            stopped = _pump(reader, stream, writer, window, progress)
            elapsed = time.perf_counter() - began
            stats, engine_stats = stream.stats(), engine.stats()
            load = engine_stats["load"]
            if reader.error is not None:
                raise reader.error
    finally:
        _remove_if_empty(made)  # folders made for an output that was not written (kept if anything is in them)
    # Here the stream, the engine and the writer are closed: the output is complete.
    target = {"vcam": f"virtual camera {getattr(sink, 'device', '')}".rstrip(), "window": "the window"}.get(kind, where)
    audio_note = f", audio {'copied' if sink.audio_copy else 're-encoded'}" if audio else ""
    print(f"restyled {writer.written} frames ({info.size[0]}x{info.size[1]}) -> {target} with "
          f"{_describe(preset.name, pipe.family, device, settings)}{audio_note}")
    dropped = stats.dropped + writer.dropped
    damaged = getattr(source, "damaged", 0)
    refused = getattr(sink, "dropped", 0) if kind == "file" else 0
    audio_lost = getattr(source, "audio_lost", False) and kind == "file" and not args.no_audio
    losses = (f"; {dropped} frames dropped" if dropped else "") + (f"; {stats.errors} failed" if stats.errors else "")
    print(f"{writer.written / elapsed:.1f} fps overall; U-Net {stats.model_ms:.1f} ms/frame, host "
          f"{engine_stats['host_ms_mean']:.1f} ms/frame, engine busy {100 * load:.0f}% of the last 2 s, "
          f"{torch.get_num_threads()} threads{_acceleration(engine_stats)}{losses}")
    file_run = kind not in LIVE_SINKS and not info.live
    if stopped and file_run:  # Ctrl-C (or SIGTERM) is how a camera recording ends, not a failure
        print(f"livestyle: stopped early; {where} holds the {writer.written} frames done", file=sys.stderr)
        return 128 + stopped
    if stats.errors or damaged or refused or audio_lost:
        parts = ([f"{stats.errors} of {stats.frames_in} frames failed in the model"] if stats.errors else []) + \
                ([f"{damaged} frames of {args.input} could not be read (damaged or cut short)"] if damaged else []) + \
                ([f"{refused} frames with a timestamp not after the previous one were left out"] if refused else []) + \
                ([f"the audio of {args.input} could not be read (damaged header?)"] if audio_lost else [])
        first = f" (first: {held_back.first[:200]})" if held_back.first else ""
        kept = f"{target} holds {writer.written} frames" if writer.written else "nothing was written"
        print(f"livestyle: error: {'; '.join(parts)}{first}; {kept}", file=sys.stderr)
        return 1
    if held_back.first:  # warnings that lost no frame are still said, once
        more = f" ({held_back.count - 1} more like it; -v shows each)" if held_back.count > 1 else ""
        print(f"livestyle: warning: {held_back.first[:200]}{more}", file=sys.stderr)
    return 0


def _auto_size(size: tuple[int, int], demo: bool) -> tuple[int, int]:
    """The processing size for a (width, height) input when --size is not given.

    The demo model works at a 256 short side whatever the source (a 176x144 webcam would
    otherwise leave it a 22x18 latent); SD checkpoints take the short side up to 512 and
    never upscale.
    """
    from livestyle.config import processing_size
    from livestyle.models.demo import demo_processing_size

    return demo_processing_size(*size) if demo else processing_size(*size, min(512, *size))


def _describe(preset: str, family: str, device: str, settings) -> str:
    """The look and the model in a few words, for the summary line."""
    from livestyle.config import control_names

    w, h = settings.size
    t = settings.temporal
    temporal = ", ".join(([f"cache {t.attention_frames} frames"] if t.attention_frames else [])
                         + (["flow"] if t.flow else []) + ([f"skip similar {t.similarity}"] if t.similarity else []))
    controls = ", ".join(f"{c.input} {name} at {c.scale:g}"
                         for c, name in zip(settings.controls, control_names(settings.controls)))
    return (f"preset {preset}: {family} model on {device} at {w}x{h}, strength {settings.strength}, "
            f"{settings.steps} step{'s' * (settings.steps > 1)}, temporal {temporal or 'off'}"
            + (f", ControlNet {controls}" if controls else ""))


def _size(text: str, largest: int = MAX_INPUT_SIDE) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WxH, e.g. 256x256") from None
    if not (0 < w <= largest and 0 < h <= largest):
        raise argparse.ArgumentTypeError(f"size {text}: width and height must be 1 to {largest}")
    return w, h


def _processing_size(text: str) -> tuple[int, int]:
    from livestyle.config import MAX_SIDE, MIN_SIDE

    w, h = _size(text, largest=10**9)
    if not (MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE) or w % 8 or h % 8:
        raise argparse.ArgumentTypeError(f"size {text}: width and height must be multiples of 8 from {MIN_SIDE} "
                                         f"to {MAX_SIDE}")
    return w, h


def _number(text: str, what: str, low: float, high: float, low_open: bool = False) -> float:
    """A finite float in [low, high] (or (low, high] with low_open), for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} {text!r} is not a number") from None
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        raise argparse.ArgumentTypeError(f"{what} {text}: must be {'more than' if low_open else 'from'} "
                                         f"{low:g} {'and at most' if low_open else 'to'} {high:g}")
    return value


def _fps(text: str) -> float:
    return _number(text, "fps", 1, 1000)


def _seconds(text: str) -> float:
    return _number(text, "seconds", 0, 10**7, low_open=True)


def _timeout(text: str) -> float:
    return _number(text, "timeout", 0, 3600, low_open=True)


def _timesteps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"timesteps {text!r}: comma-separated integers, e.g. 999,749") from None


def _bitrate(text: str) -> int:
    scale = {"k": 10**3, "m": 10**6}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"bitrate {text!r}: bits per second, e.g. 4M or 800k") from None
    if not math.isfinite(value) or not 1000 <= value <= 10**9:
        raise argparse.ArgumentTypeError(f"bitrate {text}: must be 1k to 1000M bits per second")
    return round(value)


def _device_name(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d{1,2})?|mps", text):
        raise argparse.ArgumentTypeError(f"device {text!r}: cpu, cuda, cuda:N or mps")
    return text


def _threads(text: str) -> int:
    from livestyle.threads import MAX_THREADS

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"threads {text!r} is not a whole number") from None
    if not 1 <= n <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"threads {n}: must be 1 to {MAX_THREADS}")
    return n


def _add_threads(parser) -> None:
    parser.add_argument("--threads", type=_threads,
                        help="CPU threads for torch (default: one per CPU this process may use; idle threads "
                             "sleep instead of spinning, so a busy machine slows it gracefully)")


def _add_kernels(parser) -> None:
    parser.add_argument("--kernels", choices=("auto", "triton", "torch"),
                        help="fused kernels: triton, the torch reference, or auto = Triton on cuda "
                             "(default: $LIVESTYLE_KERNELS, else auto)")


def _bench_suite():
    """benchmarks/suite.py of the source checkout, or None where livestyle was installed without one."""
    path = BENCHMARKS / "suite.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("livestyle_bench_suite", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # stdlib and livestyle.threads only: no torch until it runs
    return module


def _add_bench(sub) -> None:
    help = "livestyle against diffusers and StreamDiffusion on this machine"
    suite = _bench_suite()
    if suite is None:  # every word, options too, lands in `rest`: cmd_bench says why it cannot run
        bench = sub.add_parser("bench", help=help, prefix_chars="\0", add_help=False)
        bench.add_argument("rest", nargs="*")
    else:
        bench = sub.add_parser("bench", help=help, description="Benchmarks in one run, round-robin, medians with "
                               "min-max (benchmarks/suite.py; the peers: pip install -e \".[bench]\").")
        suite.add_arguments(bench)
        _add_threads(bench)
        _add_kernels(bench)
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    suite = _bench_suite()
    if suite is None:
        raise LivestyleError(f"livestyle bench needs a source checkout's benchmarks/ (pip install -e . from a clone); "
                             f"there is none at {BENCHMARKS}")
    if args.kernels is not None:
        import torch

        from livestyle import kernels

        kernels.use(args.kernels, "cuda" if torch.cuda.is_available() else "cpu")
    return suite.run(args)


def _add_run(sub) -> None:
    run = sub.add_parser(
        "run", help="restyle a camera, file, stream or image folder into a file, vcam or window",
        description="Restyle INPUT into OUTPUT with a preset. INPUT: a video file (any format FFmpeg reads), "
                    "a URL (rtsp://, http(s)://, srt://), cam:N or /dev/videoN, a folder or glob of images, "
                    "or test:[NAME] (a camera gliding over a shipped image). OUTPUT: a video file "
                    "(.mp4 .mkv .mov .webm), numbered images (frames/%%05d.png), vcam[:DEVICE] or window.")
    run.add_argument("input", help="file, URL, cam:N, folder, glob or test:[NAME]")
    run.add_argument("-o", "--output", help="file, frames/%%05d.png, vcam or window (default: a file input "
                     "writes NAME.PRESET.mp4 beside it, a camera opens a window, test: writes livestyle-demo.mp4)")
    look = run.add_argument_group("the look")
    look.add_argument("--preset", default=DEFAULT_PRESET, help=f"preset name or .toml file (default: {DEFAULT_PRESET})")
    look.add_argument("--model", help="model folder or .safetensors file, a name under $LIVESTYLE_MODELS, "
                      "or demo (default: the preset's)")
    look.add_argument("--style", help="demo model style, or weighted styles \"a:0.7, b:0.3\" (default: the preset's)")
    look.add_argument("--prompt", help="prompt for SD checkpoints (default: the preset's)")
    look.add_argument("--negative", help="negative prompt (default: the preset's)")
    look.add_argument("--strength", type=float, help="0 = the input, 1 = the full restyle (default: the preset's)")
    look.add_argument("--steps", type=int, help="denoising steps, 1 to 4 (default: the preset's)")
    look.add_argument("--timesteps", type=_timesteps, help="explicit timesteps for SD, e.g. 999,749 (replaces "
                      "--strength and --steps)")
    look.add_argument("--seed", type=int, help="the stream's fixed noise (default: the preset's)")
    look.add_argument("--guidance", choices=("none", "full", "self", "initialize"),
                      help="classifier-free guidance variant (default: none)")
    look.add_argument("--guidance-scale", type=float, help="guidance strength, > 1 to have an effect")
    add_controls(look)
    temporal = run.add_argument_group("temporal consistency")
    temporal.add_argument("--temporal", action=argparse.BooleanOptionalAction, default=None,
                          help="all temporal parts on or off (default: the preset's)")
    temporal.add_argument("--cache-frames", type=int, help="past frames in the cached self-attention, 0 = off")
    temporal.add_argument("--fusion", type=float,
                          help="feature fusion strength in [0, 1) over the cached frames (StreamV2V uses 0.8), 0 = off")
    temporal.add_argument("--flow", action=argparse.BooleanOptionalAction, default=None,
                          help="flow-guided latent propagation")
    temporal.add_argument("--flow-blend", type=float, help="share of the warped previous latent, in [0, 1)")
    temporal.add_argument("--output-blend", type=float,
                          help="share of the warped previous output image, in [0, 1); 0 = latents only")
    temporal.add_argument("--warp", choices=WARPS, help="how the flow-guided blends resample the previous "
                          "output (default bicubic, which keeps more of its sharpness than bilinear)")
    temporal.add_argument("--skip-similar", type=float, metavar="T",
                          help="skip frames more similar than T to the previous one (0.98 is typical; 0 = off)")
    temporal.add_argument("--no-stream-batch", action="store_true",
                          help="run each frame's steps one after another (no steps - 1 frames of latency)")
    media = run.add_argument_group("input and output")
    media.add_argument("--size", type=_processing_size, help="processing WxH, multiples of 8 (default: the "
                       "input's aspect with the short side at 256 for the demo model, small inputs too; up to 512 "
                       "for SD, never upscaled)")
    media.add_argument("--input-size", type=_size, help="WxH to ask of a camera, or of test: (default 256x256)")
    media.add_argument("--fps", type=_fps, help="frame rate to ask of a camera; the rate of test: and image "
                       "folders (default 24)")
    media.add_argument("--seconds", "-t", type=_seconds, help="stop after this much input (test: is 4 s long)")
    media.add_argument("--codec", help="video encoder (default libx264; libvpx-vp9 for .webm)")
    media.add_argument("--crf", type=int, default=18, help="encoder quality, lower is better (default 18)")
    media.add_argument("--bitrate", type=_bitrate, help="video bitrate instead of --crf, e.g. 6M")
    media.add_argument("--encoder-preset", default="veryfast", help="x264/x265 speed preset (default veryfast; "
                       "superfast halves the encoding time at 1080p for a larger file)")
    media.add_argument("--no-audio", action="store_true", help="leave the input's audio out")
    media.add_argument("--timeout", type=_timeout, default=OPEN_TIMEOUT_S, metavar="S",
                       help=f"network sources: give up when opening or a read stalls this long "
                            f"(default {OPEN_TIMEOUT_S:g} s)")
    media.add_argument("--side-by-side", action="store_true", help="window: the input left of the output")
    device = run.add_argument_group("device")
    device.add_argument("--device", type=_device_name, help="cpu, cuda or cuda:N (default: cuda when there is one)")
    device.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default: fp16 on cuda, fp32 on cpu")
    _add_kernels(device)
    _add_threads(device)
    add_acceleration(device)
    run.set_defaults(func=cmd_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="livestyle", description="Real-time video restyling with few-step diffusion.")
    parser.add_argument("--version", action="version", version=f"livestyle {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, devices, and where presets and models are looked for")
    info.set_defaults(func=cmd_info)

    _add_run(sub)

    presets = sub.add_parser("presets", help="list the presets (built-in and ~/.config/livestyle/presets)")
    actions = presets.add_subparsers(dest="action")
    show = actions.add_parser("show", help="print one preset")
    show.add_argument("name", help="preset name or .toml file")
    presets.set_defaults(func=cmd_presets)

    inspect = sub.add_parser("inspect", help="load a checkpoint and say what it holds")
    inspect.add_argument("path", help="diffusers folder, single-file .safetensors, VAE or TAESD file")
    inspect.add_argument("--autoencoder", help="replacement autoencoder (e.g. a TAESD folder)")
    inspect.add_argument("--lora", action="append", default=[], help="LoRA .safetensors to fuse (repeatable)")
    inspect.add_argument("--lora-scale", type=float, default=1.0)
    inspect.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    inspect.set_defaults(func=cmd_inspect)

    from livestyle.server.command import register as register_serve  # imports no aiohttp/aiortc/torch

    _add_threads(register_serve(sub))
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if hasattr(args, "threads"):  # run, serve, bench: before torch is imported (OpenMP reads its wait policy then)
        from livestyle import threads

        threads.configure(args.threads)
    import cv2

    if not args.verbose:  # OpenCV's own warnings (a camera probe) would bury our one-line errors
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    # OpenCV's own thread pool (the engine's flow and resizes are small calls) competes
    # with torch's on the engine thread: on 2 cores one OpenCV thread made the engine
    # 10-15% faster (benchmarks/stream_speed.py does the same).
    cv2.setNumThreads(1)
    # SIGTERM (a service manager, `timeout`, `kill`) ends a run as Ctrl-C does: the output is
    # finished and playable, and the exit status says which signal (128 + 15 = 143).
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if on_main else None
    try:
        return args.func(args)
    except LivestyleError as e:
        print(f"livestyle: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable file, permission denied, disk full: the OS says which
        print(f"livestyle: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        print("livestyle: error: out of memory (try a smaller --size)", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("livestyle: interrupted", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    finally:
        if on_main:  # None: the previous handler was not set from Python
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
