"""Media between WebRTC tracks and the engine: latest frame wins in both directions.

    peer's track --pump--> LatestFrame --submitter (executor)--> stream.submit()
    engine worker --on_output--> Fanout --> LatestFrame --> RestyledTrack.recv() --> encoder

Nothing here queues frames: a LatestFrame replaces a frame nobody has taken yet
(counted in `replaced`), and so does the engine with an input it has not started, so
a slow model or a slow encoder costs frames, never latency (aiortc's MediaRelay with
buffered=False does the same for plain relays).

Encoders: aiortc picks the encoder's bitrate from the receiver's bandwidth estimate
(REMB) within module-wide limits (H.264 at most 3 Mbit/s, VP8 1.5 Mbit/s), which blur
a restyle's brush strokes at 720p. `install_encoder` gives a sender an encoder with its
own ceiling instead of changing those process-wide constants.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import av
from aiortc import MediaStreamTrack, RTCRtpSender, RTCRtpTransceiver
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import Vp8Encoder
from aiortc.mediastreams import MediaStreamError

log = logging.getLogger(__name__)


class LatestFrame:
    """A one-frame slot: put() replaces an unread frame, get() waits for the next one.

    Used on the event loop only. `replaced` counts frames overwritten before anyone read
    them (outputs dropped because the encoder was slower than the engine).
    """

    def __init__(self):
        self._frame: av.VideoFrame | None = None
        self._ready = asyncio.Event()
        self.replaced = 0
        self.closed = False

    def put(self, frame: av.VideoFrame) -> None:
        if self.closed:
            return
        if self._frame is not None:
            self.replaced += 1
        self._frame = frame
        self._ready.set()

    async def get(self) -> av.VideoFrame:
        """The newest frame not yet read; raises MediaStreamError once the slot is closed."""
        while self._frame is None:
            if self.closed:
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        frame, self._frame = self._frame, None
        return frame

    def close(self) -> None:
        self.closed = True
        self._frame = None
        self._ready.set()


class Fanout:
    """Hands the engine's outputs from its worker thread to every subscribed LatestFrame.

    push() is the stream's on_output: it runs on the engine's worker thread and only
    schedules the delivery on the event loop, so it returns at once.
    on_frame(frame) runs on the loop once per output, before the slots get it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_frame: Callable[[av.VideoFrame], None] | None = None):
        self.loop = loop
        self.on_frame = on_frame
        self.slots: set[LatestFrame] = set()
        self.closed = False

    def push(self, frame: av.VideoFrame) -> None:
        if self.closed:
            return
        try:
            self.loop.call_soon_threadsafe(self._deliver, frame)
        except RuntimeError:  # the loop has closed: the server is shutting down
            pass

    def _deliver(self, frame: av.VideoFrame) -> None:
        if self.closed:
            return
        if self.on_frame is not None:
            self.on_frame(frame)
        for i, slot in enumerate(self.slots):
            # Each encoder gets a frame object of its own: PyAV caches one swscale context
            # per frame for reformat(), and two encoder threads converting the same frame
            # at once deadlock inside it.
            slot.put(frame if i == 0 else copy_frame(frame))

    def subscribe(self) -> LatestFrame:
        slot = LatestFrame()
        if self.closed:
            slot.close()
        self.slots.add(slot)
        return slot

    def unsubscribe(self, slot: LatestFrame) -> None:
        slot.close()
        self.slots.discard(slot)

    def close(self) -> None:
        self.closed = True
        for slot in self.slots:
            slot.close()
        self.slots.clear()


def copy_frame(frame: av.VideoFrame) -> av.VideoFrame:
    """A new frame with the same pixels, pts, time_base and size to show it at (one copy of the planes)."""
    copy = av.VideoFrame.from_ndarray(frame.to_ndarray(), format=frame.format.name)
    copy.pts, copy.time_base, copy.opaque = frame.pts, frame.time_base, frame.opaque
    return copy


def shown(frame: av.VideoFrame) -> av.VideoFrame:
    """The frame at the size it is shown at: the engine hands the server its outputs at the
    processing size with the camera's (width, height) in `opaque` (Engine.open_stream's
    scale_back=False), and the scaling back (swscale, bilinear) runs here, in an executor
    thread, beside the encoder rather than on the engine's worker."""
    size = frame.opaque
    if not isinstance(size, tuple) or size == (frame.width, frame.height):
        return frame
    scaled = frame.reformat(width=size[0], height=size[1], interpolation="BILINEAR")
    scaled.pts = frame.pts
    if frame.time_base is not None:
        scaled.time_base = frame.time_base
    return scaled


