"""Loading SD-class checkpoints into livestyle's own models.

Three shapes of checkpoint are taken, as users have them:

(a) a diffusers folder: `model_index.json`, `unet/`, `vae/`, `text_encoder/`,
    `tokenizer/`, `scheduler/` (or one of those component folders on its own); SDXL's
    adds `text_encoder_2/` and `tokenizer_2/`;
(b) one original-layout `.safetensors` file (A1111/Civitai: `model.diffusion_model.*`,
    `first_stage_model.*`, `cond_stage_model.*`), SD 1.x and SD 2.x told apart by shapes;
    SDXL's holds `conditioner.embedders.0.transformer.*` (CLIP ViT-L) and
    `conditioner.embedders.1.model.*` (OpenCLIP ViT-bigG) instead of `cond_stage_model.*`;
(c) tiny autoencoders: TAESD-family `*_encoder.safetensors` + `*_decoder.safetensors`
    (or the folder holding them) or a diffusers AutoencoderTiny folder;
(d) livestyle's demo model folder (demo.py writes it): `model_index.json` with
    `_class_name` "LivestyleDemoPipeline", `unet/`, `vae/` (a LiteAutoencoder),
    `styles/styles.safetensors` (a StyleBank instead of a text encoder), `scheduler/`.

Our models use upstream's parameter names, so a diffusers-layout state dict loads as it
is and original layouts are renamed first (convert_*.py). Weights are read on the CPU,
loaded into a model built on the meta device (no wasted random init of ~1e9 floats),
then moved to the requested device and dtype.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from livestyle.errors import CheckpointError
from livestyle.models.checkpoint import (
    classify, describe, load_into, read_header, read_safetensors, strip_prefix, unsupported,
)
from livestyle.models.clip import TextEncoder, TextEncoderConfig
from livestyle.models.convert_clip import text_encoder_from_original, text_encoder_from_transformers
from livestyle.models.controlnet import ControlNet, ControlNetConfig, controlnet_mismatch
from livestyle.models.convert_controlnet import (
    PREFIX as CONTROLNET_PREFIX, controlnet_config_from_diffusers_shapes, controlnet_config_from_original,
    controlnet_from_original,
)
from livestyle.models.convert_unet import unet_config_from_original, unet_from_original
from livestyle.models.convert_vae import vae_config_from_original, vae_from_original, vae_to_original
from livestyle.models.lite_autoencoder import LiteAutoencoder, LiteAutoencoderConfig
from livestyle.models.lora import fuse_loras
from livestyle.models.prompt import PromptCache, SDXLPromptCache
from livestyle.models.styles import StyleBank
from livestyle.models.taesd import TinyAutoencoder, split_tiny_state_dict, tiny_from_diffusers
from livestyle.models.tokenizer import Tokenizer
from livestyle.models.unet import UNet, UNetConfig
from livestyle.models.vae import KLAutoencoder, KLAutoencoderConfig

Autoencoder = TinyAutoencoder | KLAutoencoder | LiteAutoencoder


def decode_frames(autoencoder: Autoencoder, latents: torch.Tensor, frames: torch.Tensor | None) -> torch.Tensor:
    """autoencoder.decode(latents), given the frames (B, 3, H, W) in [0, 1] the latents were made
    from when its decoder reads them (a guided LiteAutoencoder); the others take the latents alone
    (frames may then be None)."""
    return autoencoder.decode(latents, frames) if autoencoder.guided else autoencoder.decode(latents)


_UNET = "model.diffusion_model."
_VAE = "first_stage_model."
_TEXT = "cond_stage_model."
_SDXL_TEXT = "conditioner.embedders.0."  # CLIP ViT-L, transformers layout under `transformer.`
_SDXL_TEXT_2 = "conditioner.embedders.1."  # OpenCLIP ViT-bigG, open_clip layout under `model.`
SDXL_SCALING_FACTOR = 0.13025  # SDXL's VAE latent scale (SD 1.x/2.x: 0.18215); no file states it
_WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
DEMO_PIPELINE_CLASS = "LivestyleDemoPipeline"  # model_index.json `_class_name` of the demo format
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow_velocity")


@dataclass(frozen=True)
class NoiseSchedule:
    """The training noise schedule and what the U-Net predicts (diffusers' scheduler config)."""

    # "epsilon" or "v_prediction" (SD); "flow_velocity": the demo model's rectified-flow
    # bridge velocity (samplers.sample_bridge), timesteps t * num_train_timesteps for t in [0, 1].
    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "NoiseSchedule":
        fields = {k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg}
        schedule = cls(**fields)
        if schedule.prediction_type not in PREDICTION_TYPES:
            raise CheckpointError(f"scheduler prediction_type {schedule.prediction_type!r} is not supported "
                                  f"({', '.join(PREDICTION_TYPES)})")
        return schedule


@dataclass
class TextModel:
    """A text encoder with the tokenizer that belongs to it."""

    encoder: TextEncoder
    tokenizer: Tokenizer


@dataclass
class Pipeline:
    """Everything the stream engine needs from an SD-class checkpoint.

    family: "sd1" (768-d CLIP ViT-L context), "sd2" (1024-d OpenCLIP ViT-H context),
    "sdxl" (SDXL / SDXL-Turbo: 2048-d context from two encoders, plus added conditioning)
    or "demo" (livestyle's embedded model: no text encoder, `text` is None, and the
    U-Net's context comes from `styles`).

    SDXL: `text` is CLIP ViT-L, `text_2` OpenCLIP ViT-bigG with its projection. The U-Net
    is called `unet(x, t, prompt.context, text_embeds=prompt.pooled, time_ids=...)`, the
    prompt from `prompt_cache()` and the time ids from `time_ids(height, width)`, each
    expanded to the batch. zero_empty_negative: diffusers' force_zeros_for_empty_prompt
    (model_index.json; SDXL's default): an empty negative prompt is all zeros, context and
    pooled alike, not the encoding of "". The autoencoder may be kept in fp32 under an
    fp16 pipeline (SDXL's VAE overflows in fp16): it takes and returns the caller's
    dtype, so move it with `.to(device)` only, not to the pipeline's dtype.
    """

    family: str
    unet: UNet
    autoencoder: Autoencoder
    text: TextModel | None
    schedule: NoiseSchedule
    source: Path
    styles: StyleBank | None = None
    text_2: TextModel | None = None
    zero_empty_negative: bool = False

    def prompt_cache(self, max_entries: int = 16) -> PromptCache:
        """A cache of prompt embeddings for this pipeline's text encoder(s): cache(text) ->
        (1, 77k, D) context (SD 1.x/2.x) or an SDXLPrompt (context (1, 77k, 2048) and
        pooled (1, 1280)). Prompts are encoded once, on the encoders' device and dtype."""
        if self.text is None:
            raise ValueError(f"the {self.family} pipeline has no text encoder")
        if self.text_2 is not None:
            return SDXLPromptCache(self.text.encoder, self.text.tokenizer, self.text_2.encoder,
                                   self.text_2.tokenizer, max_entries=max_entries)
        return PromptCache(self.text.encoder, self.text.tokenizer, max_entries=max_entries)

    def time_ids(self, height: int, width: int) -> torch.Tensor:
        """SDXL's size conditioning for frames processed at height x width pixels.

        Returns (1, 6) float32 [original h, w, crop top, left, target h, w] =
        [h, w, 0, 0, h, w]: an uncropped frame at the processing size, what diffusers'
        StableDiffusionXLPipeline passes for an image of that size (its add_time_ids).
        Expand it to (B, 6), on the U-Net's device, as the U-Net's `time_ids`.
        """
        if self.family != "sdxl":
            raise ValueError(f"time ids are SDXL's conditioning; this is an {self.family} pipeline")
        if height <= 0 or width <= 0:
            raise ValueError(f"frame size must be positive, got {height}x{width}")
        return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)


