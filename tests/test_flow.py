"""Flow-guided propagation (DIS flow, forward-backward confidence, warping) and the similarity filter."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from livestyle.capture.sources import SyntheticSource, shipped_image
from livestyle.frame import rgb_array
from livestyle.stream.flow import (FB_TOLERANCE, PHOTO_TOLERANCE, FlowEstimator, flow_size, propagate, sampling_grid,
                                   small_grey)
from livestyle.stream.similarity import SimilarityFilter


def greys(shift: int):
    image = shipped_image("astronaut")
    base = small_grey(image, (160, 160))
    # the current frame shows the scene moved right by `shift` pixels
    return base[:, 20:140], base[:, 20 - shift:140 - shift]


def test_motion_of_a_pan_and_its_confidence():
    previous, current = greys(3)
    motion = FlowEstimator().motion(previous, current)
    inner = (slice(20, -20), slice(20, -20))
    # pixel p of the current frame was at p - 3 in the previous one
    assert abs(float(np.median(motion.back[inner][..., 0])) + 3) < 0.3
    assert abs(float(np.median(motion.back[inner][..., 1]))) < 0.3
    assert motion.confidence[inner].mean() > 0.6
    assert motion.confidence[:, :2].mean() < 0.2  # the strip that entered on the left has no past


def test_a_scene_cut_is_not_trusted():
    previous = small_grey(shipped_image("astronaut"), (96, 96))
    current = small_grey(shipped_image("coffee"), (96, 96))
    assert FlowEstimator().motion(previous, current).confidence.mean() < 0.25


def test_propagate_warps_along_the_motion():
    previous, current = greys(4)
    motion = FlowEstimator().motion(previous, current)
    prev = torch.from_numpy(previous).float()[None, None] / 255
    cur = torch.from_numpy(current).float()[None, None] / 255
    grid, confidence = sampling_grid(motion, (120, 160), "cpu")
    warped = propagate(cur, prev, grid, torch.ones_like(confidence), blend=0.999)  # ~ the warp alone
    inner = (..., slice(20, -20), slice(20, -20))
    assert (warped - cur)[inner].abs().mean() < 0.5 * (prev - cur)[inner].abs().mean()
    assert torch.equal(propagate(cur, prev, grid, confidence, blend=0.0), cur)
    # resampled to a latent grid: flows scale with the size
    small_grid, small_conf = sampling_grid(motion, (15, 20), "cpu")
    assert small_grid.shape == (1, 20, 15, 2) and small_conf.shape == (1, 1, 20, 15)


def test_flow_size_keeps_aspect_and_caps_the_short_side():
    assert flow_size(512, 288) == (228, 128)
    assert flow_size(64, 48) == (64, 48)


def test_similarity_filter():
    still = small_grey(shipped_image("coffee"), (32, 32))
    other = small_grey(shipped_image("astronaut"), (32, 32))
    f = SimilarityFilter(0.9, seed=0, max_skips=3)
    decisions = [f.skip(still) for _ in range(9)]
    assert decisions == [False, True, True, True, False, True, True, True, False]  # never more than 3 in a row
    assert f.skip(other) is False  # a different picture always runs
    f.reset()
    assert f.skip(other) is False


# -- The host path against its plain definitions: numpy grids, torch's grid_sample ---------

def plain_motion(estimator, previous, current):
    """FlowEstimator.motion as first written: separate x and y maps from np.mgrid per call."""
    back = estimator.dis.calc(current, previous, None)
    forward = estimator.dis.calc(previous, current, None)
    h, w = current.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    map_x, map_y = xs + back[..., 0], ys + back[..., 1]
    forward_there = cv2.remap(forward, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    disagreement = np.linalg.norm(back + forward_there, axis=-1)
    previous_there = cv2.remap(previous, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    photo = np.abs(previous_there.astype(np.float32) - current.astype(np.float32))
    in_view = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
    confidence = np.exp(-(disagreement / FB_TOLERANCE) ** 2 - (photo / PHOTO_TOLERANCE) ** 2) * in_view
    return back, confidence.astype(np.float32)


def plain_sampling_grid(motion, size):
    """sampling_grid as first written: numpy arithmetic on separate x and y planes."""
    w, h = size
    fh, fw = motion.confidence.shape
    back = cv2.resize(motion.back, (w, h), interpolation=cv2.INTER_AREA if w < fw else cv2.INTER_LINEAR)
    back = back * np.array([w / fw, h / fh], dtype=np.float32)
    confidence = cv2.resize(motion.confidence, (w, h), interpolation=cv2.INTER_AREA if w < fw else cv2.INTER_LINEAR)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    grid = np.stack([(xs + back[..., 0]) * (2 / max(w - 1, 1)) - 1,
                     (ys + back[..., 1]) * (2 / max(h - 1, 1)) - 1], axis=-1)
    return torch.from_numpy(grid)[None], torch.from_numpy(np.ascontiguousarray(confidence))[None, None]


def plain_propagate(current, previous, grid, confidence, blend, mode="bilinear"):
    """propagate's definition: torch's grid_sample and the blend, in float32."""
    warped = F.grid_sample(previous.float(), grid.float(), mode=mode, padding_mode="border", align_corners=True)
    weight = blend * confidence.float()
    return (current.float() + weight * (warped - current.float())).to(current.dtype)


@pytest.fixture(scope="module")
def coffee_motions():
    """Motions between frames 0 -> 1 and 0 -> 3 of a moving 512x512 clip, on its 128x128 grey copies."""
    frames = [rgb_array(f) for f in SyntheticSource("coffee", (512, 512), 24, 4)]
    greys = [small_grey(f, flow_size(512, 512)) for f in frames]
    estimator = FlowEstimator()
    return greys, [estimator.motion(greys[0], greys[i]) for i in (1, 3)]


def test_motion_equals_its_plain_definition(coffee_motions):
    greys, motions = coffee_motions
    estimator = FlowEstimator()
    for i, motion in zip((1, 3), motions):
        back, confidence = plain_motion(estimator, greys[0], greys[i])
        assert np.array_equal(motion.back, back) and np.array_equal(motion.confidence, confidence)
    assert motions[1].confidence.mean() > 0.3  # a real motion: most of the frame trusted


@pytest.mark.parametrize("size", [(512, 512), (128, 128), (64, 64), (100, 60), (200, 512)])
def test_sampling_grid_is_the_plain_numpy_grid_bit_for_bit(coffee_motions, size):
    """Larger, equal, smaller (a latent) and other aspect ratios than the 128x128 flow."""
    for motion in coffee_motions[1]:
        grid, confidence = sampling_grid(motion, size, "cpu")
        plain_grid, plain_confidence = plain_sampling_grid(motion, size)
        assert torch.equal(grid, plain_grid) and torch.equal(confidence, plain_confidence)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("channels, size", [(3, (512, 512)), (16, (64, 64)), (4, (37, 21))])
def test_host_propagate_equals_grid_sample(coffee_motions, channels, size, mode):
    """The CPU path (cv2.remap, numpy blend) against grid_sample, values in [-1, 1]: within
    1e-4 (the pixel positions round differently in the last bit; OpenCV 4.11 and later
    weigh bilinearly in float; its bicubic is torch's). An image, a latent, an odd size."""
    w, h = size
    torch.manual_seed(0)
    current, previous = torch.rand(2, 1, channels, h, w) * 2 - 1
    for motion in coffee_motions[1]:
        grid, confidence = sampling_grid(motion, size, "cpu")
        with torch.inference_mode():  # as the engine calls it
            got = propagate(current, previous, grid, confidence, 0.5, mode)
        want = plain_propagate(current, previous, grid, confidence, 0.5, mode)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert (got - want).abs().max() < 1e-4
        assert (got - current).abs().mean() > 0.05  # the warp did move things
        assert torch.equal(propagate(current, previous, grid, confidence, 0.0, mode), current)
    bf16 = propagate(current.bfloat16(), previous.bfloat16(), grid, confidence, 0.5, mode)
    want = plain_propagate(current.bfloat16(), previous.bfloat16(), grid, confidence, 0.5, mode)
    assert bf16.dtype == torch.bfloat16 and (bf16.float() - want.float()).abs().max() <= 2 ** -7  # one bf16 step at 1
