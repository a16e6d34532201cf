"""Sources: files (timing, rotation, audio packets, bad files), image folders, cameras, URLs."""

import time
import types
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
from media_clips import make_clip, picture

from livestyle.capture.files import FileSource, TimestampGaps
from livestyle.capture.folder import ImageFolderSource, list_images
from livestyle.capture.sources import SyntheticSource, camera_index, is_url, open_source
from livestyle.errors import LivestyleError


def test_file_source_keeps_timing_and_hands_audio_packets_on(tmp_path):
    clip = make_clip(tmp_path / "in.mp4", (64, 48), frames=24)
    with open_source(str(clip)) as source:
        assert isinstance(source, FileSource)
        info = source.info
        assert info.size == (64, 48) and info.rate == 24 and info.frames == 24 and not info.live
        items = list(source.read(audio=True))
        frames = [i for i in items if isinstance(i, av.VideoFrame)]
        packets = [i for i in items if isinstance(i, av.Packet)]
        assert len(frames) == 24 and len(packets) > 40  # one AAC packet per 1024 samples of 48 kHz
        assert all(p.stream.type == "audio" and p.size for p in packets)  # (the packets die with the file)
    times = [float(f.pts * f.time_base) for f in frames]
    assert times == pytest.approx([t / 24 for t in range(24)], abs=1e-6)
    with FileSource(clip) as again:  # plain iteration: video only
        assert sum(1 for _ in again) == 24


def test_odd_size_is_read_as_is(tmp_path):
    clip = make_clip(tmp_path / "odd.mp4", (642, 362), frames=3, audio=None)
    with FileSource(clip) as source:
        frames = list(source)
    assert source.info.size == (642, 362) and [(f.width, f.height) for f in frames] == [(642, 362)] * 3
    expected = picture(0, (642, 362)).astype(int)
    assert np.abs(frames[0].to_ndarray(format="rgb24").astype(int) - expected).mean() < 4  # H.264 at CRF 23


@pytest.mark.parametrize("rotation, corner", [(90, "bottom-left"), (-90, "top-right"), (180, "bottom-right")])
def test_rotated_files_come_out_upright(tmp_path, rotation, corner):
    """A phone-style display rotation is applied: the stored top-left marker lands where a player shows it."""
    clip = make_clip(tmp_path / "rot.mp4", (64, 48), frames=2, audio=None, rotation=rotation)
    with FileSource(clip) as source:
        frame = next(iter(source))
    size = (48, 64) if rotation % 180 else (64, 48)
    assert source.info.size == size and (frame.width, frame.height) == size and frame.pts == 0
    rgb = frame.to_ndarray(format="rgb24").astype(int)
    h, w = rgb.shape[:2]
    corners = {"top-left": rgb[:6, :6], "top-right": rgb[:6, w - 6:], "bottom-left": rgb[h - 6:, :6],
               "bottom-right": rgb[h - 6:, w - 6:]}
    brightest = max(corners, key=lambda k: corners[k].mean())
    assert brightest == corner and corners[corner].mean() > 200


def test_variable_frame_rate_keeps_each_timestamp(tmp_path):
    stamps = [0, 40, 70, 130, 140, 200, 260, 262, 300, 400]
    clip = make_clip(tmp_path / "vfr.mp4", frames=len(stamps), pts=stamps, time_base=Fraction(1, 1000), audio=None)
    with FileSource(clip) as source:
        times = [float(f.pts * f.time_base) for f in source]
    assert times == pytest.approx([s / 1000 for s in stamps], abs=1e-9)


def _truncated(path):
    clip = make_clip(path.with_name("whole.mp4"), frames=12)
    data = clip.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the index (moov) is written last: it is gone
    return path


