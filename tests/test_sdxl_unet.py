"""SDXL U-Net: parity with diffusers.UNet2DConditionModel (text_time added embedding,
per-level depth), the original single-file layout, the temporal cache, load_unet."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors.torch import save_file

from livestyle.errors import CheckpointError
from livestyle.models import load_unet
from livestyle.models.checkpoint import describe
from livestyle.models.convert_unet import (
    original_module_names,
    unet_config_from_original,
    unet_from_original,
    unet_to_original,
)
from livestyle.models.temporal import TemporalCache
from livestyle.models.unet import UNet, UNetConfig
from random_weights import perturb

PREFIX = "model.diffusion_model."

# SDXL's shape, shrunk: no attention at level 0, depth growing per level (SDXL: 1, 2, 10),
# linear projections, per-level heads, the text_time added embedding (SDXL: 1280 pooled
# text + 6 time ids x 256 = 2816; here 24 + 6 x 256 = 1560).
POOLED, TIME_DIM = 24, 256  # the time-id width is not stored in the weights: SDXL's 256 for the single file
SDXL_TINY = dict(
    block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=(2, 4, 4), cross_attention_dim=40,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2), use_linear_projection=True, norm_num_groups=32, sample_size=16,
    addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
    projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM,
)
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (SDXL-Turbo's is the same).
SDXL = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], center_input_sample=False,
    class_embed_type=None, class_embeddings_concat=False, conv_in_kernel=3, conv_out_kernel=3,
    cross_attention_dim=2048, cross_attention_norm=None,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], downsample_padding=1,
    dual_cross_attention=False, encoder_hid_dim=None, encoder_hid_dim_type=None, flip_sin_to_cos=True, freq_shift=0,
    in_channels=4, layers_per_block=2, mid_block_only_cross_attention=None, mid_block_scale_factor=1,
    mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-05, norm_num_groups=32, num_attention_heads=None,
    num_class_embeds=None, only_cross_attention=False, out_channels=4, projection_class_embeddings_input_dim=2816,
    resnet_out_scale_factor=1.0, resnet_skip_time_act=False, resnet_time_scale_shift="default", sample_size=128,
    time_cond_proj_dim=None, time_embedding_act_fn=None, time_embedding_dim=None, time_embedding_type="positional",
    timestep_post_act=None, transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], upcast_attention=None,
    use_linear_projection=True,
)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = perturb(UNet2DConditionModel(**SDXL_TINY), seed=1, scale=0.1)
    config = UNetConfig.from_diffusers(dict(ref.config))
    ours = UNet(config).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(config, hw, batch=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *hw, generator=g)
    t = torch.tensor([999.0, 250.0][:batch])
    c = torch.randn(batch, 11, config.cross_attention_dim, generator=g)
    pooled = torch.randn(batch, POOLED, generator=g)
    # original (h, w), crop (top, left), target (h, w), in pixels, as SDXL pipelines pass them
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 0.0, 1024.0, 768.0], [512.0, 512.0, 16.0, 8.0, 512.0, 640.0]][:batch])
    return x, t, c, pooled, time_ids


def test_config():
    config = UNetConfig.from_diffusers(SDXL)
    assert config.family == "SDXL" and config.added_conditioning
    assert config.attention_levels == (False, True, True) and config.transformer_layers_per_block == (1, 2, 10)
    assert config.num_heads == (5, 10, 20) and config.cross_attention_dim == 2048 and config.use_linear_projection
    assert (config.addition_time_embed_dim, config.projection_class_embeddings_input_dim) == (256, 2816)
    assert UNetConfig().family == "SD 1.x"


@pytest.mark.parametrize("hw", [(12, 20), (13, 10)])
@torch.no_grad()
def test_parity_with_diffusers(pair, hw):
    ref, ours = pair
    x, t, c, pooled, time_ids = inputs(ours.config, hw)
    expected = ref(x, t, c, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    got = ours(x, t, c, text_embeds=pooled, time_ids=time_ids)
    assert got.shape == (2, 4, *hw)
    assert expected.abs().max() > 0.5
    assert (got - expected).abs().max() <= 1e-4
    # The added conditioning is used: other sizes give another output.
    other = ours(x, t, c, text_embeds=pooled, time_ids=time_ids.flip(-1))
    assert (other - got).abs().max() > 1e-3


def test_added_conditioning_is_required_and_checked(pair):
    _, ours = pair
    x, t, c, pooled, time_ids = inputs(ours.config, (8, 8))
    with pytest.raises(ValueError, match="needs text_embeds"):
        ours(x, t, c)
    with pytest.raises(ValueError, match=r"do not make the 1560 inputs"):
        ours(x, t, c, text_embeds=pooled[:, :-1], time_ids=time_ids)
    sd = UNet(UNetConfig(block_out_channels=(32, 32), attention_levels=(True, False), num_heads=(2, 2),
                         cross_attention_dim=40, layers_per_block=1))
    with pytest.raises(ValueError, match="takes no added conditioning"):
        sd(x, t, c, text_embeds=pooled, time_ids=time_ids)


@torch.no_grad()
def test_single_file_layout(pair, tmp_path):
    """diffusers weights -> original layout (our inverse table) -> file -> load_unet; and
    diffusers' own single-file converter reads our original layout back to its weights."""
    ref, ours = pair
    original = unet_to_original(ref.state_dict(), ours.config)
    assert original["label_emb.0.0.weight"].shape == (32 * 4, POOLED + 6 * TIME_DIM)
    assert "input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight" in original  # level 2: depth 2
    assert "output_blocks.2.2.conv.weight" in original  # level 2's upsampler, after its attention
    back = convert_ldm_unet_checkpoint({PREFIX + k: v for k, v in original.items()}, dict(ref.config))
    assert back.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())

    shapes = {k: tuple(v.shape) for k, v in original.items()}
    assert unet_config_from_original(shapes, num_heads=ours.config.num_heads) == ours.config
    path = tmp_path / "sdxl-tiny.safetensors"
    save_file({PREFIX + k: v.contiguous() for k, v in original.items()}, str(path))
    loaded = load_unet(path, num_heads=ours.config.num_heads)
    assert loaded.config == ours.config
    x, t, c, pooled, time_ids = inputs(ours.config, (12, 20))
    expected = ref(x, t, c, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert (loaded(x, t, c, text_embeds=pooled, time_ids=time_ids) - expected).abs().max() <= 1e-4
    assert unet_from_original(original, ours.config).keys() == ref.state_dict().keys()


def test_described_as_sdxl():
    """What `livestyle inspect` and the error messages call these files."""
    assert describe({"add_embedding.linear_1.weight", "time_embedding.linear_1.weight"}) == \
        "an SDXL U-Net in the diffusers layout"
    assert describe({"label_emb.0.0.weight", "input_blocks.0.0.weight"}) == "an SDXL U-Net in the original SD layout"
    assert describe({PREFIX + "label_emb.0.0.weight", PREFIX + "input_blocks.0.0.weight"}) == \
        "an SDXL single-file checkpoint (original layout)"
    assert describe({"time_embedding.linear_1.weight"}) == "a U-Net in the diffusers layout"


def test_full_size_sdxl_from_shapes():
    """The real SDXL layout, on the meta device: shapes alone give SDXL's config."""
    with torch.device("meta"):
        model = UNet2DConditionModel(**SDXL)
    config = UNetConfig.from_diffusers(SDXL)
    shapes = {k: tuple(v.shape) for k, v in unet_to_original(model.state_dict(), config).items()}
    assert shapes["label_emb.0.0.weight"] == (1280, 2816)
    assert unet_config_from_original(shapes) == config  # 64-channel heads, depth (1, 2, 10), 2048-d context
    names = original_module_names(config)
    assert names["label_emb.0.0"] == "add_embedding.linear_1"
    assert names["input_blocks.7.1.transformer_blocks.9.attn1.to_q"] == \
        "down_blocks.2.attentions.0.transformer_blocks.9.attn1.to_q"
    assert names["output_blocks.2.2.conv"] == "up_blocks.0.upsamplers.0.conv"


def test_diffusers_folder(pair, tmp_path):
    ref, ours = pair
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(ref.config)))
    weights = folder / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(weights))
    assert load_unet(folder).config == ours.config
    bad = dict(ref.config, projection_class_embeddings_input_dim=None)
    (folder / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="needs addition_time_embed_dim and projection_class_embeddings"):
        load_unet(folder)


