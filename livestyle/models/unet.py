"""The Stable Diffusion U-Net: SD 1.x / 2.x (SD-Turbo included) and SDXL (SDXL-Turbo), with
temporal self-attention.

Same architecture and parameter names as `diffusers.UNet2DConditionModel` for these
configurations, so a diffusers `unet/` state dict loads with `load_state_dict(strict=True)`;
the original single-file layout is converted by convert_unet.py. The file reads top to
bottom: timestep embedding, ResnetBlock, Attention, FeedForward, TransformerBlock,
SpatialTransformer, Down/Upsample, the three block kinds, then UNet.

Contract: `UNet(sample, timestep, context, temporal=None, timestep_cond=None) -> prediction`,
with sample (B, C_in, h, w) latents (any h, w; odd and non-square included), timestep
(B,) or 0-d in the training schedule's units (0..999 for SD), context (B, L, D)
text embeddings with any L (long prompts give L = 77 * k), prediction (B, C_out, h, w)
(epsilon or v, whatever the checkpoint was trained for). Full LCM checkpoints
(time_cond_proj_dim set, e.g. LCM_Dreamshaper_v7) also take timestep_cond
(B, time_cond_proj_dim), the guidance-scale embedding (samplers.guidance_scale_embedding).

SDXL (Podell et al. 2023, arXiv:2307.01952) adds keyword arguments, as diffusers'
`added_cond_kwargs`: text_embeds (B, 1280), the pooled projection of the second text
encoder, and time_ids (B, 6) in pixels: original (height, width), crop (top, left),
target (height, width). Each time id gets a 256-wide sinusoidal embedding; with the pooled
text they go through `add_embedding` into the timestep embedding. Its other differences
are configuration: per-level transformer depth (1, 2, 10), no attention at the first
level, 2048-d context (both text encoders' features side by side), linear projections.

ControlNet (controlnet.py) residuals come in as diffusers names them:
down_block_additional_residuals (one per encoder skip, conv_in's first) and
mid_block_additional_residual; they are added to the skips and to the mid block's output.

Every self-attention (`attn1`) can read a TemporalCache (temporal.py): it then also
attends to its own keys/values of the last N frames (StreamV2V's feature bank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from livestyle import kernels
from livestyle.errors import CheckpointError
from livestyle.models.temporal import TemporalBatch, TemporalCache


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of an SD 1.x / 2.x / SDXL U-Net. Defaults are SD 1.5's.

    Per-level tuples run from the highest resolution (level 0) to the lowest.
    SD 1.x: 8 heads everywhere, conv proj_in/out, context 768.
    SD 2.x / SD-Turbo: 64-channel heads (5, 10, 20, 20), linear proj_in/out, context 1024.
    SDXL / SDXL-Turbo: channels (320, 640, 1280), attention at levels 1 and 2 only, depth
    (1, 2, 10), 64-channel heads (5, 10, 20), linear projections, context 2048, and the
    added embedding (addition_time_embed_dim 256, projection_class_embeddings_input_dim
    2816 = 1280 pooled text + 6 * 256).
    Full LCM checkpoints (LCM_Dreamshaper_v7): SD 1.5 plus time_cond_proj_dim=256, the width
    of the guidance-scale embedding added to the timestep embedding.

    transformer_layers_per_block: one entry for every level, or one per level (stored per
    level); the mid block takes the lowest level's. Zero (SDXL's "small" ControlNets) keeps
    a level's norm and projections around no transformer layer, as diffusers does.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)  # levels with a SpatialTransformer
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    transformer_layers_per_block: tuple[int, ...] = field(default=(1,), metadata={"zero_ok": True})
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_cond_proj_dim: int | None = None  # LCM's guidance embedding width; None: no such input
    addition_time_embed_dim: int | None = None  # SDXL: sinusoidal width of each time id (256)
    projection_class_embeddings_input_dim: int | None = None  # SDXL: pooled text + time ids (2816)

    def __post_init__(self):
        n = len(self.block_out_channels)
        if not (len(self.attention_levels) == len(self.num_heads) == n):
            raise ValueError(f"{type(self).__name__}: block_out_channels, attention_levels and num_heads need one "
                             f"entry per level ({n}), got {len(self.attention_levels)} and {len(self.num_heads)}")
        for channels, heads in zip(self.block_out_channels, self.num_heads):
            if channels % heads:
                raise ValueError(f"{type(self).__name__}: {heads} heads do not divide {channels} channels")
        depth = self.transformer_layers_per_block
        depth = (depth,) if isinstance(depth, int) else tuple(depth)
        if len(depth) == 1:
            depth = depth * n
        if len(depth) != n or any(type(d) is not int or d < 0 for d in depth):
            raise ValueError(f"{type(self).__name__}: transformer_layers_per_block={list(depth)} needs one "
                             f"non-negative entry, or one per level ({n})")
        object.__setattr__(self, "transformer_layers_per_block", depth)  # frozen: normalised once, here
        if (self.addition_time_embed_dim is None) != (self.projection_class_embeddings_input_dim is None):
            raise ValueError(f"{type(self).__name__}: addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim go together (SDXL's added embedding), got one")

    @property
    def added_conditioning(self) -> bool:
        """Whether the U-Net takes SDXL's text_embeds and time_ids."""
        return self.addition_time_embed_dim is not None

    @property
    def family(self) -> str:
        """What kind of U-Net this is, for messages: "SDXL", "SD 2.x", "SD 1.x" or its context width."""
        context = self.cross_attention_dim
        if self.added_conditioning:
            return "SDXL" if context == 2048 else f"an SDXL-like U-Net ({context}-d context)"
        return {768: "SD 1.x", 1024: "SD 2.x"}.get(context, f"a {context}-d-context U-Net")

    @classmethod
    def from_diffusers(cls, cfg: dict) -> UNetConfig:
        """The config of a diffusers `unet/config.json` dict; CheckpointError for what we cannot run."""
        down = list(cfg.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
        up = list(cfg.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
        up_kinds = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
        fields = encoder_fields_from_diffusers(cfg, down, "U-Net")
        unknown = [t for t in up if t not in up_kinds]
        if unknown:
            raise CheckpointError(f"U-Net block types {unknown} are not supported (only {', '.join(up_kinds)})")
        if tuple(up_kinds[t] for t in reversed(up)) != fields["attention_levels"]:
            raise CheckpointError(f"U-Net up_block_types {up} do not mirror down_block_types {down}")
        try:
            return cls(out_channels=cfg.get("out_channels", 4), **fields)
        except ValueError as e:  # e.g. heads that do not divide the channels
            raise CheckpointError(str(e)) from None


# Options SD 1.x/2.x/SDXL never use; anything else is a different network.
_PLAIN = {"encoder_hid_dim": None, "encoder_hid_dim_type": None, "time_embedding_type": "positional",
          "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None, "act_fn": "silu",
          "resnet_time_scale_shift": "default", "center_input_sample": False, "dual_cross_attention": False,
          "only_cross_attention": False, "mid_block_type": "UNetMidBlock2DCrossAttn", "mid_block_scale_factor": 1,
          "downsample_padding": 1, "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
          "class_embeddings_concat": False, "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
          "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
          "mid_block_only_cross_attention": None}


def encoder_fields_from_diffusers(cfg: dict, down: list, what: str) -> dict:
    """UNetConfig fields (all but out_channels) read from a diffusers U-Net or ControlNet config
    dict, whose encoder half has the same keys; CheckpointError for what we cannot run."""
    if cfg.get("class_embed_type") is not None or cfg.get("num_class_embeds") is not None:
        raise CheckpointError(f"{what} with class embeddings (class_embed_type={cfg.get('class_embed_type')!r}, "
                              "e.g. the SD 2 x4 upscaler) is not supported")
    addition = cfg.get("addition_embed_type")
    if addition not in (None, "text_time"):
        raise CheckpointError(f"{what} config addition_embed_type={addition!r} is not supported "
                              "(SD 1.x/2.x have none, SDXL has 'text_time')")
    for key, expected in _PLAIN.items():
        value = cfg.get(key, expected)
        if value != expected and not (isinstance(value, (list, tuple)) and set(value) == {expected}):
            raise CheckpointError(f"{what} config {key}={value!r} is not supported (SD 1.x/2.x/SDXL use {expected!r})")
    if cfg.get("norm_num_groups", 32) is None:
        raise CheckpointError(f"{what} config norm_num_groups=None is not supported (SD 1.x/2.x/SDXL use 32)")

    # Absent keys take diffusers' defaults, which are SD 1.x's.
    down_kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    unknown = [t for t in down if t not in down_kinds]
    if unknown or not down:
        raise CheckpointError(f"{what} block types {unknown or down} are not supported (only {', '.join(down_kinds)})")
    n = len(down)
    channels = tuple(cfg.get("block_out_channels", (320, 640, 1280, 1280)))
    if len(channels) != n:
        raise CheckpointError(f"{what} config block_out_channels={list(channels)} needs {n} entries, one per level")

    def per_level(name, value) -> tuple:
        value = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
        if len(value) != n:
            raise CheckpointError(f"{what} config {name}={list(value)} needs {n} entries, one per level")
        return value

    def same_everywhere(name, value) -> int:
        values = set(per_level(name, value))
        if len(values) != 1:
            raise CheckpointError(f"{what} config {name}={value} varies per level; not supported")
        return values.pop()

    added = {}
    if addition == "text_time":
        added = dict(addition_time_embed_dim=cfg.get("addition_time_embed_dim"),
                     projection_class_embeddings_input_dim=cfg.get("projection_class_embeddings_input_dim"))
        if None in added.values():
            raise CheckpointError(f"{what} config addition_embed_type='text_time' needs addition_time_embed_dim and "
                                  "projection_class_embeddings_input_dim (SDXL: 256 and 2816)")
    # diffusers' `attention_head_dim` is the number of heads when `num_attention_heads` is unset
    # (a historical misnaming, diffusers issue #2011).
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    cross_dim = cfg.get("cross_attention_dim", 1280)
    return dict(
        in_channels=cfg.get("in_channels", 4),
        block_out_channels=channels,
        layers_per_block=same_everywhere("layers_per_block", cfg.get("layers_per_block", 2)),
        attention_levels=tuple(down_kinds[t] for t in down),
        num_heads=per_level("num_attention_heads", heads),
        cross_attention_dim=same_everywhere("cross_attention_dim", cross_dim),
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        transformer_layers_per_block=per_level("transformer_layers_per_block",
                                               cfg.get("transformer_layers_per_block", 1)),
        norm_num_groups=cfg.get("norm_num_groups", 32),
        norm_eps=cfg.get("norm_eps", 1e-5),
        flip_sin_to_cos=cfg.get("flip_sin_to_cos", True),
        freq_shift=cfg.get("freq_shift", 0),
        time_cond_proj_dim=cfg.get("time_cond_proj_dim"),
        **added,
    )


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (DDPM, Ho et al. 2020): (B,) -> (B, dim) float32.

    Frequencies run from 1 down to ~1/max_period; `flip_sin_to_cos` puts cos first.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.float()[:, None] * torch.exp(exponent)[None, :]  # (B, half)
    sin, cos = torch.sin(args), torch.cos(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: (B, C) -> (B, 4C).

    With `cond_dim` (LCM's time_cond_proj_dim), a condition (B, cond_dim) is projected to
    C and added to the input first, as diffusers' TimestepEmbedding does.
    """

    def __init__(self, channels: int, embed_dim: int, cond_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(channels, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)
        self.cond_proj = nn.Linear(cond_dim, channels, bias=False) if cond_dim is not None else None

    def forward(self, x, cond=None):
        """x (B, C), cond (B, cond_dim) or None (nothing added) -> (B, 4C)."""
        if cond is not None:
            if self.cond_proj is None:
                raise ValueError("timestep_cond was given, but this U-Net has no time_cond_proj_dim")
            x = x + self.cond_proj(cond)
        return self.linear_2(F.silu(self.linear_1(x)))


def _group_norm(norm: nn.GroupNorm, x, activation=None, shift=None):
    """activation(norm(x + shift[:, :, None, None])) through the kernel dispatch (livestyle.kernels)."""
    return kernels.group_norm(x, norm.weight, norm.bias, norm.num_groups, norm.eps, activation, shift)


def _layer_norm(norm: nn.LayerNorm, x):
    return kernels.layer_norm(x, norm.weight, norm.bias, norm.eps)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, time embedding added in between, plus a (1x1 conv) skip."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, temb):
        """x (B, C_in, h, w), temb (B, T) -> (B, C_out, h, w)."""
        h = self.conv1(_group_norm(self.norm1, x, "silu"))
        # The time embedding (B, C_out) is added to every position inside the fused norm2.
        h = self.conv2(_group_norm(self.norm2, h, "silu", shift=self.time_emb_proj(F.silu(temb))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    """Multi-head attention; self-attention when called without context.

    `layer_index` numbers the self-attention layers of a UNet in forward order (set
    by UNet); it picks this layer's bank in a TemporalCache.
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # a list only for diffusers' key `to_out.0`
        self.layer_index: int | None = None

    def forward(self, x, context=None, temporal: TemporalCache | TemporalBatch | None = None):
        """x (B, L, C), context (B, S, D) or None -> (B, L, C).

        With `temporal`, the queries also attend to this layer's past frames, read from the
        cache's ring where it lies (kernels.cached_attention; never-written slots skipped),
        then the current keys/values are stored.
        """
        B, L, C = x.shape
        source = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(source), self.to_v(source)  # (B, L, C), (B, S, C), (B, S, C)
        if temporal is None:
            # (B, *, C) -> (B, heads, *, C / heads)
            q, k, v = (t.view(B, -1, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, C / heads)
            out = out.transpose(1, 2).reshape(B, L, C)
        else:
            # The ring(s) read where they lie, then k, v stored: a frame never attends to itself twice.
            out = temporal.attend(self.layer_index, q, k, v, self.heads)  # (B, L, C)
        out = self.to_out[0](out)
        if temporal is not None:
            out = temporal.fuse(self.layer_index, out)  # optional feature fusion (temporal.py)
        return out


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection to 2 * d_out, GELU of one half gates the other."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        return kernels.geglu(self.proj(x))  # (..., 2 * d_out) -> first half * gelu(second half), as diffusers


class FeedForward(nn.Module):
    """GEGLU MLP with 4x inner width: (B, L, C) -> (B, L, C)."""

    def __init__(self, dim: int):
        super().__init__()
        # net.1 is a dropout in diffusers; Identity keeps the key names net.0 / net.2.
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention to the text, feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context, temporal=None):
        """x (B, L, C), context (B, S, D) -> (B, L, C)."""
        x = x + self.attn1(_layer_norm(self.norm1, x), temporal=temporal)
        x = x + self.attn2(_layer_norm(self.norm2, x), context)
        return x + self.ff(_layer_norm(self.norm3, x))


class SpatialTransformer(nn.Module):
    """Transformer over the h*w positions of a feature map, with a residual around it.

    proj_in/proj_out are 1x1 convs (SD 1.x) or linear layers (SD 2.x); same math,
    different weight shapes, applied before/after flattening accordingly.
    """

    def __init__(self, channels: int, heads: int, context_dim: int, depth: int, linear: bool, groups: int):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x, context, temporal=None):
        """x (B, C, h, w), context (B, S, D) -> (B, C, h, w)."""
        B, C, H, W = x.shape
        h = _group_norm(self.norm, x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, h*w, C)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, temporal)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, h, w)
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv: (B, C, h, w) -> (B, C, ceil(h/2), ceil(w/2))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to `size`, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def _transformer(config: UNetConfig, level: int) -> SpatialTransformer:
    return SpatialTransformer(config.block_out_channels[level], config.num_heads[level], config.cross_attention_dim,
                              config.transformer_layers_per_block[level], config.use_linear_projection,
                              config.norm_num_groups)


class DownBlock(nn.Module):
    """One encoder level: resnet (+ transformer) x layers_per_block, then maybe a Downsample.

    diffusers' CrossAttnDownBlock2D (with transformers) or DownBlock2D (without).
    """

    def __init__(self, config: UNetConfig, level: int, in_channels: int, temb_channels: int):
        super().__init__()
        out_channels, n = config.block_out_channels[level], config.layers_per_block
        groups, eps = config.norm_num_groups, config.norm_eps
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, temb_channels, groups, eps)
            for i in range(n))
        self.attentions = nn.ModuleList(_transformer(config, level) for _ in range(n) if config.attention_levels[level])
        is_last = level == len(config.block_out_channels) - 1
        self.downsamplers = None if is_last else nn.ModuleList([Downsample(out_channels)])

    def forward(self, x, temb, context, temporal=None):
        """-> (x, skips): the output and the feature maps the decoder concatenates back."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context, temporal)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """resnet, transformer, resnet at the lowest resolution (UNetMidBlock2DCrossAttn)."""

    def __init__(self, config: UNetConfig, temb_channels: int):
        super().__init__()
        channels, groups, eps = config.block_out_channels[-1], config.norm_num_groups, config.norm_eps
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, temb_channels, groups, eps) for _ in range(2))
        # The mid block always has a transformer, even where the lowest level has none (SD's level 3).
        self.attentions = nn.ModuleList([_transformer(config, len(config.block_out_channels) - 1)])

    def forward(self, x, temb, context, temporal=None):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context, temporal)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """One decoder level: (concat skip, resnet (+ transformer)) x (layers_per_block + 1), then maybe Upsample.

    diffusers' CrossAttnUpBlock2D / UpBlock2D. `level` is the resolution level
    (the first up block works at the lowest resolution, level n - 1).
    """

    def __init__(self, config: UNetConfig, level: int, prev_channels: int, temb_channels: int):
        super().__init__()
        channels = config.block_out_channels
        out_channels, n = channels[level], config.layers_per_block + 1
        # The last resnet's skip comes from the level above (or conv_in), hence its width.
        skip_last = channels[max(level - 1, 0)]
        groups, eps = config.norm_num_groups, config.norm_eps
        self.resnets = nn.ModuleList(
            ResnetBlock((prev_channels if i == 0 else out_channels) + (skip_last if i == n - 1 else out_channels),
                        out_channels, temb_channels, groups, eps)
            for i in range(n))
        self.attentions = nn.ModuleList(_transformer(config, level) for _ in range(n) if config.attention_levels[level])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if level > 0 else None

    def forward(self, x, temb, context, skips, upsample_size=None, temporal=None):
        """skips: this level's encoder maps, consumed last-first; upsample_size: (h, w) for the Upsample."""
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - i]], dim=1), temb)
            if self.attentions:
                x = self.attentions[i](x, context, temporal)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


