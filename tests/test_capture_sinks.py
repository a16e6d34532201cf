"""Sinks and the threads around them: file (audio copy or re-encode, timing, odd sizes),
image sequences, the virtual camera's messages, the window without a display, the writer
and reader threads."""

import sys
import time
import types
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
from media_clips import make_clip, video_facts

from livestyle.capture import window as window_module
from livestyle.capture.files import FileSource
from livestyle.capture.folder import ImageSequenceSink, is_sequence_pattern
from livestyle.capture.sinks import FileSink, VideoEncoding
from livestyle.capture.threads import Reader, Writer
from livestyle.capture.vcam import VirtualCameraSink
from livestyle.capture.window import WindowSink
from livestyle.errors import LivestyleError


def _restyled(frame: av.VideoFrame) -> av.VideoFrame:
    """What the engine hands a sink: a new rgb24 frame with the input's pts and time_base only."""
    out = av.VideoFrame.from_ndarray(255 - frame.to_ndarray(format="rgb24"), format="rgb24")
    out.pts, out.time_base = frame.pts, frame.time_base
    return out


def _through(source_path, out_path, **sink_options):
    with FileSource(source_path) as source:
        info = source.info
        with FileSink(out_path, info.size, info.time_base, info.rate, audio=source.audio, **sink_options) as sink:
            for item in source.read(audio=True):
                if isinstance(item, av.Packet):
                    sink.write_audio(item)
                else:
                    sink.write(_restyled(item))
    return sink


