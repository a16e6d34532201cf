"""The server: one App object holding the engine, the settings and the sessions; its routes.

    GET  /               the camera page            (static, no token needed)
    GET  /view           the viewer page (WHEP), for an OBS Browser Source
    GET  /static/NAME    the pages' scripts and styles, from the package's static/ folder
    GET  /config         what a page needs: ICE servers, the model's styles, the default preset, the ControlNets
    GET  /presets        the presets a client may pick
    GET  /stats          sessions (fps, latency, dropped, skipped) and the engine's load
    POST /offer          JSON {sdp, type: "offer", preset?, name?} -> {sdp, type: "answer", session}
    POST /whip ...       WHIP ingest and WHEP playback: see whip.py

Every route but the pages needs the bearer token when the server has one (security.py).
Every refusal is an HTTP status and one line of JSON, {"error": "..."}, logged as one
line; an offer's SDP is checked before aiortc reads it (sdp.py).
Media and model work never run on the event loop: frames move between aiortc and the
engine through latest-frame slots (tracks.py), and engine calls that may take time run
on the default executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.exceptions import InvalidAccessError, InvalidStateError, OperationError

from livestyle.config import (
    DEFAULT_PRESET, MAX_CONTROLS, Control, PresetError, StreamSettings, find_preset, preset_files, processing_size,
)
from livestyle.errors import LivestyleError
from livestyle.server import security
from livestyle.server.controls import ControlError, Controller, controls_list, preset_by_name, shown
from livestyle.server.sdp import PARSE_ERRORS, OfferError, check_offer
from livestyle.server.sessions import Session, Viewer
from livestyle.server.tracks import drain, install_encoder

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
PAGES = {"/": "index.html", "/view": "view.html"}
STATIC_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*\.(?:html|js|css|svg)")
SESSION_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
ICE_SCHEMES = ("stun", "stuns", "turn", "turns")
WATCH_INTERVAL = 0.5  # seconds between the watchdog's rounds
# What aiortc raises when an offer that passed check_offer still does not suit it.
SDP_ERRORS = PARSE_ERRORS + (InvalidAccessError, InvalidStateError, OperationError)
OFFER_KEYS = ("sdp", "type", "preset", "name")
DEFAULT_INPUT = (640, 480)  # the processing size's aspect until a session's first frame arrives


@dataclass(frozen=True)
class ServerSettings:
    """How the server runs; built once by `livestyle serve`.

    host/port: where it listens; a non-loopback host needs a token (security.check_bind).
    token: the bearer token ("" = none). max_sessions: concurrent streams on the engine.
    preset: the look a session starts with. short_side: the processing size's short side
    in pixels (multiple of 8; the aspect follows each session's video). bitrate: the
    restyled video's encoder ceiling, bits per second. ice_servers: STUN/TURN URLs, none
    by default (host candidates only). idle_timeout: seconds without video (or, for a
    viewer, without receiver reports) after which a peer counts as gone.
    connect_timeout: seconds a new peer has to start sending. max_viewers: WHEP viewers per session.
    controls: the ControlNets every session streams with (a session's preset does not
    change them); a client may change their scales (control messages), never add one.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    token: str = ""
    max_sessions: int = 4
    preset: str = DEFAULT_PRESET
    short_side: int = 256
    bitrate: int = 4_000_000
    ice_servers: tuple[str, ...] = ()
    idle_timeout: float = 3.0
    connect_timeout: float = 5.0
    max_viewers: int = 4
    controls: tuple[Control, ...] = ()

    def __post_init__(self):
        security.check_bind(self.host, self.token)
        if len(self.controls) > MAX_CONTROLS:
            raise LivestyleError(f"--control: {len(self.controls)} ControlNets (at most {MAX_CONTROLS})")
        if not 0 <= self.port <= 65535:
            raise LivestyleError(f"--port {self.port}: must be 0 to 65535 (0: any free port)")
        if not 1 <= self.max_sessions <= 64:
            raise LivestyleError(f"--max-sessions {self.max_sessions}: must be 1 to 64")
        if self.short_side < 8 or self.short_side % 8:
            raise LivestyleError(f"--short-side {self.short_side}: must be a positive multiple of 8")
        if not 100_000 <= self.bitrate <= 50_000_000:
            raise LivestyleError(f"--bitrate {self.bitrate}: must be 100000 to 50000000 bits per second")
        if self.idle_timeout <= 0 or self.connect_timeout <= 0:
            raise LivestyleError("timeouts must be positive")
        for url in self.ice_servers:
            ice_server(url)


def ice_server(url: str) -> RTCIceServer:
    """`stun:host:port`, or `turn:user:password@host:port?transport=udp` -> RTCIceServer."""
    scheme, _, rest = url.partition(":")
    if scheme not in ICE_SCHEMES or not rest:
        raise LivestyleError(f"--ice-server {url!r}: expected stun:HOST[:PORT] or turn:USER:PASSWORD@HOST[:PORT]")
    credentials, at, host = rest.rpartition("@")
    if not at:
        return RTCIceServer(urls=url)
    username, _, password = credentials.partition(":")
    return RTCIceServer(urls=f"{scheme}:{host}", username=username, credential=password)


class Refused(Exception):
    """A request the server turns down: an HTTP status, a one-line reason, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


class App:
    """The server's state: the engine, its settings, the sessions by secret id.

    engine: a livestyle.stream.engine.Engine (or anything with its interface); the App
    uses it, the caller owns it (and closes it after the server stops).
    """

    def __init__(self, engine, settings: ServerSettings = ServerSettings()):
        self.engine = engine
        self.settings = settings
        self.preset = find_preset(settings.preset)  # a bad --preset fails before the server starts
        self.ice_servers = [ice_server(url) for url in settings.ice_servers]
        self.sessions: dict[str, Session] = {}
        self._controllers: dict[str, Controller] = {}  # by session id: camera sessions' control channels
        self.sessions_failed = 0  # sessions ended by a failure of their own (Session.failure)
        self._tasks: set[asyncio.Task] = set()

    # -- The aiohttp application -----------------------------------------------------------

    def web_app(self) -> web.Application:
        from livestyle.server import whip

        app = web.Application(client_max_size=security.MAX_BODY_BYTES, middlewares=[self._guard])
        app.router.add_get("/", self.page)
        app.router.add_get("/view", self.page)
        app.router.add_get("/static/{name}", self.static)
        app.router.add_get("/config", self.config)
        app.router.add_get("/presets", self.presets)
        app.router.add_get("/stats", self.stats)
        app.router.add_post("/offer", self.offer)
        whip.add_routes(app.router, self)
        app.on_startup.append(self._startup)
        app.on_shutdown.append(self._shutdown)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        """Host check, token, same-origin rule and body size, before any handler runs; then
        every refusal or failure as a status and one line of JSON, logged as one line."""
        cors = security.cors_headers(request, self.settings.token)
        what = f"{request.method} {request.path[:80]!r}"  # repr: a path cannot break the log line
        try:
            self._admit(request)
            if request.method == "OPTIONS":  # CORS preflight: browsers send it without credentials
                response = web.Response(status=204, headers={"Accept-Post": "application/sdp"})
            else:
                response = await handler(request)
        except Refused as e:
            log.info("%s refused (%d): %s", what, e.status, e)
            response = web.json_response({"error": str(e)}, status=e.status, headers=e.headers)
        except web.HTTPException as e:  # aiohttp's own: no such route, method not allowed, body too large
            if e.status < 400:
                e.headers.update(cors)
                raise
            log.info("%s refused (%d): %s", what, e.status, e.reason)
            headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "www-authenticate")}
            response = web.json_response({"error": (e.text or e.reason).strip().splitlines()[0]}, status=e.status,
                                         headers=headers)
        except Exception as e:  # a bug, not the request: the traceback is for whoever fixes it
            log.exception("%s failed", what)
            response = web.json_response({"error": f"internal error ({type(e).__name__})"}, status=500)
        response.headers.update(cors)
        return response

    def _admit(self, request: web.Request) -> None:
        """Raise Refused unless the request may reach a handler (see security.py)."""
        token = self.settings.token
        if not token and not security.host_allowed(request):
            raise Refused(403, f"Host {shown(request.host)} is not a loopback name: a server reached under "
                               "another name needs --token")
        if request.method == "OPTIONS":
            return
        public = request.method in ("GET", "HEAD") and (request.path in PAGES or request.path.startswith("/static/"))
        if not public:
            if token and not security.token_matches(security.bearer(request), token):
                raise Refused(401, "a bearer token is required (Authorization: Bearer ...)",
                              {"WWW-Authenticate": 'Bearer realm="livestyle"'})
            if not token and not security.same_origin(request):
                raise Refused(403, "cross-origin requests need a server with --token")
        if (request.content_length or 0) > security.MAX_BODY_BYTES:
            raise Refused(413, f"request body over {security.MAX_BODY_BYTES} bytes")

    async def _startup(self, _app) -> None:
        self._spawn(self._watch())

    async def _shutdown(self, _app) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(self.close_session(s, "server shutting down") for s in list(self.sessions.values())))

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- Pages and static files -------------------------------------------------------------

    async def page(self, request: web.Request) -> web.StreamResponse:
        return self._file(PAGES[request.path])

    async def static(self, request: web.Request) -> web.StreamResponse:
        return self._file(request.match_info["name"])

    def _file(self, name: str) -> web.StreamResponse:
        """A file from the package's static/ folder only: a plain name, no paths, no links."""
        path = STATIC / name
        if not STATIC_NAME.fullmatch(name) or not path.is_file() or path.is_symlink():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers=security.PAGE_HEADERS)

    # -- The JSON API ---------------------------------------------------------------------------

    async def config(self, _request: web.Request) -> web.Response:
        servers = [{"urls": s.urls, **({"username": s.username, "credential": s.credential} if s.username else {})}
                   for s in self.ice_servers]
        return web.json_response({
            "family": self.engine.family, "styles": list(self.engine.styles), "default_preset": self.preset.name,
            "ice_servers": servers, "max_sessions": self.settings.max_sessions, "bitrate": self.settings.bitrate,
            "controls": controls_list(self.settings.controls),
        })

    async def presets(self, _request: web.Request) -> web.Response:
        presets, errors = [], []
        for name in preset_files():
            try:
                p = find_preset(name)
            except PresetError as e:  # a broken user preset: say so, list the rest
                errors.append(str(e))
                continue
            presets.append({"name": p.name, "description": p.description, "model": p.model, "style": p.style,
                            "prompt": p.prompt, "negative": p.negative, "strength": p.strength, "steps": p.steps,
                            "seed": p.seed, "temporal": p.temporal})
        return web.json_response({"default": self.preset.name, "presets": presets, "errors": errors,
                                  "family": self.engine.family, "styles": list(self.engine.styles)})

    async def stats(self, _request: web.Request) -> web.Response:
        return web.json_response({
            "engine": self.engine.stats(),
            "max_sessions": self.settings.max_sessions,
            "sessions_failed": self.sessions_failed,
            "sessions": [self.session_stats(s) for s in self.sessions.values()],
        })

    async def offer(self, request: web.Request) -> web.Response:
        """The camera page's offer: video both ways and a `control` data channel."""
        if request.content_type != "application/json":
            raise Refused(415, "send JSON (Content-Type: application/json)")
        try:  # our own decoding: aiohttp's would trust the charset the client names
            data = security.load_json(await request.read(), security.MAX_BODY_BYTES)
        except security.InputError as e:
            raise Refused(400, f"the body: {e}") from None
        if not isinstance(data, dict) or data.get("type") != "offer" or not isinstance(data.get("sdp"), str):
            raise Refused(400, 'expected {"sdp": "...", "type": "offer"}')
        unknown = [k for k in data if k not in OFFER_KEYS]
        if unknown:
            raise Refused(400, f"unknown field {shown(unknown[0])} (known: {', '.join(OFFER_KEYS)})")
        session, answer = await self.open_session("camera", data["sdp"], data.get("preset"), data.get("name"))
        return web.json_response({"sdp": answer, "type": "answer", "session": session.id, "label": session.label})

    # -- Sessions ---------------------------------------------------------------------------------

    def session_stats(self, session: Session) -> dict:
        """A session's figures, with its control channel's message counts (camera sessions)."""
        controller = self._controllers.get(session.id)
        return {**session.stats(), "control": dict(controller.counts) if controller is not None else None}

    def rtc_configuration(self) -> RTCConfiguration:
        """ICE servers from --ice-server only: with none, no STUN or TURN server is contacted."""
        return RTCConfiguration(iceServers=list(self.ice_servers))

    def find(self, key: str) -> Session | None:
        """A session by its secret id or by the name its creator gave it."""
        session = self.sessions.get(key)
        if session is None and key:
            session = next((s for s in self.sessions.values() if s.name == key), None)
        return session

    async def open_session(self, kind: str, sdp: str, preset_name, name) -> tuple[Session, str]:
        """Negotiate a new session from a peer's offer; returns it and the answer SDP.

        kind: "camera" (sends and receives, control channel) or "whip" (sends only).
        Raises Refused: 400 bad offer or preset, 409 name taken, 413 too large, 503 full.
        """
        _check_sdp(sdp, "send")
        try:
            preset = self.preset if preset_name in (None, "") else preset_by_name(preset_name)
        except ControlError as e:
            raise Refused(400, str(e)) from None
        name = "" if name is None else name
        if name and (not isinstance(name, str) or not SESSION_NAME.fullmatch(name)):
            raise Refused(400, "a session name is 1 to 32 characters: a-z, 0-9, '-' and '_'")
        if name and any(s.name == name for s in self.sessions.values()):
            raise Refused(409, f"a session named {name!r} is live")
        if len(self.sessions) >= self.settings.max_sessions:
            raise Refused(503, f"the server is full ({self.settings.max_sessions} sessions, --max-sessions)")

        loop = asyncio.get_running_loop()
        session = Session(kind, RTCPeerConnection(self.rtc_configuration()), loop, name, self.settings.short_side)
        self.sessions[session.id] = session  # counted from now on, so concurrent offers cannot overfill
        try:
            settings = StreamSettings.from_preset(preset, processing_size(*DEFAULT_INPUT, self.settings.short_side),
                                                  controls=self.settings.controls)
            session.stream = await loop.run_in_executor(
                None, functools.partial(self.engine.open_stream, settings, session.fanout.push, live=True,
                                        scale_back=False))
            self._wire(session)
            try:
                await session.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            except SDP_ERRORS as e:
                raise Refused(400, f"unusable SDP offer ({type(e).__name__}: {str(e)[:80]})") from None
            session.transceiver = next(t for t in session.pc.getTransceivers() if t.kind == "video")
            if kind == "camera":
                session.pc.addTrack(session.own_track())
            await session.pc.setLocalDescription(await session.pc.createAnswer())
            if kind == "camera":
                install_encoder(session.transceiver, self.settings.bitrate)
        except LivestyleError as e:  # the engine refused the preset's settings
            await self.close_session(session, "could not start")
            raise Refused(400, str(e)) from None
        except BaseException:
            await self.close_session(session, "could not start")
            raise
        log.info("session %s (%s%s) started with preset %s", session.label, kind,
                 f" {name!r}" if name else "", preset.name)
        return session, session.pc.localDescription.sdp

    def _wire(self, session: Session) -> None:
        """The peer connection's events: video in, audio discarded, control channel, closing."""
        pc = session.pc

        @pc.on("track")
        def on_track(track):
            if track.kind == "video" and not session.ingesting:
                session.ingesting = True
                session.spawn(self._ingest(session, track))
            else:  # a WHIP sender's audio, a second video: not restyled, read so they cannot pile up
                session.spawn(drain(track))

        @pc.on("connectionstatechange")
        def on_state():
            if pc.connectionState in ("failed", "closed"):
                self._spawn(self.close_session(session, f"connection {pc.connectionState}"))

        @pc.on("datachannel")
        def on_channel(channel):
            if session.kind != "camera" or channel.label != "control" or session.channel is not None:
                channel.close()
                return
            session.channel = channel
            session.authorized = not self.settings.token
            controller = Controller(session, self.engine.family, tuple(self.engine.styles), self.settings.token,
                                    functools.partial(send, session),
                                    lambda: self._spawn(self.close_session(session, "wrong token on the control channel")))
            self._controllers[session.id] = controller
            channel.on("message", controller.receive)

    async def _ingest(self, session: Session, track) -> None:
        await session.ingest(track)
        await self.close_session(session, "its video ended")

    async def close_session(self, session: Session, reason: str) -> None:
        """End a session and free its resources (idempotent)."""
        if self.sessions.pop(session.id, None) is not None and session.failure is not None:
            self.sessions_failed += 1
        self._controllers.pop(session.id, None)
        await session.close(reason)

    def find_viewer(self, viewer_id: str) -> Viewer | None:
        return next((s.viewers[viewer_id] for s in self.sessions.values() if viewer_id in s.viewers), None)

    async def open_viewer(self, session: Session, sdp: str) -> tuple[Viewer, str]:
        """A WHEP viewer of `session` from its (receive-only) offer; returns it and the answer."""
        _check_sdp(sdp, "receive")
        if len(session.viewers) >= self.settings.max_viewers:
            raise Refused(503, f"session {session.label} has {self.settings.max_viewers} viewers already")
        viewer = Viewer(session, RTCPeerConnection(self.rtc_configuration()))
        session.viewers[viewer.id] = viewer
        pc = viewer.pc

        @pc.on("connectionstatechange")
        def on_state():
            if pc.connectionState in ("failed", "closed"):
                self._spawn(viewer.close(f"connection {pc.connectionState}"))

        @pc.on("track")
        def on_track(track):  # a viewer that sends media anyway: discard it
            self._spawn(drain(track))

        try:
            try:
                await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            except SDP_ERRORS as e:
                raise Refused(400, f"unusable SDP offer ({type(e).__name__}: {str(e)[:80]})") from None
            viewer.transceiver = next(t for t in pc.getTransceivers() if t.kind == "video")
            pc.addTrack(viewer.track)
            await pc.setLocalDescription(await pc.createAnswer())
            install_encoder(viewer.transceiver, self.settings.bitrate)
        except BaseException:
            await viewer.close("could not start")
            raise
        log.info("viewer of session %s started", session.label)
        return viewer, pc.localDescription.sdp

    async def _watch(self) -> None:
        """End sessions and viewers whose peer closed, failed or vanished; push stats to pages."""
        rounds = 0
        s = self.settings
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            rounds += 1
            now = time.monotonic()
            for session in list(self.sessions.values()):
                try:
                    reason = session.expired(now, s.idle_timeout, s.connect_timeout)
                    if reason:
                        self._spawn(self.close_session(session, reason))
                        continue
                    for viewer in list(session.viewers.values()):
                        reason = await viewer.expired(now, s.idle_timeout, s.connect_timeout)
                        if reason:
                            self._spawn(viewer.close(reason))
                    if rounds % 2 == 0 and session.authorized:
                        send(session, {"stats": self.session_stats(session)})
                except Exception:  # one session's trouble must not stop the watch over the others
                    log.exception("watching session %s", session.label)


