"""Files and network streams through PyAV: any container and codec FFmpeg reads.

The first video stream is decoded; frames keep their pts and the stream's time_base
(a variable frame rate survives as is), and frames whose stream carries a rotation
(a display matrix, as phones write) come out upright. The first audio stream, if any,
is handed on as packets (`read(audio=True)`) so a file sink can copy it untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from livestyle.capture.sources import SourceInfo
from livestyle.errors import LivestyleError

log = logging.getLogger(__name__)

MAX_RESYNCS = 1000  # a damaged file: times the demuxer may lose sync (EAGAIN) before reading stops
OPEN_TIMEOUT_S = 10.0  # network streams: give up opening, or a read, after this long (the CLI's --timeout)


def _describe_streams(container: av.container.InputContainer) -> str:
    kinds = [f"{s.type} {s.codec_context.name if s.codec_context else '?'}" for s in container.streams]
    return ", ".join(kinds) or "no streams"


class TimestampGaps:
    """Frames missing from a constant-rate stream: what the gaps in its timestamps would hold.

    Fed each decoded frame's time in turn (`add`), in constant memory, so a stream of any
    length can be followed. step: one frame's duration, in the times' unit. A
    constant-rate stream's intervals are whole steps, most of them one; a stream whose
    intervals fall between steps is variable-rate, its gaps are its timing, not loss, and
    `missing` is 0. A time not after the latest one (a repeat, or out of order) makes no
    interval.
    """

    def __init__(self, step: Fraction):
        self.step = step
        self.latest: Fraction | None = None
        self.intervals = self.on_grid = self.single = self.skipped = 0

    def add(self, time: Fraction) -> None:
        if self.latest is not None and time > self.latest and self.step > 0:
            steps = (time - self.latest) / self.step
            whole = round(steps)
            self.intervals += 1
            if whole >= 1 and abs(steps - whole) <= 0.02:
                self.on_grid += 1
                self.single += whole == 1
                self.skipped += whole - 1
        if self.latest is None or time > self.latest:
            self.latest = time

    @property
    def missing(self) -> int:
        n = self.intervals
        return self.skipped if n and self.on_grid >= 0.9 * n and self.single >= 0.5 * n else 0


def upright(frame: av.VideoFrame) -> av.VideoFrame:
    """The frame turned by its display rotation (a multiple of 90 degrees), pts kept.

    frame.rotation is the counter-clockwise angle that shows the frame upright;
    np.rot90 turns counter-clockwise too.
    """
    turns = round(frame.rotation / 90) % 4
    if turns == 0:
        return frame
    rgb = np.ascontiguousarray(np.rot90(frame.to_ndarray(format="rgb24"), k=turns))  # (H,W,3) -> (W,H,3) for odd turns
    out = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    out.pts, out.time_base, out.duration = frame.pts, frame.time_base, frame.duration
    return out


class FileSource:
    """A video file or a network stream (rtsp://, http(s)://, srt://, ...).

    path: a file path or a URL. live: whether frames come at the source's pace (True for
    rtsp and the like); None decides from the container: no known length means live.
    timeout: seconds a network stream may take to open, or stall in a read, before it
    fails (LivestyleError from the iteration: a stalled stream is an error, not an end).
    Opening reads up to the first decodable frame, so a file that FFmpeg cannot read, or
    one without video, fails here with a one-line LivestyleError.

    A damaged file is read past its damage: `damaged` counts the video packets that could
    not be decoded, the read errors that ended it early and the frames that never came: those
    a container's index lists (MP4, MOV) or, in one without an index (MPEG-TS, Matroska), those
    the gaps in a constant-rate stream's timestamps would hold. The caller reports the count.
    """

    def __init__(self, path: str | Path, live: bool | None = None, timeout: float = OPEN_TIMEOUT_S):
        self.name = str(path)
        self.timeout = timeout
        self.damaged = 0
        is_file = "://" not in self.name
        self.network = not is_file
        if is_file:
            file = Path(path)
            if not file.exists():
                raise LivestyleError(f"{path}: no such file")
            if file.is_dir():
                raise LivestyleError(f"{path}: is a folder with no images in it")
            if file.stat().st_size == 0:
                raise LivestyleError(f"{path}: the file is empty (0 bytes)")
            if not file.is_file():  # a FIFO or a device would block or read forever
                raise LivestyleError(f"{path}: not a regular file")
        options = {"rtsp_transport": "tcp"} if self.name.startswith(("rtsp://", "rtsps://")) else {}
        try:
            # (open, read) timeouts: FFmpeg's interrupt callback gives up on a stalled socket.
            self.container = av.open(self.name, options=options, timeout=(timeout, timeout))
        except av.error.InvalidDataError:
            raise LivestyleError(f"{path}: not a video file FFmpeg can read (invalid data)") from None
        except av.error.FileNotFoundError:
            raise LivestyleError(f"{path}: no such file or stream") from None
        except (av.FFmpegError, OSError, ValueError) as e:
            why = f"nothing came within {timeout:g} s" if isinstance(e, av.error.ExitError) else e
            raise LivestyleError(f"{path}: cannot open ({why})") from None
        try:
            self._open_streams(live)
        except BaseException:
            self.container.close()
            raise

    def _open_streams(self, live: bool | None) -> None:
        if not self.container.streams.video:
            raise LivestyleError(f"{self.name}: no video stream (it holds: {_describe_streams(self.container)})")
        self.video = self.container.streams.video[0]
        self.video.thread_type = "AUTO"  # frame + slice threads: decoding keeps up with the model
        audio = self.container.streams.audio[0] if self.container.streams.audio else None
        # A damaged header can leave a stream without a decoder: its audio cannot be copied or re-encoded.
        self.audio = audio if audio is not None and audio.codec_context is not None else None
        self.audio_lost = audio is not None and self.audio is None
        self._items = self._demux()
        self._pending: list[av.VideoFrame | av.Packet] = []
        first = self._peek_frame()
        if first is None:
            raise LivestyleError(f"{self.name}: no video frame could be decoded "
                                 f"(truncated or damaged file? it holds: {_describe_streams(self.container)})")
        rate = self.video.average_rate or self.video.guessed_rate
        frames = self.video.frames or None
        if frames is None and self.video.duration and rate:
            frames = round(self.video.duration * self.video.time_base * rate)
        if live is None:
            live = self.container.duration is None and frames is None
        self.info = SourceInfo(self.name, (first.width, first.height), Fraction(rate) if rate else None,
                               first.time_base or self.video.time_base, frames, live)

    def _peek_frame(self) -> av.VideoFrame | None:
        """Read ahead to the first video frame, keeping what was read for `read()`."""
        for item in self._items:
            self._pending.append(item)
            if isinstance(item, av.VideoFrame):
                return item
        return None

    def _demux(self) -> Iterator[av.VideoFrame | av.Packet]:
        """Decoded video frames (upright, with pts) and raw audio packets, in file order."""
        streams = [self.video] + ([self.audio] if self.audio else [])
        rate = self.video.average_rate or self.video.guessed_rate or 25
        count, resyncs = 0, 0
        gaps = TimestampGaps(1 / Fraction(rate))
        packets = self.container.demux(streams)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.FFmpegError as e:
                if isinstance(e, av.error.BlockingIOError) and not self.network and resyncs < MAX_RESYNCS:
                    resyncs += 1  # EAGAIN: the demuxer lost sync in damaged data; a new read goes on past it
                    packets = self.container.demux(streams)
                    continue
                if self.network:  # a stalled or dropped stream: an error the run reports, not an end
                    why = (f"no data for {self.timeout:g} s" if isinstance(e, av.error.ExitError)
                           else e.strerror if isinstance(e, OSError) and e.strerror else e)
                    raise LivestyleError(f"{self.name}: the stream stopped after {count} frames ({why})") from None
                log.debug("%s: stopped reading after %d frames: %s", self.name, count, e)
                self.damaged += 1  # a truncated or damaged file: keep what was read, and count it
                break
            if packet.stream.type == "audio":
                if packet.dts is not None:  # the demuxer's empty flush packet carries no data
                    yield packet
                continue
            try:
                frames = packet.decode()
            except av.FFmpegError as e:  # counted; the caller reports the total in one line
                log.debug("%s: skipped a damaged packet at pts %s: %s", self.name, packet.pts, e)
                self.damaged += 1
                continue
            for frame in frames:
                if frame.pts is None:  # raw elementary streams carry no timestamps: count frames
                    frame.time_base = Fraction(1, 1) / Fraction(rate)
                    frame.pts = count
                count += 1
                if frame.time_base:
                    gaps.add(frame.pts * frame.time_base)  # seconds, exact
                yield upright(frame)
        # MP4 and MOV list every frame in their index: fewer decoded is a cut or damaged file.
        # Without an index, a damaged MPEG-TS loses whole packets silently: its timestamps show the gap.
        if self.video.frames:
            missing = self.video.frames - count - self.damaged
        else:
            missing = gaps.missing - self.damaged
        if missing > 0:
            log.debug("%s: %d frames could not be read", self.name, missing)
            self.damaged += missing

    def read(self, audio: bool = False) -> Iterator[av.VideoFrame | av.Packet]:
        """Video frames, and with `audio` the audio stream's packets in between them."""
        while self._pending or self._items is not None:
            if self._pending:
                item = self._pending.pop(0)
            else:
                item = next(self._items, None)
                if item is None:
                    self._items = None
                    break
            if audio or isinstance(item, av.VideoFrame):
                yield item

    def __iter__(self) -> Iterator[av.VideoFrame]:
        return self.read(audio=False)

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
