"""Checks on a peer's SDP offer before aiortc sees it.

aiortc trusts what it parses: some of its checks are asserts, an `fmtp` whose payload
type has no `rtpmap` raises StopIteration, and an offer without a DTLS fingerprint is
accepted by setRemoteDescription and then fails an assert in the task that connects.
An offer from the network is checked here first, for what a WebRTC offer must hold
(RFC 8866 syntax; RFC 8829, 8839 and 8842: ICE credentials, a fingerprint and a setup
role for every section, RTCP mux, codec lines that agree with the m= line), and
anything else is refused with one line that names the line or the section.

    check_offer(sdp, "send")      raises OfferError, else returns aiortc's parsed offer
"""

from __future__ import annotations

import re

from aiortc import sdp as aiortc_sdp

from livestyle.errors import LivestyleError
from livestyle.server.security import MAX_SDP_BYTES

MAX_SECTIONS = 8  # m= sections: video, audio, the data channel, with room to spare
MAX_CANDIDATES = 64  # per offer: each one is a connectivity check the server sends to that address
MEDIA = ("audio", "video")
LINE = re.compile(r"([a-z])=(.*)")
M_LINE = re.compile(r"m=(\S+) (\d+)(?:/\d+)? ([A-Za-z0-9/]+)((?: \S+)+)")
RTPMAP = re.compile(r"(\d+) ([^\s/]+)/(\d+)(?:/\d+)?")
FMTP = re.compile(r"(\d+) \S.*")
RTCP_FB = re.compile(r"(\*|\d+) \S.*")
FINGERPRINT = re.compile(r"(?i:sha-256|sha-384|sha-512) [0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){15,63}")
SETUP = ("actpass", "active", "passive")
CODEC_LINES = ("rtpmap", "fmtp", "rtcp-fb")
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
MID = re.compile(r"[A-Za-z0-9_.-]{1,32}")
ICE_CHARS = re.compile(r"[A-Za-z0-9+/]+")
# Characters str.splitlines() also breaks at (aiortc splits with it): only CRLF or LF may end a line.
STRAY = re.compile(r"[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f\x85\u2028\u2029]")
# What aiortc's parser raises on input it cannot read (some of its checks are asserts).
PARSE_ERRORS = (ValueError, KeyError, IndexError, TypeError, AttributeError, AssertionError, StopIteration)


class OfferError(LivestyleError):
    """An SDP offer the server refuses; the message names the problem."""


def check_offer(sdp: str, wants: str) -> aiortc_sdp.SessionDescription:
    """Raise OfferError unless `sdp` is a WebRTC offer with a video section that can
    `wants` ("send" to us, or "receive" from us); returns it parsed by aiortc."""
    size = len(sdp.encode("utf-8", "surrogatepass"))
    if size > MAX_SDP_BYTES:
        raise OfferError(f"SDP of {size} bytes: at most {MAX_SDP_BYTES}")
    if not sdp.startswith("v=0"):
        raise OfferError("not an SDP offer (it must start with v=0)")
    stray = STRAY.search(sdp)
    if stray:
        raise OfferError(f"SDP has a control character {stray.group()!r} at offset {stray.start()}")
    lines = [line.removesuffix("\r") for line in sdp.split("\n")]
    session, sections = _sections(lines)
    if len(sections) > MAX_SECTIONS:
        raise OfferError(f"the offer has {len(sections)} m= sections: at most {MAX_SECTIONS}")
    candidates = sum(1 for _, section in sections for line in section if line.startswith("a=candidate:"))
    if candidates > MAX_CANDIDATES:
        raise OfferError(f"the offer has {candidates} ICE candidates: at most {MAX_CANDIDATES}")
    shared = _attributes(session)
    for name in CODEC_LINES + ("mid",) + DIRECTIONS:
        if name in shared:
            raise OfferError(f"a={name} before the first m= line: it belongs in an m= section")
    mids = [_check_section(number, section, shared) for number, section in sections]
    if len(set(mids)) != len(mids):
        raise OfferError("two m= sections have the same a=mid")
    for group in shared.get("group", []):
        semantics, *members = group.split(" ")
        unknown = [m for m in members if m not in mids]
        if not semantics or not members or unknown:
            raise OfferError(f"a=group:{group[:40]} names {'no' if not unknown else 'an unknown'} "
                             f"m= section{f' ({unknown[0][:16]!r})' if unknown else ''}")
    try:
        parsed = aiortc_sdp.SessionDescription.parse(sdp)
    except PARSE_ERRORS as e:  # what the checks above let through and aiortc still cannot read
        raise OfferError(f"malformed SDP offer ({type(e).__name__}: {str(e)[:80]})") from None
    directions = {"send": ("sendrecv", "sendonly"), "receive": ("sendrecv", "recvonly")}[wants]
    if not any(m.kind == "video" and m.port != 0 and m.direction in directions for m in parsed.media):
        raise OfferError(f"the offer has no video section that can {wants} video")
    return parsed


