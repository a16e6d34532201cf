"""WHIP ingest (RFC 9725) and WHEP playback, the HTTP side of OBS and of players.

    POST   /whip[?preset=P&name=N]   application/sdp offer -> 201, answer, Location: /whip/ID
    DELETE /whip/ID                   ends the session -> 200
    PATCH  /whip/ID                   405: no trickle ICE or ICE restart (candidates are in the SDP)
    POST   /whep?session=KEY          (or /whep/KEY) a receive-only offer -> 201, Location: /whep/VID
    DELETE /whep/VID                  stops that viewer -> 200
    OPTIONS on any of them            204 with Accept-Post (and CORS headers when the server has a token)

KEY is a session's secret id or the name its creator gave it (`?name=obs` on the WHIP
URL), so an OBS Browser Source on /view?session=obs finds the stream again after OBS
restarts. Errors: 400 malformed SDP or bad preset, 401 token, 404 no such session or
resource, 409 name in use, 413 body too large, 415 not application/sdp, 503 full; the
body of each is one line of JSON, {"error": "..."} (App._guard writes it).
The server gathers its candidates before answering (no trickle), and offers ICE
servers in Link headers only when --ice-server configured some.
"""

from __future__ import annotations

from aiohttp import web

from livestyle.server import security
from livestyle.server.app import App, Refused

SDP = "application/sdp"


def add_routes(router: web.UrlDispatcher, app: App) -> None:
    async def options(_request):  # answered by App._guard before it gets here
        return web.Response(status=204, headers={"Accept-Post": SDP})

    async def whip(request):
        sdp = await _read_sdp(request)
        session, answer = await app.open_session("whip", sdp, request.query.get("preset"), request.query.get("name"))
        return _created(app, f"/whip/{session.id}", answer)

    async def whip_delete(request):
        session = app.sessions.get(request.match_info["id"])  # the secret id only, never a name
        if session is None or session.kind != "whip":
            raise Refused(404, "no such WHIP session")
        await app.close_session(session, "the sender ended it (DELETE)")
        return web.Response(status=200)

    async def whip_patch(request):
        if app.sessions.get(request.match_info["id"]) is None:
            raise Refused(404, "no such WHIP session")
        raise Refused(405, "this server supports neither trickle ICE nor ICE restarts", {"Allow": "DELETE, OPTIONS"})

    async def whep(request):
        key = request.match_info.get("key") or request.query.get("session", "")
        session = app.find(key)
        if session is None:
            raise Refused(404, "no such session (yet): check ?session=")
        sdp = await _read_sdp(request)
        viewer, answer = await app.open_viewer(session, sdp)
        return _created(app, f"/whep/{viewer.id}", answer)

    async def whep_delete(request):
        viewer = app.find_viewer(request.match_info["key"])
        if viewer is None:
            raise Refused(404, "no such WHEP viewer")
        await viewer.close("the player ended it (DELETE)")
        return web.Response(status=200)

    router.add_post("/whip", whip)
    router.add_route("OPTIONS", "/whip", options)
    router.add_delete("/whip/{id}", whip_delete)
    router.add_patch("/whip/{id}", whip_patch)
    router.add_route("OPTIONS", "/whip/{id}", options)
    router.add_post("/whep", whep)
    router.add_post("/whep/{key}", whep)
    router.add_route("OPTIONS", "/whep", options)
    router.add_delete("/whep/{key}", whep_delete)
    router.add_route("OPTIONS", "/whep/{key}", options)


async def _read_sdp(request: web.Request) -> str:
    """The body as SDP text; raises Refused for the wrong type, size or encoding."""
    if request.content_type != SDP:
        raise Refused(415, f"send the offer as {SDP}")
    body = await request.read()  # aiohttp refuses bodies over client_max_size with 413
    if len(body) > security.MAX_SDP_BYTES:
        raise Refused(413, f"SDP over {security.MAX_SDP_BYTES} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(400, "the SDP is not UTF-8 text") from None


def _created(app: App, location: str, answer: str) -> web.Response:
    headers = {"Location": location}
    links = []
    for server in app.ice_servers:
        link = f'<{server.urls}>; rel="ice-server"'
        if server.username:
            link += f'; username="{server.username}"; credential="{server.credential}"; credential-type="password"'
        links.append(link)
    if links:
        headers["Link"] = ", ".join(links)
    return web.Response(status=201, body=answer.encode(), content_type=SDP, headers=headers)
