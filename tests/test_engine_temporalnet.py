"""TemporalNet in the engine, on the synthetic motion clips (exact flow): the image each
frame's ControlNet sees is the previous output, warped along the motion to this frame when
the flow is on, and as it was when the flow is off; what a random TemporalNet does to the
warp error is benchmarks/temporalnet.py's figure (it does not lower it consistently:
see its docstring); a trained one (training/train_temporalnet.py) lowers it on held-out
clips without flattening the picture.

The model is the embedded demo model (trained, so its outputs are pictures whose motion
can be checked) with a random ControlNet made from its U-Net (benchmarks/temporalnet.py),
or the trained TemporalNet of TRAINED."""

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.temporalnet import clips, demo_unet, measure, save_temporalnet, settings
from livestyle.metrics import warp
from livestyle.models.demo import load_demo
from livestyle.stream import control
from livestyle.stream.engine import Engine
from livestyle.stream.flow import FlowEstimator, flow_size, small_grey
from training.train_temporalnet import (
    COPY_LEVELS, controlnet_from_unet, frozen_output, load_trained, save_controlnet, save_trained, trained_parts,
    train_temporalnet,
)

SIZE = 96


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    return save_temporalnet(demo_unet(), tmp_path_factory.mktemp("temporalnet") / "net")


@pytest.fixture(scope="module")
def engine():
    with Engine(load_demo) as engine:
        yield engine


@pytest.fixture(scope="module")
def clip():
    return clips(SIZE, 1, 5)[0]  # frames uint8 (5, H, W, 3), flows (4, H, W, 2), valid (4, H, W)


