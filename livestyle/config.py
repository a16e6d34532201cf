"""Frozen configuration built once at the edge (the CLI, the server), and presets.

A preset is a TOML file naming a look: which model, which style or prompt, how
strong, how many steps. Built-in presets live in `livestyle/presets/`, user presets
in `~/.config/livestyle/presets/` (or any path given directly). Presets are checked
when read: an unknown key or a bad value names the file, the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from livestyle.errors import LivestyleError

BUILTIN_PRESETS = Path(__file__).parent / "presets"
DEFAULT_PRESET = "starry-night"


class PresetError(LivestyleError):
    """A preset file that cannot be used as written."""


def user_preset_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "livestyle" / "presets"


@dataclass(frozen=True)
class Preset:
    """One look.

    model: "demo" (the embedded model), a checkpoint path, or a name under $LIVESTYLE_MODELS.
    style: a style of the demo model (its StyleBank names); prompt/negative: for SD checkpoints.
    strength: 0 returns the input, 1 the full style. steps: denoising steps, 1 to 4.
    """

    name: str
    description: str = ""
    model: str = "demo"
    style: str = ""
    prompt: str = ""
    negative: str = ""
    strength: float = 1.0
    steps: int = 1
    seed: int = 0
    temporal: bool = True


_TYPES = {"name": str, "description": str, "model": str, "style": str, "prompt": str, "negative": str,
          "strength": float, "steps": int, "seed": int, "temporal": bool}


def parse_preset(data: dict, source: str, name: str) -> Preset:
    """A Preset from a TOML table; `source` names the file in errors."""
    allowed = ", ".join(f.name for f in dataclasses.fields(Preset))
    values = {"name": name}
    for key, value in data.items():
        if key not in _TYPES:
            raise PresetError(f"{source}: unknown key {key!r} (allowed: {allowed})")
        kind = _TYPES[key]
        if kind is float and type(value) is int:
            value = float(value)
        if type(value) is not kind:  # exact: TOML's true is not an int here
            raise PresetError(f"{source}: {key} = {value!r} is not a {kind.__name__}")
        values[key] = value
    preset = Preset(**values)
    if not 0.0 <= preset.strength <= 1.0:
        raise PresetError(f"{source}: strength = {preset.strength} is outside 0 to 1")
    if not 1 <= preset.steps <= 4:
        raise PresetError(f"{source}: steps = {preset.steps} is outside 1 to 4")
    if preset.model == "demo" and not preset.style:
        raise PresetError(f"{source}: a preset for the demo model needs a style")
    return preset


def load_preset(path: str | Path) -> Preset:
    """Read and check one preset file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PresetError(f"{path}: no such preset file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PresetError(f"{path}: not valid TOML ({e})") from None
    return parse_preset(data, str(path), path.stem)


def preset_files() -> dict[str, Path]:
    """Every preset by name: built-in ones, then user ones (a user preset overrides)."""
    found = {p.stem: p for p in sorted(BUILTIN_PRESETS.glob("*.toml"))}
    found |= {p.stem: p for p in sorted(user_preset_dir().glob("*.toml"))}
    return found


def find_preset(name_or_path: str) -> Preset:
    """A preset by name, or by path to a .toml file."""
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        return load_preset(name_or_path)
    files = preset_files()
    if name_or_path not in files:
        raise PresetError(f"unknown preset {name_or_path!r} (known: {', '.join(files) or 'none'})")
    return load_preset(files[name_or_path])
