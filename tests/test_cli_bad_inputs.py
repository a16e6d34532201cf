"""Bad input for every entry of the command line: each case must end with a non-zero exit,
one clear line on stderr (argparse's usage + error line counts as one), no traceback, and
no empty or undecodable output file left behind. A few edge inputs that are valid (an
animated GIF, a PNG named .mp4, an 8K frame) must instead succeed with a playable output.

`CASES` and `run_case` are importable, so a benchmark can tally how each class ends:

    from test_cli_bad_inputs import CASES, run_case
    outcome = run_case(CASES[0], Path(tempfile.mkdtemp()))

Most cases run in this process through `livestyle.cli.main` (a subprocess costs ~2 s of
imports on two cores); those marked `process=True` run `python -m livestyle.cli` to see
exactly what a user sees. Media are tiny (64x48, a few frames) and processed at 32 px.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from media_clips import make_clip
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "livestyle" / "weights" / "demo"
FAST = ("--size", "32x32", "--no-temporal")  # a cheap look for the cases that reach the model


@dataclass(frozen=True)
class Case:
    """One bad (or edge) input.

    cls: the kind of input ("video", "output", "option", "preset", "checkpoint").
    name: what it is, for ids and tallies.
    make: writes what the case needs into the folder it is given and returns the argv
        after `livestyle` (paths inside that folder).
    expect: a piece of the last stderr line (the one clear line); "" for any.
    ok: a valid edge input that must succeed (exit 0, a playable output) instead.
    process: run `python -m livestyle.cli` in a subprocess rather than in this process.
    """

    cls: str
    name: str
    make: Callable[[Path], list[str]]
    expect: str = ""
    ok: bool = False
    process: bool = False


@dataclass
class Outcome:
    """How a case ended. code: the exit status (None if an exception escaped main);
    last_line: stderr's last line; lines: stderr's line count, an argparse usage block
    counted as one; traceback: one appeared; outputs: new files; leftovers: new files that
    are empty or hold no decodable frame/image."""

    code: int | None
    last_line: str
    lines: int
    traceback: bool
    outputs: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)


# -- Media, made once per process and copied per case ---------------------------------------

@functools.cache
def _store() -> Path:
    return Path(tempfile.mkdtemp(prefix="livestyle-bad-inputs-"))


@functools.cache
def _clip(kind: str) -> bytes:
    """Bytes of a small clip: "mp4" (64x48, 12 frames, AAC), "mkv", "ts" (48 frames)."""
    path = _store() / f"clip.{kind}"
    if kind == "mp4":
        make_clip(path, (64, 48), frames=12)
    elif kind == "mkv":
        make_clip(path, (64, 48), frames=12, audio=None)
    else:
        make_clip(path, (64, 48), frames=48, audio=None)
    return path.read_bytes()


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def _encode(path: Path, frames: list[np.ndarray], codec: str = "libx264", pix_fmt: str = "yuv420p") -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=4)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], pix_fmt
        for t, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 4)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def _gradient(w: int, h: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 90)], -1).astype(np.uint8)


def _truncated(share: float, kind: str = "mp4"):
    def make(d: Path) -> list[str]:
        data = _clip(kind)
        return ["run", str(_write(d, f"cut{int(share * 100)}.{kind}", data[: int(len(data) * share)])), *FAST]
    return make


def _damaged_middle(d: Path) -> list[str]:
    data = bytearray(_clip("ts"))
    middle = len(data) // 2
    data[middle:middle + 2000] = bytes(2000)
    return ["run", str(_write(d, "damaged.ts", bytes(data))), "-o", str(d / "out.mp4"), *FAST]


def _audio_only(d: Path) -> list[str]:
    path = d / "voice.m4a"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=48000)
        stream.layout = "mono"
        for i in range(5):
            chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = 48000, i * 1024
            out.mux(stream.encode(chunk))
        out.mux(stream.encode(None))
    return ["run", str(path)]


def _zero_frames(d: Path) -> list[str]:
    """A video stream with no packet in it (the audio's packets make the muxer write the file)."""
    clip = _write(d, "whole.mp4", _clip("mp4"))
    path = d / "nothing.mkv"
    with av.open(str(clip)) as inp, av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=24)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = out.add_stream_from_template(inp.streams.audio[0])
        for packet in inp.demux(inp.streams.audio[0]):
            if packet.dts is not None:
                packet.stream = audio
                out.mux(packet)
    clip.unlink()
    return ["run", str(path)]


