"""ControlNets on the server: a client changes the scales of the ControlNets the server
streams with (by name, 0 = off) through the `control` channel, and can never name a file
or another net; replies and /config name them without their paths. End to end: `serve`'s
App with a tiny SD checkpoint and a ControlNet, a camera client on loopback."""

import asyncio
import json
import shutil

import aiohttp
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from livestyle.config import Control, StreamSettings, find_preset
from livestyle.errors import LivestyleError
from livestyle.server.app import App, ServerSettings, listening
from livestyle.server.controls import ControlError, Controller, changes_for, parse_message, settings_dict
from random_weights import perturb

CONTROLS = (Control("/srv/nets/cn-canny", "canny", 0.8), Control("/srv/nets/cn-temporal.safetensors", "temporalnet"))


def test_scales_by_name():
    changes = changes_for(parse_message('{"controls": {"cn-canny": 0.5}}'), "sd1", (), CONTROLS)
    assert changes == {"controls": (Control("/srv/nets/cn-canny", "canny", 0.5), CONTROLS[1])}
    off = changes_for({"controls": {"cn-temporal": 0, "cn-canny": 2}, "strength": 0.4}, "sd1", (), CONTROLS)
    assert [c.scale for c in off["controls"]] == [2.0, 0.0] and off["strength"] == 0.4
    assert [c.net for c in off["controls"]] == [c.net for c in CONTROLS]  # the nets never change


@pytest.mark.parametrize("message, error", [
    ('{"controls": {"/etc/passwd": 1}}', "unknown ControlNet '/etc/passwd': this stream has cn-canny, cn-temporal"),
    ('{"controls": {"/srv/nets/cn-canny": 1}}', "unknown ControlNet '/srv/nets/cn-canny'"),
    ('{"controls": {"cn-depth": 1}}', "unknown ControlNet 'cn-depth'"),
    ('{"controls": [{"net": "cn-canny", "scale": 1}]}', "send scales by name"),
    ('{"controls": {}}', "send scales by name"),
    ('{"controls": "cn-canny"}', "send scales by name"),
    ('{"controls": {"cn-canny": 2.5}}', "controls 'cn-canny' = 2.5: a scale is 0 to 2"),
    ('{"controls": {"cn-canny": -1}}', "controls 'cn-canny' = -1: a scale is 0 to 2"),
    ('{"controls": {"cn-canny": "high"}}', "controls 'cn-canny' = 'high' is not a number"),
    ('{"controls": {"cn-canny": true}}', "controls 'cn-canny' = True is not a number"),
    ('{"controls": {"cn-canny": null}}', "is not a number"),
])
def test_a_client_never_names_a_net(message, error):
    with pytest.raises(ControlError, match=error.replace("[", r"\[")) as caught:
        changes_for(parse_message(message), "sd1", (), CONTROLS)
    assert "\n" not in str(caught.value)


def test_a_stream_without_controlnets_says_so():
    with pytest.raises(ControlError, match="this stream has no ControlNets"):
        changes_for({"controls": {"cn-canny": 1}}, "demo", ("starry-night",))


def test_replies_name_controlnets_without_their_paths():
    settings = StreamSettings.from_preset(find_preset("starry-night"), (64, 48), controls=CONTROLS)
    data = settings_dict(settings)
    assert data["controls"] == [
        {"name": "cn-canny", "input": "canny", "scale": 0.8, "start": 0.0, "end": 1.0},
        {"name": "cn-temporal", "input": "temporalnet", "scale": 1.0, "start": 0.0, "end": 1.0}]
    assert "/srv" not in json.dumps(data)


class FakeStream:
    """What Controller uses of an engine Stream: settings, update(), reset()."""

    def __init__(self, settings):
        self.settings, self.updates = settings, []

    def update(self, **changes):
        self.settings = self.settings.replace(**changes)
        self.updates.append(changes)
        return self.settings

    def reset(self):
        pass


class FakeSession:
    def __init__(self, stream):
        self.stream, self.authorized, self.label = stream, True, "s1"
        self.update_lock = asyncio.Lock()

    def spawn(self, coro):
        coro.close()  # _apply is called directly here


def test_a_batch_of_scale_changes_keeps_each_one():
    """Two messages in one batch, each moving another ControlNet: both hold (each builds on the one before)."""
    settings = StreamSettings.from_preset(find_preset("starry-night"), (64, 48), controls=CONTROLS)
    stream = FakeStream(settings)
    controller = Controller(FakeSession(stream), "sd1", (), "", lambda reply: None, lambda: None)
    replies = controller._apply([{"controls": {"cn-canny": 0.1}}, {"controls": {"cn-temporal": 0}},
                                 {"controls": {"/tmp/evil": 1}}])
    assert [c.scale for c in stream.settings.controls] == [0.1, 0.0] and len(stream.updates) == 1
    assert replies[0]["ok"] and replies[1]["settings"]["controls"][1]["scale"] == 0.0
    assert "unknown ControlNet '/tmp/evil'" in replies[2]["error"]


def test_more_controlnets_than_a_stream_takes_is_refused():
    with pytest.raises(LivestyleError, match="--control: 5 ControlNets"):
        ServerSettings(controls=(CONTROLS[0],) * 5)


# -- End to end -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd_engine(tmp_path_factory):
    """The engine on a tiny SD pipeline (tests/tiny_pipelines.py) and a ControlNet for its U-Net in a folder."""
    from livestyle.stream.engine import Engine
    from tiny_pipelines import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    folder = tmp_path_factory.mktemp("nets") / "cn-edges"
    torch.manual_seed(0)
    config = pipe.unet.config
    unet = UNet2DConditionModel(
        block_out_channels=config.block_out_channels, layers_per_block=1, attention_head_dim=(2, 4),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=8)
    perturb(ControlNetModel.from_unet(unet), 4, scale=0.1).save_pretrained(folder, safe_serialization=True)
    with Engine(pipe) as engine:
        yield engine, folder


