"""The fixed-shape step (stream/step.py) against the engine it replaced, frame for frame.

The outputs of the engine as it was before the fixed-shape step (per-stream U-Net calls
of varying batch, TemporalBatch, today's guidance) were recorded by running this file:

    python tests/test_engine_step.py --record      # writes tests/test_engine_step.npz

from the tree of commit 29a8e9d (`git archive 29a8e9d livestyle | tar -x -C /tmp/old`,
then PYTHONPATH=/tmp/old). Each case below runs through today's engine and must give the
recorded frames within 1 grey level (fp32 on the CPU; the batch composition changes the
order of float sums). The demo cases run on v2 (demo_v2.py), the model they were recorded
with: v3 differs only in its decoder, which the step does not touch. Guidance rows with the temporal cache on ("full", "initialize")
are not among them: their behaviour changed on purpose (see
test_guidance_rows_read_their_streams_bank).
"""

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from livestyle.capture.sources import SyntheticSource
from livestyle.config import StreamSettings, TemporalSettings
from livestyle.stream.engine import Engine

sys.path.insert(0, str(Path(__file__).parent))
from demo_v2 import load_demo_v2  # noqa: E402
from tiny_pipelines import tiny_sd_pipeline  # noqa: E402

RECORDED = Path(__file__).with_suffix(".npz")
OFF = TemporalSettings.off()
ON = TemporalSettings(warp="bilinear")  # the default parts, warped as the engine recorded here did
SIZE = (64, 48)

