"""`livestyle bench`: livestyle against diffusers and StreamDiffusion on this machine, in one run.

    livestyle bench                          # the quick set: every section, CPU-sized (< 10 min on 2 cores)
    livestyle bench --json out.json --markdown out.md --plot out.png
    livestyle bench --sections unet frame --steps 1 2 4 --sizes 256 512 --rounds 5
    livestyle bench --smoke                  # tiny shapes, seconds: that every section still runs (CI)
    python benchmarks/suite.py ...           # the same without the CLI

Every comparison is measured in one process (one run), alternating round-robin between
the systems, so a slow spell of a shared machine hits all alike; each figure is the
median of --rounds rounds with its min and max. A row that cannot be measured here says
why ("not measured (no CUDA)", "not installed"), never a number.

Sections (see benchmarks/peers.py for the systems and their weights):
- unet: one U-Net call, livestyle's against diffusers' UNet2DConditionModel holding the
  same tensors, SD-Turbo's architecture, batch 1: fp32 on the CPU at 256x256 (32x32
  latents), on the main thread and on a worker thread, with glibc's allocator as it comes
  and with livestyle's (threads.keep_allocations): ms per call, minor page faults and
  system CPU per call. fp16/bf16 at 512x512 on CUDA. torch.compile with --compile (on
  this CPU the full-size U-Net takes ~5 minutes to compile).
- frame: img2img from a uint8 frame to a uint8 frame, tiny autoencoder included, 1, 2
  and 4 steps (--steps), per frame and stream batch: livestyle's engine (a file stream:
  every frame restyled), StreamDiffusion and diffusers' img2img pipeline, same weights,
  timesteps and frames: frames per second, ms per frame end to end, latency in frames.
  Peak memory: on CUDA per system (torch.cuda.max_memory_allocated); on a CPU one figure
  for the process (its peak RSS), since the systems share one process and their weights.
- demo: the embedded demo model through the engine, end to end (not summed stages), at
  256x256 and 512x512, 1 step, temporal parts off and all on.
- contention: the demo model's fps at 256x256 quiet and with one busy process beside it
  (`python -c "while True: pass"`), each thread policy in its own process (OpenMP reads
  its wait policy at start): torch's defaults against livestyle's (livestyle/threads.py).
- temporal: the demo model's fps with each temporal part on its own, against all off.
- roofline: FLOPs of one frame counted by torch.utils.flop_counter (U-Net, encode and
  decode), divided by the median time of those calls: achieved TFLOP/s, and the share of
  the device's peak where the peak is known (a CPU's is not: "peak unknown").
- sdxl: SDXL-Turbo's architecture (the SDXL base U-Net, TAESDXL's config; peers.py) at
  512x512, 1 step, batch 1: the U-Net step, livestyle's against diffusers' holding the
  same tensors, alternating (ms per call, FLOPs counted, achieved TFLOP/s), and the frame
  through livestyle's engine (fps, ms per frame). fp16 and bf16 on CUDA (eager, CUDA
  graphs for the frame, torch.compile with --compile); fp32 on a CPU only with --full
  (one call of the 2.6-billion-parameter U-Net takes 11-64 s on 2 shared cores; the
  section took 8 minutes and 11.6 GB).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import queue
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # python benchmarks/suite.py from a checkout
    sys.path.insert(0, str(ROOT))

from livestyle import threads  # noqa: E402  (imports no torch: the thread policy comes first)

SECTIONS = ("unet", "frame", "demo", "contention", "temporal", "roofline", "sdxl")
NO_CUDA = "not measured (no CUDA)"
# Dense fp16/bf16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s), by device name.
PEAKS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= n <= 1000:
        raise argparse.ArgumentTypeError(f"{n}: must be 1 to 1000")
    return n


def _side(text: str) -> int:
    n = _count(text)
    if n % 8 or not 64 <= n <= 1024:
        raise argparse.ArgumentTypeError(f"{n}: a multiple of 8 from 64 to 1024")
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="NAME",
                        help=f"which sections ({', '.join(SECTIONS)}; default all)")
    parser.add_argument("--steps", nargs="+", type=int, choices=(1, 2, 3, 4), default=None,
                        help="frame section: steps (default 1 2 4; --smoke: 1 2)")
    parser.add_argument("--sizes", nargs="+", type=_side, default=None,
                        help="frame section: sizes on a CPU (default 256; --full: 256 512); CUDA: 512")
    parser.add_argument("--rounds", type=_count, default=None, help="round-robin rounds (default 3; --smoke 1)")
    parser.add_argument("--frames", type=_count, default=None, help="frames per system per round (default 3)")
    parser.add_argument("--full", action="store_true", help="sizes 256 512, channels_last rows, the 1-thread policy "
                        "(about an hour on 2 CPU cores)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile'd U-Nets (minutes each)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one round: checks that it runs")
    parser.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="write the tables as markdown")
    parser.add_argument("--plot", metavar="FILE", help="fps against resolution and steps as a PNG (matplotlib)")


# -- Timing -------------------------------------------------------------------------------------

def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def cell(s: dict | None, digits: int = 1) -> str:
    if not s:
        return "-"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


class Runner:
    """A thread that runs what it is handed: the place a model runs when it is not the main thread."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._serve, name="bench-worker", daemon=True)
        self.thread.start()

    def _serve(self):
        while (job := self.jobs.get()) is not None:
            fn, answer = job
            try:
                answer.put((True, fn()))
            except BaseException as e:  # raised again on the caller's thread
                answer.put((False, e))

    def __call__(self, fn):
        answer: queue.Queue = queue.Queue(maxsize=1)
        self.jobs.put((fn, answer))
        ok, value = answer.get()
        if not ok:
            raise value
        return value

    def close(self):
        self.jobs.put(None)
        self.thread.join()


