"""U-Net: parity with diffusers.UNet2DConditionModel, original-layout conversion, temporal cache."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from livestyle.errors import CheckpointError
from livestyle.models.convert_unet import (
    original_module_names,
    unet_config_from_original,
    unet_from_original,
    unet_to_original,
)
from livestyle.models.packed import pack
from livestyle.models.temporal import TemporalBatch, TemporalCache
from livestyle.models.unet import UNet, UNetConfig
from livestyle.stream.samplers import guidance_scale_embedding

PREFIX = "model.diffusion_model."

# SD 1.x-like: conv proj_in/out, same head count everywhere, attention on level 0 only.
SD1_TINY = dict(
    block_out_channels=(32, 64), layers_per_block=2, attention_head_dim=2, cross_attention_dim=32,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32, sample_size=16,
)
# SD 2.x-like: linear proj_in/out, per-level head counts, two transformer layers, wider context.
SD2_TINY = dict(
    block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=(2, 4, 4), cross_attention_dim=48,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    use_linear_projection=True, transformer_layers_per_block=2, norm_num_groups=32, sample_size=16,
)
TINY = {"sd1": SD1_TINY, "sd2": SD2_TINY}

SD15 = dict(
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, in_channels=4, out_channels=4,
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, sample_size=64,
)
SD21 = dict(SD15, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True,
            upcast_attention=True, sample_size=96)


def randomized_diffusers(cfg: dict) -> UNet2DConditionModel:
    """A diffusers U-Net with every parameter perturbed (diffusers zero-inits some convs)."""
    torch.manual_seed(0)
    model = UNet2DConditionModel(**cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def ours_from(state: dict, config: UNetConfig) -> UNet:
    model = UNet(config).eval()
    model.load_state_dict(state, strict=True)
    return model


def inputs(config: UNetConfig, hw, batch=2, tokens=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, *hw, generator=g)
    t = torch.tensor([10.0, 700.0][:batch])
    c = torch.randn(batch, tokens, config.cross_attention_dim, generator=g)
    return x, t, c


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pair(request):
    ref = randomized_diffusers(TINY[request.param])
    config = UNetConfig.from_diffusers(dict(ref.config))
    return ref, config


@pytest.mark.parametrize("hw", [(24, 16), (13, 22)])
@torch.no_grad()
def test_parity_with_diffusers(pair, hw):
    ref, config = pair
    ours = ours_from(ref.state_dict(), config)
    x, t, c = inputs(config, hw, tokens=hw[0] % 9 + 3)
    expected = ref(x, t, c).sample
    got = ours(x, t, c)
    assert got.shape == (2, config.out_channels, *hw)
    assert expected.abs().max() > 0.5  # a non-trivial output
    assert (got - expected).abs().max() <= 1e-4


@torch.no_grad()
def test_scalar_timestep_broadcasts(pair):
    ref, config = pair
    ours = ours_from(ref.state_dict(), config)
    x, _, c = inputs(config, (8, 8))
    t = torch.tensor(321)
    assert torch.allclose(ours(x, t, c), ours(x, t.expand(2), c))


def test_config_from_diffusers():
    assert UNetConfig.from_diffusers(SD15) == UNetConfig()
    sd21 = UNetConfig.from_diffusers(SD21)
    assert sd21.num_heads == (5, 10, 20, 20) and sd21.cross_attention_dim == 1024 and sd21.use_linear_projection
    tiny = UNetConfig.from_diffusers(SD2_TINY)
    assert tiny.attention_levels == (True, True, False) and tiny.transformer_layers_per_block == (2, 2, 2)
    assert UNetConfig().time_cond_proj_dim is None
    assert UNetConfig.from_diffusers(dict(SD15, time_cond_proj_dim=256)) == UNetConfig(time_cond_proj_dim=256)


# -- LCM: the guidance-scale embedding added to the timestep embedding ----------------------

LCM_TINY = dict(SD1_TINY, time_cond_proj_dim=12)


@pytest.fixture(scope="module")
def lcm_pair():
    ref = randomized_diffusers(LCM_TINY)
    config = UNetConfig.from_diffusers(dict(ref.config))
    assert config.time_cond_proj_dim == 12
    return ref, ours_from(ref.state_dict(), config)  # strict: time_embedding.cond_proj.weight included


@torch.no_grad()
def test_lcm_parity_with_diffusers(lcm_pair):
    ref, ours = lcm_pair
    assert tuple(ours.time_embedding.cond_proj.weight.shape) == (32, 12)  # (block_out_channels[0], cond dim)
    x, t, c = inputs(ours.config, (13, 22))
    w = guidance_scale_embedding(torch.tensor([7.5 - 1, 2.0 - 1]), dim=12)  # (B, 12), as LCM's pipeline
    expected = ref(x, t, c, timestep_cond=w).sample
    got = ours(x, t, c, timestep_cond=w)
    assert (got - expected).abs().max() <= 1e-4
    assert (got - ours(x, t, c)).abs().max() > 1e-2  # the condition matters
    # Without timestep_cond diffusers adds nothing; so do we.
    assert (ours(x, t, c) - ref(x, t, c).sample).abs().max() <= 1e-4


def test_timestep_cond_needs_an_lcm_unet(pair):
    ref, config = pair
    ours = ours_from(ref.state_dict(), config)
    x, t, c = inputs(config, (8, 8))
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        ours(x, t, c, timestep_cond=torch.zeros(2, 12))


def test_original_layout_refuses_lcm(lcm_pair):
    ref, ours = lcm_pair
    # diffusers' single-file loader has no original key for cond_proj, and neither have we.
    with pytest.raises(CheckpointError, match="cond_proj"):
        unet_to_original(ref.state_dict(), ours.config)
    with pytest.raises(CheckpointError, match="cond_proj"):
        unet_from_original({}, ours.config)
    shapes = original_shapes(SD15)
    with pytest.raises(CheckpointError, match=r"cond_proj.*found time_embed\.cond_proj\.weight"):
        unet_config_from_original(dict(shapes, **{"time_embed.cond_proj.weight": (320, 256)}))


@pytest.mark.parametrize("change, message", [
    (dict(addition_embed_type="text_time", cross_attention_dim=2048), "needs addition_time_embed_dim"),
    (dict(addition_embed_type="text"), "addition_embed_type='text' is not supported"),
    (dict(transformer_layers_per_block=[1, 2]), r"transformer_layers_per_block=\[1, 2\] needs 4 entries"),
    (dict(class_embed_type="timestep"), "class"),
    (dict(down_block_types=["SimpleCrossAttnDownBlock2D"] + SD15["down_block_types"][1:]), "SimpleCrossAttn"),
    (dict(up_block_types=["CrossAttnUpBlock2D"] * 4), "mirror"),
    (dict(time_embedding_type="fourier"), "time_embedding_type"),
])
def test_config_from_diffusers_refuses(change, message):
    with pytest.raises(CheckpointError, match=message):
        UNetConfig.from_diffusers(dict(SD15, **change))


@torch.no_grad()
def test_original_layout_round_trip(pair, tmp_path):
    ref, config = pair
    original = unet_to_original(ref.state_dict(), config)
    assert "input_blocks.0.0.weight" in original and "middle_block.1.proj_in.weight" in original
    path = tmp_path / "unet.safetensors"
    save_file({PREFIX + k: v.contiguous() for k, v in original.items()}, path)
    loaded = {k.removeprefix(PREFIX): v for k, v in load_file(path).items()}

    inferred = unet_config_from_original({k: tuple(v.shape) for k, v in loaded.items()}, num_heads=config.num_heads)
    assert inferred == config
    ours = ours_from(unet_from_original(loaded, inferred), inferred)
    x, t, c = inputs(config, (20, 12))
    assert (ours(x, t, c) - ref(x, t, c).sample).abs().max() <= 1e-4


def test_from_original_names_bad_keys(pair):
    ref, config = pair
    original = unet_to_original(ref.state_dict(), config)
    original["input_blocks.1.0.in_layers.9.weight"] = original.pop("input_blocks.1.0.in_layers.0.weight")
    with pytest.raises(CheckpointError, match=r"missing input_blocks\.1\.0\.in_layers\.0\.weight.*unexpected"):
        unet_from_original(original, config)


def original_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Original-layout key -> shape of a full-size U-Net, without allocating its weights."""
    with torch.device("meta"):
        model = UNet2DConditionModel(**cfg)
    original = unet_to_original(model.state_dict(), UNetConfig.from_diffusers(cfg))
    return {k: tuple(v.shape) for k, v in original.items()}


