"""ControlNet (Zhang et al. 2023, arXiv:2302.05543) for SD 1.x, SD 2.x / SD-Turbo and SDXL U-Nets.

A ControlNet is a trainable copy of the U-Net's encoder half (conv_in, the down blocks and
the mid block: the same blocks as unet.py, the same weights' names) that also sees a
conditioning image (edges, depth, the previous frame...). A small conv stack embeds the
image to the latent size and adds it after conv_in; a zero-initialised 1x1 conv on every
encoder skip and on the mid block's output gives the residuals the U-Net adds to its own:

    down, mid = controlnet(sample, t, context, image, scale)
    unet(sample, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid)

Same parameter names as `diffusers.ControlNetModel`, so a diffusers `controlnet/` state dict
loads as it is; the original single-file layout (`control_model.*`: input_hint_block,
zero_convs, middle_block_out) is converted by convert_controlnet.py.

Several ControlNets at once (`MultiControlNet`) add their scaled residuals, as diffusers'
MultiControlNetModel does. `ControlSettings` holds what a user sets per ControlNet (scale,
and the part of the denoising steps where it acts) as plain data for the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from livestyle.errors import CheckpointError
from livestyle.models.unet import (
    DownBlock, MidBlock, TimestepEmbedding, UNetConfig, encoder_fields_from_diffusers, embed_conditions,
)


@dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
    """A U-Net's encoder half (UNetConfig's fields; out_channels is unused) plus the image side.

    conditioning_channels: channels of the conditioning image (3: RGB).
    conditioning_embedding_out_channels: widths of the image embedding's convs; each step
        after the first halves the resolution, so (16, 32, 96, 256) takes images at 8x the
        latent size, as SD's VAE.
    bgr: the network was trained on BGR images (diffusers' controlnet_conditioning_channel_order).
    global_pool_conditions: residuals are averaged over space (the "shuffle" ControlNet).
    """

    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    bgr: bool = False
    global_pool_conditions: bool = False

    @classmethod
    def from_diffusers(cls, cfg: dict) -> ControlNetConfig:
        """The config of a diffusers ControlNetModel `config.json` dict; CheckpointError for what we cannot run."""
        down = list(cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
        fields = encoder_fields_from_diffusers(cfg, down, "ControlNet")
        order = cfg.get("controlnet_conditioning_channel_order", "rgb")
        if order not in ("rgb", "bgr"):
            raise CheckpointError(f"ControlNet config controlnet_conditioning_channel_order={order!r} is not "
                                  "'rgb' or 'bgr'")
        try:
            return cls(conditioning_channels=cfg.get("conditioning_channels", 3),
                       conditioning_embedding_out_channels=tuple(
                           cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)),
                       bgr=order == "bgr", global_pool_conditions=bool(cfg.get("global_pool_conditions", False)),
                       **fields)
        except ValueError as e:
            raise CheckpointError(str(e)) from None

    @property
    def image_scale(self) -> int:
        """How many times larger than the latents the conditioning image is (8 for SD's VAE)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)


class ConditioningEmbedding(nn.Module):
    """Conditioning image (B, C, H, W) -> (B, C0, H / 2^k, W / 2^k), added after conv_in.

    3x3 convs with SiLU; a stride-2 conv between widths; conv_out is zero-initialised in
    training, so an untrained ControlNet changes nothing.
    """

    def __init__(self, out_channels: int, in_channels: int, widths: tuple[int, ...]):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        blocks = []
        for a, b in zip(widths[:-1], widths[1:]):
            blocks += [nn.Conv2d(a, a, 3, padding=1), nn.Conv2d(a, b, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, x):
        x = F.silu(self.conv_in(x))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


Residuals = tuple[list[torch.Tensor], torch.Tensor]  # (one per encoder skip, the mid block's)


class ControlNet(nn.Module):
    """ControlNet with diffusers' ControlNetModel parameter names."""

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        channels, n = config.block_out_channels, config.layers_per_block
        temb_channels = 4 * channels[0]
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb_channels, config.time_cond_proj_dim)
        self.add_embedding = (TimestepEmbedding(config.projection_class_embeddings_input_dim, temb_channels)
                              if config.added_conditioning else None)
        self.controlnet_cond_embedding = ConditioningEmbedding(channels[0], config.conditioning_channels,
                                                               config.conditioning_embedding_out_channels)
        self.down_blocks = nn.ModuleList(
            DownBlock(config, level, channels[max(level - 1, 0)], temb_channels) for level in range(len(channels)))
        # One zero conv per encoder skip: conv_in's, n per level, one per downsampler.
        widths = [channels[0]] + [c for level, c in enumerate(channels)
                                  for _ in range(n + (level < len(channels) - 1))]
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(c, c, 1) for c in widths)
        self.mid_block = MidBlock(config, temb_channels)
        self.controlnet_mid_block = nn.Conv2d(channels[-1], channels[-1], 1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, image: torch.Tensor,
                scale: float | torch.Tensor = 1.0, *, timestep_cond: torch.Tensor | None = None,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> Residuals:
        """The residuals for a U-Net called on the same sample, timestep and context.

        sample (B, C_in, h, w) latents, timestep (B,) or 0-d, context (B, L, D);
        image (B or 1, conditioning_channels, h * image_scale, w * image_scale), RGB in [0, 1]
        (control_inputs.py makes them); scale: a float, or (B,) per batch row (rows at
        different denoising steps). text_embeds / time_ids: SDXL's, as for the U-Net.
        Returns (down residuals, one per U-Net skip, mid residual), already scaled.
        """
        k, channels = self.config.image_scale, self.config.conditioning_channels
        expected = (sample.shape[-2] * k, sample.shape[-1] * k)
        if image.ndim != 4 or tuple(image.shape[-2:]) != expected or image.shape[1] != channels:
            raise ValueError(f"ControlNet image {tuple(image.shape)}: expected (B, {channels}, {expected[0]}, "
                             f"{expected[1]}), {k}x the latents' size")
        if self.config.bgr:
            image = image.flip(1)
        emb = embed_conditions(self.config, self.time_embedding, self.add_embedding, sample, timestep,
                               timestep_cond, text_embeds, time_ids)
        x = self.conv_in(sample) + self.controlnet_cond_embedding(image.to(sample.dtype))
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context)
            skips += block_skips
        x = self.mid_block(x, emb, context)
        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(x)
        if self.config.global_pool_conditions:
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        if isinstance(scale, torch.Tensor):
            scale = scale.to(sample.dtype).reshape(-1, 1, 1, 1)  # (B,) -> one scale per batch row
        return [d * scale for d in down], mid * scale


class MultiControlNet(nn.Module):
    """Several ControlNets whose scaled residuals add up (diffusers' MultiControlNetModel)."""

    def __init__(self, nets: list[ControlNet] | tuple[ControlNet, ...]):
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                images: list[torch.Tensor], scales: list[float | torch.Tensor], **conditions) -> Residuals | None:
        """images, scales: one per net, as ControlNet.forward takes them; conditions: its
        keyword arguments (text_embeds, time_ids, timestep_cond). A net whose scale is the
        number 0 is not run (a switch that costs no device sync); None when none runs."""
        if not len(images) == len(scales) == len(self.nets):
            raise ValueError(f"MultiControlNet: {len(self.nets)} nets, {len(images)} images, {len(scales)} scales")
        total = None
        for net, image, scale in zip(self.nets, images, scales):
            if not isinstance(scale, torch.Tensor) and scale == 0:
                continue
            down, mid = net(sample, timestep, context, image, scale, **conditions)
            total = (down, mid) if total is None else ([a + b for a, b in zip(total[0], down)], total[1] + mid)
        return total