def _one_pixel(d: Path) -> list[str]:
    return ["run", str(_encode(d / "dot.mkv", [_gradient(1, 1)] * 2, codec="ffv1", pix_fmt="yuv444p"))]


def _gif(d: Path) -> list[str]:
    return ["run", str(_encode(d / "anim.gif", [_gradient(64, 48), _gradient(64, 48)[::-1].copy()],
                               codec="gif", pix_fmt="rgb8")), "-o", str(d / "out.mp4"), *FAST]


def _png_named_mp4(d: Path) -> list[str]:
    import cv2

    ok, png = cv2.imencode(".png", _gradient(64, 48))
    return ["run", str(_write(d, "picture.mp4", png.tobytes())), "-o", str(d / "out.mp4"), *FAST]


def _eight_k(d: Path) -> list[str]:
    # One flat 8K frame: a few KB on disk, 33 Mpx decoded; processed at the default 256 px short side.
    frame = np.full((4320, 7680, 3), 90, np.uint8)
    return ["run", str(_encode(d / "8k.mp4", [frame])), "-o", str(d / "out.mkv"), "--no-temporal"]


def _folder_of(names: dict[str, bytes]):
    """A folder of these files; b"" stands for a good 64x48 PNG."""
    def make(d: Path) -> list[str]:
        import cv2

        folder = d / "shots"
        folder.mkdir()
        for name, data in names.items():
            (folder / name).write_bytes(data or cv2.imencode(".png", _gradient(64, 48))[1].tobytes())
        return ["run", str(folder), "-o", str(d / "out.mp4"), *FAST]
    return make


def _input_clip(d: Path) -> Path:
    return _write(d, "in.mp4", _clip("mp4"))


def _run_clip(*extra: str, output: str | None = "out.mp4"):
    """run in.mp4 [-o OUT] EXTRA, with "{d}" in the extras replaced by the case's folder."""
    def make(d: Path) -> list[str]:
        clip = _input_clip(d)
        out = ["-o", str(d / output)] if output else []
        return ["run", str(clip), *out, *(a.replace("{d}", str(d)) for a in extra)]
    return make


def _output_is_input(how: str):
    def make(d: Path) -> list[str]:
        clip = _input_clip(d)
        if how == "itself":
            out = str(clip)
        elif how == "hard link":
            os.link(clip, d / "link.mp4")
            out = str(d / "link.mp4")
        elif how == "symlink":
            (d / "alias.mp4").symlink_to(clip)
            out = str(d / "alias.mp4")
        else:  # another spelling of the same path
            (d / "sub").mkdir()
            out = str(d / "sub" / ".." / "." / "in.mp4")
        return ["run", str(clip), "-o", out, *FAST]
    return make


def _images_over_input(d: Path) -> list[str]:
    import cv2

    folder = d / "shots"
    folder.mkdir()
    for i in (1, 2):
        cv2.imwrite(str(folder / f"{i:05d}.png"), _gradient(64, 48))
    return ["run", str(folder), "-o", str(folder / "%05d.png"), *FAST]


def _test(*extra: str):
    def make(d: Path) -> list[str]:
        return ["run", "test:", "--input-size", "64x48", "-o", str(d / "out.mp4"), *extra]
    return make


def _preset(text: str | bytes):
    def make(d: Path) -> list[str]:
        path = d / "look.toml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return ["run", "test:", "--preset", str(path), "-o", str(d / "out.mp4")]
    return make


