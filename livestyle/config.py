"""Frozen configuration built once at the edge (the CLI, the server), and presets.

A preset is a TOML file naming a look: which model, which style or prompt, how
strong, how many steps. Built-in presets live in `livestyle/presets/`, user presets
in `~/.config/livestyle/presets/` (or any path given directly). Presets are checked
when read: an unknown key or a bad value names the file, the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
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


MAX_PRESET_BYTES = 64 * 1024  # a preset is a few lines; this refuses a wrong path (a video, a log) quickly
MAX_TEXT = 2000  # characters in a style, prompt or description: CLIP reads 77 tokens, a message quotes it
SEED_RANGE = 2**63  # torch.Generator.manual_seed takes a signed 64-bit seed


def shown(value, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters, so an error line stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def user_preset_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "livestyle" / "presets"


@dataclass(frozen=True)
class Preset:
    """One look.

    model: "demo" (the embedded model), a checkpoint path, or a name under $LIVESTYLE_MODELS.
    style: a style of the demo model (its StyleBank names); prompt/negative: for SD checkpoints.
    strength: 0 returns the input, 1 the full style. steps: denoising steps, 1 to 4.
    controls: ControlNets (Control), written as [[control]] tables with the keys net,
        input, scale, start and end; SD and SDXL models only.
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
    controls: tuple[Control, ...] = ()


_TYPES = {"name": str, "description": str, "model": str, "style": str, "prompt": str, "negative": str,
          "strength": float, "steps": int, "seed": int, "temporal": bool}
_CONTROL_TYPES = {"net": str, "input": str, "scale": float, "start": float, "end": float}


def _checked(key: str, value, kind: type, source: str):
    """`value` as a `kind` (a TOML integer is taken where a float is expected), or PresetError."""
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:  # exact: TOML's true is not an int here
        raise PresetError(f"{source}: {key} = {shown(value)} is not a {kind.__name__}")
    if kind is str and len(value) > MAX_TEXT:
        raise PresetError(f"{source}: {key} is {len(value)} characters long (at most {MAX_TEXT})")
    return value


def parse_controls(tables, source: str) -> tuple[Control, ...]:
    """The ControlNets of a preset's [[control]] tables; `source` names the file in errors."""
    if type(tables) is not list or not all(type(t) is dict for t in tables):
        raise PresetError(f"{source}: control must be [[control]] tables (keys: {', '.join(_CONTROL_TYPES)})")
    if len(tables) > MAX_CONTROLS:
        raise PresetError(f"{source}: {len(tables)} [[control]] tables (at most {MAX_CONTROLS})")
    controls = []
    for n, table in enumerate(tables, 1):
        where = f"{source}: [[control]] {n}"
        values = {}
        for key, value in table.items():
            if key not in _CONTROL_TYPES:
                raise PresetError(f"{where}: unknown key {key!r} (allowed: {', '.join(_CONTROL_TYPES)})")
            values[key] = _checked(key, value, _CONTROL_TYPES[key], where)
        if "net" not in values:
            raise PresetError(f"{where}: no net (a ControlNet folder, .safetensors file or model name)")
        try:
            controls.append(Control(**values))
        except SettingsError as e:  # a range: the message names the key and what is allowed
            raise PresetError(f"{where}: {e}") from None
    return tuple(controls)


def control_names(controls: tuple[Control, ...]) -> tuple[str, ...]:
    """What each ControlNet is called where its path must not show (the server's pages,
    summary lines): its file or folder name without .safetensors; a name that comes again
    gets #2, #3."""
    names: list[str] = []
    for c in controls:
        name = Path(c.net.rstrip("/\\")).name.removesuffix(".safetensors") or c.net
        names.append(name if name not in names else f"{name}#{sum(n.split('#')[0] == name for n in names) + 1}")
    return tuple(names)