def rotated(items: list, r: int) -> list:
    """Round r's order: each round starts one later, so no system always follows the same one."""
    r %= max(len(items), 1)
    return items[r:] + items[:r]


def measured(fn, sync) -> dict:
    """One call of fn: wall ms, minor page faults and system CPU ms of the process meanwhile."""
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    sync()
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    return {"ms": (t1 - t0) * 1e3, "faults": r1.ru_minflt - r0.ru_minflt, "sys_ms": (r1.ru_stime - r0.ru_stime) * 1e3}


# -- Context shared by the sections ---------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace):
        import torch

        self.args, self.torch = args, torch
        self.cuda = torch.cuda.is_available()
        self.device = "cuda" if self.cuda else "cpu"
        self.smoke = args.smoke
        self.rounds = args.rounds or (1 if args.smoke else 3)
        self.frames = args.frames or (2 if args.smoke else 3)
        self.steps = args.steps or ([1, 2] if args.smoke else [1, 2, 4])
        default_sizes = [64] if args.smoke else [256, 512] if args.full else [256]
        self.sizes = [512] if self.cuda and not args.smoke else (args.sizes or default_sizes)
        self.rows: list[dict] = []
        self._parts = {}
        self.timings: dict = {}  # for the roofline: (what, size) -> median ms

    def parts(self, dtype=None, family: str = "sd2"):
        """The weights of SD-Turbo's architecture (family "sd2") or SDXL-Turbo's ("sdxl") in dtype."""
        import gc

        from peers import sd_turbo_parts, sdxl_turbo_parts

        key = (family, dtype or self.torch.float32)
        if key not in self._parts:
            self._parts.clear()  # one set of full-size weights at a time (SDXL's: 10 GB in fp32)
            gc.collect()
            make = sdxl_turbo_parts if family == "sdxl" else sd_turbo_parts
            self._parts[key] = make(tiny=self.smoke, device=self.device, dtype=key[1])
        return self._parts[key]

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def row(self, section: str, config: str, system: str, **fields) -> dict:
        row = {"section": section, "configuration": config, "system": system, **fields}
        self.rows.append(row)
        print(f"  {config} | {system} | " + "; ".join(f"{k} {cell(v) if isinstance(v, dict) else v}"
                                                      for k, v in fields.items()), flush=True)
        return row


# -- Sections -----------------------------------------------------------------------------------

