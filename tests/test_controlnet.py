"""ControlNet: residuals vs diffusers.ControlNetModel, the U-Net driven by two ControlNets vs
diffusers (UNet2DConditionModel + MultiControlNetModel), SD 1.x-, SD 2.x- and SDXL-shaped; the original
single-file layout, loading, mismatches, per-net settings."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from safetensors.torch import save_file

from livestyle.errors import CheckpointError
from livestyle.models import ControlNet, ControlNetConfig, ControlSettings, MultiControlNet, load_controlnet, load_unet
from livestyle.models.checkpoint import describe
from livestyle.models.convert_controlnet import controlnet_config_from_original, controlnet_to_original
from livestyle.models.loading import describe_controlnet
from livestyle.models.unet import UNet, UNetConfig
from random_weights import perturb

# SD 1.x-shaped (768-d context, conv projections) and SDXL-shaped (no attention at level 0,
# depth per level, linear projections, 2048-d context, text_time added embedding).
SD_TINY = dict(
    block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=2, cross_attention_dim=768,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32, sample_size=16,
)
# SD 2.x / SD-Turbo-shaped: linear projections, per-level heads, 1024-d context.
SD2_TINY = dict(SD_TINY, attention_head_dim=(2, 4), cross_attention_dim=1024, use_linear_projection=True)
POOLED = 24
SDXL_TINY = dict(
    block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=(2, 4, 4), cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2), use_linear_projection=True, norm_num_groups=32, sample_size=16,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=POOLED + 1536,
)
TINY = {"sd": SD_TINY, "sd2": SD2_TINY, "sdxl": SDXL_TINY}
HW = (12, 10)  # latents; the conditioning images are 8x: 96 x 80


def ours_from(ref, cls, config):
    model = cls(config).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


@pytest.fixture(scope="module", params=list(TINY))
def models(request):
    """A diffusers U-Net and two ControlNets made from it (random weights), and ours."""
    torch.manual_seed(0)
    unet = perturb(UNet2DConditionModel(**TINY[request.param]), seed=1, scale=0.1)
    nets = [perturb(ControlNetModel.from_unet(unet), seed=2 + i, scale=0.1) for i in range(2)]
    ours_unet = ours_from(unet, UNet, UNetConfig.from_diffusers(dict(unet.config)))
    ours_nets = [ours_from(n, ControlNet, ControlNetConfig.from_diffusers(dict(n.config))) for n in nets]
    return dict(kind=request.param, unet=unet, nets=nets, ours_unet=ours_unet, ours_nets=ours_nets)


def inputs(m, batch=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *HW, generator=g)
    t = torch.tensor([999.0, 400.0][:batch])
    c = torch.randn(batch, 9, m["ours_unet"].config.cross_attention_dim, generator=g)
    images = [torch.rand(batch, 3, HW[0] * 8, HW[1] * 8, generator=g) for _ in range(2)]
    added = {}
    if m["kind"] == "sdxl":
        added = dict(text_embeds=torch.randn(batch, POOLED, generator=g),
                     time_ids=torch.tensor([[512.0, 640.0, 0.0, 0.0, 512.0, 640.0]] * batch))
    return x, t, c, images, added


@torch.no_grad()
def test_residuals_match_diffusers(models):
    x, t, c, images, added = inputs(models)
    kwargs = {"added_cond_kwargs": added} if added else {}
    down, mid = models["nets"][0](x, t, c, controlnet_cond=images[0], conditioning_scale=0.7, return_dict=False,
                                  **kwargs)
    ours_down, ours_mid = models["ours_nets"][0](x, t, c, images[0], 0.7, **added)
    assert len(ours_down) == len(down) == len(models["ours_unet"].skip_shapes(HW))
    for a, b, shape in zip(ours_down, down, models["ours_unet"].skip_shapes(HW)):
        assert a.shape == (2, *shape) and (a - b).abs().max() <= 1e-4
    assert mid.abs().max() > 0.1 and (ours_mid - mid).abs().max() <= 1e-4


@torch.no_grad()
def test_unet_with_two_controlnets_matches_diffusers(models):
    x, t, c, images, added = inputs(models)
    kwargs = {"added_cond_kwargs": added} if added else {}
    scales = [0.6, 1.3]
    down, mid = MultiControlNetModel(models["nets"])(x, t, c, controlnet_cond=images, conditioning_scale=scales,
                                                     return_dict=False, **kwargs)
    expected = models["unet"](x, t, c, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                              **kwargs).sample
    ours_down, ours_mid = MultiControlNet(models["ours_nets"])(x, t, c, images, scales, **added)
    got = models["ours_unet"](x, t, c, down_block_additional_residuals=ours_down,
                              mid_block_additional_residual=ours_mid, **added)
    assert (got - expected).abs().max() <= 1e-4
    plain = models["ours_unet"](x, t, c, **added)
    assert (got - plain).abs().max() > 1e-2  # the residuals matter


@torch.no_grad()
def test_scales_per_row_and_switched_off(models):
    x, t, c, images, added = inputs(models)
    net = models["ours_nets"][0]
    both = net(x, t, c, images[0], torch.tensor([0.5, 2.0]), **added)
    for row, scale in ((0, 0.5), (1, 2.0)):
        one = net(x, t, c, images[0], scale, **added)
        assert all((a[row] - b[row]).abs().max() <= 1e-5 for a, b in zip(both[0] + [both[1]], one[0] + [one[1]]))
    multi = MultiControlNet(models["ours_nets"])
    down, mid = multi(x, t, c, images, [0.0, 0.8], **added)  # the first is not run
    ref_down, ref_mid = models["ours_nets"][1](x, t, c, images[1], 0.8, **added)
    assert torch.equal(mid, ref_mid) and all(torch.equal(a, b) for a, b in zip(down, ref_down))
    assert multi(x, t, c, images, [0.0, 0], **added) is None
    with pytest.raises(ValueError, match="2 nets, 1 images"):
        multi(x, t, c, images[:1], [1.0, 1.0], **added)
    with pytest.raises(ValueError, match=r"expected \(B, 3, 96, 80\)"):
        net(x, t, c, images[0][..., :64], 1.0, **added)


@torch.no_grad()
def test_original_single_file(models, tmp_path):
    """diffusers weights -> original layout (our table) -> file -> load_controlnet; and
    diffusers' own converter reads our original layout back to its weights."""
    ref, ours = models["nets"][0], models["ours_nets"][0]
    original = controlnet_to_original(ref.state_dict(), ours.config)
    assert "input_hint_block.14.weight" in original and "middle_block_out.0.weight" in original
    assert f"zero_convs.{len(models['ours_unet'].skip_shapes(HW)) - 1}.0.weight" in original
    back = convert_controlnet_checkpoint({"control_model." + k: v for k, v in original.items()}, dict(ref.config))
    # diffusers' converter has no name for an SDXL ControlNet's label_emb (its own TODO); ours
    # maps it as for the U-Net (add_embedding).
    expected = {k: v for k, v in ref.state_dict().items() if not k.startswith("add_embedding.")}
    assert back.keys() == expected.keys()
    assert all(torch.equal(back[k], v) for k, v in expected.items())
    assert ("label_emb.0.0.weight" in original) == (models["kind"] == "sdxl")
    shapes = {k: tuple(v.shape) for k, v in original.items()}
    assert controlnet_config_from_original(shapes, num_heads=ours.config.num_heads) == ours.config

    path = tmp_path / "control.safetensors"
    save_file({"control_model." + k: v.contiguous() for k, v in original.items()}, str(path))
    assert ("SDXL" in describe(original.keys())) == (models["kind"] == "sdxl")
    loaded = load_controlnet(path, num_heads=ours.config.num_heads, unet=models["ours_unet"])
    assert loaded.config == ours.config
    x, t, c, images, added = inputs(models)
    a, b = loaded(x, t, c, images[0], 1.0, **added), ours(x, t, c, images[0], 1.0, **added)
    assert torch.equal(a[1], b[1]) and all(torch.equal(p, q) for p, q in zip(a[0], b[0]))


