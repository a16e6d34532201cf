"""The streaming engine under faults: a frame that fails in a stream batch, a settings
change that cannot be applied, device memory running out for one stream, outputs that
are not finite, streams closed with frames in flight, and state that must not grow
with the number of frames. Every input frame comes out or is counted:
frames_in == frames_out + errors + dropped."""

import gc
import time

import numpy as np
import pytest
import torch
from file_streams import run

import livestyle.stream.engine as engine_module
from livestyle.capture.sources import SyntheticSource
from livestyle.config import StreamSettings, TemporalSettings
from livestyle.models.demo import load_demo
from livestyle.stream.engine import Engine, StreamFailed
from livestyle.stream.state import Tag
from livestyle.stream.stats import WINDOW_S, StreamMeter

OFF = TemporalSettings.off()


@pytest.fixture
def pipe():
    return load_demo()


def clip(n, size=(72, 56), image="coffee"):
    return list(SyntheticSource(image, size, 24, n))


def accounted(stats):
    return stats.frames_in == stats.frames_out + stats.errors + stats.dropped


def arrays(outputs):
    return [f.to_ndarray(format="rgb24").astype(np.int16) for f in outputs]


def failing_on_call(function, n, error=RuntimeError("simulated device error")):
    """`function`, except that its n-th call raises."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise error
        return function(*args, **kwargs)

    return wrapper


# -- A failed frame in a stream batch -----------------------------------------------------------

# With 3 steps in a stream batch, the 5th call of each part handles the frame at pts 4:
# one encode per frame; the first frame's 3 U-Net calls, then one per frame; a decode for
# frame 0, then one per frame from frame 1 on, 2 frames late.
@pytest.mark.parametrize("part,call", [("encode", 5), ("unet", 7), ("decode", 5)])
def test_a_frame_that_fails_in_a_stream_batch_loses_no_other_frame(pipe, monkeypatch, part, call):
    """The issue's case: pts 0..9 in, steps 3, one frame fails. Before, the slots were reset
    and the 2 frames in flight vanished (0, 1, 4..9 out, 1 error). Now every frame comes
    out in pts order; the failed one is a stand-in (the output before it), counted as an
    error, and the others are exactly what a run without the fault gives."""
    frames = clip(10)
    settings = StreamSettings(size=(64, 48), steps=3, temporal=OFF)
    with Engine(pipe) as engine:
        clean, _ = run(engine, settings, frames)
        module = pipe.unet if part == "unet" else pipe.autoencoder
        name = "forward" if part == "unet" else part
        monkeypatch.setattr(module, name, failing_on_call(getattr(module, name), call))
        outputs, stats = run(engine, settings, frames)
    assert [f.pts for f in outputs] == list(range(10))
    assert (stats.frames_in, stats.frames_out, stats.errors, stats.dropped) == (10, 9, 1, 0) and accounted(stats)
    got, expected = arrays(outputs), arrays(clean)
    assert np.abs(got[4] - got[3]).max() == 0  # the stand-in for pts 4
    for i in set(range(10)) - {4}:
        assert np.abs(got[i] - expected[i]).max() <= 1, i


def test_a_drain_that_fails_gives_up_the_frames_in_flight_counted(pipe, monkeypatch, caplog):
    """When even the steps that push the last frames out fail, flush still returns and the
    frames in flight are counted as failed, logged with their pts, none silently lost."""
    forward = pipe.unet.forward
    calls = {"n": 0}

    def lost_after_frame_4(*args, **kwargs):  # frame 0's 3 calls, then one per frame: 7 calls
        calls["n"] += 1
        if calls["n"] > 7:
            raise RuntimeError("device lost")
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", lost_after_frame_4)
    with Engine(pipe) as engine:
        outputs, stats = run(engine, StreamSettings(size=(64, 48), steps=3), clip(5))
    assert [f.pts for f in outputs] == list(range(5))
    assert (stats.frames_out, stats.errors) == (3, 2) and accounted(stats)
    assert "frames at pts [3, 4] failed: device lost" in caplog.text


# -- Settings changes that cannot be applied ------------------------------------------------------

def refusing_seed(seed):
    """engine.StreamState, except that building one for `seed` raises (as running out of
    device memory for new buffers would)."""
    build = engine_module.StreamState

    def state(settings, *args):
        if settings.seed == seed:
            raise RuntimeError(f"cannot allocate the buffers for seed {seed}")
        return build(settings, *args)

    return state


def together(engine, streams_frames):
    """Submit one frame to each stream with the worker held off, so that it takes them in one
    step (one batched call), then wait for the outputs."""
    with engine.lock:  # a reentrant lock: submit() takes it again
        for stream, frame in streams_frames:
            stream.submit(frame)
    for stream, _ in streams_frames:
        assert stream.flush(timeout=30)


def test_a_failed_settings_change_is_the_failing_streams_alone(pipe, monkeypatch, caplog):
    monkeypatch.setattr(engine_module, "StreamState", refusing_seed(99))
    frames = clip(6)
    with Engine(pipe) as engine:
        outs_a, outs_b = [], []
        a = engine.open_stream(StreamSettings(size=(64, 48)), outs_a.append, live=True)
        b = engine.open_stream(StreamSettings(size=(64, 48), style="fauve-red"), outs_b.append, live=True)
        for f in frames[:3]:
            together(engine, [(a, f), (b, f)])
        with engine.lock:  # the change fails in the same step as both streams' next frames
            b.update(seed=99)  # seed fixes the noise buffers: new state, which cannot be built
            a.submit(frames[3])
            b.submit(frames[3])
        a.flush(timeout=30), b.flush(timeout=30)
        for f in frames[4:]:
            together(engine, [(a, f), (b, f)])
        sa, sb = a.stats(), b.stats()
        assert b.settings.seed == 0  # it says what it still runs
        a.close(), b.close()
    assert [f.pts for f in outs_a] == [f.pts for f in outs_b] == list(range(6))
    assert (sa.errors, sa.failed_updates, sb.errors, sb.failed_updates) == (0, 0, 0, 1)
    assert accounted(sa) and accounted(sb) and sb.frames_out == 6
    assert "could not apply settings, keeping the previous ones" in caplog.text


def test_a_stream_whose_first_settings_fail_reports_it_and_can_recover(pipe, monkeypatch):
    monkeypatch.setattr(engine_module, "StreamState", refusing_seed(99))
    frames = clip(4)
    with Engine(pipe) as engine:
        outs_a, outs_c = [], []
        with engine.lock:  # c's settings and its first frame are taken in one step
            a = engine.open_stream(StreamSettings(size=(64, 48)), outs_a.append, live=True)
            c = engine.open_stream(StreamSettings(size=(64, 48), seed=99), outs_c.append, live=True)
            a.submit(frames[0])
            c.submit(frames[0])
        a.flush(timeout=30), c.flush(timeout=30)
        with pytest.raises(StreamFailed, match="stream s2 failed: its settings could not be applied "
                                               r"\(cannot allocate the buffers for seed 99\)"):
            c.submit(frames[1])
        for f in frames[1:3]:
            together(engine, [(a, f)])
        c.update(seed=1)  # another try
        together(engine, [(a, frames[3]), (c, frames[3])])
        sa, sc = a.stats(), c.stats()
        a.close(), c.close()
    assert [f.pts for f in outs_a] == list(range(4)) and sa.errors == 0
    assert [f.pts for f in outs_c] == [3]  # frame 0 failed with the stream: counted, not output
    assert (sc.frames_in, sc.frames_out, sc.errors, sc.failed_updates) == (2, 1, 1, 1) and accounted(sc)


# -- One stream's failure in batched work ----------------------------------------------------------

def test_device_out_of_memory_in_one_streams_call_fails_only_its_frames(pipe, monkeypatch, caplog):
    """The U-Net call over two streams runs out of memory because of one of them: the call is
    retried stream by stream, the other stream's frames come out as if it ran alone, the
    failing stream's frames are counted and stand-ins go out, and the worker goes on."""
    frames = clip(5)
    good = StreamSettings(size=(64, 48), style="ink-sketch")
    with Engine(pipe) as engine:
        alone, _ = run(engine, good, frames)
        bad_context = engine.conditioning.style("fauve-red")
        forward = pipe.unet.forward

        def out_of_memory_with_bad_rows(sample, timestep, context, **kwargs):
            if (context == bad_context).flatten(1).all(1).any():
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return forward(sample, timestep, context, **kwargs)

        monkeypatch.setattr(pipe.unet, "forward", out_of_memory_with_bad_rows)
        outs_a, outs_b = [], []
        a = engine.open_stream(good, outs_a.append, live=True)
        b = engine.open_stream(StreamSettings(size=(64, 48), style="fauve-red"), outs_b.append, live=True)
        for f in frames:
            together(engine, [(a, f), (b, f)])
        sa, sb = a.stats(), b.stats()
        a.close(), b.close()
        after, _ = run(engine, good, frames[:2])  # the worker is alive
    assert "a U-Net call over 2 streams failed (OutOfMemoryError" in caplog.text
    assert [f.pts for f in outs_a] == [f.pts for f in outs_b] == list(range(5))
    assert max(np.abs(x - y).max() for x, y in zip(arrays(outs_a), arrays(alone))) <= 1
    assert (sa.errors, sb.frames_out, sb.errors) == (0, 0, 5) and accounted(sa) and accounted(sb)
    assert all(np.all(x == 0) for x in arrays(outs_b))  # no output yet to stand in: black
    assert len(after) == 2


