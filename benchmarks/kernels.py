"""Each fused kernel against torch eager and torch.compile of its reference, on SD-Turbo's shapes.

    python benchmarks/kernels.py [--batch 1] [--dtype fp16] [--repeats 50] [--cache-frames 2]
                                 [--no-compile] [--no-unet] [--only NAMES] [--json PATH] [--smoke]

On a CUDA machine this times every row; without CUDA every timed cell says "not measured
(no CUDA)". `--smoke` runs tiny shapes instead, in seconds: on a CPU it runs each Triton
kernel once in Triton's interpreter (TRITON_INTERPRET=1, set here when nothing imported
triton yet) and checks it against the reference, with no timing (the interpreter's speed
says nothing); CI runs it so that this script cannot rot. Every row's Triton output is
checked against the fp32 reference before it is timed; a mismatch or a Triton error fails
the run (exit 1), after the other rows and the JSON are written. A torch.compile failure
fills its cell ("failed: ...") and does not fail the run.

Shapes (SD-Turbo, the SD 2.1 U-Net, at 512x512: 64x64 latents; B = --batch, the stream
batch of steps x streams; channels and latent sides per level (320, 64), (640, 32),
(1280, 16), (1280, 8)):

    group_norm    activation(GroupNorm(x + shift)): 32 groups, SiLU, the resnet's
                  time-embedding shift; x (B, C, s, s) per level, NCHW and channels_last
    layer_norm    x (B, s*s, C) per level
    geglu         projection output (B, s*s, 2 * 4C) -> (B, s*s, 4C) per level
    attention     the frame's self-attention over itself and --cache-frames banked frames,
                  all filled (as the U-Net hands a full ring: no flags): q, k, v (B, s*s, C),
                  64-channel heads, per level
    frame_in      uint8 (B, 512, 512, 3) -> (B, 3, 512, 512) in [-1, 1] (the KL VAE's input);
                  uint8 (B, 720, 1280, 3) -> (B, 3, 512, 512), resized bilinearly
    frame_out     (B, 3, 512, 512) in [-1, 1] -> uint8 (B, 512, 512, 3)
    propagate     latents (B, 4, 64, 64) along a (B, 2, 128, 128) flow (reduced 2x); decoded
                  images (B, 3, 512, 512) along the same flow (enlarged 4x)
    sampler_step  (B, 4, 64, 64) latents, model output and noise -> x_next, denoised
    unet          one SD-Turbo U-Net call (random weights, (B, 4, 64, 64), a 77-token
                  context of width 1024, a full --cache-frames temporal cache), kernels off
                  (backend torch) against on (backend triton); no compile column

Work, written out per row: the memory-bound kernels' bytes are those an ideal fused
kernel moves (one read of each input, one write of each output, counted below; the small
weight, bias, shift, coefficients are left out; the resizing kernels' reads count the
source once). GB/s = bytes / median time, so eager's figure is what it achieves on the
useful bytes, not on what it moves (it writes and reads intermediates); the Triton
group_norm reads x twice (statistics, then output), so it reaches at most 2/3 of the
peak. Attention is compute-bound: TFLOP/s from 4 * B * L * (L + N*L) * C (two matrix
products, a multiply and an add each). "of peak" divides the Triton column by the
device's peak from NVIDIA's datasheets (PEAKS below: HBM bandwidth; dense fp16/bf16
tensor-core FLOP/s, or fp32 FLOP/s for fp32 attention); an unlisted device says
"peak unknown". Times: median of --repeats calls after 5 warm-up calls, CUDA events read
once at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from livestyle import kernels  # noqa: E402
from livestyle.kernels import reference  # noqa: E402

LEVELS = [(320, 64), (640, 32), (1280, 16), (1280, 8)]  # SD-Turbo at 512x512: (channels, latent side)
GROUPS = 32
HEAD = 64  # SD 2.x's channels per attention head
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ROW_NAMES = ("group_norm", "layer_norm", "geglu", "attention", "frame_in", "frame_out", "propagate", "sampler_step",
             "unet")

# (substring of torch.cuda.get_device_name, bytes/s of HBM, dense fp16/bf16 tensor FLOP/s,
# fp32 FLOP/s), from NVIDIA's H100 and H200 datasheets; the first match wins, so the NVL and
# PCIe parts come before the plain names (an H100 SXM reports "NVIDIA H100 80GB HBM3").
PEAKS = [
    ("H200 NVL", 4.8e12, 835e12, 60e12),
    ("H200", 4.8e12, 989e12, 67e12),
    ("H100 NVL", 3.9e12, 835e12, 60e12),
    ("H100 PCIe", 2.0e12, 756e12, 51e12),
    ("H100", 3.35e12, 989e12, 67e12),
]


@dataclass(frozen=True)
class Shapes:
    """The sizes the rows are built from: SD-Turbo's at 512x512, or tiny ones for --smoke."""

    levels: list[tuple[int, int]]  # (channels, latent side)
    groups: int
    frame: int  # the model's image side
    camera: tuple[int, int]  # (H, W) of a camera frame resized to `frame`
    latent: int
    flow: int  # the flow grid's side
    unet: str  # "sd-turbo" or "tiny"


