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
    print(f"  text         {_count(pipe.text.encoder)}, {pipe.text.encoder.config.num_hidden_layers} transformer layers")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="livestyle", description="Real-time video restyling with few-step diffusion.")
    parser.add_argument("--version", action="version", version=f"livestyle {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions and devices")
    info.set_defaults(func=cmd_info)

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
