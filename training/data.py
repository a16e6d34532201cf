"""Training and evaluation images for the demo model, from files installed packages ship.

No downloads: the images are scikit-image's bundled samples (skimage/data/),
scikit-learn's two sample photos (sklearn/datasets/images/) and matplotlib's sample
portrait (mpl-data/sample_data/), read from their installed package folders. HELD_OUT
images are kept out of training and serve for evaluation (held_out_images, motion_clips).
"""

from pathlib import Path

import cv2
import numpy as np

from livestyle.capture.synthetic import CameraPath, motion_clip

# name -> (package, file). chessboard_RGB is left out: a 200 px 16-bit synthetic
# pattern adds nothing the others lack. The grey-only samples are left out too.
_FILES = {
    "astronaut": ("skimage", "astronaut.png"),
    "chelsea": ("skimage", "chelsea.png"),
    "coffee": ("skimage", "coffee.png"),
    "color": ("skimage", "color.png"),
    "hubble_deep_field": ("skimage", "hubble_deep_field.jpg"),
    "ihc": ("skimage", "ihc.png"),
    "logo": ("skimage", "logo.png"),
    "motorcycle_left": ("skimage", "motorcycle_left.png"),
    "motorcycle_right": ("skimage", "motorcycle_right.png"),
    "retina": ("skimage", "retina.jpg"),
    "rocket": ("skimage", "rocket.jpg"),
    "china": ("sklearn", "china.jpg"),
    "flower": ("sklearn", "flower.jpg"),
}
# More training images for the v3 demo model: a portrait (matplotlib's sample photo of
# Grace Hopper: v2 saw no face) and four grey photos with fine detail (brick, grass and
# gravel textures, the cameraman), read as grey RGB. Not in TRAIN, so that what was made
# from TRAIN (the v2 demo model, the TemporalNet fixture) is made the same way as before.
_MORE_FILES = {
    "grace_hopper": ("matplotlib", "grace_hopper.jpg"),
    "brick": ("skimage", "brick.png"),
    "grass": ("skimage", "grass.png"),
    "gravel": ("skimage", "gravel.png"),
    "camera": ("skimage", "camera.png"),
}
_FILES |= _MORE_FILES
HELD_OUT = ("chelsea", "coffee", "flower")
TRAIN = tuple(name for name in _FILES if name not in HELD_OUT and name not in _MORE_FILES)
MORE_TRAIN = tuple(_MORE_FILES)

# Crop side as a multiple of the output size, sampled log-uniformly: down to 0.7x
# (a mild upsample) so most crops stay sharp, up to 2x for wider views.
CROP_SCALE = (0.7, 2.0)


def _folder(package: str) -> Path:
    if package == "skimage":
        import skimage.data

        return Path(skimage.data.__file__).parent
    if package == "matplotlib":
        import matplotlib

        return Path(matplotlib.get_data_path()) / "sample_data"
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "images"


def load_image(name: str) -> np.ndarray:
    """One named image as uint8 (H, W, 3) RGB; transparent images are composited on white."""
    if name not in _FILES:
        raise KeyError(f"unknown image {name!r}; known: {', '.join(_FILES)}")
    path = _folder(_FILES[name][0]) / _FILES[name][1]
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise FileNotFoundError(f"cannot read {path}")
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=-1)
    if image.shape[2] == 4:
        alpha = image[..., 3:].astype(np.float32) / 255
        image = (image[..., :3] * alpha + 255 * (1 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(image[..., 2::-1])  # BGR -> RGB


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to (w, h): area averaging when shrinking (no aliasing), bilinear when growing."""
    shrink = size[0] < image.shape[1]
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mild colour jitter of a float (H, W, 3) image in [0, 1]: brightness, contrast,
    saturation (each a factor in 0.85..1.15) and a hue turn of up to +-15 degrees
    (a rotation of the chroma plane in YIQ)."""
    luma = np.array([0.299, 0.587, 0.114], np.float32)
    image = image * rng.uniform(0.85, 1.15)
    mean = float((image @ luma).mean())
    image = mean + (image - mean) * rng.uniform(0.85, 1.15)
    grey = (image @ luma)[..., None]
    image = grey + (image - grey) * rng.uniform(0.85, 1.15)
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
    th = np.deg2rad(rng.uniform(-15, 15))
    turn = np.array([[1, 0, 0], [0, np.cos(th), -np.sin(th)], [0, np.sin(th), np.cos(th)]], np.float32)
    M = np.linalg.inv(to_yiq) @ turn @ to_yiq  # RGB -> RGB
    return np.clip(image @ M.T.astype(np.float32), 0, 1)


def random_crops(images: list[np.ndarray], rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """n augmented square crops: float32 (n, 3, size, size) in [0, 1].

    images: uint8 (H, W, 3) arrays (e.g. [load_image(x) for x in TRAIN]), picked
    uniformly. Each crop has a side of size * CROP_SCALE (log-uniform, capped by the
    image), a uniform position, a horizontal flip half the time, and mild colour
    jitter; it is resized to `size` with INTER_AREA (or bilinear when growing).
    """
    out = np.empty((n, 3, size, size), np.float32)
    lo, hi = np.log(CROP_SCALE[0]), np.log(CROP_SCALE[1])
    for i in range(n):
        image = images[rng.integers(len(images))]
        H, W = image.shape[:2]
        side = min(int(round(size * np.exp(rng.uniform(lo, hi)))), H, W)
        y, x = rng.integers(0, H - side + 1), rng.integers(0, W - side + 1)
        crop = _resize(image[y : y + side, x : x + side], (size, size))
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = _jitter(crop.astype(np.float32) / 255, rng)
        out[i] = crop.transpose(2, 0, 1)  # (size, size, 3) -> (3, size, size)
    return out


def held_out_images(size: int) -> np.ndarray:
    """The HELD_OUT images, centre square crops resized to `size`: float32 (3, 3, size, size) in [0, 1]."""
    out = []
    for name in HELD_OUT:
        image = load_image(name)
        H, W = image.shape[:2]
        side = min(H, W)
        y, x = (H - side) // 2, (W - side) // 2
        square = _resize(image[y : y + side, x : x + side], (size, size))
        out.append(square.astype(np.float32).transpose(2, 0, 1) / 255)  # (3, size, size)
    return np.stack(out)


def camera_paths(
    names: tuple[str, ...], rng: np.random.Generator, n_clips: int, frames: int, size: tuple[int, int]
) -> list[tuple[str, CameraPath]]:
    """The (image name, CameraPath.random) of each of motion_clips' clips, from the same draws."""
    shapes = {name: load_image(name).shape for name in dict.fromkeys(names)}
    return [(name, CameraPath.random(rng, (shapes[name][1], shapes[name][0]), size, frames))
            for name in (names[i % len(names)] for i in range(n_clips))]


def motion_clips(
    names: tuple[str, ...], rng: np.random.Generator, n_clips: int, frames: int, size: tuple[int, int]
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """n_clips synthetic camera-motion clips with exact flow, cycling through `names`.

    Each is capture.synthetic.motion_clip over a CameraPath.random (camera_paths): frames
    uint8 (T, h, w, 3), flows float32 (T - 1, h, w, 2) from frame t + 1 back to frame t,
    valid bool (T - 1, h, w), for `size` = (w, h). Use HELD_OUT names for evaluation.
    """
    images = {name: load_image(name) for name in dict.fromkeys(names)}
    return [motion_clip(images[name], path, frames, size)
            for name, path in camera_paths(names, rng, n_clips, frames, size)]