FULL = Shapes(LEVELS, GROUPS, frame=512, camera=(720, 1280), latent=64, flow=128, unet="sd-turbo")
SMOKE = Shapes([(64, 6), (128, 3)], groups=32, frame=16, camera=(20, 27), latent=8, flow=16, unet="tiny")


@dataclass(frozen=True)
class Row:
    kernel: str
    shape: str
    work: float  # bytes, or FLOP when unit is "flop"
    unit: str  # "bytes" or "flop"
    ref: Callable
    fast: Callable  # the dispatched function (run with the backend set to triton)
    make: Callable[[], tuple]  # the inputs


def rows(shapes: Shapes, batch: int, dtype: torch.dtype, device: str, frames: int) -> list[Row]:
    es = torch.tensor([], dtype=dtype).element_size()
    B = batch
    out = []

    def randn(*size, dt=dtype):
        return torch.randn(*size, device=device, dtype=dt)

    for C, s in shapes.levels:
        for layout in ("nchw", "nhwc"):
            def make(C=C, s=s, layout=layout):
                x = randn(B, C, s, s)
                if layout == "nhwc":
                    x = x.to(memory_format=torch.channels_last)
                return x, randn(C), randn(C), shapes.groups, 1e-5, "silu", randn(B, C)
            n = B * C * s * s
            out.append(Row("group_norm", f"{B}x{C}x{s}x{s} {layout}", 2 * n * es, "bytes",
                           reference.group_norm, kernels.group_norm, make))  # read x, write y
    for C, s in shapes.levels:
        n = B * s * s * C
        out.append(Row("layer_norm", f"{B}x{s * s}x{C}", 2 * n * es, "bytes", reference.layer_norm, kernels.layer_norm,
                       lambda C=C, s=s: (randn(B, s * s, C), randn(C), randn(C), 1e-5)))  # read x, write y
    for C, s in shapes.levels:
        n = B * s * s * 4 * C  # outputs; the input is twice that
        out.append(Row("geglu", f"{B}x{s * s}x{2 * 4 * C}", 3 * n * es, "bytes", reference.geglu, kernels.geglu,
                       lambda C=C, s=s: (randn(B, s * s, 2 * 4 * C),)))
    for C, s in shapes.levels:
        L = s * s

        def make(C=C, L=L):
            q, k, v = (randn(B, L, C) for _ in range(3))
            bank_k, bank_v = (randn(B, frames, L, C) for _ in range(2))
            return q, k, v, bank_k, bank_v, None, C // HEAD
        out.append(Row("attention", f"{B}x{L}x{C} +{frames} frames", 4 * B * L * L * (1 + frames) * C, "flop",
                       reference.cached_attention, kernels.cached_attention, make))

    side = shapes.frame
    pixels = B * side * side

    def frames_of(H, W):
        return torch.randint(0, 256, (B, H, W, 3), dtype=torch.uint8, device=device)
    out.append(Row("frame_in", f"{B}x{side}x{side}x3 -> {side}x{side}", pixels * 3 + pixels * 3 * es, "bytes",
                   reference.frame_in, kernels.frame_in, lambda: (frames_of(side, side), (side, side), True, dtype)))
    H, W = shapes.camera
    out.append(Row("frame_in", f"{B}x{H}x{W}x3 -> {side}x{side}", B * H * W * 3 + pixels * 3 * es, "bytes",
                   reference.frame_in, kernels.frame_in, lambda: (frames_of(H, W), (side, side), True, dtype)))
    out.append(Row("frame_out", f"{B}x3x{side}x{side}", pixels * 3 * es + pixels * 3, "bytes",
                   reference.frame_out, kernels.frame_out, lambda: (randn(B, 3, side, side).clamp_(-1.2, 1.2), True)))

    f = shapes.flow
    for C, s in ((4, shapes.latent), (3, side)):
        def make(C=C, s=s):
            back = torch.randn(B, 2, f, f, device=device) * 3
            confidence = torch.rand(B, 1, f, f, device=device)
            blend = torch.full((B,), 0.8, device=device)
            return randn(B, C, s, s), randn(B, C, s, s), back, confidence, blend
        # read current and previous, write out; read the flow and confidence (fp32) once
        out.append(Row("propagate", f"{B}x{C}x{s}x{s} flow {f}x{f}", 3 * B * C * s * s * es + B * 3 * f * f * 4,
                       "bytes", reference.propagate, kernels.propagate, make))

    s = shapes.latent
    n = B * 4 * s * s
    out.append(Row("sampler_step", f"{B}x4x{s}x{s}", 5 * n * es, "bytes",  # read x, out, noise; write 2
                   reference.sampler_step, kernels.sampler_step,
                   lambda: (randn(B, 4, s, s), randn(B, 4, s, s), randn(B, 4, s, s),
                            torch.rand(4, B, device=device))))
    return out


