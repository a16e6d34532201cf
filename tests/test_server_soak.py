"""A minute's soak of the server in its own process (benchmarks/soak.py, short): its
memory stays flat while a session streams and comes back once the session closes. On a
busy machine it streams longer (up to 3 minutes), until enough frames were restyled to
show a leak.

The leak this guards against (issue 10) kept every restyled frame's flow field and grey
copy alive through a chain of frame tags: ~0.3 MB a frame at 160x120, 0.9 MB/s on a
faster machine; at this test's size ~0.16 MB a frame."""

import asyncio

from benchmarks.server_latency import ServerProcess
from benchmarks.soak import soak, verdict

SETTLE = 15.0  # seconds: the codecs and the model's first calls at the session's size
LEAK_MB = 10.0  # growth while measured that fails (0.9 MB/s would add ~40 MB in 45 s)
MIN_FRAMES = 100  # restyled while measured: at the leak's ~0.16 MB a frame, >= 16 MB > LEAK_MB


def test_server_memory_is_flat_while_streaming_and_returned_after():
    with ServerProcess(short_side=96, echo=lambda line: None) as server:
        result = asyncio.run(soak(server, minutes=1.0, interval=5.0, size=(128, 96), after=5.0, warmup=5.0,
                                  min_frames=MIN_FRAMES, settle=SETTLE, max_minutes=3.0))
    checks = {name: (passed, figures) for name, passed, figures in verdict(result, SETTLE)}
    settled = next(s for s in result.samples if s.t >= SETTLE)
    end = result.samples[-1]
    restyled = end.frames_out - settled.frames_out
    assert restyled >= MIN_FRAMES, f"only {restyled} frames restyled while measured: too few to show a leak"
    assert end.rss_mb - settled.rss_mb < LEAK_MB, checks["growth"][1]
    assert checks["growth"][0], checks["growth"][1]
    assert checks["returned"][0], checks["returned"][1]
    assert result.errors == 0