def _checkpoint(kind: str, command: str = "inspect"):
    def make(d: Path) -> list[str]:
        path = d / "model.safetensors"
        if kind == "pickle":
            path = d / "model.ckpt"
            torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
        elif kind == "pickle named .safetensors":
            torch.save({"w": torch.zeros(2)}, path)
        elif kind == "empty":
            path.write_bytes(b"")
        else:
            save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(8, 3, 3, 3)}, str(path))
            data = path.read_bytes()
            (n,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8:8 + n])
            entry = header["encoder.down.0.block.0.conv1.weight"]
            if kind == "truncated":
                data = data[:-100]
            elif kind == "absurd header length":
                data = struct.pack("<Q", 2**63) + data[8:]
            elif kind == "offsets past the end":
                entry["data_offsets"] = [0, 10**9]
                entry["shape"] = [10**9 // 4]
            elif kind == "offsets as strings":
                entry["data_offsets"] = ["0", "864"]
            elif kind == "shape as a string":
                entry["shape"] = "8x3x3x3"
            elif kind == "header is a list":
                header = [1, 2, 3]
            if kind not in ("truncated", "absurd header length"):
                text = json.dumps(header).encode()
                data = struct.pack("<Q", len(text)) + text + data[8 + n:]
            path.write_bytes(data)
        return [command, str(path)] if command == "inspect" else ["run", "test:", "--model", str(path),
                                                                   "-o", str(d / "out.mp4"), *FAST]
    return make


def _demo_copy(d: Path, change: Callable[[Path], None]) -> Path:
    folder = d / "demo"
    shutil.copytree(DEMO, folder)
    change(folder)
    return folder


def _wrong_shape(folder: Path) -> None:
    from safetensors.torch import load_file

    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    key = sorted(state)[0]
    state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1, dtype=state[key].dtype)
    save_file(state, str(path))


def _nan_weights(folder: Path) -> None:
    from safetensors.torch import load_file

    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
             for k, v in load_file(str(path)).items()}
    save_file(state, str(path))


def _config_value(component: str, key: str, value):
    def change(folder: Path) -> None:
        path = folder / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
        config = json.loads(path.read_text())
        config[key] = value
        path.write_text(json.dumps(config))
    return change


def _model_folder(change: Callable[[Path], None], command: str = "inspect"):
    def make(d: Path) -> list[str]:
        folder = _demo_copy(d, change)
        if command == "inspect":
            return ["inspect", str(folder)]
        return ["run", "test:", "--input-size", "64x48", "--model", str(folder), "-o", str(d / "out.mp4"),
                "--seconds", "0.25", *FAST]
    return make


