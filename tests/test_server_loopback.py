"""The server end to end on loopback: an aiortc client sends generated video to `livestyle
serve`'s /offer, gets restyled frames back from the real engine and the demo model, and
changes them live over the `control` data channel."""

import asyncio
import json
import time

import numpy as np
import pytest

from livestyle.capture.sources import SyntheticSource
from livestyle.server.app import App, ServerSettings, listening
from livestyle.server.client import CameraClient, SyntheticTrack
from livestyle.server.tracks import H264, VP8, sender_encoder

FPS = 30
TOKEN = "correct-horse-battery"


@pytest.fixture(scope="module")
def clip():
    """A second of a camera gliding over a photo, 128x96 RGB."""
    return [f.to_ndarray(format="rgb24") for f in SyntheticSource("coffee", (128, 96), fps=FPS, frames=FPS)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / max(mse, 1e-9)))


async def fidelity(client: CameraClient, clip, frames: int = 6) -> tuple[float, np.ndarray]:
    """Median PSNR of received frames against the input frames they restyle (matched by
    pts), and the mean colour of the last one."""
    scores = []
    for _ in range(frames):
        frame = await client.next_frame()
        rgb = frame.to_ndarray(format="rgb24")
        sent = clip[round(frame.pts * FPS / 90_000) % len(clip)]  # SyntheticTrack's pts: 90 kHz ticks
        scores.append(psnr(rgb, sent))
    return float(np.median(scores)), rgb.reshape(-1, 3).mean(0)


async def settle(client: CameraClient, frames: int = 8) -> None:
    """Let a change reach the output: the temporal blend carries a little of old frames."""
    for _ in range(frames):
        await client.next_frame()


def server(engine, **settings) -> App:
    return App(engine, ServerSettings(port=0, short_side=96, **settings))


@pytest.mark.parametrize("codec", ["video/H264", "video/VP8"])
def test_restyled_video_comes_back_and_control_changes_it(engine, clip, codec):
    async def main():
        app = server(engine, bitrate=3_000_000)
        async with listening(app) as url, CameraClient(url, SyntheticTrack(clip, FPS), codec=codec,
                                                        preset="starry-night") as client:
            await settle(client)
            styled, starry_colour = await fidelity(client, clip)

            reply = await client.control({"strength": 0.0})
            assert reply["ok"] and reply["settings"]["strength"] == 0.0
            await settle(client)
            plain, _ = await fidelity(client, clip)

            reply = await client.control({"strength": 1.0, "style": "fauve-red"})
            assert reply["settings"]["style"] == "fauve-red"
            await settle(client)
            _, fauve_colour = await fidelity(client, clip)

            session = next(iter(app.sessions.values()))
            encoder = sender_encoder(session.transceiver.sender)
            stats = session.stats()
            latencies = client.latencies()
        # Strength 0 gives the input back (through the autoencoder and two codecs); the
        # full style does not.
        assert plain > styled + 6, (plain, styled)
        assert np.abs(fauve_colour - starry_colour).max() > 20, (fauve_colour, starry_colour)
        # The negotiated codec, with our encoder and its bitrate ceiling.
        assert stats["codec"].lower() == codec.lower()
        assert isinstance(encoder, H264 if codec == "video/H264" else VP8) and encoder.ceiling == 3_000_000
        # Received frames carry the pts of the frames they restyle: latency per frame.
        assert len(latencies) >= 20 and 0 < np.median(latencies) < 1.0
        assert stats["frames_out"] >= 20 and stats["latency_ms"] is not None

    asyncio.run(main())


def test_sessions_are_isolated(engine, clip):
    async def main():
        app = server(engine)
        async with listening(app) as url, \
                CameraClient(url, SyntheticTrack(clip, FPS)) as a, CameraClient(url, SyntheticTrack(clip, FPS)) as b:
            assert a.session != b.session
            await a.control({"strength": 0.0, "seed": 5})
            await settle(a)
            await settle(b)
            a_fidelity, _ = await fidelity(a, clip)
            b_fidelity, _ = await fidelity(b, clip)
            settings = {s["id"]: s["settings"] for s in (x.stats() for x in app.sessions.values())}
        assert sorted(s["strength"] for s in settings.values()) == [0.0, 1.0]
        assert sorted(s["seed"] for s in settings.values()) == [0, 5]
        assert a_fidelity > b_fidelity + 6  # only a's output went back to the input

    asyncio.run(main())