def test_original_module_names():
    names = original_module_names(UNetConfig())  # SD 1.5, written out from the CompVis layout
    assert names["input_blocks.1.1.transformer_blocks.0.attn1.to_q"] == \
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert names["input_blocks.0.0"] == "conv_in"
    assert names["time_embed.0"] == "time_embedding.linear_1"
    assert names["input_blocks.3.0.op"] == "down_blocks.0.downsamplers.0.conv"
    assert names["middle_block.1.proj_in"] == "mid_block.attentions.0.proj_in"
    assert names["output_blocks.2.1.conv"] == "up_blocks.0.upsamplers.0.conv"  # level 3 has no attention
    assert names["output_blocks.5.2.conv"] == "up_blocks.1.upsamplers.0.conv"
    assert names["output_blocks.3.0.in_layers.2"] == "up_blocks.1.resnets.0.conv1"
    assert names["output_blocks.11.0.skip_connection"] == "up_blocks.3.resnets.2.conv_shortcut"
    assert names["out.2"] == "conv_out"
    # Every module with weights, each once; an LCM config adds no entry.
    with torch.device("meta"):
        modules = {k.rpartition(".")[0] for k in UNet(UNetConfig()).state_dict()}
    assert sorted(names.values()) == sorted(modules)
    assert original_module_names(UNetConfig(time_cond_proj_dim=256)) == names


