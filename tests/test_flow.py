"""Flow-guided propagation (DIS flow, forward-backward confidence, warping) and the similarity filter."""

import numpy as np
import torch

from livestyle.capture.sources import shipped_image
from livestyle.stream.flow import FlowEstimator, flow_size, propagate, sampling_grid, small_grey
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