def unet_call(shapes: Shapes, batch: int, dtype: torch.dtype, device: str, frames: int):
    """(label, fn) for one U-Net call with random weights and a full temporal cache."""
    from livestyle.models.temporal import TemporalCache
    from livestyle.models.unet import UNet, UNetConfig

    if shapes.unet == "sd-turbo":
        config = UNetConfig(num_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True)
        hw, tokens = (shapes.latent, shapes.latent), 77
    else:
        config = UNetConfig(block_out_channels=(8, 16), layers_per_block=1, attention_levels=(True, False),
                            num_heads=(2, 2), cross_attention_dim=12, norm_num_groups=4)
        hw, tokens = (7, 5), 3
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: SD-Turbo's 865M parameters would take a while on the CPU
        unet = UNet(config).to(dtype).eval()
        x = torch.randn(batch, 4, *hw, dtype=dtype)
        context = torch.randn(batch, tokens, config.cross_attention_dim, dtype=dtype)
        t = torch.full((batch,), 500.0)
        cache = TemporalCache.for_unet(unet, batch, hw, frames, device=device, dtype=dtype)
    with torch.no_grad():
        for _ in range(frames):  # fill the ring: the timed calls read every slot, no flags
            unet(x, t, context, cache)
            cache.advance()

    def call():
        with torch.no_grad():
            return unet(x, t, context, cache)  # stores into the slot it would write next, never advances
    label = f"{shapes.unet} {batch}x4x{hw[0]}x{hw[1]} +{frames} frames"
    return label, call


def median_ms(fn, args, repeats: int) -> float:
    """Median of `repeats` timed calls (CUDA events, read after all of them), after 5 warm-up calls."""
    for _ in range(5):
        fn(*args)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn(*args)
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def peak(device_name: str) -> tuple[str, float, float, float] | None:
    return next((p for p in PEAKS if p[0] in device_name), None)


def as_float(x):
    """The fp32 copy of every floating tensor in x (a tensor, tuple or value); others as they are."""
    if isinstance(x, tuple):
        return tuple(as_float(t) for t in x)
    return x.float() if torch.is_tensor(x) and x.is_floating_point() else x


