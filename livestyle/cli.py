"""The `livestyle` command. The only place that sets process-wide state (logging, torch flags).

Errors meant for the user (LivestyleError) are printed as one line on stderr with a
non-zero exit status and no traceback.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from pathlib import Path

from livestyle import __version__
from livestyle.config import DEFAULT_PRESET
from livestyle.errors import LivestyleError

log = logging.getLogger("livestyle")


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _count(module) -> str:
    n = sum(p.numel() for p in module.parameters())
    return f"{n / 1e6:.1f}M parameters" if n >= 1e5 else f"{n} parameters"


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    print(f"livestyle {__version__}")
    print(f"python    {platform.python_version()} ({platform.platform()})")
    print(f"torch     {torch.__version__}")
    try:
        import triton

        triton_line = f"triton    {triton.__version__}"
    except ImportError:
        triton_line = "triton    not installed"
    print(triton_line)
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"device    cuda:{i} {torch.cuda.get_device_name(i)}")
    else:
        print("device    cpu only (no CUDA device)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Load a checkpoint the way `run` will, and say what it holds."""
    from livestyle.errors import CheckpointError
    from livestyle.models import load_autoencoder, load_pipeline
    from livestyle.models.checkpoint import classify, read_header

    path = Path(args.path)
    dtype = _torch_dtype(args.dtype)
    if path.is_file():
        kind, what = classify(read_header(path).keys())
        if kind == "unsupported":
            raise CheckpointError(f"{path}: this looks like {what}")
        if kind != "pipeline":  # one component on its own: say what it is
            print(f"{path}: {what}")
            if kind == "autoencoder":
                vae = load_autoencoder(path, dtype=dtype)
                print(f"  autoencoder  {type(vae).__name__}, {vae.latent_channels} latent channels, {_count(vae)}")
            return 0
    pipe = load_pipeline(path, dtype=dtype, autoencoder=args.autoencoder,
                         loras=tuple((p, args.lora_scale) for p in args.lora))
    unet = pipe.unet.config
    print(f"{path}: {pipe.family.upper()} pipeline, prediction {pipe.schedule.prediction_type}")
    print(f"  unet         {_count(pipe.unet)}, channels {unet.block_out_channels}, "
          f"context {unet.cross_attention_dim}")
    print(f"  autoencoder  {type(pipe.autoencoder).__name__}, {pipe.autoencoder.latent_channels} latent channels, "
          f"{_count(pipe.autoencoder)}")
    if pipe.text is not None:
        print(f"  text         {_count(pipe.text.encoder)}, "
              f"{pipe.text.encoder.config.num_hidden_layers} transformer layers")
    if pipe.styles is not None:
        print(f"  styles       {', '.join(pipe.styles.names)} ({pipe.styles.tokens} tokens x {pipe.styles.dim})")
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not WxH, e.g. 256x256") from None
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise argparse.ArgumentTypeError(f"size {text}: width and height must be positive multiples of 8")
    return w, h


def cmd_run(args: argparse.Namespace) -> int:
    """Restyle INPUT into OUTPUT with a preset; prints the frame rate reached."""
    import time

    import torch

    from livestyle.capture.sinks import FileSink
    from livestyle.capture.sources import open_source
    from livestyle.config import find_preset
    from livestyle.errors import LivestyleError
    from livestyle.frame import from_tensor, to_tensor
    from livestyle.models.demo import load_demo
    from livestyle.models.loading import load_pipeline
    from livestyle.models.temporal import TemporalCache
    from livestyle.stream.restyle import restyle

    preset = find_preset(args.preset)
    if preset.model != "demo":
        raise LivestyleError(f"preset {preset.name}: only the embedded demo model runs yet (model = {preset.model!r})")
    strength = preset.strength if args.strength is None else args.strength
    steps = preset.steps if args.steps is None else args.steps
    temporal = preset.temporal if args.temporal is None else args.temporal
    if not 0 <= strength <= 1:
        raise LivestyleError(f"--strength {strength}: must be between 0 and 1")
    source = open_source(args.input, args.size, args.fps, args.seconds)
    output = Path(args.output or "livestyle-demo.mp4")
    pipe = load_pipeline(args.model) if args.model else load_demo()
    if pipe.styles is None:
        raise LivestyleError(f"{args.model}: only demo-format models (a style bank, no text encoder) run yet")
    context = pipe.styles.context(preset.style)
    w, h = args.size
    cache = TemporalCache.for_unet(pipe.unet, 1, (h // 8, w // 8), args.cache_frames) if temporal else None
    model_seconds = 0.0
    start = time.perf_counter()
    with FileSink(output, args.size, source.time_base, args.fps) as sink:
        for frame in source:
            began = time.perf_counter()
            images = restyle(pipe, to_tensor(frame), context, strength, steps, cache)
            model_seconds += time.perf_counter() - began
            sink.write(from_tensor(images, [frame])[0])
    total = time.perf_counter() - start
    n = sink.frames
    print(f"restyled {n} frames at {w}x{h} with preset {preset.name} (strength {strength}, {steps} step"
          f"{'s' if steps > 1 else ''}, temporal {'on' if temporal else 'off'}) -> {output}")
    print(f"{n / total:.1f} fps overall, {n / model_seconds:.1f} fps model "
          f"(encode + denoise + decode {1e3 * model_seconds / n:.1f} ms/frame, {torch.get_num_threads()} threads)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="livestyle", description="Real-time video restyling with few-step diffusion.")
    parser.add_argument("--version", action="version", version=f"livestyle {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions and devices")
    info.set_defaults(func=cmd_info)

    run = sub.add_parser("run", help="restyle a video source into a file")
    run.add_argument("input", help="test: or test:NAME (a camera moving over a shipped image)")
    run.add_argument("-o", "--output", help="output video file (default: livestyle-demo.mp4)")
    run.add_argument("--preset", default=DEFAULT_PRESET, help=f"preset name or .toml file (default: {DEFAULT_PRESET})")
    run.add_argument("--model", help="a demo-format model folder (default: the embedded demo model)")
    run.add_argument("--strength", type=float, help="0 = the input, 1 = the full style (default: the preset's)")
    run.add_argument("--steps", type=int, choices=(1, 2, 3, 4), help="denoising steps (default: the preset's)")
    run.add_argument("--size", type=_size, default=(256, 256), help="WxH of the synthetic source (default 256x256)")
    run.add_argument("--fps", type=int, default=24)
    run.add_argument("--seconds", type=float, default=4.0, help="length of the synthetic clip")
    run.add_argument("--temporal", action=argparse.BooleanOptionalAction, default=None,
                     help="temporal cached attention over past frames (default: the preset's)")
    run.add_argument("--cache-frames", type=int, default=2, help="past frames the temporal cache keeps")
    run.set_defaults(func=cmd_run)

    inspect = sub.add_parser("inspect", help="load a checkpoint and say what it holds")
    inspect.add_argument("path", help="diffusers folder, single-file .safetensors, VAE or TAESD file")
    inspect.add_argument("--autoencoder", help="replacement autoencoder (e.g. a TAESD folder)")
    inspect.add_argument("--lora", action="append", default=[], help="LoRA .safetensors to fuse (repeatable)")
    inspect.add_argument("--lora-scale", type=float, default=1.0)
    inspect.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    inspect.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except LivestyleError as e:
        print(f"livestyle: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable file, permission denied, disk full: the OS says which
        print(f"livestyle: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("livestyle: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
