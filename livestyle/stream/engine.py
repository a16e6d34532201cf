"""The streaming engine: one worker thread owns the device and serves every stream.

    engine = Engine(pipe, device="cpu")
    stream = engine.open_stream(settings, on_output, live=True)
    stream.submit(frame) ... stream.update(strength=0.6) ... stream.flush(); stream.close()

Per frame (DESIGN.md's data path): on the submitting thread, the resize to the
processing size, the small grey copy, the optical flow from the frame before and
Canny edges for a ControlNet that sees them; on the worker:

    similarity filter (small grey copy, CPU) -> skip, or
    encode -> [flow prior into the start latent: SD] -> [ControlNet images: control.py]
    -> the fixed-shape step(s) (step.py)
    -> [flow prior into the finished latent: demo bridge] -> decode
    -> [flow-guided blend of the previous output image] -> on_output(frame with the input's pts)

(the warps run on the device, kernels.propagate, from the small flow).

- Latest frame wins: each stream holds at most one waiting frame; a newer one replaces
  it (counted as dropped), so a slow model never builds up delay. For files
  (`live=False`) submit() waits instead, and every frame is restyled.
- Stream batch (StreamDiffusion): with S steps, slot k of a stream holds the frame that
  entered k calls ago, and one U-Net call advances all S frames by a step. The first
  frame runs its S steps one after another and is output at once (no warm-up
  frames); its intermediate latents prime the slots, so from the next frame on each
  call finishes one frame, S - 1 frames late. The slots are the stream's rows of its
  bucket: the frames wait there between calls, and the bucket moves them on a slot after
  each call (step.Bucket.advance); the worker keeps only their tags.
- Many streams: every stream with work is advanced together; streams whose rows fit
  one call (step.BucketKey) hold rows in one bucket of fixed size, and one
  fixed-shape step advances them all, padding rows and all (step.py).
- ControlNets (settings.controls) run inside the step, their scales rows of its
  coefficient table: a scale change (0 = off) or start/end is a retune, the next frame
  has it; other changes to the nets are a rebuild. Each stream-batch slot keeps the
  control images of its frame. The nets load on the worker, once per path while a
  bucket uses them; check() reads only their configs.
- Live updates are applied by the worker between frames; one that changes buffer
  shapes first finishes the frames in flight with the old settings. An update that
  cannot be applied is the stream's alone: it keeps its previous settings, or, with
  none, fails (submit() raises StreamFailed).
- Every frame comes out or is counted (StreamStats says how). A frame that fails (the
  model raised, device memory ran out, the output is not finite) is logged with its
  pts and goes out in its turn as a stand-in, counted as an error; the frames in
  flight with it go on. Batched work that fails is retried stream by stream, so one
  stream's failure never fails another's frames.
- No host syncs per frame except the one that cannot be avoided: the restyled frame
  coming back to the host for its sink (with a flag saying whether it is finite). On
  CUDA that copy is queued into pinned memory and the frames go out once it is done,
  so the next call's upload and model run overlap it.
- stats()["host_ms"]: the worker's wall time per output frame less the time in model
  calls and waiting for the device: what a faster device would not shorten.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import statistics
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass

import av
import cv2
import numpy as np
import torch

from livestyle import kernels
from livestyle.config import StreamSettings, style_blend
from livestyle.errors import LivestyleError
from livestyle.frame import rgb_array
from livestyle.models.controlnet import ControlNet, MultiControlNet
from livestyle.models import packed
from livestyle.models.loading import Pipeline, decode_frames, load_controlnet
from livestyle.models.vae import KLAutoencoder
from livestyle.stream import control
from livestyle.stream.conditioning import Conditioning
from livestyle.stream.flow import FlowEstimator, flow_size, propagate, sampling_grid, small_grey, warp_inputs
from livestyle.stream.guidance import InitializeGuidance, make_guidance
from livestyle.stream.plan import make_plan
from livestyle.stream.state import StreamState, Tag, layout
from livestyle.stream.stats import ModelTimer, StreamMeter, StreamStats
from livestyle.stream.step import RENEW, Bucket, BucketKey, CapturedSteps, Part, denoise
from livestyle.threads import keep_allocations

log = logging.getLogger(__name__)

OutputCallback = Callable[[av.VideoFrame], None]


class StreamClosed(LivestyleError):
    """submit() or update() on a stream that was closed."""


class StreamFailed(LivestyleError):
    """submit() on a stream whose settings could not be applied at all (the message says why)."""


@dataclass
class Rows:
    """One stream's rows for a U-Net call: the slots it steps (a stream-batch call all S, a
    step-by-step call one), whose frames wait in the stream's rows of its bucket (step.py),
    and the frame entering the first of them, if one does."""

    state: StreamState
    slots: range  # the denoising slot (= step) of each row: its place in the stream's rows of the bucket
    # (start latent (1, C, h, w), reference latent (1, C, h, w), ControlNet images (1, 3, H, W) each)
    fresh: tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]] | None


# A step's result for the rows: their denoised latents (n, C, h, w).
Stepped = torch.Tensor
Denoising = Generator[Rows, Stepped, tuple[Tag, torch.Tensor]]


class Stream:
    """A handle on one stream of the engine; every method is thread-safe (see the module docstring)."""

    def __init__(self, engine: Engine, settings: StreamSettings, on_output: OutputCallback, live: bool, sid: str):
        self.engine, self.on_output, self.live, self.id = engine, on_output, live, sid
        self.scale_back = True  # see Engine.open_stream
        self.copying = 0  # output frames on their way back from the device (the worker's)
        self.settings = settings
        self.meter = StreamMeter()
        # Guarded by engine.lock: what the caller asked for, taken by the worker.
        self.pending: tuple[Tag, np.ndarray] | None = None
        self.requested: StreamSettings | None = settings
        self.reset_requested = self.flush_requested = self.closed = False
        self.working = self.owed = False
        self.failure: str | None = None  # set by the worker when no settings could be applied
        self.state: StreamState | None = None  # the worker's alone
        # submit()'s: the flow from each frame to the next, on the submitting thread(s).
        self._flow, self._flow_lock = FlowEstimator(), threading.Lock()
        self._previous: Tag | None = None

    def submit(self, frame: av.VideoFrame | np.ndarray) -> None:
        """Queue a frame (any size; RGB array or av.VideoFrame with pts/time_base).

        live streams: never blocks, replaces a frame still waiting (counted as dropped).
        file streams: blocks until the worker has taken the previous frame.
        Raises StreamClosed once closed, StreamFailed while no settings could be applied."""
        rgb = rgb_array(frame)
        H, W = rgb.shape[:2]
        pts, time_base = (frame.pts, frame.time_base) if isinstance(frame, av.VideoFrame) else (None, None)
        w, h = self.settings.size
        # Resizing and the grey copy happen here, on the caller's thread, beside the model.
        small = rgb if (W, H) == (w, h) else cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
        tag = Tag(pts, time_base, (W, H), time.monotonic(), small_grey(small, flow_size(w, h)))
        self._follow(tag, (w, h))
        if control.needs_edges(self.settings.controls):  # host work, here beside the model, as the flow
            tag.edges = control.host_edges(small)
        lock = self.engine.lock
        with lock:
            while not self.live and self.pending is not None and not self.closed and self.engine.running:
                lock.wait()
            if self.closed or not self.engine.running:
                raise StreamClosed(f"stream {self.id} is closed")
            if self.failure is not None:
                raise StreamFailed(self.failure)
            replaced = self.pending is not None
            if replaced:
                self.pending[0].motion = None  # dropped: its motion must not keep the frame before it alive
            self.pending = (tag, small)
            self.meter.submitted(replaced)
            lock.notify_all()

    def _follow(self, tag: Tag, size: tuple[int, int]) -> None:
        """The motion from the frame submitted before to this one, and its warp inputs at the
        latent and processing sizes: optical flow is host work, done here on the caller's
        thread so the worker only warps, on the device. The worker uses it when that frame
        was the last one output (no drop, no skip between them)."""
        temporal = self.settings.temporal
        with self._flow_lock:
            previous, self._previous = self._previous, tag
            warped = temporal.flow_blend or temporal.output_blend or control.warps(self.settings.controls)
            if not temporal.flow or not warped or previous is None or previous.grey.shape != tag.grey.shape:
                return
            motion = self._flow.motion(previous.grey, tag.grey)
        w, h = size
        tag.motion = (previous, motion, {s: warp_inputs(motion, s) for s in ((w // 8, h // 8), (w, h))})

    def update(self, settings: StreamSettings | None = None, **changes) -> StreamSettings:
        """Change settings live; checked now (an error names the field), applied from the next frame.

        If the worker then cannot apply them (say, device memory for a larger size), the
        stream keeps its previous settings (`settings` goes back to them) and
        stats().failed_updates counts it; a failed stream (StreamFailed) tries again."""
        new = (settings or self.settings).replace(**changes)
        self.engine.check(new)
        with self.engine.lock:
            if self.closed:
                raise StreamClosed(f"stream {self.id} is closed")
            self.settings = self.requested = new
            self.failure = None
            self.engine.lock.notify_all()
        return new

    def reset(self) -> None:
        """Forget temporal state (a scene cut)."""
        with self.engine.lock:
            self.reset_requested = True
            self.engine.lock.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every frame taken so far has been output. False on timeout."""
        lock = self.engine.lock
        with lock:
            self.flush_requested = True
            lock.notify_all()
            done = lock.wait_for(lambda: self.closed or not self.engine.running or not (
                self.pending or self.working or self.owed or self.requested or self.copying), timeout)
            self.flush_requested = False
            return done

    def close(self) -> None:
        """Stop the stream and free its state; frames not output yet are dropped (counted)."""
        with self.engine.lock:
            if self.closed:
                return
            self.closed = True
            if self in self.engine.streams:
                self.engine.streams.remove(self)
            self._discard()
            self.engine.lock.notify_all()

    def _discard(self) -> None:
        """Once closed, with engine.lock held: count the frames that will never be output
        as dropped and free the state. A stream the worker holds is discarded by the
        worker when its step ends."""
        if self.pending is not None:
            self.meter.discarded(1)
            self.pending = None
        if self.working or self.state is None:
            return
        self.meter.discarded(sum(1 + len(tag.repeats) for tag in self.state.owed()) + self.copying)
        self.engine.released.append(self.state)  # its rows go back to the bucket on the worker
        self.state = None

    def stats(self) -> StreamStats:
        return self.meter.snapshot()


