"""SDXL's autoencoders: TAESDXL and the SDXL KL VAE (scale 0.13025, fp32 upcast) against diffusers."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from safetensors.torch import save_file

from livestyle.models import load_autoencoder
from livestyle.models.convert_vae import vae_to_original
from livestyle.models.loading import SDXL_SCALING_FACTOR
from livestyle.models.taesd import TinyAutoencoder, tiny_from_diffusers
from livestyle.models.vae import KLAutoencoder
from random_weights import perturb


def sdxl_vae(force_upcast: bool = True) -> AutoencoderKL:
    """A tiny KL VAE with SDXL's vae/config.json values (scale 0.13025, force_upcast)."""
    torch.manual_seed(0)
    return perturb(AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=32, scaling_factor=0.13025, force_upcast=force_upcast,
    ), 2)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_vae")
    vae = sdxl_vae()
    vae.save_pretrained(root / "vae")
    save_file(vae_to_original(vae.state_dict()), str(root / "sdxl_vae.safetensors"))  # a standalone file
    return root, vae


@torch.no_grad()
def test_sdxl_vae_matches_diffusers(vae_folder):
    root, ref = vae_folder
    image = torch.rand(1, 3, 48, 80)
    # StableDiffusionXLImg2ImgPipeline: latent_dist.mean (argmax) * scaling_factor; decode: / scaling_factor
    want = ref.encode(image * 2 - 1).latent_dist.mean * 0.13025
    want_image = ((ref.decode(want / 0.13025).sample + 1) / 2).clamp(0, 1)
    for source in (root / "vae", root / "sdxl_vae.safetensors"):  # config.json / no config: family says it
        ours = load_autoencoder(source, family="sdxl")
        assert isinstance(ours, KLAutoencoder) and ours.config.scaling_factor == SDXL_SCALING_FACTOR
        assert (ours.encode(image) - want).abs().max() <= 1e-4
        assert (ours.decode(want) - want_image).abs().max() <= 1e-4
    # without the family, a bare file is read as SD's VAE (the same shapes)
    assert load_autoencoder(root / "sdxl_vae.safetensors").config.scaling_factor == 0.18215


@torch.no_grad()
def test_upcast_keeps_the_vae_in_fp32_for_fp16(vae_folder, tmp_path):
    root, ref = vae_folder
    latents = torch.randn(1, 4, 6, 10)
    want = ((ref.decode(latents / 0.13025).sample + 1) / 2).clamp(0, 1)
    up = load_autoencoder(root / "vae", dtype=torch.float16, family="sdxl")  # force_upcast in its config
    assert all(p.dtype == torch.float32 for p in up.parameters())
    out = up.decode(latents.half())
    assert out.dtype == torch.float16 and (out.float() - want).abs().max() <= 2e-3  # fp16 output rounding
    assert up.encode(torch.rand(1, 3, 16, 16, dtype=torch.float16)).dtype == torch.float16
    for kwargs in ({"dtype": torch.float16, "family": "sdxl", "upcast": False},  # asked not to
                   {"dtype": torch.float16},  # SD 1.x/2.x never
                   {"dtype": torch.bfloat16, "family": "sdxl"}):  # bf16 has fp32's range
        vae = load_autoencoder(root / "vae", **kwargs)
        assert next(vae.parameters()).dtype == kwargs["dtype"], kwargs
    for source in (root / "sdxl_vae.safetensors",):  # no config: upcast for SDXL
        assert next(load_autoencoder(source, dtype=torch.float16, family="sdxl").parameters()).dtype == torch.float32
    fixed = tmp_path / "fp16-fix"  # madebyollin/sdxl-vae-fp16-fix says force_upcast false
    sdxl_vae(force_upcast=False).save_pretrained(fixed)
    assert next(load_autoencoder(fixed, dtype=torch.float16, family="sdxl").parameters()).dtype == torch.float16


@torch.no_grad()
def test_upcast_avoids_fp16_overflow(vae_folder):
    """What the upcast is for: activations past fp16's 65504 are inf in fp16, finite in fp32."""
    root, _ = vae_folder
    up = load_autoencoder(root / "vae", dtype=torch.float16, family="sdxl")
    half = load_autoencoder(root / "vae", dtype=torch.float16, family="sdxl", upcast=False)
    for vae in (up, half):  # a decoder whose mid activations reach ~1e5 (SDXL's do, at real sizes)
        vae.decoder.conv_in.weight.mul_(3e4)
    latents = torch.randn(1, 4, 4, 4, dtype=torch.float16)
    assert not torch.isfinite(half.decoder(latents / 0.13025)).all()
    assert torch.isfinite(up.decoder(latents.float() / 0.13025)).all()  # before decode's clamp
    assert up.decode(latents).dtype == torch.float16


@torch.no_grad()
def test_taesdxl_matches_diffusers_in_sdxl_use(tmp_path):
    """TAESDXL: TAESD's architecture and format; diffusers' AutoencoderTiny config for it has
    scaling_factor 1.0 (as TAESD's), so its latents are SDXL's scaled latents as they are."""
    torch.manual_seed(0)
    ref = perturb(AutoencoderTiny(latent_channels=4), 5, scale=0.02)  # madebyollin/taesdxl's config
    assert ref.config.scaling_factor == 1.0
    ref.save_pretrained(tmp_path / "taesdxl")
    encoder_sd, decoder_sd = tiny_from_diffusers(ref.state_dict())
    save_file(encoder_sd, str(tmp_path / "taesdxl_encoder.safetensors"))  # the native file pair
    save_file(decoder_sd, str(tmp_path / "taesdxl_decoder.safetensors"))
    image = torch.rand(1, 3, 48, 80)
    z = torch.randn(1, 4, 6, 10)
    # StableDiffusionXL(Img2Img)Pipeline with an AutoencoderTiny: encode(...).latents * scaling_factor;
    # decode(latents / scaling_factor), then image / 2 + 0.5 clamped
    want_latents = ref.encode(image * 2 - 1).latents * ref.config.scaling_factor
    want_image = (ref.decode(z / ref.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    for source in (tmp_path / "taesdxl", tmp_path / "taesdxl_decoder.safetensors"):
        ours = load_autoencoder(source, family="sdxl")
        assert isinstance(ours, TinyAutoencoder)
        assert (ours.encode(image) - want_latents).abs().max() <= 1e-4
        assert (ours.decode(z) - want_image).abs().max() <= 1e-4
    assert json.loads((tmp_path / "taesdxl" / "config.json").read_text())["latent_channels"] == 4
