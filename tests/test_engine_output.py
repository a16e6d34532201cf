"""Scaling back off the worker: with scale_back=False (the server's streams) the engine hands
its outputs over at the processing size, with the size to show them at, and the sink's
thread scales them (server.tracks.shown); the frames are the scaled-back ones either way."""

import numpy as np

from livestyle.capture.sources import SyntheticSource
from livestyle.config import StreamSettings, TemporalSettings
from livestyle.server.tracks import RestyledTrack, copy_frame, shown


def test_outputs_at_the_processing_size_carry_the_size_to_show_them_at(engine):
    frames = list(SyntheticSource("coffee", (160, 120), 24, 3))
    settings = StreamSettings(size=(64, 48), style="ink-sketch", temporal=TemporalSettings.off())
    outputs = {True: [], False: []}
    for scale_back in (True, False):
        stream = engine.open_stream(settings, outputs[scale_back].append, live=False, scale_back=scale_back)
        for f in frames:
            stream.submit(f)
        assert stream.flush(timeout=60)
        stream.close()
    assert all((f.width, f.height, f.opaque) == (160, 120, None) for f in outputs[True])
    assert all((f.width, f.height, f.opaque) == (64, 48, (160, 120)) for f in outputs[False])
    for by_engine, by_sink in zip(outputs[True], outputs[False]):
        scaled = shown(copy_frame(by_sink))
        assert (scaled.width, scaled.height, scaled.pts, scaled.time_base) == \
            (160, 120, by_engine.pts, by_engine.time_base)
        # swscale's bilinear against cv2's: the same picture, not the same rounding
        a, b = by_engine.to_ndarray(format="rgb24"), scaled.to_ndarray(format="rgb24")
        assert np.abs(a.astype(np.int16) - b).mean() < 3
    same = outputs[True][0]
    assert shown(same) is same  # nothing to scale: the frame itself


def test_the_track_scales_back_off_the_event_loop(monkeypatch):
    import asyncio
    import threading

    import av

    from livestyle.server import tracks

    small = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")
    small.pts, small.opaque = 7, (160, 120)
    on_loop = []
    real = tracks.shown
    monkeypatch.setattr(tracks, "shown", lambda f: on_loop.append(threading.current_thread() is loop_thread)
                        or real(f))

    async def main():
        slot = tracks.LatestFrame()
        slot.put(small)
        return await RestyledTrack(slot).recv()

    loop_thread = threading.current_thread()  # asyncio.run runs the loop on this thread
    out = asyncio.run(main())
    assert (out.width, out.height, out.pts) == (160, 120, 7) and on_loop == [False]
