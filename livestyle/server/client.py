"""A Python client of the server, for scripts, tests and the latency benchmark.

    async with CameraClient(url, SyntheticTrack(frames)) as client:   # POST /offer + `control`
        await client.control({"strength": 0.5})
        frame = await client.next_frame()
    pc, location = await whip_publish(url, track)                     # POST /whip
    pc, location, received = await whep_play(url, session_key)        # POST /whep

Latency: the server gives each restyled frame the pts of the input frame it restyles,
and aiortc starts each direction's pts at 0 with the first frame its receiver sees. If
a first frame is lost the two clocks differ by a whole number of frames, so the
client cannot just look its pts up: SyntheticTrack spaces its pts irregularly (a
fixed pattern of up to half a frame), and `latencies()` finds the one offset that maps
received pts onto sent ones, then pairs send and receive times per frame (capture pts
to received by the client: encode, network, decode, the model and back).
"""

from __future__ import annotations

import asyncio
import bisect
import json
import random
import time
from collections.abc import Sequence
from fractions import Fraction

import av
from aiohttp import ClientSession
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription, VideoStreamTrack
from aiortc.mediastreams import MediaStreamError

VIDEO_TIME_BASE = Fraction(1, 90_000)  # RTP's video clock


class SyntheticTrack(VideoStreamTrack):
    """Sends `frames` in a loop at `fps`, paced like a camera; records when each pts left.

    frames: RGB av.VideoFrames (or uint8 (H,W,3) arrays) to cycle through.
    sent[pts] = time.monotonic() when the frame was handed to the encoder (its capture time).
    """

    def __init__(self, frames: Sequence, fps: int = 30):
        super().__init__()
        self.frames = [f.to_ndarray(format="rgb24") if isinstance(f, av.VideoFrame) else f for f in frames]
        self.fps, self.count = fps, 0
        self.sent: dict[int, float] = {}
        self._start: float | None = None
        self._jitter = random.Random(0)

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        # Irregular spacing (random, within half a frame) makes every run of pts unique,
        # so received pts can be matched to sent ones whatever the offset.
        pts = round(self.count * 90_000 / self.fps) + self._jitter.randrange(45_000 // self.fps)
        if self._start is None:
            self._start = time.monotonic()
        wait = self._start + self.count / self.fps - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        # A new frame each time: the encoder works on it on another thread.
        frame = av.VideoFrame.from_ndarray(self.frames[self.count % len(self.frames)], format="rgb24")
        frame.pts, frame.time_base = pts, VIDEO_TIME_BASE
        self.count += 1
        self.sent[pts] = time.monotonic()
        return frame


def prefer_codec(pc: RTCPeerConnection, mime: str) -> None:
    """Offer only `mime` ("video/H264" or "video/VP8") on the video transceivers."""
    codecs = [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType.lower() == mime.lower()]
    for transceiver in pc.getTransceivers():
        if transceiver.kind == "video":
            transceiver.setCodecPreferences(codecs)


class Receiver:
    """Reads a received video track: counts frames, keeps the newest, times each pts."""

    def __init__(self):
        self.frames = 0
        self.latest: av.VideoFrame | None = None
        self.received: dict[int, float] = {}  # pts -> time.monotonic() of arrival
        self.arrived = asyncio.Event()
        self.task: asyncio.Task | None = None

    def start(self, track) -> None:
        self.task = asyncio.ensure_future(self._read(track))

    async def _read(self, track) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.frames += 1
            self.latest = frame
            self.received[frame.pts] = time.monotonic()
            self.arrived.set()

    async def next_frame(self, timeout: float = 10.0) -> av.VideoFrame:
        """The next frame to arrive from now."""
        self.arrived.clear()
        await asyncio.wait_for(self.arrived.wait(), timeout)
        return self.latest


class OfferRefused(RuntimeError):
    """The server answered an offer with an error: its HTTP status and its reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"/offer answered {status}: {reason}")
        self.status, self.reason = status, reason


class CameraClient:
    """What the camera page does, in Python: video both ways and a `control` channel."""

    def __init__(self, url: str, track: VideoStreamTrack, token: str = "", preset: str | None = None,
                 codec: str | None = None, authenticate_channel: bool = True):
        self.url, self.track, self.token, self.preset, self.codec = url.rstrip("/"), track, token, preset, codec
        self.authenticate_channel = authenticate_channel
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # loopback: no STUN
        self.receiver = Receiver()
        self.channel = None
        self.session: str | None = None  # the session's secret id
        self.label: str | None = None  # its public name in /stats
        self.stats: dict | None = None  # the newest {"stats": ...} the server pushed
        self._replies: dict[int, asyncio.Future] = {}
        self._ids = 0

    async def __aenter__(self) -> CameraClient:
        try:
            await self.connect()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        pc = self.pc
        pc.addTransceiver(self.track, direction="sendrecv")
        if self.codec:
            prefer_codec(pc, self.codec)
        self.channel = pc.createDataChannel("control")
        opened = asyncio.Event()
        self.channel.on("open", opened.set)
        self.channel.on("message", self._message)
        pc.on("track", lambda track: self.receiver.start(track) if track.kind == "video" else None)
        await pc.setLocalDescription(await pc.createOffer())
        body = {"sdp": pc.localDescription.sdp, "type": "offer"}
        if self.preset:
            body["preset"] = self.preset
        async with ClientSession() as http, \
                http.post(f"{self.url}/offer", json=body, headers=auth(self.token)) as response:
            answer = await response.json()
            if response.status != 200:
                raise OfferRefused(response.status, str(answer.get("error")))
        self.session, self.label = answer["session"], answer.get("label")
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        await asyncio.wait_for(opened.wait(), 10)
        if self.token and self.authenticate_channel:
            await self.control({"token": self.token})

    def _message(self, data) -> None:
        message = json.loads(data)
        if "stats" in message:
            self.stats = message["stats"]
        future = self._replies.pop(message.get("id"), None)
        if future is not None and not future.done():
            future.set_result(message)

    async def control(self, message: dict, timeout: float = 10.0) -> dict:
        """Send a control message; the server's reply ({"ok": ...} or {"error": ...})."""
        self._ids += 1
        future = asyncio.get_running_loop().create_future()
        self._replies[self._ids] = future
        self.channel.send(json.dumps({**message, "id": self._ids}))
        return await asyncio.wait_for(future, timeout)

    async def next_frame(self, timeout: float = 10.0) -> av.VideoFrame:
        return await self.receiver.next_frame(timeout)

    def latencies(self) -> list[float]:
        """Seconds from sending to receiving, for every frame that came back."""
        return [received - sent for sent, received in pair_frames(getattr(self.track, "sent", {}),
                                                                  self.receiver.received)]

    async def close(self) -> None:
        await self.pc.close()
        if self.receiver.task is not None:
            await asyncio.gather(self.receiver.task, return_exceptions=True)


def pair_frames(sent: dict[int, float], received: dict[int, float], tolerance: int = 8,
                offset: int | None = None) -> list[tuple[float, float]]:
    """(send time, receive time) of each received frame.

    A received pts plus an offset is a sent pts (the offset is the pts of the first frame
    to come back when earlier ones were lost or dropped; aiortc's encoders also round a pts down by a tick now and then,
    hence `tolerance` in 90 kHz ticks). The offset chosen matches the most frames (or is
    `offset`, found once by pts_offset for a long run); the result is empty unless it
    matches at least 90% of the received frames.
    """
    if not sent or not received:
        return []
    keys = sorted(sent)
    if offset is None:
        offset = pts_offset(sent, received, tolerance)
    pairs = [(sent[s], t) for r, t in received.items() if (s := _match(keys, r + offset, tolerance)) is not None]
    return pairs if len(pairs) >= 0.9 * len(received) else []


def pts_offset(sent: dict[int, float], received: dict[int, float], tolerance: int = 8) -> int:
    """The offset from received to sent pts that matches most of the first ten received frames.

    It stays the same for a connection's life: each side's pts start at its first frame."""
    keys = sorted(sent)
    first = sorted(received)[:10]
    offsets = {s - r for r in first for s in keys}
    return max(offsets, key=lambda o: sum(_match(keys, r + o, tolerance) is not None for r in first))


def _match(keys: list[int], pts: int, tolerance: int) -> int | None:
    """The sent pts within `tolerance` of pts, if any (keys sorted)."""
    i = bisect.bisect_left(keys, pts - tolerance)
    return keys[i] if i < len(keys) and keys[i] <= pts + tolerance else None


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def post_sdp(url: str, sdp: str, token: str = "", params: dict | None = None) -> tuple[str, str]:
    """POST an SDP offer (WHIP/WHEP); returns the answer and its Location. Raises
    RuntimeError with the server's reason unless it answers 201 Created."""
    headers = {"Content-Type": "application/sdp", **auth(token)}
    async with ClientSession() as http, http.post(url, params=params, data=sdp, headers=headers) as response:
        text = await response.text()
        if response.status != 201:
            raise RuntimeError(f"{url} answered {response.status}: {text.strip()}")
        return text, response.headers["Location"]


async def whip_publish(url: str, track, token: str = "", query: str = "") -> tuple[RTCPeerConnection, str]:
    """Send `track` to POST /whip (send-only, like OBS); returns the connection and Location."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver(track, direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    try:
        answer, location = await post_sdp(f"{url.rstrip('/')}/whip{query}", pc.localDescription.sdp, token)
    except RuntimeError:
        await pc.close()
        raise
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return pc, location


async def whep_play(url: str, key: str, token: str = "") -> tuple[RTCPeerConnection, str, Receiver]:
    """Play a session's restyled stream over POST /whep?session=KEY; returns the
    connection, the viewer's Location and a Receiver of its frames."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    receiver = Receiver()
    pc.on("track", receiver.start)
    await pc.setLocalDescription(await pc.createOffer())
    try:
        answer, location = await post_sdp(f"{url.rstrip('/')}/whep", pc.localDescription.sdp, token, {"session": key})
    except RuntimeError:
        await pc.close()
        raise
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    return pc, location, receiver