def test_full_size_config_from_shapes():
    sd15 = unet_config_from_original(original_shapes(SD15))
    assert sd15 == UNetConfig()
    assert sd15.num_heads == (8, 8, 8, 8) and sd15.cross_attention_dim == 768 and not sd15.use_linear_projection
    sd21_shapes = original_shapes(SD21)
    sd21 = unet_config_from_original(sd21_shapes)
    assert sd21 == UNetConfig.from_diffusers(SD21)
    assert sd21.num_heads == (5, 10, 20, 20) and sd21.cross_attention_dim == 1024 and sd21.use_linear_projection
    assert len(sd21_shapes["input_blocks.1.1.proj_in.weight"]) == 2


def test_refuses_class_labels_and_unknown_shapes():
    shapes = original_shapes(SD15)
    with pytest.raises(CheckpointError, match="class labels"):  # the x4 upscaler's nn.Embedding
        unet_config_from_original(dict(shapes, **{"label_emb.weight": (1000, 1280)}))
    with pytest.raises(CheckpointError, match="not an SD U-Net.*proj_out"):
        unet_config_from_original({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.proj_out.weight": (3, 3)})
    with pytest.raises(CheckpointError, match="num_heads"):
        unet_config_from_original(original_shapes(SD1_TINY))
    with pytest.raises(CheckpointError, match="3 heads do not divide 32"):
        unet_config_from_original(original_shapes(SD1_TINY), num_heads=(3, 3))


# -- temporal cache ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_unet():
    ref = randomized_diffusers(SD2_TINY)  # two attention levels, two transformer layers each: 14 layers
    return ours_from(ref.state_dict(), UNetConfig.from_diffusers(dict(ref.config)))


HW = (10, 6)  # 10x6 -> 5x3 -> 3x2: odd sizes on the way down


def frames(unet, count, seed):
    return [inputs(unet.config, HW, seed=seed + i) for i in range(count)]


@torch.no_grad()
def test_cache_empty_and_repeated_frames(tiny_unet):
    (x, t, c), = frames(tiny_unet, 1, seed=3)
    plain = tiny_unet(x, t, c)
    cache = TemporalCache.for_unet(tiny_unet, batch=2, latent_hw=HW, frames=2)
    assert len(cache.keys) == 14
    # (a) no filled slot: same as plain attention
    assert (tiny_unet(x, t, c, temporal=cache) - plain).abs().max() <= 1e-5
    cache.advance()
    # (b) the same frame again: duplicated identical keys/values leave the softmax average unchanged
    assert (tiny_unet(x, t, c, temporal=cache) - plain).abs().max() <= 1e-4


@torch.no_grad()
def test_cache_previous_frame_matters_and_reset(tiny_unet):
    (xa, t, c), (xb, _, _) = frames(tiny_unet, 2, seed=5)
    plain_b = tiny_unet(xb, t, c)
    cache = TemporalCache.for_unet(tiny_unet, batch=2, latent_hw=HW, frames=2)
    pointers = [b.data_ptr() for b in cache.keys + cache.values]
    tiny_unet(xa, t, c, temporal=cache)
    cache.advance()
    # (c) a different previous frame changes the output
    assert (tiny_unet(xb, t, c, temporal=cache) - plain_b).abs().max() > 1e-3
    cache.advance()
    # (d) reset forgets it
    cache.reset()
    assert (tiny_unet(xb, t, c, temporal=cache) - plain_b).abs().max() <= 1e-5
    # (f) fixed buffers, written in place
    assert [b.data_ptr() for b in cache.keys + cache.values] == pointers


def test_cache_ring_keeps_last_frames():
    cache = TemporalCache([(3, 4)], batch=2, frames=2)  # one layer, 3 tokens, 4 channels
    frame = lambda f: torch.full((2, 3, 4), float(f))  # noqa: E731
    _, _, mask = cache.extend_and_store(0, frame(0), frame(0))
    assert mask.tolist() == [[True] * 3 + [False] * 6]  # nothing banked yet
    cache.advance()
    for f in (1, 2):
        cache.extend_and_store(0, frame(f), frame(f))
        cache.advance()
    # Frame 0 was overwritten by frame 2 (slot 0); slot 1 holds frame 1.
    k, v, mask = cache.extend_and_store(0, frame(3), -frame(3))
    assert k[:, :, 0].tolist() == [[3.0] * 3 + [2.0] * 3 + [1.0] * 3] * 2
    assert v[:, :3].eq(-3).all() and mask.all() and cache.write_index.tolist() == [1]


@torch.no_grad()
def test_cache_batch_rows_are_independent(tiny_unet):
    (xa, t, c), (xb, _, _) = frames(tiny_unet, 2, seed=9)
    batched = TemporalCache.for_unet(tiny_unet, batch=2, latent_hw=HW, frames=2)
    tiny_unet(xa, t, c, temporal=batched)
    batched.advance()
    both = tiny_unet(xb, t, c, temporal=batched)
    for row in range(2):
        alone = TemporalCache.for_unet(tiny_unet, batch=1, latent_hw=HW, frames=2)
        r = slice(row, row + 1)
        tiny_unet(xa[r], t[r], c[r], temporal=alone)
        alone.advance()
        assert (tiny_unet(xb[r], t[r], c[r], temporal=alone) - both[r]).abs().max() <= 1e-5


@torch.no_grad()
def test_attention_reads_the_bank_in_place_and_unmasked_once_full(tiny_unet, monkeypatch):
    """Every self-attention hands kernels.cached_attention the cache's own ring buffers
    (views of the bank storage, not a concatenation) and its filled flags; once every slot
    holds a frame it hands None, so the reference runs unmasked. Through a TemporalBatch,
    each stream's part reads that stream's buffers and a row with no bank gets 0 slots."""
    from livestyle import kernels

    calls = []
    real = kernels.cached_attention

    def spy(q, k, v, bank_k, bank_v, filled, heads):
        calls.append((bank_k.data_ptr(), bank_v.data_ptr(), tuple(bank_k.shape), filled))
        return real(q, k, v, bank_k, bank_v, filled, heads)

    monkeypatch.setattr(kernels, "cached_attention", spy)
    (xa, t, c), (xb, _, _), (xc, _, _) = frames(tiny_unet, 3, seed=17)
    cache = TemporalCache.for_unet(tiny_unet, batch=2, latent_hw=HW, frames=2)
    stored = [(k.data_ptr(), v.data_ptr(), tuple(k.shape)) for k, v in zip(cache.keys, cache.values)]
    outputs = []
    for x in (xa, xb, xc):  # filled: none, one of two, both
        calls.clear()
        outputs.append(tiny_unet(x, t, c, temporal=cache))
        assert [call[:3] for call in calls] == stored  # one call per layer, in layer order, on the buffers
        assert all((f is None) == (x is xc) for *_, f in calls)
        assert all(f is cache.filled for *_, f in calls if f is not None)
        cache.advance()

    # The full ring unmasked gives what the mask of all-True slots gives.
    oracle = TemporalCache.for_unet(tiny_unet, batch=2, latent_hw=HW, frames=2)
    for x in (xa, xb):
        tiny_unet(x, t, c, temporal=oracle)
        oracle.advance()
    monkeypatch.setattr(kernels, "cached_attention",
                        lambda q, k, v, bk, bv, filled, heads: real(q, k, v, bk, bv, oracle.filled, heads))
    torch.testing.assert_close(tiny_unet(xc, t, c, temporal=oracle), outputs[-1], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(kernels, "cached_attention", spy)

    first = TemporalCache.for_unet(tiny_unet, batch=1, latent_hw=HW, frames=2)
    calls.clear()
    tiny_unet(torch.cat([xa[:1], xa[1:], xa[1:]]), t[:1].expand(3), c[:1].expand(3, -1, -1),
              temporal=TemporalBatch([(first, 1), (cache.rows(1, 2), 1), (None, 1)]))
    L, C = tiny_unet.self_attention_shapes(HW)[0]
    assert calls[0][:3] == (first.keys[0].data_ptr(), first.values[0].data_ptr(), (1, 2, L, C))
    assert calls[1][:3] == (cache.keys[0][1].data_ptr(), cache.values[0][1].data_ptr(), (1, 2, L, C))
    assert calls[2][2] == (1, 0, L, C) and calls[2][3] is None  # no bank: itself only


def test_cache_refuses_other_latent_size(tiny_unet):
    x, t, c = inputs(tiny_unet.config, (8, 8))
    cache = TemporalCache.for_unet(tiny_unet, batch=2, latent_hw=HW, frames=2)
    with pytest.raises(ValueError, match="latent size"):
        tiny_unet(x, t, c, temporal=cache)


@torch.no_grad()
def test_rows_view_and_temporal_batch_equal_separate_caches(tiny_unet):
    """Streams batched into one call (TemporalBatch), with a guidance row that keeps no
    bank, give each stream what its own cache alone gives; a rows() view writes through."""
    (xa, t, c), (xb, _, _) = frames(tiny_unet, 2, seed=11)
    first, second = (TemporalCache.for_unet(tiny_unet, batch=1, latent_hw=HW, frames=2) for _ in range(2))
    pair = TemporalCache.for_unet(tiny_unet, batch=2, latent_hw=HW, frames=2)
    for x in (xa, xb):  # two frames: the second one attends to the first
        parts = [(first, 1), (pair.rows(0, 1), 1), (None, 1), (second, 1)]
        batch = torch.cat([x[:1], x[:1], x[1:], x[1:]])
        out = tiny_unet(batch, t[:1].expand(4), c[:1].expand(4, -1, -1), temporal=TemporalBatch(parts))
        for cache in (first, second, pair):
            cache.advance()
    first_alone = TemporalCache.for_unet(tiny_unet, batch=1, latent_hw=HW, frames=2)
    tiny_unet(xa[:1], t[:1], c[:1], temporal=first_alone)
    first_alone.advance()
    expected = tiny_unet(xb[:1], t[:1], c[:1], temporal=first_alone)
    assert (out[0:1] - expected).abs().max() <= 1e-5
    assert (out[1:2] - expected).abs().max() <= 1e-5  # through the view: row 0 of `pair` banked it
    assert (out[2:3] - tiny_unet(xb[1:], t[:1], c[:1])).abs().max() <= 1e-5  # no bank: plain attention
    assert pair.filled.tolist() == [True, True] and pair.keys[0][1].abs().sum() == 0  # row 1 never written
    with pytest.raises(ValueError, match="one frame count"):
        TemporalBatch([(first, 1), (TemporalCache.for_unet(tiny_unet, batch=1, latent_hw=HW, frames=3), 1)])


def test_feature_fusion_pulls_tokens_to_their_nearest_banked_output():
    cache = TemporalCache([(3, 4)], batch=1, frames=2, fusion=0.5)
    first = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]])  # (1, 3, 4)
    assert torch.equal(cache.fuse(0, first), first)  # nothing banked yet: unchanged
    cache.advance()
    current = torch.tensor([[[0, 2.0, 0, 0],        # same direction as banked token 1: fused
                             [0, 0, 0, 1.0],        # like nothing banked: kept
                             [0.1, 0, 1.0, 0]]])    # cosine 0.995 with token 2: fused
    fused = cache.fuse(0, current)
    assert torch.allclose(fused[0, 0], torch.tensor([0, 1.5, 0, 0]))
    assert torch.equal(fused[0, 1], current[0, 1])
    assert torch.allclose(fused[0, 2], torch.tensor([0.05, 0, 1.0, 0]))
    cache.reset()
    assert torch.equal(cache.fuse(0, current), current)  # reset: nothing to fuse with
    big = TemporalCache([(2048, 4)], batch=1, frames=1, fusion=0.5)
    assert big.outputs == [None]  # fine layers are not fused