def test_diffusers_folder_and_bare_file(models, tmp_path):
    ref, ours = models["nets"][0], models["ours_nets"][0]
    ref.save_pretrained(tmp_path / "cn", safe_serialization=True)
    assert load_controlnet(tmp_path / "cn", dtype=torch.float16).config == ours.config
    # diffusers weights saved as one file, without config.json (how SDXL ControlNets often travel)
    path = tmp_path / "cn.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    assert load_controlnet(path, num_heads=ours.config.num_heads).config == ours.config
    with pytest.raises(CheckpointError, match="ControlNet .*, not a U-Net; load it with load_controlnet"):
        load_unet(path)


@torch.no_grad()
def test_levels_without_transformer_layers(tmp_path):
    """SDXL's "small"/"mid" ControlNets keep a level's norm and projections around zero
    transformer layers (transformer_layers_per_block 0); loaded from a diffusers folder."""
    cfg = {k: v for k, v in SDXL_TINY.items() if k not in ("up_block_types", "sample_size")}
    torch.manual_seed(0)
    ref = perturb(ControlNetModel(**dict(cfg, transformer_layers_per_block=(0, 0, 1))), seed=1, scale=0.1)
    ref.save_pretrained(tmp_path / "small", safe_serialization=True)
    ours = load_controlnet(tmp_path / "small")
    assert ours.config.transformer_layers_per_block == (0, 0, 1)
    assert len(ours.down_blocks[1].attentions[0].transformer_blocks) == 0
    g = torch.Generator().manual_seed(1)
    x, t, c = torch.randn(2, 4, *HW, generator=g), torch.tensor([999.0, 400.0]), torch.randn(2, 9, 2048, generator=g)
    image = torch.rand(2, 3, HW[0] * 8, HW[1] * 8, generator=g)
    added = dict(text_embeds=torch.randn(2, POOLED, generator=g),
                 time_ids=torch.tensor([[512.0, 640.0, 0.0, 0.0, 512.0, 640.0]] * 2))
    down, mid = ref(x, t, c, controlnet_cond=image, conditioning_scale=0.5, added_cond_kwargs=added, return_dict=False)
    ours_down, ours_mid = ours(x, t, c, image, 0.5, **added)
    assert max((a - b).abs().max().item() for a, b in zip([*ours_down, ours_mid], [*down, mid])) <= 1e-4


