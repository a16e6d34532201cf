"""Video sources, and `open_source`, which reads the command line's INPUT.

Every source yields av.VideoFrames (any pixel format; the engine converts) with pts and
time_base set, upright, all of one size, and says what it is in a `SourceInfo`:

    test: / test:NAME            SyntheticSource: a camera gliding over a shipped image
    cam:N, /dev/videoN           camera.CameraSource (OpenCV)
    a file, rtsp:// http(s):// ...  files.FileSource (PyAV: any container and codec FFmpeg reads)
    a folder, or a glob (*.png)  folder.ImageFolderSource

A source is used on one thread at a time (the reader thread, see threads.py) and is a
context manager: leaving it releases the file, stream or camera.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from livestyle.capture.synthetic import CameraPath
from livestyle.errors import LivestyleError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
URL_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "srt", "udp", "tcp", "http", "https")
LIVE_SCHEMES = ("rtsp", "rtsps", "rtmp", "rtmps", "srt", "udp", "tcp")  # never have an end or a length


@dataclass(frozen=True)
class SourceInfo:
    """What a source yields.

    name: the INPUT as given. size: (w, h) of every frame, after rotation.
    rate: the nominal frame rate (frames per second) or None if unknown; frames keep
        their own pts, so a variable frame rate survives. time_base: the pts unit.
    frames: how many frames there are, when known (files, folders, test:).
    live: frames come at the source's pace and cannot wait (cameras, network streams):
        the engine keeps the latest one instead of queueing.
    """

    name: str
    size: tuple[int, int]
    rate: Fraction | None
    time_base: Fraction
    frames: int | None = None
    live: bool = False


def shipped_image(name: str) -> np.ndarray:
    """uint8 (H,W,3) RGB of an image in livestyle/assets (e.g. "coffee")."""
    path = ASSETS / f"{name}.jpg"
    image = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
    if image is None:
        known = ", ".join(p.stem for p in sorted(ASSETS.glob("*.jpg")))
        raise LivestyleError(f"test:{name}: no such shipped image (known: {known})")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class SyntheticSource:
    """A camera moving smoothly over a shipped image: `test:` or `test:NAME`.

    size: (w, h) of the frames; fps: frame rate; frames: how many.
    The camera swings back and forth (a slow sine in pan, zoom and angle), so any
    length of clip stays inside the image.
    """

    def __init__(self, image: str = "coffee", size: tuple[int, int] = (256, 256), fps: int = 24,
                 frames: int = 96):
        self.image = shipped_image(image)
        self.size, self.fps, self.frames = size, fps, frames
        self.time_base = Fraction(1, fps)
        self.info = SourceInfo(f"test:{image}", size, Fraction(fps), self.time_base, frames)

    def path_at(self, t: int) -> CameraPath:
        """The camera at frame t, as a CameraPath frozen at that frame."""
        H, W = self.image.shape[:2]
        w, h = self.size
        fit = min(W / w, H / h)  # source px per output px that fills the frame
        phase = 2 * math.pi * t / (4 * self.fps)  # one swing every 4 seconds
        scale = fit * (0.8 + 0.1 * math.cos(phase * 0.5))
        slack_x, slack_y = (W - w * scale) / 2, (H - h * scale) / 2
        center = (W / 2 + 0.8 * slack_x * math.sin(phase), H / 2 + 0.6 * slack_y * math.sin(phase * 0.7))
        return CameraPath((W, H), center, scale=scale, angle=3 * math.sin(phase * 0.5))

    def __iter__(self) -> Iterator[av.VideoFrame]:
        w, h = self.size
        for t in range(self.frames):
            M = self.path_at(t).affine(0, self.size)
            rgb = cv2.warpAffine(self.image, M, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                 borderMode=cv2.BORDER_REFLECT)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = t, self.time_base
            yield frame

    def close(self) -> None:
        pass

    def __enter__(self) -> SyntheticSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_url(spec: str) -> bool:
    scheme, sep, _ = spec.partition("://")
    return bool(sep) and scheme.lower() in URL_SCHEMES


def camera_index(spec: str) -> int | str | None:
    """The camera a spec names: an index for `cam:N` (`cam:` is 0), the device path for
    /dev/videoN, or None when the spec is not a camera."""
    if spec.startswith("cam:"):
        rest = spec[4:] or "0"
        if not rest.isdigit():
            raise LivestyleError(f"{spec}: a camera is cam:N with N a number (cam:0 is the first)")
        return int(rest)
    if re.fullmatch(r"/dev/video\d+", spec):
        return spec
    return None


def open_source(spec: str, size: tuple[int, int] | None = None, fps: float | None = None,
                seconds: float = 4.0, timeout: float = 10.0):
    """A source from the command line's INPUT (see the module docstring for the forms).

    size: (w, h) asked of a camera, or the frame size of test: (default 256x256).
    fps: the frame rate asked of a camera, or the rate of test: and image folders
        (default 24); files keep their own timing.
    seconds: the length of test: (other sources end on their own, or on Ctrl-C).
    timeout: network sources give up when opening, or a read, stalls this many seconds.
    Raises LivestyleError naming the problem when the input cannot be read.
    """
    # The other sources are imported here because their modules import SourceInfo from this one.
    if spec.startswith("test:"):
        rate = max(1, round(fps or 24))
        return SyntheticSource(spec[5:] or "coffee", size or (256, 256), rate, max(1, round(seconds * rate)))
    camera = camera_index(spec)
    if camera is not None:
        from livestyle.capture.camera import CameraSource

        return CameraSource(camera, size, fps)
    if is_url(spec):
        from livestyle.capture.files import FileSource

        scheme = spec.partition("://")[0].lower()
        return FileSource(spec, live=True if scheme in LIVE_SCHEMES else None, timeout=timeout)
    scheme, sep, _ = spec.partition("://")
    if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):  # ftp://, file://, javascript:// ...
        raise LivestyleError(f"{spec[:80]}: {scheme}:// is not a source livestyle reads "
                             f"(URLs: {', '.join(s + '://' for s in URL_SCHEMES)})")
    if any(c in spec for c in "*?[") or Path(spec).is_dir():
        from livestyle.capture.folder import ImageFolderSource

        return ImageFolderSource(spec, fps or 24)
    from livestyle.capture.files import FileSource

    return FileSource(spec)