@torch.no_grad()
def test_feature_fusion_in_the_unet(tiny_unet):
    (xa, t, c), (xb, _, _) = frames(tiny_unet, 2, seed=13)
    plain = TemporalCache.for_unet(tiny_unet, batch=2, latent_hw=HW, frames=2)
    fused = TemporalCache.for_unet(tiny_unet, batch=2, latent_hw=HW, frames=2, fusion=0.8)
    for cache in (plain, fused):
        tiny_unet(xa, t, c, temporal=cache)
        cache.advance()
    # the same frame again: every token's nearest banked output is itself, so nothing moves
    assert (tiny_unet(xa, t, c, temporal=fused) - tiny_unet(xa, t, c, temporal=plain)).abs().max() <= 1e-4


# -- oneDNN-packed weights (livestyle.models.packed) ---------------------------------------------


@pytest.mark.parametrize("hw", [(13, 22)])
@torch.no_grad()
def test_packed_unet_matches_diffusers(pair, hw):
    ref, config = pair
    packed = pack(ours_from(ref.state_dict(), config).requires_grad_(False))
    assert not any(type(m) in (torch.nn.Conv2d, torch.nn.Linear) for m in packed.modules())
    x, t, c = inputs(config, hw, tokens=5)
    assert (packed(x, t, c) - ref(x, t, c).sample).abs().max() <= 1e-4
    assert all(m.plain is None for m in packed.modules() if hasattr(m, "plain"))  # packed: no second copy kept
    # a batch and a size other than the first call's: the packed weights are not tied to one shape
    x, t, c = inputs(config, (8, 9), batch=1)
    assert (packed(x, t, c) - ref(x, t, c).sample).abs().max() <= 1e-4


