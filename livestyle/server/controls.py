"""The `control` data channel's messages: JSON objects that change one stream's settings live.

    {"preset": "sepia-oil"}                 a preset's look (style or prompt, strength, steps, seed, temporal)
    {"style": "ink-sketch"}                 a demo-model style, or weighted styles "a:0.7, b:0.3"
    {"prompt": "...", "negative": "..."}    text for SD models; the demo model has no text
                                            encoder, so its "prompt" must name a style
    {"strength": 0.6}  {"seed": 3}  {"steps": 2}  {"temporal": false}
    {"reset": true}                         forget temporal state (a scene cut)
    {"token": "..."}                        authenticates the channel when the server has a token
    {"id": 7, ...}                          echoed in the reply, to match replies to requests

Several keys in one message are one update; "preset" is applied first, so
{"preset": "ink-sketch", "strength": 0.5} is the preset at half strength.
Replies: {"ok": true, "settings": {...}} or {"error": "one line"}. The server also sends
{"stats": {...}} about once a second.
"""

from __future__ import annotations

import dataclasses
import json
import re

from livestyle.config import Preset, StreamSettings, TemporalSettings, find_preset, preset_files
from livestyle.errors import LivestyleError
from livestyle.server.security import MAX_CONTROL_BYTES

KEYS = ("id", "token", "preset", "style", "prompt", "negative", "strength", "seed", "steps", "temporal", "reset")
PRESET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_TEXT = 1000  # characters in a prompt or style


class ControlError(LivestyleError):
    """A control message that cannot be applied; the message is sent back on the channel."""


def parse_message(data: str | bytes) -> dict:
    """A control message as a dict; raises ControlError for anything but a small JSON object
    (its keys are checked by changes_for, after the reply's "id" is known)."""
    if len(data) > MAX_CONTROL_BYTES:
        raise ControlError(f"message of {len(data)} bytes: at most {MAX_CONTROL_BYTES}")
    try:
        message = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ControlError("not JSON: send an object such as {\"strength\": 0.5}") from None
    if not isinstance(message, dict):
        raise ControlError("send a JSON object such as {\"strength\": 0.5}")
    return message


def preset_by_name(name) -> Preset:
    """A preset by name only: a client must never make the server read a path."""
    if not isinstance(name, str) or not PRESET_NAME.fullmatch(name) or name.endswith(".toml"):
        raise ControlError(f"preset {str(name)[:64]!r} is not a preset name")
    if name not in preset_files():
        raise ControlError(f"unknown preset {name!r} (known: {', '.join(preset_files())})")
    return find_preset(name)


def _number(message: dict, key: str, kind: type):
    value = message[key]
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok:
        raise ControlError(f"{key} = {value!r} is not {'a number' if kind is float else 'an integer'}")
    return kind(value)


def _text(message: dict, key: str) -> str:
    value = message[key]
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ControlError(f"{key} must be a string of at most {MAX_TEXT} characters")
    return value.strip()


def changes_for(message: dict, family: str, styles: tuple[str, ...]) -> dict:
    """The StreamSettings changes a control message asks for; raises ControlError for
    unknown keys and wrong types (ranges are checked by the stream's update(), which
    names the field).

    family: the engine's model family ("demo", "sd1", "sd2"); styles: the demo model's styles.
    """
    unknown = [k for k in message if k not in KEYS]
    if unknown:
        raise ControlError(f"unknown control {unknown[0]!r} (known: {', '.join(KEYS[2:])})")
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
            raise ControlError(f"temporal = {message['temporal']!r} is not true or false")
        changes["temporal"] = TemporalSettings() if message["temporal"] else TemporalSettings.off()
    return changes


def settings_dict(settings: StreamSettings) -> dict:
    """A stream's settings as JSON-ready data (for replies and /stats)."""
    data = dataclasses.asdict(settings)
    data["size"] = list(settings.size)
    data["timesteps"] = list(settings.timesteps)
    t = settings.temporal
    data["temporal_on"] = t.attention_frames > 0 or t.flow or t.similarity > 0
    return data