@torch.no_grad()
def test_temporal_cache(pair):
    """The cache is sized from self_attention_shapes and works as on SD 1/2: an empty bank
    is plain attention, a different past frame changes the output."""
    _, ours = pair
    hw = (10, 6)
    shapes = ours.self_attention_shapes(hw)
    # level 1: 2 attentions x 1 layer, level 2: 2 x 2, mid: 2, up: 3 x 2 + 3 x 1
    assert len(shapes) == 2 + 4 + 2 + 6 + 3
    assert shapes[0] == (5 * 3, 64) and shapes[2] == (3 * 2, 64) and shapes[-1] == (5 * 3, 64)
    x, t, c, pooled, time_ids = inputs(ours.config, hw)
    x2 = inputs(ours.config, hw, seed=9)[0]
    plain = ours(x, t, c, text_embeds=pooled, time_ids=time_ids)
    cache = TemporalCache.for_unet(ours, batch=2, latent_hw=hw, frames=2)
    assert (ours(x, t, c, cache, text_embeds=pooled, time_ids=time_ids) - plain).abs().max() <= 1e-5
    cache.advance()
    cache.reset()
    ours(x2, t, c, cache, text_embeds=pooled, time_ids=time_ids)
    cache.advance()
    assert (ours(x, t, c, cache, text_embeds=pooled, time_ids=time_ids) - plain).abs().max() > 1e-3
