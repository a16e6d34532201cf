"""Fuzzing the server's untrusted edges with hypothesis, on a small budget: SDP offers
(mutated from real aiortc offers) through check_offer and through the /whip and /offer
handlers, and control messages (any JSON value, any bytes) through the parser and the
settings check. Each must end in a clean refusal or a valid result, never a 500, an
exception out of the parser, or a traceback in the log."""

import asyncio
import json
import logging

import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiortc import RTCConfiguration, RTCPeerConnection, VideoStreamTrack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livestyle.config import StreamSettings, find_preset, processing_size
from livestyle.errors import LivestyleError
from livestyle.server.app import App, ServerSettings
from livestyle.server.controls import KEYS, ControlError, changes_for, parse_message
from livestyle.server.sdp import OfferError, check_offer

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])
HANDLER_FUZZ = settings(FUZZ, max_examples=100)


async def _offers() -> list[str]:
    """Real offers: a WHIP sender's (send-only video), a camera page's (video both ways and a
    data channel), and one with audio too."""
    made = []
    for direction, audio, channel in (("sendonly", False, False), ("sendrecv", False, True), ("sendonly", True, False)):
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        if audio:
            pc.addTransceiver("audio", direction="sendonly")
        pc.addTransceiver(VideoStreamTrack() if direction == "sendrecv" else "video", direction=direction)
        if channel:
            pc.createDataChannel("control")
        await pc.setLocalDescription(await pc.createOffer())
        made.append(pc.localDescription.sdp)
        await pc.close()
    return made


OFFERS = asyncio.run(_offers())

# Pieces a mutated line is made of: SDP's own vocabulary, numbers at the edges, junk.
TOKENS = st.sampled_from(["a=", "m=video", "m=audio", "m=application", "c=IN IP4", "rtpmap:", "fmtp:", "rtcp-fb:",
                          "fingerprint:", "sha-256", "setup:", "actpass", "ice-ufrag:", "ice-pwd:", "candidate:",
                          "extmap:", "mid:", "group:BUNDLE", "ssrc:", "rtcp-mux", "sendonly", "recvonly", " ", ":",
                          "/", "=", "*", "0", "96", "127", "128", "255", "65536", "-1", "99999999999999999999",
                          "UDP/TLS/RTP/SAVPF", "VP8/90000", "H264/90000", "rtx/90000", "apt=", "apt=x", "\t", "\r",
                          "é", "\x00", "\u2028"])
LINE = st.one_of(st.lists(TOKENS, max_size=8).map("".join), st.text(max_size=40))


@st.composite
def mutated_offer(draw) -> str:
    """A real offer with a few of its lines deleted, duplicated, moved, replaced or cut."""
    lines = draw(st.sampled_from(OFFERS)).split("\r\n")
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "move", "replace", "insert", "cut", "edit"]))
        if op == "delete" and len(lines) > 1:
            del lines[i]
        elif op == "duplicate":
            lines.insert(draw(st.integers(0, len(lines))), lines[i])
        elif op == "move":
            line = lines.pop(i)
            lines.insert(draw(st.integers(0, len(lines))), line)
        elif op == "replace":
            lines[i] = draw(LINE)
        elif op == "insert":
            lines.insert(i, draw(LINE))
        elif op == "cut":
            lines[i] = lines[i][: draw(st.integers(0, max(0, len(lines[i]) - 1)))]
        elif op == "edit" and lines[i]:
            j = draw(st.integers(0, len(lines[i]) - 1))
            lines[i] = lines[i][:j] + draw(LINE) + lines[i][j + 1:]
    return "\r\n".join(lines)


SDP_TEXT = st.one_of(mutated_offer(), st.text(max_size=300), st.just("v=0\r\n").map(lambda s: s + "m=video 9\r\n"))


@FUZZ
@given(sdp=SDP_TEXT, wants=st.sampled_from(["send", "receive"]))
def test_check_offer_refuses_cleanly_or_parses(sdp, wants):
    try:
        parsed = check_offer(sdp, wants)
    except OfferError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert any(m.kind == "video" for m in parsed.media)
    for media in parsed.media:  # what aiortc would otherwise trip over later, in a task
        assert media.dtls is not None and media.dtls.fingerprints and media.ice.usernameFragment


# -- Through the handlers ---------------------------------------------------------------------

class Tracebacks(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        if record.exc_info or record.exc_text:
            self.records.append(record)


@pytest.fixture(scope="module")
def server(engine):
    """A running server under aiohttp's test client, on its own event loop, and a log watch."""
    loop = asyncio.new_event_loop()
    app = App(engine, ServerSettings(port=0, short_side=64, max_sessions=64))

    async def start():
        client = TestClient(TestServer(app.web_app()))
        await client.start_server()
        return client

    client = loop.run_until_complete(start())
    tracebacks = Tracebacks()
    logging.getLogger().addHandler(tracebacks)
    yield loop, app, client, tracebacks
    logging.getLogger().removeHandler(tracebacks)
    loop.run_until_complete(client.close())
    loop.close()


async def _post(app, client, path, **kwargs) -> int:
    """POST; an accepted offer's session is closed at once (the fuzz is about the refusals)."""
    async with client.post(path, **kwargs) as response:
        status = response.status
        body = await response.text()
    if status >= 400:
        error = json.loads(body)["error"]  # every refusal is one line of JSON
        assert error and "\n" not in error
    for session in list(app.sessions.values()):
        await app.close_session(session, "fuzz")
    return status


@HANDLER_FUZZ
@given(sdp=SDP_TEXT)
def test_whip_never_answers_500(server, sdp):
    loop, app, client, tracebacks = server
    status = loop.run_until_complete(_post(app, client, "/whip", data=sdp.encode("utf-8", "surrogatepass"),
                                           headers={"Content-Type": "application/sdp"}))
    assert status in (201, 400, 413), status
    assert not tracebacks.records, tracebacks.records[0].getMessage()


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=12)


@HANDLER_FUZZ
@given(body=st.one_of(
    st.fixed_dictionaries({"sdp": mutated_offer(), "type": st.just("offer")},
                          optional={"preset": JSON_VALUES, "name": JSON_VALUES}).map(json.dumps),
    JSON_VALUES.map(json.dumps),
    st.binary(max_size=200)))
def test_offer_never_answers_500(server, body):
    loop, app, client, tracebacks = server
    data = body.encode() if isinstance(body, str) else body
    status = loop.run_until_complete(_post(app, client, "/offer", data=data,
                                           headers={"Content-Type": "application/json"}))
    assert status in (200, 400, 409, 413), status
    assert not tracebacks.records, tracebacks.records[0].getMessage()


# -- Control messages -------------------------------------------------------------------------

MESSAGES = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), JSON_VALUES, max_size=4).map(json.dumps),  # the keys we know, any values
    st.dictionaries(st.sampled_from(KEYS), st.one_of(st.floats(), st.integers(-2**70, 2**70), st.text(max_size=30)),
                    max_size=4).map(json.dumps),  # NaN and Infinity too
    JSON_VALUES.map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=200),
)


@FUZZ
@given(data=MESSAGES)
def test_control_messages_are_a_clean_refusal_or_a_valid_update(engine, data):
    base = StreamSettings.from_preset(find_preset("starry-night"), processing_size(64, 48, 64))
    try:
        changes = changes_for(parse_message(data), engine.family, tuple(engine.styles))
    except ControlError as e:
        assert str(e) and "\n" not in str(e)
        return
    try:  # what Stream.update does with them (without handing them to the engine's worker)
        engine.check(base.replace(**changes))
    except LivestyleError as e:
        assert str(e) and "\n" not in str(e)