# -- Files and folders ---------------------------------------------------------------------

def _component_weights(folder: Path) -> Path:
    """The safetensors weight file of a diffusers/transformers component folder."""
    for stem in _WEIGHT_NAMES:
        for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
            if (folder / name).is_file():
                return folder / name
        if (folder / f"{stem}.safetensors.index.json").is_file():
            return folder / f"{stem}.safetensors.index.json"
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
    if pickles:
        raise CheckpointError(
            f"{folder}: has only pickle weights ({pickles[0]}); livestyle reads only .safetensors: "
            "re-save the model with diffusers' save_pretrained(..., safe_serialization=True)"
        )
    raise CheckpointError(f"{folder}: no .safetensors weights in this folder")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".index.json"):  # sharded: {"weight_map": {key: shard file}}
        shards = sorted(set(_read_json(path).get("weight_map", {}).values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_safetensors(path.parent / shard))
        return state
    return read_safetensors(path)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON table ({{...}}), got {type(data).__name__}")
    return data


def _config(read, cfg: dict, source: Path):  # source: the JSON file, for messages
    """read(cfg): a model config from a config.json table, its values checked once here.

    A value of the wrong type or range (a string where a number goes, a negative width)
    is one CheckpointError naming the file, not a traceback from deep in a model's init.
    """
    try:
        config = read(cfg)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
        raise CheckpointError(f"{source}: a value has the wrong type or range ({str(e)[:200]})") from None
    for field in dataclasses.fields(config):
        value, default = getattr(config, field.name), field.default
        if default is None:
            ok = value is None or (type(value) is int and value > 0)
        elif type(default) is tuple:
            least = 0 if field.metadata.get("zero_ok") else 1  # e.g. a transformer depth of 0
            ok = type(value) is tuple and len(value) > 0 and all(
                type(v) is type(default[0]) and (type(v) is bool or v >= least) for v in value)
        elif type(default) is float:
            ok = type(value) in (int, float) and math.isfinite(value)
        elif type(default) is int:
            ok = type(value) is int and value >= 0
        else:
            ok = type(value) is type(default)
        if not ok:
            raise CheckpointError(f"{source}: {field.name} = {repr(value)[:60]} is not what "
                                  f"{type(config).__name__} takes (e.g. {default!r})")
    return config


def _read_component(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, state dict) of a diffusers component folder."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder")
    return _read_json(folder / "config.json"), _read_weights(_component_weights(folder))