def unet_child(policy: str, size: int, tiny: bool) -> int:
    """One side of the unet section, in its own process (a thread's malloc arena is fixed at
    its start, so the allocators cannot take turns in one process): build the U-Nets, then
    answer each line "SYSTEM PLACE" on stdin with one timed call as a JSON line."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the same OpenMP policy on both sides
    if policy == "kept":
        threads.keep_allocations()  # before any thread exists, as the CLI and the Engine do
    import torch

    torch.set_num_threads(threads.default_threads())
    import copy

    from peers import sd_turbo_parts

    from livestyle.models.packed import pack

    parts = sd_turbo_parts(tiny=tiny)
    x = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([359.0])
    # livestyle's U-Net as the engine runs it on a CPU in fp32: weights packed for oneDNN
    # (models/packed.py), a copy, so the plain one keeps its row.
    packed_unet = pack(copy.deepcopy(parts.unet))
    calls = {"livestyle": lambda: parts.unet(x, t, parts.context),
             "livestyle packed": lambda: packed_unet(x, t, parts.context),
             "diffusers": lambda: parts.diffusers_unet(x, t, encoder_hidden_states=parts.context).sample}
    runner = Runner()
    with torch.inference_mode():
        for fn in calls.values():  # warm-up: oneDNN's primitives, the first allocations
            fn()
            runner(fn)
        print("ready", flush=True)
        for line in sys.stdin:
            system, place = line.rsplit(maxsplit=1)
            fn = calls[system]
            result = measured(fn, lambda: None) if place == "main" else runner(lambda: measured(fn, lambda: None))
            print(json.dumps(result), flush=True)
    runner.close()
    return 0


class Child:
    """A unet_child process, spoken to one line at a time."""

    def __init__(self, policy: str, size: int, tiny: bool):
        self.proc = subprocess.Popen([sys.executable, str(HERE / "suite.py"), "--unet-child", policy, str(size),
                                      str(int(tiny))], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)

    def wait_ready(self) -> None:
        if self.proc.stdout.readline().strip() != "ready":
            self._failed()

    def __call__(self, system: str, place: str) -> dict:
        self.proc.stdin.write(f"{system} {place}\n")
        line = self.proc.stdout.readline()
        if not line:
            self._failed()
        return json.loads(line)

    def _failed(self):
        self.proc.kill()
        raise RuntimeError("unet child failed: " + self.proc.stderr.read().strip()[-500:])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def section_unet(b: Bench) -> None:
    size = 64 if b.smoke else 256
    label = f"fp32, cpu, {size}x{size}, batch 1"
    if b.cuda:
        b.row("unet", label, "livestyle, diffusers", note="CPU rows are measured on a machine without CUDA")
    else:
        _unet_cpu(b, size, label)
    if b.args.compile and not b.cuda:
        _unet_compiled(b, label)
    elif not b.cuda:
        b.row("unet", f"{label}, torch.compile", "livestyle, diffusers", note="not run (--compile; minutes)")
    _unet_cuda(b)


UNET_SYSTEMS = ("livestyle", "livestyle packed", "diffusers")


def _unet_cpu(b: Bench, size: int, label: str) -> None:
    """Both U-Nets, main thread and a worker thread, glibc's allocator and livestyle's: each
    allocator in its own process (both started first, then called in turn)."""
    children = {"glibc default": Child("default", size, b.smoke), "kept": Child("kept", size, b.smoke)}
    try:
        for child in children.values():
            child.wait_ready()
        configs = [(system, place, policy) for system in UNET_SYSTEMS
                   for place in ("main", "worker") for policy in children]
        results = {k: [] for k in configs}
        for r in range(b.rounds):
            for system, place, policy in rotated(configs, r):
                results[(system, place, policy)].append(children[policy](system, place))
    finally:
        for child in children.values():
            child.close()
    for (system, place, policy), runs in results.items():
        ms = spread([r["ms"] for r in runs])
        b.row("unet", f"{label}, {place} thread, allocator {policy}", system, ms=ms,
              faults_per_call=round(statistics.median(r["faults"] for r in runs)),
              sys_ms_per_call=round(statistics.median(r["sys_ms"] for r in runs), 1))
    for place in ("main", "worker"):
        for policy in children:
            for system in ("livestyle", "livestyle packed"):
                ratio = [d["ms"] / o["ms"] for o, d in zip(results[(system, place, policy)],
                                                             results[("diffusers", place, policy)])]
                b.row("unet", f"{label}, {place} thread, allocator {policy}", f"{system} vs diffusers (speed-up)",
                      ratio=spread(ratio))
    for system in UNET_SYSTEMS:
        ratio = [d["ms"] / k["ms"] for d, k in zip(results[(system, "worker", "glibc default")],
                                                     results[(system, "worker", "kept")])]
        b.row("unet", f"{label}, worker thread", f"{system}: allocator kept vs glibc default (speed-up)",
              ratio=spread(ratio))


def _unet_compiled(b: Bench, label: str) -> None:
    torch = b.torch
    parts = b.parts()
    size = 64 if b.smoke else 256
    x = torch.randn(1, 4, size // 8, size // 8, device=b.device)
    t = torch.tensor([359.0], device=b.device)
    c = parts.context
    # Freezing: inductor folds the weights in as constants, prepacked for oneDNN once (no
    # reorder per call); plain torch.compile keeps them as inputs.
    torch._inductor.config.freezing = True
    ours, theirs = torch.compile(parts.unet), torch.compile(parts.diffusers_unet)
    calls = {"livestyle, torch.compile (inductor, freezing)": lambda: ours(x, t, c),
             "diffusers, torch.compile (inductor, freezing)": lambda: theirs(x, t, encoder_hidden_states=c).sample}
    runs = {k: [] for k in calls}
    with torch.inference_mode():
        for fn in calls.values():  # the compilation itself
            fn()
        for _ in range(b.rounds):
            for name, fn in calls.items():
                runs[name].append(measured(fn, b.sync)["ms"])
    for name, ms in runs.items():
        b.row("unet", f"{label}, main thread, allocator kept", name, ms=spread(ms))


def _unet_cuda(b: Bench) -> None:
    torch = b.torch
    for dtype_name in ("fp16", "bf16"):
        label = f"{dtype_name}, cuda, 512x512, batch 1"
        if not b.cuda:
            b.row("unet", label, "livestyle, diffusers", note=NO_CUDA)
            continue
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
        parts = b.parts(dtype)
        x = torch.randn(1, 4, 64, 64, device="cuda", dtype=dtype)
        t = torch.tensor([359.0], device="cuda")
        c = parts.context
        calls = {"livestyle": lambda: parts.unet(x, t, c),
                 "diffusers": lambda: parts.diffusers_unet(x, t, encoder_hidden_states=c).sample}
        if b.args.compile:
            cl, cd = torch.compile(parts.unet), torch.compile(parts.diffusers_unet)
            calls["livestyle, torch.compile"] = lambda: cl(x, t, c)
            calls["diffusers, torch.compile"] = lambda: cd(x, t, encoder_hidden_states=c).sample
        runs = {k: [] for k in calls}
        with torch.inference_mode():
            for fn in calls.values():
                for _ in range(3):
                    fn()
            for _ in range(max(b.rounds, 5)):
                for name, fn in calls.items():
                    runs[name].append(_cuda_ms(torch, fn, 10))
        for name, ms in runs.items():
            b.row("unet", label, name, ms=spread(ms))


def _cuda_ms(torch, fn, n: int) -> float:
    """Mean ms of n back-to-back calls, by CUDA events read once at the end."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def variants(b: Bench, steps: int) -> dict:
    """livestyle's rows in the frame section: name -> peers.Variant."""
    from peers import Variant

    rows = {"livestyle": Variant()}
    if steps == 1:
        rows["livestyle, all temporal parts"] = Variant(temporal=True)
    if b.cuda:
        rows["livestyle, kernels off (torch reference)"] = Variant(kernels="torch")
        rows["livestyle, CUDA graphs"] = Variant(cuda_graphs=True)
        rows["livestyle, channels_last"] = Variant(channels_last=True)
    elif b.args.full and steps == 1:
        rows["livestyle, channels_last"] = Variant(channels_last=True)
    if b.args.compile and steps == 1:
        rows["livestyle, torch.compile (inductor)"] = Variant(compile="inductor")
        if b.cuda:
            rows["livestyle, torch.compile + CUDA graphs"] = Variant(compile="inductor", cuda_graphs=True)
    return rows


