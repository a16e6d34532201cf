"""The server's media plumbing on its own: latest frame wins, the fan-out of restyled
frames, encoders with a bitrate ceiling, and control messages."""

import asyncio
import threading
from fractions import Fraction

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError

from livestyle.config import TemporalSettings
from livestyle.server.controls import ControlError, changes_for, parse_message
from livestyle.server.tracks import H264, VP8, Fanout, LatestFrame, RestyledTrack

STYLES = ("starry-night", "sepia-oil", "ink-sketch")


def frame(pts: int, value: int = 0) -> av.VideoFrame:
    f = av.VideoFrame.from_ndarray(np.full((16, 24, 3), value, np.uint8), format="rgb24")
    f.pts, f.time_base = pts, Fraction(1, 90_000)
    return f


def test_latest_frame_keeps_only_the_newest_and_counts_the_rest():
    async def main():
        slot = LatestFrame()
        for pts in range(5):
            slot.put(frame(pts))
        newest = await slot.get()
        waiter = asyncio.ensure_future(slot.get())
        await asyncio.sleep(0)
        assert not waiter.done()  # nothing new: get() waits
        slot.put(frame(9))
        late = await waiter
        slot.close()
        with pytest.raises(MediaStreamError):
            await slot.get()
        return newest.pts, late.pts, slot.replaced

    assert asyncio.run(main()) == (4, 9, 4)


def test_fanout_hands_frames_from_another_thread_to_every_subscriber():
    async def main():
        loop = asyncio.get_running_loop()
        seen = []
        fanout = Fanout(loop, on_frame=lambda f: seen.append(f.pts))
        mine, viewer = fanout.subscribe(), fanout.subscribe()
        track = RestyledTrack(mine)
        worker = threading.Thread(target=fanout.push, args=(frame(3000, 200),))  # as the engine's worker would
        worker.start()
        worker.join()
        a, b = await track.recv(), await viewer.get()
        fanout.close()
        with pytest.raises(MediaStreamError):
            await track.recv()
        fanout.push(frame(6000))  # after closing: ignored
        await asyncio.sleep(0)
        return seen, a, b

    seen, a, b = asyncio.run(main())
    assert seen == [3000] and a.pts == b.pts == 3000 and a.time_base == Fraction(1, 90_000)
    # Two encoders never share a frame object (PyAV's per-frame swscale context is not thread-safe).
    assert a is not b and np.array_equal(a.to_ndarray(), b.to_ndarray())


@pytest.mark.parametrize("encoder", [H264, VP8])
def test_encoders_keep_their_bitrate_within_the_ceiling(encoder):
    e = encoder(6_000_000)
    assert e.target_bitrate == 6_000_000  # above aiortc's own maximum, from the first frame
    e.target_bitrate = 50_000_000  # a receiver's estimate (REMB) cannot raise it past the ceiling
    assert e.target_bitrate == 6_000_000
    e.target_bitrate = 100_000  # nor starve it below a quarter
    assert e.target_bitrate == 1_500_000
    payloads, timestamp = e.encode(frame(9000, 128))
    assert payloads and timestamp == 9000 and e.codec.bit_rate == 1_500_000


def test_control_messages_become_settings_changes():
    assert changes_for(parse_message('{"strength": 0.25, "seed": 4}'), "demo", STYLES) == {"strength": 0.25, "seed": 4}
    preset = changes_for({"preset": "ink-sketch", "strength": 0.5}, "demo", STYLES)
    assert preset["style"] == "ink-sketch" and preset["strength"] == 0.5  # the preset first, then the rest
    assert changes_for({"temporal": False}, "demo", STYLES)["temporal"] == TemporalSettings.off()
    assert changes_for({"prompt": "ink-sketch:0.7, sepia-oil:0.3"}, "demo", STYLES) == \
        {"style": "ink-sketch:0.7, sepia-oil:0.3"}
    assert changes_for({"prompt": "a fox", "negative": "blur"}, "sd1", ()) == {"prompt": "a fox", "negative": "blur"}
    for bad, match in [('[1, 2]', "JSON object"), ("{", "not JSON"), ('{"strength": true}', "not a number"),
                       ('{"seed": 1.5}', "not an integer"), ('{"seed": -1}', "seed"), ('{"temporal": 1}', "true or false"),
                       ('{"prompt": "a fox"}', "no text encoder"), ('{"preset": "/etc/x.toml"}', "not a preset name"),
                       ('{"preset": "nope"}', "unknown preset"), ('{"volume": 11}', "unknown control"),
                       ('{"style": "' + "x" * 2000 + '"}', "at most")]:
        with pytest.raises(ControlError, match=match):
            changes_for(parse_message(bad), "demo", STYLES)
    with pytest.raises(ControlError, match="bytes"):
        parse_message("{" + " " * 5000 + "}")