class Engine:
    """Owns the model on one device and a worker thread that runs every stream's frames."""

    def __init__(self, model: Pipeline | Callable[[], Pipeline], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, compile: str | None = None, cuda_graphs: bool = False,
                 channels_last: bool = False, bucket_rows: int = 1, pack: bool | None = None):
        """model: a loaded Pipeline, or a function that loads one (e.g. `load_demo`).

        compile: a torch.compile backend ("inductor", or "eager"/"aot_eager" to check
        guards cheaply) for the fixed-shape step; cuda_graphs: capture it in CUDA graphs
        (CUDA only: LivestyleError elsewhere); channels_last: the U-Net and autoencoder
        in channels_last memory format (convolutions on CUDA in fp16/bf16 prefer it);
        bucket_rows: the smallest bucket (step.py), e.g. rows for every stream expected,
        so that streams joining never grow a bucket (a new shape: a compile, a capture);
        pack: the U-Net's, autoencoder's and ControlNets' convolutions and linear layers
        with weights reordered for oneDNN once (models/packed.py: SD-Turbo's U-Net 1.39x
        faster on the 2-core CPU here); None: on a CPU in fp32 when not compiling (inductor
        packs its own). It changes the pipeline's modules in place: their weights leave
        their state_dicts.

        Given a function, the worker thread loads the model itself. On a CPU that matters:
        when another thread has already run parallel torch work, OpenMP keeps a second
        team of threads and the worker's parallel regions slowed down ~2x here (2 cores,
        libgomp); a model loaded and run on one thread does not pay that. A loading
        error is raised here, in the caller's thread."""
        self.device, self.dtype = torch.device(device), dtype
        if cuda_graphs and self.device.type != "cuda":
            raise LivestyleError(f"CUDA graphs need a CUDA device, not {self.device.type}")
        if bucket_rows < 1:
            raise LivestyleError(f"bucket_rows = {bucket_rows}: must be at least 1")
        self.compile, self.cuda_graphs, self.channels_last = compile, cuda_graphs, channels_last
        self.bucket_rows = bucket_rows
        if pack is None:
            pack = self.device.type == "cpu" and dtype == torch.float32 and not compile
        if pack and (self.device.type != "cpu" or dtype != torch.float32):
            raise LivestyleError(f"packed weights are for fp32 on a CPU, not {dtype} on {self.device.type}")
        self.pack = pack
        self.buckets: dict[BucketKey, Bucket] = {}
        self.controlnets: dict[str, ControlNet] = {}  # loaded on the worker, by resolved path, while a bucket uses them
        self._control_configs: dict = {}  # check()'s: ControlNet configs read, by (path, modification time)
        self.released: list[StreamState] = []  # closed streams' states: their rows are given back on the worker
        self.compiles = 0
        self.flow_on_worker = 0  # motions estimated on the worker (the frame before was dropped or skipped)
        # Outputs copied back asynchronously (CUDA): (done marker, host rows, frames, h, w), oldest first.
        self.copies_async = self.device.type == "cuda"
        # Warps: on a GPU the sampling grid is built on the device from the small flow
        # (kernels.propagate); on the CPU the host path (flow.sampling_grid and
        # flow.propagate: OpenCV's remap and numpy, no OpenMP team) is the faster one, see
        # flow.py for the figures. Same result within 1e-4.
        self.grid_on_device = self.device.type != "cpu"
        self.copies: deque = deque()
        self._delivering = False
        # Host time per frame: the worker's wall time less model calls and waits for the device.
        self.device_s = 0.0
        self.host_ms: deque[float] = deque(maxlen=60)
        self.host_total_s, self.host_frames = 0.0, 0
        self.streams: list[Stream] = []
        self.lock = threading.Condition()
        self.running = True
        self.timer = ModelTimer(self.device)
        self.busy: deque[tuple[float, float]] = deque()
        self.batches = self.frames = 0
        self._ids = itertools.count(1)
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        keep_allocations()  # livestyle/threads.py: before the worker exists, whose malloc arena is chosen at its start
        self.worker = threading.Thread(target=self._work, args=(model,), name="livestyle-engine", daemon=True)
        self.worker.start()
        self._loaded.wait()
        if self._load_error is not None:
            self.worker.join()
            raise self._load_error

    def _load(self, model: Pipeline | Callable[[], Pipeline]) -> None:
        """On the worker: load the model if need be, move it to the device, get ready."""
        pipe = model() if callable(model) else model
        for module in (pipe.unet, pipe.text.encoder if pipe.text else None,
                       pipe.text_2.encoder if pipe.text_2 else None, pipe.styles):
            if module is not None:
                module.to(self.device, self.dtype).eval().requires_grad_(False)
        # SDXL's KL VAE overflows in fp16: loading keeps it in fp32 there (its weights say
        # so), and it takes and returns the engine's dtype; moved, not converted.
        upcast = (pipe.family == "sdxl" and isinstance(pipe.autoencoder, KLAutoencoder)
                  and self.dtype == torch.float16 and next(pipe.autoencoder.parameters()).dtype == torch.float32)
        if upcast:
            pipe.autoencoder.to(self.device)
        else:
            pipe.autoencoder.to(self.device, self.dtype)
        pipe.autoencoder.eval().requires_grad_(False)
        if self.channels_last:
            for module in (pipe.unet, pipe.autoencoder):
                module.to(memory_format=torch.channels_last)
        if self.pack:
            for module in (pipe.unet, pipe.autoencoder):
                packed.pack(module)
        self.pipe = pipe
        self._step_fn = denoise
        if self.compile:
            # Settled before tracing: read lazily inside the step, it would be guarded as unset
            # at the first compile and recompile the second call.
            kernels.backend()
            self._step_fn = torch.compile(denoise, backend=self._counted(self.compile), fullgraph=True, dynamic=False)
        self.graphs = CapturedSteps(self._step_fn) if self.cuda_graphs else None
        self.conditioning = Conditioning(pipe, self.device, self.dtype)
        self.family = pipe.family
        self.styles = tuple(pipe.styles.names) if pipe.styles is not None else ()

    def _counted(self, name: str):
        """The torch.compile backend `name`, counting its compiles (a recompile is a compile after the first
        for a variant: a guard failed)."""
        from torch._dynamo.backends.registry import lookup_backend

        backend = lookup_backend(name)

        def counted(graph, example_inputs):
            self.compiles += 1
            return backend(graph, example_inputs)

        return counted

    # -- The caller's side -------------------------------------------------------------

    def open_stream(self, settings: StreamSettings, on_output: OutputCallback, live: bool = True,
                    scale_back: bool = True) -> Stream:
        """scale_back False: outputs come at the processing size, each with the input's
        (width, height) in `frame.opaque`, and the sink scales them in its own thread
        (server.tracks.shown): the worker never resizes a frame to a camera's size."""
        self.check(settings)
        with self.lock:
            if not self.running:
                raise LivestyleError("the engine is closed")
            stream = Stream(self, settings, on_output, live, f"s{next(self._ids)}")
            stream.scale_back = scale_back
            self.streams.append(stream)
            self.lock.notify_all()
        return stream

    def check(self, settings: StreamSettings) -> None:
        """Everything about `settings` that depends on the model, checked on the host
        (a bad style, guidance the model cannot do, too few timesteps for the steps)."""
        plan = make_plan(self.pipe, settings, "cpu")
        make_guidance(settings.guidance, settings.guidance_scale, plan)
        if settings.controls:  # from the ControlNets' configs: their weights load on the worker
            control.check(settings.controls, self.pipe.unet.config, self._control_configs)
        if self.pipe.styles is not None:
            if settings.guidance == "full" and settings.guidance_scale != 1.0 and not settings.negative:
                raise LivestyleError("guidance = 'full' with the demo model needs a negative style to move away from")
            for text in [settings.style] + ([settings.negative] if settings.negative else []):
                style = style_blend(text)  # the blend's weights are checked there
                for name in [style] if isinstance(style, str) else style:
                    self.pipe.styles.index(name)  # raises, naming the known styles

    def stats(self) -> dict:
        now = time.monotonic()
        with self.lock:
            self._prune_busy(now)
            busy = sum(min(end, now) - max(start, now - 2.0) for start, end in self.busy)
            host_ms = statistics.median(self.host_ms) if self.host_ms else 0.0
            mean_ms = 1e3 * self.host_total_s / self.host_frames if self.host_frames else 0.0
            return {"device": str(self.device), "streams": len(self.streams), "load": round(min(1.0, busy / 2.0), 3),
                    "batches": self.batches, "frames": self.frames, "host_ms": round(host_ms, 2),
                    "host_ms_mean": round(mean_ms, 2), "buckets": {str(b.rows): len(b.held) for b in
                                                                   self.buckets.values()},
                    "compiles": self.compiles, "captures": self.graphs.captures if self.graphs else 0,
                    "flow_on_worker": self.flow_on_worker}

    def _prune_busy(self, now: float) -> None:
        while self.busy and now - self.busy[0][1] > 2.0:
            self.busy.popleft()

    def close(self) -> None:
        with self.lock:
            self.running = False
            for stream in self.streams:
                stream.closed = True
                stream._discard()
            self.streams.clear()
            self.lock.notify_all()
        if threading.current_thread() is not self.worker:
            self.worker.join()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- The worker --------------------------------------------------------------------

    def _has_work(self, s: Stream) -> bool:
        return bool(s.pending or s.requested or s.reset_requested or (s.flush_requested and s.owed))

    def _work(self, model: Pipeline | Callable[[], Pipeline]) -> None:
        try:
            self._load(model)
        except BaseException as e:  # handed to the caller of __init__
            self._load_error, self.running = e, False
            return
        finally:
            self._loaded.set()
        while True:
            with self.lock:
                self.lock.wait_for(lambda: not self.running or bool(self.released) or bool(self.copies)
                                   or any(self._has_work(s) for s in self.streams))
                if not self.running:
                    return
                released, self.released = self.released, []
                taken = []
                for s in self.streams:
                    if not self._has_work(s):
                        continue
                    taken.append((s, s.requested, s.reset_requested, s.pending))
                    s.requested, s.reset_requested, s.pending, s.working = None, False, None, True
                self.lock.notify_all()  # file streams waiting to submit their next frame
            started = time.monotonic()
            device_before, frames_before = self.device_s, self.frames
            try:
                for state in released:
                    self._leave(state)
                with torch.inference_mode():
                    stepped = self._step(taken)
                    # Frames copied back by an earlier call go out now; with nothing else to
                    # do, the worker waits for them.
                    self._deliver(block=not stepped)
            except Exception as e:  # a bug, not a bad frame: say so loudly, keep serving the other streams
                log.exception("engine step failed: %s", e)
                for s, *_ in taken:
                    s.meter.failed()
            finally:
                with self.lock:
                    now = time.monotonic()
                    frames = self.frames - frames_before
                    if frames:
                        host = max(0.0, now - started - (self.device_s - device_before))
                        self.host_ms.append(1e3 * host / frames)
                        self.host_total_s += host
                        self.host_frames += frames
                    self.busy.append((started, now))
                    self._prune_busy(now)  # here too: an engine nobody asks for stats must not grow
                    for s, *_ in taken:
                        s.working = False
                        s.owed = s.copying > 0 or (s.state is not None and s.state.in_flight)
                        if s.closed:
                            s._discard()
                    self.lock.notify_all()

    def _step(self, taken) -> int:
        """Apply settings, then advance every stream that has a frame (or owes frames).
        Returns how many streams were advanced."""
        frames = []
        for s, settings, reset, pending in taken:
            if settings is not None:
                self._settle(s, settings)
            state = s.state
            if reset and state is not None:
                state.reset()
            if pending is not None:
                tag, rgb = pending
                if state is None:  # no settings could be applied (s.failure says why)
                    log.error("stream %s: frame at pts %s failed: %s", s.id, tag.pts, s.failure)
                    s.meter.failed()
                    continue
                if state.similar is not None and state.newest is not None and state.similar.skip(tag.grey):
                    s.meter.skipped += 1
                    self._repeat(s, tag)
                    continue
                frames.append((s, tag, rgb))
            elif s.flush_requested and state is not None and state.in_flight:
                frames.append((s, None, None))  # drain one step of the stream batch
        groups: dict[BucketKey, list] = {}
        for item in frames:
            groups.setdefault(item[0].state.place[0].key, []).append(item)
        for items in groups.values():
            try:
                self._advance(items)
            except Exception as e:  # a bug (failures of frames are handled inside): the streams start over, counted
                log.exception("engine: a step over streams %s failed: %s", [s.id for s, _, _ in items], e)
                for s, tag, _ in items:
                    self._give_up(s, e, tag)
        return len(frames)

    def _settle(self, s: Stream, settings: StreamSettings) -> None:
        """Apply a settings change. A failure is this stream's alone: logged, counted, and
        the stream keeps the settings it had, or fails if it had none."""
        try:
            self._apply(s, settings)
        except Exception as e:
            error = _freed(e)  # new buffers that did not fit in device memory go now
            s.meter.failed_updates += 1
            kept = s.state is not None
            why = f"stream {s.id} failed: its settings could not be applied ({error})"
            with self.lock:
                if s.requested is None:  # else a newer change is tried next, and says for itself
                    if kept:
                        s.settings = s.state.settings  # what the stream still runs
                    else:
                        s.failure = why
            if kept:
                log.error("stream %s: could not apply settings, keeping the previous ones: %s", s.id, error,
                          exc_info=error)
            else:
                log.error("%s", why, exc_info=error)

    def _apply(self, s: Stream, settings: StreamSettings) -> None:
        """Nothing of the stream changes until everything new is built (an error leaves it as it was)."""
        plan = make_plan(self.pipe, settings, self.device)
        guidance = make_guidance(settings.guidance, settings.guidance_scale, plan)
        cond = self.conditioning.positive(settings.style, settings.prompt)
        uncond = self.conditioning.negative(settings.negative) if guidance.needs_negative else None
        if uncond is not None and uncond.context.shape != cond.context.shape:
            raise LivestyleError(f"the negative prompt is {uncond.context.shape[1]} tokens and the prompt "
                                 f"{cond.context.shape[1]}: guidance rows need the same length (shorten the longer one)")
        w, h = settings.size
        frames = settings.temporal.attention_frames
        time_ids = self.pipe.time_ids(h, w).to(self.device) if self.pipe.family == "sdxl" else None
        key = BucketKey((self.pipe.autoencoder.latent_channels, h // 8, w // 8), 2 if guidance.needs_negative else 1,
                        tuple(cond.context.shape[1:]), self.pipe.unet.config.time_cond_proj_dim or 0, frames,
                        settings.temporal.fusion if frames else 0.0,
                        cond.pooled.shape[1] if cond.pooled is not None else 0,
                        tuple((str(control.path_of(c)), c.input) for c in settings.controls))
        old = s.state
        if old is not None and old.layout == layout(settings, plan.steps) and old.place[0].key == key:
            old.retune(settings, plan, guidance, cond, uncond)
            return
        if old is not None:
            while old.in_flight:  # finish the frames in flight the old way: none is lost
                self._advance([(s, None, None)])
        state = StreamState(settings, plan, guidance, cond, uncond, self.pipe.unet,
                            self.pipe.autoencoder.latent_channels, self.device, self.dtype, time_ids)
        bucket = self.buckets.get(key)
        if bucket is None:
            nets = MultiControlNet([self._controlnet(path) for path, _ in key.controls]) if key.controls else None
            bucket = Bucket(key, max(self.bucket_rows, 1 << (plan.steps - 1).bit_length()), self.pipe.unet,
                            self.device, self.dtype, self.channels_last, nets)
            self.buckets[key] = bucket
        state.place = (bucket, bucket.take(state.renoise, id(state), self.bucket_rows))
        if old is not None:
            state.carry_over(old)
            self._leave(old)
        s.state = state
        s.meter.latency_frames = plan.steps - 1 if settings.stream_batch else 0

    def _leave(self, state: StreamState) -> None:
        """Give a state's rows back to its bucket; a bucket nobody holds rows of is freed."""
        if state.place is None:
            return
        bucket, start = state.place
        state.place = None
        bucket.give_back(start)
        if bucket.empty and self.buckets.get(bucket.key) is bucket:
            del self.buckets[bucket.key]
            used = {path for key in self.buckets for path, _ in key.controls}
            self.controlnets = {path: net for path, net in self.controlnets.items() if path in used}

    def _controlnet(self, path: str) -> ControlNet:
        """The ControlNet at `path` on the device, loaded once while buckets use it; a mismatch
        with the U-Net is a CheckpointError (the stream keeps its previous settings)."""
        if path not in self.controlnets:
            net = load_controlnet(path, self.device, self.dtype, unet=self.pipe.unet).eval().requires_grad_(False)
            if self.pack:
                packed.pack(net)
            if self.channels_last:
                net.to(memory_format=torch.channels_last)
            self.controlnets[path] = net
        return self.controlnets[path]

    # -- One call's worth of frames ----------------------------------------------------

    def _advance(self, items: list[tuple[Stream, Tag | None, np.ndarray | None]]) -> None:
        """items: (stream, tag, processing-size RGB) for a new frame, (stream, None, None)
        for a drain step, one per stream. Encodes, denoises and outputs them, batched
        across streams.

        A new frame that fails never enters the stream batch, so the frames in flight go
        on (see _lose); a drain step that fails gives them up (see _give_up)."""
        fresh = [(s, tag, rgb) for s, tag, rgb in items if tag is not None]
        encoded = dict(zip((id(s) for s, _, _ in fresh), self._encode(fresh)))
        runs = []
        for s, tag, rgb in items:
            state = s.state
            if tag is None:  # drain: a stand-in copy of the newest frame pushes the others through
                runs.append((s, None, None, state.last_images,
                             self._denoise(state, state.last_z0, state.newest.echo(), state.last_images)))
                continue
            if isinstance(encoded[id(s)], Exception):
                self._lose(s, tag, encoded[id(s)])
                continue
            z0, image = encoded[id(s)]
            try:
                start = self._prior(state, tag, z0) if state.plan.prior_at_start else z0
                images = self._control_images(state, tag, rgb, image)
            except Exception as e:  # a depth estimator that raised, say: this frame's alone
                self._lose(s, tag, _freed(e))
                continue
            runs.append((s, tag, z0, images, self._denoise(state, start, tag, images)))
        finished = []
        for (s, tag, z0, images, _), result in zip(runs, self._drive([(s, run) for s, *_, run in runs])):
            if isinstance(result, Exception):
                if tag is None:
                    self._give_up(s, result)
                else:
                    self._lose(s, tag, result)
                continue
            if tag is not None:  # the frame is in the stream batch now
                s.state.newest, s.state.last_z0, s.state.last_images = tag, z0, images
                if self.pipe.autoencoder.guided:
                    tag.frame = encoded[id(s)][1]
            done, denoised = result
            if done.emit:
                finished.append((s, done, denoised))
        self._finish(finished)

    def _encode(self, fresh: list[tuple[Stream, Tag, np.ndarray]]
                ) -> list[tuple[torch.Tensor, torch.Tensor] | Exception]:
        """The new frames' (1, C, h, w) latents and (1, 3, H, W) images in [0, 1] on the device,
        encoded in one call (or the error each raised)."""
        if not fresh:
            return []
        w, h = fresh[0][0].state.settings.size
        rgbs = [rgb if rgb.shape[:2] == (h, w) else cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
                for _, _, rgb in fresh]

        def encode(batch: list[np.ndarray]) -> list[tuple[torch.Tensor, torch.Tensor]]:
            # uint8 frames cross to the device (4x fewer bytes than fp32), from pinned memory on
            # CUDA (torch's caching host allocator: reused once its copy is done), queued.
            host = torch.empty((len(batch), h, w, 3), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            np.stack(batch, out=host.numpy())
            images = host.to(self.device, non_blocking=True)  # (B, h, w, 3) uint8
            images = kernels.frame_in(images, (h, w), signed=False, dtype=self.dtype)  # (B, 3, h, w) in [0, 1]
            with self._device_time():
                return list(zip(self.pipe.autoencoder.encode(images).split(1), images.split(1)))

        return _isolated(encode, rgbs, "encoding")

    def _lose(self, s: Stream, tag: Tag, error: Exception) -> None:
        """A new frame failed before it entered the stream batch: logged with its pts,
        counted, and output as a stand-in in its turn, after the frames in flight."""
        log.error("stream %s: frame at pts %s failed: %s", s.id, tag.pts, error, exc_info=error)
        tag.failed = True
        newest = s.state.newest
        if newest is not None and not newest.emitted:
            newest.repeats.append(tag)
        else:
            self._emit(s, tag, None)

    def _give_up(self, s: Stream, error: Exception, tag: Tag | None = None) -> None:
        """The stream batch cannot go on: the frames in flight (oldest first, then `tag`
        unless it was dealt with) go out as stand-ins, counted as failed; the slots
        start again empty."""
        state = s.state
        if state is None:
            return
        owed = state.owed() + ([tag] if tag is not None and not tag.emitted and not tag.failed else [])
        if owed:
            log.error("stream %s: frames at pts %s failed: %s", s.id, [t.pts for t in owed], error, exc_info=error)
        for t in owed:
            self._emit(s, t, None)
        state.tags = [None] * state.steps

    def _denoise(self, state: StreamState, z0: torch.Tensor, tag: Tag, images: tuple[torch.Tensor, ...]
                 ) -> Denoising:
        """One frame through the stream's steps; yields U-Net rows, is sent their denoised
        latents, returns (finished tag, latent). The frames' latents stay in the bucket.

        z0: (1, C, h, w) the frame's latent; images: its ControlNet images, (1, 3, H, W)
        each. Returns the tag and (1, C, h, w) denoised latent of the frame that finished:
        this one, or with a primed stream batch the one that entered S - 1 calls ago."""
        plan, S = state.plan, state.steps
        fresh = (plan.start(z0, state.noise[:1]), z0, images)
        if state.settings.stream_batch and S > 1 and state.primed:
            denoised = yield Rows(state, range(S), fresh)
            done = state.tags[-1]
            state.tags = [None, tag] + state.tags[1:-1]  # every frame moved on a slot (Bucket.advance)
            return done, denoised[-1:]
        # Step by step: per-frame mode, or the first frame of a stream batch, whose
        # intermediate latents then prime the slots (stand-in copies, never output).
        prime = state.settings.stream_batch and S > 1
        for k in range(S):
            denoised = yield Rows(state, range(k, k + 1), fresh if k == 0 else None)
            if prime and k < S - 1:
                state.tags[k + 1] = tag.echo()
        return tag, denoised

    def _control_images(self, state: StreamState, tag: Tag, rgb: np.ndarray, image: torch.Tensor
                        ) -> tuple[torch.Tensor, ...]:
        """The frame's ControlNet images (control.py), (1, 3, H, W) each, at the processing size.

        rgb: the processing-size frame on the host, for Canny edges when submit() made none
        (the frame came before a change of controls or size); image: it on the device."""
        controls = state.settings.controls
        if not controls:
            return ()
        edges = tag.edges
        if control.needs_edges(controls) and (edges is None or edges.shape != tuple(image.shape[-2:])):
            h, w = image.shape[-2:]
            edges = control.host_edges(rgb if rgb.shape[:2] == (h, w) else
                                       cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA))
        tag.edges = None  # spent: slots and the previous frame keep their tags

        def previous() -> torch.Tensor:
            """TemporalNet's: the last output, warped along the motion to this frame, or this frame
            before any output. Where the flow is not confident the warp falls back to the last
            output where it was, not to this input frame: TemporalNet is trained on stylised
            previous frames, and a raw camera frame mixed in is neither."""
            last = state.previous_image
            if last is None or last.shape != image.shape:
                return image
            if not state.settings.temporal.flow:
                return last
            # With a stream batch the last output is S - 1 frames older than this one: that
            # motion is estimated here, and not kept (the output's warp wants the frame before's).
            return self._warp(state, tag, last, last, 1.0, keep=state.steps == 1 or not state.settings.stream_batch)

        return control.images(controls, image, edges, previous)

    def _drive(self, runs: list[tuple[Stream, Denoising]]) -> list[tuple[Tag, torch.Tensor] | Exception]:
        """Run the streams' denoising together: each round, one fixed-shape step per bucket.
        Returns each run's (finished tag, latent), or the error that ended it; a call that
        fails is retried stream by stream, so only the failing stream's run ends."""
        results: list = [None] * len(runs)

        def resume(i: int, out: Stepped | None) -> Rows | None:
            """Hand run i its step's result; its next rows, or None once it has ended."""
            try:
                return runs[i][1].send(out)
            except StopIteration as stop:
                results[i] = stop.value
            except Exception as e:
                results[i] = _freed(e)
            return None

        requests = {i: rows for i in range(len(runs)) if (rows := resume(i, None)) is not None}
        while requests:
            by_bucket: dict[int, list[tuple[int, Rows]]] = {}
            for i, rows in requests.items():
                by_bucket.setdefault(id(rows.state.place[0]), []).append((i, rows))
            requests = {}
            for batch in by_bucket.values():
                outs = _isolated(lambda part: self._call([r for _, r in part], [runs[i][0].meter for i, _ in part]),
                                 batch, "a U-Net call")
                for (i, _), out in zip(batch, outs):
                    if isinstance(out, Exception):
                        runs[i][1].close()
                        results[i] = out
                    elif (rows := resume(i, out)) is not None:
                        requests[i] = rows
        return results

    def _call(self, batch: list[Rows], meters: list[StreamMeter]) -> list[Stepped]:
        """One fixed-shape step of a bucket over several streams' rows, each row's frame then
        moved on a slot in the bucket (Bucket.advance); each stream's denoised rows."""
        bucket = batch[0].state.place[0]
        parts, places = [], []
        for rows in batch:
            state = rows.state
            table = state.table[:, rows.slots.start:rows.slots.stop].copy()
            if rows.fresh is not None and isinstance(state.guidance, InitializeGuidance):
                table[RENEW, 0] = 1.0  # its negative-prompt estimate becomes the frame's reference
            uncond = state.uncond
            parts.append(Part(state.place[1], rows.slots, state.steps, state.cond.context,
                              uncond.context if uncond else None, table, state.timestep_cond, state.cond.pooled,
                              uncond.pooled if uncond else None, state.time_ids, rows.fresh))
            first = state.place[1] + rows.slots.start
            places.append(slice(first, first + len(rows.slots)))
        active = bucket.load(parts)
        started, clock = self.timer.start(), time.perf_counter()
        if self.graphs:
            first, (x_next, denoised, reference) = 0, self.graphs(bucket)
        elif self.compile:
            first, (x_next, denoised, reference) = 0, self._step_fn(*bucket.inputs())
        else:  # eager: the span of rows stepped, no padding around it
            first = min(active)
            x_next, denoised, reference = self._step_fn(*bucket.inputs(slice(first, max(active) + 1)))
        bucket.advance(first, x_next, reference)
        self.device_s += time.perf_counter() - clock
        self.timer.stop(started, meters)
        if bucket.rings is not None:
            bucket.rings.count(active)
        self.batches += 1
        # Copies: the bucket's outputs are overwritten by its next call (in place, with CUDA graphs).
        return [denoised[rows.start - first:rows.stop - first].clone() for rows in places]

    # -- Temporal propagation and output ----------------------------------------------

    def _warp(self, state: StreamState, tag: Tag, current: torch.Tensor, previous: torch.Tensor | None,
              blend: float, keep: bool = True) -> torch.Tensor:
        """current (1, C, h, w) with `previous` (the last output's latent or image) blended in
        along the motion from the last output frame to `tag`'s, on the device
        (kernels.propagate). The motion comes from submit() (the caller's thread) when the
        frame before this one was the last output; otherwise (it was dropped or skipped)
        it is estimated here, counted in stats()["flow_on_worker"], and kept on the tag
        unless `keep` is False (a motion the frame's output warp will not use)."""
        last = state.previous_tag
        if blend == 0 or previous is None or previous.shape != current.shape or last is None \
                or last.grey.shape != tag.grey.shape:
            return current
        known = tag.motion
        if known is None or known[0] is not last:
            known = (last, state.flow.motion(last.grey, tag.grey), {})
            self.flow_on_worker += 1
            if keep:
                tag.motion = known
        _, motion, warps = known
        size = (current.shape[-1], current.shape[-2])
        if not self.grid_on_device:
            grid, confidence = sampling_grid(motion, size, self.device)
            return propagate(current, previous, grid, confidence, blend, state.settings.temporal.warp)
        if size not in warps:
            warps[size] = warp_inputs(motion, size)
        # Small host tensors (the flow grid): the copies are queued, no sync.
        back, confidence = (t.to(self.device, non_blocking=True) for t in warps[size])
        return kernels.propagate(current, previous, back, confidence,
                                 torch.full((1,), blend, dtype=torch.float32, device=self.device),
                                 state.settings.temporal.warp)

    def _prior(self, state: StreamState, tag: Tag, z: torch.Tensor) -> torch.Tensor:
        """z with the previous output latent blended in along the motion (flow-guided latents)."""
        temporal = state.settings.temporal
        if not temporal.flow:
            return z
        return self._warp(state, tag, z, state.previous_latent, temporal.flow_blend)

    def _finish(self, done: list[tuple[Stream, Tag, torch.Tensor]]) -> None:
        """Decode the finished frames (one batch) and output them. A frame that fails
        here, or whose output is not finite, goes out as a stand-in, counted."""
        ready = []
        for s, tag, z in done:
            try:
                if not s.state.plan.prior_at_start:
                    z = self._prior(s.state, tag, z)
            except Exception as e:
                self._fail(s, tag, _freed(e))
                continue
            ready.append((s, tag, z))
        def decode(part: list) -> list[torch.Tensor]:
            latents = torch.cat([z for _, _, z in part])
            # A guided decoder reads each frame's own input frame (kept on its tag since it was encoded).
            frames = torch.cat([tag.frame for _, tag, _ in part]) if self.pipe.autoencoder.guided else None
            with self._device_time():
                return list(decode_frames(self.pipe.autoencoder, latents, frames).split(1))

        decoded = _isolated(decode, ready, "decoding")
        blended = []
        for (s, tag, z), image in zip(ready, decoded):  # image: (1, 3, h, w)
            if isinstance(image, Exception):
                self._fail(s, tag, image)
                continue
            state = s.state
            temporal = state.settings.temporal
            try:
                if temporal.flow:
                    image = self._warp(state, tag, image, state.previous_image, temporal.output_blend)
            except Exception as e:
                self._fail(s, tag, _freed(e))
                continue
            state.previous_latent, state.previous_image, state.previous_tag = z, image, tag
            # Its motion is spent: kept, it would hold the previous tag, which holds its own
            # previous one, chaining every frame ever output (~0.3 MB each) to the stream.
            tag.motion = tag.frame = None
            blended.append((s, tag, image))
        if not blended:
            return
        try:
            images = torch.cat([image for _, _, image in blended])  # (B, 3, h, w)
            B, _, h, w = images.shape
            # A model with NaN weights gives NaN, not an image: each frame's flag rides
            # along in the same copy, so checking costs no host sync of its own.
            finite = torch.isfinite(images).flatten(1).all(1, keepdim=True).to(torch.uint8)  # (B, 1)
            rgb = kernels.frame_out(images, signed=False).reshape(B, h * w * 3)
            rows = torch.cat([rgb, finite], dim=1)  # (B, h * w * 3 + 1)
            if not self.copies_async:
                # The one host sync per call: the frames go back to the host for their sinks.
                with self._device_time():
                    host = rows.cpu()
            else:
                # The one device-to-host copy per call, queued: the next call's upload and
                # model run overlap it, and the frames go out once it is done (_deliver).
                host = torch.empty(rows.shape, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
                host.copy_(rows, non_blocking=True)
        except Exception as e:
            error = _freed(e)
            for s, tag, _ in blended:
                self._fail(s, tag, error)
            return
        if self.copies_async:
            for s, _, _ in blended:
                s.copying += 1
            self.copies.append((self._copied(), host, blended, h, w))
            return
        self._hand_out(host.numpy(), blended, h, w)

    def _copied(self):
        """A marker of the copy just queued: a CUDA event (query() without blocking)."""
        if self.device.type != "cuda":
            return _Done()
        event = torch.cuda.Event()
        event.record()
        return event

    def _deliver(self, block: bool) -> None:
        """Hand out the frames whose copy back to the host is done (every one, with `block`)."""
        delivered = []
        while self.copies and (block or self.copies[0][0].query()):
            marker, host, blended, h, w = self.copies.popleft()
            with self._device_time():
                marker.synchronize()
            for s, _, _ in blended:
                s.copying -= 1
            rows = [i for i, (s, _, _) in enumerate(blended) if not s.closed]  # a closed stream counted them dropped
            self._delivering = True  # in order, oldest first: _emit must not deliver later copies first
            try:
                self._hand_out(host.numpy()[rows], [blended[i] for i in rows], h, w)
            finally:
                self._delivering = False
            delivered += [s for s, _, _ in blended]
        if delivered:
            with self.lock:
                for s in delivered:
                    s.owed = s.copying > 0 or (s.state is not None and s.state.in_flight)
                self.lock.notify_all()

    def _hand_out(self, host: np.ndarray, blended: list, h: int, w: int) -> None:
        """host (B, h * w * 3 + 1) uint8: each frame and its finite flag -> the sinks."""
        self.frames += len(blended)
        for (s, tag, _), row in zip(blended, host):
            if row[-1]:
                self._emit(s, tag, row[:-1].reshape(h, w, 3))
            else:
                self._non_finite(s, tag)

    @contextlib.contextmanager
    def _device_time(self):
        """Time in a model call or waiting for the device: not host time (stats()["host_ms"])."""
        clock = time.perf_counter()
        try:
            yield
        finally:
            self.device_s += time.perf_counter() - clock

    def _fail(self, s: Stream, tag: Tag, error: Exception) -> None:
        """A frame at the end of the stream batch failed: out now as a stand-in, counted."""
        log.error("stream %s: frame at pts %s failed: %s", s.id, tag.pts, error, exc_info=error)
        self._emit(s, tag, None)

    def _non_finite(self, s: Stream, tag: Tag) -> None:
        self._emit(s, tag, None, non_finite=True)
        n = s.meter.non_finite
        if n == 1 or n % 100 == 0:  # once, then now and then: a broken model would log every frame
            log.error("stream %s: the output at pts %s is not finite (NaN or inf; %d such frames so far), counted "
                      "as failed: the model's weights or the style weights may hold NaN", s.id, tag.pts, n)
        s.state.reset()  # and no NaN flows into later frames through the temporal state

    def _repeat(self, s: Stream, tag: Tag) -> None:
        """A frame the similarity filter skipped gets the output of the newest frame the model took."""
        newest = s.state.newest
        if newest.emitted:
            self._emit(s, tag, s.state.last_output)
        else:
            newest.repeats.append(tag)

    def _emit(self, s: Stream, tag: Tag, rgb: np.ndarray | None, non_finite: bool = False) -> None:
        """Hand one output frame (and the frames that repeat it) to the stream's sink.

        rgb None: the frame failed; a stand-in goes out in its place, counted as an
        error: the last output, else black."""
        if s.copying and not self._delivering:  # frames before this one are on their way back: they go first
            self._deliver(block=True)
        state = s.state
        W, H = tag.size
        failed = rgb is None
        if failed:
            tag.failed = True
            rgb = state.last_output if state.last_output is not None else np.zeros((H, W, 3), np.uint8)
        if rgb.shape[:2] != (H, W) and s.scale_back:
            rgb = cv2.resize(rgb, (W, H), interpolation=cv2.INTER_LINEAR)
        rgb = np.ascontiguousarray(rgb)
        if not failed:
            state.last_output = rgb
        tag.emitted = True
        for t in [tag] + tag.repeats:
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if rgb.shape[:2] != (H, W):
                frame.opaque = (W, H)  # the size to show it at: the sink scales it (scale_back=False)
            if t.time_base is not None:  # arrays come without timestamps
                frame.pts, frame.time_base = t.pts, t.time_base
            try:
                s.on_output(frame)
            except Exception as e:  # the sink's problem must not stop the engine
                log.exception("stream %s: output callback failed at pts %s: %s", s.id, t.pts, e)
                s.meter.failed()
                continue
            if failed or t.failed:
                s.meter.failed(non_finite)
            else:
                s.meter.output(t.submitted_at)
        tag.repeats.clear()


class _Done:
    """The marker of a copy that was done when it was queued (off CUDA)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


def _freed(error: Exception) -> Exception:
    """The error with the locals of its finished frames cleared: the failed call's tensors
    (device memory, after running out of it) go now, not when the error is dropped. The
    traceback's lines stay for the log."""
    traceback.clear_frames(error.__traceback__)
    return error


def _isolated(call: Callable[[list], list], items: list, what: str) -> list:
    """call(items) -> one result per item, as one batch; when the batch fails, item by
    item (one stream's each), so that a failure is only the failing stream's. A failed
    item gets its error in place of a result."""
    if not items:
        return []
    try:
        return call(items)
    except Exception as e:
        if len(items) == 1:
            return [_freed(e)]
        log.warning("%s over %d streams failed (%s: %s); trying them one by one", what, len(items),
                    type(e).__name__, _freed(e))
    results = []
    for item in items:
        try:
            results += call([item])
        except Exception as e:
            results.append(_freed(e))
    return results