def _audio_only(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=48000)
        chunk = av.AudioFrame.from_ndarray(np.zeros((2, 1024), np.float32), format="fltp", layout="stereo")
        chunk.sample_rate, chunk.pts = 48000, 0
        container.mux(stream.encode(chunk))
        container.mux(stream.encode(None))
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "clip.mp4: no such file"),
    (lambda p: p.write_bytes(b"") and p or p, "clip.mp4: the file is empty (0 bytes)"),
    (lambda p: p.write_text("this is not a video\n" * 20) and p, "clip.mp4: not a video file FFmpeg can read"),
    (_truncated, "clip.mp4: not a video file FFmpeg can read"),
    (_audio_only, "clip.mp4: no video stream (it holds: audio aac)"),
])
def test_bad_files_fail_at_opening_with_one_line(tmp_path, make, message):
    path = tmp_path / "clip.mp4"
    make(path)
    with pytest.raises(LivestyleError) as caught:
        open_source(str(path))
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("where", [0.25, 0.5, 0.7])
def test_damaged_middle_keeps_what_decodes_and_counts_the_rest(tmp_path, where):
    """Zeros over part of an MPEG-TS stream (no index: the demuxer drops what it cannot parse
    without a word): the frames around them still come out, and every frame that did not is
    counted from the gap in the timestamps (the CLI reports it in one line and exits 1)."""
    clip = make_clip(tmp_path / "in.ts", (64, 48), frames=48, audio=None)
    data = bytearray(clip.read_bytes())
    at = int(len(data) * where)
    data[at:at + 2000] = bytes(2000)
    damaged = tmp_path / "damaged.ts"
    damaged.write_bytes(bytes(data))
    with FileSource(damaged) as source:
        frames = list(source)
    assert 30 <= len(frames) < 48
    assert len(frames) + source.damaged >= 48  # a lost frame may also have been a packet the decoder refused


def test_a_whole_ts_stream_has_nothing_missing_at_a_constant_or_variable_rate(tmp_path):
    stamps = [0, 40, 70, 130, 140, 200, 260, 262, 300, 400]
    for clip in (make_clip(tmp_path / "cfr.ts", frames=24, audio=None),
                 make_clip(tmp_path / "vfr.ts", frames=len(stamps), pts=stamps, time_base=Fraction(1, 1000),
                           audio=None)):
        with FileSource(clip) as source:
            frames = list(source)
        assert source.damaged == 0 and len(frames) == (24 if clip.stem == "cfr" else len(stamps))


def frames_in_gaps(times, step):
    gaps = TimestampGaps(step)
    for at in times:
        gaps.add(at)
    return gaps.missing


def test_timestamp_gaps_count_whole_missing_steps_of_a_constant_rate_only():
    step = Fraction(1, 24)
    kept = [i * step for i in range(48) if i not in (10, 11, 12, 30)]
    assert frames_in_gaps(kept, step) == 4
    assert frames_in_gaps([i * step for i in range(48)], step) == 0
    assert frames_in_gaps(kept[:20] + kept[5:8] + kept[20:], step) == 4  # repeats and late frames make no gap
    variable = [Fraction(t, 1000) for t in (0, 40, 70, 130, 140, 200, 260, 262, 300, 400)]
    assert frames_in_gaps(variable, Fraction(1, 25)) == 0  # a variable rate's gaps are its timing
    assert frames_in_gaps([Fraction(0)], step) == 0 and frames_in_gaps([], step) == 0


def test_image_folder_in_natural_order_and_one_size(tmp_path):
    for i in (1, 2, 10):
        cv2.imwrite(str(tmp_path / f"frame_{i}.png"), np.full((30, 40, 3), i * 20, np.uint8))
    cv2.imwrite(str(tmp_path / "frame_3.png"), np.zeros((60, 80, 3), np.uint8))  # another size: resized
    (tmp_path / "notes.txt").write_text("not an image")
    assert [p.name for p in list_images(str(tmp_path))] == ["frame_1.png", "frame_2.png", "frame_3.png",
                                                            "frame_10.png"]
    with open_source(str(tmp_path), fps=12) as source:
        assert isinstance(source, ImageFolderSource)
        frames = list(source)
    assert source.info.size == (40, 30) and source.info.rate == 12 and source.info.frames == 4
    assert [(f.width, f.height, f.pts) for f in frames] == [(40, 30, t) for t in range(4)]
    assert frames[0].time_base == Fraction(1, 12)
    assert frames[3].to_ndarray(format="rgb24")[0, 0, 0] == 200  # frame_10 comes last
    with open_source(str(tmp_path / "frame_1*.png")) as globbed:
        assert [p.name for p in globbed.paths] == ["frame_1.png", "frame_10.png"]


