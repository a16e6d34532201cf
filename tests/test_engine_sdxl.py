"""SDXL in the streaming engine, on a tiny random SDXL pipeline built in memory: the
per-frame path against diffusers' U-Net called by hand (pooled text_embeds, time ids at
the processing size), the stream batch against the per-frame path, full CFG with the
negative's pooled embedding, two streams in one bucket, bf16 end to end, and the KL VAE
kept in fp32 under fp16."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from livestyle.capture.sources import SyntheticSource
from livestyle.config import StreamSettings, TemporalSettings
from livestyle.models.clip import TextEncoder, TextEncoderConfig
from livestyle.models.loading import NoiseSchedule, Pipeline, TextModel
from livestyle.models.taesd import TinyAutoencoder
from livestyle.models.tokenizer import Tokenizer
from livestyle.models.unet import UNet, UNetConfig
from livestyle.models.vae import KLAutoencoder, KLAutoencoderConfig
from livestyle.stream.engine import Engine
from livestyle.stream.samplers import alphas_cumprod, lcm_schedule, lcm_timesteps
from random_weights import perturb

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_step import run_case, run_watching_buckets  # noqa: E402

OFF = TemporalSettings.off()
SIZE = (64, 48)  # processing size (w, h): latents 8 x 6
POOLED, TIME_DIM = 24, 16  # SDXL: 1280 and 256
WIDTHS = (32, 32)  # the two encoders' widths, side by side in the context (SDXL: 768 + 1280)


def diffusers_unet() -> UNet2DConditionModel:
    """SDXL's shape, shrunk: no attention at level 0, depth 2 at level 1, linear projections,
    the text_time added embedding."""
    torch.manual_seed(0)
    return perturb(UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), cross_attention_dim=sum(WIDTHS), use_linear_projection=True,
        norm_num_groups=8, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM), 1, scale=0.1)


def tiny_sdxl_pipeline(reference: UNet2DConditionModel | None = None) -> Pipeline:
    """A tiny SDXL pipeline: the U-Net with `reference`'s weights (diffusers_unet() when None),
    CLIP-L- and bigG-shaped encoders (the second with its projection), TAESD(XL)."""
    reference = reference or diffusers_unet()
    unet = UNet(UNetConfig.from_diffusers(dict(reference.config)))
    unet.load_state_dict(reference.state_dict(), strict=True)
    torch.manual_seed(0)
    text = perturb(TextEncoder(TextEncoderConfig(hidden_size=WIDTHS[0], intermediate_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2)), 3)
    text_2 = perturb(TextEncoder(TextEncoderConfig(hidden_size=WIDTHS[1], intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=2, hidden_act="gelu",
                                                   projection_dim=POOLED)), 4)
    autoencoder = perturb(TinyAutoencoder(4), 2, scale=0.02)
    for module in (unet, text, text_2, autoencoder):
        module.eval().requires_grad_(False)
    return Pipeline("sdxl", unet, autoencoder, TextModel(text, Tokenizer.bundled()), NoiseSchedule(),
                    Path("tiny-sdxl"), text_2=TextModel(text_2, Tokenizer.bundled()), zero_empty_negative=True)


@pytest.fixture(scope="module")
def reference():
    return diffusers_unet()


@pytest.fixture(scope="module")
def sdxl(reference):
    with Engine(lambda: tiny_sdxl_pipeline(reference)) as engine:
        yield engine


def clip(n):
    return list(SyntheticSource("coffee", SIZE, 24, n))


def run(engine, settings, frames):
    outputs = []
    stream = engine.open_stream(settings, outputs.append, live=False)
    for f in frames:
        stream.submit(f)
    assert stream.flush(timeout=120)
    stream.close()
    return np.stack([f.to_ndarray(format="rgb24") for f in outputs]).astype(np.int16)


@torch.inference_mode()
def by_hand(engine, reference, frame, steps, prompts, scale=1.0):
    """The frame restyled in `steps` LCM steps with the stream's seed-0 noise, diffusers'
    U-Net called as StableDiffusionXLPipeline calls it (added_cond_kwargs), one call per
    prompt; with two prompts (positive, negative) mixed as CFG at `scale`. uint8 (h, w, 3)."""
    pipe = engine.pipe
    w, h = SIZE
    image = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)[None].float() / 255
    z0 = pipe.autoencoder.encode(image)
    noise = torch.randn((steps,) + z0.shape[1:], generator=torch.Generator().manual_seed(0))
    s = lcm_schedule(lcm_timesteps(steps), alphas_cumprod())
    conditions = [engine.conditioning.positive("", p) if p else engine.conditioning.negative(p) for p in prompts]
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)  # original size, crop, target size
    x = s.sqrt_alpha[0] * z0 + s.sqrt_one_minus_alpha[0] * noise[:1]
    for k in range(steps):
        outs = [reference(x, s.timesteps[k:k + 1], c.context, added_cond_kwargs={
            "text_embeds": c.pooled, "time_ids": time_ids}).sample for c in conditions]
        eps = outs[0] if len(outs) == 1 else outs[1] + scale * (outs[0] - outs[1])
        denoised = s.c_skip[k] * x + s.c_out[k] * (s.x0_from_x[k] * x + s.x0_from_out[k] * eps)
        if k < steps - 1:
            x = s.sqrt_alpha_next[k] * denoised + s.sqrt_one_minus_alpha_next[k] * noise[k + 1:k + 2]
    return (pipe.autoencoder.decode(denoised)[0].permute(1, 2, 0) * 255).round().numpy()


def test_per_frame_path_equals_diffusers_unet_called_by_hand(sdxl, reference):
    frames = clip(2)
    out = run(sdxl, StreamSettings(size=SIZE, prompt="a fox", steps=2, stream_batch=False, temporal=OFF), frames)
    for got, frame in zip(out, frames):
        assert np.abs(got - by_hand(sdxl, reference, frame, 2, ["a fox"])).max() <= 1
    assert np.abs(out[0] - frames[0].to_ndarray(format="rgb24")).mean() > 10  # restyled, not the input


def test_stream_batch_equals_the_per_frame_path(sdxl):
    frames = clip(5)
    base = dict(size=SIZE, prompt="a fox", steps=3, temporal=OFF)
    per_frame = run(sdxl, StreamSettings(**base, stream_batch=False), frames)
    batched = run(sdxl, StreamSettings(**base), frames)
    assert np.abs(per_frame - batched).max() <= 1


def test_full_guidance_gives_negative_rows_the_negatives_pooled_embedding(sdxl, reference):
    frames = clip(1)
    base = dict(size=SIZE, prompt="a fox", temporal=OFF, guidance="full", guidance_scale=3.0)
    for negative in ("blurry", ""):  # "": all zeros, context and pooled (force_zeros_for_empty_prompt)
        out = run(sdxl, StreamSettings(**base, negative=negative), frames)
        assert np.abs(out[0] - by_hand(sdxl, reference, frames[0], 1, ["a fox", negative], 3.0)).max() <= 1
    empty = sdxl.conditioning.negative("")
    assert not empty.context.any() and not empty.pooled.any() and empty.pooled.shape == (1, POOLED)


def test_two_streams_share_a_bucket_and_equal_each_alone(sdxl):
    """Two streams fed at once (as test_engine_step does) hold rows in one bucket; each
    stream's frames equal its frames alone."""
    streams = [(StreamSettings(size=SIZE, prompt="a fox", steps=2), "coffee"),
               (StreamSettings(size=SIZE, prompt="a cat", steps=2, seed=3), "astronaut")]
    alone = [run_case(sdxl, [s])[0] for s in streams]
    together, buckets = run_watching_buckets(sdxl, streams)
    assert (2 in {held for _, held in buckets}) and len({b for b, _ in buckets}) == 1
    assert np.abs(together.astype(np.int16) - np.stack(alone)).max() <= 1