@torch.no_grad()
def test_packed_unet_with_the_temporal_cache(tiny_unet):
    packed = pack(ours_from(tiny_unet.state_dict(), tiny_unet.config).requires_grad_(False))
    caches = [TemporalCache.for_unet(tiny_unet, batch=2, latent_hw=HW, frames=2, fusion=0.5) for _ in range(2)]
    for x, t, c in frames(tiny_unet, 3, seed=17):
        expected, got = tiny_unet(x, t, c, temporal=caches[0]), packed(x, t, c, temporal=caches[1])
        assert (got - expected).abs().max() <= 1e-4
        for cache in caches:
            cache.advance()


def test_pack_refuses_what_it_cannot_run(tiny_unet):
    with pytest.raises(ValueError, match=r"pack: conv_in is torch.bfloat16 on cpu; packing is for fp32 on the CPU"):
        pack(UNet(tiny_unet.config).to(torch.bfloat16).requires_grad_(False))
    with pytest.raises(ValueError, match="pack: conv_in requires grad; packed layers are for inference"):
        pack(UNet(tiny_unet.config))
    with pytest.raises(ValueError, match="pack: give the model that holds this Linear"):
        pack(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="cannot be packed"):
        pack(torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")).requires_grad_(False))


@torch.no_grad()
def test_packed_flops_are_counted_as_the_plain_model_s(tiny_unet):
    """The roofline counts a packed model's FLOPs: oneDNN's ops through FLOP_FORMULAS, the same total."""
    from torch.utils.flop_counter import FlopCounterMode

    from livestyle.models.packed import FLOP_FORMULAS

    plain = ours_from(tiny_unet.state_dict(), tiny_unet.config).requires_grad_(False)
    packed = pack(ours_from(tiny_unet.state_dict(), tiny_unet.config).requires_grad_(False))
    x, t, c = inputs(tiny_unet.config, (8, 12), batch=2)
    packed(x, t, c)
    counts = []
    for model in (plain, packed):
        with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
            model(x, t, c)
        counts.append(counter.get_total_flops())
    assert counts[0] > 0 and counts[1] == counts[0]
