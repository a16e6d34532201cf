"""Who may talk to the server, and how much: the bind rule, bearer tokens, size limits, CORS.

The model: a server on a loopback address trusts the machine it runs on (like a
development server); one on any other address refuses to start without a token, and
then every route that is not a static page (the API, WHIP, WHEP) and the `control`
data channel need it. Tokens are compared in constant time. Pages are static files
from the package's own folder and carry no secrets: the token reaches them in the URL
fragment (`/#token=...`), which browsers never send to the server.

Two defences cover the loopback server without a token: requests whose Host header is
not a loopback name are refused (DNS rebinding: a web page whose name resolves to
127.0.0.1 would otherwise be same-origin with the server), and so are cross-origin
browser requests (another site's page must not read /stats or offer SDP).
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from urllib.parse import urlsplit

from aiohttp import web

from livestyle.errors import LivestyleError

MAX_SDP_BYTES = 64 * 1024  # an SDP offer with every codec and candidate is well under 16 KiB
MAX_BODY_BYTES = 64 * 1024  # any request body: JSON offers carry one SDP
MAX_CONTROL_BYTES = 4 * 1024  # one `control` data channel message
MIN_TOKEN_CHARS = 12
LOOPBACK_NAMES = ("localhost", "localhost.")


class SecurityError(LivestyleError):
    """A server configuration that would expose the server."""


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


def token_matches(given: str | None, token: str) -> bool:
    """Constant-time comparison of a presented token with the server's."""
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def bearer(request: web.Request) -> str | None:
    """The token of an `Authorization: Bearer T` header, or None."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def unauthorized() -> web.Response:
    return web.json_response({"error": "a bearer token is required (Authorization: Bearer ...)"}, status=401,
                             headers={"WWW-Authenticate": 'Bearer realm="livestyle"'})


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