def check(got, expected) -> None:
    """The Triton output against the fp32 reference on the same inputs: loose enough for bf16
    attention (tests/test_kernels_parity.py holds each kernel's own tolerance); bytes within 1."""
    pairs = zip(*(x if isinstance(x, tuple) else (x,) for x in (got, expected)))  # sampler_step returns two
    for g, e in pairs:
        tol = 1.0 if g.dtype == torch.uint8 else 2**-6
        torch.testing.assert_close(g.float(), e.float(), rtol=0 if g.dtype == torch.uint8 else tol, atol=tol)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=_positive, default=1, help="batch (the stream batch: steps x streams)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    parser.add_argument("--repeats", type=_positive, default=50)
    parser.add_argument("--cache-frames", type=_positive, default=2, help="banked frames (attention, U-Net rows)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile column")
    parser.add_argument("--no-unet", action="store_true", help="leave out the U-Net row")
    parser.add_argument("--only", type=_kernel_names, metavar="NAMES",
                        help="comma-separated rows to run: " + ", ".join(ROW_NAMES) + " (default: all)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every row as JSON to PATH")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes; without CUDA, each Triton kernel checked once in the interpreter, untimed")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    shapes = SMOKE if args.smoke else FULL
    # Smoke on a CPU: the Triton kernels in the interpreter, which must be chosen before triton is imported.
    interpret = args.smoke and not cuda and kernels.triton_installed()
    if interpret and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    run_triton = cuda or (interpret and kernels.interpreted())
    timed = cuda
    if cuda:
        # One compiled reference per shape and layout: past dynamo's default limit of 8
        # recompilations a function would silently run eager.
        torch._dynamo.config.recompile_limit = 64

    name = torch.cuda.get_device_name(0) if cuda else f"no CUDA ({platform.machine()} CPU)"
    device_peak = peak(name) if cuda else None
    header = {"torch": torch.__version__, "triton": _triton_version(), "device": name, "dtype": args.dtype,
              "batch": args.batch, "repeats": args.repeats, "cache_frames": args.cache_frames,
              "smoke": args.smoke, "triton_checked": run_triton,
              "triton_mode": "cuda" if cuda else "interpreter" if run_triton else "not run",
              "peak": dict(zip(("name", "bytes_per_s", "tensor_flop_per_s", "fp32_flop_per_s"), device_peak))
              if device_peak else None}
    print(f"torch {header['torch']}, triton {header['triton']}, {args.dtype}, batch {args.batch}"
          + (", smoke shapes" if args.smoke else ""))
    if not cuda:
        print(f"device: {name}; every timed cell: not measured (no CUDA)"
              + ("; Triton kernels checked in the interpreter" if run_triton else
                 "; Triton kernels not checked (" + _unchecked_reason(args.smoke) + ")"))
    elif device_peak:
        print(f"device: {name}, peak {device_peak[1] / 1e12:.2f} TB/s, {device_peak[2] / 1e12:.0f} TFLOP/s "
              f"fp16/bf16 dense, {device_peak[3] / 1e12:.0f} TFLOP/s fp32 (NVIDIA datasheet)")
    else:
        print(f"device: {name}, peak unknown")

    records, failures = [], []
    title = f"{'kernel':12} {'shape':30} {'MB|GFLOP':>8}  {'eager':>18}  {'compile':>18}  {'triton':>18}  of peak"
    print(title)
    print("-" * len(title))
    for row in rows(shapes, args.batch, dtype, device, args.cache_frames):
        if args.only and row.kernel not in args.only:
            continue
        size = row.work / 1e9 if row.unit == "flop" else row.work / 1e6
        record = {"kernel": row.kernel, "shape": row.shape, row.unit: row.work, "check": "not run"}
        start = f"{row.kernel:12} {row.shape:30} {size:8.3g}"
        if not (run_triton or timed):
            print(f"{start}  not measured (no CUDA); triton check: {record['check']}")
            records.append(record)
            continue
        inputs = row.make()
        if run_triton:
            if interpret and dtype == torch.bfloat16 and row.kernel == "attention":
                record["check"] = "not run: the interpreter's bf16 dot is wrong (Triton 3.9 multiplies raw bits)"
            else:
                try:
                    kernels.set_backend("triton")
                    check(row.fast(*inputs), row.ref(*as_float(inputs)))
                    record["check"] = "ok"
                except Exception as e:  # the row fails; the others still run and the run exits 1
                    record["check"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0]}"
                    failures.append(f"{row.kernel} {row.shape}")
        if not timed:
            print(f"{start}  not measured (no CUDA); triton check: {record['check']}")
            records.append(record)
            continue
        cells = []
        for column in ("eager", "compile", "triton"):
            ms, cell = None, "-"
            if column == "triton" and record["check"] != "ok":
                cell = "failed check"
            elif column == "compile" and args.no_compile:
                pass
            elif column == "compile":
                try:  # torch.compile can fail on a machine's toolchain: its cell says so, the others go on
                    ms = median_ms(torch.compile(row.ref, dynamic=False), inputs, args.repeats)
                except Exception as e:
                    cell = f"failed: {type(e).__name__}"
                    record["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            else:
                ms = median_ms(row.ref if column == "eager" else row.fast, inputs, args.repeats)
            if ms is not None:
                rate = row.work / (ms * 1e-3)
                record[f"{column}_ms"] = ms
                record[f"{column}_{'tflop_per_s' if row.unit == 'flop' else 'gb_per_s'}"] = (
                    rate / 1e12 if row.unit == "flop" else rate / 1e9)
                cell = (f"{ms:8.3f} ms {rate / 1e12:4.0f} TF/s" if row.unit == "flop"
                        else f"{ms:8.3f} ms {rate / 1e9:5.0f} GB/s")
            cells.append(f"{cell:>18}")
        fraction = None
        if device_peak and "triton_ms" in record:
            ceiling = (device_peak[1] if row.unit == "bytes"
                       else device_peak[3] if dtype == torch.float32 else device_peak[2])
            fraction = row.work / (record["triton_ms"] * 1e-3) / ceiling
        record["triton_fraction_of_peak"] = fraction
        print(f"{start}  {'  '.join(cells)}  "
              + (f"{fraction:6.0%}" if fraction is not None else "peak unknown" if not device_peak else "     -"))
        records.append(record)

    if not args.no_unet and (not args.only or "unet" in args.only):
        records.append(unet_row(shapes, args, dtype, device, run_triton, timed, failures))

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**header, "rows": records}, indent=1) + "\n")
        print(f"wrote {args.json}")
    if failures:
        print(f"FAILED: {len(failures)} row(s) did not match the reference or raised: {'; '.join(failures)}")
        return 1
    return 0