def _read_single_file(path: Path) -> dict[str, torch.Tensor]:
    keys = read_header(path).keys()
    if why := unsupported(keys):
        raise CheckpointError(f"{path}: this looks like {why}")
    return read_safetensors(path)


def _build(cls, config, state: dict[str, torch.Tensor], source, device, dtype) -> nn.Module:
    """Build `cls(config)` without random init, load `state` strictly, move it to device/dtype."""
    try:
        with torch.device("meta"):
            module = cls(config)
    except (ValueError, RuntimeError, TypeError) as e:  # e.g. groups that do not divide the channels
        raise CheckpointError(f"{source}: its config does not make a {cls.__name__} ({str(e)[:200]})") from None
    load_into(module, state, source, assign=True)
    meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if meta:  # a buffer the file does not hold; the model must compute it itself
        raise RuntimeError(f"{cls.__name__} left {meta[:3]} uninitialised after loading")
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _is_diffusers_pipeline(path: Path) -> bool:
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet").is_dir())


# -- U-Net ---------------------------------------------------------------------------------

def load_unet(path: str | Path, device="cpu", dtype=torch.float32,
              num_heads: tuple[int, ...] | None = None) -> UNet:
    """A U-Net from a diffusers folder (pipeline or `unet/`) or an original single file.

    num_heads: per-level head counts for a single file whose layout is not SD's own
    (SD 1.x uses 8 heads, SD 2.x 64-d heads; shapes do not store this).
    """
    path = Path(path)
    if path.is_dir():
        folder = path / "unet" if _is_diffusers_pipeline(path) else path
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{path}: not a diffusers U-Net folder (no unet/ or config.json)")
        cfg, state = _read_component(folder)
        if why := unsupported(state.keys()):
            raise CheckpointError(f"{folder}: this looks like {why}")
        if cfg.get("_class_name") == "ControlNetModel":
            raise CheckpointError(f"{folder}: a ControlNet, not a U-Net; load it with load_controlnet")
        config = _config(UNetConfig.from_diffusers, cfg, folder / "config.json")
        return _build(UNet, config, state, folder, device, dtype)
    state = _read_single_file(path)
    kind, what = classify(state.keys())
    if kind == "controlnet":
        raise CheckpointError(f"{path}: {what}, not a U-Net; load it with load_controlnet")
    unet_state = strip_prefix(state, _UNET) if any(k.startswith(_UNET) for k in state) else state
    if "input_blocks.0.0.weight" not in unet_state:
        raise CheckpointError(f"{path}: no U-Net in this file; it looks like {describe(state.keys())}")
    return _unet_from_original(unet_state, path, device, dtype, num_heads)


def _unet_from_original(state, source, device, dtype, num_heads=None) -> UNet:
    config = unet_config_from_original({k: tuple(v.shape) for k, v in state.items()}, num_heads=num_heads)
    return _build(UNet, config, unet_from_original(state, config), source, device, dtype)


# -- ControlNet -----------------------------------------------------------------------------

