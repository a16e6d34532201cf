"""A stream's ControlNets: checking them against the model, their scales per step, and their
conditioning images per frame.

    check(controls, unet_config)            on the caller's thread: one line per bad control
    scales(controls, steps) -> (N, S)        each net's scale at each denoising step
    host_edges(rgb) -> uint8 (H, W)          Canny edges, host work, on the submitting thread
    images(controls, frame, edges, previous) each net's image for one frame, on the device

Images are made at the processing size (ControlNets take 8x the latent size), from the
frame as the engine holds it, (1, 3, H, W) in [0, 1] on the device:

- "canny": OpenCV's Canny on the processing-size RGB, computed where the flow is, on the
  submitting thread (Stream.submit): hysteresis is sequential CPU work, and on the worker
  it would be a host round trip per frame with the device waiting.
- "soft_edges", "depth:NAME": on the device (two small convolutions; the depth network).
- "temporalnet": the stream's previous output frame, warped along the motion to this
  frame when the flow is on (the engine's warp), the current frame where there is no
  previous output yet, as Daydream's StreamDiffusion fork does (its TemporalNet
  preprocessor duplicates the current frame for the first one).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from livestyle.config import Control, find_model
from livestyle.errors import CheckpointError, LivestyleError
from livestyle.models import control_inputs
from livestyle.models.checkpoint import classify, read_header
from livestyle.models.controlnet import ControlNetConfig, ControlSettings, controlnet_mismatch
from livestyle.models.convert_controlnet import (
    PREFIX, controlnet_config_from_diffusers_shapes, controlnet_config_from_original,
)
from livestyle.models.unet import UNetConfig

IMAGE_SCALE = 8  # the engine's latents are 1/8 of the processing size: ControlNets must take 8x images


def path_of(control: Control) -> Path:
    """The ControlNet's file or folder, found as a model is (a path, or a name under models_dir())."""
    return find_model(control.net, "ControlNet").resolve()


def read_config(path: Path) -> ControlNetConfig:
    """A ControlNet's config from its config.json or its safetensors header, without loading
    the weights (an SDXL ControlNet is 2.5 GB). CheckpointError for anything else."""
    if path.is_dir():
        folder = path / "controlnet" if (path / "controlnet").is_dir() else path
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{path}: not a diffusers ControlNet folder (no config.json or controlnet/)")
        try:
            cfg = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{folder / 'config.json'}: cannot be read ({e})") from None
        if cfg.get("_class_name", "ControlNetModel") != "ControlNetModel":
            raise CheckpointError(f"{folder}: a {cfg['_class_name']}, not a ControlNetModel")
        return ControlNetConfig.from_diffusers(cfg)
    shapes = {k: info.shape for k, info in read_header(path).items()}
    kind, what = classify(shapes.keys())
    if kind != "controlnet":
        raise CheckpointError(f"{path}: not a ControlNet; it looks like {what}")
    try:
        if "controlnet_cond_embedding.conv_in.weight" in shapes:  # diffusers layout
            return controlnet_config_from_diffusers_shapes(shapes)
        if any(k.startswith(PREFIX) for k in shapes):
            shapes = {k[len(PREFIX):]: v for k, v in shapes.items() if k.startswith(PREFIX)}
        return controlnet_config_from_original(shapes)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None


def mismatch(unet: UNetConfig, config: ControlNetConfig) -> str | None:
    """Why this ControlNet cannot run in the engine with this U-Net (one line), or None."""
    if why := controlnet_mismatch(unet, config):
        return why
    if config.image_scale != IMAGE_SCALE:
        return (f"the ControlNet takes images at {config.image_scale}x the latent size; the engine's are "
                f"{IMAGE_SCALE}x (the processing size)")
    if config.conditioning_channels != 3:
        return (f"the ControlNet takes {config.conditioning_channels}-channel images; the control inputs are RGB "
                "(3 channels)")
    return None


def check(controls: tuple[Control, ...], unet: UNetConfig, configs: dict | None = None) -> None:
    """LivestyleError, one line naming the control, for a ControlNet that is missing, unreadable
    or made for another model, or an input that cannot be made. configs: a cache of the
    configs read, by (path, modification time)."""
    for control in controls:
        name = control.net
        path = path_of(control)  # LivestyleError: "ControlNet 'x': no such file or folder, ..."
        try:
            stamp = (path, path.stat().st_mtime_ns)
            config = configs.get(stamp) if configs is not None else None
            if config is None:
                config = read_config(path)
                if configs is not None:
                    configs[stamp] = config
        except CheckpointError as e:
            raise LivestyleError(f"control {name!r}: {e}") from None
        if why := mismatch(unet, config):
            raise LivestyleError(f"control {name!r}: {why}")
        kind, _, estimator = control.input.partition(":")
        if kind == "depth" and estimator not in control_inputs.depth_estimators():
            known = ", ".join(control_inputs.depth_estimators()) or "none registered"
            raise LivestyleError(f"control input {control.input!r}: no depth estimator named {estimator!r} "
                                 f"({known}; plug one in with control_inputs.register_depth_estimator)")


def scales(controls: tuple[Control, ...], steps: int) -> np.ndarray:
    """(N, steps) fp32: each ControlNet's scale at each denoising step, 0 outside its
    start..end (diffusers' control_guidance_start/end rule, ControlSettings.scale_at)."""
    table = np.zeros((len(controls), steps), dtype=np.float32)
    for i, c in enumerate(controls):
        at = ControlSettings(c.scale, c.start, c.end)
        table[i] = [at.scale_at(k, steps) for k in range(steps)]
    return table


def needs_edges(controls: tuple[Control, ...]) -> bool:
    return any(c.input == "canny" for c in controls)


def warps(controls: tuple[Control, ...]) -> bool:
    """Whether a ControlNet sees the previous output warped along the motion (TemporalNet)."""
    return any(c.input == "temporalnet" for c in controls)


def host_edges(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB -> uint8 (H, W) Canny edges, 255 on an edge (control_inputs.canny's)."""
    return control_inputs.canny_edges(rgb)


def images(controls: tuple[Control, ...], frame: torch.Tensor, edges: np.ndarray | None,
           previous: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Each ControlNet's image for one frame, (1, 3, H, W) in [0, 1] in frame's dtype and device.

    frame: (1, 3, H, W) the processing-size input in [0, 1]; edges: its host_edges, for
    "canny"; previous(): TemporalNet's image (the engine's: the previous output, warped).
    An input two nets share is made once."""
    made: dict[str, torch.Tensor] = {}
    for control in controls:
        kind = control.input
        if kind in made:
            continue
        if kind == "canny":
            # uint8 crosses to the device (a quarter of the bytes), queued
            image = torch.from_numpy(edges).to(frame.device, non_blocking=True)[None, None]  # (1, 1, H, W)
            made[kind] = (image.to(frame.dtype) / 255).expand(-1, 3, -1, -1)
        elif kind == "soft_edges":
            made[kind] = control_inputs.soft_edges(frame)
        elif kind == "temporalnet":
            made[kind] = previous()
        else:  # "depth:NAME" (config.Control checked the form)
            made[kind] = control_inputs.depth_image(frame, kind.partition(":")[2])
    return tuple(made[c.input] for c in controls)
