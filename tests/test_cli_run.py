"""`livestyle run` on files, end to end through the engine with the demo model.

Clips are small (64x48 up to 642x362, 12 to 24 frames) and processed at 64 px, so each
run takes about a second on a CPU.
"""

import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
import types
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from media_clips import make_clip, video_facts

from livestyle import cli
from livestyle.capture import sources
from livestyle.errors import LivestyleError

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["run", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_file_keeps_frames_size_duration_and_audio(tmp_path, capsys):
    """642x362 (not a multiple of 8 or 16) H.264 + AAC: every frame, the size, the timing, the audio bytes."""
    clip = make_clip(tmp_path / "in.mp4", (642, 362), frames=24)
    code, out, err = run(capsys, clip, "-o", tmp_path / "out.mp4", "--size", "64x40")
    assert code == 0, err
    assert "restyled 24 frames (642x362)" in out and "audio copied" in out and "fps" in out
    before, after = video_facts(clip), video_facts(tmp_path / "out.mp4")
    assert after["frames"] == 24 and after["size"] == (642, 362)
    assert after["times"] == pytest.approx(before["times"], abs=1e-6)
    assert abs(after["duration"] - before["duration"]) <= 1 / 24
    assert after["audio_packets"] == before["audio_packets"]  # copied: bit-exact
    assert np.abs(after["first"].astype(int) - before["first"].astype(int)).mean() > 10  # restyled


def test_rotated_input_comes_out_upright(tmp_path, capsys):
    """A portrait phone clip (stored 64x48, rotated 90 degrees): the output is 48x64 with no
    rotation flag, and shows the picture the way a player shows the input."""
    clip = make_clip(tmp_path / "phone.mp4", (64, 48), frames=12, rotation=90)
    code, _, err = run(capsys, clip, "-o", tmp_path / "out.mp4", "--size", "48x64", "--strength", "0",
                       "--no-temporal")
    assert code == 0, err
    after = video_facts(tmp_path / "out.mp4")
    assert after["size"] == (48, 64) and after["rotation"] == 0 and after["frames"] == 12
    picture = after["first"].astype(int)
    # The stored top-left marker, turned 90 degrees counter-clockwise, is at the bottom left.
    assert picture[-8:, :8].mean() > picture[:8, :8].mean() + 80
    assert picture[-8:, :8].mean() > picture[-8:, -8:].mean() + 80


def test_variable_frame_rate_keeps_timestamps(tmp_path, capsys):
    stamps = [0, 40, 70, 130, 140, 200, 260, 262, 300, 400, 410, 500]
    clip = make_clip(tmp_path / "vfr.mp4", frames=len(stamps), pts=stamps, time_base=Fraction(1, 1000))
    code, _, err = run(capsys, clip, "-o", tmp_path / "out.mp4", "--size", "64x48")
    assert code == 0, err
    assert video_facts(tmp_path / "out.mp4")["times"] == pytest.approx([s / 1000 for s in stamps], abs=1e-9)


def test_default_output_is_beside_the_input_with_the_preset_name(tmp_path, capsys):
    clip = make_clip(tmp_path / "holiday.mkv", (64, 48), frames=6, audio=None)
    code, out, err = run(capsys, clip, "--preset", "ink-sketch", "--size", "64x48", "--seconds", "0.125")
    assert code == 0, err
    output = tmp_path / "holiday.ink-sketch.mp4"
    assert output.is_file() and f"-> {output}" in out
    assert video_facts(output)["frames"] == 3  # --seconds 0.125 at 24 fps


def test_image_folder_to_numbered_images(tmp_path, capsys):
    import cv2

    frames = tmp_path / "shots"
    frames.mkdir()
    for i in range(3):
        cv2.imwrite(str(frames / f"shot{i}.png"), np.full((40, 56, 3), 60 * i, np.uint8))
    (tmp_path / "out").mkdir()
    code, _, err = run(capsys, frames, "-o", tmp_path / "out" / "%04d.png", "--size", "56x40")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0001.png", "0002.png", "0003.png"]


def test_flags_reach_the_stream_settings(tmp_path, capsys, monkeypatch):
    from livestyle.stream import engine as engine_module

    seen = []
    original = engine_module.Engine.open_stream

    def spy(self, settings, on_output, live=True):
        seen.append((settings, live))
        return original(self, settings, on_output, live)

    monkeypatch.setattr(engine_module.Engine, "open_stream", spy)
    code, _, err = run(capsys, "test:", "-o", tmp_path / "t.mp4", "--input-size", "64x48", "--seconds", "0.25",
                       "--strength", "0.6", "--steps", "2", "--seed", "3", "--cache-frames", "1", "--no-flow",
                       "--skip-similar", "0.9", "--no-stream-batch", "--style", "sepia-oil", "--warp", "bilinear")
    assert code == 0, err
    settings, live = seen[0]
    # the demo model's 256 short side (demo_processing_size), small input or not
    assert not live and settings.size == (344, 256) and settings.strength == 0.6 and settings.steps == 2
    assert settings.seed == 3 and settings.style == "sepia-oil" and not settings.stream_batch
    assert settings.temporal.attention_frames == 1 and not settings.temporal.flow
    assert settings.temporal.similarity == 0.9 and settings.temporal.warp == "bilinear"  # bicubic by default


def test_camera_recording_is_live_and_keeps_real_timing(tmp_path, capsys, monkeypatch):
    """A (fake) 30 fps camera into a file: the engine runs live, frames keep the times they were read."""
    import cv2

    from livestyle.capture import camera

    class Camera:
        def __init__(self, device, api):
            self.t = 0

        def isOpened(self):
            return True

        def set(self, prop, value):
            return True

        def get(self, prop):
            return 30.0 if prop == cv2.CAP_PROP_FPS else 0.0

        def read(self):
            time.sleep(1 / 30)
            self.t += 1
            return True, np.roll(np.tile(np.arange(64, dtype=np.uint8)[None, :, None], (48, 1, 3)), self.t, axis=1)

        def release(self):
            pass

    monkeypatch.setattr(camera, "sys", types.SimpleNamespace(platform="darwin"))  # no /dev/video* check
    monkeypatch.setattr(camera.cv2, "VideoCapture", Camera)
    code, out, err = run(capsys, "cam:0", "-o", tmp_path / "rec.mp4", "--seconds", "0.6", "--size", "64x48")
    assert code == 0, err
    facts = video_facts(tmp_path / "rec.mp4")
    assert facts["size"] == (64, 48) and 6 <= facts["frames"] <= 19
    gaps = np.diff(facts["times"])
    assert gaps.min() > 0.01 and facts["times"][-1] - facts["times"][0] < 0.6  # read times, --seconds kept
    assert f"restyled {facts['frames']} frames" in out


def test_an_error_mid_file_leaves_a_playable_file(tmp_path, capsys, monkeypatch):
    """The source fails after 10 frames: one line on stderr, exit 2, and the 10 frames are in a valid file."""
    clip = make_clip(tmp_path / "in.mp4", (64, 48), frames=24)
    opened = sources.open_source

    class Failing:
        def __init__(self, source):
            self.source, self.info, self.audio = source, source.info, source.audio

        def read(self, audio=False):
            for n, item in enumerate(self.source.read(audio)):
                if n == 10 * (1 + (audio and 2)):  # ~10 frames (audio packets come 2 per frame)
                    raise LivestyleError("in.mp4: the network drive went away")
                yield item

        def __iter__(self):
            return self.read(False)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.source.close()

    monkeypatch.setattr(sources, "open_source", lambda *a, **k: Failing(opened(*a, **k)))
    code, _, err = run(capsys, clip, "-o", tmp_path / "out.mp4", "--size", "64x48")
    assert code == 2 and err.strip() == "livestyle: error: in.mp4: the network drive went away"
    facts = video_facts(tmp_path / "out.mp4")
    assert 5 <= facts["frames"] < 24 and facts["size"] == (64, 48)


def test_ctrl_c_mid_file_leaves_a_playable_file(tmp_path):
    """SIGINT while restyling a long synthetic clip: exit 130, and the file holds what was done.

    stderr is a terminal here, so the progress bar shows; Ctrl-C comes once it counts 10 frames."""
    pty = pytest.importorskip("pty")  # POSIX terminals
    out = tmp_path / "out.mp4"
    terminal, child_end = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "livestyle.cli", "run", "test:", "-o", str(out),
                                "--input-size", "96x64", "--seconds", "600"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=child_end, text=True)
    os.close(child_end)
    shown, deadline = "", time.monotonic() + 60
    while time.monotonic() < deadline:
        if select.select([terminal], [], [], 0.5)[0]:
            shown += os.read(terminal, 4096).decode(errors="replace")
        counts = re.findall(r"(\d+)/14400 frames", shown)
        if counts and int(counts[-1]) >= 10:
            break
    process.send_signal(signal.SIGINT)
    stdout, _ = process.communicate(timeout=60)
    while select.select([terminal], [], [], 0.1)[0]:
        try:
            shown += os.read(terminal, 4096).decode(errors="replace")
        except OSError:  # the child's end is closed
            break
    os.close(terminal)
    assert process.returncode == 130, shown
    assert re.search(r"\d+% \[=*>? *\] \d+/14400 frames +[\d.]+ fps  ETA \d+:\d\d", shown), shown
    assert "stopped early" in shown and "Traceback" not in shown
    facts = video_facts(out)
    assert facts["frames"] >= 10 and facts["size"] == (96, 64)
    assert f"restyled {facts['frames']} frames" in stdout