# name -> (model, [(settings, image) per stream]); streams of one case run together.
CASES = {
    "sd-batch3-off": ("sd", [(StreamSettings(size=SIZE, prompt="a fox", steps=3, temporal=OFF), "coffee")]),
    "sd-batch3-temporal": ("sd", [(StreamSettings(size=SIZE, prompt="a fox", steps=3, temporal=ON), "coffee")]),
    "sd-frame2-temporal": ("sd", [(StreamSettings(size=SIZE, prompt="a fox", steps=2, stream_batch=False,
                                                  temporal=ON), "coffee")]),
    "sd-cfg2-off": ("sd", [(StreamSettings(size=SIZE, prompt="a fox", negative="blurry", steps=2, guidance="full",
                                           guidance_scale=3.0, temporal=OFF), "coffee")]),
    "sd-self2-temporal": ("sd", [(StreamSettings(size=SIZE, prompt="a fox", steps=2, guidance="self",
                                                 guidance_scale=2.0, temporal=ON), "coffee")]),
    "sd-init2-off": ("sd", [(StreamSettings(size=SIZE, prompt="a fox", negative="blurry", steps=2,
                                            guidance="initialize", guidance_scale=2.0, temporal=OFF), "coffee")]),
    "sd-two-streams-temporal": ("sd", [(StreamSettings(size=SIZE, prompt="a fox", steps=2, temporal=ON), "coffee"),
                                       (StreamSettings(size=SIZE, prompt="a cat", steps=1, temporal=ON),
                                        "astronaut")]),
    "sd-fusion2": ("sd", [(StreamSettings(size=SIZE, prompt="a fox", steps=2,
                                          temporal=TemporalSettings(attention_frames=3, fusion=0.8,
                                                                    warp="bilinear")), "coffee")]),
    "demo-two-streams": ("demo", [(StreamSettings(size=SIZE, style="ink-sketch", temporal=ON), "coffee"),
                                  (StreamSettings(size=SIZE, style="fauve-red", steps=2, temporal=ON), "astronaut")]),
    "demo-three-temporal": ("demo", [(StreamSettings(size=SIZE, style="sepia-oil", steps=3, temporal=ON), "coffee")]),
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


def run_watching_buckets(engine, streams):
    """run_case, and which buckets held rows while frames went out: a set of (bucket id,
    streams holding rows in it), read on the worker with every stream open."""
    buckets = set()
    output = engine._emit

    def emit(s, tag, rgb, **kwargs):
        buckets.update((id(b), len(b.held)) for b in engine.buckets.values())
        output(s, tag, rgb, **kwargs)

    engine._emit = emit
    try:
        return run_case(engine, streams), buckets
    finally:
        del engine._emit


def record():
    results = {}
    for model, load in (("sd", tiny_sd_pipeline), ("demo", load_demo_v2)):
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
def v2_engine():
    with Engine(load_demo_v2) as engine:
        yield engine


@pytest.fixture(scope="module")
def sd_engine():
    with Engine(tiny_sd_pipeline) as engine:
        yield engine


@pytest.mark.parametrize("name", [n for n, (m, _) in CASES.items() if m == "sd"])
def test_fixed_shape_step_equals_the_engine_it_replaced_sd(sd_engine, recorded, name):
    got = run_case(sd_engine, CASES[name][1]).astype(np.int16)
    assert np.abs(got - recorded[name]).max() <= 1


@pytest.mark.parametrize("name", [n for n, (m, _) in CASES.items() if m == "demo"])
def test_fixed_shape_step_equals_the_engine_it_replaced_demo(v2_engine, recorded, name):
    got = run_case(v2_engine, CASES[name][1]).astype(np.int16)
    assert np.abs(got - recorded[name]).max() <= 1


def test_guidance_rows_read_their_streams_bank(engine):
    """Full CFG with the temporal cache on: the negative-prompt rows read the same frame's
    ring as the positive ones (they store nothing). So with the negative style equal to
    the style, u == c and any scale gives the unguided frames. Before, the negative rows
    had no bank, so the bank's effect on the output was multiplied by the scale
    (u + s (c - u), c carrying the past and u not): at scale 3 the frames moved by twice
    the bank's own effect (mean 0.083 grey levels against the bank's 0.041 here; the
    demo model's bank at 64x48 moves little, so means, not maxima, tell them apart)."""
    bank = TemporalSettings(attention_frames=2, flow=False)
    base = dict(size=SIZE, style="ink-sketch", steps=2)
    plain = run_case(engine, [(StreamSettings(**base, temporal=bank), "coffee")]).astype(np.int16)
    without = run_case(engine, [(StreamSettings(**base, temporal=OFF), "coffee")]).astype(np.int16)
    guided = run_case(engine, [(StreamSettings(**base, temporal=bank, negative="ink-sketch", guidance="full",
                                               guidance_scale=3.0), "coffee")]).astype(np.int16)
    effect = np.abs(plain - without).mean()
    assert effect > 0.02  # the bank does something, or this test could not fail
    assert np.abs(guided - plain).mean() < 0.25 * effect


def test_a_guidance_row_with_the_positive_context_is_the_positive_row():
    """The same at the U-Net: through TemporalRings, a batch of two copies of the rows (the
    guidance group) with equal contexts gives equal outputs, where a guidance row with no
    bank (TemporalBatch with None, the old engine's) does not."""
    import torch

    from livestyle.models.temporal import TemporalBatch, TemporalCache, TemporalRings
    from livestyle.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    unet = UNet(UNetConfig(block_out_channels=(8, 16), layers_per_block=1, attention_levels=(True, True),
                           num_heads=(2, 2), cross_attention_dim=12, norm_num_groups=4)).eval()
    hw = (6, 5)
    t, context = torch.tensor([500.0]), torch.randn(1, 3, 12)
    rings = TemporalRings(unet.self_attention_shapes(hw), rows=1, frames=2)
    cache = TemporalCache.for_unet(unet, 1, hw, 2)
    rings.active.fill_(True)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(1, 4, *hw)
            rings.prepare([0])
            both = unet(x.repeat(2, 1, 1, 1), t.repeat(2), context.repeat(2, 1, 1), temporal=rings)
            rings.advance([0])
            old = unet(x.repeat(2, 1, 1, 1), t.repeat(2), context.repeat(2, 1, 1),
                       temporal=TemporalBatch([(cache, 1), (None, 1)]))
            cache.advance()
        assert (both[0] - both[1]).abs().max() <= 1e-6
        assert (old[0] - old[1]).abs().max() > 1e-3


def test_rings_of_rows_at_different_fill_levels_equal_separate_caches():
    """One TemporalRings over two rows, the second joining two frames late (its ring empty
    while the first's is full): each row gets what its own TemporalCache alone gives, the
    read is masked per row while a stepped row fills and unmasked (kernels.cached_attention,
    no flags) once both are full; a row not stepped stores nothing."""
    import torch

    from livestyle import kernels
    from livestyle.models.temporal import TemporalCache, TemporalRings
    from livestyle.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    unet = UNet(UNetConfig(block_out_channels=(8, 16), layers_per_block=1, attention_levels=(True, True),
                           num_heads=(2, 2), cross_attention_dim=12, norm_num_groups=4)).eval()
    hw, frames = (6, 5), 2
    t, context = torch.tensor([500.0, 500.0]), torch.randn(2, 3, 12)
    xs = [torch.randn(2, 4, *hw) for _ in range(5)]
    rings = TemporalRings(unet.self_attention_shapes(hw), rows=2, frames=frames)
    alone = [TemporalCache.for_unet(unet, 1, hw, frames) for _ in range(2)]
    unmasked = []
    real = kernels.cached_attention
    with torch.no_grad():
        for f, x in enumerate(xs):
            active = [0] if f < 2 else [0, 1]  # row 1 joins at frame 2
            rings.active.copy_(torch.tensor([r in active for r in range(2)]))
            rings.prepare(active)
            calls = []
            kernels.cached_attention = lambda *a: calls.append(a[5]) or real(*a)
            try:
                out = unet(x, t, context, temporal=rings)
            finally:
                kernels.cached_attention = real
            rings.advance(active)
            unmasked.append(bool(calls) and all(c is None for c in calls))
            for r in active:
                expected = unet(x[r:r + 1], t[:1], context[r:r + 1], temporal=alone[r])
                alone[r].advance()
                assert (out[r:r + 1] - expected).abs().max() <= 1e-5, (f, r)
    # masked while row 0 fills (frames 0, 1) and while row 1 fills (2, 3); then unmasked
    assert unmasked == [False, False, False, False, True]
    assert rings.counts.tolist() == [5, 3]


def test_optical_flow_runs_on_the_submitting_thread(engine, monkeypatch):
    """Flow is host work: submit() estimates it, the worker only warps (on the device). A
    frame whose predecessor was dropped has no motion from the last output: the worker
    estimates that one, counted."""
    from livestyle.stream import flow

    threads = []
    real = flow.FlowEstimator.motion
    monkeypatch.setattr(flow.FlowEstimator, "motion",
                        lambda self, a, b: threads.append(threading.current_thread().name) or real(self, a, b))
    before = engine.stats()["flow_on_worker"]
    run_case(engine, [(StreamSettings(size=SIZE, style="ink-sketch", steps=2), "coffee")])
    assert len(threads) == FRAMES - 1 and "livestyle-engine" not in threads
    assert engine.stats()["flow_on_worker"] == before


def test_the_device_warp_gives_the_host_grids_frames(recorded):
    """The warps as a GPU runs them (kernels.propagate from the small flow, the grid built
    on the device), here on the CPU, against the frames recorded with the host-built grid."""
    with Engine(load_demo_v2) as engine:
        engine.grid_on_device = True
        for name in ("demo-two-streams", "demo-three-temporal"):
            got = run_case(engine, CASES[name][1]).astype(np.int16)
            assert np.abs(got - recorded[name]).max() <= 1, name


def test_frames_in_flight_stay_in_their_rows_when_the_bucket_grows(sd_engine):
    """The stream batch's frames wait in the bucket's rows between calls (Bucket.advance
    moves them on a slot): a stream joining mid-stream grows the bucket (4 rows to 8), and
    the first stream's frames in flight come out as they do alone."""
    settings = StreamSettings(size=SIZE, prompt="a fox", steps=3, temporal=OFF)
    frames = clip("coffee")
    alone = run_case(sd_engine, [(settings, "coffee")])[0]
    outputs = []
    a = sd_engine.open_stream(settings, outputs.append, live=False)
    for frame in frames[:3]:
        a.submit(frame)
    deadline = time.monotonic() + 60
    while not outputs and time.monotonic() < deadline:  # frame 0 out: the next ones are in flight
        time.sleep(0.01)
    b = sd_engine.open_stream(StreamSettings(size=SIZE, prompt="a cat", steps=2, temporal=OFF), lambda f: None,
                              live=False)
    for frame in frames[3:]:
        b.submit(frame)
        a.submit(frame)
    assert a.flush(timeout=60) and b.flush(timeout=60)
    assert a.state.place[0].rows == 8
    a.close()
    b.close()
    got = np.stack([f.to_ndarray(format="rgb24") for f in outputs]).astype(np.int16)
    assert np.abs(got - alone).max() <= 1
