"""Per-stream figures, gathered without host syncs.

Counters are plain ints bumped on the worker thread; rates and medians come from short
windows of host timestamps. Model time on CUDA is measured with CUDA events that are
only read once they have completed (`Event.query()`), never waited on.
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

WINDOW_S = 2.0  # rates over the last two seconds
SAMPLES = 60  # medians over the last 60 values


@dataclass(frozen=True)
class StreamStats:
    """A snapshot. fps over the last ~2 s; model_ms and latency_ms are recent medians
    (model time per frame, and submit() to output wall time); latency_frames is the
    stream batch's lag in frames.

    Every frame submitted ends up in exactly one of three counts, so once a stream is
    flushed or closed, frames_in == frames_out + errors + dropped:
    - frames_out: restyled frames the sink took, with the frames the similarity filter
      skipped (`skipped` counts those; they repeat the output before them);
    - errors: frames that failed (each logged with its pts): the model raised, the
      output was not finite (`non_finite` counts those), or the sink raised. A failed
      frame still goes to the sink as a stand-in (the last output, else black) so a
      file keeps its length, but it is not counted out;
    - dropped: frames replaced while waiting (latest frame wins), or not yet output
      when the stream was closed.
    failed_updates: settings changes that could not be applied (logged; the stream kept
    its previous settings, or failed if it had none).
    """

    frames_in: int
    frames_out: int
    dropped: int
    skipped: int
    errors: int
    non_finite: int
    failed_updates: int
    fps_in: float
    fps_out: float
    model_ms: float
    latency_ms: float
    latency_frames: int

    def as_dict(self) -> dict:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in dataclasses.asdict(self).items()}


def _prune(stamps: deque, now: float) -> None:
    while stamps and now - stamps[0] > WINDOW_S:
        stamps.popleft()


def _rate(stamps: deque, now: float) -> float:
    _prune(stamps, now)
    if len(stamps) < 2:
        return 0.0
    return (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-6)


def _median(values: deque) -> float:
    return statistics.median(values) if values else 0.0


class StreamMeter:
    """Counters and windows for one stream; written by the worker, read by anyone."""

    def __init__(self):
        self.lock = threading.Lock()
        self.frames_in = self.frames_out = self.dropped = self.skipped = self.errors = 0
        self.non_finite = self.failed_updates = 0
        self.latency_frames = 0
        self.in_stamps: deque[float] = deque()
        self.out_stamps: deque[float] = deque()
        self.model_ms: deque[float] = deque(maxlen=SAMPLES)
        self.latency_ms: deque[float] = deque(maxlen=SAMPLES)

    def submitted(self, replaced: bool) -> None:
        now = time.monotonic()
        with self.lock:
            self.frames_in += 1
            self.dropped += replaced
            self.in_stamps.append(now)
            _prune(self.in_stamps, now)  # here too: a stream nobody asks for stats must not grow

    def output(self, submitted_at: float) -> None:
        now = time.monotonic()
        with self.lock:
            self.frames_out += 1
            self.out_stamps.append(now)
            _prune(self.out_stamps, now)
            self.latency_ms.append(1e3 * (now - submitted_at))

    def failed(self, non_finite: bool = False) -> None:
        """A frame that failed (its stand-in is not an output)."""
        with self.lock:
            self.errors += 1
            self.non_finite += non_finite

    def discarded(self, frames: int) -> None:
        """Frames that were waiting or in flight when the stream was closed."""
        with self.lock:
            self.dropped += frames

    def snapshot(self) -> StreamStats:
        now = time.monotonic()
        with self.lock:
            return StreamStats(self.frames_in, self.frames_out, self.dropped, self.skipped, self.errors,
                               self.non_finite, self.failed_updates, _rate(self.in_stamps, now),
                               _rate(self.out_stamps, now), _median(self.model_ms), _median(self.latency_ms),
                               self.latency_frames)


class ModelTimer:
    """Model time per call, shared out to the streams of the call.

    On CPU the work is done when the call returns: host time is the model time. On CUDA
    the call only queued kernels: a pair of events brackets it, and the elapsed time is
    read on a later call, once the end event has completed.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: deque = deque()

    def start(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, started, meters: list[StreamMeter]) -> None:
        if not self.cuda:
            self._share(1e3 * (time.perf_counter() - started), meters)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.pending.append((started, end, meters))
        while self.pending and self.pending[0][1].query():  # completed: reading it cannot block
            begin, end, done = self.pending.popleft()
            self._share(begin.elapsed_time(end), done)

    @staticmethod
    def _share(ms: float, meters: list[StreamMeter]) -> None:
        for meter in meters:
            with meter.lock:
                meter.model_ms.append(ms / len(meters))
