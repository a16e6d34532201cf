"""Faults around `livestyle run`, each in a real process: a disk that fills while writing,
network sources that stall, SIGTERM mid-run. Each ends with one line on stderr, a non-zero
exit within a bounded time, and whatever output was written stays playable.
"""

from __future__ import annotations

import http.server
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import pytest
from media_clips import make_clip

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--size", "32x32", "--no-temporal"]


def livestyle(*args: str, limit_bytes: int | None = None, **kw) -> subprocess.Popen:
    def limit():  # in the child: the file size limit a full disk would impose
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.Popen([sys.executable, "-m", "livestyle.cli", "run", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=limit if limit_bytes else None, **kw)


def decodable_frames(path: Path) -> int:
    """Frames a player gets from the file, reading until the first damage (a cut fragment)."""
    count = 0
    try:
        with av.open(str(path)) as container:
            for _ in container.decode(video=0):
                count += 1
    except av.FFmpegError:
        pass
    return count


def wait_for_a_fragment(path: Path, process: subprocess.Popen) -> None:
    """Until the file holds one whole fragment (4 frames at --fps 4): its first moof box."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if path.exists() and b"moof" in path.read_bytes():
            return
        time.sleep(0.1)
    raise AssertionError(f"no fragment written: {process.communicate()}")


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    assert lines[0].startswith("livestyle: error: "), stderr
    return lines[0]


def test_disk_that_fills_while_writing(tmp_path):
    """RLIMIT_FSIZE at 60 kB: the write that crosses it fails with EFBIG. The run ends with
    one line and exit 2, and the fragments written before it play (at 4 fps a fragment
    holds 4 frames; lossless 160x120 frames make each some 30 kB)."""
    out = tmp_path / "out.mp4"
    process = livestyle("test:", "--input-size", "160x120", "--fps", "4", "--seconds", "120", "--crf", "0",
                        "-o", str(out), *FAST, limit_bytes=60_000)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr
    line = one_error_line(stderr)
    assert str(out) in line and "File too large" in line, line
    assert out.stat().st_size <= 60_000
    assert decodable_frames(out) >= 4


class Silent(threading.Thread):
    """A loopback TCP server that accepts connections and never sends a byte."""

    def __init__(self):
        super().__init__(daemon=True)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.held: list[socket.socket] = []

    def run(self):
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.held.append(connection)

    def close(self):
        self.server.close()
        for connection in self.held:
            connection.close()


def test_source_that_never_sends_fails_within_its_timeout():
    silent = Silent()
    silent.start()
    try:
        began = time.monotonic()
        process = livestyle(f"tcp://127.0.0.1:{silent.port}", "--timeout", "1", "-o", "/dev/null")
        _, stderr = process.communicate(timeout=120)
        took = time.monotonic() - began
    finally:
        silent.close()
    assert process.returncode == 2
    assert "nothing came within 1 s" in one_error_line(stderr)
    assert took < 30  # imports (a few s on 2 busy cores) + the 1 s timeout, not FFmpeg's default of never


def _serving(body: bytes, stop_after: int, stop: threading.Event, hang: bool):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "video/mp2t")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:stop_after])
            self.wfile.flush()
            if hang:  # a server that hangs mid-file; else it drops the connection
                stop.wait(60)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("hang, says", [(True, "no data for 1 s"), (False, "Input/output error")])
def test_http_source_that_stops_mid_file(tmp_path, hang, says):
    """An HTTP server sends half of an MPEG-TS clip and hangs (or drops the connection): the
    read times out after --timeout (or fails at once), the run says after how many frames,
    exits 2, and the output holds them."""
    clip = make_clip(tmp_path / "in.ts", (64, 48), frames=96, audio=None).read_bytes()
    stop = threading.Event()
    server = _serving(clip, len(clip) // 2, stop, hang)
    out = tmp_path / "out.mp4"
    try:
        began = time.monotonic()
        process = livestyle(f"http://127.0.0.1:{server.server_port}/live.ts", "--timeout", "1", "-o", str(out),
                            *FAST)
        _, stderr = process.communicate(timeout=120)
        took = time.monotonic() - began
    finally:
        stop.set()
        server.shutdown()
    assert process.returncode == 2, stderr
    line = one_error_line(stderr)
    assert "the stream stopped after" in line and says in line, line
    assert took < 60
    assert not out.exists() or decodable_frames(out) >= 1  # what came out, if anything, plays


def test_sigterm_mid_run_leaves_a_playable_file(tmp_path):
    """SIGTERM once the first fragment is on disk: exit 143, 'stopped early' on stderr, and
    every frame the summary counts is in a playable file."""
    out = tmp_path / "out.mp4"
    process = livestyle("test:", "--input-size", "96x64", "--fps", "4", "--seconds", "600", "-o", str(out), *FAST)
    wait_for_a_fragment(out, process)
    process.send_signal(signal.SIGTERM)
    stopping = time.monotonic()
    stdout, stderr = process.communicate(timeout=60)
    assert time.monotonic() - stopping < 30  # the frames in hand are finished, then it ends
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr and "stopped early" in stderr
    frames = decodable_frames(out)
    assert frames >= 4 and f"restyled {frames} frames" in stdout
