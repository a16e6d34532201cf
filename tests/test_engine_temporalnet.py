"""TemporalNet in the engine, on the synthetic motion clips (exact flow): the image each
frame's ControlNet sees is the previous output, warped along the motion to this frame when
the flow is on, and as it was when the flow is off; what a random TemporalNet does to the
warp error is benchmarks/temporalnet.py's figure (it does not lower it consistently:
see its docstring).

The model is the embedded demo model (trained, so its outputs are pictures whose motion
can be checked) with a random ControlNet made from its U-Net (benchmarks/temporalnet.py)."""

import numpy as np
import pytest

from benchmarks.temporalnet import clips, demo_unet, save_temporalnet, settings
from livestyle.metrics import warp
from livestyle.models.demo import load_demo
from livestyle.stream import control
from livestyle.stream.engine import Engine
from livestyle.stream.flow import FlowEstimator, flow_size, small_grey

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
