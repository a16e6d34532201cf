"""The embedded demo model: its folder format, its U-Net shape, and where it ships.

The demo model is a small few-step restyler that runs on a CPU: a rectified-flow
bridge in the latent space of a LiteAutoencoder. z0 = encode(frame); the U-Net
predicts the velocity v(z_t, t, style) that carries z0 towards the latent of the
teacher-stylised frame; sampling integrates from t = 0 to t = strength
(samplers.sample_bridge: strength 0 gives the input back, 1 the full style). Styles
condition the U-Net through cross-attention, like a prompt, from a StyleBank.

The folder is diffusers-like, so each part is a familiar component folder:

    model_index.json                       {"_class_name": "LivestyleDemoPipeline", ...}
    unet/config.json                       diffusers UNet2DConditionModel keys
    unet/diffusion_pytorch_model.safetensors
    vae/config.json                        {"_class_name": "LiteAutoencoder", ...}
    vae/diffusion_pytorch_model.safetensors
    styles/styles.safetensors              StyleBank: "embeddings" (S, T, D) + names
    scheduler/scheduler_config.json        {"_class_name": "FlowBridgeScheduler",
                                            "prediction_type": "flow_velocity", ...}

Weights are stored in fp16 to keep the package small; loading upcasts them to the
requested dtype. loading.load_pipeline reads the folder (family "demo").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import livestyle
from livestyle.config import processing_size
from livestyle.errors import LivestyleError
from livestyle.models.lite_autoencoder import LiteAutoencoder
from livestyle.models.loading import DEMO_PIPELINE_CLASS, Pipeline, demo_parts_mismatch, load_pipeline
from livestyle.models.styles import StyleBank
from livestyle.models.unet import UNet, UNetConfig

DEMO_MODEL = Path(livestyle.__file__).parent / "weights" / "demo"  # the folder shipped in the package
SCHEDULER_CLASS = "FlowBridgeScheduler"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# The short side the demo model is evaluated and benchmarked at (24 fps goal at 256x256).
# Below it the latent gets too few cells for the U-Net's three levels (a 176x144 webcam at
# its own size gives a 22x18 latent and 6x5 at the attention level), so strokes and faces
# turn to mush; above it the CPU falls under 24 fps.
DEMO_SHORT_SIDE = 256


def demo_processing_size(width: int, height: int) -> tuple[int, int]:
    """The (width, height) the demo model should process a width x height source at.

    The short side at DEMO_SHORT_SIDE whatever the source: small sources are upscaled
    (176x144 -> 312x256, a 39x32 latent), large ones downscaled (1920x1080 -> 456x256),
    the aspect ratio kept and both sides multiples of 8 (config.processing_size).
    """
    return processing_size(width, height, DEMO_SHORT_SIDE)


def demo_unet_config(latent_channels: int = 16, style_dim: int = 64) -> UNetConfig:
    """The demo U-Net: three levels (32, 64, 128 channels), cross-attention at the lowest only.

    Attention only at 1/4 of the latent resolution (8x8 tokens for 256x256 frames) keeps
    it cheap on a CPU; the style still reaches every level through the skips and the
    mid block's cross-attention.
    """
    return UNetConfig(
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        attention_levels=(False, False, True),
        num_heads=(1, 1, 2),
        cross_attention_dim=style_dim,
        use_linear_projection=True,
        norm_num_groups=8,
    )


def unet_config_to_diffusers(config: UNetConfig) -> dict:
    """The diffusers `unet/config.json` dict of a UNetConfig.

    UNetConfig.from_diffusers reads it back to an equal config, and diffusers'
    UNet2DConditionModel builds the same network from it (checked in the tests).
    """
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention_levels)]
    return {
        "_class_name": "UNet2DConditionModel",
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "block_out_channels": list(config.block_out_channels),
        "layers_per_block": config.layers_per_block,
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        # diffusers' `attention_head_dim` holds head *counts* for this model class (its
        # historical misnaming, diffusers issue #2011); `num_attention_heads` it refuses.
        "attention_head_dim": list(config.num_heads),
        "cross_attention_dim": config.cross_attention_dim,
        "use_linear_projection": config.use_linear_projection,
        "transformer_layers_per_block": config.transformer_layers_per_block,
        "norm_num_groups": config.norm_num_groups,
        "norm_eps": config.norm_eps,
        "flip_sin_to_cos": config.flip_sin_to_cos,
        "freq_shift": config.freq_shift,
        "time_cond_proj_dim": config.time_cond_proj_dim,
        "act_fn": "silu",
    }


def _half_state(module: nn.Module, what: str) -> dict[str, torch.Tensor]:
    """The module's state dict on the CPU, floating tensors in fp16 (own copies, contiguous)."""
    state = {}
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu", torch.float16 if t.is_floating_point() else t.dtype, copy=True).contiguous()
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"save_demo_model: {what} weight {name} is not finite in fp16 (|value| > 65504?)")
        state[name] = t
    return state


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_demo_model(folder: str | Path, unet: UNet, autoencoder: LiteAutoencoder, styles: StyleBank,
                    schedule_extra: dict | None = None) -> Path:
    """Write the demo model folder (format in the module docstring); returns the folder.

    Files already there are overwritten. schedule_extra: more keys for
    scheduler_config.json (e.g. the default steps and strength the model was trained for).
    """
    folder = Path(folder)
    if mismatch := demo_parts_mismatch(unet, autoencoder, styles):
        raise ValueError(f"save_demo_model: {mismatch}")
    scheduler = {"_class_name": SCHEDULER_CLASS, "prediction_type": "flow_velocity", "num_train_timesteps": 1000}
    if clash := sorted(scheduler.keys() & (schedule_extra or {}).keys()):
        raise ValueError(f"save_demo_model: schedule_extra may not set {', '.join(clash)} (fixed by the format)")
    # Convert (and check) everything before writing anything, so a failure leaves no half folder.
    unet_state = _half_state(unet, "unet")
    vae_state = _half_state(autoencoder, "autoencoder")
    _half_state(styles, "styles")

    _write_json(folder / "model_index.json", {
        "_class_name": DEMO_PIPELINE_CLASS,
        "_livestyle_version": livestyle.__version__,
        "unet": ["livestyle", "UNet"],
        "vae": ["livestyle", "LiteAutoencoder"],
        "styles": ["livestyle", "StyleBank"],
        "scheduler": ["livestyle", SCHEDULER_CLASS],
    })
    _write_json(folder / "unet" / "config.json", unet_config_to_diffusers(unet.config))
    save_file(unet_state, str(folder / "unet" / WEIGHTS_NAME))
    _write_json(folder / "vae" / "config.json", autoencoder.config.to_diffusers())
    save_file(vae_state, str(folder / "vae" / WEIGHTS_NAME))
    styles.save(folder / "styles" / "styles.safetensors", dtype=torch.float16)
    _write_json(folder / "scheduler" / "scheduler_config.json", {**(schedule_extra or {}), **scheduler})
    return folder


def load_demo(device="cpu", dtype=torch.float32) -> Pipeline:
    """The demo model shipped in the package (DEMO_MODEL), as a family "demo" Pipeline."""
    if not (DEMO_MODEL / "model_index.json").is_file():
        raise LivestyleError(f"the embedded demo model is missing ({DEMO_MODEL} has no model_index.json); "
                             "this livestyle install is incomplete: reinstall it, or pass a model folder")
    return load_pipeline(DEMO_MODEL, device, dtype)
