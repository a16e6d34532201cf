"""torch.compile of the fixed-shape step on the CPU, with a tiny random SD pipeline (the
full-size U-Net takes minutes to compile): compiled once per variant at warm-up, then never
again over 20 frames, through a live strength change and a second stream joining the bucket;
with two ControlNets, through live changes of their scales and start/end.

The backend is "eager": Dynamo traces and guards the step exactly as for "inductor" (the
CLI's --compile) and runs the captured graph as it is, so the test stays short. A recompile
is a guard that failed, whatever the backend: it shows up as one more call of the backend
(Engine.stats()["compiles"])."""

import sys
import time
from pathlib import Path

import numpy as np
import pytest

from livestyle.capture.sources import SyntheticSource
from livestyle.config import Control, StreamSettings, TemporalSettings
from livestyle.errors import LivestyleError
from livestyle.stream.engine import Engine

sys.path.insert(0, str(Path(__file__).parent))
from tiny_pipelines import tiny_sd_pipeline  # noqa: E402

SIZE = (64, 48)


def feed(engine, temporal, frames=20):
    """Stream a for 20 frames; strength changes at frame 8, stream b joins at frame 12.
    Returns the compile count after warm-up and at the end, and the outputs."""
    clip = list(SyntheticSource("coffee", SIZE, 24, frames))
    outputs = {"a": [], "b": []}
    settings = StreamSettings(size=SIZE, prompt="a fox", steps=2, temporal=temporal)
    a = engine.open_stream(settings, outputs["a"].append, live=False)
    b = None
    warm = None
    for i, frame in enumerate(clip):
        if i == 8:
            a.update(strength=0.6)
        if i == 12:
            b = engine.open_stream(settings.replace(prompt="a cat"), outputs["b"].append, live=False)
        a.submit(frame)
        if b is not None:
            b.submit(frame)
        a.flush(timeout=60)
        if i == 4:  # warmed up: the ring (2 frames) is full, so both attention variants have run
            warm = engine.stats()["compiles"]
    for s in (a, b):
        assert s.flush(timeout=60)
        s.close()
    return warm, engine.stats()["compiles"], outputs


@pytest.mark.parametrize("temporal,variants", [(TemporalSettings.off(), 1),
                                               (TemporalSettings(attention_frames=2, flow=False), 2)],
                         ids=["temporal-off", "temporal-cache"])
def test_the_compiled_step_is_not_recompiled(temporal, variants):
    """One compile (two with the temporal cache: its read masked while a ring fills,
    unmasked once full), then none over the other frames; the frames are the eager step's."""
    with Engine(tiny_sd_pipeline, compile="eager", bucket_rows=4) as engine:
        warm, end, outputs = feed(engine, temporal)
        deadline = time.monotonic() + 10
        while engine.stats()["buckets"] and time.monotonic() < deadline:  # rows go back on the worker
            time.sleep(0.01)
        assert engine.stats()["buckets"] == {}  # both closed: the bucket is freed
    assert warm == end == variants
    assert len(outputs["a"]) == 20 and len(outputs["b"]) == 8
    if not temporal.attention_frames:
        return  # the frames are compared once, with the cache (the step with more state)
    with Engine(tiny_sd_pipeline, bucket_rows=4) as eager:
        *_, expected = feed(eager, temporal)
    for name in ("a", "b"):
        x = np.stack([f.to_ndarray(format="rgb24") for f in outputs[name]]).astype(np.int16)
        y = np.stack([f.to_ndarray(format="rgb24") for f in expected[name]]).astype(np.int16)
        assert np.abs(x - y).max() <= 1


def test_cuda_graphs_on_the_cpu_are_refused_in_one_line():
    with pytest.raises(LivestyleError, match="CUDA graphs need a CUDA device, not cpu"):
        Engine(tiny_sd_pipeline, cuda_graphs=True)


def test_controlnets_in_the_compiled_step_are_not_recompiled_by_live_scale_changes(tmp_path):
    """Two ControlNets, one compile over 8 frames through scale changes (to 0: off) and
    start/end changes; the frames are the eager step's."""
    from test_engine_control import controlnets, sd_pipeline, sd_unet

    unet = sd_unet()
    controlnets(unet, tmp_path)
    frames = list(SyntheticSource("coffee", SIZE, 24, 8))
    changes = {3: (0.5, 0.0, 1.0), 5: (0.0, 0.0, 1.0), 6: (1.0, 0.5, 1.0)}  # frame -> the second net's

    def feed(engine):
        outputs = []
        controls = lambda scale, start, end: (Control(str(tmp_path / "net0"), "canny", 1.0),  # noqa: E731
                                              Control(str(tmp_path / "net1"), "soft_edges", scale, start, end))
        stream = engine.open_stream(StreamSettings(size=SIZE, prompt="a fox", steps=2, temporal=TemporalSettings.off(),
                                                   controls=controls(1.0, 0.0, 1.0)), outputs.append, live=False)
        compiles = []
        for i, frame in enumerate(frames):
            if i in changes:
                stream.update(controls=controls(*changes[i]))
            stream.submit(frame)
            stream.flush(timeout=60)
            compiles.append(engine.stats()["compiles"])
        stream.close()
        return compiles, np.stack([f.to_ndarray(format="rgb24") for f in outputs]).astype(np.int16)

    with Engine(lambda: sd_pipeline(unet), compile="eager") as engine:
        compiles, compiled = feed(engine)
    with Engine(lambda: sd_pipeline(unet)) as engine:
        _, eager = feed(engine)
    assert compiles == [1] * len(frames)
    assert np.abs(compiled - eager).max() <= 1