def embed_conditions(config: UNetConfig, time_embedding: TimestepEmbedding, add_embedding: TimestepEmbedding | None,
                     sample: torch.Tensor, timestep: torch.Tensor, timestep_cond: torch.Tensor | None,
                     text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None) -> torch.Tensor:
    """The embedding every resnet receives, (B, 4 * C0) in sample's dtype: timestep, plus LCM's
    guidance embedding (timestep_cond), plus SDXL's pooled text and time ids. Shared by the
    U-Net and the ControlNet, which embed the same way."""
    B = sample.shape[0]
    t = timestep.reshape(-1).expand(B).to(sample.device)  # 0-d or (1,) broadcast to (B,)
    emb = timestep_embedding(t, config.block_out_channels[0], config.flip_sin_to_cos, config.freq_shift)
    if timestep_cond is not None:
        timestep_cond = timestep_cond.to(sample.dtype)
    emb = time_embedding(emb.to(sample.dtype), timestep_cond)  # (B, 4 * C0)
    if add_embedding is None:
        if text_embeds is not None or time_ids is not None:
            raise ValueError(f"text_embeds/time_ids were given, but this {config.family} U-Net takes no added "
                             "conditioning (SDXL's)")
        return emb
    if text_embeds is None or time_ids is None:
        raise ValueError(f"this {config.family} U-Net needs text_embeds (B, pooled text width) and time_ids (B, 6): "
                         "SDXL's added conditioning")
    width = text_embeds.shape[-1] + time_ids.shape[-1] * config.addition_time_embed_dim
    if text_embeds.ndim != 2 or time_ids.ndim != 2 or width != config.projection_class_embeddings_input_dim:
        raise ValueError(f"text_embeds {tuple(text_embeds.shape)} and time_ids {tuple(time_ids.shape)} do not make "
                         f"the {config.projection_class_embeddings_input_dim} inputs of this U-Net's added embedding "
                         f"(pooled text width + time ids * {config.addition_time_embed_dim})")
    # Each time id (sizes and crop, in pixels) gets its own sinusoidal embedding, as a timestep would.
    times = timestep_embedding(time_ids.reshape(-1), config.addition_time_embed_dim, config.flip_sin_to_cos,
                               config.freq_shift)  # (B * 6, 256)
    added = torch.cat([text_embeds.to(emb.dtype), times.reshape(text_embeds.shape[0], -1).to(emb.dtype)], dim=-1)
    return emb + add_embedding(added)  # (B, 4 * C0); a batch-1 condition broadcasts over B