CASES: list[Case] = [
    # -- video inputs
    Case("video", "missing file", lambda d: ["run", str(d / "missing.mp4")], "no such file"),
    Case("video", "zero bytes", lambda d: ["run", str(_write(d, "empty.mp4", b""))], "empty (0 bytes)"),
    Case("video", "random bytes", lambda d: ["run", str(_write(d, "noise.mp4", np.random.default_rng(0).bytes(20000)))],
         "not a video file", process=True),
    Case("video", "text named .mp4", lambda d: ["run", str(_write(d, "notes.mp4", b"hello\n" * 50))],
         "not a video file"),
    Case("video", "truncated at 5%", _truncated(0.05), "not a video file"),
    Case("video", "truncated at 50%", _truncated(0.5), "not a video file"),
    Case("video", "truncated at 85% (no index)", _truncated(0.85), "not a video file"),
    Case("video", "truncated at 95% (audio header cut)", _truncated(0.95), "audio"),
    Case("video", "mkv truncated at 60%", _truncated(0.6, "mkv"), "no video frame could be decoded"),
    Case("video", "corrupt packets mid-file", _damaged_middle, "could not be read"),
    Case("video", "audio only", _audio_only, "no video stream"),
    Case("video", "1x1 frames", _one_pixel, "too small to restyle"),
    Case("video", "zero frames", _zero_frames, "no video frame"),
    Case("video", "folder of non-images", _folder_of({"a.txt": b"x", "b.md": b"y"}), "no images found"),
    Case("video", "folder whose first image is broken", _folder_of({"1.png": b"not a png"}),
         "not an image OpenCV can read"),
    Case("video", "folder with a broken image in the middle",
         _folder_of({"1.png": b"", "2.png": b"junk", "3.png": b""}), "1 frames of"),
    Case("video", "glob matching nothing", lambda d: ["run", str(d / "*.png")], "no images found"),
    Case("video", "ftp:// URL", lambda d: ["run", "ftp://127.0.0.1/clip.mp4"], "not a source livestyle reads"),
    Case("video", "file:// URL", lambda d: ["run", "file:///etc/passwd"], "not a source livestyle reads"),
    Case("video", "dead rtsp host on loopback", lambda d: ["run", "rtsp://127.0.0.1:1/x", "--timeout", "2"],
         "cannot open", process=True),
    Case("video", "dead http host on loopback", lambda d: ["run", "http://127.0.0.1:1/x.mp4", "--timeout", "2"],
         "cannot open"),
    Case("video", "a system file", lambda d: ["run", "/etc/passwd", "-o", str(d / "out.mp4")], "not a video file"),
    Case("video", "a device", lambda d: ["run", "/dev/null", "-o", str(d / "out.mp4")], "empty"),
    Case("video", "unknown camera", lambda d: ["run", "cam:7"], "cam:7"),
    Case("video", "camera not a number", lambda d: ["run", "cam:front"], "cam:N"),
    Case("video", "unknown test image", lambda d: ["run", "test:nothing"], "no such shipped image"),
    Case("video", "animated GIF", _gif, ok=True),
    Case("video", "PNG named .mp4", _png_named_mp4, ok=True),
    Case("video", "7680x4320 frame", _eight_k, ok=True),
    # -- output paths
    Case("output", "output is the input", _output_is_input("itself"), "is the input"),
    Case("output", "output is a hard link to the input", _output_is_input("hard link"), "is the input"),
    Case("output", "output is a symlink to the input", _output_is_input("symlink"), "is the input"),
    Case("output", "output is the input spelled otherwise", _output_is_input("spelling"), "is the input"),
    Case("output", "numbered images over the input images", _images_over_input, "is the input"),
    Case("output", "output is a folder", _run_clip(output=".", *FAST), "is a folder"),
    Case("output", "unwritable place", _run_clip("-o", "/proc/livestyle-out.mp4", *FAST, output=None),
         "cannot write"),
    Case("output", "folder under a file", _run_clip("-o", "/etc/passwd/out.mp4", *FAST, output=None),
         "a file of that name is there"),
    Case("output", "unknown extension", _run_clip(*FAST, output="out.xyz"), "cannot write this file"),
    Case("output", "pattern with a second field", _run_clip(*FAST, output="f_%05d_%s.png"), "numbered-image pattern"),
    Case("output", "image pattern of unknown type", _run_clip(*FAST, output="f_%05d.xyz"), "cannot write"),
    Case("output", "unknown codec", _run_clip("--codec", "nope", *FAST), "codec 'nope'"),
    Case("output", "audio codec for video", _run_clip("--codec", "aac", *FAST), "cannot set up the encoder"),
    # -- option values
    Case("option", "--fps 0", _test("--fps", "0"), "--fps"),
    Case("option", "--fps 0.4", _test("--fps", "0.4"), "--fps"),
    Case("option", "--fps nan", _test("--fps", "nan"), "--fps"),
    Case("option", "--fps inf", _test("--fps", "inf"), "--fps"),
    Case("option", "--seconds 0", _test("--seconds", "0"), "--seconds"),
    Case("option", "--seconds -1", _test("--seconds=-1"), "--seconds"),
    Case("option", "--bitrate inf", _test("--bitrate", "inf"), "--bitrate"),
    Case("option", "--bitrate 0", _test("--bitrate", "0"), "--bitrate"),
    Case("option", "--crf 99", _test("--crf", "99", *FAST), "crf 99"),
    Case("option", "--size 100000x100000", _test("--size", "100000x100000"), "--size", process=True),
    Case("option", "--size 0x0", _test("--size", "0x0"), "--size"),
    Case("option", "--size not multiple of 8", _test("--size", "60x60"), "--size"),
    Case("option", "--size far beyond the input", _test("--size", "2048x2048"), "more than 2x the input"),
    Case("option", "--input-size huge", _test("--input-size", "100000x10"), "--input-size"),
    Case("option", "--device meta", _test("--device", "meta"), "--device"),
    Case("option", "--device tpu", _test("--device", "tpu"), "--device"),
    Case("option", "--seed huge", _test("--seed", str(10**30)), "seed"),
    Case("option", "--seed negative", _test("--seed=-1"), "seed"),
    Case("option", "--style weight NaN", _test("--style", "starry-night:nan"), "finite number"),
    Case("option", "--style weight negative", _test("--style", "starry-night:1, ink-sketch:-2"), "finite number"),
    Case("option", "--style unknown name", _test("--style", "no-such-style", *FAST), "unknown style"),
    Case("option", "--strength nan", _test("--strength", "nan"), "strength"),
    Case("option", "--guidance-scale inf", _test("--guidance-scale", "inf"), "guidance_scale"),
    Case("option", "--steps 0", _test("--steps", "0"), "steps"),
    Case("option", "--fusion nan", _test("--fusion", "nan"), "fusion"),
    Case("option", "--timesteps increasing", _test("--timesteps", "1,2,3"), "timesteps"),
    Case("option", "--timeout 0", _test("--timeout", "0"), "--timeout"),
    Case("option", "--cache-frames 99", _test("--cache-frames", "99"), "attention_frames"),
    # -- presets
    Case("preset", "bad TOML", _preset('style = "ink-sketch\n'), "not valid TOML"),
    Case("preset", "unknown key", _preset('style = "ink-sketch"\ncolour = "red"\n'), "unknown key 'colour'"),
    Case("preset", "wrong type", _preset('style = "ink-sketch"\nstrength = "high"\n'), "is not a float"),
    Case("preset", "table for a string", _preset('style = { a = 1 }\n'), "is not a str"),
    Case("preset", "steps out of range", _preset('style = "ink-sketch"\nsteps = 9\n'), "steps = 9"),
    Case("preset", "strength nan", _preset('style = "ink-sketch"\nstrength = nan\n'), "strength = nan"),
    Case("preset", "seed negative", _preset('style = "ink-sketch"\nseed = -5\n'), "seed = -5"),
    Case("preset", "10 MB string", _preset(b'style = "' + b"x" * (10 * 2**20) + b'"\n'), "too large for a preset"),
    Case("preset", "binary bytes", _preset(bytes(range(256)) * 4), "not valid TOML"),
    Case("preset", "a system file", lambda d: ["run", "test:", "--preset", "/etc/passwd"], "not valid TOML"),
    Case("preset", "a folder",
         lambda d: (d / "look.toml").mkdir() or ["run", "test:", "--preset", str(d / "look.toml")],
         "no such preset file"),
    Case("preset", "unknown name", lambda d: ["run", "test:", "--preset", "nope"], "unknown preset 'nope'"),
    # -- checkpoints
    Case("checkpoint", "pickle .ckpt", _checkpoint("pickle"), "pickle checkpoint"),
    Case("checkpoint", "pickle named .safetensors", _checkpoint("pickle named .safetensors"), "pickle checkpoint"),
    Case("checkpoint", "empty file", _checkpoint("empty"), "empty file"),
    Case("checkpoint", "truncated", _checkpoint("truncated"), "truncated"),
    Case("checkpoint", "absurd header length", _checkpoint("absurd header length"), "not a safetensors file"),
    Case("checkpoint", "offsets past the end", _checkpoint("offsets past the end"), "truncated"),
    Case("checkpoint", "offsets as strings", _checkpoint("offsets as strings"), "corrupt safetensors header"),
    Case("checkpoint", "shape as a string", _checkpoint("shape as a string"), "corrupt safetensors header"),
    Case("checkpoint", "header is a list", _checkpoint("header is a list"), "not a safetensors file"),
    Case("checkpoint", "truncated, through run --model", _checkpoint("truncated", "run"), "truncated"),
    Case("checkpoint", "wrong shapes", _model_folder(_wrong_shape), "has shape"),
    Case("checkpoint", "config value of the wrong type", _model_folder(_config_value("unet", "layers_per_block", "2")),
         "layers_per_block"),
    Case("checkpoint", "config list of strings", _model_folder(_config_value("unet", "block_out_channels", "abc")),
         "unet/config.json: a value has the wrong type"),
    Case("checkpoint", "config word for a number", _model_folder(_config_value("vae", "width", "wide")),
         "vae/config.json: bad LiteAutoencoder config"),
    Case("checkpoint", "scheduler value of the wrong type",
         _model_folder(_config_value("scheduler", "num_train_timesteps", "1000")), "num_train_timesteps"),
    Case("checkpoint", "NaN weights: every frame fails", _model_folder(_nan_weights, "run"), "failed"),
    Case("checkpoint", "folder that is no model", lambda d: ["inspect", str(d)], "not a diffusers model folder"),
]