def unet_row(shapes: Shapes, args, dtype: torch.dtype, device: str, run_triton: bool, timed: bool,
             failures: list[str]) -> dict:
    """One U-Net call with kernels off (backend torch) against on (backend triton): parity, then times."""
    if not (run_triton or timed):  # nothing to check or time: not worth building SD-Turbo's U-Net on a CPU
        record = {"kernel": "unet", "shape": f"{shapes.unet} {args.batch}x4x{shapes.latent}x{shapes.latent}",
                  "check": "not run"}
        print(f"{'unet':12} {record['shape']:30} {'':>8}  not measured (no CUDA); kernels on vs off check: not run")
        return record
    label, call = unet_call(shapes, args.batch, dtype, device, args.cache_frames)
    record = {"kernel": "unet", "shape": label, "check": "not run"}
    outputs = {}
    for backend in ("torch", "triton") if run_triton else ("torch",):
        kernels.set_backend(backend)
        outputs[backend] = call().float()
    if run_triton:
        # Random weights in fp16 make activations of a few units; bf16's 8 bits over ~40
        # layers drift further than one kernel's tolerance.
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        try:
            torch.testing.assert_close(outputs["triton"], outputs["torch"], rtol=tol, atol=tol)
            record["check"] = "ok"
        except AssertionError as e:
            record["check"] = f"failed: {str(e).splitlines()[0]}"
            failures.append(f"unet {label}")
    start = f"{'unet':12} {label:30} {'':>8}"
    if not timed:
        print(f"{start}  not measured (no CUDA); kernels on vs off check: {record['check']}")
        return record
    repeats = min(args.repeats, 20)
    for backend in ("torch", "triton"):
        kernels.set_backend(backend)
        record[f"{'off' if backend == 'torch' else 'on'}_ms"] = median_ms(call, (), repeats)
    print(f"{start}  kernels off {record['off_ms']:8.2f} ms, on {record['on_ms']:8.2f} ms "
          f"({record['off_ms'] / record['on_ms']:.2f}x), check: {record['check']}")
    return record


def _unchecked_reason(smoke: bool) -> str:
    if not kernels.triton_installed():
        return "triton is not installed"
    if not smoke:
        return "--smoke checks them in Triton's interpreter"
    return "triton was imported without TRITON_INTERPRET=1"


def _kernel_names(text: str) -> frozenset[str]:
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    if not names or (unknown := names - set(ROW_NAMES)):
        raise argparse.ArgumentTypeError(f"unknown row {', '.join(sorted(unknown)) if names else text!r} "
                                         f"(choose from {', '.join(ROW_NAMES)})")
    return names


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text!r}")
    return value


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
