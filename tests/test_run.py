"""The main job end to end: `livestyle run test: -o out.mp4` with the embedded demo model."""

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from livestyle.capture.sinks import FileSink
from livestyle.capture.sources import SyntheticSource
from livestyle.frame import from_tensor, to_tensor
from livestyle.models.demo import DEMO_MODEL


def test_frame_round_trip_keeps_pixels_and_timing():
    rgb = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    frame.pts, frame.time_base = 7, Fraction(1, 30)
    x = to_tensor(frame)
    assert x.shape == (1, 3, 24, 40) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    back = from_tensor(x, [frame])[0]
    assert back.pts == 7 and back.time_base == Fraction(1, 30)
    assert np.array_equal(back.to_ndarray(format="rgb24"), rgb)


def test_synthetic_source_moves_and_is_timed():
    frames = list(SyntheticSource("coffee", (64, 48), fps=12, frames=6))
    assert [f.pts for f in frames] == list(range(6)) and frames[0].time_base == Fraction(1, 12)
    arrays = [f.to_ndarray(format="rgb24") for f in frames]
    assert arrays[0].shape == (48, 64, 3)
    assert np.abs(arrays[0].astype(int) - arrays[5].astype(int)).mean() > 1  # the camera moved


def test_file_sink_writes_every_frame_with_its_timing(tmp_path):
    path = tmp_path / "out.mp4"
    with FileSink(path, (64, 48), Fraction(1, 12), 12) as sink:
        for frame in SyntheticSource("astronaut", (64, 48), fps=12, frames=10):
            sink.write(frame)
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        decoded = list(c.decode(stream))
    assert len(decoded) == 10 and stream.codec_context.name == "h264"
    assert [round(float(f.pts * f.time_base) * 12) for f in decoded] == list(range(10))


ROOT = Path(__file__).resolve().parents[1]


def _run(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # livestyle importable from any folder
    return subprocess.run([sys.executable, "-m", "livestyle.cli", "run", *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


@pytest.mark.skipif(not (DEMO_MODEL / "model_index.json").is_file(), reason="the demo model is not built")
def test_run_restyles_the_sample_clip(tmp_path):
    out = tmp_path / "demo.mp4"
    result = _run("test:", "-o", out, "--seconds", "0.5", "--preset", "ink-sketch")
    assert result.returncode == 0, result.stderr
    assert "fps" in result.stdout
    with av.open(str(out)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == 12 and frames[0].shape == (256, 256, 3)
    source = next(iter(SyntheticSource("coffee", (256, 256)))).to_ndarray(format="rgb24")
    assert np.abs(frames[0].astype(int) - source.astype(int)).mean() > 20  # restyled, not the input


@pytest.mark.parametrize("args, message", [
    (("test:", "--preset", "nope"), "unknown preset 'nope'"),
    (("clip.mp4",), "clip.mp4: no such file"),
    (("test:nothing",), "test:nothing: no such shipped image"),
    (("test:", "--strength", "3"), "strength = 3.0: must be between 0 and 1"),
])
def test_run_bad_input_is_one_line(tmp_path, args, message):
    result = _run(*args, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
