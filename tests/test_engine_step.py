"""The fixed-shape step (stream/step.py) against the engine it replaced, frame for frame.

The outputs of the engine as it was before the fixed-shape step (per-stream U-Net calls
of varying batch, TemporalBatch, today's guidance) were recorded by running this file:

    python tests/test_engine_step.py --record      # writes tests/test_engine_step.npz

from the tree of commit 29a8e9d (`git archive 29a8e9d livestyle | tar -x -C /tmp/old`,
then PYTHONPATH=/tmp/old). Each case below runs through today's engine and must give the
recorded frames within 1 grey level (fp32 on the CPU; the batch composition changes the
order of float sums). Guidance rows with the temporal cache on ("full", "initialize")
are not among them: their behaviour changed on purpose (see
test_guidance_rows_read_their_streams_bank).
"""

import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from livestyle.capture.sources import SyntheticSource
from livestyle.config import StreamSettings, TemporalSettings
from livestyle.models.demo import load_demo
from livestyle.stream.engine import Engine

sys.path.insert(0, str(Path(__file__).parent))
from tiny_pipelines import tiny_sd_pipeline  # noqa: E402

RECORDED = Path(__file__).with_suffix(".npz")
OFF = TemporalSettings.off()
SIZE = (64, 48)

# name -> (model, [(settings, image) per stream]); streams of one case run together.
CASES = {
    "sd-batch3-off": ("sd", [(StreamSettings(size=SIZE, prompt="a fox", steps=3, temporal=OFF), "coffee")]),
    "sd-batch3-temporal": ("sd", [(StreamSettings(size=SIZE, prompt="a fox", steps=3), "coffee")]),
    "sd-frame2-temporal": ("sd", [(StreamSettings(size=SIZE, prompt="a fox", steps=2, stream_batch=False),
                                   "coffee")]),
    "sd-cfg2-off": ("sd", [(StreamSettings(size=SIZE, prompt="a fox", negative="blurry", steps=2, guidance="full",
                                           guidance_scale=3.0, temporal=OFF), "coffee")]),
    "sd-self2-temporal": ("sd", [(StreamSettings(size=SIZE, prompt="a fox", steps=2, guidance="self",
                                                 guidance_scale=2.0), "coffee")]),
    "sd-init2-off": ("sd", [(StreamSettings(size=SIZE, prompt="a fox", negative="blurry", steps=2,
                                            guidance="initialize", guidance_scale=2.0, temporal=OFF), "coffee")]),
    "sd-two-streams-temporal": ("sd", [(StreamSettings(size=SIZE, prompt="a fox", steps=2), "coffee"),
                                       (StreamSettings(size=SIZE, prompt="a cat", steps=1), "astronaut")]),
    "sd-fusion2": ("sd", [(StreamSettings(size=SIZE, prompt="a fox", steps=2,
                                          temporal=TemporalSettings(attention_frames=3, fusion=0.8)), "coffee")]),
    "demo-two-streams": ("demo", [(StreamSettings(size=SIZE, style="ink-sketch"), "coffee"),
                                  (StreamSettings(size=SIZE, style="fauve-red", steps=2), "astronaut")]),
    "demo-three-temporal": ("demo", [(StreamSettings(size=SIZE, style="sepia-oil", steps=3), "coffee")]),
}
FRAMES = 6


def clip(image):
    return list(SyntheticSource(image, SIZE, 24, FRAMES))


def run_case(engine, streams):
    """Every stream of a case at once (file streams, each fed by its own thread): (streams, frames, h, w, 3)."""
    outputs = [[] for _ in streams]
    handles = [engine.open_stream(settings, out.append, live=False) for (settings, _), out in zip(streams, outputs)]
    feeders = [threading.Thread(target=lambda h=h, image=image: [h.submit(f) for f in clip(image)])
               for h, (_, image) in zip(handles, streams)]
    for t in feeders:
        t.start()
    for t in feeders:
        t.join()
    for h in handles:
        assert h.flush(timeout=120)
        h.close()
    return np.stack([np.stack([f.to_ndarray(format="rgb24") for f in out]) for out in outputs])


def record():
    results = {}
    for model, load in (("sd", tiny_sd_pipeline), ("demo", load_demo)):
        with Engine(load) as engine:
            for name, (m, streams) in CASES.items():
                if m == model:
                    results[name] = run_case(engine, streams)
    np.savez_compressed(RECORDED, **results)


if __name__ == "__main__" and "--record" in sys.argv:
    record()


@pytest.fixture(scope="module")
def recorded():
    return np.load(RECORDED)


@pytest.fixture(scope="module")
def sd_engine():
    with Engine(tiny_sd_pipeline) as engine:
        yield engine


@pytest.mark.parametrize("name", [n for n, (m, _) in CASES.items() if m == "sd"])
def test_fixed_shape_step_equals_the_engine_it_replaced_sd(sd_engine, recorded, name):
    got = run_case(sd_engine, CASES[name][1]).astype(np.int16)
    assert np.abs(got - recorded[name]).max() <= 1


@pytest.mark.parametrize("name", [n for n, (m, _) in CASES.items() if m == "demo"])
def test_fixed_shape_step_equals_the_engine_it_replaced_demo(engine, recorded, name):
    got = run_case(engine, CASES[name][1]).astype(np.int16)
    assert np.abs(got - recorded[name]).max() <= 1
