"""The Stable Diffusion KL autoencoder (VAE), in plain PyTorch.

Architecture after Rombach et al., "High-Resolution Image Synthesis with Latent
Diffusion Models" (2022), as released with SD 1.x/2.x/XL. Parameter names equal
diffusers' AutoencoderKL, so a diffusers `vae/` folder's state dict loads with
strict=True; convert_vae.py turns the original single-file layout into it.

Contract shared with the tiny autoencoder (taesd.py): `encode` takes images
(B, 3, H, W) in [0, 1] and returns the diffusion model's latents (B, C, H/8, W/8)
for a 4-level VAE, already scaled: (posterior mean - shift_factor) * scaling_factor.
`decode` inverts the scaling and returns images clamped to [0, 1].
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from livestyle import kernels
from livestyle.errors import CheckpointError


@dataclass(frozen=True)
class KLAutoencoderConfig:
    """Shape of a KL autoencoder; the defaults are SD 1.x/2.x's VAE."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None  # SD3/FLUX-style VAEs subtract it before scaling
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "KLAutoencoderConfig":
        """From a diffusers AutoencoderKL `config.json` dict; missing keys take diffusers' defaults."""
        levels = len(cfg.get("block_out_channels", (64,)))
        expected = {
            "down_block_types": ("DownEncoderBlock2D",) * levels,
            "up_block_types": ("UpDecoderBlock2D",) * levels,
            "act_fn": "silu",
            "mid_block_add_attention": True,
            "latents_mean": None,
            "latents_std": None,
        }
        for key, value in expected.items():
            got = cfg.get(key, value)
            if (tuple(got) if isinstance(got, list) else got) != value:
                raise CheckpointError(f"unsupported VAE config: {key} = {got!r}, only {value!r} is supported")
        return cls(
            in_channels=cfg.get("in_channels", 3),
            out_channels=cfg.get("out_channels", 3),
            latent_channels=cfg.get("latent_channels", 4),
            block_out_channels=tuple(cfg.get("block_out_channels", (64,))),
            layers_per_block=cfg.get("layers_per_block", 1),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            scaling_factor=cfg.get("scaling_factor", 0.18215),
            shift_factor=cfg.get("shift_factor"),
            use_quant_conv=cfg.get("use_quant_conv", True),
            use_post_quant_conv=cfg.get("use_post_quant_conv", True),
        )


def group_norm(channels, groups):
    return nn.GroupNorm(groups, channels, eps=1e-6)


def _norm(norm: nn.GroupNorm, x, activation=None):
    """activation(norm(x)) through the kernel dispatch (livestyle.kernels): one fused pass with Triton."""
    return kernels.group_norm(x, norm.weight, norm.bias, norm.num_groups, norm.eps, activation)


class ResnetBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))), with a 1x1 conv on x when the width changes."""

    def __init__(self, n_in, n_out, groups):
        super().__init__()
        self.norm1 = group_norm(n_in, groups)
        self.conv1 = nn.Conv2d(n_in, n_out, 3, padding=1)
        self.norm2 = group_norm(n_out, groups)
        self.conv2 = nn.Conv2d(n_out, n_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else None

    def forward(self, x):
        h = self.conv1(_norm(self.norm1, x, "silu"))
        h = self.conv2(_norm(self.norm2, h, "silu"))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual."""

    def __init__(self, channels, groups):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers' key: to_out.0

    def forward(self, x):
        B, C, H, W = x.shape
        h = _norm(self.group_norm, x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        h = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)  # 1 head
        h = self.to_out[0](h)
        return x + h.transpose(1, 2).reshape(B, C, H, W)  # (B, H*W, C) -> (B, C, H, W)


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, channels, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])
        self.attentions = nn.ModuleList([Attention(channels, groups)])

    def forward(self, x):
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv; pads right and bottom only (as trained), so H, W halve exactly."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, n_in, n_out, layers, groups, downsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(n_in if i == 0 else n_out, n_out, groups) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(n_out)]) if downsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Module):
    def __init__(self, n_in, n_out, layers, groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(n_in if i == 0 else n_out, n_out, groups) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(n_out)]) if upsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """(B, in_channels, H, W) in [-1, 1] -> (B, 2 * latent_channels, h, w): posterior mean and log-variance."""

    def __init__(self, cfg: KLAutoencoderConfig):
        super().__init__()
        widths, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(widths[max(i - 1, 0)], width, cfg.layers_per_block, groups, downsample=i < len(widths) - 1)
            for i, width in enumerate(widths)
        )
        self.mid_block = MidBlock(widths[-1], groups)
        self.conv_norm_out = group_norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(_norm(self.conv_norm_out, x, "silu"))


class Decoder(nn.Module):
    """(B, latent_channels, h, w) -> (B, out_channels, H, W), roughly [-1, 1]. Widths run deepest first."""

    def __init__(self, cfg: KLAutoencoderConfig):
        super().__init__()
        widths, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], groups)
        self.up_blocks = nn.ModuleList(
            UpBlock(widths[max(i - 1, 0)], width, cfg.layers_per_block + 1, groups, upsample=i < len(widths) - 1)
            for i, width in enumerate(widths)
        )
        self.conv_norm_out = group_norm(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(_norm(self.conv_norm_out, x, "silu"))


class KLAutoencoder(nn.Module):
    """SD's VAE with the same encode/decode contract as TinyAutoencoder."""

    guided = False  # decode takes the latents alone (LiteAutoencoder.guided)

    def __init__(self, config: KLAutoencoderConfig):
        super().__init__()
        self.config = config
        self.latent_channels = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        C = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * C, 2 * C, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(C, C, 1) if config.use_post_quant_conv else None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> scaled latents (B, C, H/f, W/f), f = 2**(levels - 1).

        Deterministic: the posterior mean, not a sample; for img2img-style
        restyling the sampling noise only adds flicker.
        """
        # Computed in the weights' dtype, returned in the caller's: an fp32 VAE serves an
        # fp16 pipeline (SDXL's overflows in fp16; loading keeps it in fp32 there).
        # (Its parameters' dtype, not a convolution weight's: models/packed.py takes those out.)
        h = self.encoder((images * 2 - 1).to(next(self.encoder.parameters()).dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean = h[:, : self.latent_channels]  # (B, 2C, h, w): mean then log-variance
        if self.config.shift_factor is not None:
            mean = mean - self.config.shift_factor
        return (mean * self.config.scaling_factor).to(images.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, h*f, w*f) clamped to [0, 1]."""
        z = latents.to(next(self.decoder.parameters()).dtype) / self.config.scaling_factor  # dtype: as encode
        if self.config.shift_factor is not None:
            z = z + self.config.shift_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return ((self.decoder(z) + 1) / 2).clamp(0, 1).to(latents.dtype)
