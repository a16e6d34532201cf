"""WHIP (RFC 9725) and WHEP as OBS and players speak them, the HTTP API's status codes and
headers, and the server's security rules (bind, token, host, origin, sizes, static files)."""

import asyncio
import re
import subprocess
import sys
import time

import aiohttp
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from livestyle.capture.sources import SyntheticSource
from livestyle.errors import LivestyleError
from livestyle.server import security
from livestyle.server.app import App, ServerSettings, check_offer, ice_server, listening
from livestyle.server.client import SyntheticTrack, whep_play, whip_publish

TOKEN = "s3cret-token-for-tests"
SDP = {"Content-Type": "application/sdp"}


@pytest.fixture(scope="module")
def clip():
    return [f.to_ndarray(format="rgb24") for f in SyntheticSource("astronaut", (96, 64), fps=30, frames=15)]


def server(engine, **settings) -> App:
    return App(engine, ServerSettings(port=0, short_side=64, **settings))


async def offer_sdp(direction: str, kind: str = "video") -> str:
    """A real aiortc offer: what OBS (sendonly) or a player (recvonly) would send."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver(kind, direction=direction)
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def bearer(token=TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_whip_ingest_and_whep_playback_by_name(engine, clip):
    async def main():
        app = server(engine)
        async with listening(app) as url, aiohttp.ClientSession() as http:
            async with http.options(f"{url}/whip") as r:
                preflight = r.status, r.headers.get("Accept-Post")
            sender, location = await whip_publish(url, SyntheticTrack(clip), query="?name=obs&preset=ink-sketch")
            session = next(iter(app.sessions.values()))
            viewer_pc, viewer_location, received = await whep_play(url, "obs")
            frame = await received.next_frame()
            viewer_count = len(session.viewers)
            stats = (await (await http.get(f"{url}/stats")).json())["sessions"][0]
            async with http.patch(url + location, data="a=candidate:x", headers={"Content-Type": "application/trickle-ice-sdpfrag"}) as r:
                patch = r.status
            async with http.delete(url + viewer_location) as r:
                viewer_deleted = r.status
            async with http.delete(url + viewer_location) as r:
                viewer_again = r.status
            viewers_after = len(session.viewers)
            async with http.delete(f"{url}/whip/obs") as r:  # a name is not a resource: only the secret Location
                by_name = r.status
            async with http.delete(url + location) as r:
                deleted = r.status
            async with http.delete(url + location) as r:
                again = r.status
            await asyncio.gather(sender.close(), viewer_pc.close())
        return (preflight, location, session, frame, viewer_count, viewer_location, stats, patch, viewer_deleted,
                viewer_again, viewers_after, by_name, deleted, again, len(app.sessions))

    (preflight, location, session, frame, viewer_count, viewer_location, stats, patch, viewer_deleted,
     viewer_again, viewers_after, by_name, deleted, again, left) = asyncio.run(main())
    assert preflight == (204, "application/sdp")
    assert location == f"/whip/{session.id}" and len(session.id) >= 20  # unguessable
    assert (frame.width, frame.height) == (96, 64) and viewer_count == 1
    assert viewer_location.startswith("/whep/") and session.id not in viewer_location
    assert stats["kind"] == "whip" and stats["name"] == "obs" and stats["settings"]["style"] == "ink-sketch"
    assert session.id not in str(stats)  # /stats never shows the secret
    assert patch == 405  # no trickle ICE, no ICE restart: RFC 9725 says 405
    assert (viewer_deleted, viewer_again, viewers_after) == (200, 404, 0)
    assert (by_name, deleted, again, left) == (404, 200, 404, 0)


def test_whip_and_whep_refuse_what_they_cannot_take(engine, clip):
    async def main():
        app = server(engine, max_sessions=1)
        codes = {}
        sendonly, recvonly, audio = await offer_sdp("sendonly"), await offer_sdp("recvonly"), \
            await offer_sdp("sendonly", "audio")
        broken = re.sub(r"m=video \d+ ", "m=video nine ", sendonly)
        assert broken != sendonly
        async with listening(app) as url, aiohttp.ClientSession() as http:
            async def post(path, body, headers=SDP):
                async with http.post(url + path, data=body, headers=headers) as r:
                    return r.status, r.headers.get("Content-Type", ""), await r.text()

            codes["garbage"] = await post("/whip", "hello, I am not SDP")
            codes["broken m-line"] = await post("/whip", broken)
            codes["audio only"] = await post("/whip", audio)
            codes["recvonly to whip"] = await post("/whip", recvonly)
            codes["not utf-8"] = await post("/whip", b"v=0\r\n\xff\xfe")
            codes["json to whip"] = await post("/whip", sendonly, {"Content-Type": "application/json"})
            codes["too large"] = await post("/whip", "v=0\r\n" + "a=x\r\n" * 20_000)
            codes["unknown preset"] = await post("/whip?preset=nope", sendonly)
            codes["bad name"] = await post("/whip?name=../../x", sendonly)
            codes["whep, no session"] = await post("/whep?session=nobody", recvonly)
            assert not app.sessions  # none of the above left a session behind
            sender, location = await whip_publish(url, SyntheticTrack(clip))
            codes["full"] = await post("/whip", sendonly)
            async with http.post(f"{url}/offer", json={"sdp": sendonly, "type": "offer"}) as r:
                codes["full /offer"] = r.status, "", (await r.json())["error"]
            codes["whep malformed"] = await post(f"/whep/{location.rsplit('/', 1)[1]}", "v=0\r\nm=video x\r\n")
            codes["whep sendonly"] = await post(f"/whep?session={location.rsplit('/', 1)[1]}", sendonly)
            async with http.delete(f"{url}/whip/not-a-session") as r:
                codes["delete unknown"] = r.status, "", ""
            await sender.close()
        return codes

    codes = asyncio.run(main())
    expected = {"garbage": 400, "broken m-line": 400, "audio only": 400, "recvonly to whip": 400, "not utf-8": 400,
                "json to whip": 415, "too large": 413, "unknown preset": 400, "bad name": 400,
                "whep, no session": 404, "full": 503, "full /offer": 503, "whep malformed": 400,
                "whep sendonly": 400, "delete unknown": 404}
    assert {k: v[0] for k, v in codes.items()} == expected, codes
    assert "no video" in codes["audio only"][2] and "--max-sessions" in codes["full"][2]


def test_a_second_live_session_cannot_take_a_name(engine, clip):
    async def main():
        app = server(engine)
        async with listening(app) as url:
            first, _ = await whip_publish(url, SyntheticTrack(clip), query="?name=cam")
            with pytest.raises(RuntimeError, match="409"):
                await whip_publish(url, SyntheticTrack(clip), query="?name=cam")
            await first.close()

    asyncio.run(main())


def test_token_is_needed_everywhere_but_the_pages(engine, clip):
    async def main():
        app = server(engine, token=TOKEN)
        sendonly = await offer_sdp("sendonly")
        results = {}
        async with listening(app) as url, aiohttp.ClientSession() as http:
            for method, path in [("GET", "/stats"), ("GET", "/presets"), ("GET", "/config"), ("POST", "/offer"),
                                 ("POST", "/whip"), ("POST", "/whep?session=x"), ("DELETE", "/whip/x")]:
                for name, headers in [("none", {}), ("wrong", bearer("s3cret-token-for-testz")),
                                      ("basic", {"Authorization": "Basic czNjcmV0"})]:
                    async with http.request(method, url + path, headers=headers) as r:
                        results[(path, name)] = r.status, r.headers.get("WWW-Authenticate")
            for path in ["/", "/view", "/static/camera.js", "/static/view.js", "/static/style.css"]:
                async with http.get(url + path) as r:
                    results[(path, "page")] = r.status, r.headers.get("Content-Security-Policy", "")
            async with http.post(f"{url}/whip", data=sendonly, headers={**SDP, **bearer(),
                                                                        "Origin": "https://obs.example"}) as r:
                results["whip with token"] = r.status, r.headers.get("Access-Control-Allow-Origin")
                location = r.headers["Location"]
            async with http.delete(url + location, headers=bearer()) as r:
                results["delete with token"] = r.status, None
            async with http.options(f"{url}/whep", headers={"Origin": "https://player.example"}) as r:
                results["preflight"] = r.status, r.headers.get("Access-Control-Allow-Headers", "")
        return results

    results = asyncio.run(main())
    for key, (status, header) in results.items():
        if key[1] in ("none", "wrong", "basic"):
            assert status == 401 and header.startswith("Bearer"), (key, status)
        elif key[1] == "page":
            assert status == 200 and "script-src 'self'" in header, key
    assert results["whip with token"] == (201, "*")
    assert results["delete with token"][0] == 200
    assert results["preflight"][0] == 204 and "Authorization" in results["preflight"][1]


def test_a_server_without_token_answers_only_its_own_pages_on_loopback_names(engine):
    async def main():
        app = server(engine)
        results = {}
        async with listening(app) as url, aiohttp.ClientSession() as http:
            port = url.rsplit(":", 1)[1]
            for name, headers in [("rebound host", {"Host": f"evil.example:{port}"}),
                                  ("other origin", {"Origin": "https://evil.example"}),
                                  ("own origin", {"Origin": f"http://127.0.0.1:{port}"}),
                                  ("localhost", {"Host": f"localhost:{port}"})]:
                async with http.get(f"{url}/stats", headers=headers) as r:
                    results[name] = r.status, r.headers.get("Access-Control-Allow-Origin")
            async with http.post(f"{url}/offer", data="{}", headers={"Content-Type": "text/plain"}) as r:
                results["text/plain offer"] = r.status, None
            async with http.post(f"{url}/offer", data="x" * (security.MAX_BODY_BYTES + 1),
                                 headers={"Content-Type": "application/json"}) as r:
                results["huge offer"] = r.status, None
            for path in ["/static/../app.py", "/static/%2e%2e%2fapp.py", "/static/app.py", "/static/missing.js",
                         "/static/.hidden.js", "/static/index.html"]:
                async with http.get(url + path) as r:
                    results[path] = r.status, None
        return results

    results = asyncio.run(main())
    assert results["rebound host"][0] == 403 and results["other origin"][0] == 403  # DNS rebinding, CSRF
    assert results["own origin"] == (200, None) and results["localhost"][0] == 200  # and no CORS opening
    assert results["text/plain offer"][0] == 415 and results["huge offer"][0] == 413
    assert [results[p][0] for p in ["/static/../app.py", "/static/%2e%2e%2fapp.py", "/static/app.py",
                                    "/static/missing.js", "/static/.hidden.js"]] == [404] * 5
    assert results["/static/index.html"][0] == 200


def test_presets_stats_and_config(engine):
    async def main():
        app = server(engine)
        async with listening(app) as url, aiohttp.ClientSession() as http:
            return [await (await http.get(url + path)).json() for path in ("/presets", "/stats", "/config")]

    presets, stats, config = asyncio.run(main())
    names = [p["name"] for p in presets["presets"]]
    assert {"starry-night", "sepia-oil", "ink-sketch"} <= set(names) and presets["default"] == "starry-night"
    assert presets["family"] == "demo" and "fauve-red" in presets["styles"]
    assert stats["sessions"] == [] and {"load", "streams", "device"} <= set(stats["engine"])
    assert config["ice_servers"] == []  # no STUN or TURN unless configured


def test_ice_servers_only_when_configured(engine):
    assert App(engine, ServerSettings()).rtc_configuration().iceServers == []  # aiortc's default is Google STUN
    app = App(engine, ServerSettings(ice_servers=("stun:stun.example.org:3478",
                                                  "turn:alice:pa55@turn.example.org:3478?transport=udp")))
    stun, turn = app.rtc_configuration().iceServers
    assert stun.urls == "stun:stun.example.org:3478" and stun.username is None
    assert (turn.urls, turn.username, turn.credential) == ("turn:turn.example.org:3478?transport=udp", "alice", "pa55")
    with pytest.raises(LivestyleError, match="ice-server"):
        ice_server("http://example.org")


def test_binding_beyond_loopback_needs_a_token():
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        ServerSettings(host=host)
    for host in ("0.0.0.0", "::", "192.168.1.20", "example.org"):
        with pytest.raises(LivestyleError, match="--token"):
            ServerSettings(host=host)
        ServerSettings(host=host, token=TOKEN)
    with pytest.raises(LivestyleError, match="at least"):
        ServerSettings(host="0.0.0.0", token="short")
    assert security.token_matches(TOKEN, TOKEN) and not security.token_matches(TOKEN[:-1], TOKEN)
    assert not security.token_matches(None, TOKEN)


def test_check_offer():
    with pytest.raises(Exception, match="v=0"):
        check_offer("", "send")
    with pytest.raises(Exception, match="no video"):
        check_offer("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", "send")


def test_serve_command_line():
    import argparse

    from livestyle.server.command import cmd_serve, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--host", "0.0.0.0", "--port", "9000", "--max-sessions", "2",
                              "--preset", "ink-sketch", "--device", "cpu", "--ice-server", "stun:s.example:3478",
                              "--bitrate", "2.5M", "--token", ""])
    assert (args.host, args.port, args.max_sessions, args.bitrate, args.ice_server) == \
        ("0.0.0.0", 9000, 2, 2_500_000, ["stun:s.example:3478"])
    started = time.monotonic()
    with pytest.raises(LivestyleError, match="--token"):  # refused before any model loads
        cmd_serve(args)
    assert time.monotonic() - started < 2
    # Importing the command costs nothing: no aiohttp, aiortc or torch until `serve` runs.
    code = ("import sys, livestyle.server.command; "
            "print(sorted(m for m in ('aiohttp', 'aiortc', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