def load_controlnet(path: str | Path, device="cpu", dtype=torch.float32, unet: UNet | None = None,
                    num_heads: tuple[int, ...] | None = None) -> ControlNet:
    """A ControlNet (SD 1.x, SD 2.x or SDXL) from a diffusers folder (`config.json` + weights,
    or a pipeline folder's `controlnet/`) or one `.safetensors` file: the original layout
    (`control_model.*` or bare `input_hint_block`/`zero_convs`/`middle_block_out`), or
    diffusers weights without their config.json (the config is read from the shapes).

    unet: the U-Net it will drive; a ControlNet made for another model (an SD 1.5 ControlNet
    with an SDXL U-Net, say) is one CheckpointError naming both. num_heads: as for load_unet.
    """
    path = Path(path)
    if path.is_dir():
        folder = path / "controlnet" if (path / "controlnet").is_dir() else path
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{path}: not a diffusers ControlNet folder (no config.json or controlnet/)")
        cfg, state = _read_component(folder)
        if cfg.get("_class_name", "ControlNetModel") != "ControlNetModel":
            raise CheckpointError(f"{folder}: a {cfg['_class_name']}, not a ControlNetModel")
        config = _config(ControlNetConfig.from_diffusers, cfg, folder / "config.json")
        model = _build(ControlNet, config, state, folder, device, dtype)
    else:
        state = _read_single_file(path)
        kind, what = classify(state.keys())
        if kind != "controlnet":
            raise CheckpointError(f"{path}: not a ControlNet; it looks like {what}")
        try:
            if "controlnet_cond_embedding.conv_in.weight" in state:  # diffusers layout
                config = controlnet_config_from_diffusers_shapes({k: tuple(v.shape) for k, v in state.items()},
                                                                 num_heads)
            else:
                if any(k.startswith(CONTROLNET_PREFIX) for k in state):  # may sit beside a whole SD model
                    state = strip_prefix(state, CONTROLNET_PREFIX)
                config = controlnet_config_from_original({k: tuple(v.shape) for k, v in state.items()}, num_heads)
                state = controlnet_from_original(state, config)
        except CheckpointError as e:
            raise CheckpointError(f"{path}: {e}") from None
        model = _build(ControlNet, config, state, path, device, dtype)
    if unet is not None and (why := controlnet_mismatch(unet.config, model.config)):
        raise CheckpointError(f"{path}: {why}")
    return model


def describe_controlnet(path: str | Path, dtype=torch.float32) -> str | None:
    """What `livestyle inspect` prints for a ControlNet file or folder, after loading it (so a
    broken one fails here, with its one line); None when `path` holds no ControlNet."""
    path = Path(path)
    if not path.exists():
        return None
    if path.is_dir():
        if _is_diffusers_pipeline(path):  # a whole pipeline, ControlNet or not: described as one
            return None
        folder = path / "controlnet" if (path / "controlnet").is_dir() else path
        if not (folder / "config.json").is_file() or \
                _read_json(folder / "config.json").get("_class_name") != "ControlNetModel":
            return None
        what = "a ControlNet (diffusers folder)"
    else:
        kind, what = classify(read_header(path).keys())
        if kind != "controlnet":
            return None
    net = load_controlnet(path, dtype=dtype)
    config = net.config
    count = sum(p.numel() for p in net.parameters())
    return (f"{path}: {what}\n  controlnet   for {config.family} U-Nets, channels {config.block_out_channels}, "
            f"context {config.cross_attention_dim}, {config.conditioning_channels}-channel images at "
            f"{config.image_scale}x the latent size, {count / 1e6:.1f}M parameters")


# -- Autoencoders --------------------------------------------------------------------------

