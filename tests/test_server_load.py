"""A full server on loopback (benchmarks/load.py, short): 8 sessions at once on the demo
model at a low processing size, each served about as well as the others, the 9th
refused with 503 and a reason."""

import asyncio

from benchmarks.load import load, verdict
from benchmarks.server_latency import ServerProcess

SESSIONS = 8


def test_eight_sessions_are_served_fairly_and_the_ninth_is_refused():
    with ServerProcess(short_side=64, max_sessions=SESSIONS, echo=lambda line: None) as server:
        result = asyncio.run(load(server.url, SESSIONS, seconds=10.0, warmup=4.0, size=(128, 96)))
    checks = {name: (passed, figures) for name, passed, figures in verdict(result)}
    for name in ("served", "fair", "bounded", "full"):
        assert checks[name][0], f"{name}: {checks[name][1]}"
    status, reason = result.refused
    assert "full" in reason and "8 sessions" in reason, reason
    assert all(s.get("errors") == 0 for s in result.server), result.server
