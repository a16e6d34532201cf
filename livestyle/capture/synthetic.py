"""Synthetic video: a virtual camera moving smoothly over a still image, with exact motion.

Because every frame is the still image sampled through a known affine map, the true
optical flow between any two frames is known in closed form. That makes these clips
the ground truth for flicker measurement (warp error, see livestyle/metrics.py) and a
video source that needs no camera.

Coordinates. Pixel (x, y) has its centre at integer x (column) and y (row), y down,
in both the source image and the output frames (OpenCV's convention). The camera at
frame t is the affine map

    A_t(p) = c_t + s_t * R(theta_t) @ (p - o),        o = ((w - 1) / 2, (h - 1) / 2)

from an OUTPUT pixel p of a (w, h) frame to SOURCE image coordinates, with

    c_t     = center + t * pan                (source px; the point at the frame centre)
    s_t     = scale / zoom**t                 (source px per output px; zoom > 1 zooms in)
    theta_t = angle + t * rotation            (degrees; R is the usual 2x2 rotation
                                               applied to (x, y) with y down)
"""

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class CameraPath:
    """A smooth camera path over a still image of `image_size` = (W, H) pixels.

    Constant-rate pan, zoom and rotation: the path is smooth (affine in t for the
    centre and angle, geometric for the scale) and its motion is exact.

    image_size: (W, H) of the source image the path moves over.
    center: (x, y) source coords shown at the centre of frame 0.
    scale: source px per output px at frame 0 (> 1 shows more of the image).
    angle: camera rotation at frame 0, degrees.
    pan: (x, y) source px per frame the centre moves by.
    zoom: magnification per frame (1.004 zooms in by 0.4% per frame, 1 / 1.004 out).
    rotation: degrees per frame.
    """

    image_size: tuple[int, int]
    center: tuple[float, float]
    scale: float = 1.0
    angle: float = 0.0
    pan: tuple[float, float] = (0.0, 0.0)
    zoom: float = 1.0
    rotation: float = 0.0

    def __post_init__(self):
        if self.scale <= 0 or self.zoom <= 0:
            raise ValueError(f"scale and zoom must be positive, got scale={self.scale}, zoom={self.zoom}")

    def scale_at(self, t: float) -> float:
        """Source px per output px at frame t."""
        return self.scale / self.zoom**t

    def affine(self, t: float, size: tuple[int, int]) -> np.ndarray:
        """(2, 3) float64 matrix M with A_t(p) = M @ (x, y, 1): OUTPUT px of frame t -> SOURCE px.

        size: (w, h) of the output frames (the map turns about the frame centre).
        """
        w, h = size
        s = self.scale_at(t)
        th = np.deg2rad(self.angle + t * self.rotation)
        R = s * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        c = np.asarray(self.center, np.float64) + t * np.asarray(self.pan, np.float64)
        o = np.array([(w - 1) / 2, (h - 1) / 2])
        return np.concatenate([R, (c - R @ o)[:, None]], axis=1)

    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        image_size: tuple[int, int],
        size: tuple[int, int],
        frames: int,
        speed: tuple[float, float] = (0.5, 4.0),
    ) -> "CameraPath":
        """A random path whose view stays inside the image for all `frames` frames.

        Moderate, varied motion: pan of `speed` output px per frame (uniform range) in
        a random direction, zoom within +-0.5% per frame, rotation within +-0.3 degrees
        per frame, start angle within +-10 degrees, start scale 0.4 to 0.9 of the
        largest that fits. The pan is shortened where the image is too small for it.
        """
        W, H = image_size
        w, h = size
        T = max(frames - 1, 0)
        zoom = float(np.exp(rng.uniform(-0.005, 0.005)))
        rotation = float(rng.uniform(-0.3, 0.3))
        angle = float(rng.uniform(-10, 10))
        ts = np.arange(T + 1)
        # Bounding box of the rotated view at each frame, per unit scale.
        th = np.deg2rad(np.abs(angle + ts * rotation))
        box_x = np.abs(np.cos(th)) * (w - 1) / 2 + np.abs(np.sin(th)) * (h - 1) / 2
        box_y = np.abs(np.sin(th)) * (w - 1) / 2 + np.abs(np.cos(th)) * (h - 1) / 2
        # Largest start scale whose view fits the image at every frame (1 px margin).
        shrink = zoom ** (-ts.astype(np.float64))
        fit = min(((W - 3) / 2) / np.max(box_x * shrink), ((H - 3) / 2) / np.max(box_y * shrink))
        scale = float(rng.uniform(0.4, 0.9) * fit)
        half_x, half_y = scale * np.max(box_x * shrink) + 1, scale * np.max(box_y * shrink) + 1
        room = np.array([W - 1 - 2 * half_x, H - 1 - 2 * half_y])  # range the centre may cover

        direction = rng.uniform(0, 2 * np.pi)
        pan = rng.uniform(*speed) * scale * np.array([np.cos(direction), np.sin(direction)])
        if T > 0:
            # Shorten the pan, keeping its direction, so the whole travel fits in `room`.
            travel = np.abs(pan) * T
            pan = pan * min(1.0, float(np.min(np.where(travel > 0, room / np.maximum(travel, 1e-12), np.inf))))
        lo = np.array([half_x, half_y]) + np.maximum(-pan * T, 0)
        hi = np.array([half_x, half_y]) + room - np.maximum(pan * T, 0)
        center = rng.uniform(lo, np.maximum(hi, lo))
        return cls(
            image_size=(int(W), int(H)),
            center=(float(center[0]), float(center[1])),
            scale=scale,
            angle=angle,
            pan=(float(pan[0]), float(pan[1])),
            zoom=zoom,
            rotation=rotation,
        )


