"""Tiny autoencoder: parity with diffusers.AutoencoderTiny, variant inference, real TAEF2 weights."""

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny

from livestyle.errors import CheckpointError
from livestyle.models.taesd import (
    Decoder,
    Encoder,
    TinyAutoencoder,
    split_tiny_state_dict,
    tiny_from_diffusers,
)

WEIGHTS = Path(__file__).parents[1].parent / "shared" / "weights"


def perturb_(module: torch.nn.Module, scale: float = 0.02) -> None:
    """Add noise to every parameter, so that no weight keeps its tidy default (zero bias, unit norm)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


@torch.no_grad()
def test_parity_with_diffusers_autoencoder_tiny():
    torch.manual_seed(0)
    ref = AutoencoderTiny(latent_channels=4).eval()  # TAESD / TAESDXL shape
    perturb_(ref)
    encoder_sd, decoder_sd = tiny_from_diffusers(ref.state_dict())
    ours = TinyAutoencoder.from_state_dicts(encoder_sd, decoder_sd).eval()
    assert ours.latent_channels == 4

    images = torch.rand(2, 3, 48, 80)
    # diffusers takes images in [-1, 1] and maps them back to [0, 1] inside EncoderTiny.
    want_latents = ref.encode(images * 2 - 1).latents
    latents = ours.encode(images)
    assert latents.shape == (2, 4, 6, 10)
    assert latents.abs().max() > 0.1  # not a degenerate all-zero comparison
    assert (latents - want_latents).abs().max() <= 1e-4

    z = torch.randn(2, 4, 6, 10) * 2
    # DecoderTiny returns [-1, 1]-mapped and unclamped images; ours are [0, 1] and clamped.
    want_raw = (ref.decode(z).sample + 1) / 2
    assert (ours.decoder(z) - want_raw).abs().max() <= 1e-4
    images_out = ours.decode(z)
    assert images_out.shape == (2, 3, 48, 80)
    assert images_out.min() >= 0 and images_out.max() <= 1
    assert images_out.std() > 1e-3
    assert (images_out - want_raw.clamp(0, 1)).abs().max() <= 1e-4


def test_split_prefixed_and_diffusers_single_dicts():
    torch.manual_seed(0)
    model = TinyAutoencoder(16)
    prefixed = {f"encoder.{k}": v for k, v in model.encoder.state_dict().items()}
    prefixed |= {f"decoder.{k}": v for k, v in model.decoder.state_dict().items()}
    encoder_sd, decoder_sd = split_tiny_state_dict(prefixed)
    assert encoder_sd.keys() == model.encoder.state_dict().keys()
    assert decoder_sd.keys() == model.decoder.state_dict().keys()

    # A diffusers single file goes through tiny_from_diffusers: decoder layer N is native N + 1.
    diffusers_sd = AutoencoderTiny(latent_channels=4).state_dict()
    encoder_sd, decoder_sd = split_tiny_state_dict(diffusers_sd)
    assert "1.weight" in decoder_sd and "0.weight" not in decoder_sd
    assert decoder_sd["19.weight"].shape == (3, 64, 3, 3)

    with pytest.raises(CheckpointError, match="outside encoder"):
        split_tiny_state_dict({**prefixed, "model.foo": torch.zeros(1)})


@torch.no_grad()
def test_variant_inferred_from_shapes_not_names():
    torch.manual_seed(0)
    # TAESD3 / TAEF1 shape: 16 channels, no pooling.
    encoder16, decoder16 = Encoder(16), Decoder(16)
    model = TinyAutoencoder.from_state_dicts(encoder16.state_dict(), decoder16.state_dict())
    assert model.latent_channels == 16
    assert not any(".pool." in k for k in model.state_dict())

    # TAEF2 shape: 32 channels, pooling in the three deepest encoder and first three decoder Blocks.
    encoder32, decoder32 = Encoder(32, pooled={11, 12, 13}), Decoder(32, pooled={3, 4, 5})
    perturb_(encoder32)
    perturb_(decoder32)
    model = TinyAutoencoder.from_state_dicts(encoder32.state_dict(), decoder32.state_dict())
    assert model.latent_channels == 32
    assert [i for i, m in enumerate(model.encoder) if getattr(m, "pool", None) is not None] == [11, 12, 13]
    assert [i for i, m in enumerate(model.decoder) if getattr(m, "pool", None) is not None] == [3, 4, 5]
    images = torch.rand(1, 3, 32, 40)
    assert torch.equal(model.encode(images), encoder32(images))
    z = torch.randn(1, 32, 4, 5)
    assert torch.equal(model.decode(z), decoder32(z).clamp(0, 1))

    # Pooling read per Block: an unusual placement is reproduced, not assumed.
    odd = TinyAutoencoder.from_state_dicts(Encoder(8, pooled={13}).state_dict(), Decoder(8).state_dict())
    assert [i for i, m in enumerate(odd.encoder) if getattr(m, "pool", None) is not None] == [13]


def test_mangled_state_dicts_are_rejected():
    encoder_sd, decoder_sd = Encoder(32, {11, 12, 13}).state_dict(), Decoder(32, {3, 4, 5}).state_dict()

    missing = {k: v for k, v in encoder_sd.items() if k != "12.pool.3.weight"}
    with pytest.raises(CheckpointError, match=r"missing.*12\.pool\.3\.weight"):
        TinyAutoencoder.from_state_dicts(missing, decoder_sd)

    misshapen = dict(decoder_sd, **{"4.pool.0.weight": torch.zeros(128, 64, 1, 1)})
    with pytest.raises(CheckpointError, match=r"wrong shape.*4\.pool\.0\.weight"):
        TinyAutoencoder.from_state_dicts(encoder_sd, misshapen)

    stray = dict(encoder_sd, **{"2.pool.0.weight": torch.zeros(256, 64, 1, 1)})  # index 2 is a conv, not a Block
    with pytest.raises(CheckpointError, match="unexpected"):
        TinyAutoencoder.from_state_dicts(stray, decoder_sd)

    with pytest.raises(CheckpointError, match="16-channel"):
        TinyAutoencoder.from_state_dicts(Encoder(16).state_dict(), decoder_sd)

    with pytest.raises(CheckpointError, match="14.weight"):
        TinyAutoencoder.from_state_dicts({"weight": torch.zeros(1)}, decoder_sd)


# ---- real pretrained TAEF2 weights (test fixture outside the project) ----------------

# PSNR (dB) of encode -> decode with the upstream reference, from ../shared/weights/README.md.
REFERENCE_PSNR = {
    ("astronaut", 256): 29.40, ("coffee", 256): 29.75, ("chelsea", 256): 32.87, ("rocket", 256): 31.57,
    ("astronaut", 512): 31.19, ("coffee", 512): 31.38, ("chelsea", 512): 36.02, ("rocket", 512): 31.66,
}  # fmt: skip


@pytest.fixture(scope="module")
def taef2():
    encoder_path, decoder_path = WEIGHTS / "taef2_encoder.safetensors", WEIGHTS / "taef2_decoder.safetensors"
    if not (encoder_path.exists() and decoder_path.exists()):
        pytest.skip(f"real TAEF2 weights not found in {WEIGHTS} (a test fixture kept outside the project)")
    from safetensors.torch import load_file

    encoder_sd, decoder_sd = load_file(encoder_path), load_file(decoder_path)
    assert encoder_sd["0.weight"].dtype == torch.float16
    model = TinyAutoencoder.from_state_dicts(encoder_sd, decoder_sd).eval()  # fp16 weights -> fp32 parameters
    assert next(model.parameters()).dtype == torch.float32
    return model


def load_image(name: str, size: int) -> torch.Tensor:
    """skimage.data image resized square with PIL bicubic -> (1, 3, size, size) in [0, 1]."""
    from PIL import Image
    from skimage import data

    pixels = np.asarray(Image.fromarray(getattr(data, name)()).convert("RGB").resize((size, size), Image.BICUBIC))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255  # (H, W, 3) -> (1, 3, H, W)


# 512x512 takes ~8 s per image on 2 CPU cores (~35 s for the four), hence the `slow` mark.
@pytest.mark.parametrize("size", [256, pytest.param(512, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket"])
@torch.no_grad()
def test_taef2_reconstruction_psnr_matches_reference(taef2, name, size):
    images = load_image(name, size)
    start = time.perf_counter()
    latents = taef2.encode(images)
    decoded = taef2.decode(latents)
    seconds = time.perf_counter() - start
    assert latents.shape == (1, 32, size // 8, size // 8)
    assert 1.0 < latents.abs().max() < 8.0  # README: up to about 4.7 at 512
    psnr = 10 * math.log10(1 / torch.mean((decoded - images) ** 2).item())
    assert abs(psnr - REFERENCE_PSNR[name, size]) <= 0.05, f"{name} {size}: {psnr:.3f} dB ({seconds:.1f} s)"
