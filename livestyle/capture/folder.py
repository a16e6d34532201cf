"""Image sequences: a folder or glob of images as a video, and numbered images as an output.

    livestyle run shots/ -o out.mp4                 every image in shots/, in natural order
    livestyle run "shots/*.png" -o out/%05d.png     a glob in, numbered PNGs out (ffmpeg's pattern)

Natural order sorts frame_2 before frame_10. Frames take the first image's size (the
others are resized to it, as a video has one size) and are timed at a fixed rate.
"""

from __future__ import annotations

import glob
import logging
import re
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import cv2

from livestyle.capture.sources import SourceInfo
from livestyle.errors import LivestyleError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def natural_key(path: Path) -> list:
    """Sort key that orders the numbers inside names by value (frame_2 < frame_10)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def list_images(spec: str) -> list[Path]:
    """The images of a folder, or matching a glob, in natural order."""
    if Path(spec).is_dir():
        paths = [p for p in Path(spec).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
    else:
        paths = [Path(p) for p in glob.glob(spec) if Path(p).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(paths, key=natural_key)


class ImageFolderSource:
    """The images of a folder or glob as frames at `fps`.

    An image that cannot be read is skipped with a warning (a stream goes on past a bad
    frame); a folder with no images fails at opening.
    """

    def __init__(self, spec: str, fps: float = 24):
        self.paths = list_images(spec)
        if not self.paths:
            raise LivestyleError(f"{spec}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
        first = cv2.imread(str(self.paths[0]), cv2.IMREAD_COLOR)
        if first is None:
            raise LivestyleError(f"{self.paths[0]}: not an image OpenCV can read")
        h, w = first.shape[:2]
        rate = Fraction(fps).limit_denominator(1001)
        self.info = SourceInfo(spec, (w, h), rate, 1 / rate, len(self.paths))
        self.damaged = 0  # images skipped as unreadable, for the caller to report

    def __iter__(self) -> Iterator[av.VideoFrame]:
        w, h = self.info.size
        for index, path in enumerate(self.paths):
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                log.warning("%s: skipped, not an image OpenCV can read", path)
                self.damaged += 1
                continue
            if bgr.shape[:2] != (h, w):
                log.info("%s: %dx%d resized to %dx%d, the size of the first image", path, bgr.shape[1],
                         bgr.shape[0], w, h)
                bgr = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA)
            frame = av.VideoFrame.from_ndarray(bgr, format="bgr24")
            frame.pts, frame.time_base = index, self.info.time_base
            yield frame

    def close(self) -> None:
        pass

    def __enter__(self) -> ImageFolderSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_sequence_pattern(path: str) -> bool:
    """True for an ffmpeg-style numbered pattern such as out/%05d.png."""
    return re.search(r"%0?\d*d", Path(path).name) is not None and Path(path).suffix.lower() in IMAGE_SUFFIXES


class ImageSequenceSink:
    """Writes frames as numbered images of `size` = (w, h): `pattern` % 1, % 2, ... (ffmpeg numbers from 1)."""

    def __init__(self, pattern: str | Path, size: tuple[int, int]):
        self.pattern, self.size = str(pattern), size
        folder = Path(self.pattern).parent
        if not folder.is_dir():
            raise LivestyleError(f"{self.pattern}: folder {folder} does not exist")
        self.frames = 0

    def write(self, frame: av.VideoFrame) -> None:
        path = self.pattern % (self.frames + 1)
        w, h = self.size
        try:
            ok = cv2.imwrite(path, frame.to_ndarray(width=w, height=h, format="bgr24", interpolation="BICUBIC"))
        except cv2.error:  # an extension OpenCV has no writer for
            ok = False
        if not ok:
            Path(path).unlink(missing_ok=True)  # a full disk leaves part of an image: no corrupt file stays
            raise LivestyleError(f"{path}: cannot write this image")
        self.frames += 1

    def close(self) -> None:
        pass

    def __enter__(self) -> ImageSequenceSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