def test_a_frame_that_cannot_be_encoded_fails_only_its_stream(pipe, monkeypatch):
    """Encoding is batched across streams too: a batch that fails is encoded frame by frame."""
    flat = np.full((56, 72, 3), 7, np.uint8)
    encode = pipe.autoencoder.encode

    def refuse_flat(images):
        if any(bool((image == image.flatten()[0]).all()) for image in images):
            raise ValueError("flat frame")
        return encode(images)

    monkeypatch.setattr(pipe.autoencoder, "encode", refuse_flat)
    frames = clip(4)
    with Engine(pipe) as engine:
        outs_a, outs_b = [], []
        a = engine.open_stream(StreamSettings(size=(64, 48)), outs_a.append, live=True)
        b = engine.open_stream(StreamSettings(size=(64, 48)), outs_b.append, live=True)
        for i, f in enumerate(frames):
            together(engine, [(a, f), (b, flat if i == 2 else f.to_ndarray(format="rgb24"))])
        sa, sb = a.stats(), b.stats()
        a.close(), b.close()
    assert len(outs_a) == len(outs_b) == 4 and sa.errors == 0 and sa.frames_out == 4
    assert (sb.frames_out, sb.errors) == (3, 1) and accounted(sb)


# -- Outputs that are not finite --------------------------------------------------------------------

