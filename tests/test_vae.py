"""KL autoencoder: parity with diffusers.AutoencoderKL and the original single-file layout round trip."""

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL

from livestyle.errors import CheckpointError
from livestyle.models.convert_vae import vae_config_from_original, vae_from_original, vae_to_original
from livestyle.models.vae import KLAutoencoder, KLAutoencoderConfig

TINY = dict(
    block_out_channels=(32, 64),  # two widths, so a wrong decoder level order cannot load
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
)


def reference(seed: int = 0, **overrides) -> AutoencoderKL:
    """A tiny random diffusers VAE with every parameter perturbed (no unit norms, no zero biases)."""
    torch.manual_seed(seed)
    ref = AutoencoderKL(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref


@torch.no_grad()
def assert_parity(ours: KLAutoencoder, ref: AutoencoderKL) -> None:
    sf, shift = ref.config.scaling_factor, ref.config.shift_factor or 0.0
    images = torch.rand(2, 3, 48, 80)
    want = (ref.encode(images * 2 - 1).latent_dist.mean - shift) * sf
    latents = ours.encode(images)
    assert latents.shape == (2, 4, 24, 40)  # two levels: one downsampling
    assert want.abs().max() > 0.05  # a real comparison, not of two near-zero tensors
    assert (latents - want).abs().max() <= 1e-4

    z = torch.randn(2, 4, 24, 40) * sf
    want = ((ref.decode(z / sf + shift).sample + 1) / 2).clamp(0, 1)
    decoded = ours.decode(z)
    assert decoded.shape == (2, 3, 48, 80)
    assert 0.05 < want.std()
    assert (decoded - want).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # SD 1.x/2.x-style: quant convs, no shift
        # FLUX-style: shifted latents, no quant convs
        {"scaling_factor": 0.3611, "shift_factor": 0.1159, "use_quant_conv": False, "use_post_quant_conv": False},
    ],
    ids=["sd", "shifted-no-quant"],
)
def test_parity_with_diffusers_autoencoder_kl(overrides):
    ref = reference(**overrides)
    config = KLAutoencoderConfig.from_diffusers(dict(ref.config))
    assert config.block_out_channels == (32, 64) and config.norm_num_groups == 8
    assert config.shift_factor == overrides.get("shift_factor")
    ours = KLAutoencoder(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # parameter names equal diffusers'
    assert_parity(ours, ref)


def test_from_diffusers_rejects_unsupported_configs():
    with pytest.raises(CheckpointError, match="act_fn"):
        KLAutoencoderConfig.from_diffusers({**TINY, "act_fn": "gelu"})
    with pytest.raises(CheckpointError, match="down_block_types"):
        KLAutoencoderConfig.from_diffusers({**TINY, "down_block_types": ["DownEncoderBlock2D", "AttnDownBlock2D"]})
    with pytest.raises(CheckpointError, match="mid_block_add_attention"):
        KLAutoencoderConfig.from_diffusers({**TINY, "mid_block_add_attention": False})
    # a config.json has lists where the dataclass has tuples
    listed = KLAutoencoderConfig.from_diffusers({k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()})
    assert listed.block_out_channels == (32, 64) and listed.scaling_factor == 0.18215 and listed.shift_factor is None


def test_original_layout_round_trip():
    ref = reference(seed=1, layers_per_block=2)
    original = vae_to_original(ref.state_dict())

    # It looks like a single-file checkpoint's first_stage_model.*
    assert original["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert original["decoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    assert original["encoder.down.1.block.0.nin_shortcut.weight"].shape == (64, 32, 1, 1)
    assert original["decoder.up.1.block.0.conv1.weight"].shape == (64, 64, 3, 3)  # up.1 is the deepest level
    assert original["decoder.up.0.block.0.nin_shortcut.weight"].shape == (32, 64, 1, 1)
    assert "decoder.up.1.upsample.conv.weight" in original and "decoder.up.0.upsample.conv.weight" not in original
    assert "encoder.norm_out.weight" in original and "decoder.mid.block_2.conv2.bias" in original

    config = vae_config_from_original({k: tuple(v.shape) for k, v in original.items()}, norm_num_groups=8)
    assert config == KLAutoencoderConfig(
        latent_channels=4, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8
    )
    converted = vae_from_original(original)
    assert converted.keys() == ref.state_dict().keys()
    ours = KLAutoencoder(config).eval()
    ours.load_state_dict(converted, strict=True)
    assert_parity(ours, ref)


def test_original_layout_without_quant_convs():
    ref = reference(use_quant_conv=False, use_post_quant_conv=False)
    original = vae_to_original(ref.state_dict())
    config = vae_config_from_original({k: v.shape for k, v in original.items()}, norm_num_groups=8)
    assert not config.use_quant_conv and not config.use_post_quant_conv
    KLAutoencoder(config).load_state_dict(vae_from_original(original), strict=True)


def test_original_layout_errors_name_keys():
    original = vae_to_original(reference().state_dict())

    missing = {k: v for k, v in original.items() if k != "decoder.up.0.block.1.conv2.weight"}
    with pytest.raises(CheckpointError, match=r"missing \['decoder\.up\.0\.block\.1\.conv2\.weight'\]"):
        vae_from_original(missing)

    stray = dict(original, **{"encoder.mid.attn_2.q.weight": torch.zeros(64, 64, 1, 1)})
    with pytest.raises(CheckpointError, match=r"unexpected \['encoder\.mid\.attn_2\.q\.weight'\]"):
        vae_from_original(stray)

    misshapen = dict(original, **{"encoder.mid.attn_1.k.weight": torch.zeros(64, 32, 1, 1)})
    with pytest.raises(CheckpointError, match=r"wrong shape.*encoder\.mid\.attn_1\.k\.weight"):
        vae_from_original(misshapen)

    with pytest.raises(CheckpointError, match="first_stage_model"):
        vae_from_original({f"first_stage_model.{k}": v for k, v in original.items()})

    with pytest.raises(CheckpointError, match="encoder.conv_in.weight"):
        vae_config_from_original({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)})

    # Training-only loss weights of standalone VAE checkpoints are ignored, not an error.
    with_loss = dict(original, **{"loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4)})
    assert vae_from_original(with_loss).keys() == vae_from_original(original).keys()


def test_config_is_frozen():
    config = KLAutoencoderConfig()
    assert config.block_out_channels == (128, 256, 512, 512) and config.scaling_factor == 0.18215
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.latent_channels = 16
