"""Sessions: one peer's restyled stream, and the viewers that watch it.

A Session owns a peer connection (the camera page's, or a WHIP sender's), one engine
stream (its own settings, noise and temporal state on the shared engine) and a Fanout
of its restyled frames. A Viewer is a WHEP peer that plays a session's Fanout.

Isolation: a session's id is a random secret, known only to whoever created it (the
/offer reply, the WHIP Location header); its data channel reaches only its own stream;
/stats shows the engine's short stream id, never the secret. A session may also have
a name its creator chose (WHIP `?name=obs`), so that an OBS Browser Source can find it
again after a restart; whoever knows the name (and the token) can watch it.

Failure: a session one of whose own tasks fails (the submitter, the ingest) or whose
every frame fails in the engine for the idle timeout (device memory, say) is closed
with the reason, which is logged once and counted in /stats (`sessions_failed`); the
other sessions go on.

Everything here runs on the event loop; engine calls that take time (submitting a
frame converts and resizes it; updating checks settings against the model) run on
the default executor.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import statistics
import time
from collections import OrderedDict, deque

import av
from aiortc import RTCPeerConnection, RTCRtpTransceiver
from aiortc.mediastreams import MediaStreamError

from livestyle.config import processing_size
from livestyle.server.controls import settings_dict
from livestyle.server.tracks import Fanout, LatestFrame, RestyledTrack, negotiated_codec, pump
from livestyle.stream.engine import StreamClosed

log = logging.getLogger(__name__)

ARRIVALS_KEPT = 128  # input pts remembered for latency: more than the engine ever holds


class Session:
    """One peer's stream on the shared engine.

    kind: "camera" (the page: sends and receives video, has a `control` channel) or
    "whip" (ingest only; its output is watched over WHEP).
    """

    def __init__(self, kind: str, pc: RTCPeerConnection, loop: asyncio.AbstractEventLoop, name: str = "",
                 short_side: int = 256):
        self.id = secrets.token_urlsafe(16)
        self.kind, self.pc, self.loop, self.name, self.short_side = kind, pc, loop, name, short_side
        self.stream = None  # the engine's Stream, set once opened
        self.fanout = Fanout(loop, on_frame=self._restyled)
        self.inbox = LatestFrame()  # the newest input frame not yet submitted
        self.viewers: dict[str, Viewer] = {}
        self.channel = None  # the `control` RTCDataChannel
        self.authorized = False  # the channel has presented the token (or none is needed)
        self.update_lock = asyncio.Lock()  # control messages apply one at a time, in order
        self.tasks: set[asyncio.Task] = set()
        self.transceiver: RTCRtpTransceiver | None = None  # the video transceiver
        self.created = time.monotonic()
        self.last_input: float | None = None  # monotonic time of the newest input frame
        self.input_size: tuple[int, int] | None = None
        self.frames_received = 0
        self.ingesting = False  # its (first) video track is being restyled
        self.closed = False
        self.failure: str | None = None  # why it failed (a task of its own, the engine): it is closed for that
        self._seen = (0, 0)  # the engine's errors and frames out at the watchdog's previous round
        self._failing_since: float | None = None  # every frame out since then failed in the engine
        self._own_slot = None  # the camera page's own outgoing slot
        self._arrivals: OrderedDict[int, float] = OrderedDict()  # input pts -> arrival time
        self._latency_ms: deque[float] = deque(maxlen=90)  # arrival -> restyled frame back, per frame

    @property
    def label(self) -> str:
        """The public name of the session in logs and /stats (not its secret id)."""
        return self.stream.id if self.stream is not None else "-"

    def spawn(self, coro) -> asyncio.Task:
        """Run a coroutine for this session; it is cancelled when the session closes, and
        it closes the session if it fails (a session missing a task would stay open
        and output nothing, with nothing to tell the watchdog)."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if task.cancelled() or task.exception() is None or self.closed:
            return
        error = task.exception()
        self.failure = f"its task {task.get_coro().__qualname__} failed: {type(error).__name__}: {error}"
        log.error("session %s (%s): %s", self.label, self.kind, self.failure)
        log.debug("session %s: the failed task's traceback", self.label, exc_info=error)
        closing = self.loop.create_task(self.close(self.failure))
        self.tasks.add(closing)  # held until done, not cancelled by close(): it is the current task there
        closing.add_done_callback(self.tasks.discard)

    def own_track(self) -> RestyledTrack:
        """The outgoing track the camera page receives its restyled video on."""
        self._own_slot = self.fanout.subscribe()
        return RestyledTrack(self._own_slot)

    # -- Frames ---------------------------------------------------------------------------------

    async def ingest(self, track) -> None:
        """Restyle a peer's video track until it ends.

        The track's frames go through a LatestFrame to a submitter, because submit()
        converts and resizes the frame on the caller's thread: that runs on the
        executor, off the event loop, and a frame that arrives meanwhile replaces the
        one waiting (counted in `dropped`), so nothing queues on the server.
        """
        self.spawn(self._submitter())
        await pump(track, self._arrived)
        self.inbox.close()

    def _arrived(self, frame: av.VideoFrame) -> bool:
        if self.closed:
            return False
        self.last_input = time.monotonic()
        self.frames_received += 1
        self.input_size = (frame.width, frame.height)
        if frame.pts is not None:
            self._arrivals[frame.pts] = self.last_input
            while len(self._arrivals) > ARRIVALS_KEPT:
                self._arrivals.popitem(last=False)
        self.inbox.put(frame)
        return True

    async def _submitter(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await self.inbox.get()
            except MediaStreamError:
                return
            size = processing_size(frame.width, frame.height, self.short_side)
            try:
                if size != self.stream.settings.size:  # the peer's resolution changed (or its first frame)
                    await self.update({"size": size})
                await loop.run_in_executor(None, self.stream.submit, frame)  # never blocks: live stream
            except StreamClosed:  # the session or the engine is closing: not a failure
                return

    async def update(self, changes: dict) -> None:
        """Apply settings changes (validated by the stream), one at a time, on the executor."""
        async with self.update_lock:
            if not self.closed:
                await asyncio.get_running_loop().run_in_executor(None, functools.partial(self.stream.update, **changes))

    def _restyled(self, frame: av.VideoFrame) -> None:
        arrived = self._arrivals.pop(frame.pts, None) if frame.pts is not None else None
        if arrived is not None:
            self._latency_ms.append(1e3 * (time.monotonic() - arrived))

    # -- State ----------------------------------------------------------------------------------

    def expired(self, now: float, idle_timeout: float, connect_timeout: float) -> str | None:
        """Why this session should end now, or None while it is alive (the watchdog asks
        every round)."""
        if self.failure is None and self._engine_failing(now, idle_timeout):
            self.failure = (f"every frame failed in the engine for {idle_timeout:g} s "
                            f"({self.stream.stats().errors} errors; the server log says why)")
            log.error("session %s (%s): %s", self.label, self.kind, self.failure)
        if self.failure is not None:
            return self.failure
        state = self.pc.connectionState
        if state in ("failed", "closed"):
            return f"connection {state}"
        if self.last_input is None:
            return f"no video within {connect_timeout:g} s" if now - self.created > connect_timeout else None
        if now - self.last_input > idle_timeout:
            return f"no video for {idle_timeout:g} s"
        return None

    def _engine_failing(self, now: float, timeout: float) -> bool:
        """No frame came out restyled for `timeout` seconds, and frames failed (the device
        out of memory at this session's size, say): its peer would get stand-ins for
        ever. One failure among frames that work is the engine's to count, not a reason
        to end. (The engine counts a failed frame in `errors`, not in `frames_out`.)"""
        if self.stream is None:
            return False
        s = self.stream.stats()
        errors, out = s.errors - self._seen[0], s.frames_out - self._seen[1]
        self._seen = (s.errors, s.frames_out)
        if out > 0:  # a frame came out restyled (failed ones are not counted out)
            self._failing_since = None
        elif errors > 0 and self._failing_since is None:
            self._failing_since = now
        return self._failing_since is not None and now - self._failing_since >= timeout

    def stats(self) -> dict:
        """JSON-ready figures: rates over the last ~2 s, latency medians in ms, counts since start."""
        s = self.stream.stats() if self.stream is not None else None
        latency = statistics.median(self._latency_ms) if self._latency_ms else None
        return {
            "id": self.label,
            "kind": self.kind,
            "name": self.name,
            "state": self.pc.connectionState,
            "codec": negotiated_codec(self.transceiver) if self.transceiver is not None else None,
            "age_s": round(time.monotonic() - self.created, 1),
            "input_size": list(self.input_size) if self.input_size else None,
            "viewers": len(self.viewers),
            "fps_in": round(s.fps_in, 1) if s else 0.0,
            "fps_out": round(s.fps_out, 1) if s else 0.0,
            "latency_ms": round(latency, 1) if latency is not None else None,
            "model_ms": round(s.model_ms, 1) if s else None,
            "frames_received": self.frames_received,
            "frames_in": s.frames_in if s else 0,
            "frames_out": s.frames_out if s else 0,
            "dropped": (s.dropped if s else 0) + self.inbox.replaced,
            "skipped": s.skipped if s else 0,
            "errors": s.errors if s else 0,
            "send_dropped": self._own_slot.replaced if self._own_slot is not None else 0,
            "viewers_dropped": sum(v.slot.replaced for v in self.viewers.values()),  # their encoders were behind
            "settings": settings_dict(self.stream.settings) if self.stream is not None else None,
        }

    async def close(self, reason: str) -> None:
        """Free everything: viewers, the peer connection, the engine stream. Idempotent."""
        if self.closed:
            return
        self.closed = True
        log.info("session %s (%s) closed: %s", self.label, self.kind, reason)
        if self.stream is not None:
            # First, and before any await: the engine's share is what matters most, and
            # closing it only flips flags under the engine's lock (the worker never holds
            # the lock while it runs the model).
            self.stream.close()
        self.fanout.close()
        self.inbox.close()
        for task in list(self.tasks):
            if task is not asyncio.current_task():
                task.cancel()
        for viewer in list(self.viewers.values()):
            await viewer.close("its session ended")
        await self.pc.close()


class Viewer:
    """A WHEP peer playing one session's restyled frames (an OBS Browser Source, a player)."""

    def __init__(self, session: Session, pc: RTCPeerConnection):
        self.id = secrets.token_urlsafe(16)
        self.session, self.pc = session, pc
        self.slot = session.fanout.subscribe()
        self.track = RestyledTrack(self.slot)
        self.transceiver: RTCRtpTransceiver | None = None
        self.created = time.monotonic()
        self.closed = False

    async def expired(self, now: float, idle_timeout: float, connect_timeout: float) -> str | None:
        """Why this viewer should end now: its connection ended, or its receiver reports
        (RTCP, about one a second from any WebRTC receiver) stopped coming."""
        state = self.pc.connectionState
        if state in ("failed", "closed"):
            return f"connection {state}"
        if state != "connected" or self.transceiver is None:
            return f"not connected within {connect_timeout:g} s" if now - self.created > connect_timeout else None
        stats = await self.transceiver.sender.getStats()
        reports = [s.timestamp.timestamp() for s in stats.values() if s.type == "remote-inbound-rtp"]
        last = max(reports, default=None)
        if last is None:
            return "no receiver reports" if now - self.created > connect_timeout else None
        if time.time() - last > idle_timeout:
            return f"no receiver reports for {idle_timeout:g} s"
        return None

    async def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        log.info("viewer of session %s closed: %s", self.session.label, reason)
        self.session.viewers.pop(self.id, None)
        self.session.fanout.unsubscribe(self.slot)
        await self.pc.close()