def test_a_model_with_nan_weights_fails_every_frame_and_says_so_once(pipe, caplog):
    with torch.no_grad():
        next(pipe.unet.parameters()).fill_(float("nan"))
    frames = clip(6)
    with Engine(pipe) as engine:
        outputs, stats = run(engine, StreamSettings(size=(64, 48), steps=2), frames)
    assert (stats.frames_out, stats.errors, stats.non_finite) == (0, 6, 6) and accounted(stats)
    assert [f.pts for f in outputs] == list(range(6))  # black stand-ins keep a file's length
    assert all(np.all(x == 0) for x in arrays(outputs))
    lines = [r.getMessage() for r in caplog.records if "not finite" in r.getMessage()]
    assert len(lines) == 1 and "stream s1: the output at pts 0 is not finite" in lines[0]


def test_one_non_finite_output_does_not_spread_to_later_frames(pipe, monkeypatch):
    """The temporal parts carry each output into the next frames: a NaN must not ride along."""
    decode = pipe.autoencoder.decode
    calls = {"n": 0}

    def nan_once(latents, *frames):  # frames: a guided decoder's (the demo model's)
        calls["n"] += 1
        image = decode(latents, *frames)
        return image.fill_(float("nan")) if calls["n"] == 3 else image

    monkeypatch.setattr(pipe.autoencoder, "decode", nan_once)
    frames = clip(6)
    with Engine(pipe) as engine:
        outputs, stats = run(engine, StreamSettings(size=(64, 48)), frames)  # temporal parts on
    assert (stats.frames_out, stats.errors, stats.non_finite) == (5, 1, 1)
    got = arrays(outputs)
    assert np.abs(got[2] - got[1]).max() == 0  # the stand-in for pts 2
    assert all(x.mean() > 20 for x in got[3:])  # restyled again, not black


# -- Closing and shutting down -----------------------------------------------------------------------

def test_frames_in_flight_at_close_are_counted_as_dropped(pipe):
    frames = clip(6)
    with Engine(pipe) as engine:
        outputs = []
        stream = engine.open_stream(StreamSettings(size=(64, 48), steps=3), outputs.append, live=False)
        for f in frames:
            stream.submit(f)
        stream.close()  # no flush: 2 frames in the stream batch, maybe one still waiting
    stats = stream.stats()  # the engine has stopped: every count is final
    assert stats.dropped >= 2 and accounted(stats) and stats.frames_out == len(outputs)


# -- Growth ----------------------------------------------------------------------------------------

def test_a_long_stream_keeps_no_per_frame_state(pipe):
    """Each frame's motion pointed at the frame before it, so every frame (its grey copy and
    flow, ~0.25 MB at 160x120) stayed alive as long as the stream: one Tag more per frame."""
    def live_tags():
        gc.collect()
        return sum(type(o) is Tag for o in gc.get_objects())

    frames = clip(30)
    with Engine(pipe) as engine:
        stream = engine.open_stream(StreamSettings(size=(64, 48), steps=2), lambda f: None, live=False)
        counts = []
        for chunk in (frames[:10], frames[10:]):
            for f in chunk:
                stream.submit(f)
            stream.flush(timeout=30)
            counts.append(live_tags())
        stream.close()
    assert counts[1] <= counts[0] + 1, counts  # 20 frames later: no more Tags alive


def test_rate_windows_do_not_grow_when_nobody_reads_them():
    meter = StreamMeter()
    long_ago = time.monotonic() - 10 * WINDOW_S
    meter.in_stamps.extend([long_ago] * 1000)
    meter.out_stamps.extend([long_ago] * 1000)
    meter.submitted(False)
    meter.output(time.monotonic())
    assert len(meter.in_stamps) == len(meter.out_stamps) == 1


def test_style_contexts_are_remembered_up_to_a_bound(pipe):
    """A server's viewers can send any number of style blends: the cache keeps the last 16."""
    from livestyle.stream.conditioning import Conditioning

    conditioning = Conditioning(pipe, "cpu", torch.float32)
    first = conditioning.style("starry-night")
    for i in range(40):
        conditioning.style(f"starry-night:1, fauve-red:0.{i + 1:02d}")
        assert conditioning.style("starry-night") is first  # in use: kept
    assert len(conditioning._styles) == conditioning.max_entries
