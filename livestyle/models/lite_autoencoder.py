"""Lite autoencoder: the demo model's own tiny, CPU-fast image <-> latent codec.

A slimmer cousin of taesd.py's TinyAutoencoder, sized so that encode + decode at
256x256 leave room for a U-Net step inside a 24 fps budget on two CPU cores
(~6.6 ms encode, ~11.6 ms decode at width 48, 2 threads). What makes it cheap:

- the encoder downsamples first (two stride-2 convs before any residual block), so
  the residual blocks run at 1/4 and 1/8 resolution;
- the decoder's last 2x is a PixelShuffle of a 12-channel conv (3 colours x 2 x 2),
  so no conv ever runs at full resolution;
- residual blocks are two convs wide instead of TAESD's three.

Contract shared with TinyAutoencoder and KLAutoencoder: images are (B, 3, H, W) in
[0, 1] with H and W multiples of 8; latents are (B, C, H/8, W/8), unscaled.

Weights live in a diffusers-like component folder: `config.json`
{"_class_name": "LiteAutoencoder", "latent_channels": C, "width": w} beside
`diffusion_pytorch_model.safetensors` (loaded by loading.load_autoencoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from livestyle.errors import CheckpointError

CLASS_NAME = "LiteAutoencoder"  # config.json `_class_name`


@dataclass(frozen=True)
class LiteAutoencoderConfig:
    """latent_channels: C of the (B, C, H/8, W/8) latents; width: channels of the inner convs (even)."""

    latent_channels: int = 16
    width: int = 48

    def __post_init__(self):
        if self.latent_channels < 1 or self.width < 2 or self.width % 2:
            raise ValueError(f"LiteAutoencoderConfig: latent_channels must be >= 1 and width even and >= 2, "
                             f"got latent_channels={self.latent_channels}, width={self.width}")

    @classmethod
    def from_diffusers(cls, cfg: dict) -> LiteAutoencoderConfig:
        """From a `vae/config.json` dict; CheckpointError if it describes another autoencoder."""
        name = cfg.get("_class_name", CLASS_NAME)
        if name != CLASS_NAME:
            raise CheckpointError(f"autoencoder config _class_name is {name!r}, expected {CLASS_NAME!r}")
        try:
            return cls(latent_channels=int(cfg.get("latent_channels", 16)), width=int(cfg.get("width", 48)))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"bad LiteAutoencoder config: {e}") from None

    def to_diffusers(self) -> dict:
        """The `config.json` dict that from_diffusers reads back to this config."""
        return {"_class_name": CLASS_NAME, "latent_channels": self.latent_channels, "width": self.width}


def conv(n_in, n_out, stride=1):
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1)


class Res(nn.Module):
    """Residual block: relu(x + conv(relu(conv(x))))."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Sequential(conv(channels, channels), nn.ReLU(), conv(channels, channels))
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(x + self.conv(x))


def Encoder(latent_channels=16, width=48):
    """(B, 3, H, W) in [0, 1] -> (B, latent_channels, H/8, W/8)."""
    w = width
    return nn.Sequential(
        conv(3, w // 2, stride=2), nn.ReLU(),   # H/2
        conv(w // 2, w, stride=2), nn.ReLU(),   # H/4
        Res(w),
        conv(w, w, stride=2), nn.ReLU(),        # H/8
        Res(w),
        conv(w, latent_channels),
    )  # fmt: skip


def Decoder(latent_channels=16, width=48):
    """(B, latent_channels, h, w) -> (B, 3, 8h, 8w), roughly [0, 1] (not clamped)."""
    w = width
    return nn.Sequential(
        conv(latent_channels, w), nn.ReLU(),
        Res(w), Res(w),
        nn.Upsample(scale_factor=2), conv(w, w), nn.ReLU(),           # 2h
        Res(w),
        nn.Upsample(scale_factor=2), conv(w, w // 2), nn.ReLU(),      # 4h
        conv(w // 2, 3 * 2 * 2), nn.PixelShuffle(2),                  # 8h: (B, 12, 4h, 4w) -> (B, 3, 8h, 8w)
    )  # fmt: skip


class LiteAutoencoder(nn.Module):
    """Encoder + decoder; `LiteAutoencoder(config)`, weights from loading.load_autoencoder."""

    def __init__(self, config: LiteAutoencoderConfig = LiteAutoencoderConfig()):
        super().__init__()
        self.config = config
        self.latent_channels = config.latent_channels
        self.encoder = Encoder(config.latent_channels, config.width)
        self.decoder = Decoder(config.latent_channels, config.width)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], H and W multiples of 8 -> latents (B, C, H/8, W/8)."""
        H, W = images.shape[-2:]
        if H % 8 or W % 8:
            # A stride-2 conv would round odd sizes up and the decoder could not give the size back.
            raise ValueError(f"LiteAutoencoder.encode: image size {H}x{W} is not a multiple of 8")
        return self.encoder(images)

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, 8h, 8w), unclamped (for training losses)."""
        return self.decoder(latents)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, 8h, 8w) clamped to [0, 1]."""
        return self.decode_raw(latents).clamp(0, 1)