def load_autoencoder(path: str | Path, device="cpu", dtype=torch.float32, family: str | None = None,
                     upcast: bool | None = None) -> Autoencoder:
    """A tiny (TAESD-family), KL or lite (demo) autoencoder; which one is read from the weights.

    Takes: a diffusers pipeline folder (its `vae/`), a diffusers AutoencoderKL or
    AutoencoderTiny folder, a LiteAutoencoder folder (config.json `_class_name`), a TAESD
    `*_encoder.safetensors`/`*_decoder.safetensors` file
    (its partner is found beside it) or the folder holding the pair, a standalone VAE
    file, or an original single-file checkpoint (its `first_stage_model.*`).

    family: "sdxl" when the autoencoder serves an SDXL U-Net. SD's and SDXL's KL VAEs
        have the same shapes, so a VAE file without config.json then scales its latents
        by SDXL's 0.13025 instead of SD's 0.18215 (a diffusers folder's config says its
        own). TAESD and TAESDXL cannot be told apart either (same architecture, scale 1,
        different latent space): pass the one made for the checkpoint.
    upcast: keep a KL VAE in fp32 when dtype is fp16; it still takes and returns fp16
        (SDXL's VAE overflows in fp16, as diffusers' force_upcast says). None: for family
        "sdxl", its config's force_upcast (on without a config: the fp16-fixed SDXL VAE
        says false in its own); never for SD 1.x/2.x.
    """
    path = Path(path)
    sdxl = family == "sdxl"
    if path.is_dir():
        if _is_diffusers_pipeline(path):
            path = path / "vae"
        if (path / "config.json").is_file():
            cfg, state = _read_component(path)
            if cfg.get("_class_name") == "LiteAutoencoder":
                config = _config(LiteAutoencoderConfig.from_diffusers, cfg, path / "config.json")
                return _build(LiteAutoencoder, config, state, path, device, dtype)
            if cfg.get("_class_name") == "AutoencoderTiny" or any(k.startswith("encoder.layers.") for k in state):
                return _tiny(*tiny_from_diffusers(state), path, device, dtype)
            config = _config(KLAutoencoderConfig.from_diffusers, cfg, path / "config.json")
            if upcast is None:
                upcast = sdxl and cfg.get("force_upcast", True) is not False  # diffusers' default: True
            return _build(KLAutoencoder, config, state, path, device, _kl_dtype(dtype, upcast))
        pair = _taesd_pair(path)
        if pair:
            return _tiny(read_safetensors(pair[0]), read_safetensors(pair[1]), path, device, dtype)
        raise CheckpointError(f"{path}: not an autoencoder folder (no config.json, no *_encoder/*_decoder.safetensors)")
    name = path.name
    if name.endswith(("_encoder.safetensors", "_decoder.safetensors")) and path.is_file():
        pair = _taesd_pair(path.parent, stem=name.rsplit("_", 1)[0])
        if not pair:
            raise CheckpointError(f"{path}: its partner {name.rsplit('_', 1)[0]}_"
                                  f"{'decoder' if name.endswith('_encoder.safetensors') else 'encoder'}"
                                  ".safetensors is not beside it")
        return _tiny(read_safetensors(pair[0]), read_safetensors(pair[1]), path, device, dtype)
    state = _read_single_file(path)
    if any(k.startswith(_VAE) for k in state):
        state = strip_prefix(state, _VAE)
    if any(k.startswith("encoder.layers.") for k in state):
        return _tiny(*tiny_from_diffusers(state), path, device, dtype)
    if "1.conv.0.weight" in state or "encoder.1.conv.0.weight" in state:
        return _tiny(*split_tiny_state_dict(state), path, device, dtype)
    return _kl_from_state(state, path, device, dtype, sdxl, sdxl if upcast is None else upcast)


def _kl_from_state(state, source, device, dtype, sdxl: bool = False, upcast: bool = False) -> KLAutoencoder:
    """A KL VAE from a state dict with no config: the shapes say its size, `sdxl` its scale."""
    scale = {"scaling_factor": SDXL_SCALING_FACTOR} if sdxl else {}
    dtype = _kl_dtype(dtype, upcast)
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in state:  # diffusers layout, no config.json
        original = vae_to_original(state)
        config = vae_config_from_original({k: tuple(v.shape) for k, v in original.items()}, **scale)
        return _build(KLAutoencoder, config, state, source, device, dtype)
    if "encoder.down.0.block.0.conv1.weight" in state:  # original layout
        config = vae_config_from_original({k: tuple(v.shape) for k, v in state.items()}, **scale)
        return _build(KLAutoencoder, config, vae_from_original(state), source, device, dtype)
    raise CheckpointError(f"{source}: no autoencoder in this file; it looks like {describe(state.keys())}")


def _kl_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    """fp32 for an upcast VAE in an fp16 pipeline (bf16 has fp32's range: no overflow to avoid)."""
    return torch.float32 if upcast and dtype == torch.float16 else dtype


def _taesd_pair(folder: Path, stem: str | None = None) -> tuple[Path, Path] | None:
    encoders = [folder / f"{stem}_encoder.safetensors"] if stem else sorted(folder.glob("*_encoder.safetensors"))
    for enc in encoders:
        dec = enc.with_name(enc.name.replace("_encoder.safetensors", "_decoder.safetensors"))
        if enc.is_file() and dec.is_file():
            return enc, dec
    return None


def _tiny(encoder_state, decoder_state, source, device, dtype) -> TinyAutoencoder:
    try:
        model = TinyAutoencoder.from_state_dicts(encoder_state, decoder_state)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# -- Text ----------------------------------------------------------------------------------