def _bad_preset(tmp_path):
    path = tmp_path / "loud.toml"
    path.write_text('style = "ink-sketch"\nstrength = 2.5\n')
    return path


@pytest.mark.parametrize("setup, extra, message", [
    (lambda d: d / "missing.mp4", (), "missing.mp4: no such file"),
    (lambda d: (d / "empty.mp4").write_bytes(b"") or d / "empty.mp4", (), "empty.mp4: the file is empty (0 bytes)"),
    (lambda d: (d / "notes.mp4").write_text("hello\n" * 50) and d / "notes.mp4", (),
     "notes.mp4: not a video file FFmpeg can read"),
    (lambda d: "test:", ("--preset", "nope"), "unknown preset 'nope'"),
    (lambda d: "test:", ("--preset", "{bad}"), "loud.toml: strength = 2.5 is outside 0 to 1"),
    (lambda d: "cam:7", (), "cam:7: no such camera"),
    (lambda d: "test:", ("-o", "vcam"), 'pip install "livestyle[vcam]"'),
    (lambda d: "test:", ("-o", "window"), "window: cannot open a preview window"),
    (lambda d: "test:", ("--strength", "3"), "strength = 3.0: must be between 0 and 1"),
    (lambda d: "test:", ("--model", "no-such-model"), "model 'no-such-model': no such file or folder"),
    (lambda d: "test:nothing", (), "test:nothing: no such shipped image"),
    (lambda d: "test:", ("--device", "cuda"), "--device cuda: CUDA is not available"),
])
def test_bad_input_is_one_line(tmp_path, capsys, caplog, monkeypatch, setup, extra, message):
    caplog.set_level(logging.INFO)  # a log line would be a second line on a user's terminal
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setitem(sys.modules, "pyvirtualcam", None)
    monkeypatch.setenv("LIVESTYLE_MODELS", str(tmp_path / "models"))
    monkeypatch.chdir(tmp_path)  # where test: would write livestyle-demo.mp4
    if message.startswith("--device") and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    extra = tuple(str(_bad_preset(tmp_path)) if a == "{bad}" else a for a in extra)
    spec = setup(tmp_path)
    inputs = set(tmp_path.iterdir())
    code, out, err = run(capsys, spec, *extra)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("livestyle: error: ") and message in lines[0], err
    assert set(tmp_path.iterdir()) == inputs  # no empty or broken output left behind
    assert [r.getMessage() for r in caplog.records if r.name.startswith("livestyle")] == []