def seen(engine, net, frames, flow: bool, monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    """The outputs (T, H, W, 3) and the TemporalNet image of each frame (T, H, W, 3), in [0, 1]."""
    images, outputs = [], []
    made = control.images

    def recorded(controls, frame, edges, previous):
        out = made(controls, frame, edges, previous)
        images.append(out[0][0].permute(1, 2, 0).float().cpu().numpy())
        return out

    monkeypatch.setattr(control, "images", recorded)
    stream = engine.open_stream(settings(SIZE, net, 1.0, flow, demo=True), lambda f: outputs.append(
        f.to_ndarray(format="rgb24")), live=False)
    for rgb in frames:
        stream.submit(rgb)
    assert stream.flush(timeout=120)
    stream.close()
    monkeypatch.undo()
    return np.stack(outputs).astype(np.float32) / 255, np.stack(images)


def test_flow_off_temporalnet_sees_the_previous_output_and_first_the_frame_itself(engine, net, clip, monkeypatch):
    frames, _, _ = clip
    outputs, images = seen(engine, net, frames, False, monkeypatch)
    assert len(images) == len(frames)
    assert np.abs(images[0] - frames[0] / 255).max() <= 1 / 255 + 1e-6  # no output yet: the frame
    assert np.abs(images[1:] - outputs[:-1]).max() <= 0.5 / 255 + 1e-6  # the output, before its uint8 rounding


def test_flow_on_temporalnet_sees_the_previous_output_moved_with_the_picture(engine, net, clip, monkeypatch):
    """Against the previous output carried along the clip's exact flow, where the engine trusts
    its own flow estimate (from the input frames; elsewhere it falls back to the frame itself,
    control.py): the engine's image is closer to it than the unmoved previous output is."""
    frames, flows, valid = clip
    outputs, images = seen(engine, net, frames, True, monkeypatch)
    size = flow_size(SIZE, SIZE)
    assert size == (SIZE, SIZE)  # the flow at the processing size: its confidence needs no resizing here
    for t in range(1, len(frames)):
        trusted = FlowEstimator().motion(small_grey(frames[t - 1], size), small_grey(frames[t], size)).confidence > 0.9
        mask = valid[t - 1] & trusted
        assert mask.mean() > 0.25  # enough pixels to judge by
        moved = warp(outputs[t - 1], flows[t - 1])  # output t - 1 where frame t's pixels came from
        engine_error = np.abs(images[t] - moved)[mask].mean()
        unmoved_error = np.abs(outputs[t - 1] - moved)[mask].mean()
        assert engine_error < 0.5 * unmoved_error, (t, engine_error, unmoved_error)


def test_the_flow_changes_what_temporalnet_sees_only_after_the_first_frame(engine, net, clip, monkeypatch):
    frames, _, _ = clip
    _, still = seen(engine, net, frames, False, monkeypatch)
    _, moved = seen(engine, net, frames, True, monkeypatch)
    assert np.abs(still[0] - moved[0]).max() == 0
    assert all(np.abs(still[t] - moved[t]).mean() > 1 / 255 for t in range(1, len(frames)))


# The trained TemporalNet's parts that are not the demo U-Net's (training/train_temporalnet.py's
# save_trained: fp16, 454 kB), written on the shared 2-core CPU in 3.3-9.2 min (by load), bit for bit, by
#   python training/train_temporalnet.py --out /tmp/temporalnet \
#       --trained-only tests/test_engine_temporalnet_trained.safetensors
# (seed 0, the script's defaults: 800 steps at 64x64); training it here would take minutes.
TRAINED = Path(__file__).with_name("test_engine_temporalnet_trained.safetensors")
TRAINED_SIZE = 64  # the size it was trained at
# Measured (benchmarks/temporalnet.py --controlnet, its first 3 clips, scale 2, flow on): warp error
# on / off 0.980-0.992 (median 0.986), per contrast squared 0.984-0.997 (median 0.995), contrast
# on / off 0.991-1.000. A small but steady lowering; the margins leave room for other CPUs' rounding.
SCALE = 2.0
MARGIN = 0.995  # median warp error on / off at most this
CONTRAST = 0.01  # contrast on / off within 1% of 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The trained TemporalNet as a ControlNet folder the engine loads."""
    return save_controlnet(tmp_path_factory.mktemp("trained") / "net", load_trained(load_demo().unet, TRAINED))


def test_a_controlnet_made_from_the_unet_changes_nothing_before_training():
    """Zero convolutions at zero (diffusers' ControlNetModel.from_unet): residuals all zero, the output the model's own."""
    pipeline = load_demo()
    net = controlnet_from_unet(pipeline.unet)
    g = torch.Generator().manual_seed(0)
    z, image, style = torch.randn(2, 16, 8, 8, generator=g), torch.rand(2, 3, 64, 64, generator=g), torch.tensor([0, 3])
    with torch.no_grad():
        down, mid = net(z, torch.zeros(2), pipeline.styles.embeddings[style], image)
        assert all(d.abs().max() == 0 for d in down) and mid.abs().max() == 0
        residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        assert torch.equal(frozen_output(pipeline, z, image, style, residuals), frozen_output(pipeline, z, image, style))


def test_training_is_seeded_and_moves_only_its_parts(tmp_path):
    """Two steps twice with one seed: the same weights; the frozen model and the U-Net copy's
    locked levels as they were, the trained parts moved; they round-trip through
    save_trained / load_trained (fp16)."""
    pipeline = load_demo()
    before = {k: v.clone() for k, v in pipeline.unet.state_dict().items()}
    nets = [train_temporalnet(pipeline, 2, 32, seed=0, batch=2, clips=2, frames=2, every=10) for _ in range(2)]
    a, b = (n.state_dict() for n in nets)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(v, before[k]) for k, v in pipeline.unet.state_dict().items())
    parts = trained_parts(nets[0], COPY_LEVELS)
    assert all(torch.equal(v, before[k]) for k, v in a.items() if k in before and not k.startswith(parts))
    assert all(not torch.equal(v, before[k]) for k, v in a.items() if k in before and k.startswith(parts)
               and k.endswith("conv1.weight"))
    assert nets[0].controlnet_mid_block.weight.abs().max() > 0  # it moved off zero
    back = load_trained(pipeline.unet, save_trained(tmp_path / "trained.safetensors", nets[0])).state_dict()
    assert all(torch.allclose(back[k], v, rtol=1e-3, atol=1e-4) for k, v in a.items())


def test_a_trained_temporalnet_lowers_warp_error_on_held_out_clips_without_flattening(engine, trained):
    """Through the engine, flow on, per frame, on clips over the held-out images (never trained
    on): the warp error lower than with TemporalNet off on every clip, to at most MARGIN of it
    at the median, and lower at the median per contrast squared too (a flatter picture alone
    lowers an MSE); the contrast (output pixel std) within CONTRAST of off's."""
    figures = measure(engine, trained, clips(TRAINED_SIZE, 3, 10), TRAINED_SIZE, SCALE, flow=True, demo=True)
    ratios = [f.ratio for f in figures]
    assert max(ratios) < 1 and float(np.median(ratios)) < MARGIN, ratios
    assert float(np.median([f.ratio_per_contrast for f in figures])) < 1, [f.ratio_per_contrast for f in figures]
    assert all(abs(f.contrast_on / f.contrast_off - 1) < CONTRAST for f in figures), figures