def test_sessions_are_freed_soon_after_the_peer_closes_or_vanishes(engine, clip):
    async def gone_after(app, started: float) -> float:
        while app.sessions:
            await asyncio.sleep(0.05)
            assert time.monotonic() - started < 5.0, [s.stats() for s in app.sessions.values()]
        assert engine.stats()["streams"] == 0
        return time.monotonic() - started

    async def main():
        app = server(engine)  # the default idle timeout
        async with listening(app) as url:
            closing = CameraClient(url, SyntheticTrack(clip, FPS))
            await closing.connect()
            await closing.next_frame()
            await closing.close()
            closed = await gone_after(app, time.monotonic())

            track = SyntheticTrack(clip, FPS)
            vanishing = CameraClient(url, track)
            await vanishing.connect()
            await vanishing.next_frame()
            track.stop()  # no more video, and no goodbye: the watchdog has to notice
            vanished = await gone_after(app, time.monotonic())
            await vanishing.close()
        return closed, vanished

    closed, vanished = asyncio.run(main())
    assert closed < 5 and vanished < 5


def test_control_channel_needs_the_token_and_checks_every_message(engine, clip):
    async def main():
        app = server(engine, token=TOKEN)
        async with listening(app) as url:
            client = CameraClient(url, SyntheticTrack(clip, FPS), token=TOKEN, authenticate_channel=False)
            await client.connect()
            replies = [await client.control({"strength": 0.5})]
            replies.append(await client.control({"token": TOKEN}))
            for message in ({"strength": 0.5}, {"strength": "high"}, {"strength": 2.0}, {"colour": "red"},
                            {"prompt": "a watercolour of a fox"}, {"prompt": "ink-sketch"},
                            {"preset": "../../etc/passwd.toml"}, {"preset": "sepia-oil"}, {"temporal": False},
                            {"style": "no-such-style"}):
                replies.append(await client.control(message))
            session = next(iter(app.sessions.values()))
            settings = session.stream.settings
            client.channel.send(json.dumps({"token": "wrong-token-entirely"}))  # no reply: the session ends
            await asyncio.sleep(0.5)
            left = len(app.sessions)
            await client.close()
        return replies, settings, left

    replies, settings, left = asyncio.run(main())
    unauthorized, token_ok, ok, not_number, out_of_range, unknown, free_text, style_prompt, path, preset, \
        temporal_off, bad_style = replies
    assert "token" in unauthorized["error"] and token_ok["ok"] and ok["settings"]["strength"] == 0.5
    assert "strength" in not_number["error"] and "strength" in out_of_range["error"]
    assert "colour" in unknown["error"]
    assert "ink-sketch" in free_text["error"] and "text encoder" in free_text["error"]  # lists the styles
    assert style_prompt["settings"]["style"] == "ink-sketch"
    assert "not a preset name" in path["error"]
    assert preset["settings"]["style"] == "sepia-oil"
    assert temporal_off["settings"]["temporal_on"] is False
    assert "no-such-style" in bad_style["error"]
    assert settings.style == "sepia-oil" and settings.temporal.attention_frames == 0
    assert left == 0  # a wrong token on the channel ends the session


def test_a_change_of_resolution_midstream_is_followed(engine, clip):
    """A camera switching from 4:3 to 16:9 (or a browser scaling its video down under load)."""
    wide = [np.ascontiguousarray(np.pad(f, ((0, 0), (16, 16), (0, 0)), mode="edge")) for f in clip]  # 160x96

    async def main():
        app = server(engine)
        async with listening(app) as url, CameraClient(url, SyntheticTrack(clip[:20] + wide, FPS)) as client:
            first = await client.next_frame()
            size_before = next(iter(app.sessions.values())).stream.settings.size
            deadline = time.monotonic() + 10
            while (frame := await client.next_frame()).width != 160:
                assert time.monotonic() < deadline
            await settle(client)
            size_after = next(iter(app.sessions.values())).stream.settings.size
        return (first.width, first.height), size_before, (frame.width, frame.height), size_after

    first, before, later, after = asyncio.run(main())
    assert first == (128, 96) and before == (128, 96)
    assert later == (160, 96) and after == (160, 96)  # the processing size follows the new aspect
