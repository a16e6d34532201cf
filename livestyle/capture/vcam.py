"""The virtual camera: restyled frames as a webcam that OBS, Zoom or Meet can pick.

Through pyvirtualcam (the `vcam` extra), which drives OBS Studio's virtual camera on
Windows and macOS and a v4l2loopback device on Linux. Where either is missing the
error says what to install, in one line.
"""

from __future__ import annotations

import logging
import sys
from fractions import Fraction

import av

from livestyle.errors import LivestyleError

log = logging.getLogger(__name__)

LINUX_SETUP = ("sudo apt install v4l2loopback-dkms && "
               "sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label=livestyle")
OBS_SETUP = "install OBS Studio 26 or newer (obsproject.com) and start its Virtual Camera once"


def backend_help() -> str:
    """What this platform needs for a virtual camera, as one clause."""
    if sys.platform.startswith("linux"):
        return f"the v4l2loopback kernel module ({LINUX_SETUP})"
    return f"OBS's virtual camera ({OBS_SETUP})"


def load_pyvirtualcam():
    """The pyvirtualcam module, or a LivestyleError naming what to install."""
    try:
        import pyvirtualcam
    except ImportError:
        raise LivestyleError('vcam: pyvirtualcam is not installed: pip install "livestyle[vcam]", '
                             f"plus {backend_help()}") from None
    return pyvirtualcam


class VirtualCameraSink:
    """Sends frames to a virtual camera of `size` = (w, h) at `rate` frames per second.

    device: a specific device (e.g. /dev/video10 on Linux); None takes the first free one.
    Frames of another size are scaled to the camera's (its size is fixed once opened).
    """

    def __init__(self, size: tuple[int, int], rate: Fraction | float | None, device: str | None = None):
        pyvirtualcam = load_pyvirtualcam()
        self.size = size
        try:
            self.camera = pyvirtualcam.Camera(width=size[0], height=size[1], fps=float(rate or 30),
                                              fmt=pyvirtualcam.PixelFormat.RGB, device=device)
        except (RuntimeError, ValueError) as e:  # pyvirtualcam's "no backend could be started"
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise LivestyleError(f"vcam: no virtual camera could be started ({reason}); "
                                 f"it needs {backend_help()}") from None
        log.info("virtual camera %s (%s backend), %dx%d", self.camera.device, self.camera.backend, *size)
        self.frames = 0

    @property
    def device(self) -> str:
        return self.camera.device

    def write(self, frame: av.VideoFrame) -> None:
        w, h = self.size
        self.camera.send(frame.to_ndarray(width=w, height=h, format="rgb24", interpolation="BICUBIC"))
        self.frames += 1

    def close(self) -> None:
        self.camera.close()

    def __enter__(self) -> VirtualCameraSink:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