def section_frame(b: Bench) -> None:
    from peers import frame_systems

    from livestyle.capture.sources import SyntheticSource

    torch = b.torch
    threads.keep_allocations()
    dtypes = [torch.float16, torch.bfloat16] if b.cuda else [torch.float32]
    for dtype in dtypes:
        parts = b.parts(dtype)  # the systems of one round-robin share these weights, so one dtype each
        for size in b.sizes:
            clip = [f.to_ndarray(format="rgb24") for f in SyntheticSource("coffee", (size, size), 30, 2 + b.frames)]
            for steps in b.steps if dtype != torch.bfloat16 else [1]:
                for stream_batch in ((True,) if steps == 1 else (False, True)):
                    mode = "batch 1" if steps == 1 else ("stream batch" if stream_batch else "per frame")
                    label = f"{size}x{size}, {steps} step{'s' * (steps > 1)}, {mode}, {str(dtype)[6:]}, {b.device}"
                    systems = frame_systems(parts, size, steps, stream_batch, variants(b, steps), b.device, dtype)
                    _frame_round_robin(b, label, systems, clip, size, steps, stream_batch)
    if not b.cuda:
        b.row("frame", "512x512, 1 step, fp16 and bf16, cuda (eager, CUDA graphs, kernels on/off)",
              "livestyle, StreamDiffusion, diffusers img2img", note=NO_CUDA)


def _frame_round_robin(b: Bench, label: str, systems: dict, clip: list, size: int, steps: int,
                       stream_batch: bool, section: str = "frame") -> None:
    torch = b.torch
    live = {k: s for k, s in systems.items() if not isinstance(s, str)}
    for name, reason in systems.items():
        if isinstance(reason, str):
            b.row(section, label, name, note=reason)
    peaks = {}
    for name, s in live.items():
        if b.cuda:
            torch.cuda.reset_peak_memory_stats()
        s.open()
        for f in clip[:2]:  # warm-up, and the stream batch filled
            s(f)
        s.finish()
        if b.cuda:
            peaks[name] = torch.cuda.max_memory_allocated() / 2**20
    fps = {k: [] for k in live}
    for r in range(b.rounds):
        for name, s in rotated(list(live.items()), r):
            start = time.perf_counter()
            for f in clip[2:]:
                s(f)
            s.finish()
            b.sync()
            fps[name].append(len(clip[2:]) / (time.perf_counter() - start))
    for s in live.values():
        s.close()
    base = fps.get("livestyle")
    for name, values in fps.items():
        extra = {}
        if base and name != "livestyle":  # per round, then the median: a slow spell hits both alike
            # A peer's row: how much faster livestyle is; one of livestyle's own variants: what it costs.
            key = "cost_vs_livestyle" if name.startswith("livestyle") else "livestyle_speedup"
            extra[key] = spread([a / v for a, v in zip(base, values)])
        peak = f"{peaks[name]:.0f} MB (CUDA, this system)" if name in peaks else \
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB (process peak RSS, all systems)"
        b.row(section, label, name, fps=spread(values), ms_per_frame=spread([1e3 / v for v in values]),
              latency_frames=live[name].latency_frames, peak_memory=peak, **extra)
        b.timings[(section, name, size, steps, stream_batch)] = 1e3 / statistics.median(values)