@pytest.mark.parametrize("name, make", [
    ("truncated.mp4", lambda p: p.write_bytes(make_clip(p.with_name("whole.mp4")).read_bytes()[:3000])),
    ("voice.m4a", lambda p: make_clip(p.with_name("v.mp4"), frames=2) and _strip_video(p.with_name("v.mp4"), p)),
])
def test_bad_files_in_a_real_process(tmp_path, name, make):
    """As the user sees it: one line on stderr, exit status 2, nothing else (no log lines, no traceback)."""
    path = tmp_path / name
    make(path)
    result = subprocess.run([sys.executable, "-m", "livestyle.cli", "run", str(path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    expected = "not a video file FFmpeg can read" if name.startswith("truncated") else "no video stream"
    assert lines[0].startswith(f"livestyle: error: {path}: ") and expected in lines[0]
    assert not list(tmp_path.glob("*.starry-night.mp4"))  # no empty output left behind


def _strip_video(source: Path, target: Path) -> None:
    import av

    with av.open(str(source)) as inp, av.open(str(target), "w") as out:
        audio = out.add_stream_from_template(inp.streams.audio[0])
        for packet in inp.demux(inp.streams.audio[0]):
            if packet.dts is not None:
                packet.stream = audio
                out.mux(packet)


def test_outputs_get_their_folders_and_a_failed_run_takes_them_away(tmp_path, capsys):
    """As ffmpeg users expect, -o out/frames/%03d.png creates out/frames; a run that fails
    before writing anything leaves no folder of its own behind."""
    code, _, err = run(capsys, "test:", "--input-size", "64x48", "--seconds", "0.125", "--fps", "24",
                       "-o", tmp_path / "out" / "frames" / "%03d.png", "--size", "32x32")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out" / "frames").iterdir()) == ["001.png", "002.png", "003.png"]
    code, _, err = run(capsys, "test:", "--input-size", "64x48", "--style", "no-such-style",
                       "-o", tmp_path / "new" / "deeper" / "out.mp4", "--size", "32x32")
    assert code == 2 and "unknown style 'no-such-style'" in err
    assert not (tmp_path / "new").exists()


def test_inspect_demo_names_the_embedded_model(capsys):
    assert cli.main(["inspect", "demo"]) == 0
    out = capsys.readouterr().out
    assert "DEMO pipeline" in out and "styles" in out
    assert "LiteAutoencoder, 16 latent channels" in out and "its decoder reads the input frame" in out  # v3


def test_sizes_beyond_the_device_are_refused_before_anything_is_allocated(tmp_path, capsys, monkeypatch):
    """With (pretend) 1 GiB free, 4096x4096 (6.2 GiB at the measured bytes per pixel) is
    refused in one line, and nothing is written."""
    monkeypatch.setattr(cli, "_free_memory", lambda device: 2**30)
    code, _, err = run(capsys, "test:", "--input-size", "4096x4096", "--size", "4096x4096",
                       "-o", tmp_path / "out.mp4")
    assert code == 2 and "--size 4096x4096: needs at least 6.2 GiB on cpu, 1.0 GiB is free" in err
    assert list(tmp_path.iterdir()) == []


def test_default_processing_size_puts_the_demo_model_at_a_256_short_side():
    # A 176x144 webcam would leave the demo model a 22x18 latent at its own size.
    assert cli._auto_size((176, 144), demo=True) == (312, 256)
    assert cli._auto_size((1920, 1080), demo=True) == (456, 256)
    # SD checkpoints take up to a 512 short side and never upscale.
    assert cli._auto_size((176, 144), demo=False) == (176, 144)
    assert cli._auto_size((1920, 1080), demo=False) == (912, 512)


def test_a_small_camera_is_processed_at_the_demo_model_s_size(tmp_path, capsys):
    code, out, err = run(capsys, "test:", "--input-size", "176x144", "--seconds", "0.125", "--fps", "8",
                         "-o", tmp_path / "out.mp4")
    assert code == 0, err
    assert "at 312x256" in out