def parse_preset(data: dict, source: str, name: str) -> Preset:
    """A Preset from a TOML table; `source` names the file in errors."""
    allowed = ", ".join([*_TYPES, "control"])
    values = {"name": name}
    for key, value in data.items():
        if key == "control":
            values["controls"] = parse_controls(value, source)
            continue
        if key not in _TYPES:
            raise PresetError(f"{source}: unknown key {key!r} (allowed: {allowed})")
        values[key] = _checked(key, value, _TYPES[key], source)
    preset = Preset(**values)
    if not 0 <= preset.seed < SEED_RANGE:
        raise PresetError(f"{source}: seed = {preset.seed} is outside 0 to 2**63 - 1")
    if not 0.0 <= preset.strength <= 1.0:
        raise PresetError(f"{source}: strength = {preset.strength} is outside 0 to 1")
    if not 1 <= preset.steps <= 4:
        raise PresetError(f"{source}: steps = {preset.steps} is outside 1 to 4")
    if preset.model == "demo" and not preset.style:
        raise PresetError(f"{source}: a preset for the demo model needs a style")
    if preset.model == "demo" and preset.controls:
        raise PresetError(f"{source}: the demo model has no ControlNets; [[control]] needs an SD or SDXL model")
    return preset


def load_preset(path: str | Path) -> Preset:
    """Read and check one preset file."""
    path = Path(path)
    try:
        if not path.is_file():  # a folder, a device or a FIFO would be read forever or fail oddly
            raise FileNotFoundError(path)
        if path.stat().st_size > MAX_PRESET_BYTES:
            raise PresetError(f"{path}: {path.stat().st_size} bytes is too large for a preset "
                              f"(at most {MAX_PRESET_BYTES})")
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PresetError(f"{path}: no such preset file") from None
    except PermissionError:
        raise PresetError(f"{path}: cannot read this preset file (permission denied)") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PresetError(f"{path}: not valid TOML ({str(e).splitlines()[0][:200]})") from None
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
        raise PresetError(f"unknown preset {shown(name_or_path)} (known: {', '.join(files) or 'none'})")
    return load_preset(files[name_or_path])


def preset_origin(path: Path) -> str:
    """"built-in", "user" or the file's folder: where a preset file comes from."""
    if path.parent == BUILTIN_PRESETS:
        return "built-in"
    if path.parent == user_preset_dir():
        return "user"
    return str(path.parent)


# -- Models ---------------------------------------------------------------------------------

MODEL_SUFFIXES = (".safetensors",)