def _demo_fps(engine, settings, clip: list) -> float:
    stream = engine.open_stream(settings, lambda f: None, live=False)
    for f in clip[:4]:
        stream.submit(f)
    stream.flush()
    start = time.perf_counter()
    for f in clip[4:]:
        stream.submit(f)
    stream.flush()
    fps = len(clip[4:]) / (time.perf_counter() - start)
    stream.close()
    return fps


def _demo_table(b: Bench, section: str, configs: dict, sizes: list[int]) -> None:
    from livestyle.capture.sources import SyntheticSource
    from livestyle.models.demo import load_demo
    from livestyle.stream.engine import Engine

    n = 6 if b.smoke else 24
    with Engine(lambda: load_demo(b.device), b.device) as engine:
        for size in sizes:
            clip = [f.to_ndarray(format="rgb24") for f in SyntheticSource("coffee", (size, size), 30, 4 + n)]
            named = {name: make(size) for name, make in configs.items()}
            fps = {k: [] for k in named}
            for _ in range(b.rounds):
                for name, settings in named.items():
                    fps[name].append(_demo_fps(engine, settings, clip))
            first = next(iter(fps))
            for name, values in fps.items():  # the fps given up against the first row, per round
                extra = {} if name == first else {
                    "fps_cost_vs_first_row": spread([1 - v / f for v, f in zip(values, fps[first])])}
                b.row(section, f"{size}x{size}, {name}", "livestyle demo model", fps=spread(values),
                      ms_per_frame=spread([1e3 / v for v in values]), **extra)
                b.timings[(section, name, size)] = 1e3 / statistics.median(values)


def section_demo(b: Bench) -> None:
    from livestyle.config import StreamSettings, TemporalSettings

    configs = {"1 step, temporal off": lambda s: StreamSettings(size=(s, s), temporal=TemporalSettings.off()),
               "1 step, all temporal parts (default)": lambda s: StreamSettings(size=(s, s))}
    _demo_table(b, "demo", configs, [64] if b.smoke else [256, 512])


def section_temporal(b: Bench) -> None:
    from livestyle.config import StreamSettings, TemporalSettings

    off = TemporalSettings.off()
    configs = {
        "all off": off,
        "+ cached attention (2 frames)": TemporalSettings(flow=False),
        "+ cached attention and feature fusion (0.8)": TemporalSettings(flow=False, fusion=0.8),
        "+ flow-guided latents and output": TemporalSettings(attention_frames=0),
        "+ similarity filter (0.98; a skipped frame counts as output)": TemporalSettings(
            attention_frames=0, flow=False, similarity=0.98),
        "all on (default)": TemporalSettings(),
    }
    configs = {k: (lambda s, t=t: StreamSettings(size=(s, s), temporal=t)) for k, t in configs.items()}
    _demo_table(b, "temporal", configs, [64] if b.smoke else [256])


CONTENTION_CHILD = """
import json, sys, time
policy, size, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, {root!r})
from livestyle import threads
if policy == "livestyle":
    threads.configure(small_model=True)  # as the CLI does for the demo model, before torch is imported
elif policy == "1 thread":
    threads.configure(1)
import cv2, torch
cv2.setNumThreads(1)
from livestyle.capture.sources import SyntheticSource
from livestyle.config import StreamSettings
from livestyle.models.demo import load_demo
from livestyle.stream.engine import Engine
warm = min(4, n)
clip = [f.to_ndarray(format="rgb24") for f in SyntheticSource("coffee", (size, size), 30, warm + n)]
with Engine(lambda: load_demo("cpu"), "cpu") as engine:
    if policy == "torch defaults":
        threads.release_allocations()   # the engine's worker kept them at its start: glibc's own here
    stream = engine.open_stream(StreamSettings(size=(size, size)), lambda f: None, live=False)
    for f in clip[:warm]: stream.submit(f)
    stream.flush(); start = time.perf_counter()
    for f in clip[warm:]: stream.submit(f)
    stream.flush()
    print(json.dumps({{"fps": n / (time.perf_counter() - start), "threads": torch.get_num_threads()}}))
"""


