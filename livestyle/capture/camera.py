"""Webcams through OpenCV: `cam:N` (the N-th camera) or a device path (/dev/video2).

A camera is asked for a resolution and frame rate, in MJPG where it offers it (most
USB webcams only reach 720p30 and up in MJPG; raw YUYV over USB 2 tops out far lower),
and gives what it can: the frames say what was granted. Frames are stamped with the
time they were read (milliseconds since the camera opened), so latency can be
measured per frame and a recording keeps the real timing.
"""

from __future__ import annotations

import logging
import platform
import sys
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import cv2

from livestyle.capture.sources import SourceInfo
from livestyle.errors import LivestyleError

log = logging.getLogger(__name__)

TIME_BASE = Fraction(1, 1000)  # pts in milliseconds since the camera opened


def _backend() -> int:
    """OpenCV's native capture API for this platform (skipping its slower fallbacks)."""
    if sys.platform.startswith("linux"):
        return cv2.CAP_V4L2
    if sys.platform == "darwin":
        return cv2.CAP_AVFOUNDATION
    if sys.platform == "win32":
        return cv2.CAP_DSHOW  # opens in a fraction of MSMF's time and honours MJPG
    return cv2.CAP_ANY


def linux_cameras() -> list[str]:
    """The video capture devices present (/dev/video*), as cam:N names."""
    return [f"cam:{p.name[5:]}" for p in sorted(Path("/dev").glob("video*"), key=lambda p: int(p.name[5:] or 0))
            if p.name[5:].isdigit()]


class CameraSource:
    """A live camera.

    device: an index (cam:N) or a device path. size: (w, h) to ask for; fps: the rate
    to ask for. Opening reads one frame, so a camera that does not exist or will not
    stream fails here with a one-line LivestyleError.
    """

    def __init__(self, device: int | str, size: tuple[int, int] | None = None, fps: float | None = None):
        self.name = f"cam:{device}" if isinstance(device, int) else device
        if sys.platform.startswith("linux"):
            path = Path(f"/dev/video{device}") if isinstance(device, int) else Path(device)
            if not path.exists():  # say so before OpenCV prints its own warnings
                found = ", ".join(linux_cameras()) or "none"
                raise LivestyleError(f"{self.name}: no such camera ({path} does not exist; cameras found: {found})")
        self.capture = cv2.VideoCapture(device, _backend())
        if not self.capture.isOpened():
            raise LivestyleError(f"{self.name}: cannot open this camera (in use by another program, "
                                 "or no permission to use it)")
        self.capture.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*"MJPG"))  # before the size: it limits sizes
        if size:
            self.capture.set(cv2.CAP_PROP_FRAME_WIDTH, size[0])
            self.capture.set(cv2.CAP_PROP_FRAME_HEIGHT, size[1])
        if fps:
            self.capture.set(cv2.CAP_PROP_FPS, fps)
        self.capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not one queued in the driver
        self.start = time.monotonic()
        ok, first = self.capture.read()
        if not ok:
            self.capture.release()
            raise LivestyleError(f"{self.name}: the camera opened but sends no frames")
        self._first = first
        h, w = first.shape[:2]
        granted = self.capture.get(cv2.CAP_PROP_FPS)
        rate = Fraction(granted).limit_denominator(1001) if granted > 0 else Fraction(fps or 30).limit_denominator(1001)
        if size and (w, h) != tuple(size):
            log.info("%s: asked for %dx%d, the camera gives %dx%d", self.name, *size, w, h)
        self.info = SourceInfo(self.name, (w, h), rate, TIME_BASE, None, live=True)

    def _frame(self, bgr, at: float) -> av.VideoFrame:
        frame = av.VideoFrame.from_ndarray(bgr, format="bgr24")  # the engine converts; no copy here
        frame.pts, frame.time_base = round((at - self.start) * 1000), TIME_BASE
        return frame

    def __iter__(self) -> Iterator[av.VideoFrame]:
        last = -1
        if self._first is not None:
            frame, self._first = self._frame(self._first, time.monotonic()), None
            last = frame.pts
            yield frame
        while True:
            ok, bgr = self.capture.read()
            if not ok:
                log.warning("%s: the camera stopped sending frames", self.name)
                return
            frame = self._frame(bgr, time.monotonic())
            frame.pts = max(frame.pts, last + 1)  # two reads within a millisecond still get distinct times
            last = frame.pts
            yield frame

    def close(self) -> None:
        self.capture.release()

    def __enter__(self) -> CameraSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def camera_help() -> str:
    """Where cameras are looked for on this platform, for `livestyle info`."""
    if sys.platform.startswith("linux"):
        return f"V4L2 ({', '.join(linux_cameras()) or 'no /dev/video* devices'})"
    return {"Darwin": "AVFoundation", "Windows": "DirectShow"}.get(platform.system(), "OpenCV default")
