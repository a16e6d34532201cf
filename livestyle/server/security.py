"""Who may talk to the server, and how much: the bind rule, bearer tokens, size and JSON
limits, CORS.

The model: a server on a loopback address trusts the machine it runs on (like a
development server); one on any other address refuses to start without a token, and
then every route that is not a static page (the API, WHIP, WHEP) and the `control`
data channel need it. Tokens are compared in constant time, as bytes (a header that is
not UTF-8 is a wrong token, not an error), and never logged. Pages are static files
from the package's own folder and carry no secrets: the token reaches them in the URL
fragment (`/#token=...`), which browsers never send to the server.

Two defences cover the loopback server without a token: requests whose Host header is
not a loopback name are refused (DNS rebinding: a web page whose name resolves to
127.0.0.1 would otherwise be same-origin with the server), and so are cross-origin
browser requests (another site's page must not read /stats or offer SDP).

JSON from the network (offers, control messages) is parsed by load_json: sized first,
then refused if it is not UTF-8, holds NaN or a number beyond a float, or nests deeper
than our flat messages ever do.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import re
from urllib.parse import urlsplit

from aiohttp import web

from livestyle.errors import LivestyleError

MAX_SDP_BYTES = 64 * 1024  # an SDP offer with every codec and candidate is well under 16 KiB
MAX_BODY_BYTES = 64 * 1024  # any request body: JSON offers carry one SDP
MAX_CONTROL_BYTES = 4 * 1024  # one `control` data channel message
MAX_JSON_DEPTH = 4  # our messages are flat objects; deeper nesting is refused before it is looked at
MIN_TOKEN_CHARS = 12
LOOPBACK_NAMES = ("localhost", "localhost.")


class SecurityError(LivestyleError):
    """A server configuration that would expose the server."""


class InputError(LivestyleError):
    """A request or message from the network that the server refuses; says why in one line."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`; False for 0.0.0.0, :: and every other address."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def check_bind(host: str, token: str) -> None:
    """Raise SecurityError unless binding `host` is safe with this token ("" = none)."""
    if token and len(token) < MIN_TOKEN_CHARS:
        raise SecurityError(f"--token is {len(token)} characters: use at least {MIN_TOKEN_CHARS} "
                            "(python -c 'import secrets; print(secrets.token_urlsafe())')")
    if not token and not is_loopback(host):
        raise SecurityError(f"--host {host} is reachable from other machines: it needs --token "
                            "(or $LIVESTYLE_TOKEN); without one, bind 127.0.0.1 and use a tunnel")


def token_matches(given, token: str) -> bool:
    """Constant-time comparison of a presented token with the server's, as bytes.

    given: a header value (aiohttp keeps bytes that are not UTF-8 as surrogate escapes),
    a value from a JSON message (any type), or None. Anything but the token is False."""
    if not isinstance(given, str):
        return False
    try:
        presented = given.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): no token has one
        return False
    return hmac.compare_digest(presented, token.encode())


def bearer(request: web.Request) -> str | None:
    """The token of an `Authorization: Bearer T` header, or None."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


# -- JSON from the network ----------------------------------------------------------------------


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def _not_a_number(name: str):
    raise ValueError(f"{name} is not JSON")


def load_json(data: str | bytes, max_bytes: int, max_depth: int = MAX_JSON_DEPTH):
    """Parse JSON text from the network; raises InputError naming what is wrong.

    Refused: more than max_bytes (bytes counted as given; text as UTF-8 would be
    measured by its length), bytes that are not UTF-8, NaN and Infinity (not JSON, but
    Python's parser takes them), numbers beyond a float, and values nested deeper than
    max_depth (a scalar is depth 1, {"a": 1} depth 2): a deep array costs nothing to send
    and recursion to parse, print or compare."""
    if len(data) > max_bytes:
        raise InputError(f"JSON of {len(data)} bytes: at most {max_bytes}")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"not UTF-8 text (byte {e.start})") from None
    try:
        value = json.loads(data, parse_float=_finite, parse_constant=_not_a_number)
    except RecursionError:
        raise InputError(f"JSON nested more than {max_depth} deep") from None
    except ValueError as e:  # JSONDecodeError, a huge integer, NaN, 1e999
        raise InputError(f"not JSON: {str(e)[:80]}") from None
    level, depth = [value], 0
    while level:  # breadth first, without recursion
        depth += 1
        if depth > max_depth:
            raise InputError(f"JSON nested more than {max_depth} deep")
        level = [v for x in level if isinstance(x, (dict, list)) for v in (x.values() if isinstance(x, dict) else x)]
    return value


# -- CORS -----------------------------------------------------------------------------------

CORS_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST, DELETE, PATCH, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
    "Access-Control-Expose-Headers": "Location, Link, ETag, Accept-Post",
    "Access-Control-Max-Age": "600",
}


def same_origin(request: web.Request) -> bool:
    """True when the request carries no Origin (not a browser page) or our own one."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    return parts.netloc.lower() == request.host.lower()


def host_allowed(request: web.Request) -> bool:
    """Is the Host header a loopback name (the DNS-rebinding check for a token-less server)?"""
    host = request.host
    match = re.fullmatch(r"\[?([^\]]*?)\]?(:\d+)?", host)
    return bool(match) and is_loopback(match.group(1))


def cors_headers(request: web.Request, token: str) -> dict[str, str]:
    """CORS headers for an API response.

    With a token, any origin may call the API (WHIP/WHEP players on other sites): the
    bearer token, never a cookie, is what grants access. Without one, only our own pages.
    """
    if token and "Origin" in request.headers:
        return {"Access-Control-Allow-Origin": "*", **CORS_HEADERS}
    return {}


# -- Pages ------------------------------------------------------------------------------------

PAGE_HEADERS = {
    # Our own scripts and styles only; media from the camera and WebRTC (blob:/mediastream:).
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; media-src 'self' blob: mediastream:; img-src 'self' data:; "
                               "base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