def models_dir() -> Path:
    """Where models are looked for by name: $LIVESTYLE_MODELS, else the XDG data folder
    ($XDG_DATA_HOME or ~/.local/share)/livestyle/models."""
    if os.environ.get("LIVESTYLE_MODELS"):
        return Path(os.environ["LIVESTYLE_MODELS"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "livestyle" / "models"


def model_names() -> list[str]:
    """The models under models_dir(): folders and single .safetensors files, by name."""
    folder = models_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name if p.is_dir() else p.stem for p in folder.iterdir()
                  if p.is_dir() or p.suffix in MODEL_SUFFIXES)


def find_model(name_or_path: str, what: str = "model") -> Path:
    """A checkpoint by path (a folder or a .safetensors file), or by name under models_dir().

    "demo" (the embedded model) is not looked up here: the caller loads it directly.
    what: what is looked for, for the error ("model", "ControlNet").
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    folder = models_dir()
    if os.sep not in name_or_path and "/" not in name_or_path:
        for candidate in (folder / name_or_path, folder / f"{name_or_path}.safetensors"):
            if candidate.exists():
                return candidate
    names = model_names()
    known = f"found there: {', '.join(names)}" if names else "nothing there" if folder.is_dir() else "no such folder"
    raise LivestyleError(f"{what} {name_or_path!r}: no such file or folder, nor a {what} of that name in "
                         f"{folder} ({known}; set LIVESTYLE_MODELS to look elsewhere)")


# -- Stream settings -----------------------------------------------------------------------

GUIDANCE = ("none", "full", "self", "initialize")
MIN_SIDE = 16  # processing sides: the optical flow and the U-Net's downsampling need this much
MAX_SIDE = 4096  # and at most this: 4096x4096 is 16x SD's 1024 px training; memory is checked per device
MAX_GUIDANCE_SCALE = 50.0  # CFG beyond this only saturates (diffusers' examples stay under 20)


class SettingsError(LivestyleError):
    """A stream setting out of range; the message names the field and what is allowed."""


def style_blend(text: str) -> str | dict[str, float]:
    """"starry-night" -> the name; "a:0.7, b:0.3" -> {"a": 0.7, "b": 0.3} (a blend).

    Raises SettingsError for what no model takes: an empty name, a weight that is not a
    finite number >= 0, or weights that sum to 0 (whether the names exist is the model's
    to say).
    """
    if ":" not in text:
        if not text.strip():
            raise SettingsError("style: empty (a style name, or weighted names \"a:0.7, b:0.3\")")
        return text.strip()
    blend = {}
    for part in text.split(","):
        name, _, weight = part.partition(":")
        try:
            value = float(weight)
        except ValueError:
            raise SettingsError(f"style {shown(text)}: {shown(part.strip())} is not NAME:WEIGHT") from None
        if not name.strip():
            raise SettingsError(f"style {shown(text)}: {shown(part.strip())} has no style name")
        if not math.isfinite(value) or value < 0:
            raise SettingsError(f"style {shown(text)}: the weight of {name.strip()!r} must be a finite number >= 0")
        blend[name.strip()] = value
    if sum(blend.values()) <= 0:
        raise SettingsError(f"style {shown(text)}: the weights must have a positive sum")
    return blend


def _check_types(config) -> None:
    """Each field of a frozen settings dataclass has its declared kind (values from JSON or
    TOML arrive as anything): bools are bools, ints are ints (not bools), floats are finite
    numbers (an int is taken, and stored as a float), tuples hold ints."""
    for field in dataclasses.fields(config):
        value, kind = getattr(config, field.name), type(field.default)
        if kind is float and type(value) is int:
            object.__setattr__(config, field.name, float(value))  # frozen: set once, in __post_init__
            value = float(value)
        if kind is tuple:
            item = _TUPLE_ITEMS.get(field.name, int)
            ok = type(value) is tuple and all(type(v) is item for v in value)
        else:
            ok = type(value) is kind or (kind.__module__ == __name__ and isinstance(value, kind))
        if not ok:
            what = _KIND_NAMES.get(kind, kind.__name__)
            if kind is tuple and _TUPLE_ITEMS.get(field.name, int) is not int:
                what = f"a tuple of {_TUPLE_ITEMS[field.name].__name__}"
            raise SettingsError(f"{field.name} = {shown(value)}: must be {what}")
        if kind is float and not math.isfinite(value):
            raise SettingsError(f"{field.name} = {value}: must be a finite number")


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               tuple: "a tuple of integers"}
_TUPLE_ITEMS: dict[str, type] = {}  # tuple fields that hold something other than ints (filled below)


CONTROL_INPUTS = ("canny", "soft_edges", "temporalnet")  # and "depth:NAME", a registered depth estimator
MAX_CONTROLS = 4  # ControlNets on one stream: each is most of a U-Net encoder per call


@dataclass(frozen=True)
class Control:
    """One ControlNet on a stream (diffusers' controlnet_conditioning_scale,
    control_guidance_start/end).

    net: the ControlNet: a diffusers folder or single .safetensors file, or a name under
        models_dir() (as a model is found); checked against the stream's U-Net by the engine.
    input: what it sees: "canny" or "soft_edges" (edges of the input frame, OpenCV),
        "temporalnet" (the previous output frame, flow-warped when flow is on), or
        "depth:NAME" (a depth estimator registered with control_inputs.register_depth_estimator).
    scale: the strength of its residuals, 0 to 2; 0 is off (a live switch that keeps shapes).
    start, end: the fraction of the denoising steps in which it acts, 0 <= start < end <= 1.
    """

    net: str = ""
    input: str = "canny"
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        _check_types(self)
        if not self.net.strip():
            raise SettingsError("control net: empty (a ControlNet folder, .safetensors file or model name)")
        if len(self.net) > MAX_TEXT:
            raise SettingsError(f"control net is {len(self.net)} characters long (at most {MAX_TEXT})")
        name, _, estimator = self.input.partition(":")
        if not (self.input in CONTROL_INPUTS or (name == "depth" and estimator.strip())):
            raise SettingsError(f"control input = {shown(self.input)}: must be one of {', '.join(CONTROL_INPUTS)} "
                                "or depth:NAME")
        if not 0.0 <= self.scale <= 2.0:
            raise SettingsError(f"control scale = {self.scale}: must be 0 to 2 (0 = off)")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise SettingsError(f"control start = {self.start}, end = {self.end}: must satisfy 0 <= start < end <= 1")


WARPS = ("bilinear", "bicubic")  # TemporalSettings.warp


@dataclass(frozen=True)
class TemporalSettings:
    """The temporal parts of a stream, each switchable so its effect can be measured.

    attention_frames: past frames in the U-Net's cached self-attention (StreamV2V's
        feature bank), 0 = off.
    fusion: StreamV2V's feature fusion strength in [0, 1) (it uses 0.8): attention outputs
        pulled toward their nearest banked ones; 0 = off. Needs attention_frames.
    flow: flow-guided latent propagation (warp the previous output latent along the
        optical flow of the inputs, blend it in where a forward-backward check trusts it).
    flow_blend: the share of the warped previous output latent where the flow is fully
        trusted, in [0, 1).
    output_blend: the same for the decoded previous output image (the autoencoder's own
        flicker is only reachable there), in [0, 1); 0 = latents only.
    similarity: the similarity filter's threshold (cosine similarity of small copies of
        consecutive inputs, StreamDiffusion uses 0.98); 0 = off.
    warp: how both flow-guided blends resample the previous output, "bicubic" or
        "bilinear". The blends are recursive, so each output is resampled again every
        frame: bilinear keeps 0.64-0.73 of a steady texture's sharpness at blend 0.5,
        bicubic 0.85-0.93 (benchmarks/blend_resampling.py); through the engine bicubic
        keeps about a fifth more of the output's sharpness for a few percent more
        flicker (benchmarks/temporal_quality.py, README).
    """

    attention_frames: int = 2
    fusion: float = 0.0
    flow: bool = True
    flow_blend: float = 0.5
    output_blend: float = 0.5
    similarity: float = 0.0
    warp: str = "bicubic"

    @classmethod
    def off(cls) -> TemporalSettings:
        return cls(attention_frames=0, flow=False, similarity=0.0)

    def __post_init__(self):
        _check_types(self)
        if not 0 <= self.attention_frames <= 8:
            raise SettingsError(f"attention_frames = {self.attention_frames}: must be 0 to 8")
        if not 0.0 <= self.fusion < 1.0:
            raise SettingsError(f"fusion = {self.fusion}: must be in [0, 1) (0 = off)")
        if not 0.0 <= self.flow_blend < 1.0:
            raise SettingsError(f"flow_blend = {self.flow_blend}: must be in [0, 1)")
        if not 0.0 <= self.output_blend < 1.0:
            raise SettingsError(f"output_blend = {self.output_blend}: must be in [0, 1)")
        if not 0.0 <= self.similarity < 1.0:
            raise SettingsError(f"similarity = {self.similarity}: must be in [0, 1) (0 = off)")
        if self.warp not in WARPS:
            raise SettingsError(f"warp = {self.warp!r}: must be one of {', '.join(WARPS)}")


@dataclass(frozen=True)
class StreamSettings:
    """Everything one stream's output depends on; replaced whole on a live update.

    size: the processing (width, height), positive multiples of 8; frames of any size
        are resized to it and the output back to each input frame's size.
    style: the demo model's style (a name, or weighted names "a:0.7, b:0.3").
    prompt / negative: text for SD checkpoints (the demo model reads a negative as a style).
    strength: 0 returns the input, 1 the full restyle (img2img strength).
    steps: denoising steps per frame, 1 to 4.
    timesteps: an explicit timestep list (StreamDiffusion's t_index_list, SD only),
        e.g. (999, 749); when given it replaces strength and steps.
    seed: the stream's fixed noise.
    guidance: "none", "full" (CFG with the negative), "self" or "initialize" (StreamDiffusion's
        residual CFG); guidance_scale > 1 to have an effect.
    stream_batch: run the steps of consecutive frames as one batched U-Net call (adds
        steps - 1 frames of latency, one U-Net call per frame instead of `steps`).
    controls: the ControlNets applied (Control), their residuals summed.
    """

    size: tuple[int, int] = (256, 256)
    style: str = DEFAULT_PRESET
    prompt: str = ""
    negative: str = ""
    strength: float = 1.0
    steps: int = 1
    timesteps: tuple[int, ...] = ()
    seed: int = 0
    guidance: str = "none"
    guidance_scale: float = 1.0
    stream_batch: bool = True
    temporal: TemporalSettings = TemporalSettings()
    controls: tuple[Control, ...] = ()

    def __post_init__(self):
        _check_types(self)
        if len(self.controls) > MAX_CONTROLS:
            raise SettingsError(f"controls: {len(self.controls)} ControlNets (at most {MAX_CONTROLS})")
        w, h = self.size
        if not (MIN_SIDE <= w <= MAX_SIDE and MIN_SIDE <= h <= MAX_SIDE) or w % 8 or h % 8:
            raise SettingsError(f"size = {w}x{h}: width and height must be multiples of 8 from {MIN_SIDE} "
                                f"to {MAX_SIDE}")
        if not 0.0 <= self.strength <= 1.0:
            raise SettingsError(f"strength = {self.strength}: must be between 0 and 1")
        if not 1 <= self.steps <= 4:
            raise SettingsError(f"steps = {self.steps}: must be 1 to 4")
        if len(self.timesteps) > 4 or any(not 0 <= t < 1000 for t in self.timesteps) \
                or list(self.timesteps) != sorted(self.timesteps, reverse=True):
            raise SettingsError(f"timesteps = {self.timesteps}: 1 to 4 decreasing values in [0, 1000)")
        if not 0 <= self.seed < SEED_RANGE:
            raise SettingsError(f"seed = {self.seed}: must be 0 to 2**63 - 1")
        if self.guidance not in GUIDANCE:
            raise SettingsError(f"guidance = {shown(self.guidance)}: must be one of {', '.join(GUIDANCE)}")
        if not 0.0 <= self.guidance_scale <= MAX_GUIDANCE_SCALE:
            raise SettingsError(f"guidance_scale = {self.guidance_scale}: must be 0 to {MAX_GUIDANCE_SCALE}")
        for name in ("style", "prompt", "negative"):
            if len(getattr(self, name)) > MAX_TEXT:
                raise SettingsError(f"{name} is {len(getattr(self, name))} characters long (at most {MAX_TEXT})")
        style_blend(self.style)  # a blend the style code would refuse is refused here, naming it

    @classmethod
    def from_preset(cls, preset: Preset, size: tuple[int, int] = (256, 256), **changes) -> StreamSettings:
        """A preset's look at a processing size; `changes` override single fields."""
        base = cls(size=size, style=preset.style or DEFAULT_PRESET, prompt=preset.prompt,
                   negative=preset.negative, strength=preset.strength, steps=preset.steps, seed=preset.seed,
                   temporal=TemporalSettings() if preset.temporal else TemporalSettings.off(),
                   controls=preset.controls)
        return base.replace(**changes)

    def replace(self, **changes) -> StreamSettings:
        """A copy with some fields changed, checked; an unknown field is an error."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise SettingsError(f"unknown stream setting {sorted(unknown)[0]!r}")
        return dataclasses.replace(self, **changes)


_TUPLE_ITEMS["controls"] = Control


def processing_size(width: int, height: int, short_side: int = 256) -> tuple[int, int]:
    """A processing size for (width, height) input: the short side at `short_side`, the
    aspect ratio kept, both rounded to multiples of 8 and kept within MIN_SIDE..MAX_SIDE
    (a very long, thin frame has its long side capped instead)."""
    scale = min(short_side / min(width, height), MAX_SIDE / max(width, height))
    def side(n: int) -> int:
        return min(MAX_SIDE, max(MIN_SIDE, round(n * scale / 8) * 8))
    return side(width), side(height)