def load_text_encoder(path: str | Path, device="cpu", dtype=torch.float32) -> TextModel:
    """The CLIP text encoder and its tokenizer.

    From a diffusers pipeline folder (`text_encoder/` + `tokenizer/`) or an original
    single file (`cond_stage_model.*`; the tokenizer then is CLIP's own BPE vocabulary,
    shipped with livestyle: single files carry none).
    """
    path = Path(path)
    if path.is_dir():
        if not _is_diffusers_pipeline(path):
            raise CheckpointError(f"{path}: not a diffusers pipeline folder (no model_index.json or unet/)")
        if (path / "text_encoder_2").is_dir():
            raise CheckpointError(f"{path}: an SDXL folder has two text encoders; load_sdxl_text_encoders loads them")
        return _text_from_folder(path, "text_encoder", "tokenizer", device, dtype)
    state = _read_single_file(path)
    if any(k.startswith(_SDXL_TEXT) for k in state):
        raise CheckpointError(f"{path}: an SDXL file has two text encoders; load_sdxl_text_encoders loads them")
    return _text_from_original(state, path, device, dtype)


def load_sdxl_text_encoders(path: str | Path, device="cpu", dtype=torch.float32) -> tuple[TextModel, TextModel]:
    """SDXL's two text encoders with their tokenizers: (CLIP ViT-L, OpenCLIP ViT-bigG with projection).

    From a diffusers SDXL folder (`text_encoder/` + `tokenizer/`, `text_encoder_2/` +
    `tokenizer_2/`) or an SDXL single file (`conditioner.embedders.0.transformer.*`,
    `conditioner.embedders.1.model.*`; CLIP's vocabulary shipped with livestyle, padded
    with the end-of-text token and with "!" as SDXL's two tokenizers are).
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "text_encoder_2").is_dir():
            raise CheckpointError(f"{path}: not an SDXL folder (no text_encoder_2/)")
        return (_text_from_folder(path, "text_encoder", "tokenizer", device, dtype),
                _text_from_folder(path, "text_encoder_2", "tokenizer_2", device, dtype))
    return _sdxl_text_from_original(_read_single_file(path), path, device, dtype)


def _text_from_folder(path: Path, encoder: str, tokenizer: str, device, dtype) -> TextModel:
    """One text encoder folder (CLIPTextModel or CLIPTextModelWithProjection) and its tokenizer folder."""
    folder = path / encoder
    cfg, state = _read_component(folder)
    # transformers 5 saves CLIPTextModel without the `text_model.` prefix; both load.
    state = text_encoder_from_transformers(state)
    config = _config(lambda c: TextEncoderConfig.from_transformers(c, "text_projection.weight" in state),
                     cfg, folder / "config.json")
    model = _build(TextEncoder, config, state, folder, device, dtype)
    if not (path / tokenizer).is_dir():
        raise CheckpointError(f"{path}: has {encoder}/ but no {tokenizer}/")
    return TextModel(model, Tokenizer.from_folder(path / tokenizer))


def _text_from_original(state, source, device, dtype) -> TextModel:
    text_state = strip_prefix(state, _TEXT)
    if not text_state:
        raise CheckpointError(f"{source}: no text encoder (cond_stage_model.*) in this file; "
                              f"it looks like {describe(state.keys())}")
    try:
        converted, config = text_encoder_from_original(text_state)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    encoder = _build(TextEncoder, config, converted, source, device, dtype)
    # SD 2.x (OpenCLIP) pads with "!" (id 0), SD 1.x with the end-of-text token.
    pad = "!" if config.hidden_size == 1024 else "<|endoftext|>"
    return TextModel(encoder, Tokenizer.bundled(pad_token=pad))


def _sdxl_text_from_original(state, source, device, dtype) -> tuple[TextModel, TextModel]:
    models = []
    for prefix, keep_last, pad in ((_SDXL_TEXT, False, "<|endoftext|>"), (_SDXL_TEXT_2, True, "!")):
        part = strip_prefix(state, prefix)
        if not part:
            raise CheckpointError(f"{source}: no SDXL text encoder under {prefix}*; "
                                  f"it looks like {describe(state.keys())}")
        try:  # ViT-L in the SD 1.x layout; bigG in open_clip's, every layer and the projection kept
            converted, config = text_encoder_from_original(part, keep_last=keep_last)
        except CheckpointError as e:
            raise CheckpointError(f"{source}: {prefix}*: {e}") from None
        models.append(TextModel(_build(TextEncoder, config, converted, source, device, dtype),
                                Tokenizer.bundled(pad_token=pad)))
    if models[1].encoder.config.projection_dim is None:
        raise CheckpointError(f"{source}: SDXL's second text encoder has no text_projection")
    return models[0], models[1]


# -- Whole pipelines -----------------------------------------------------------------------

def load_pipeline(path: str | Path, device="cpu", dtype=torch.float32,
                  autoencoder: str | Path | None = None,
                  loras: tuple[tuple[str | Path, float], ...] = (),
                  vae_upcast: bool | None = None, num_heads: tuple[int, ...] | None = None) -> Pipeline:
    """U-Net, autoencoder, text encoder(s) + tokenizer(s) and noise schedule of one checkpoint.

    path: a diffusers folder, an original single `.safetensors` file, or a demo model
        folder (family "demo": a StyleBank in place of the text encoder). SD 1.x, 2.x and
        SDXL (family "sdxl": a diffusers folder with text_encoder_2/, or a single file
        with conditioner.embedders.*) are told apart by what they hold.
    autoencoder: optional replacement autoencoder (e.g. TAESD, or TAESDXL for SDXL, for
        speed), anything `load_autoencoder` takes.
    loras: (LoRA file, scale) pairs, fused into the U-Net and text encoder weights
        (SDXL: both encoders, kohya lora_te1_/lora_te2_ or text_encoder./text_encoder_2.).
    vae_upcast: load_autoencoder's `upcast` (SDXL's KL VAE kept in fp32 under fp16).
    num_heads: load_unet's, for a single file whose U-Net is not laid out as SD's own.
    """
    path = Path(path)
    if _is_demo(path):
        return _load_demo(path, device, dtype, autoencoder, loras)
    if path.is_dir():
        if not _is_diffusers_pipeline(path):
            found = ", ".join(sorted(p.name for p in path.iterdir())[:6]) or "nothing"
            raise CheckpointError(f"{path}: not a diffusers model folder: no model_index.json and no unet/ "
                                  f"(found: {found})")
        if not (path / "unet").is_dir():
            found = ", ".join(sorted(p.name for p in path.iterdir() if p.is_dir())) or "no subfolders"
            raise CheckpointError(f"{path}: diffusers folder without unet/ (found: {found})")
        sdxl = (path / "text_encoder_2").is_dir()
        if sdxl and not (path / "text_encoder").is_dir():
            raise CheckpointError(f"{path}: text_encoder_2/ without text_encoder/: an SDXL refiner, "
                                  "which restyles nothing on its own; load the SDXL base or Turbo")
        unet = load_unet(path, device, dtype)
        vae = load_autoencoder(autoencoder or path, device, dtype, "sdxl" if sdxl else None, vae_upcast)
        texts = load_sdxl_text_encoders(path, device, dtype) if sdxl else (load_text_encoder(path, device, dtype),)
        sched = path / "scheduler" / "scheduler_config.json"
        schedule = (_config(NoiseSchedule.from_diffusers, _read_json(sched), sched) if sched.is_file()
                    else NoiseSchedule())
        index = path / "model_index.json"
        zero_empty_negative = sdxl and (not index.is_file()
                                        or _read_json(index).get("force_zeros_for_empty_prompt", True) is not False)
    else:
        state = _read_single_file(path)
        sdxl = any(k.startswith("conditioner.embedders.") for k in state)
        text_prefixes = (_SDXL_TEXT, _SDXL_TEXT_2) if sdxl else (_TEXT,)
        if not any(k.startswith(_UNET) for k in state):
            raise CheckpointError(f"{path}: not a full SD checkpoint (no model.diffusion_model.*); "
                                  f"it looks like {describe(state.keys())}")
        if sdxl and any(k.startswith(_SDXL_TEXT + "model.") for k in state):
            raise CheckpointError(f"{path}: an SDXL refiner (OpenCLIP bigG alone at conditioner.embedders.0), "
                                  "which restyles nothing on its own; load the SDXL base or Turbo")
        for prefix in text_prefixes:
            if not any(k.startswith(prefix) for k in state):
                raise CheckpointError(f"{path}: has no text encoder ({prefix}*)")
        if not any(k.startswith(_VAE) for k in state) and autoencoder is None:
            raise CheckpointError(f"{path}: has no VAE (first_stage_model.*); pass an autoencoder")
        unet = _unet_from_original(strip_prefix(state, _UNET), path, device, dtype, num_heads)
        upcast = sdxl if vae_upcast is None else vae_upcast  # no config here: SDXL's VAE overflows in fp16
        vae = (load_autoencoder(autoencoder, device, dtype, "sdxl" if sdxl else None, vae_upcast) if autoencoder
               else _kl_from_state(strip_prefix(state, _VAE), path, device, dtype, sdxl, upcast))
        texts = (_sdxl_text_from_original(state, path, device, dtype) if sdxl
                 else (_text_from_original(state, path, device, dtype),))
        schedule = NoiseSchedule()
        zero_empty_negative = sdxl  # diffusers' SDXL default
        del state
    if mismatch := _text_mismatch(unet.config, [t.encoder.config for t in texts]):
        raise CheckpointError(f"{path}: {mismatch}")
    if loras:  # SDXL: lora_te1_/text_encoder.* into the first encoder, lora_te2_/text_encoder_2.* the second
        fuse_loras([(read_safetensors(p), scale) for p, scale in loras], unet, texts[0].encoder,
                   texts[1].encoder if sdxl else None)
    family = "sdxl" if sdxl else "sd2" if unet.config.cross_attention_dim == 1024 else "sd1"
    return Pipeline(family, unet, vae, texts[0], schedule, path, text_2=texts[1] if sdxl else None,
                    zero_empty_negative=zero_empty_negative)


def _text_mismatch(unet: UNetConfig, texts: list[TextEncoderConfig]) -> str | None:
    """Why these text encoders cannot condition this U-Net, or None."""
    if unet.added_conditioning != (len(texts) == 2):
        if unet.added_conditioning:
            return "the U-Net is SDXL's (it takes pooled text and time ids), but there is one text encoder"
        return "two text encoders (SDXL's) for a U-Net without SDXL's added conditioning"
    context = unet.cross_attention_dim
    given = sum(t.hidden_size for t in texts)
    if context != given:
        encoders = "the text encoders give" if len(texts) > 1 else "the text encoder gives"
        return f"the U-Net expects {context}-d text features, {encoders} {given}"
    if unet.added_conditioning:
        pooled = texts[1].projection_dim or texts[1].hidden_size
        added = pooled + 6 * unet.addition_time_embed_dim  # text_embeds, then 6 time ids' sinusoids
        if added != unet.projection_class_embeddings_input_dim:
            return (f"the U-Net's added embedding takes {unet.projection_class_embeddings_input_dim} features, "
                    f"the second text encoder's {pooled}-d pooled output and 6 time ids make {added}")
    return None


def demo_parts_mismatch(unet: UNet, autoencoder: Autoencoder, styles: StyleBank) -> str | None:
    """Why a U-Net, autoencoder and style bank cannot form one demo model, or None."""
    if styles.dim != unet.config.cross_attention_dim:
        return (f"the U-Net expects {unet.config.cross_attention_dim}-d style context, "
                f"the style bank holds {styles.dim}-d embeddings")
    if autoencoder.latent_channels != unet.config.in_channels:
        return (f"the U-Net takes {unet.config.in_channels}-channel latents, "
                f"the autoencoder makes {autoencoder.latent_channels}")
    return None


def _is_demo(path: Path) -> bool:
    if not path.is_dir():
        return False
    index = path / "model_index.json"
    if index.is_file() and _read_json(index).get("_class_name") == DEMO_PIPELINE_CLASS:
        return True
    return (path / "styles").is_dir()


def _load_demo(path: Path, device, dtype, autoencoder, loras) -> Pipeline:
    """The demo model folder: U-Net, LiteAutoencoder, StyleBank, flow-bridge schedule."""
    missing = [d for d in ("unet", "vae", "styles") if not (path / d).is_dir()]
    if missing:
        raise CheckpointError(f"{path}: demo model folder without {', '.join(d + '/' for d in missing)}")
    unet = load_unet(path, device, dtype)
    vae = load_autoencoder(autoencoder or path, device, dtype)
    styles = StyleBank.load(path / "styles" / "styles.safetensors", device, dtype).requires_grad_(False)
    sched = path / "scheduler" / "scheduler_config.json"
    schedule = (_config(NoiseSchedule.from_diffusers, _read_json(sched), sched) if sched.is_file()
                else NoiseSchedule(prediction_type="flow_velocity"))
    if mismatch := demo_parts_mismatch(unet, vae, styles):
        raise CheckpointError(f"{path}: {mismatch}")
    if loras:  # there is no text encoder: a LoRA can only touch the U-Net
        fuse_loras([(read_safetensors(p), scale) for p, scale in loras], unet, None)
    return Pipeline("demo", unet, vae, None, schedule, path, styles)
