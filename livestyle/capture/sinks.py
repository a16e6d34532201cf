"""Video sinks: where restyled frames go. A file sink encodes H.264 through PyAV.

A sink is a context manager: leaving it (normally, on an error or on Ctrl-C) flushes
the encoder and closes the container, so the file is valid and playable up to the
last frame written.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av

from livestyle.errors import LivestyleError


class FileSink:
    """Encodes frames to a video file (H.264 yuv420p in MP4/MKV/MOV by default).

    size: (w, h), even numbers for yuv420p; time_base: the frames' pts unit;
    rate: the nominal frame rate written in the container.
    """

    def __init__(self, path: str | Path, size: tuple[int, int], time_base: Fraction, rate: Fraction | int,
                 codec: str = "libx264", crf: int = 18, pix_fmt: str = "yuv420p"):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise LivestyleError(f"{self.path}: folder {self.path.parent} does not exist")
        try:
            self.container = av.open(str(self.path), mode="w")
        except (av.FFmpegError, ValueError) as e:
            raise LivestyleError(f"{self.path}: cannot write this file ({e})") from None
        self.stream = self.container.add_stream(codec, rate=rate)
        self.stream.width, self.stream.height = size
        self.stream.pix_fmt = pix_fmt
        self.stream.time_base = time_base
        self.stream.codec_context.time_base = time_base
        if codec in ("libx264", "libx265"):
            self.stream.options = {"crf": str(crf), "preset": "veryfast"}
        self.frames = 0

    def write(self, frame: av.VideoFrame) -> None:
        """Encode one frame; its pts (in `time_base`) sets its time in the file."""
        for packet in self.stream.encode(frame.reformat(format=self.stream.pix_fmt)):
            self.container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        for packet in self.stream.encode(None):  # flush the encoder's delayed frames
            self.container.mux(packet)
        self.container.close()

    def __enter__(self) -> FileSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
