"""Decoding and encoding on their own threads, so that the model is the bottleneck.

    source --Reader thread--> on_frame (engine.submit)      engine worker --> Writer.put
                          \\-> on_audio (Writer.put_audio)            Writer thread --> sink

The Reader reads a source (decoding, rotating, converting happen there) and hands each
frame on. The Writer takes frames from any thread without blocking (the engine's worker
calls it) and feeds its sink on its own thread (encoding, muxing, sending happen there).

Two kinds of Writer: for a file every frame is kept, and the Reader waits
(`wait_for_room`) when the encoder falls behind, so memory stays bounded; for a live
sink (virtual camera, window) only the newest frame is kept and older ones are dropped
(counted): a late frame is worth nothing to a viewer.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

import av

class Reader:
    """Runs `items` (frames, and audio packets if any) on a thread.

    on_frame(frame) is called for each av.VideoFrame, on_audio(packet) for each av.Packet.
    seconds: stop after this much input time (from the first frame's pts), like ffmpeg's -t.
    pace: called with each frame before it is handed on, and may block: the file path's
        back-pressure (Writer.wait_for_room) or playing a file in real time (RealTime).
    timeout: the longest one read of `items` may block (a network source's read timeout),
        so a caller knows how long a stop can take.
    An exception in the source or a callback ends the reading and is kept in `.error`.
    """

    def __init__(self, items: Iterable, on_frame: Callable[[av.VideoFrame], None],
                 on_audio: Callable[[av.Packet], None] | None = None, seconds: float | None = None,
                 pace: Callable[[av.VideoFrame], None] | None = None, timeout: float = 10.0):
        self.items, self.on_frame, self.on_audio = items, on_frame, on_audio
        self.seconds, self.pace, self.timeout = seconds, pace, timeout
        self.frames = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="livestyle-reader", daemon=True)

    def start(self) -> Reader:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the thread to stop after the frame in hand."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True once it has finished."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        start = None
        try:
            for item in self.items:
                if self._stop.is_set():
                    break
                if isinstance(item, av.Packet):
                    if self.on_audio is not None:
                        if self.seconds is None or start is None or item.pts is None \
                                or float(item.pts * item.time_base) - start < self.seconds:
                            self.on_audio(item)
                    continue
                at = float(item.pts * item.time_base) if item.pts is not None else None
                if at is not None:
                    start = at if start is None else start
                    if self.seconds is not None and at - start >= self.seconds - 1e-6:
                        break
                if self.pace is not None:
                    self.pace(item)
                self.on_frame(item)
                self.frames += 1
        except BaseException as e:  # handed to the main thread, which reports it
            self.error = e


class Writer:
    """Feeds `sink` (anything with write(frame), and write_audio(packet) for audio) on a thread.

    latest_only: keep only the newest frame (live sinks), dropping older ones.
    put()/put_audio() never block. After an error in the sink, frames are discarded and
    the error is kept in `.error` (close() raises it).
    """

    def __init__(self, sink, latest_only: bool = False, name: str = "livestyle-writer"):
        self.sink, self.latest_only = sink, latest_only
        self.written = self.dropped = 0
        self.error: BaseException | None = None
        self._queue: deque = deque()
        self._frames_queued = 0
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, frame: av.VideoFrame) -> None:
        """Queue a frame for the sink; from any thread, never blocks."""
        with self._cond:
            if self.error is not None or self._closing:
                return
            if self.latest_only and self._frames_queued:
                kept = [item for item in self._queue if not isinstance(item, av.VideoFrame)]
                self.dropped += self._frames_queued
                self._queue = deque(kept)
                self._frames_queued = 0
            self._queue.append(frame)
            self._frames_queued += 1
            self._cond.notify_all()

    def put_audio(self, packet: av.Packet) -> None:
        """Queue an audio packet; kept in order with the frames."""
        with self._cond:
            if self.error is None and not self._closing:
                self._queue.append(packet)
                self._cond.notify_all()

    @property
    def backlog(self) -> int:
        """Frames waiting for the sink."""
        return self._frames_queued

    def wait_for_room(self, limit: int) -> None:
        """Block while `limit` or more frames wait for the sink (the reader's back-pressure)."""
        with self._cond:
            self._cond.wait_for(lambda: self._frames_queued < limit or self.error is not None or self._closing)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing)
                if not self._queue:
                    return  # closing, and everything is written
                item = self._queue.popleft()
                is_frame = isinstance(item, av.VideoFrame)
                self._frames_queued -= is_frame
            try:
                if is_frame:
                    self.sink.write(item)
                else:
                    self.sink.write_audio(item)
            except BaseException as e:
                with self._cond:
                    self.error = e
                    self.dropped += self._frames_queued
                    self._queue.clear()
                    self._frames_queued = 0
                    self._cond.notify_all()
                return
            with self._cond:
                self.written += is_frame
                self._cond.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Write what is queued, then close the sink (always); raises the sink's error, if any.
        Closing again does nothing."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self.sink.close()
        if self.error is not None:
            raise self.error



class RealTime:
    """Paces frames to their timestamps against the wall clock (a file played to a window or
    a virtual camera, at its own speed); call it with each frame before handing it on."""

    def __init__(self):
        self._start: tuple[float, float] | None = None  # (wall clock, frame time) of the first frame

    def __call__(self, frame: av.VideoFrame) -> None:
        if frame.pts is None:
            return
        at = float(frame.pts * frame.time_base)
        if self._start is None:
            self._start = (time.monotonic(), at)
            return
        wait = self._start[0] + (at - self._start[1]) - time.monotonic()
        if wait > 0:
            time.sleep(wait)