# -- Running a case --------------------------------------------------------------------------

def _stderr_lines(text: str) -> int:
    """Lines on stderr, argparse's usage block (usage: ... up to its error line) counted as one."""
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and lines[0].startswith("usage:"):
        errors = [i for i, line in enumerate(lines) if ": error: " in line]
        if errors:
            return len(lines) - errors[0]
    return len(lines)


def _playable(path: Path) -> bool:
    """A file holds at least one decodable video frame or is a readable image."""
    if path.stat().st_size == 0:
        return False
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"):
        import cv2

        return cv2.imread(str(path)) is not None
    try:
        with av.open(str(path)) as container:
            return next(container.decode(video=0), None) is not None
    except (av.FFmpegError, IndexError, StopIteration, OSError):
        return False


def _in_process(argv: list[str]) -> tuple[int | None, str, bool]:
    from livestyle import cli

    err, out = io.StringIO(), io.StringIO()
    # What `livestyle` would log on a terminal goes to this stderr too (main's basicConfig
    # adds no handler when one is there already).
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    crashed = False
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = cli.main(argv)
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 2
            except Exception:  # what the user would see as a traceback
                traceback.print_exc(file=err)
                code, crashed = None, True
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    return code, err.getvalue(), crashed


def run_case(case: Case, tmp_path: Path) -> Outcome:
    """Make the case's input in `tmp_path`, run the command there (as cwd), and say how it ended."""
    work = tmp_path / "case"
    work.mkdir(parents=True, exist_ok=True)
    argv = case.make(work)
    before = {p for p in work.rglob("*")}
    cwd = os.getcwd()
    os.chdir(work)  # an input without -o writes beside itself or here
    try:
        if case.process:
            result = subprocess.run([sys.executable, "-m", "livestyle.cli", *argv], cwd=work, capture_output=True,
                                    text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
            code, err, crashed = result.returncode, result.stderr, False
        else:
            code, err, crashed = _in_process(argv)
    finally:
        os.chdir(cwd)
    new = sorted(p for p in work.rglob("*") if p not in before and p.is_file())
    lines = [line for line in err.splitlines() if line.strip()]
    return Outcome(code=code, last_line=lines[-1] if lines else "", lines=_stderr_lines(err),
                   traceback=crashed or "Traceback" in err, outputs=[str(p) for p in new],
                   leftovers=[str(p) for p in new if not _playable(p)])


@pytest.mark.parametrize("case", CASES, ids=[f"{c.cls}: {c.name}" for c in CASES])
def test_bad_input(case, tmp_path, monkeypatch):
    monkeypatch.setenv("LIVESTYLE_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    outcome = run_case(case, tmp_path)
    assert not outcome.traceback, outcome
    assert outcome.leftovers == [], outcome
    if case.ok:
        assert outcome.code == 0 and outcome.outputs, outcome
        return
    assert outcome.code not in (0, None), outcome
    assert outcome.lines == 1, outcome
    assert case.expect in outcome.last_line, outcome


def test_the_corpus_covers_every_class():
    failing = [c for c in CASES if not c.ok]
    assert len(failing) >= 45
    assert {c.cls for c in failing} == {"video", "output", "option", "preset", "checkpoint"}
