"""ControlNet conditioning images on real photographs (skimage.data): canny and soft edges
against OpenCV, TemporalNet's previous frame (warped), the depth hook."""

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from livestyle.models.control_inputs import (
    canny, depth_estimators, depth_image, register_depth_estimator, soft_edges, temporalnet_image,
    unregister_depth_estimator,
)


def frames(*images, size=(160, 192)):
    """skimage images -> (B, 3, H, W) float in [0, 1], resized to size = (H, W)."""
    out = []
    for image in images:
        image = np.stack([image] * 3, axis=-1) if image.ndim == 2 else image
        out.append(cv2.resize(image, size[::-1], interpolation=cv2.INTER_AREA))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def photos():
    return frames(data.astronaut(), data.coffee(), data.camera())


def test_canny_is_opencvs_on_each_frame(photos):
    edges = canny(photos, 80, 160)
    assert edges.shape == photos.shape and edges.dtype == photos.dtype
    assert set(edges.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(edges[:, 0], edges[:, 2])
    for image, got in zip(photos, edges):
        rgb = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        expected = cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), 80, 160) / 255
        assert np.array_equal(got[0].numpy(), expected)
        assert 0.01 < got[0].mean() < 0.3  # a photograph has some edges, not everywhere
    assert canny(photos, 30, 60).mean() > edges.mean()  # lower thresholds keep more edges
    with pytest.raises(ValueError, match="low <= high"):
        canny(photos, 200, 100)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        canny(photos[:, :1])


def opencv_soft_edges(image: torch.Tensor, sigma: float) -> np.ndarray:
    rgb = image.permute(1, 2, 0).numpy().astype(np.float32)
    luma = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    ksize = 2 * int(np.ceil(3 * sigma)) + 1
    blurred = cv2.GaussianBlur(luma.astype(np.float64), (ksize, ksize), sigma)
    gx = cv2.Sobel(blurred, cv2.CV_64F, 1, 0, ksize=3)
    gy = cv2.Sobel(blurred, cv2.CV_64F, 0, 1, ksize=3)
    magnitude = np.sqrt(gx ** 2 + gy ** 2)
    return magnitude / magnitude.max()


@pytest.mark.parametrize("sigma", [1.0, 2.5])
def test_soft_edges_match_opencv(photos, sigma):
    got = soft_edges(photos, sigma)
    assert got.shape == photos.shape and got.min() >= 0
    assert torch.allclose(got.amax(dim=(1, 2, 3)), torch.ones(3))
    for image, edges in zip(photos, got):
        assert np.abs(edges[0].numpy() - opencv_soft_edges(image, sigma)).max() <= 1e-4


def test_soft_edges_lie_on_the_edges(photos):
    """Graded, and strongest where Canny finds edges."""
    soft, hard = soft_edges(photos), canny(photos) > 0.5
    for s, h in zip(soft[:, 0], hard[:, 0]):
        # A map unrelated to the edges gives a ratio of 1; these photographs give 2.3 to 5.
        assert s[h].mean() > 2 * s[~h].mean()
        assert ((s > 0.05) & (s < 0.95)).float().mean() > 0.05  # soft: many in-between values
    flat = soft_edges(torch.full((1, 3, 32, 48), 0.4))
    assert flat.abs().max() <= 1e-4
    with pytest.raises(ValueError, match="sigma"):
        soft_edges(photos, 0)


def test_temporalnet_image(photos):
    current, previous = photos[:2], photos[1:]
    assert temporalnet_image(None, current) is current  # no past yet: the input stands in
    assert temporalnet_image(previous, current) is previous
    # A grid that says "each pixel was 4 pixels to the left": the previous frame moves right.
    B, _, H, W = current.shape
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    grid = torch.stack([(xs - 4) * 2 / (W - 1) - 1, ys * 2 / (H - 1) - 1], dim=-1)[None]
    warped = temporalnet_image(previous, current, grid)
    assert torch.allclose(warped[..., 4:], previous[..., :-4], atol=1e-5)
    assert torch.allclose(warped[..., :4], previous[..., :1].expand(-1, -1, -1, 4), atol=1e-5)  # border
    with pytest.raises(ValueError, match="differ in size"):
        temporalnet_image(previous[..., :-8], current)


def test_depth_hook(photos):
    assert "rows" not in depth_estimators()
    with pytest.raises(ValueError, match=r"no depth estimator named 'rows' \(registered: "):
        depth_image(photos, "rows")

    def rows(x):  # nearer towards the bottom, at half resolution, in arbitrary units
        B, _, H, W = x.shape
        return torch.linspace(3.0, 50.0, H // 2).view(1, -1, 1).expand(B, -1, W // 2)

    register_depth_estimator("rows", rows)
    try:
        assert "rows" in depth_estimators()
        depth = depth_image(photos, "rows")
        assert depth.shape == photos.shape and depth.min() == 0 and depth.max() == 1
        assert (depth[:, :, 1:].mean(dim=(0, 1, 3)) >= depth[:, :, :-1].mean(dim=(0, 1, 3))).all()
        with pytest.raises(ValueError, match="already registered"):
            register_depth_estimator("rows", rows)
        register_depth_estimator("rows", lambda x: x.mean(1), replace=True)
        assert depth_image(photos, "rows").shape == photos.shape
        register_depth_estimator("rows", lambda x: x[:, :2], replace=True)
        with pytest.raises(ValueError, match=r"'rows' returned \(3, 2, 160, 192\)"):
            depth_image(photos, "rows")
    finally:
        unregister_depth_estimator("rows")
    with pytest.raises(ValueError, match="must be callable"):
        register_depth_estimator("midas", "not a function")