def test_scales_change_live_and_nets_stay_the_servers(sd_engine, tmp_path, monkeypatch):
    from livestyle.capture.sources import SyntheticSource
    from livestyle.server.client import CameraClient, SyntheticTrack

    engine, folder = sd_engine
    clip = [f.to_ndarray(format="rgb24") for f in SyntheticSource("coffee", (96, 64), fps=30, frames=15)]
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "livestyle" / "presets").mkdir(parents=True)
    (tmp_path / "livestyle" / "presets" / "ink-fox.toml").write_text(
        'model = "tiny-sd"\nprompt = "an ink drawing of a fox"\ntemporal = false\n')
    controls = (Control(str(folder), "canny", 0.8), Control(str(folder), "soft_edges", 0.0))

    async def main():
        app = App(engine, ServerSettings(port=0, short_side=64, preset="ink-fox", controls=controls))
        async with listening(app) as url:
            async with aiohttp.ClientSession() as http:
                config = await (await http.get(url + "/config")).json()
            assert config["controls"] == [
                {"name": "cn-edges", "input": "canny", "scale": 0.8, "start": 0.0, "end": 1.0},
                {"name": "cn-edges#2", "input": "soft_edges", "scale": 0.0, "start": 0.0, "end": 1.0}]
            async with CameraClient(url, SyntheticTrack(clip, 30)) as client:
                await client.next_frame(60)
                session = next(iter(app.sessions.values()))
                assert session.stream.settings.controls == controls
                reply = await client.control({"controls": {"cn-edges": 0.3, "cn-edges#2": 1.2}})
                assert reply.get("ok"), reply
                assert [c["scale"] for c in reply["settings"]["controls"]] == [0.3, 1.2]
                assert str(folder) not in json.dumps(reply)
                for bad, error in (({"cn-edges": 3}, "a scale is 0 to 2"),
                                   ({str(folder): 1}, "unknown ControlNet"),
                                   ({"../../etc/passwd": 1}, "unknown ControlNet")):
                    reply = await client.control({"controls": bad})
                    assert error in reply.get("error", ""), reply
                reply = await client.control({"preset": "ink-sketch", "controls": {"cn-edges": 0}})
                assert reply.get("ok"), reply  # a preset's look; the ControlNets stay the server's
                assert session.stream.settings.controls == (Control(str(folder), "canny", 0.0),
                                                            Control(str(folder), "soft_edges", 1.2))
                await client.next_frame(30)  # the connection lives and frames still come
                assert session.id in app.sessions

    asyncio.run(main())


# -- The page ---------------------------------------------------------------------------------

class PageEngine:
    """What the page's GET /presets and /config ask of an engine (no stream is opened)."""

    family, styles = "sd1", ()

    def stats(self):
        return {}


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium: `apt-get install chromium` (.ci/run does)")
@pytest.mark.parametrize("controls", [CONTROLS, ()], ids=["two ControlNets", "none"])
def test_the_page_has_a_slider_and_a_switch_per_controlnet(controls, tmp_path):
    from test_server_browser import chromium_page, until

    profile = tmp_path / "profile"

    async def main():
        app = App(PageEngine(), ServerSettings(port=0, controls=controls))
        async with listening(app) as url, aiohttp.ClientSession() as http:
            async with chromium_page(http, url, profile, tmp_path / "chromium.log") as (page, _):
                await until(lambda: page.evaluate("document.readyState === 'complete' && !!window.livestyle && "
                                                  "document.getElementById('preset').options.length > 0"),
                            20, "the page to load")
                # /config is asked after /presets: wait until the rows (if any) are built
                await until(lambda: page.evaluate(f"document.querySelectorAll('.controlnet').length == "
                                                  f"{len(controls)}"), 10, "the ControlNet rows")
                shown = await page.evaluate(
                    "JSON.stringify({hidden: document.getElementById('controlnets').hidden, rows: "
                    "[...document.querySelectorAll('.controlnet')].map((r) => ({text: r.textContent, "
                    "min: r.querySelector('input[type=range]').min, max: r.querySelector('input[type=range]').max, "
                    "on: r.querySelector('input[type=checkbox]').checked}))})")
                before = await page.evaluate("JSON.stringify(livestyle.controlScales())")
                switched = None
                if controls:  # switch the first off, move the second's slider
                    switched = await page.evaluate(
                        "(() => { const rows = document.querySelectorAll('.controlnet');"
                        " const box = rows[0].querySelector('input[type=checkbox]'); box.checked = false;"
                        " box.dispatchEvent(new Event('change'));"
                        " const s = rows[1].querySelector('input[type=range]'); s.value = 1.5;"
                        " s.dispatchEvent(new Event('input'));"
                        " return JSON.stringify({scales: livestyle.controlScales(), "
                        "disabled: rows[0].querySelector('input[type=range]').disabled}); })()")
        return json.loads(shown), json.loads(before), switched and json.loads(switched)

    shown, before, switched = asyncio.run(main())
    if not controls:
        assert shown == {"hidden": True, "rows": []} and before == {}
        return
    assert not shown["hidden"]
    assert shown["rows"] == [{"text": "cn-canny (canny)0.80", "min": "0", "max": "2", "on": True},
                             {"text": "cn-temporal (temporalnet)1.00", "min": "0", "max": "2", "on": True}]
    assert before == {"cn-canny": 0.8, "cn-temporal": 1}
    assert switched == {"scales": {"cn-canny": 0, "cn-temporal": 1.5}, "disabled": True}