def test_empty_folder_and_missing_camera_are_one_line_errors(tmp_path):
    with pytest.raises(LivestyleError, match="no images found"):
        open_source(str(tmp_path))
    with pytest.raises(LivestyleError, match=r"^cam:7: no such camera .*cameras found"):
        open_source("cam:7")
    with pytest.raises(LivestyleError, match="a camera is cam:N"):
        open_source("cam:front")


def test_spec_parsing():
    assert camera_index("cam:") == 0 and camera_index("cam:3") == 3 and camera_index("/dev/video2") == "/dev/video2"
    assert camera_index("clip.mp4") is None and camera_index("test:") is None
    assert is_url("rtsp://host/stream") and is_url("https://host/a.mp4") and not is_url("C:/clips/a.mp4")


def test_unreachable_url_is_one_line():
    with pytest.raises(LivestyleError, match=r"^http://127.0.0.1:9/clip.mp4: cannot open \("):
        open_source("http://127.0.0.1:9/clip.mp4")


def test_synthetic_source_length_and_size():
    source = open_source("test:astronaut", size=(64, 48), fps=12, seconds=0.5)
    assert isinstance(source, SyntheticSource) and source.info.frames == 6 and source.info.size == (64, 48)
    assert [f.pts for f in source] == list(range(6))


class FakeCapture:
    """Stands in for cv2.VideoCapture: a 30 fps camera that grants 640x480 whatever is asked."""

    opened = True

    def __init__(self, device, api):
        self.device, self.props = device, {}

    def isOpened(self):
        return self.opened

    def set(self, prop, value):
        self.props[prop] = value
        return True

    def get(self, prop):
        return 30.0 if prop == cv2.CAP_PROP_FPS else 0.0

    def read(self):
        time.sleep(1 / 30)
        return True, np.full((480, 640, 3), (10, 20, 30), np.uint8)  # BGR

    def release(self):
        pass


@pytest.fixture
def fake_camera(monkeypatch):
    from livestyle.capture import camera

    monkeypatch.setattr(camera, "sys", types.SimpleNamespace(platform="darwin"))  # no /dev/video* check
    monkeypatch.setattr(camera.cv2, "VideoCapture", FakeCapture)
    return FakeCapture


def test_camera_asks_for_mjpg_size_and_rate_and_stamps_frames(fake_camera):
    with open_source("cam:1", size=(1280, 720), fps=60) as source:
        props = source.capture.props
        assert props[cv2.CAP_PROP_FOURCC] == cv2.VideoWriter_fourcc(*"MJPG")
        assert props[cv2.CAP_PROP_FRAME_WIDTH] == 1280 and props[cv2.CAP_PROP_FPS] == 60
        info = source.info
        assert info.name == "cam:1" and info.live and info.size == (640, 480) and info.rate == 30
        frames = [f for _, f in zip(range(4), source)]
    assert frames[0].to_ndarray(format="rgb24")[0, 0].tolist() == [30, 20, 10]  # BGR read as such
    stamps = [f.pts for f in frames]
    assert frames[0].time_base == Fraction(1, 1000) and stamps == sorted(set(stamps))
    assert 20 <= (stamps[-1] - stamps[0]) / 3 <= 80  # milliseconds apart, as read


def test_camera_that_will_not_open(fake_camera, monkeypatch):
    monkeypatch.setattr(fake_camera, "opened", False)
    with pytest.raises(LivestyleError, match=r"^cam:0: cannot open this camera \(in use by another program"):
        open_source("cam:0")