def _check_sdp(sdp: str, wants: str) -> None:
    """check_offer, as the HTTP status to answer: 413 too large, 400 anything else wrong."""
    try:
        check_offer(sdp, wants)
    except OfferError as e:
        raise Refused(413 if len(sdp) > security.MAX_SDP_BYTES else 400, str(e)) from None


def send(session: Session, message: dict) -> None:
    """Send a JSON message on a session's control channel, if it is open."""
    channel = session.channel
    if channel is not None and channel.readyState == "open":
        channel.send(json.dumps(message))


class _HttpLog(logging.LoggerAdapter):
    """aiohttp's log for malformed requests (a header over 8190 bytes, a bad request line):
    it logs them with a traceback, and the text can quote a header. They are the client's
    errors, so one line naming the error's type, no traceback, no header."""

    def exception(self, msg, *args, exc_info=True, **kwargs):
        if isinstance(exc_info, HttpProcessingError):
            self.info("malformed request refused (%d %s)", exc_info.code, type(exc_info).__name__)
        else:
            super().exception(msg, *args, exc_info=exc_info, **kwargs)


@contextlib.asynccontextmanager
async def listening(app: App):
    """The server listening on its settings' host and port (0: any free port); yields its URL."""
    runner = web.AppRunner(app.web_app(), access_log=None, logger=_HttpLog(log, {}))
    await runner.setup()
    try:
        await web.TCPSite(runner, app.settings.host, app.settings.port).start()
        port = runner.addresses[0][1]
        host = app.settings.host
        yield f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    finally:
        await runner.cleanup()


async def serve(app: App, ready=None) -> None:
    """Run the server until cancelled. ready(url) is called once it listens."""
    async with listening(app) as url:
        if ready is not None:
            ready(url)
        await asyncio.Event().wait()
