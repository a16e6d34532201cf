"""A real browser on the camera page: headless Chromium with a fake camera playing a
generated .y4m clip opens `/`, starts, and the page reports restyled frames arriving at
a measured rate; then an OBS-style viewer tab plays the same session over WHEP.

Chromium is driven over the DevTools protocol (a websocket) to read what the page
measured. `.ci/run` installs Debian's `chromium` package when it is missing.
"""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import av
import numpy as np
import pytest

from livestyle.models.demo import load_demo
from livestyle.server.app import App, ServerSettings, listening
from livestyle.stream.engine import Engine

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: `apt-get install chromium` (.ci/run does)")


def write_y4m(path: Path, size=(160, 120), frames=60, fps=30) -> None:
    """A YUV4MPEG2 clip (the fake camera's format): coloured bars sliding past a gradient."""
    w, h = size
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for t in range(frames):
            rgb = np.stack([(x * 255 // w), (y * 255 // h), np.full_like(x, 96)], -1).astype(np.uint8)
            bar = ((x + 4 * t) // 20) % 4 == 0
            rgb[bar] = (230, 60, 40)
            yuv = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p").to_ndarray()
            f.write(b"FRAME\n" + yuv.tobytes())  # (h * 3/2, w): the Y, U and V planes one after another


class DevTools:
    """The smallest DevTools protocol client: evaluate JavaScript in one page."""

    def __init__(self, http: aiohttp.ClientSession, websocket_url: str):
        self.http, self.url, self.ids = http, websocket_url, 0

    async def __aenter__(self):
        self.ws = await self.http.ws_connect(self.url, max_msg_size=0)
        return self

    async def __aexit__(self, *exc):
        await self.ws.close()

    async def evaluate(self, expression: str, timeout: float = 20.0):
        self.ids += 1
        await self.ws.send_json({"id": self.ids, "method": "Runtime.evaluate", "params": {
            "expression": expression, "awaitPromise": True, "returnByValue": True}})
        while True:
            message = await asyncio.wait_for(self.ws.receive_json(), timeout)
            if message.get("id") == self.ids:
                result = message["result"]
                if "exceptionDetails" in result:
                    raise AssertionError(f"{expression}: {result['exceptionDetails']}")
                return result["result"].get("value")


async def until(check, timeout: float, what: str):
    """Poll an async check until it returns a true value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {value!r})")
        await asyncio.sleep(0.25)


async def page_target(http, port: int, url_part: str) -> str:
    async def find():
        async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
            pages = await r.json()
        return next((p["webSocketDebuggerUrl"] for p in pages if p["type"] == "page" and url_part in p["url"]), None)

    return await until(find, 10, f"a page at {url_part}")


@contextlib.asynccontextmanager
async def chromium_page(http, url: str, profile: Path, log: Path, *flags: str):
    """Headless Chromium showing `url`/, driven over DevTools: yields (the page, the DevTools port).
    Its output goes to `log`; on the way out the browser's whole process group is ended."""
    with open(log, "wb") as out:
        browser = subprocess.Popen([
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage", *flags,
            "--remote-debugging-port=0", f"--user-data-dir={profile}", f"{url}/"],
            stdout=out, stderr=out, start_new_session=True)  # its own group: ended whole below
    try:
        port_file = profile / "DevToolsActivePort"
        await until(lambda: asyncio.sleep(0, port_file.exists() and port_file.read_text().strip()), 20,
                    "Chromium's DevTools port")
        port = int(port_file.read_text().split()[0])
        async with DevTools(http, await page_target(http, port, url)) as page:
            yield page, port
    finally:
        os.killpg(browser.pid, signal.SIGTERM)  # the browser and its helper processes
        try:
            browser.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(browser.pid, signal.SIGKILL)


def test_camera_page_in_headless_chromium(tmp_path):
    clip = tmp_path / "camera.y4m"
    write_y4m(clip)
    profile = tmp_path / "profile"

    async def main(engine):
        app = App(engine, ServerSettings(port=0, short_side=96))
        async with listening(app) as url, aiohttp.ClientSession() as http:
            flags = ("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                     f"--use-file-for-fake-video-capture={clip}", "--autoplay-policy=no-user-gesture-required")
            async with chromium_page(http, url, profile, tmp_path / "chromium.log", *flags) as (page, port):
                await until(lambda: page.evaluate("document.readyState === 'complete' && !!window.livestyle"),
                            10, "the page to load")
                await page.evaluate("livestyle.start()")
                stats = lambda: page.evaluate("JSON.stringify(livestyle.stats)")
                await until(lambda: page.evaluate("livestyle.stats.framesOut >= 10"), 30,
                            "restyled frames on the page")
                first, t0 = json.loads(await stats()), time.monotonic()
                await asyncio.sleep(3)
                last, t1 = json.loads(await stats()), time.monotonic()
                sample = await page.evaluate("livestyle.sample()")
                server = (await (await http.get(f"{url}/stats")).json())["sessions"]

                # The page's own controls reach the session: move the strength slider, pick a preset.
                await page.evaluate("(() => { const s = document.getElementById('strength'); s.value = 0.3;"
                                    " s.dispatchEvent(new Event('input')); })()")
                settings = lambda: next(iter(app.sessions.values())).stream.settings
                await until(lambda: asyncio.sleep(0, settings().strength == 0.3), 5, "the slider's strength")
                await page.evaluate("(() => { const p = document.getElementById('preset'); p.value = 'ink-sketch';"
                                    " p.dispatchEvent(new Event('change')); })()")
                await until(lambda: asyncio.sleep(0, settings().style == "ink-sketch"), 5, "the preset's style")
                session_id = next(iter(app.sessions))

                # The same session in a viewer tab, as an OBS Browser Source would show it.
                async with http.put(f"http://127.0.0.1:{port}/json/new?{url}/view?session={session_id}"):
                    pass
                async with DevTools(http, await page_target(http, port, "/view")) as viewer:
                    await until(lambda: viewer.evaluate("!!window.livestyle && livestyle.stats.frames >= 10"), 20,
                                "frames in the viewer")
                    viewers = len(next(iter(app.sessions.values())).viewers)

                await page.evaluate("livestyle.stop()")
                closed = time.monotonic()
                await until(lambda: asyncio.sleep(0, not app.sessions), 5, "the session to be freed")
                freed_after = time.monotonic() - closed
        return first, last, t1 - t0, sample, server, viewers, freed_after

    with Engine(load_demo) as engine:
        first, last, seconds, sample, server, viewers, freed_after = asyncio.run(main(engine))
    rate = (last["framesOut"] - first["framesOut"]) / seconds
    print(f"page: {rate:.1f} restyled fps over {seconds:.1f} s, overlay {last['fpsOut']:.1f} fps, "
          f"latency ~{last['latencyMs']} ms, server {server[0]['fps_out']} fps")
    assert rate >= 5, (first, last)  # the fake camera sends 30 fps; the demo model at 128x96 keeps up on 2 cores
    assert last["state"] == "connected" and not last["errors"], last
    assert last["fpsOut"] > 0 and last["latencyMs"] is not None and last["server"]["frames_out"] > 0
    assert len(server) == 1 and server[0]["input_size"] == [160, 120] and server[0]["frames_out"] >= 30
    assert sample["diff"] > 20, sample  # the output is restyled, not the camera echoed back
    assert viewers == 1 and freed_after < 5