def test_audio_is_copied_bit_exact_and_timing_kept(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", (64, 48), frames=24)
    sink = _through(clip, tmp_path / "out.mp4")
    assert sink.audio_mode == "copy" and sink.frames == 24
    before, after = video_facts(clip), video_facts(tmp_path / "out.mp4")
    assert after["audio_packets"] == before["audio_packets"] and len(before["audio_packets"]) > 40
    assert after["times"] == pytest.approx(before["times"], abs=1e-6)
    assert after["duration"] == pytest.approx(before["duration"], abs=1 / 24)


def test_audio_the_container_cannot_hold_is_reencoded(tmp_path):
    """PCM in MKV to MP4: re-encoded as AAC, the same length as the video."""
    clip = make_clip(tmp_path / "in.mkv", (64, 48), frames=24, audio="pcm_s16le")
    sink = _through(clip, tmp_path / "out.mp4")
    assert sink.audio_mode == "encode"
    after = video_facts(tmp_path / "out.mp4")
    assert after["audio"] == "aac" and after["frames"] == 24
    with av.open(str(tmp_path / "out.mp4")) as container:
        audio = container.streams.audio[0]
        seconds = float(audio.duration * audio.time_base)
    assert seconds == pytest.approx(1.0, abs=0.05)


def test_webm_gets_vp9_and_opus(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", (64, 48), frames=6)
    sink = _through(clip, tmp_path / "out.webm")
    assert sink.audio_mode == "encode"
    with av.open(str(tmp_path / "out.webm")) as container:
        assert container.streams.video[0].codec_context.name == "vp9"
        assert container.streams.audio[0].codec_context.name == "opus"


def test_odd_sides_lose_one_pixel_and_bitrate_is_used(tmp_path):
    clip = make_clip(tmp_path / "in.mkv", (64, 48), frames=4, audio=None)
    frames = []
    with FileSource(clip) as source:
        for f in source:
            frames.append(_restyled(f.reformat(width=63, height=47)))
    with FileSink(tmp_path / "odd.mp4", (63, 47), frames[0].time_base, 24,
                  VideoEncoding(bitrate=200_000)) as sink:
        for f in frames:
            sink.write(f)
    assert sink.size == (62, 46) and video_facts(tmp_path / "odd.mp4")["size"] == (62, 46)


@pytest.mark.parametrize("options, message", [
    ({"codec": "no-such-codec"}, "codec 'no-such-codec': not an encoder"),
    ({"crf": 99}, "crf 99: must be 0 to 63"),
    ({"preset": "quick"}, "encoder preset 'quick': one of ultrafast, superfast"),
])
def test_bad_encoding_options(options, message):
    with pytest.raises(LivestyleError, match=message):
        VideoEncoding(**options)


def test_unwritable_outputs(tmp_path):
    with pytest.raises(LivestyleError, match="folder .*nowhere does not exist"):
        FileSink(tmp_path / "nowhere" / "out.mp4", (64, 48), Fraction(1, 24), 24)
    with pytest.raises(LivestyleError, match="cannot write this file"):
        FileSink(tmp_path / "out.unknownformat", (64, 48), Fraction(1, 24), 24)


def test_a_file_with_no_frame_is_removed(tmp_path):
    path = tmp_path / "empty.mp4"
    FileSink(path, (64, 48), Fraction(1, 24), 24).close()
    assert not path.exists()


def test_image_sequence_numbers_from_one(tmp_path):
    assert is_sequence_pattern("out/%05d.png") and is_sequence_pattern("f%d.jpg")
    assert not is_sequence_pattern("out.mp4") and not is_sequence_pattern("100%.png")
    with ImageSequenceSink(tmp_path / "f%03d.png", (10, 8)) as sink:
        for t in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((4, 6, 3), 50 * t, np.uint8), format="rgb24")
            sink.write(frame)  # at the processing size: written at the sink's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f001.png", "f002.png", "f003.png"]
    assert cv2.imread(str(tmp_path / "f003.png")).shape == (8, 10, 3)


def test_vcam_without_pyvirtualcam_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyvirtualcam", None)  # import fails, as when it is not installed
    with pytest.raises(LivestyleError) as caught:
        VirtualCameraSink((64, 48), 30)
    message = str(caught.value)
    assert 'pip install "livestyle[vcam]"' in message and "\n" not in message
    assert ("v4l2loopback" in message) if sys.platform.startswith("linux") else ("OBS" in message)


def _fake_pyvirtualcam(fail: str | None, sent: list):
    class Camera:
        def __init__(self, width, height, fps, fmt, device=None):
            if fail:
                raise RuntimeError(fail)
            self.device, self.backend = device or "/dev/video9", "fake"

        def send(self, frame):
            sent.append(frame)

        def close(self):
            pass

    return types.SimpleNamespace(Camera=Camera, PixelFormat=types.SimpleNamespace(RGB="RGB"))


def test_vcam_without_a_backend_says_what_it_needs(monkeypatch):
    fake = _fake_pyvirtualcam("'v4l2loopback' backend: No v4l2 loopback device found at /dev/video[0-99].", [])
    monkeypatch.setitem(sys.modules, "pyvirtualcam", fake)
    with pytest.raises(LivestyleError, match=r"^vcam: no virtual camera could be started \('v4l2loopback' backend"):
        VirtualCameraSink((64, 48), 30)


def test_vcam_sends_frames_at_its_size(monkeypatch):
    sent = []
    monkeypatch.setitem(sys.modules, "pyvirtualcam", _fake_pyvirtualcam(None, sent))
    with VirtualCameraSink((64, 48), 30) as sink:
        sink.write(av.VideoFrame.from_ndarray(np.zeros((24, 32, 3), np.uint8), format="rgb24"))
    assert sink.device == "/dev/video9" and sent[0].shape == (48, 64, 3) and sent[0].dtype == np.uint8


def test_window_without_a_display_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    with pytest.raises(LivestyleError, match="window: cannot open a preview window: no display"):
        WindowSink((64, 48))


def test_window_side_by_side_pairs_input_and_output_by_pts(monkeypatch):
    monkeypatch.setattr(window_module, "display_problem", lambda: None)
    sink = WindowSink((32, 24), side_by_side=True)
    source = av.VideoFrame.from_ndarray(np.full((24, 32, 3), 200, np.uint8), format="rgb24")
    source.pts = 5
    sink.remember_input(source)
    output = av.VideoFrame.from_ndarray(np.zeros((12, 16, 3), np.uint8), format="rgb24")  # processing size
    output.pts = 5
    sink.write(output)
    shown = sink._latest
    assert shown.shape == (24, 64, 3) and shown[:, :32].min() == 200 and shown[:, 32:].max() == 0


class _SlowSink:
    def __init__(self, delay=0.0, fail_at=None):
        self.frames, self.audio, self.closed = [], [], False
        self.delay, self.fail_at = delay, fail_at

    def write(self, frame):
        if self.fail_at is not None and len(self.frames) == self.fail_at:
            raise LivestyleError("disk full")
        time.sleep(self.delay)
        self.frames.append(frame.pts)

    def write_audio(self, packet):
        self.audio.append(packet)

    def close(self):
        self.closed = True


def _frame(pts):
    frame = av.VideoFrame(8, 8, "rgb24")
    frame.pts, frame.time_base = pts, Fraction(1, 24)
    return frame


def test_file_writer_keeps_every_frame_in_order():
    sink = _SlowSink(delay=0.002)
    writer = Writer(sink)
    for t in range(20):
        writer.wait_for_room(4)
        assert writer.backlog <= 4
        writer.put(_frame(t))
    writer.close()
    assert sink.frames == list(range(20)) and sink.closed and writer.written == 20 and writer.dropped == 0


def test_live_writer_keeps_the_newest_frame():
    sink = _SlowSink(delay=0.05)
    writer = Writer(sink, latest_only=True)
    for t in range(10):  # far faster than the sink
        writer.put(_frame(t))
    writer.close()
    assert sink.frames[-1] == 9 and len(sink.frames) < 10
    assert writer.written + writer.dropped == 10


def test_writer_error_is_raised_at_close_and_later_frames_are_dropped():
    sink = _SlowSink(fail_at=3)
    writer = Writer(sink)
    for t in range(6):
        writer.put(_frame(t))
    deadline = time.monotonic() + 5
    while writer.error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.put(_frame(7))
    with pytest.raises(LivestyleError, match="disk full"):
        writer.close()
    assert sink.frames == [0, 1, 2] and sink.closed


def test_reader_stops_at_seconds_and_keeps_errors():
    got = []
    reader = Reader((_frame(t) for t in range(100)), got.append, seconds=0.5).start()
    assert reader.join(5)
    assert [f.pts for f in got] == list(range(12)) and reader.error is None  # 12 frames = 0.5 s at 24 fps

    def failing():
        yield _frame(0)
        raise LivestyleError("camera unplugged")

    reader = Reader(failing(), got.append).start()
    assert reader.join(5) and isinstance(reader.error, LivestyleError) and reader.frames == 1


def test_reader_stop_ends_an_endless_source():
    def endless():
        t = 0
        while True:
            yield _frame(t)
            t += 1

    reader = Reader(endless(), lambda f: time.sleep(0.001)).start()
    deadline = time.monotonic() + 10
    while reader.frames < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    reader.stop()
    assert reader.join(10) and reader.frames >= 3 and reader.error is None
