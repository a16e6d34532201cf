"""Lite autoencoder: the demo model's own tiny, CPU-fast image <-> latent codec.

A slimmer cousin of taesd.py's TinyAutoencoder, sized so that encode + decode at
256x256 leave room for a U-Net step inside a 24 fps budget on two CPU cores
(~6.6 ms encode, ~11.6 ms decode at width 48, 2 threads). What makes it cheap:

- the encoder downsamples first (two stride-2 convs before any residual block), so
  the residual blocks run at 1/4 and 1/8 resolution;
- v2's decoder's last 2x is a PixelShuffle of a 12-channel conv (3 colours x 2 x 2),
  so no conv ever runs at full resolution (v3's full-resolution block is narrow);
- residual blocks are two convs wide instead of TAESD's three.

Three decoders, chosen by the config (its defaults are v2's):

- upsample "nearest" (v2): nearest-neighbour 2x then a conv, twice, and a final
  PixelShuffle. Cheap, but each nearest upsample copies a value into a 2x2 block
  and the round trip shows a faint 8-px grid and keeps ~5% of a photo's sharpness.
- upsample "bilinear": v2's layout and weights (the same tensors, so a v2 decoder loads
  into it) with bilinear 2x upsampling. Nearest copies pin the decoder's texture to the
  latent grid: a latent that moves by a fraction of a cell comes out as texture that
  jumps (StyleGAN3's "texture sticking", Karras et al. 2021, arXiv:2106.12423); bilinear
  upsampling lets it move smoothly with the scene.
- upsample "shuffle": every 2x is a conv to 4x the channels and a PixelShuffle
  (sub-pixel convolution, Shi et al. 2016, arXiv:1609.05158), initialised as
  nearest-neighbour (ICNR, Aitken et al. 2017, arXiv:1707.02937) so that training
  starts without the checkerboard; `full_res_width` > 0 then adds a residual block
  of that many channels at full resolution, where fine texture is drawn.

`guide_width` > 0 (v3, "nearest" or "bilinear" only) gives the decoder a guide: the
frame the latents were made from, at full resolution. A latent cell covers 8x8 pixels,
so no decoder can give back the edges, eyes and fine strokes it does not hold; the
guide head (`GuideHead`) reads the frame's pixels (pixel-unshuffled to the last feature
map's resolution, nothing lost) beside the decoder's own features and adds a
correction to its last conv, so edges land where the frame has them. Its last conv
starts at zero: a fresh head decodes exactly as the decoder without it. At width 16 it
adds ~3.7 ms to a 256x256 decode on two CPU threads (README, the demo model's speed).

Contract shared with TinyAutoencoder and KLAutoencoder: images are (B, 3, H, W) in
[0, 1] with H and W multiples of 8; latents are (B, C, H/8, W/8), unscaled. A guided
LiteAutoencoder's `decode` also takes the frames (`guided` says which kind it is).

Weights live in a diffusers-like component folder: `config.json`
{"_class_name": "LiteAutoencoder", "latent_channels": C, "width": w} beside
`diffusion_pytorch_model.safetensors` (loaded by loading.load_autoencoder); the v3
fields ("upsample", "full_res_width", "guide_width") are written only when they differ
from v2's, so v2 folders read and write exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from livestyle.errors import CheckpointError

CLASS_NAME = "LiteAutoencoder"  # config.json `_class_name`
UPSAMPLES = ("nearest", "bilinear", "shuffle")
V2_LAYOUT = ("nearest", "bilinear")  # upsamples with v2's tensors: either loads the other's weights


@dataclass(frozen=True)
class LiteAutoencoderConfig:
    """latent_channels: C of the (B, C, H/8, W/8) latents; width: channels of the inner convs (even).

    upsample: "nearest" (v2's decoder), "bilinear" (v2's layout, smooth upsampling) or "shuffle"
    (sub-pixel convs at every 2x).
    full_res_width: channels of the residual block at full resolution ("shuffle" only; 0: none).
    guide_width: channels of the guide head, which reads the input frame ("nearest" or "bilinear"
    only; 0: none, the decoder sees the latents alone).
    """

    latent_channels: int = 16
    width: int = 48
    upsample: str = "nearest"
    full_res_width: int = 0
    guide_width: int = 0

    def __post_init__(self):
        if self.latent_channels < 1 or self.width < 2 or self.width % 2:
            raise ValueError(f"LiteAutoencoderConfig: latent_channels must be >= 1 and width even and >= 2, "
                             f"got latent_channels={self.latent_channels}, width={self.width}")
        if self.upsample not in UPSAMPLES:
            raise ValueError(f"LiteAutoencoderConfig: upsample must be one of {', '.join(UPSAMPLES)}, "
                             f"got {self.upsample!r}")
        if self.full_res_width < 0 or (self.full_res_width and self.upsample != "shuffle"):
            raise ValueError(f"LiteAutoencoderConfig: full_res_width must be >= 0, and 0 unless upsample is "
                             f"'shuffle', got full_res_width={self.full_res_width}, upsample={self.upsample!r}")
        if self.guide_width < 0 or (self.guide_width and self.upsample not in V2_LAYOUT):
            raise ValueError(f"LiteAutoencoderConfig: guide_width must be >= 0, and 0 unless upsample is "
                             f"{' or '.join(map(repr, V2_LAYOUT))}, got guide_width={self.guide_width}, "
                             f"upsample={self.upsample!r}")

    @classmethod
    def from_diffusers(cls, cfg: dict) -> LiteAutoencoderConfig:
        """From a `vae/config.json` dict; CheckpointError if it describes another autoencoder."""
        name = cfg.get("_class_name", CLASS_NAME)
        if name != CLASS_NAME:
            raise CheckpointError(f"autoencoder config _class_name is {name!r}, expected {CLASS_NAME!r}")
        try:
            return cls(latent_channels=int(cfg.get("latent_channels", 16)), width=int(cfg.get("width", 48)),
                       upsample=str(cfg.get("upsample", "nearest")),
                       full_res_width=int(cfg.get("full_res_width", 0)),
                       guide_width=int(cfg.get("guide_width", 0)))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"bad LiteAutoencoder config: {e}") from None

    def to_diffusers(self) -> dict:
        """The `config.json` dict that from_diffusers reads back to this config (v2 keys only for v2)."""
        cfg = {"_class_name": CLASS_NAME, "latent_channels": self.latent_channels, "width": self.width}
        if self.upsample != "nearest":
            cfg |= {"upsample": self.upsample, "full_res_width": self.full_res_width}
        if self.guide_width:
            cfg |= {"guide_width": self.guide_width}
        return cfg


def conv(n_in, n_out, stride=1):
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1)


class Res(nn.Module):
    """Residual block: relu(x + conv(relu(conv(x)))), or without the outer relu (fuse=False)."""

    def __init__(self, channels, fuse=True):
        super().__init__()
        self.conv = nn.Sequential(conv(channels, channels), nn.ReLU(), conv(channels, channels))
        self.fuse = nn.ReLU() if fuse else nn.Identity()

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


class Shuffle2x(nn.Sequential):
    """Sub-pixel 2x upsample: (B, n_in, h, w) -> conv -> (B, 4 n_out, h, w) -> (B, n_out, 2h, 2w).

    ICNR init (Aitken et al. 2017): the 4 sub-pixel kernels of each output channel start
    equal, so at init this is a conv followed by nearest upsampling, with no checkerboard;
    training is then free to make the 4 phases differ where detail needs it.
    """

    def __init__(self, n_in, n_out):
        super().__init__(conv(n_in, 4 * n_out), nn.PixelShuffle(2))
        weight, bias = self[0].weight, self[0].bias  # (4 n_out, n_in, 3, 3): output channel c*4 + phase
        with torch.no_grad():
            weight.copy_(weight[::4].repeat_interleave(4, dim=0))
            bias.copy_(bias[::4].repeat_interleave(4, dim=0))


def Decoder(latent_channels=16, width=48, mode="nearest"):
    """v2: (B, latent_channels, h, w) -> (B, 3, 8h, 8w), roughly [0, 1] (not clamped).

    mode: the two 2x upsamples' interpolation, "nearest" (v2) or "bilinear"; no weights of their own.
    """
    w = width
    return nn.Sequential(
        conv(latent_channels, w), nn.ReLU(),
        Res(w), Res(w),
        nn.Upsample(scale_factor=2, mode=mode), conv(w, w), nn.ReLU(),       # 2h
        Res(w),
        nn.Upsample(scale_factor=2, mode=mode), conv(w, w // 2), nn.ReLU(),  # 4h
        conv(w // 2, 3 * 2 * 2), nn.PixelShuffle(2),                  # 8h: (B, 12, 4h, 4w) -> (B, 3, 8h, 8w)
    )  # fmt: skip


def ShuffleDecoder(latent_channels=16, width=48, full_res_width=0):
    """v3: (B, latent_channels, h, w) -> (B, 3, 8h, 8w), roughly [0, 1] (not clamped).

    v2's layout with every upsample a Shuffle2x; the last one keeps f = full_res_width
    channels at full resolution for a residual block before the colour conv. That path
    has no relu outside the block's inner one: with few channels, relus there died in
    training (all negative, no gradient) and left a black image.
    """
    w, f = width, full_res_width
    layers = [
        conv(latent_channels, w), nn.ReLU(),
        Res(w), Res(w),
        Shuffle2x(w, w), nn.ReLU(),                                     # 2h
        Res(w),
        Shuffle2x(w, w // 2), nn.ReLU(),                                # 4h
        Shuffle2x(w // 2, f or 3),                                      # 8h: colour, or (B, f, 8h, 8w)
    ]  # fmt: skip
    if f:
        layers += [Res(f, fuse=False), conv(f, 3)]
    return nn.Sequential(*layers)


class GuideHead(nn.Module):
    """The guided decoder's head: (features (B, n, H/2, W/2), frames (B, 3, H, W) in [0, 1]) ->
    a correction (B, 12, H/2, W/2) to the v2 decoder's last conv (3 colours x 2 x 2, before
    its PixelShuffle).

    The frames are pixel-unshuffled to (B, 12, H/2, W/2): every pixel kept, at the feature
    map's resolution, so the head's convs run at a quarter of the pixels. Three 3x3 convs
    (14 px of the frame around each output pixel). The last starts at zero, so a fresh
    head changes nothing.
    """

    def __init__(self, features: int, width: int):
        super().__init__()
        self.net = nn.Sequential(
            conv(features + 12, width), nn.ReLU(),
            conv(width, width), nn.ReLU(),
            conv(width, 12),
        )  # fmt: skip
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, features: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([features, F.pixel_unshuffle(frames * 2 - 1, 2)], dim=1))


class LiteAutoencoder(nn.Module):
    """Encoder + decoder; `LiteAutoencoder(config)`, weights from loading.load_autoencoder."""

    def __init__(self, config: LiteAutoencoderConfig = LiteAutoencoderConfig()):
        super().__init__()
        self.config = config
        self.latent_channels = config.latent_channels
        self.encoder = Encoder(config.latent_channels, config.width)
        if config.upsample in V2_LAYOUT:
            self.decoder = Decoder(config.latent_channels, config.width, config.upsample)
        else:
            self.decoder = ShuffleDecoder(config.latent_channels, config.width, config.full_res_width)
        self.guide = GuideHead(config.width // 2, config.guide_width) if config.guide_width else None

    @property
    def guided(self) -> bool:
        """Whether decode needs the frames the latents were made from."""
        return self.guide is not None

    def with_upsample(self, upsample: str) -> LiteAutoencoder:
        """A copy whose decoder upsamples another way, with these weights: "nearest" and "bilinear"
        only (the same tensors; "shuffle" has others). ValueError for any other switch."""
        if upsample == self.config.upsample:
            return self
        if upsample not in V2_LAYOUT or self.config.upsample not in V2_LAYOUT:
            raise ValueError(f"a {self.config.upsample!r} decoder's weights cannot become a {upsample!r} one's "
                             f"(only {' and '.join(V2_LAYOUT)} share theirs)")
        twin = LiteAutoencoder(replace(self.config, upsample=upsample))
        twin.load_state_dict(self.state_dict())
        return twin.to(next(self.parameters()).device)

    def with_guide(self, guide_width: int) -> LiteAutoencoder:
        """A copy with a fresh guide head of guide_width channels (decoding as this one until it is
        trained) and these encoder and decoder weights. ValueError if this one has a guide already."""
        if self.guided:
            raise ValueError(f"this autoencoder has a guide head already (guide_width {self.config.guide_width})")
        twin = LiteAutoencoder(replace(self.config, guide_width=guide_width))
        missing, _ = twin.load_state_dict(self.state_dict(), strict=False)  # all but the new head's
        assert all(k.startswith("guide.") for k in missing), missing
        return twin.to(next(self.parameters()).device)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], H and W multiples of 8 -> latents (B, C, H/8, W/8)."""
        H, W = images.shape[-2:]
        if H % 8 or W % 8:
            # A stride-2 conv would round odd sizes up and the decoder could not give the size back.
            raise ValueError(f"LiteAutoencoder.encode: image size {H}x{W} is not a multiple of 8")
        return self.encoder(images)

    def decode_raw(self, latents: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, 8h, 8w), unclamped (for training losses).

        frames: (B, 3, 8h, 8w) in [0, 1], the frames the latents were made from: needed by a
        guided decoder (`guided`), refused by the others. ValueError if they do not fit.
        """
        if self.guide is None:
            if frames is not None:
                raise ValueError("LiteAutoencoder.decode: this decoder has no guide head; pass no frames")
            return self.decoder(latents)
        B, _, h, w = latents.shape
        if frames is None or tuple(frames.shape) != (B, 3, 8 * h, 8 * w):
            got = "none" if frames is None else "x".join(map(str, frames.shape))
            raise ValueError(f"LiteAutoencoder.decode: a guided decoder needs the frames, ({B}, 3, {8 * h}, "
                             f"{8 * w}) for these latents; got {got}")
        features = self.decoder[:-2](latents)  # (B, width/2, 4h, 4w)
        return F.pixel_shuffle(self.decoder[-2](features) + self.guide(features, frames), 2)

    def decode(self, latents: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, 8h, 8w) clamped to [0, 1]; frames: as decode_raw."""
        return self.decode_raw(latents, frames).clamp(0, 1)
