"""Video sources: each yields av.VideoFrames in RGB with pts and time_base set.

`test:` is a synthetic source: a virtual camera gliding over an image shipped with
livestyle (pan, zoom and a little rotation, back and forth), so demos and tests need
no camera and no download.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from livestyle.capture.synthetic import CameraPath
from livestyle.errors import LivestyleError

ASSETS = Path(__file__).resolve().parents[1] / "assets"


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


def open_source(spec: str, size: tuple[int, int], fps: int = 24, seconds: float = 4.0):
    """A source from the command line's INPUT."""
    if spec == "test:" or spec.startswith("test:"):
        return SyntheticSource(spec[5:] or "coffee", size, fps, max(1, round(seconds * fps)))
    raise LivestyleError(f"{spec}: only the synthetic source test: (or test:NAME) can be read yet; "
                         "files, URLs and cameras are not built yet")
