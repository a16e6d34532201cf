"""The server against untrusted input: SDP and JSON bodies, headers, presets, control
messages (garbage, huge, wrong types, unknown fields, floods), each answered with a
clean refusal, no traceback in the log, and the server still serving /stats after.

CASES is a list of Case records; run_cases(engine, cases) runs them on loopback servers
(one without a token, one with) and returns an Outcome per case, so a benchmark can
import both and tally the outcomes by class. The parametrized test checks each one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack

from livestyle.capture.sources import SyntheticSource
from livestyle.server import security
from livestyle.server.app import App, ServerSettings, listening
from livestyle.server.client import CameraClient, SyntheticTrack

TOKEN = "untrusted-test-token-0123"
FLOOD = 3000  # control messages sent at once in the flood test (the burst)


@dataclass(frozen=True)
class Case:
    """One untrusted input.

    cls: its class, for tallies ("sdp", "json", "header", "preset", "control", "flood").
    name: what it is. route: "POST /whip", "POST /offer", ... or "control" (a message on
    a live camera session's data channel). body: the request body or the message, or a
    function of the real offers ({"send": a WHIP offer, "camera": a camera page's offer}).
    headers: extra request headers (bytes values are sent as they are). token: run it
    on the server that has a token. repeat: how many times a control message is sent at
    once. expect: the HTTP status, or for a control message
    "error" (an error reply), "closed" (the session ends) or "dropped" (a flood: some
    messages are refused as too many, the session lives). mention: a word the error line must hold.
    """

    cls: str
    name: str
    route: str
    body: bytes | str | Callable[[dict], bytes | str] = b""
    headers: tuple[tuple[str, str | bytes], ...] = ()
    token: bool = False
    repeat: int = 1
    expect: int | str = 400
    mention: str = ""

    @property
    def key(self) -> str:
        return f"{self.cls}: {self.name}"


@dataclass
class Outcome:
    """What a case got: the HTTP status or the control outcome ("error", "ok", "closed",
    "dropped", "none"), the error line, whether the server logged a traceback, and
    whether it answered GET /stats with 200 afterwards."""

    result: int | str
    error: str
    traceback: bool
    serving: bool


# -- Building bad offers from a real one ------------------------------------------------------

def lines_without(prefix: str) -> Callable[[dict], str]:
    return lambda offers: "\r\n".join(x for x in offers["send"].split("\r\n") if not x.startswith(prefix))


def substituted(pattern: str, replacement: str, offer: str = "send", count: int = 0) -> Callable[[dict], str]:
    def make(offers: dict) -> str:
        changed = re.sub(pattern, replacement, offers[offer], count=count, flags=re.M)
        assert changed != offers[offer], pattern
        return changed
    return make


def fmtp_before_rtpmap(offers: dict) -> str:
    """The first fmtp line moved just above its payload type's rtpmap."""
    lines = offers["send"].split("\r\n")
    fmtp = next(i for i, x in enumerate(lines) if x.startswith("a=fmtp:"))
    pt = lines[fmtp].split(":")[1].split()[0]
    line = lines.pop(fmtp)
    rtpmap = next(i for i, x in enumerate(lines) if x.startswith(f"a=rtpmap:{pt} "))
    lines.insert(rtpmap, line)
    return "\r\n".join(lines)


def many_candidates(offers: dict) -> str:
    extra = "".join(f"a=candidate:{i} 1 udp 2130706431 192.0.2.{i % 250 + 1} {9000 + i} typ host\r\n"
                    for i in range(100))
    return offers["send"].replace("a=end-of-candidates", extra + "a=end-of-candidates")


def offer_json(offers: dict, **fields) -> str:
    return json.dumps({"sdp": offers["camera"], "type": "offer", **fields})


NESTED = "[" * 20_000 + "]" * 20_000  # 40 KB: under the body limit, far over Python's recursion limit
JSON = (("Content-Type", "application/json"),)
SDP = (("Content-Type", "application/sdp"),)

CASES = [
    # SDP offers (POST /whip; the same checks run for /offer and /whep)
    Case("sdp", "not SDP at all", "POST /whip", "hello, I am not SDP", SDP, mention="v=0"),
    Case("sdp", "no DTLS fingerprint", "POST /whip", lines_without("a=fingerprint"), SDP, mention="fingerprint"),
    Case("sdp", "fmtp before its rtpmap", "POST /whip", fmtp_before_rtpmap, SDP, mention="rtpmap"),
    Case("sdp", "fmtp for a payload type with no rtpmap", "POST /whip",
         substituted(r"^a=fmtp:\d+ ", "a=fmtp:120 ", count=1), SDP, mention="rtpmap"),
    Case("sdp", "no a=setup", "POST /whip", lines_without("a=setup"), SDP, mention="setup"),
    Case("sdp", "no ICE password", "POST /whip", lines_without("a=ice-pwd"), SDP, mention="ice-pwd"),
    Case("sdp", "md5 fingerprint", "POST /whip", substituted(r"^a=fingerprint:sha-256", "a=fingerprint:md5"), SDP,
         mention="fingerprint"),
    Case("sdp", "payload type 300", "POST /whip", substituted(r"^(m=video \S+ \S+) ", r"\1 300 "), SDP,
         mention="payload"),
    Case("sdp", "dynamic payload type without rtpmap", "POST /whip", lines_without("a=rtpmap:98 "), SDP,
         mention="98"),
    Case("sdp", "no rtcp-mux", "POST /whip", lines_without("a=rtcp-mux"), SDP, mention="rtcp-mux"),
    Case("sdp", "a NUL byte", "POST /whip", substituted(r"^s=-", "s=-\x00"), SDP, mention="control character"),
    Case("sdp", "100 ICE candidates", "POST /whip", many_candidates, SDP, mention="candidates"),
    Case("sdp", "garbage connection line", "POST /whip", substituted(r"^c=IN IP4 .*$", "c=IN IP9 x"), SDP),
    Case("sdp", "garbage extmap", "POST /whip", substituted(r"^a=extmap:1 ", "a=extmap:x y z "), SDP),
    Case("sdp", "not UTF-8", "POST /whip", b"v=0\r\n\xff\xfe", SDP, mention="UTF-8"),
    Case("sdp", "huge", "POST /whip", "v=0\r\n" + "a=x\r\n" * 20_000, SDP, expect=413),
    Case("sdp", "no fingerprint on /offer", "POST /offer",
         lambda o: json.dumps({"type": "offer", "sdp": "\r\n".join(
             x for x in o["camera"].split("\r\n") if not x.startswith("a=fingerprint"))}), JSON, mention="fingerprint"),
    # JSON bodies (POST /offer)
    Case("json", "not JSON", "POST /offer", "{sdp: nope", JSON, mention="JSON"),
    Case("json", "deeply nested array", "POST /offer", NESTED, JSON, mention="nested"),
    Case("json", "sdp nested in arrays", "POST /offer", lambda o: json.dumps({"sdp": [[[o["camera"]]]], "type": "offer"}),
         JSON, mention="nested"),
    Case("json", "a list, not an object", "POST /offer", "[1, 2, 3]", JSON, mention="sdp"),
    Case("json", "sdp is a number", "POST /offer", '{"sdp": 5, "type": "offer"}', JSON, mention="sdp"),
    Case("json", "unknown field", "POST /offer", lambda o: offer_json(o, colour="red"), JSON, mention="colour"),
    Case("json", "NaN", "POST /offer", '{"sdp": NaN, "type": "offer"}', JSON, mention="NaN"),
    Case("json", "a number past a float", "POST /offer", '{"sdp": 1e999, "type": "offer"}', JSON, mention="range"),
    Case("json", "not UTF-8", "POST /offer", b'{"sdp": "\xff"}', JSON, mention="UTF-8"),
    Case("json", "a charset nobody has", "POST /offer", "{}", (("Content-Type", "application/json; charset=x-nope"),),
         mention="sdp"),
    Case("json", "huge", "POST /offer", "x" * (security.MAX_BODY_BYTES + 1), JSON, expect=413),
    Case("json", "text/plain", "POST /offer", "{}", (("Content-Type", "text/plain"),), expect=415),
    Case("json", "name is a list", "POST /offer", lambda o: offer_json(o, name=["a"]), JSON, mention="name"),
    # Presets over the network: names from the list only, never a path
    Case("preset", "/etc/passwd on /offer", "POST /offer", lambda o: offer_json(o, preset="/etc/passwd"), JSON,
         mention="preset"),
    Case("preset", "../x.toml on /whip", "POST /whip?preset=../x.toml", lambda o: o["send"], SDP, mention="preset"),
    Case("preset", "a list on /offer", "POST /offer", lambda o: offer_json(o, preset=["ink-sketch"]), JSON,
         mention="preset"),
    Case("preset", "unknown name on /whip", "POST /whip?preset=no-such-look", lambda o: o["send"], SDP,
         mention="unknown preset"),
    # Headers: tokens, Host, Origin
    Case("header", "bearer token that is not UTF-8", "GET /stats", headers=(("Authorization", b"Bearer h\xc3\xa9\xff"),),
         token=True, expect=401),
    Case("header", "non-ASCII bearer token", "GET /stats", headers=(("Authorization", "Bearer tökén-ü" * 2),),
         token=True, expect=401),
    Case("header", "no token", "POST /whip", lambda o: o["send"], SDP, token=True, expect=401),
    Case("header", "token in the query, not the header", f"GET /stats?token={TOKEN}", token=True, expect=401),
    Case("header", "10 KB Authorization header", "GET /stats", headers=(("Authorization", "Bearer " + "x" * 10_000),),
         token=True, expect=400),
    Case("header", "Host not a loopback name", "GET /stats", headers=(("Host", "evil.example"),), expect=403,
         mention="Host"),
    Case("header", "another site's Origin", "GET /stats", headers=(("Origin", "https://evil.example"),), expect=403,
         mention="cross-origin"),
    # Control messages on a live camera session's data channel
    Case("control", "garbage text", "control", "hello?", expect="error", mention="JSON"),
    Case("control", "bytes that are not UTF-8", "control", b"\xff\xfe{}", expect="error", mention="UTF-8"),
    Case("control", "deeply nested array", "control", "[" * 2000 + "]" * 2000, expect="error", mention="nested"),
    Case("control", "nested arrays as a value", "control", '{"strength": [[[[[0.5]]]]]}', expect="error",
         mention="nested"),
    Case("control", "over the size limit", "control", json.dumps({"prompt": "x" * 5000}), expect="error",
         mention="bytes"),
    Case("control", "a list", "control", "[1, 2]", expect="error", mention="object"),
    Case("control", "strength is a string", "control", '{"strength": "high", "id": 1}', expect="error",
         mention="strength"),
    Case("control", "strength far out of range", "control", '{"strength": 1e308}', expect="error", mention="strength"),
    Case("control", "NaN strength", "control", '{"strength": NaN}', expect="error", mention="NaN"),
    Case("control", "unknown field", "control", '{"colour": "red"}', expect="error", mention="colour"),
    Case("control", "reset is a string", "control", '{"reset": "yes"}', expect="error", mention="reset"),
    Case("control", "preset /etc/passwd", "control", '{"preset": "/etc/passwd"}', expect="error",
         mention="not a preset name"),
    Case("control", "preset ../x.toml", "control", '{"preset": "../x.toml"}', expect="error",
         mention="not a preset name"),
    Case("control", "a ControlNet path", "control", '{"controls": {"/etc/passwd": 1}}', expect="error",
         mention="ControlNet"),
    Case("control", "a new ControlNet", "control", '{"controls": [{"net": "/tmp/x.safetensors", "scale": 1}]}',
         expect="error", mention="ControlNet"),
    Case("control", "a change before the token", "control", '{"strength": 0.5}', token=True, expect="error",
         mention="token"),
    Case("control", "a non-ASCII token", "control", '{"token": "t\\u00f6k\\ud800"}', token=True, expect="closed"),
    Case("control", "a token that is a list", "control", '{"token": ["x"]}', token=True, expect="closed"),
    Case("flood", "1000 changes at once", "control", '{"strength": 0.5}', repeat=1000, expect="dropped",
         mention="too many"),
    Case("flood", "1000 garbage messages at once", "control", "}{", repeat=1000, expect="dropped",
         mention="too many"),
]


# -- Running them ---------------------------------------------------------------------------

class Tracebacks(logging.Handler):
    """Counts log records that carry a traceback (log.exception, asyncio's unretrieved task errors)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.exc_text or "Traceback" in record.getMessage():
            self.count += 1


async def raw_request(url: str, method: str, path: str, body: bytes, headers: dict) -> tuple[int, str]:
    """One HTTP/1.1 request written by hand (headers may be raw bytes); its status and body."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    head = {"Host": f"{host}:{port}", "Content-Length": str(len(body)), "Connection": "close", **headers}
    lines = [f"{method} {path} HTTP/1.1".encode()]
    lines += [k.encode() + b": " + (v if isinstance(v, bytes) else v.encode()) for k, v in head.items()]
    writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
    response = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    status = int(response.split(b" ", 2)[1])
    return status, response.partition(b"\r\n\r\n")[2].decode("utf-8", "replace")


async def offers() -> dict:
    """Real aiortc offers: a WHIP sender's (send-only video) and a camera page's (video both ways, a channel)."""
    made = {}
    for key, direction in (("send", "sendonly"), ("camera", "sendrecv")):
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver(VideoStreamTrack() if direction == "sendrecv" else "video", direction=direction)
        if key == "camera":
            pc.createDataChannel("control")
        await pc.setLocalDescription(await pc.createOffer())
        made[key] = pc.localDescription.sdp
        await pc.close()
    return made


class Camera:
    """A live camera session on a server, with every message it gets on its channel."""

    def __init__(self, url: str, clip, token: str):
        self.client = CameraClient(url, SyntheticTrack(clip), token=token, authenticate_channel=False)
        self.messages: asyncio.Queue = asyncio.Queue()

    async def open(self) -> None:
        await self.client.connect()
        self.client.channel.on("message", lambda data: self.messages.put_nowait(json.loads(data)))
        await self.client.next_frame(30)  # the video flows before any case runs

    async def reply(self, timeout: float) -> dict | None:
        """The next message that is not a stats push, or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = await asyncio.wait_for(self.messages.get(), left)
            except asyncio.TimeoutError:
                return None
            if "stats" not in message:
                return message
        return None


async def control_case(app: App, camera: Camera, case: Case) -> tuple[str, str]:
    """Send a case's message (case.repeat times) on a live session; its outcome and error line."""
    data = case.body
    channel = camera.client.channel
    controller = app._controllers[camera.client.session]
    before = controller.counts["received"]
    for _ in range(case.repeat):
        channel.send(data)
    if case.cls == "flood":
        deadline = time.monotonic() + 60
        while controller.counts["received"] < before + case.repeat and time.monotonic() < deadline and \
                camera.client.session in app.sessions:
            await asyncio.sleep(0.1)  # until the flood has all arrived (slow on a busy machine)
        replies = []
        while (reply := await camera.reply(1.0)) is not None:
            replies.append(reply)
        dropped = [r["error"] for r in replies if "too many" in r.get("error", "")]
        if camera.client.session not in app.sessions:
            return "closed", f"the session ended: {app.close_reasons.get(camera.client.session)}"
        return ("dropped", dropped[0]) if dropped else ("none", "")
    reply = await camera.reply(5.0)
    await asyncio.sleep(0.2)  # a session being closed leaves the list at once
    if camera.client.session not in app.sessions:
        return "closed", (reply or {}).get("error", "")
    if reply is None:
        return "none", ""
    return ("ok", "") if reply.get("ok") else ("error", reply.get("error", ""))


async def run_cases(engine, cases: list[Case], clip) -> dict[str, Outcome]:
    """Run cases on loopback servers; an Outcome for each, by Case.key."""
    made = await offers()
    outcomes: dict[str, Outcome] = {}
    tracebacks = Tracebacks()
    logging.getLogger().addHandler(tracebacks)
    try:
        for token in (False, True):
            # A long idle timeout: the corpus is about refusals, and on a machine short of CPU the
            # flood cases (client and server in one process, sharing one event loop) can stall the
            # video for seconds; test_a_flood_of_control_messages... measures that stall.
            app = App(engine, ServerSettings(port=0, short_side=64, token=TOKEN if token else "", idle_timeout=30))
            app.close_reasons = {}  # session id -> why it ended, for outcomes that say so
            close = app.close_session

            async def recording_close(session, reason, close=close, app=app):
                app.close_reasons.setdefault(session.id, reason)
                await close(session, reason)
            app.close_session = recording_close
            auth = {"Authorization": f"Bearer {TOKEN}"} if token else {}
            async with listening(app) as url:
                camera = None
                for case in (c for c in cases if c.token == token):
                    before = tracebacks.count
                    if case.route == "control":
                        # A flood gets a session of its own: one flood's aftermath is not the next one's.
                        if camera is None or camera.client.session not in app.sessions or case.cls == "flood":
                            if camera is not None:
                                await camera.client.close()
                            camera = Camera(url, clip, TOKEN if token else "")
                            await camera.open()
                        result, error = await control_case(app, camera, case)
                    else:
                        method, path = case.route.split(" ", 1)
                        body = case.body(made) if callable(case.body) else case.body
                        body = body.encode() if isinstance(body, str) else body
                        headers = dict(case.headers)
                        if token and case.expect != 401:
                            headers = {**auth, **headers}
                        result, text = await raw_request(url, method, path, body, headers)
                        try:
                            error = json.loads(text)["error"] if "\n" not in text.strip() else text
                        except (ValueError, KeyError, TypeError):
                            error = text  # not one line of JSON: the test says so
                    status, _ = await raw_request(url, "GET", "/stats", b"", auth)
                    for key, session in list(app.sessions.items()):  # an offer that was accepted: not kept
                        if camera is None or key != camera.client.session:
                            await app.close_session(session, "case over")
                    outcomes[case.key] = Outcome(result, error, tracebacks.count > before, status == 200)
                if camera is not None:
                    await camera.client.close()
    finally:
        logging.getLogger().removeHandler(tracebacks)
    return outcomes


def run_case(engine, case: Case, clip) -> Outcome:
    """One case on fresh servers (run_cases runs many on the same ones)."""
    return asyncio.run(run_cases(engine, [case], clip))[case.key]


@pytest.fixture(scope="module")
def clip():
    return [f.to_ndarray(format="rgb24") for f in SyntheticSource("astronaut", (96, 64), fps=30, frames=15)]


@pytest.fixture(scope="module")
def outcomes(engine, clip):
    return asyncio.run(run_cases(engine, CASES, clip))


def test_the_corpus_is_wide():
    assert len(CASES) >= 20 and len({c.key for c in CASES}) == len(CASES)
    assert {"sdp", "json", "header", "preset", "control", "flood"} <= {c.cls for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c.key for c in CASES])
def test_untrusted_input_is_refused_cleanly(outcomes, case):
    outcome = outcomes[case.key]
    assert outcome.result == case.expect, outcome
    assert case.mention in outcome.error, outcome
    assert "\n" not in outcome.error.strip() and "Traceback" not in outcome.error
    assert not outcome.traceback, "the server logged a traceback"
    assert outcome.serving, "the server stopped answering /stats"


# -- Floods, connect timeouts, secrets ----------------------------------------------------------

# The flooding peer runs in a process of its own, as a browser would: in this one its
# aiortc stack (encoding, SCTP) would share the server's event loop and CPU.
FLOOD_CLIENT = """
import asyncio, json, sys, time
from livestyle.capture.sources import SyntheticSource
from livestyle.server.client import CameraClient, SyntheticTrack

async def main(url, count):
    clip = [f.to_ndarray(format="rgb24") for f in SyntheticSource("astronaut", (96, 64), fps=30, frames=15)]
    track = SyntheticTrack(clip)
    async with CameraClient(url, track) as client:
        await client.next_frame()
        print("flooding", flush=True)
        started = time.monotonic()
        returned = [client.receiver.frames]
        for i in range(count):
            client.channel.send(json.dumps({"strength": (i % 10) / 10, "id": -i}))
        for _ in range(2):  # during the flood, and the seconds after it
            await asyncio.sleep(3)
            returned.append(client.receiver.frames)
        reply = {}
        for _ in range(10):  # until the flood has drained and the bucket refilled
            try:
                reply = await client.control({"strength": 0.25}, timeout=5)
            except asyncio.TimeoutError:  # dropped, and past the rate of replies to drops
                continue
            if reply.get("ok"):
                break
            await asyncio.sleep(1)
        await asyncio.sleep(2)
        returned.append(client.receiver.frames)
        sent = sorted(t for t in track.sent.values() if started <= t <= started + 6)
        send_gap = max(b - a for a, b in zip(sent, sent[1:]))  # this process's own stall, if any
        print(json.dumps({"returned": returned, "reply": reply, "send_gap": send_gap}), flush=True)
        sys.stdin.readline()  # the server has read its counts

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def udp_receive_drops() -> int | None:
    """Datagrams this machine's kernel dropped for full socket buffers so far (Linux), or None."""
    try:
        lines = Path("/proc/net/snmp").read_text().splitlines()
        six = Path("/proc/net/snmp6").read_text().split()
    except OSError:
        return None
    names, values = [line.split() for line in lines if line.startswith("Udp:")]
    return int(values[names.index("RcvbufErrors")]) + int(six[six.index("Udp6RcvbufErrors") + 1])


def test_a_flood_of_control_messages_does_not_starve_the_video(engine):
    """3000 messages sent at once on the data channel: the session's video keeps coming
    in and going out during the flood and after it, and the channel answers again."""
    async def main():
        # The idle timeout is long so that the test measures the gap itself, below.
        app = App(engine, ServerSettings(port=0, short_side=64, idle_timeout=10))
        drops = udp_receive_drops()
        async with listening(app) as url:
            client = await asyncio.create_subprocess_exec(sys.executable, "-c", FLOOD_CLIENT, url, str(FLOOD),
                                                          stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                          stderr=asyncio.subprocess.PIPE)
            try:
                started = await asyncio.wait_for(client.stdout.readline(), 60)
                assert started.strip() == b"flooding", (await client.stderr.read()).decode()[-2000:]
                session = next(iter(app.sessions.values()))
                received, restyled = [], []  # input frames in, restyled frames out, every 0.25 s
                started = time.monotonic()
                while time.monotonic() - started < 6:  # the flood and the seconds after it
                    await asyncio.sleep(0.25)
                    received.append((time.monotonic(), session.frames_received))
                    restyled.append(session.stats()["frames_out"])
                line = await asyncio.wait_for(client.stdout.readline(), 120)
                assert line, (await client.stderr.read()).decode()[-2000:]  # the client failed: why
                result = json.loads(line)
                counts = app.session_stats(session)["control"]
                client.stdin.write(b"\n")
                await asyncio.wait_for(client.wait(), 30)
            finally:
                if client.returncode is None:
                    client.kill()
                await client.wait()
        if drops is not None:
            drops = udp_receive_drops() - drops
        return received, restyled, result["returned"], result["reply"], result["send_gap"], drops, counts

    received, restyled, returned, reply, send_gap, drops, counts = asyncio.run(main())
    assert reply["ok"] and reply["settings"]["strength"] == 0.25  # the session lived, its channel answers
    assert returned[-1] > returned[0], returned
    # The video kept flowing: the longest time without an input frame stays under the
    # default idle timeout (after which the watchdog ends a session: what the flood did
    # before) unless the flooding process itself stopped sending that long; the server
    # restyled frames in the 3 s of the flood and in the 3 s after, and they reached the
    # peer. All of it only if the kernel dropped no datagrams meanwhile (the count is the
    # machine's): on a machine short of CPU, Python's aiortc reads its sockets late and
    # loses video packets, flood or not, and the decoder then waits for a keyframe.
    arrivals = [t for (t, n), (_, before) in zip(received[1:], received) if n > before]
    gaps = [b - a for a, b in zip([received[0][0]] + arrivals, arrivals + [received[-1][0]])]
    if not drops:
        assert max(gaps) < max(ServerSettings().idle_timeout, send_gap + 0.5), (send_gap, received)
        assert restyled[11] > restyled[0] and restyled[-1] > restyled[11], restyled
        assert all(b > a for a, b in zip(returned, returned[1:])), returned
    assert counts["received"] > FLOOD and counts["dropped"] > FLOOD // 2
    assert counts["applied"] + counts["dropped"] + counts["refused"] == counts["received"]


def test_peers_that_never_connect_or_never_send_free_their_slots_within_the_connect_timeout(engine):
    """A valid offer whose peer closes without ever connecting, and a peer that connects but
    never sends a frame: both slots are free again within ServerSettings.connect_timeout
    (5 s) and a watchdog round, so offers alone cannot keep the server full."""
    async def offer(pc: RTCPeerConnection, url: str) -> tuple[int, dict]:
        pc.createDataChannel("control")
        await pc.setLocalDescription(await pc.createOffer())
        body = json.dumps({"sdp": pc.localDescription.sdp, "type": "offer"}).encode()
        status, text = await raw_request(url, "POST", "/offer", body, {"Content-Type": "application/json"})
        return status, json.loads(text)

    async def main():
        app = App(engine, ServerSettings(port=0, short_side=64, max_sessions=2))
        async with listening(app) as url:
            vanishing = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            vanishing.addTransceiver(VideoStreamTrack(), direction="sendrecv")
            silent = RTCPeerConnection(RTCConfiguration(iceServers=[]))
            silent.addTransceiver("video", direction="sendrecv")  # no track: connects, sends nothing
            (status, _), (silent_status, answer) = await offer(vanishing, url), await offer(silent, url)
            posted = time.monotonic()
            await vanishing.close()  # gone without a word
            await silent.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
            full, _ = await raw_request(url, "POST", "/offer", json.dumps(  # a third: the server is full
                {"sdp": vanishing.localDescription.sdp, "type": "offer"}).encode(), {"Content-Type": "application/json"})
            connected = False
            while app.sessions and time.monotonic() - posted < 10:
                await asyncio.sleep(0.05)
                connected = connected or silent.connectionState == "connected"
            freed = time.monotonic() - posted
            await silent.close()
            return (status, silent_status, full), connected, freed, len(app.sessions)

    assert ServerSettings().connect_timeout == 5.0
    statuses, connected, freed, left = asyncio.run(main())
    assert statuses == (200, 200, 503) and connected and left == 0
    assert freed < 5.0 + 0.5 + 0.5, freed  # the timeout, a watchdog round, slack for a loaded machine


def test_the_token_never_reaches_the_log(engine, clip, caplog):
    """A session with a token, the channel's token message, wrong and malformed tokens: no
    log line (at any level, from any library) holds the token."""
    async def main():
        app = App(engine, ServerSettings(port=0, short_side=64, token=TOKEN))
        async with listening(app) as url:
            async with CameraClient(url, SyntheticTrack(clip), token=TOKEN) as client:
                await client.next_frame()
                await client.control({"strength": 0.5})
                await client.control({"preset": "/etc/passwd", "token": TOKEN})
            for header in (f"Bearer {TOKEN}x", f"Bearer {TOKEN}\xff", "Bearer " + TOKEN * 400):
                await raw_request(url, "GET", "/stats", b"", {"Authorization": header.encode("latin-1", "replace")})
            await raw_request(url, "GET", f"/stats?token={TOKEN}", b"", {})
            wrong = CameraClient(url, SyntheticTrack(clip), token=TOKEN, authenticate_channel=False)
            await wrong.connect()
            wrong.channel.send(json.dumps({"token": TOKEN[::-1]}))
            await asyncio.sleep(0.5)
            await wrong.close()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(main())
    assert len(caplog.records) > 20  # the log was listening
    leaks = [r.getMessage() for r in caplog.records if TOKEN in r.getMessage() or TOKEN in (r.exc_text or "")]
    assert not leaks, leaks[:3]
