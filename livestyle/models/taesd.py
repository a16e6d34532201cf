"""Tiny AutoEncoder (TAESD family): a small, fast stand-in for a diffusion model's VAE.

After madebyollin/taesd (MIT, https://github.com/madebyollin/taesd), same
architecture and same weight layout, so its `.safetensors` files load as they are:

- TAESD / TAESDXL: 4 latent channels (SD 1.x/2.x, SDXL latent spaces),
- TAESD3 / TAEF1: 16 latent channels (SD3, FLUX.1),
- TAEF2: 32 latent channels (FLUX.2), with a GroupNorm "pooling" branch in some Blocks.

Which variant a pair of state dicts holds is read from the weight shapes and keys
(latent width from the outer convs, pooling branches from `N.pool.*` keys), never
from a file name.

Contract shared with the KL autoencoder (vae.py): images are (B, 3, H, W) in [0, 1],
latents are (B, C, H/8, W/8), unscaled (TAESD latents already match the diffusion
model's scaled latent space, so the scale factor is 1).

TAESDXL is TAESD trained on SDXL's latent space: the same architecture, format and scale
(diffusers' AutoencoderTiny configs of both say scaling_factor 1.0; their latent_shift 0.5
and latent_magnitude 3 only map latents to [0, 1] for storing them as images). Nothing
in the weights tells the two apart, so the caller pairs TAESDXL with SDXL checkpoints.
"""

import re

import torch
import torch.nn as nn

from livestyle import kernels
from livestyle.errors import CheckpointError


def conv(n_in, n_out, **kwargs):
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    """Soft clamp of latents to (-3, 3); the decoder was trained behind it."""

    def forward(self, x):
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """Residual conv block: relu(conv-relu-conv-relu-conv(x) + skip(x)).

    With `pool=True` (TAEF2) a 1x1 -> GroupNorm -> ReLU -> 1x1 branch is added to
    the input first; its GroupNorm is the only place where the block sees
    statistics of the whole image.
    """

    def __init__(self, n_in, n_out, pool=False):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()
        if pool:
            n_gn = 4 * n_in
            conv1x1 = lambda c_in, c_out: nn.Conv2d(c_in, c_out, 1, bias=False)  # noqa: E731
            self.pool = nn.Sequential(conv1x1(n_in, n_gn), nn.GroupNorm(4, n_gn), nn.ReLU(), conv1x1(n_gn, n_in))
        else:
            self.pool = None

    def _pool(self, x):
        """The pool branch with its GroupNorm and ReLU fused (one kernel through livestyle.kernels)."""
        squeeze, norm, _, expand = self.pool
        return expand(kernels.group_norm(squeeze(x), norm.weight, norm.bias, norm.num_groups, norm.eps, "relu"))

    def forward(self, x):
        if self.pool is not None:
            x = x + self._pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


def Encoder(latent_channels=4, pooled=frozenset()):
    """(B, 3, H, W) in [0, 1] -> (B, latent_channels, H/8, W/8). `pooled`: indices of Blocks with a pool branch."""
    B = lambda i: Block(64, 64, pool=i in pooled)  # noqa: E731  (i: the Block's index in the Sequential = its key)
    return nn.Sequential(
        conv(3, 64), B(1),
        conv(64, 64, stride=2, bias=False), B(3), B(4), B(5),
        conv(64, 64, stride=2, bias=False), B(7), B(8), B(9),
        conv(64, 64, stride=2, bias=False), B(11), B(12), B(13),
        conv(64, latent_channels),
    )  # fmt: skip


def Decoder(latent_channels=4, pooled=frozenset()):
    """(B, latent_channels, h, w) -> (B, 3, 8h, 8w), roughly [0, 1] (not clamped). `pooled` as in Encoder."""
    B = lambda i: Block(64, 64, pool=i in pooled)  # noqa: E731
    return nn.Sequential(
        Clamp(), conv(latent_channels, 64), nn.ReLU(),
        B(3), B(4), B(5), nn.Upsample(scale_factor=2), conv(64, 64, bias=False),
        B(8), B(9), B(10), nn.Upsample(scale_factor=2), conv(64, 64, bias=False),
        B(13), B(14), B(15), nn.Upsample(scale_factor=2), conv(64, 64, bias=False),
        B(18), conv(64, 3),
    )  # fmt: skip