def test_controlnet_for_another_model_is_one_line(tmp_path):
    """An SD 1.5 ControlNet with an SDXL U-Net (and the other way round) names both."""
    torch.manual_seed(0)
    sd_net = ControlNetModel.from_unet(UNet2DConditionModel(**SD_TINY))
    sd_net.save_pretrained(tmp_path / "sd15-canny", safe_serialization=True)
    sdxl_unet = UNet(UNetConfig.from_diffusers(SDXL_TINY))
    with pytest.raises(CheckpointError) as caught:
        load_controlnet(tmp_path / "sd15-canny", unet=sdxl_unet)
    assert str(caught.value).endswith("sd15-canny: the ControlNet is for SD 1.x, the U-Net is SDXL")
    assert "\n" not in str(caught.value)
    sd2 = UNet(UNetConfig.from_diffusers(dict(SD_TINY, cross_attention_dim=1024)))
    with pytest.raises(CheckpointError, match="the ControlNet is for SD 1.x, the U-Net is SD 2.x"):
        load_controlnet(tmp_path / "sd15-canny", unet=sd2)
    wider = UNet(UNetConfig.from_diffusers(dict(SD_TINY, block_out_channels=(32, 96))))
    with pytest.raises(CheckpointError, match=r"levels \(channels \(32, 64\), 1 layers each\) are not the U-Net's"):
        load_controlnet(tmp_path / "sd15-canny", unet=wider)
    cfg = json.loads((tmp_path / "sd15-canny" / "config.json").read_text())
    (tmp_path / "sd15-canny" / "config.json").write_text(json.dumps(dict(cfg, conditioning_channels="3")))
    with pytest.raises(CheckpointError, match="config.json"):
        load_controlnet(tmp_path / "sd15-canny")
    unet_file = tmp_path / "unet.safetensors"
    save_file({"time_embedding.linear_1.weight": torch.zeros(4, 4)}, str(unet_file))
    with pytest.raises(CheckpointError, match="not a ControlNet; it looks like a U-Net in the diffusers layout"):
        load_controlnet(unet_file)


def test_inspect_names_a_controlnet(tmp_path):
    torch.manual_seed(0)
    net = ControlNetModel.from_unet(UNet2DConditionModel(**SDXL_TINY))
    path = tmp_path / "xl-depth.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    result = subprocess.run([sys.executable, "-m", "livestyle.cli", "inspect", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{path}: an SDXL ControlNet (diffusers layout)\n  controlnet   for SDXL U-Nets, "
                                    "channels (32, 64, 64), context 2048, 3-channel images at 8x the latent size")
    sd = ControlNetModel.from_unet(UNet2DConditionModel(**dict(SD_TINY, cross_attention_dim=1024)))
    sd.save_pretrained(tmp_path / "sd21-canny" / "controlnet", safe_serialization=True)
    assert "for SD 2.x U-Nets" in describe_controlnet(tmp_path / "sd21-canny")
    assert describe_controlnet(tmp_path / "missing") is None


def test_settings():
    assert ControlSettings() == ControlSettings(1.0, 0.0, 1.0)
    s = ControlSettings(scale=0.8, start=0.25, end=0.75)
    # diffusers' pipelines: keep = not (i / n < start or (i + 1) / n > end)
    assert [s.scale_at(i, 4) for i in range(4)] == [0.0, 0.8, 0.8, 0.0]
    assert ControlSettings(0.5).scale_at(0, 1) == 0.5  # one step: on
    assert ControlSettings(0.5, end=0.5).scale_at(0, 1) == 0.0
    for bad, message in ((dict(scale=float("nan")), "scale"), (dict(scale=-1.0), "scale"),
                         (dict(start=0.6, end=0.5), "before end"), (dict(end=1.5), "end")):
        with pytest.raises(ValueError, match=message):
            ControlSettings(**bad)
