"""The `control` data channel's messages: JSON objects that change one stream's settings live.

    {"preset": "sepia-oil"}                 a preset's look (style or prompt, strength, steps, seed, temporal)
    {"style": "ink-sketch"}                 a demo-model style, or weighted styles "a:0.7, b:0.3"
    {"prompt": "...", "negative": "..."}    text for SD models; the demo model has no text
                                            encoder, so its "prompt" must name a style
    {"strength": 0.6}  {"seed": 3}  {"steps": 2}  {"temporal": false}
    {"reset": true}                         forget temporal state (a scene cut)
    {"controls": {"cn-canny": 0.5}}         ControlNet scales by name (0 to 2, 0 = off): only the
                                            ControlNets the server streams with (GET /config names
                                            them); a client never names a file or a new net
    {"token": "..."}                        authenticates the channel when the server has a token
    {"id": 7, ...}                          echoed in the reply, to match replies to requests

Several keys in one message are one update; "preset" is applied first, so
{"preset": "ink-sketch", "strength": 0.5} is the preset at half strength (its look only:
the ControlNets stay the server's). Messages that arrive while an update is being
applied are applied together, in order, as one update when they can be (the reply to
each carries the settings after its batch).
Replies: {"ok": true, "settings": {...}} or {"error": "one line"}. The server also sends
{"stats": {...}} about once a second. Beyond RATE messages a second (BURST at once)
messages are dropped and answered {"error": "too many control messages ..."}, as long
as those answers stay within RATE a second too (past that, replies would cost what the
drop saves, and a dropped message goes unanswered).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import Callable

from livestyle.config import Control, Preset, StreamSettings, TemporalSettings, control_names, find_preset, preset_files
from livestyle.errors import LivestyleError
from livestyle.server.security import MAX_CONTROL_BYTES, InputError, load_json, token_matches

log = logging.getLogger(__name__)

KEYS = ("id", "token", "preset", "style", "prompt", "negative", "strength", "seed", "steps", "temporal", "reset",
        "controls")
PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_TEXT = 1000  # characters in a prompt or style
RATE = 20.0  # control messages a second, sustained: the page's slider sends at most 12.5
BURST = 40  # control messages at once
APPLY_INTERVAL = 0.1  # seconds between a session's settings updates: what arrives meanwhile is one update


class ControlError(LivestyleError):
    """A control message that cannot be applied; the message is sent back on the channel."""


def parse_message(data: str | bytes) -> dict:
    """A control message as a dict; raises ControlError for anything but a small, flat
    JSON object (its keys are checked by changes_for, after the reply's "id" is known).

    data: a data channel message, text or bytes, from the network."""
    if not isinstance(data, (str, bytes)):
        raise ControlError(f"a control message is text, not {type(data).__name__}")
    try:
        message = load_json(data, MAX_CONTROL_BYTES)
    except InputError as e:
        raise ControlError(f"{e}: send an object such as {{\"strength\": 0.5}}") from None
    if not isinstance(message, dict):
        raise ControlError("send a JSON object such as {\"strength\": 0.5}")
    return message


def preset_by_name(name) -> Preset:
    """A preset by name only: a client must never make the server read a path."""
    if not isinstance(name, str) or not PRESET_NAME.fullmatch(name) or name.endswith(".toml"):
        raise ControlError(f"preset {shown(name)} is not a preset name")
    if name not in preset_files():
        raise ControlError(f"unknown preset {name!r} (known: {', '.join(preset_files())})")
    return find_preset(name)


def shown(value) -> str:
    """A value from a message, for an error line: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 64 else text[:60] + "..."


def _number(message: dict, key: str, kind: type):
    value = message[key]
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok:
        raise ControlError(f"{key} = {shown(value)} is not {'a number' if kind is float else 'an integer'}")
    return kind(value)


def _text(message: dict, key: str) -> str:
    value = message[key]
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ControlError(f"{key} must be a string of at most {MAX_TEXT} characters")
    return value.strip()


def _scales(value, controls: tuple[Control, ...]) -> tuple[Control, ...]:
    """`controls` with the scales of {"NAME": SCALE, ...} (names from control_names)."""
    if not controls:
        raise ControlError("this stream has no ControlNets (the server starts with them: serve --control INPUT=NET)")
    names = control_names(controls)
    if not isinstance(value, dict) or not value:
        raise ControlError(f"controls = {shown(value)}: send scales by name, such as "
                           f"{{\"controls\": {{\"{names[0]}\": 0.5}}}} (0 to 2, 0 = off)")
    changed = list(controls)
    for name, scale in value.items():
        if name not in names:
            # Names only, never paths: a client chooses among the server's ControlNets, it cannot load one.
            raise ControlError(f"unknown ControlNet {shown(name)}: this stream has {', '.join(names)} "
                               "(a client sets their scales, it cannot name another)")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ControlError(f"controls {name!r} = {shown(scale)} is not a number (a scale, 0 to 2; 0 = off)")
        if not 0 <= scale <= 2:
            raise ControlError(f"controls {name!r} = {shown(scale)}: a scale is 0 to 2 (0 = off)")
        i = names.index(name)
        changed[i] = dataclasses.replace(changed[i], scale=float(scale))
    return tuple(changed)


def changes_for(message: dict, family: str, styles: tuple[str, ...], controls: tuple[Control, ...] = ()) -> dict:
    """The StreamSettings changes a control message asks for; raises ControlError for
    unknown keys and wrong types (ranges are checked by the stream's update(), which
    names the field).

    family: the engine's model family ("demo", "sd1", "sd2", "sdxl"); styles: the demo
    model's styles; controls: the stream's ControlNets as they are (a scale change is
    made to them).
    """
    unknown = [k for k in message if k not in KEYS]
    if unknown:
        raise ControlError(f"unknown control {shown(unknown[0])} (known: {', '.join(KEYS[2:])})")
    if "reset" in message and not isinstance(message["reset"], bool):
        raise ControlError(f"reset = {shown(message['reset'])} is not true or false")
    changes: dict = {}
    if "preset" in message:
        preset = preset_by_name(message["preset"])
        if family == "demo":
            changes["style"] = preset.style
        else:
            changes.update(prompt=preset.prompt, negative=preset.negative)
        changes.update(strength=preset.strength, steps=preset.steps, seed=preset.seed,
                       temporal=TemporalSettings() if preset.temporal else TemporalSettings.off())
    if "style" in message:
        changes["style"] = _text(message, "style")
    if "prompt" in message:
        prompt = _text(message, "prompt")
        if family == "demo":
            # The demo model has no text encoder: a "prompt" can only name its styles.
            names = {part.split(":")[0].strip() for part in prompt.split(",") if part.strip()}
            if not names or not names <= set(styles):
                raise ControlError(f"the demo model has no text encoder: type a style name "
                                   f"(known: {', '.join(styles)}) or load an SD model with --model")
            changes["style"] = prompt
        else:
            changes["prompt"] = prompt
    if "negative" in message:
        changes["negative"] = _text(message, "negative")
    if "strength" in message:
        changes["strength"] = _number(message, "strength", float)
    if "seed" in message:
        changes["seed"] = _number(message, "seed", int)
        if not 0 <= changes["seed"] < 2**31:
            raise ControlError(f"seed = {changes['seed']}: must be 0 to 2^31 - 1")
    if "steps" in message:
        changes["steps"] = _number(message, "steps", int)
    if "temporal" in message:
        if not isinstance(message["temporal"], bool):
            raise ControlError(f"temporal = {shown(message['temporal'])} is not true or false")
        changes["temporal"] = TemporalSettings() if message["temporal"] else TemporalSettings.off()
    if "controls" in message:
        changes["controls"] = _scales(message["controls"], controls)
    return changes


def controls_list(controls: tuple[Control, ...]) -> list[dict]:
    """ControlNets as JSON-ready data for clients: each one's name, never its path."""
    return [{"name": name, "input": c.input, "scale": c.scale, "start": c.start, "end": c.end}
            for c, name in zip(controls, control_names(controls))]


def settings_dict(settings: StreamSettings) -> dict:
    """A stream's settings as JSON-ready data (for replies and /stats)."""
    data = dataclasses.asdict(settings)
    data["size"] = list(settings.size)
    data["timesteps"] = list(settings.timesteps)
    t = settings.temporal
    data["temporal_on"] = t.attention_frames > 0 or t.flow or t.similarity > 0
    data["controls"] = controls_list(settings.controls)  # the server's file paths stay on the server
    return data


class TokenBucket:
    """At most `rate` events a second on average and `burst` at once."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.last = float(burst), clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Controller:
    """One camera session's `control` channel: reads messages as they arrive, applies them
    in batches off the event loop.

    On the event loop a message costs a JSON parse of at most MAX_CONTROL_BYTES and the
    token check; everything else (the keys, preset files, the settings check against the
    model) runs on the executor, in one call per batch: a task takes every message
    queued so far, checks each one's changes in order and updates the stream once, at
    most once per APPLY_INTERVAL. So a session has at most one update in flight however
    fast messages come, and a flood cannot starve its video. Past the token bucket (RATE a second, BURST at once)
    messages are dropped with an error reply while those replies stay within the same
    rate; `counts` says how many of each.

    session: a sessions.Session (its stream, update_lock, authorized flag and tasks);
    family, styles: the engine's; token: the server's ("" = none); send(reply) puts a
    reply on the channel; on_wrong_token() ends the session.
    """

    def __init__(self, session, family: str, styles: tuple[str, ...], token: str,
                 send: Callable[[dict], None], on_wrong_token: Callable[[], None]):
        self.session, self.family, self.styles, self.token = session, family, styles, token
        self.send, self.on_wrong_token = send, on_wrong_token
        self.bucket = TokenBucket(RATE, BURST)
        self.notices = TokenBucket(RATE, BURST)  # replies to dropped messages
        self.queued: list[dict] = []
        self.ready = asyncio.Event()
        self.counts = {"received": 0, "applied": 0, "refused": 0, "dropped": 0}
        session.spawn(self._apply_queued())

    def receive(self, data) -> None:
        """One message from the channel (called on the event loop, never raises for its content)."""
        self.counts["received"] += 1
        if not self.bucket.take():
            self.counts["dropped"] += 1
            if self.notices.take():
                try:
                    message = parse_message(data)
                except ControlError:
                    message = {}
                self._reply({"error": f"too many control messages (at most {RATE:g} a second, {BURST} at once): "
                                      "this one was dropped"}, message)
            return
        message, error = {}, None
        try:
            message = parse_message(data)
        except ControlError as e:
            error = e
        if error is None and "token" in message:
            if self.token and not token_matches(message["token"], self.token):
                self.session.authorized = False  # nothing after it applies while the session closes
                self.on_wrong_token()
                error = ControlError("wrong token")
            else:
                self.session.authorized = True
        if error is None and not self.session.authorized:
            error = ControlError('send {"token": "..."} first')
        if error is not None:
            self.counts["refused"] += 1
            self._reply({"error": str(error)}, message)
            return
        self.queued.append(message)
        self.ready.set()

    def _reply(self, reply: dict, message: dict) -> None:
        if isinstance(message.get("id"), (int, str)) and not isinstance(message["id"], bool):
            reply["id"] = message["id"]
        self.send(reply)

    async def _apply_queued(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.ready.wait()
            self.ready.clear()
            batch, self.queued = self.queued, []
            try:
                async with self.session.update_lock:  # orders these with the session's own size changes
                    replies = await loop.run_in_executor(None, self._apply, batch)
            except Exception as e:  # a bug, not the message: say so, and keep the channel answering
                # The keys only: a message may carry the token.
                log.exception("session %s: control messages with keys %s failed", self.session.label,
                              sorted({k for m in batch for k in m}))
                replies = [{"error": f"internal error ({type(e).__name__})"} for _ in batch]
            for message, reply in zip(batch, replies):
                self.counts["applied" if "ok" in reply else "refused"] += 1
                self._reply(reply, message)
            # Each update makes the engine's worker re-plan the stream before its next frame.
            await asyncio.sleep(APPLY_INTERVAL)

    def _apply(self, batch: list[dict]) -> list[dict]:
        """On the executor: each message's changes, then one stream update (one per
        message, in order, only when the batch as a whole is refused, to tell which)."""
        stream = self.session.stream
        outcomes: list[dict | LivestyleError] = []
        controls = stream.settings.controls  # each message's scales on top of the ones before it
        for message in batch:
            try:
                outcomes.append(changes_for(message, self.family, self.styles, controls))
                controls = outcomes[-1].get("controls", controls)
            except LivestyleError as e:
                outcomes.append(e)
        merged = {k: v for changes in outcomes if isinstance(changes, dict) for k, v in changes.items()}
        try:
            if merged:
                stream.update(**merged)
        except LivestyleError:
            for i, changes in enumerate(outcomes):
                if isinstance(changes, dict) and changes:
                    try:
                        stream.update(**changes)
                    except LivestyleError as e:
                        outcomes[i] = e
        if any(isinstance(o, dict) and m.get("reset") is True for m, o in zip(batch, outcomes)):
            stream.reset()
        settings = settings_dict(stream.settings)
        return [{"error": str(o)} if isinstance(o, LivestyleError) else {"ok": True, "settings": settings}
                for o in outcomes]
