"""Image quality and flicker metrics, numpy + OpenCV.

Images are float arrays in [0, 1], (H, W, C) (C = 3 for the colour metrics); clips
are (T, H, W, 3). Flows are (H, W, 2) float, (x, y) order, in pixels, backward:
flow[p] points from pixel p of a frame to where the same point is in the frame
before (the convention of livestyle.capture.synthetic.flow_to_previous).
"""

import cv2
import numpy as np


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB for images in [0, 1] (data range 1); inf if equal."""
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {a.shape} and {b.shape}")
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def _gaussian_filter(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    # BORDER_REFLECT (abc|cba) is scipy.ndimage's mode="reflect", which skimage uses.
    return cv2.sepFilter2D(x, cv2.CV_64F, kernel, kernel, borderType=cv2.BORDER_REFLECT)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of two (H, W, C) images in [0, 1], averaged over channels.

    Wang et al. 2004, "Image quality assessment: from error visibility to structural
    similarity": Gaussian window sigma 1.5 truncated at 3.5 sigma (11 taps), K1 0.01,
    K2 0.03, population covariances, the 5 px border of the SSIM map left out of the
    mean. Matches skimage.metrics.structural_similarity(a, b, channel_axis=-1,
    data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False).
    Both sides must be at least 11 px.
    """
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"ssim needs two (H, W, C) images of equal shape, got {a.shape} and {b.shape}")
    sigma, radius = 1.5, int(3.5 * 1.5 + 0.5)
    if min(a.shape[:2]) < 2 * radius + 1:
        raise ValueError(f"ssim needs images of at least {2 * radius + 1} px a side, got {a.shape[:2]}")
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    C1, C2 = 0.01**2, 0.03**2  # (K * data_range)^2 with data_range 1

    scores = []
    for c in range(a.shape[2]):
        x = np.ascontiguousarray(a[..., c], dtype=np.float64)
        y = np.ascontiguousarray(b[..., c], dtype=np.float64)
        ux, uy = _gaussian_filter(x, kernel), _gaussian_filter(y, kernel)
        vx = _gaussian_filter(x * x, kernel) - ux * ux
        vy = _gaussian_filter(y * y, kernel) - uy * uy
        vxy = _gaussian_filter(x * y, kernel) - ux * uy
        S = (2 * ux * uy + C1) * (2 * vxy + C2) / ((ux**2 + uy**2 + C1) * (vx + vy + C2))
        scores.append(S[radius:-radius, radius:-radius].mean())
    return float(np.mean(scores))


def sharpness(image: np.ndarray) -> float:
    """Variance of the Laplacian of an (H, W, 3) image in [0, 1], on its 8-bit-scale luma.

    The usual focus measure (Pech-Pacheco et al. 2000): edges and strokes raise it,
    blur lowers it. Only ratios between images of the same scene are meaningful.
    """
    luma = np.asarray(image, np.float64) @ np.array([0.299, 0.587, 0.114]) * 255
    return float(cv2.Laplacian(luma, cv2.CV_64F).var())


def warp(frame: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Backward warp: output[p] = frame[p + flow[p]], bilinear (cv2.remap).

    frame: float (H, W, C); flow: (H, W, 2) in px, (x, y) order. Samples outside the
    frame take the nearest edge pixel (mask them out with a validity map).
    Returns (H, W, C) in frame's dtype (float32 or float64).
    """
    H, W = frame.shape[:2]
    if flow.shape != (H, W, 2):
        raise ValueError(f"flow must be ({H}, {W}, 2) for a {frame.shape} frame, got {flow.shape}")
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    map_x = x + flow[..., 0].astype(np.float32)
    map_y = y + flow[..., 1].astype(np.float32)
    # remap takes at most 4 channels at a time.
    chunks = [
        cv2.remap(np.ascontiguousarray(frame[..., i : i + 4]), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        for i in range(0, frame.shape[2], 4)
    ]
    chunks = [c[..., None] if c.ndim == 2 else c for c in chunks]  # remap drops a lone channel axis
    return np.concatenate(chunks, axis=-1)


def warp_error(frames: np.ndarray, flows: np.ndarray, valid: np.ndarray) -> float:
    """Temporal-consistency warp error: masked MSE between each frame and its warped predecessor.

    frames: (T, H, W, 3) float in [0, 1]; flows: (T - 1, H, W, 2), flows[t] taking frame
    t + 1 back to frame t (see the module docstring); valid: (T - 1, H, W) bool, the
    pixels of frame t + 1 whose flow is meaningful (in view in both frames, not
    occluded).

    For each pair, the squared difference between frames[t + 1] and
    warp(frames[t], flows[t]), averaged over the colour channels and the valid pixels;
    the result is the mean over pairs with any valid pixel. Units: MSE on [0, 1]
    images (0 for a clip that follows its flow exactly; multiply by 255^2 for 8-bit
    units). Lower is less flicker.
    """
    T = frames.shape[0]
    if flows.shape[:1] != (T - 1,) or valid.shape != flows.shape[:3] or frames.shape[1:3] != flows.shape[1:3]:
        raise ValueError(
            f"need frames (T, H, W, 3), flows (T-1, H, W, 2), valid (T-1, H, W); "
            f"got {frames.shape}, {flows.shape}, {valid.shape}"
        )
    errors = []
    for t in range(T - 1):
        if not valid[t].any():
            continue
        prev = warp(np.asarray(frames[t], np.float32), flows[t])
        sq = ((np.asarray(frames[t + 1], np.float32) - prev) ** 2).mean(axis=-1)
        errors.append(float(sq[valid[t]].mean()))
    if not errors:
        raise ValueError("warp_error: no valid pixels in any frame pair")
    return float(np.mean(errors))