def beside_busy(argv: list[str], env: dict, busy: bool, timeout: float, what: str) -> dict:
    """Run a measuring child process, with one `while True: pass` process beside it when
    `busy`; its last stdout line, as JSON. RuntimeError naming `what` if it failed."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    if out.returncode:
        raise RuntimeError(f"{what} failed: {out.stderr.strip()[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def section_contention(b: Bench) -> None:
    if b.cuda:
        b.row("contention", "demo model", "livestyle", note="CPU only (a busy CPU process barely slows a GPU)")
        return
    size, n = (64, 2) if b.smoke else (256, 24)
    policies = ["torch defaults", "livestyle"] + (["1 thread"] if b.args.full else [])
    code = CONTENTION_CHILD.format(root=str(ROOT))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS")}
    fps = {(p, busy): [] for p in policies for busy in (False, True)}
    used = {}
    for _ in range(b.rounds):
        for policy in policies:
            for busy in (False, True):
                result = beside_busy([sys.executable, "-c", code, policy, str(size), str(n)], env, busy, 600,
                                     f"contention child ({policy})")
                fps[(policy, busy)].append(result["fps"])
                used[policy] = result["threads"]
    for policy in policies:
        quiet, busy = fps[(policy, False)], fps[(policy, True)]
        what = {"torch defaults": "OpenMP's default wait (spin), glibc's allocator",
                "livestyle": "OMP_WAIT_POLICY=PASSIVE, large allocations kept",
                "1 thread": "OMP_WAIT_POLICY=PASSIVE, large allocations kept"}[policy]
        label = f"{size}x{size}, 1 step, all temporal parts; {policy}: {used[policy]} threads, {what}"
        b.row("contention", label, "quiet", fps=spread(quiet))
        b.row("contention", label, "one busy process", fps=spread(busy),
              share_of_quiet=spread([x / q for x, q in zip(busy, quiet)]))


def section_roofline(b: Bench) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from livestyle.models import packed
    from livestyle.models.demo import load_demo
    from livestyle.models.loading import decode_frames

    torch = b.torch
    parts = b.parts(torch.float16 if b.cuda else torch.float32)  # packed in place if the frame section ran
    size = b.sizes[0]
    dtype = parts.context.dtype
    images = torch.rand(1, 3, size, size, device=b.device, dtype=dtype)
    t = torch.tensor([359.0], device=b.device)
    demo = load_demo(b.device)
    demo_context = demo.styles.context(demo.styles.names[0]).to(b.device)
    frames = {
        f"SD-Turbo architecture, {size}x{size}, 1 step (encode, U-Net, decode)":
            lambda: parts.autoencoder.decode(parts.unet(parts.autoencoder.encode(images), t, parts.context)),
        f"demo model, {size}x{size}, 1 step (encode, U-Net, decode)":
            lambda: decode_frames(demo.autoencoder, demo.unet(demo.autoencoder.encode(images.float()), t, demo_context),
                                  images.float()),
    }
    name = torch.cuda.get_device_name() if b.cuda else None
    peak = next((v for k, v in PEAKS.items() if name and k in name), None)
    with torch.inference_mode():
        for label, fn in frames.items():
            with FlopCounterMode(display=False, custom_mapping=packed.FLOP_FORMULAS) as counter:
                fn()
            flops = counter.get_total_flops()
            fn()
            ms = [measured(fn, b.sync)["ms"] for _ in range(max(b.rounds, 3))]
            achieved = flops / (statistics.median(ms) * 1e-3) / 1e12
            share = f"{achieved / peak:.1%} of {peak:g} TFLOP/s (datasheet, dense)" if peak and b.cuda else \
                "peak unknown"
            b.row("roofline", label, f"livestyle, {str(dtype)[6:]}, {b.device}", gflop_per_frame=round(flops / 1e9, 2),
                  ms=spread(ms), achieved_tflops=round(achieved, 4), of_peak=share)


SDXL_ON_CPU = ("not run without --full: SDXL's U-Net is 2.6 billion parameters (10 GB in fp32); one 512x512 "
               "call took 11-64 s on 2 shared CPU cores, and --full makes 8 of them and 5 frames (8 minutes here)")


def section_sdxl(b: Bench) -> None:
    """SDXL-Turbo's architecture: the U-Net step against diffusers', and the frame through the engine."""
    torch = b.torch
    size = 64 if b.smoke else 512
    if b.cuda:
        dtypes = [torch.float16, torch.bfloat16]
    elif b.smoke or b.args.full:
        dtypes = [torch.float32]
    else:
        dtypes = []
        b.row("sdxl", f"U-Net step and frame, fp32, cpu, {size}x{size}, 1 step", "livestyle, diffusers",
              note=SDXL_ON_CPU)
    threads.keep_allocations()  # as section_frame: the engine's worker keeps them anyway
    for dtype in dtypes:
        parts = b.parts(dtype, "sdxl")
        _sdxl_unet(b, parts, size, dtype)
        _sdxl_frame(b, parts, size, dtype)
        del parts  # before the next dtype's are made: one set at a time
    if not b.cuda:
        b.row("sdxl", "U-Net step and frame, fp16 and bf16, cuda, 512x512, 1 step (eager, CUDA graphs, compile)",
              "livestyle, diffusers", note=NO_CUDA)


def _short(dtype) -> str:
    """torch.float16 -> "fp16", as the unet section's labels name them."""
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[str(dtype).removeprefix("torch.")]