@dataclass(frozen=True)
class ControlSettings:
    """How one ControlNet is applied; plain data, checked once here.

    scale: residual strength (diffusers' controlnet_conditioning_scale), >= 0; 0 is off.
    start, end: the fraction of the denoising steps in which it acts (diffusers'
        control_guidance_start / control_guidance_end), 0 <= start < end <= 1.
    """

    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale >= 0):
            raise ValueError(f"ControlNet scale must be a finite number >= 0, got {self.scale!r}")
        for name in ("start", "end"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"ControlNet {name} must be a fraction of the steps in [0, 1], got {value!r}")
        if self.start >= self.end:
            raise ValueError(f"ControlNet start ({self.start}) must come before end ({self.end})")

    def scale_at(self, step: int, steps: int) -> float:
        """The scale at denoising step `step` (0-based) of `steps`: 0 where the step lies
        outside [start, end], the rule of diffusers' ControlNet pipelines."""
        off = step / steps < self.start or (step + 1) / steps > self.end
        return 0.0 if off else float(self.scale)


def controlnet_mismatch(unet: UNetConfig, control: ControlNetConfig) -> str | None:
    """Why a ControlNet cannot drive a U-Net (one line), or None when its residuals fit."""
    if control.added_conditioning != unet.added_conditioning or control.cross_attention_dim != unet.cross_attention_dim:
        return f"the ControlNet is for {control.family}, the U-Net is {unet.family}"
    if (control.block_out_channels, control.layers_per_block) != (unet.block_out_channels, unet.layers_per_block):
        return (f"the ControlNet's levels (channels {control.block_out_channels}, {control.layers_per_block} layers "
                f"each) are not the U-Net's ({unet.block_out_channels}, {unet.layers_per_block})")
    if control.in_channels != unet.in_channels:
        return f"the ControlNet takes {control.in_channels}-channel latents, the U-Net {unet.in_channels}"
    if control.projection_class_embeddings_input_dim != unet.projection_class_embeddings_input_dim:
        return (f"the ControlNet's added embedding takes {control.projection_class_embeddings_input_dim} inputs, "
                f"the U-Net's {unet.projection_class_embeddings_input_dim}")
    return None
