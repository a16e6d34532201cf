import numpy as np
import pytest
from skimage import data
from skimage.metrics import structural_similarity

from livestyle.capture.synthetic import CameraPath, motion_clip
from livestyle.metrics import psnr, ssim, warp, warp_error


def _skimage_ssim(a, b):
    return structural_similarity(
        a, b, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )


@pytest.mark.parametrize("shape", [(11, 11, 3), (37, 52, 3), (64, 48, 1)])
def test_ssim_matches_skimage_on_random_images(shape):
    rng = np.random.default_rng(0)
    a = rng.random(shape)
    b = np.clip(a + 0.2 * rng.standard_normal(shape), 0, 1)
    ours = ssim(a, b)
    assert abs(ours - _skimage_ssim(a, b)) < 1e-4
    assert ours < 0.9


@pytest.mark.parametrize("name", ["astronaut", "coffee"])
def test_ssim_matches_skimage_on_natural_images(name):
    rng = np.random.default_rng(1)
    a = getattr(data, name)()[:200, :256].astype(np.float32) / 255
    blurred = (a + np.roll(a, 1, axis=0) + np.roll(a, 1, axis=1)) / 3
    for b in (np.clip(a + 0.05 * rng.standard_normal(a.shape), 0, 1).astype(np.float32), blurred):
        assert abs(ssim(a, b) - _skimage_ssim(a, b)) < 1e-4
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-9)


def test_ssim_rejects_small_or_mismatched():
    with pytest.raises(ValueError):
        ssim(np.zeros((10, 20, 3)), np.zeros((10, 20, 3)))
    with pytest.raises(ValueError):
        ssim(np.zeros((20, 20, 3)), np.zeros((20, 21, 3)))


def test_psnr_known_values():
    a = np.zeros((8, 8, 3))
    assert psnr(a, a + 0.1) == pytest.approx(20.0)  # mse 0.01
    assert psnr(a, a + 0.01) == pytest.approx(40.0)
    b = a.copy()
    b[..., 0] = 1.0  # mse 1/3
    assert psnr(a, b) == pytest.approx(10 * np.log10(3))
    assert psnr(a, a) == float("inf")


def test_warp_samples_along_flow():
    rng = np.random.default_rng(0)
    frame = rng.random((20, 30, 5)).astype(np.float32)
    flow = np.zeros((20, 30, 2), np.float32)
    flow[..., 0] = 2.0  # output[y, x] = frame[y, x + 2]
    flow[..., 1] = -1.0  # ... and from the row above
    out = warp(frame, flow)
    assert out.shape == frame.shape and out.dtype == np.float32
    np.testing.assert_allclose(out[1:, :-2], frame[:-1, 2:], atol=1e-6)
    flow[..., :] = 0.5  # halfway: bilinear average of four neighbours
    out = warp(frame, flow)
    quad = (frame[:-1, :-1] + frame[1:, :-1] + frame[:-1, 1:] + frame[1:, 1:]) / 4
    np.testing.assert_allclose(out[:-1, :-1], quad, atol=1e-5)


def _float_clip(seed):
    path = CameraPath.random(np.random.default_rng(seed), (512, 512), (64, 48), frames=6)
    frames, flows, valid = motion_clip(data.astronaut(), path, 6, (64, 48))
    return frames.astype(np.float32) / 255, flows, valid


def test_warp_error_zero_when_frames_follow_the_flow():
    rng = np.random.default_rng(0)
    first = rng.random((48, 64, 3)).astype(np.float32)
    flows = np.zeros((3, 48, 64, 2), np.float32)
    flows[..., 0] = 1.0  # frame t+1 at x shows frame t at x + 1: a 1 px pan
    frames = np.stack([np.roll(first, -t, axis=1) for t in range(4)])
    valid = np.ones((3, 48, 64), bool)
    valid[:, :, -1] = False  # the wrapped-around column
    assert warp_error(frames, flows, valid) < 1e-10
    assert warp_error(frames, np.zeros_like(flows), valid) > 0.05


def test_warp_error_grows_with_flicker():
    frames, flows, valid = _float_clip(3)
    steady = warp_error(frames, flows, valid)
    noise = np.random.default_rng(0).normal(0, 0.05, frames.shape).astype(np.float32)
    flicker = warp_error(np.clip(frames + noise, 0, 1), flows, valid)
    assert steady < 1e-3
    assert flicker > 3 * steady and flicker > 0.003  # ~2 * 0.05^2 from two noisy frames
    with pytest.raises(ValueError):
        warp_error(frames, flows, np.zeros_like(valid))