class UNet(nn.Module):
    """SD 1.x / 2.x / SDXL conditional U-Net (diffusers' UNet2DConditionModel layout)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        temb_channels = 4 * channels[0]
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb_channels, config.time_cond_proj_dim)
        self.add_embedding = (TimestepEmbedding(config.projection_class_embeddings_input_dim, temb_channels)
                              if config.added_conditioning else None)
        self.down_blocks = nn.ModuleList(
            DownBlock(config, level, channels[max(level - 1, 0)], temb_channels) for level in range(len(channels)))
        self.mid_block = MidBlock(config, temb_channels)
        levels = list(reversed(range(len(channels))))
        self.up_blocks = nn.ModuleList(
            UpBlock(config, level, channels[min(level + 1, len(channels) - 1)], temb_channels) for level in levels)
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

        # Number the self-attention layers in forward order (down, mid, up: the order in which
        # modules() walks them), so that a TemporalCache can hold one bank per layer.
        blocks = [m for m in self.modules() if isinstance(m, TransformerBlock)]
        for index, block in enumerate(blocks):
            block.attn1.layer_index = index

    def self_attention_shapes(self, latent_hw: tuple[int, int]) -> list[tuple[int, int]]:
        """(tokens, channels) of every self-attention layer, by layer_index, for latents of size (h, w)."""
        h, w = latent_hw
        tokens = []  # per level; a stride-2 conv with padding 1 rounds up
        for _ in self.config.block_out_channels:
            tokens.append(h * w)
            h, w = (h + 1) // 2, (w + 1) // 2
        n = len(tokens)
        placed = [(block.attentions, level) for level, block in enumerate(self.down_blocks)]
        placed += [(self.mid_block.attentions, n - 1)]
        placed += [(block.attentions, n - 1 - i) for i, block in enumerate(self.up_blocks)]
        return [(tokens[level], t.norm.num_channels)
                for attentions, level in placed for t in attentions for _ in t.transformer_blocks]

    def skip_shapes(self, latent_hw: tuple[int, int]) -> list[tuple[int, int, int]]:
        """(channels, h, w) of every encoder skip, in the order down_block_additional_residuals take them."""
        h, w = latent_hw
        channels, n = self.config.block_out_channels, self.config.layers_per_block
        shapes = [(channels[0], h, w)]
        for level, c in enumerate(channels):
            shapes += [(c, h, w)] * n
            if level < len(channels) - 1:
                h, w = (h + 1) // 2, (w + 1) // 2
                shapes.append((c, h, w))
        return shapes

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                temporal: TemporalCache | None = None, timestep_cond: torch.Tensor | None = None, *,
                text_embeds: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
                down_block_additional_residuals: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
                mid_block_additional_residual: torch.Tensor | None = None) -> torch.Tensor:
        """sample (B, C_in, h, w), timestep (B,) or 0-d, context (B, L, D) -> (B, C_out, h, w).

        timestep_cond: (B, time_cond_proj_dim) LCM guidance embedding, for configs with
        time_cond_proj_dim. Left out, nothing is added, as in diffusers (the model then
        runs as if its guidance-embedding projection gave zero).
        text_embeds (B, 1280), time_ids (B, 6): SDXL's added conditioning, needed by SDXL
        U-Nets and refused by the others.
        down_block_additional_residuals: one tensor per encoder skip (skip_shapes), added to
        it; mid_block_additional_residual (B, C_last, h_last, w_last), added to the mid block's
        output. ControlNet residuals (controlnet.py), already scaled.
        """
        emb = embed_conditions(self.config, self.time_embedding, self.add_embedding, sample, timestep,
                               timestep_cond, text_embeds, time_ids)

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, context, temporal)
            skips += block_skips
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"down_block_additional_residuals: {len(down_block_additional_residuals)} tensors "
                                 f"for the U-Net's {len(skips)} skips")
            # The mid block still takes x unchanged: only the skips carry the residuals (diffusers).
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]
        x = self.mid_block(x, emb, context, temporal)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            # Upsample to the next skip's size rather than x2: for sizes not divisible by
            # 2**levels the encoder rounded up, and diffusers (forward_upsample_size) matches
            # the skip; for divisible sizes both are the same.
            size = skips[-1].shape[-2:] if skips else None
            x = block(x, emb, context, block_skips, size, temporal)
        return self.conv_out(_group_norm(self.conv_norm_out, x, "silu"))