def _sections(lines: list[str]) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The session's lines and each m= section's (line number, lines); blank lines are skipped."""
    session: list[str] = []
    sections: list[tuple[int, list[str]]] = []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        if not LINE.fullmatch(line):
            raise OfferError(f"SDP line {number} is not type=value: {line[:40]!r}")
        if line.startswith("m="):
            sections.append((number, [line]))
        elif sections:
            sections[-1][1].append(line)
        else:
            session.append(line)
    return session, sections


def _attributes(lines: list[str]) -> dict[str, list[str]]:
    """a=NAME[:VALUE] lines as NAME -> [VALUE, ...] ("" for a flag)."""
    found: dict[str, list[str]] = {}
    for line in lines:
        if line.startswith("a="):
            name, _, value = line[2:].partition(":")
            found.setdefault(name, []).append(value)
    return found


def _check_section(number: int, lines: list[str], shared: dict[str, list[str]]) -> str:
    """One m= section (starting at line `number`), with the session-level attributes it
    inherits; returns its mid."""
    m = M_LINE.fullmatch(lines[0])
    if not m:
        raise OfferError(f"SDP line {number}: m= line {lines[0][:60]!r} is not 'm=KIND PORT PROTO FORMATS'")
    kind, port, formats = m.group(1), int(m.group(2)), m.group(4).split()
    where = f"the {kind} section at line {number}"
    if port > 65535:
        raise OfferError(f"{where}: port {port} is over 65535")
    own = _attributes(lines[1:])
    attrs = {**shared, **own}  # a media-level attribute overrides the session's

    fingerprints = attrs.get("fingerprint", [])
    if not fingerprints:
        raise OfferError(f"{where} has no a=fingerprint (DTLS needs one)")
    for value in fingerprints:
        if not FINGERPRINT.fullmatch(value):
            raise OfferError(f"{where}: a=fingerprint:{value[:40]} is not sha-256/384/512 and hex pairs")
    setup = attrs.get("setup", [])
    if len(setup) != 1 or setup[0] not in SETUP:
        raise OfferError(f"{where} needs one a=setup (actpass, active or passive)")
    for name, low in (("ice-ufrag", 4), ("ice-pwd", 22)):
        values = attrs.get(name, [])
        if len(values) != 1 or not low <= len(values[0]) <= 256 or not ICE_CHARS.fullmatch(values[0]):
            raise OfferError(f"{where} needs one a={name} of {low} to 256 ICE characters")
    mid = own.get("mid", [])
    if len(mid) != 1 or not MID.fullmatch(mid[0]):
        raise OfferError(f"{where} needs one a=mid of 1 to 32 letters, digits, '.', '-' or '_'")
    if kind not in MEDIA:
        return mid[0]

    if sum(len(own.get(d, [])) for d in DIRECTIONS) != 1:
        raise OfferError(f"{where} needs one direction (a=sendrecv, sendonly, recvonly or inactive)")
    if "rtcp-mux" not in own:
        raise OfferError(f"{where} has no a=rtcp-mux (WebRTC multiplexes RTCP)")
    if not all(f.isdigit() and int(f) < 128 for f in formats):
        raise OfferError(f"{where}: the m= line's formats must be RTP payload types 0 to 127")
    # In order: a format's parameters follow its rtpmap, as every WebRTC stack writes them.
    mapped: set[int] = set()
    for line in lines[1:]:
        name, _, value = line[2:].partition(":")
        if not line.startswith("a=") or name not in CODEC_LINES:
            continue
        match = {"rtpmap": RTPMAP, "fmtp": FMTP, "rtcp-fb": RTCP_FB}[name].fullmatch(value)
        if name == "rtpmap":
            if not match or match.group(1) not in formats or int(match.group(3)) == 0:
                raise OfferError(f"{where}: a=rtpmap:{value[:40]} is not 'TYPE NAME/RATE' for a type of its m= line")
            if int(match.group(1)) in mapped:
                raise OfferError(f"{where}: payload type {match.group(1)} has two a=rtpmap lines")
            mapped.add(int(match.group(1)))
        elif not match:
            raise OfferError(f"{where}: a={name}:{value[:40]} is not 'TYPE PARAMETERS'")
        elif match.group(1) != "*" and int(match.group(1)) not in mapped:
            raise OfferError(f"{where}: a={name} for payload type {match.group(1)} comes before its a=rtpmap "
                             "(or it has none)")
    dynamic = [f for f in formats if int(f) >= 96 and int(f) not in mapped]
    if dynamic:
        raise OfferError(f"{where}: dynamic payload type {dynamic[0]} has no a=rtpmap")
    return mid[0]
