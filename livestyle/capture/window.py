"""A preview window (OpenCV), optionally with the input beside the output.

OpenCV windows must be driven from the main thread (macOS insists), so `write()` only
keeps the newest frame, from any thread, and the main thread calls `pump()` to show it
and handle keys. q or Esc closes the window, which ends the run.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict

import av
import cv2
import numpy as np

from livestyle.errors import LivestyleError

TITLE = "livestyle"
KEEP_INPUTS = 64  # inputs waiting for their restyled frame (a few hundred ms of latency at 60 fps)


def display_problem() -> str | None:
    """Why no window can open here, or None when one can."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display (neither DISPLAY nor WAYLAND_DISPLAY is set)"
    gui = cv2.getBuildInformation().split("GUI:", 1)[-1].split("\n", 1)[0].strip()
    if gui.upper() in ("NONE", "NO"):
        return "this OpenCV has no GUI (opencv-python-headless); pip install opencv-python"
    return None


class WindowSink:
    """Shows frames at `size` = (w, h) in a window; with `side_by_side`, each input frame
    left of its output.

    Inputs are matched to outputs by pts, so the pair shown is always the same moment.
    """

    def __init__(self, size: tuple[int, int], side_by_side: bool = False):
        problem = display_problem()
        if problem:
            raise LivestyleError(f"window: cannot open a preview window: {problem}; "
                                 "write a file (-o out.mp4) or use -o vcam")
        self.size, self.side_by_side = size, side_by_side
        self._lock = threading.Lock()
        self._latest: np.ndarray | None = None
        self._inputs: OrderedDict[int, av.VideoFrame] = OrderedDict()
        self.frames = 0
        self._opened = False

    def remember_input(self, frame: av.VideoFrame) -> None:
        """Keep an input frame until its restyled frame arrives (side by side only)."""
        if self.side_by_side:
            with self._lock:
                self._inputs[frame.pts] = frame
                while len(self._inputs) > KEEP_INPUTS:
                    self._inputs.popitem(last=False)

    def write(self, frame: av.VideoFrame) -> None:
        """Keep the frame for the next pump(), from any thread (the writer's)."""
        w, h = self.size
        bgr = frame.to_ndarray(width=w, height=h, format="bgr24", interpolation="BICUBIC")
        with self._lock:
            source = self._inputs.pop(frame.pts, None) if self.side_by_side else None
        if source is not None:
            left = source.to_ndarray(width=w, height=h, format="bgr24")
            bgr = np.concatenate([left, bgr], axis=1)  # (h, 2w, 3): input | output
        with self._lock:
            self._latest = bgr
            self.frames += 1

    def pump(self) -> bool:
        """Show the newest frame and read keys (main thread); False once the user closed the window."""
        with self._lock:
            image, self._latest = self._latest, None
        if image is not None:
            if not self._opened:
                cv2.namedWindow(TITLE, cv2.WINDOW_NORMAL)
                cv2.resizeWindow(TITLE, image.shape[1], image.shape[0])
                self._opened = True
            cv2.imshow(TITLE, image)
        key = cv2.waitKey(1) & 0xFF
        if key in (ord("q"), 27):
            return False
        return not self._opened or cv2.getWindowProperty(TITLE, cv2.WND_PROP_VISIBLE) >= 1

    def close(self) -> None:
        if self._opened:
            cv2.destroyWindow(TITLE)
            cv2.waitKey(1)
            self._opened = False

    def __enter__(self) -> WindowSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