def test_bf16_runs_end_to_end_within_a_few_grey_levels_of_fp32(reference):
    """Temporal parts on, stream batch, residual CFG."""
    settings = StreamSettings(size=SIZE, prompt="a fox", steps=2, guidance="self", guidance_scale=1.5)
    outputs = {}
    for dtype in (torch.float32, torch.bfloat16):
        with Engine(lambda: tiny_sdxl_pipeline(reference), dtype=dtype) as engine:
            outputs[dtype] = run_case(engine, [(settings, "coffee")]).astype(np.int16)
    error = np.abs(outputs[torch.float32] - outputs[torch.bfloat16])
    assert error.mean() <= 1.0 and error.max() <= 12, (error.mean(), error.max())


def test_the_kl_vae_stays_in_fp32_under_fp16(reference):
    """SDXL's KL VAE overflows in fp16: the engine moves it to the device, in its own fp32."""
    pipe = tiny_sdxl_pipeline(reference)
    pipe.autoencoder = KLAutoencoder(KLAutoencoderConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                                         norm_num_groups=4, scaling_factor=0.13025))
    with Engine(pipe, dtype=torch.float16) as engine:
        assert next(engine.pipe.autoencoder.parameters()).dtype == torch.float32
        assert next(engine.pipe.unet.parameters()).dtype == torch.float16