def _compiled(b: Bench, module):
    if not b.cuda:  # as _unet_compiled: the weights folded in, prepacked for oneDNN once
        b.torch._inductor.config.freezing = True
    return b.torch.compile(module)


def _sdxl_unet(b: Bench, parts, size: int, dtype) -> None:
    """livestyle's and diffusers' U-Net, the same tensors, alternating; FLOPs counted on the warm-up call."""
    from torch.utils.flop_counter import FlopCounterMode

    torch = b.torch
    label = f"U-Net step, {_short(dtype)}, {b.device}, {size}x{size}, batch 1, main thread"
    x = torch.randn(1, 4, size // 8, size // 8, device=b.device, dtype=dtype,
                    generator=torch.Generator(b.device).manual_seed(0))
    t = torch.tensor([359.0], device=b.device)
    calls = parts.unet_calls(x, t)
    if b.args.compile:
        compiled = dataclasses.replace(parts, unet=_compiled(b, parts.unet),
                                       diffusers_unet=_compiled(b, parts.diffusers_unet))
        calls.update({f"{k}, torch.compile (inductor)": fn for k, fn in compiled.unet_calls(x, t).items()})
    flops, outputs, runs = {}, {}, {k: [] for k in calls}
    with torch.inference_mode():
        for name, fn in calls.items():
            with FlopCounterMode(display=False) as counter:  # also the warm-up (and the compile)
                outputs[name] = fn()
            flops[name] = counter.get_total_flops()
            if b.cuda:
                for _ in range(2):
                    fn()
        for r in range(max(b.rounds, 5) if b.cuda else b.rounds):
            for name, fn in rotated(list(calls.items()), r):
                runs[name].append(_cuda_ms(torch, fn, 10) if b.cuda else measured(fn, b.sync)["ms"])
    # That both compute the same thing: each livestyle output against diffusers' in the same mode.
    differs = {name: (outputs[name] - outputs[name.replace("livestyle", "diffusers")]).abs().max().item()
               for name in outputs if name.startswith("livestyle")}
    for name, ms in runs.items():
        achieved = flops[name] / (statistics.median(ms) * 1e-3) / 1e12
        extra = {"max_abs_diff_vs_diffusers": float(f"{differs[name]:.2g}")} if name in differs else {}
        b.row("sdxl", label, name, ms=spread(ms), gflop_per_call=round(flops[name] / 1e9, 3),
              achieved_tflops=round(achieved, 4), **extra)
    for mode in ("", ", torch.compile (inductor)"):
        if f"livestyle{mode}" in runs:
            ratio = [d / o for o, d in zip(runs[f"livestyle{mode}"], runs[f"diffusers{mode}"])]
            b.row("sdxl", label, f"livestyle vs diffusers{mode} (speed-up)", ratio=spread(ratio))


def _sdxl_frame(b: Bench, parts, size: int, dtype) -> None:
    """The whole frame, uint8 in to uint8 out, through livestyle's engine (no peer streams SDXL here)."""
    from peers import LivestyleFrames, Variant

    from livestyle.capture.sources import SyntheticSource

    variants = {"livestyle": Variant()}
    if b.cuda or b.smoke:  # on a CPU at full size each row is minutes: the plain engine only
        variants["livestyle, all temporal parts"] = Variant(temporal=True)
    if b.cuda:
        variants["livestyle, CUDA graphs"] = Variant(cuda_graphs=True)
    if b.args.compile:
        variants["livestyle, torch.compile (inductor)"] = Variant(compile="inductor")
        if b.cuda:
            variants["livestyle, torch.compile + CUDA graphs"] = Variant(compile="inductor", cuda_graphs=True)
    # On a CPU at full size a frame takes as long as a U-Net call: one frame per round unless told.
    frames = b.frames if b.cuda or b.smoke or b.args.frames else 1
    clip = [f.to_ndarray(format="rgb24") for f in SyntheticSource("coffee", (size, size), 30, 2 + frames)]
    label = f"frame, {_short(dtype)}, {b.device}, {size}x{size}, 1 step, batch 1"
    systems = {name: LivestyleFrames(parts, size, 1, False, v, b.device, dtype) for name, v in variants.items()}
    _frame_round_robin(b, label, systems, clip, size, 1, False, section="sdxl")