class TinyAutoencoder(nn.Module):
    """TAESD-family encoder + decoder. Build from weights with `from_state_dicts`."""

    guided = False  # decode takes the latents alone (LiteAutoencoder.guided)

    def __init__(self, latent_channels=4, encoder_pooled=frozenset(), decoder_pooled=frozenset()):
        super().__init__()
        self.latent_channels = latent_channels
        self.encoder = Encoder(latent_channels, encoder_pooled)
        self.decoder = Decoder(latent_channels, decoder_pooled)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], H and W multiples of 8 -> latents (B, C, H/8, W/8), unscaled."""
        return self.encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, 8h, 8w) clamped to [0, 1]."""
        return self.decoder(latents).clamp(0, 1)

    @classmethod
    def from_state_dicts(cls, encoder_sd: dict, decoder_sd: dict) -> "TinyAutoencoder":
        """Build the variant the weights describe and load them strictly (fp32 parameters).

        Takes taesd's native layout, one dict per half (keys `0.weight`, `1.conv.0.weight`,
        ...). For a single file, first pass it through `split_tiny_state_dict`.
        """
        enc_latent = _shape(encoder_sd, "14.weight", "encoder")[0]  # final conv (C, 64, 3, 3)
        dec_latent = _shape(decoder_sd, "1.weight", "decoder")[1]  # first conv (64, C, 3, 3)
        if enc_latent != dec_latent:
            raise CheckpointError(
                f"tiny autoencoder halves do not match: the encoder makes {enc_latent}-channel latents, "
                f"the decoder reads {dec_latent}-channel latents"
            )
        model = cls(enc_latent, _pooled_blocks(encoder_sd), _pooled_blocks(decoder_sd))
        _load_checked(model.encoder, encoder_sd, "tiny autoencoder encoder")
        _load_checked(model.decoder, decoder_sd, "tiny autoencoder decoder")
        return model


def split_tiny_state_dict(sd: dict) -> tuple[dict, dict]:
    """One tiny-autoencoder dict -> (encoder_sd, decoder_sd) in taesd's native layout.

    Accepts `encoder.N...`/`decoder.N...` prefixed native keys and diffusers'
    AutoencoderTiny layout (`encoder.layers.N...`, see `tiny_from_diffusers`).
    """
    if any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in sd):
        return tiny_from_diffusers(sd)
    encoder_sd, decoder_sd, other = {}, {}, []
    for key, value in sd.items():
        half, _, rest = key.partition(".")
        if half == "encoder":
            encoder_sd[rest] = value
        elif half == "decoder":
            decoder_sd[rest] = value
        else:
            other.append(key)
    if other:
        raise CheckpointError(
            f"not a tiny autoencoder file: {len(other)} keys are outside encoder./decoder., e.g. {other[:3]}"
        )
    return encoder_sd, decoder_sd


def tiny_from_diffusers(sd: dict) -> tuple[dict, dict]:
    """diffusers AutoencoderTiny keys -> (encoder_sd, decoder_sd) in taesd's native layout.

    The encoder's `layers` are taesd's Encoder index for index. diffusers' DecoderTiny
    applies the tanh clamp in forward() instead of as layer 0, so its layer N is
    taesd's layer N + 1. (diffusers also maps images to and from [-1, 1] around the
    same layers; those are no weights, so nothing to convert.)
    """
    encoder_sd, decoder_sd, other = {}, {}, []
    for key, value in sd.items():
        match = re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.(.+)", key)
        if match is None:
            other.append(key)
        elif match[1] == "encoder":
            encoder_sd[f"{match[2]}.{match[3]}"] = value
        else:
            decoder_sd[f"{int(match[2]) + 1}.{match[3]}"] = value
    if other:
        raise CheckpointError(f"not a diffusers AutoencoderTiny state dict: unexpected keys {other[:3]}")
    return encoder_sd, decoder_sd


def _shape(sd: dict, key: str, half: str) -> tuple:
    if key not in sd:
        raise CheckpointError(
            f"not a tiny autoencoder {half}: no '{key}' among its {len(sd)} keys (first few: {list(sd)[:3]})"
        )
    return tuple(sd[key].shape)


def _pooled_blocks(sd: dict) -> frozenset:
    """Indices N of the Blocks that carry a pooling branch (keys `N.pool.*`)."""
    return frozenset(int(k.split(".")[0]) for k in sd if re.match(r"\d+\.pool\.", k))


def _load_checked(module: nn.Module, sd: dict, what: str) -> None:
    """load_state_dict(strict=True), with a CheckpointError naming a few bad keys."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in sd and sd[k].shape != v.shape]  # fmt: skip
    if missing or unexpected or wrong:
        found = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        raise CheckpointError(f"{what} weights do not fit: " + "; ".join(f"{n} {k[:3]}" for n, k in found if k))
    module.load_state_dict(sd, strict=True)
