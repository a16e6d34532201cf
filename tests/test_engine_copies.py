"""Outputs copied back asynchronously (the CUDA path: a non-blocking copy into pinned memory,
handed out once done, so the next call overlaps it), exercised on the CPU with the copies
marked done at once: every frame comes out, in order, flush waits for the frames on their
way, a failing frame's stand-in waits for the frames before it, and the counts add up."""

import numpy as np
import pytest
from file_streams import run

from livestyle.capture.sources import SyntheticSource
from livestyle.config import StreamSettings
from livestyle.models.demo import load_demo
from livestyle.stream.engine import Engine


@pytest.fixture
def engines():
    with Engine(load_demo) as plain, Engine(load_demo) as deferred:
        deferred.copies_async = True  # the worker reads it per call: set before the first frame
        yield plain, deferred


def test_deferred_copies_give_every_frame_in_order(engines, monkeypatch):
    plain, deferred = engines
    frames = list(SyntheticSource("coffee", (64, 48), 24, 8))
    settings = StreamSettings(size=(64, 48), style="ink-sketch", steps=3)
    expected, _ = run(plain, settings, frames)
    decode = deferred.pipe.autoencoder.decode
    calls = {"n": 0}

    def failing_once(z, *frames):  # frames: a guided decoder's (the demo model's)
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated decode error")
        return decode(z, *frames)

    class Slow:
        """A copy still under way when first asked: its frames wait for a later call, or a block."""

        def __init__(self):
            self.asked = 0

        def query(self):
            self.asked += 1
            return self.asked > 1

        def synchronize(self):
            pass

    markers = []
    monkeypatch.setattr(deferred, "_copied", lambda: markers.append(Slow()) or markers[-1])
    monkeypatch.setattr(deferred.pipe.autoencoder, "decode", failing_once)
    got, stats = run(deferred, settings, frames)
    assert len(markers) == 7  # one copy per decoded call (the failed one has none)
    assert [f.pts for f in got] == list(range(8))
    assert (stats.frames_out, stats.errors, stats.dropped) == (7, 1, 0)
    failed = 4  # the 5th decode: frame 4
    for i, (a, b) in enumerate(zip(got, expected)):
        a, b = a.to_ndarray(format="rgb24").astype(np.int16), b.to_ndarray(format="rgb24").astype(np.int16)
        if i == failed:
            assert np.abs(a - got[i - 1].to_ndarray(format="rgb24")).max() == 0  # the stand-in: the output before
        elif i < failed:
            assert np.abs(a - b).max() <= 1, i
    assert not deferred.copies