RUNNERS = {"unet": section_unet, "frame": section_frame, "demo": section_demo, "contention": section_contention,
           "temporal": section_temporal, "roofline": section_roofline, "sdxl": section_sdxl}


# -- Report --------------------------------------------------------------------------------------

def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def meta(b: Bench, args: argparse.Namespace) -> dict:
    torch = b.torch
    device = torch.cuda.get_device_name() if b.cuda else (platform.processor() or platform.machine())
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": f"{device}, {threads.usable_cpus()} CPUs" + ("" if b.cuda else " (no CUDA)"),
            "threads": threads.describe(), "python": platform.python_version(),
            "versions": {d: _version(d) for d in ("torch", "diffusers", "streamdiffusion", "triton")},
            "options": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, list, type(None)))},
            "rounds": b.rounds, "frames_per_round": b.frames, "steps": b.steps, "sizes": b.sizes, "smoke": b.smoke}


RATIOS = ("ratio", "share_of_quiet", "livestyle_speedup", "cost_vs_livestyle", "fps_cost_vs_first_row")  # two decimals


def markdown(info: dict, rows: list[dict]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    sections = " ".join(info["options"].get("sections") or [])
    lines = [f"livestyle bench (sections {sections}): {info['date']}; {info['device']}; {info['threads']}; "
             f"{versions}; medians [min-max] of {info['rounds']} round-robin rounds.", ""]
    for section in dict.fromkeys(r["section"] for r in rows):
        lines += [f"**{section}**", "", "| configuration | system | figures |", "| --- | --- | --- |"]
        for r in rows:
            if r["section"] != section:
                continue
            figures = "; ".join(
                f"{k.replace('_', ' ')} {cell(v, 2 if k in RATIOS else 1) if isinstance(v, dict) else v}"
                for k, v in r.items() if k not in ("section", "configuration", "system"))
            lines.append(f"| {r['configuration']} | {r['system']} | {figures} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str:
    """fps against steps, one line per system and size (frame section); what was written, in words."""
    try:
        import matplotlib
    except ImportError:
        return "no plot: matplotlib is not installed (pip install \"livestyle[bench]\")"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r["section"] != "frame" or "fps" not in r or "per frame" in r["configuration"]:
            continue
        size, steps = r["configuration"].split(", ")[:2]
        series.setdefault(f"{r['system']}, {size}", []).append((int(steps.split()[0]), r["fps"]["median"]))
    if not series:
        return "no plot: the frame section measured nothing"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xlabel("steps (stream batch from 2)")
    ax.set_ylabel("frames per second (median)")
    ax.set_xticks(sorted({p[0] for pts in series.values() for p in pts}))
    ax.set_title("img2img, SD-Turbo architecture, tiny autoencoder")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


def run(args: argparse.Namespace) -> int:
    """Run the chosen sections; 0 when every one ran, 1 when one failed (the others still run).
    The thread policy is the caller's (threads.configure)."""
    if str(HERE) not in sys.path:  # peers.py, beside this file; only now (`livestyle` loads this module)
        sys.path.insert(0, str(HERE))
    b = Bench(args)
    print(f"livestyle bench: {threads.describe()}; {b.rounds} rounds; sections {', '.join(args.sections)}", flush=True)
    failed = []
    for name in args.sections:
        print(f"[{name}]", flush=True)
        start = time.perf_counter()
        try:
            RUNNERS[name](b)
        except Exception as e:  # one section's failure is recorded, the others still run
            failed.append(name)
            b.row(name, "-", "-", note=f"failed: {type(e).__name__}: {e}"[:300])
        print(f"[{name}] {time.perf_counter() - start:.0f} s", flush=True)
    info = meta(b, args)
    info["failed_sections"] = failed
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": info, "rows": b.rows}, indent=1) + "\n")
    table = markdown(info, b.rows)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    print("\n" + table)
    if args.plot:
        print(plot(b.rows, args.plot))
    if failed:
        print(f"livestyle bench: error: sections failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--unet-child"]:  # section_unet's own processes
        sys.path.insert(0, str(HERE))
        return unet_child(argv[1], int(argv[2]), argv[3] == "1")
    parser = argparse.ArgumentParser(prog="benchmarks/suite.py", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--threads", type=int, help="torch threads (default: livestyle's, threads.default_threads)")
    args = parser.parse_args(argv)
    try:
        threads.configure(args.threads)  # before torch is imported: the OpenMP wait policy
    except Exception as e:  # a bad --threads: one line
        print(f"livestyle bench: error: {e}", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