def render(image: np.ndarray, path: CameraPath, frames: int, size: tuple[int, int]) -> np.ndarray:
    """Frames of `path` over `image`: uint8 (T, h, w, 3) for `size` = (w, h).

    image: uint8 (H, W, 3), with (W, H) == path.image_size.
    Each frame samples the image bilinearly through path.affine(t), reflecting at the
    border. Where the path shows more than one source px per output px, the source is
    first downscaled once (INTER_AREA) to at most 1 source px per output px over the
    whole clip, so zoomed-out views do not alias; one downscale for the whole clip
    keeps the sharpness constant from frame to frame.
    """
    H, W = image.shape[:2]
    if image.ndim != 3 or image.dtype != np.uint8 or (W, H) != tuple(path.image_size):
        raise ValueError(
            f"image must be uint8 (H, W, 3) with (W, H) = {tuple(path.image_size)}, got {image.dtype} {image.shape}"
        )
    w, h = size
    s_max = max(path.scale_at(t) for t in range(frames))
    if s_max > 1:
        src = cv2.resize(image, (max(1, round(W / s_max)), max(1, round(H / s_max))), interpolation=cv2.INTER_AREA)
        # Pixel centres: u_small = (u + 0.5) * small / big - 0.5, per axis.
        kx, ky = src.shape[1] / W, src.shape[0] / H
        to_src = np.array([[kx, 0, 0.5 * kx - 0.5], [0, ky, 0.5 * ky - 0.5]])
    else:
        src, to_src = image, np.array([[1.0, 0, 0], [0, 1.0, 0]])
    out = np.empty((frames, h, w, 3), np.uint8)
    for t in range(frames):
        M = to_src[:, :2] @ path.affine(t, size)
        M[:, 2] += to_src[:, 2]
        out[t] = cv2.warpAffine(
            src, M, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT
        )
    return out


def _apply(M: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return M[0, 0] * x + M[0, 1] * y + M[0, 2], M[1, 0] * x + M[1, 1] * y + M[1, 2]


def flow_to_previous(path: CameraPath, t: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Exact backward flow from frame t + 1 to frame t, and where it is meaningful.

    For each pixel p of frame t + 1, q = A_t^-1(A_{t+1}(p)) is the position in frame t
    that shows the same scene (source) point; flow[p] = q - p, in output px, (x, y)
    order. So frame_t sampled at p + flow[p] reproduces frame_{t+1}[p] (metrics.warp).

    valid[p] is True where q lies inside frame t with a 1 px margin
    (1 <= q_x <= w - 2, 1 <= q_y <= h - 2) and A_{t+1}(p) lies inside the source image
    (0 <= x <= W - 1, 0 <= y <= H - 1): pixels rendered from the reflected border
    show no real scene point and are invalid.

    Returns flow float32 (h, w, 2) and valid bool (h, w), for `size` = (w, h).
    """
    w, h = size
    W, H = path.image_size
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    sx, sy = _apply(path.affine(t + 1, size), x, y)
    qx, qy = _apply(cv2.invertAffineTransform(path.affine(t, size)), sx, sy)
    flow = np.stack([qx - x, qy - y], axis=-1).astype(np.float32)
    valid = (qx >= 1) & (qx <= w - 2) & (qy >= 1) & (qy <= h - 2)
    valid &= (sx >= 0) & (sx <= W - 1) & (sy >= 0) & (sy <= H - 1)
    return flow, valid


def motion_clip(
    image: np.ndarray, path: CameraPath, frames: int, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A rendered clip with its exact flows.

    Returns frames uint8 (T, h, w, 3), flows float32 (T - 1, h, w, 2) and valid bool
    (T - 1, h, w), where flows[t], valid[t] = flow_to_previous(path, t, size) take
    frame t + 1 back to frame t.
    """
    clip = render(image, path, frames, size)
    pairs = [flow_to_previous(path, t, size) for t in range(frames - 1)]
    w, h = size
    flows = np.stack([f for f, _ in pairs]) if pairs else np.zeros((0, h, w, 2), np.float32)
    valid = np.stack([v for _, v in pairs]) if pairs else np.zeros((0, h, w), bool)
    return clip, flows, valid
