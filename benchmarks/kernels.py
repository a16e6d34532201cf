"""Each fused kernel against torch eager and torch.compile of its reference, on SD-Turbo's shapes.

    python benchmarks/kernels.py [--batch 1] [--dtype fp16] [--repeats 50] [--cache-frames 2] [--no-compile]

Shapes are those of the SD-Turbo U-Net at 512x512 (64x64 latents), one row per level:

    group_norm  activation(GroupNorm(x + shift)), 32 groups, SiLU, the resnet's time-embedding
                shift: x (B, C, h, w) at C = 320, 640, 1280, 1280 and h = w = 64, 32, 16, 8,
                NCHW and channels_last
    layer_norm  x (B, h*w, C), same C and h*w
    geglu       projection output (B, h*w, 2 * 4C) -> (B, h*w, 4C)
    attention   the current frame's self-attention over itself and --cache-frames banked
                frames, all filled (filled None, as the U-Net hands it once the ring is full:
                the reference concatenates and runs unmasked): q, k, v (B, h*w, C),
                64-channel heads (SD-Turbo's), h = w = 64 .. 8

Norms and GEGLU are memory-bound: GB/s counts the bytes an ideal fused kernel moves,
written out per kernel below (one read of each input, one write of the output; the small
weight, bias and shift are left out), divided by the median time over --repeats runs
timed with CUDA events. So eager's GB/s is what it achieves on the useful bytes, not on
what it actually moves (it writes and reads intermediates), and the Triton group_norm,
which reads x twice (statistics, then output), can reach at most 2/3 of the peak. "of
peak" divides by the device's memory bandwidth from the driver's memory clock and bus
width (double data rate). Attention is compute-bound: its rows give TFLOP/s from 4 * B *
L * (L + N*L) * C (two matrix products, multiply and add), and "of peak" stays empty
(the driver does not report tensor-core peak).

Each Triton output is checked against the reference before it is timed. Without CUDA
the GPU rows say "not measured (no CUDA)": the interpreter's speed says nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from livestyle import kernels  # noqa: E402
from livestyle.kernels import reference  # noqa: E402

LEVELS = [(320, 64), (640, 32), (1280, 16), (1280, 8)]  # SD-Turbo at 512x512: (channels, latent side)
GROUPS = 32
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cases(batch: int, dtype: torch.dtype, device: str, frames: int = 2):
    """(kernel, shape label, work, reference fn, triton fn, make inputs) for every row.

    work: ideal bytes moved (an int), or ("flop", count) for the compute-bound attention.
    """
    es = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for C, side in LEVELS:
        for layout in ("nchw", "nhwc"):
            def make(C=C, side=side, layout=layout):
                x = torch.randn(batch, C, side, side, device=device, dtype=dtype)
                if layout == "nhwc":
                    x = x.to(memory_format=torch.channels_last)
                w, b = (torch.randn(C, device=device, dtype=dtype) for _ in range(2))
                return x, w, b, GROUPS, 1e-5, "silu", torch.randn(batch, C, device=device, dtype=dtype)
            n = batch * C * side * side
            rows.append(("group_norm", f"{batch}x{C}x{side}x{side} {layout}", 2 * n * es,
                         reference.group_norm, kernels.group_norm, make))
    for C, side in LEVELS:
        def make(C=C, side=side):
            x = torch.randn(batch, side * side, C, device=device, dtype=dtype)
            return x, torch.randn(C, device=device, dtype=dtype), torch.randn(C, device=device, dtype=dtype), 1e-5
        n = batch * side * side * C
        rows.append(("layer_norm", f"{batch}x{side * side}x{C}", 2 * n * es,
                     reference.layer_norm, kernels.layer_norm, make))
    for C, side in LEVELS:
        def make(C=C, side=side):
            return (torch.randn(batch, side * side, 2 * 4 * C, device=device, dtype=dtype),)
        n = batch * side * side * 4 * C  # outputs; the input is twice that
        rows.append(("geglu", f"{batch}x{side * side}x{2 * 4 * C}", 3 * n * es, reference.geglu, kernels.geglu, make))
    for C, side in LEVELS:
        L = side * side
        def make(C=C, L=L):
            q, k, v = (torch.randn(batch, L, C, device=device, dtype=dtype) for _ in range(3))
            bank_k, bank_v = (torch.randn(batch, frames, L, C, device=device, dtype=dtype) for _ in range(2))
            return q, k, v, bank_k, bank_v, None, C // 64
        rows.append(("attention", f"{batch}x{L}x{C} +{frames} frames", ("flop", 4 * batch * L * L * (1 + frames) * C),
                     reference.cached_attention, kernels.cached_attention, make))
    return rows


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


def peak_bandwidth() -> float | None:
    """Bytes/s of device memory from the driver's clock (kHz) and bus width (bits), or None if unreported."""
    props = torch.cuda.get_device_properties(0)
    clock, width = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    return 2 * clock * 1e3 * width / 8 if clock and width else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1, help="batch (the stream batch: steps x streams)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--cache-frames", type=int, default=2, help="banked frames for the attention rows")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile column")
    args = parser.parse_args()
    if args.batch < 1 or args.repeats < 1 or args.cache_frames < 1:
        parser.error("--batch, --repeats and --cache-frames must be at least 1")
    dtype = DTYPES[args.dtype]
    # One compiled reference per shape and layout (8 group_norm rows): past dynamo's default
    # limit of 8 recompilations a function would silently run eager.
    torch._dynamo.config.recompile_limit = 64
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, triton {_triton_version()}, {args.dtype}, batch {args.batch}")
    if not cuda:
        print("device: no CUDA; every GPU row: not measured (no CUDA)")
    else:
        peak = peak_bandwidth()
        print(f"device: {torch.cuda.get_device_name(0)}, peak "
              + (f"{peak / 1e9:.0f} GB/s (driver's clock x bus width)" if peak else "unknown"))
    header = f"{'kernel':11} {'shape':26} {'MB|GFLOP':>8}  {'eager':>17}  {'compile':>17}  {'triton':>17}  of peak"
    print(header)
    print("-" * len(header))
    for kernel, label, work, ref, fast, make in cases(args.batch, dtype, "cuda" if cuda else "cpu", args.cache_frames):
        flops = work[1] if isinstance(work, tuple) else None
        start = f"{kernel:11} {label:26} {(flops / 1e9 if flops else work / 1e6):8.1f}"
        if not cuda:
            print(f"{start}  not measured (no CUDA)")
            continue
        inputs = make()
        kernels.set_backend("triton")
        expected = ref(*(t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs))
        got = fast(*inputs)
        # A sanity check of the timed call's output, loose enough for bf16 attention;
        # tests/test_kernels_parity.py holds each kernel's own tolerance.
        torch.testing.assert_close(got.float(), expected, rtol=2**-6, atol=2**-6)
        cells, best = [], None
        for name in ("eager", "compile", "triton"):
            if name == "compile" and args.no_compile:
                cells.append(f"{'-':>17}")
                continue
            if name == "compile":
                try:  # torch.compile can fail on a machine's toolchain: its cell says so, the others go on
                    ms = median_ms(torch.compile(ref, dynamic=False), inputs, args.repeats)
                except Exception as e:
                    cells.append(f"{'failed: ' + type(e).__name__:>17}")
                    continue
            else:
                ms = median_ms(ref if name == "eager" else fast, inputs, args.repeats)
            if flops:
                cells.append(f"{ms * 1e3:7.1f} us {flops / (ms * 1e-3) / 1e12:4.0f}TF/s")
                continue
            gbs = work / (ms * 1e-3) / 1e9
            cells.append(f"{ms * 1e3:7.1f} us {gbs:6.0f}GB/s")
            best = gbs if name == "triton" else best
        peak = peak_bandwidth()
        print(f"{start}  {'  '.join(cells)}  " + (f"{best * 1e9 / peak:6.0%}" if peak and best else "     -"))
    return 0


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
