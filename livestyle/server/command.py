"""`livestyle serve`: the command line of the WebRTC server.

register(sub) adds the subcommand to the CLI's parser. Importing this module imports
neither aiohttp, aiortc nor torch (`livestyle --help` stays fast); cmd_serve does.
"""

from __future__ import annotations

import argparse
import os
import re

from livestyle.config import DEFAULT_PRESET
from livestyle.errors import LivestyleError

DEFAULT_BITRATE = 4_000_000


def _bitrate(text: str) -> int:
    """'4M', '2500k' or '4000000' -> bits per second."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmM]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"bitrate {text!r} is not a number of bits/s such as 4M or 2500k")
    scale = {"": 1, "k": 1e3, "m": 1e6}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def _device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"device {text!r}: expected cpu, cuda or cuda:N")
    return text


def register(sub) -> argparse.ArgumentParser:
    """Add `serve` to the CLI's subparsers."""
    serve = sub.add_parser(
        "serve", help="the WebRTC server: a camera page, OBS over WHIP/WHEP",
        description="Serve the camera page (GET /), the viewer page for OBS (GET /view), "
                    "WHIP ingest (POST /whip) and WHEP playback (POST /whep).")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1; any other needs --token)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--token", default=os.environ.get("LIVESTYLE_TOKEN", ""),
                       help="bearer token every API call, WHIP/WHEP request and control channel must "
                            "present (default: $LIVESTYLE_TOKEN, which keeps it out of `ps`)")
    serve.add_argument("--max-sessions", type=int, default=4, help="concurrent streams (default 4)")
    serve.add_argument("--preset", default=DEFAULT_PRESET, help=f"a new session's look (default {DEFAULT_PRESET})")
    serve.add_argument("--model", help="model folder or .safetensors file, a name under $LIVESTYLE_MODELS, "
                                        "or demo (default: the preset's model)")
    serve.add_argument("--device", type=_device, help="cpu, cuda or cuda:N (default: cuda when there is one)")
    serve.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default: fp16 on cuda, fp32 on cpu")
    serve.add_argument("--kernels", choices=("auto", "triton", "torch"),
                       help="fused kernels: triton, the torch reference, or auto = Triton on cuda "
                            "(default: $LIVESTYLE_KERNELS, else auto)")
    serve.add_argument("--ice-server", action="append", default=[], metavar="URL",
                       help="STUN/TURN server, e.g. stun:stun.example.org:3478 or "
                            "turn:USER:PASSWORD@turn.example.org:3478 (repeatable; default none)")
    serve.add_argument("--bitrate", type=_bitrate, default=DEFAULT_BITRATE,
                       help="restyled video bitrate ceiling, e.g. 4M or 2500k (default 4M)")
    serve.add_argument("--short-side", type=int,
                       help="processing size: the short side in pixels, a multiple of 8 "
                            "(default 256 for the demo model, 512 for SD models)")
    from livestyle.cli import add_acceleration, add_controls  # the same flags as `run`

    add_controls(serve, ". Every session streams with them; the camera page sets their scales live "
                        "(0 = off), never which nets")
    add_acceleration(serve)
    serve.set_defaults(func=cmd_serve)
    return serve


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model, start the engine, serve until Ctrl-C."""
    import asyncio
    import dataclasses

    import torch

    from livestyle.config import StreamSettings, find_model, find_preset, processing_size
    from livestyle.server.app import DEFAULT_INPUT, App, ServerSettings, serve

    settings = ServerSettings(host=args.host, port=args.port, token=args.token, max_sessions=args.max_sessions,
                              preset=args.preset, short_side=args.short_side or 256, bitrate=args.bitrate,
                              ice_servers=tuple(args.ice_server))  # the bind rule is checked here, first
    preset = find_preset(settings.preset)  # a typo fails now, not after the model has loaded
    # The ControlNets every session streams with: viewers change their scales, never which files.
    settings = dataclasses.replace(settings, controls=tuple(args.control) if args.control else preset.controls)
    model = args.model or preset.model
    model_path = None if model == "demo" else find_model(model)
    if args.threads is None and model == "demo":
        from livestyle import threads

        # The demo model's short operations gain less from a second thread than waking it costs
        # (threads.py: 1.33x quiet, 1.21x beside a busy process on one thread of two).
        torch.set_num_threads(threads.default_threads(small_model=True))
    if model_path is None and settings.controls:
        from livestyle.cli import NO_DEMO_CONTROLS

        raise LivestyleError(NO_DEMO_CONTROLS)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LivestyleError(f"--device {device}: torch sees no CUDA device")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if device.startswith("cuda") else "fp32")]
    from livestyle import kernels
    from livestyle.cli import check_acceleration
    from livestyle.stream import precision

    check_acceleration(args, device)

    kernels.use(args.kernels, device)  # Triton where it cannot run fails now, not on every frame

    from livestyle.models.demo import load_demo
    from livestyle.models.loading import load_pipeline
    from livestyle.stream.engine import Engine

    def ready(url: str) -> None:
        fragment = "#token=YOUR_TOKEN" if settings.token else ""
        print(f"livestyle serve: {url}/{fragment}  (camera page; Ctrl-C stops)")
        print(f"  OBS: WHIP output to {url}/whip?name=obs, Browser Source {url}/view?session=obs{fragment}")

    # The engine's worker loads the model: all torch work stays on one thread (see Engine).
    def load():
        return load_demo(device, dtype) if model_path is None else load_pipeline(model_path, device, dtype)

    # Compiled or captured, a step holds rows for every session from the start, so sessions
    # joining never change its shapes (no compile, no capture mid-stream); eager, padding
    # rows would only cost model time.
    rows = settings.max_sessions if args.compile or args.cuda_graphs else 1
    with Engine(load, device=device, dtype=dtype, compile=args.compile, cuda_graphs=args.cuda_graphs,
                channels_last=precision.configure(device, dtype), bucket_rows=rows) as engine:
        if engine.family != "demo":
            if not preset.prompt:
                raise LivestyleError(f"preset {preset.name}: an SD checkpoint needs a prompt "
                                     '(use --preset with a preset that has prompt = "...")')
            if args.short_side is None:
                settings = dataclasses.replace(settings, short_side=512)  # SD models are trained at 512
        # The preset must suit the model (an SD model needs a prompt): say so before serving.
        engine.check(StreamSettings.from_preset(preset, processing_size(*DEFAULT_INPUT, settings.short_side),
                                                controls=settings.controls))
        try:
            asyncio.run(serve(App(engine, settings), ready))
        except KeyboardInterrupt:
            print("livestyle serve: stopped")
    return 0