class RestyledTrack(MediaStreamTrack):
    """An outgoing video track that plays a LatestFrame slot: the restyled frames, each
    with the pts and time_base of the input frame it restyles (so RTP timestamps follow
    capture time, and a client can measure latency per frame).

    on_sent(frame) runs when the encoder takes a frame.
    """

    kind = "video"

    def __init__(self, slot: LatestFrame, on_sent: Callable[[av.VideoFrame], None] | None = None):
        super().__init__()
        self.slot = slot
        self.on_sent = on_sent

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        try:
            frame = await self.slot.get()
        except MediaStreamError:
            self.stop()
            raise
        if isinstance(frame.opaque, tuple):  # to scale back: off the event loop
            frame = await asyncio.get_running_loop().run_in_executor(None, shown, frame)
        if self.on_sent is not None:
            self.on_sent(frame)
        return frame

    def stop(self) -> None:
        self.slot.close()
        super().stop()


async def pump(track: MediaStreamTrack, on_frame: Callable[[av.VideoFrame], bool]) -> None:
    """Read a peer's video track until it ends, handing each frame to `on_frame`.

    on_frame(frame) -> False stops the pump (the stream closed). aiortc decodes on its own
    thread; this loop only moves frames, so it keeps up and nothing piles up in the track.
    """
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        if not on_frame(frame):
            return


async def drain(track: MediaStreamTrack) -> None:
    """Read and discard a track we do not use (a WHIP sender's audio), so it cannot pile up."""
    while True:
        try:
            await track.recv()
        except MediaStreamError:
            return


# -- Encoders with a bitrate ceiling -----------------------------------------------------------

class _Ceiling:
    """Keeps an encoder's target bitrate within [ceiling / 4, ceiling] (bits per second).

    It starts at the ceiling; the receiver's estimate (REMB) may lower it on a congested
    link, down to a quarter. The aiortc encoders read `target_bitrate` when they
    configure libx264/libvpx and reconfigure when it moves by more than 10%.
    """

    def __init__(self, ceiling: int):
        super().__init__()
        self.ceiling = ceiling
        self._target = ceiling

    @property
    def target_bitrate(self) -> int:
        return self._target

    @target_bitrate.setter
    def target_bitrate(self, bitrate: int) -> None:
        self._target = max(self.ceiling // 4, min(int(bitrate), self.ceiling))


class H264(_Ceiling, H264Encoder):
    """aiortc's H.264 encoder (libx264, zerolatency) with our bitrate ceiling."""


class VP8(_Ceiling, Vp8Encoder):
    """aiortc's VP8 encoder (libvpx, realtime) with our bitrate ceiling."""


ENCODERS = {"video/h264": H264, "video/vp8": VP8}


def negotiated_codec(transceiver: RTCRtpTransceiver) -> str | None:
    """The mime type the sender will use ("video/H264", "video/VP8"), once negotiated."""
    codecs = getattr(transceiver, "_codecs", None) or []
    return codecs[0].mimeType if codecs else None


def install_encoder(transceiver: RTCRtpTransceiver, bitrate: int) -> bool:
    """Give the transceiver's sender an encoder with this bitrate ceiling (bits/s).

    Call after setLocalDescription and before media flows: aiortc creates the encoder
    lazily on the first frame, so one placed in its slot first is the one it uses.
    aiortc has no public way to set a per-sender bitrate; if its internals change, this
    logs a warning and the sender keeps aiortc's own encoder.
    """
    sender: RTCRtpSender = transceiver.sender
    mime = negotiated_codec(transceiver)
    encoder = ENCODERS.get((mime or "").lower())
    slot = "_RTCRtpSender__encoder"
    if encoder is None or not hasattr(sender, slot) or getattr(sender, slot) is not None:
        log.warning("cannot set the %s encoder's bitrate with this aiortc; using its default", mime)
        return False
    setattr(sender, slot, encoder(bitrate))
    return True


def sender_encoder(sender: RTCRtpSender):
    """The encoder a sender uses (None before its first frame); for stats and tests."""
    return getattr(sender, "_RTCRtpSender__encoder", None)
