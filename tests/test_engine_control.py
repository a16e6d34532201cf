"""ControlNet in the streaming engine, with tiny random ControlNets (diffusers'
ControlNetModel.from_unet, every zero conv perturbed so the residuals matter) saved as
diffusers folders and named in StreamSettings.controls: the per-frame path against
diffusers' U-Net and MultiControlNetModel called by hand (SD and SDXL, one and two nets,
start/end), the stream batch against the per-frame path, TemporalNet's first frames, a
live scale change, mismatches refused in one line, and a control image that fails."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

from livestyle.config import Control, StreamSettings
from livestyle.errors import LivestyleError
from livestyle.models import control_inputs
from livestyle.models.clip import TextEncoder, TextEncoderConfig
from livestyle.models.loading import NoiseSchedule, Pipeline, TextModel
from livestyle.models.taesd import TinyAutoencoder
from livestyle.models.tokenizer import Tokenizer
from livestyle.models.unet import UNet, UNetConfig
from livestyle.stream.engine import Engine
from livestyle.stream.samplers import alphas_cumprod, lcm_schedule, lcm_timesteps
from random_weights import perturb

sys.path.insert(0, str(Path(__file__).parent))
from test_engine_sdxl import OFF, SIZE, clip, diffusers_unet, run, tiny_sdxl_pipeline  # noqa: E402
from test_engine_step import run_case, run_watching_buckets  # noqa: E402


def sd_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return perturb(UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8), 1, scale=0.1)


def sd_pipeline(reference: UNet2DConditionModel) -> Pipeline:
    """An SD 1.x-shaped pipeline around `reference`'s weights: a 32-d CLIP, TAESD."""
    unet = UNet(UNetConfig.from_diffusers(dict(reference.config)))
    unet.load_state_dict(reference.state_dict(), strict=True)
    torch.manual_seed(0)
    text = perturb(TextEncoder(TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=4)), 3)
    autoencoder = perturb(TinyAutoencoder(4), 2, scale=0.02)
    for module in (unet, text, autoencoder):
        module.eval().requires_grad_(False)
    return Pipeline("sd1", unet, autoencoder, TextModel(text, Tokenizer.bundled()), NoiseSchedule(), Path("tiny-sd"))


def controlnets(unet: UNet2DConditionModel, folder: Path, n: int = 2) -> list[ControlNetModel]:
    nets = []
    for i in range(n):
        torch.manual_seed(10 + i)
        net = perturb(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16)), 20 + i,
                      scale=0.1)
        net.save_pretrained(folder / f"net{i}")
        nets.append(net)
    return nets


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd_controlnets")
    unet = sd_unet()
    nets = controlnets(unet, folder)
    with Engine(lambda: sd_pipeline(unet)) as engine:
        yield dict(engine=engine, unet=unet, nets=nets, paths=[str(folder / f"net{i}") for i in range(2)],
                   folder=folder)


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl_controlnets")
    unet = diffusers_unet()
    nets = controlnets(unet, folder, 1)
    with Engine(lambda: tiny_sdxl_pipeline(unet)) as engine:
        yield dict(engine=engine, unet=unet, nets=nets, paths=[str(folder / "net0")])


def as_image(frame) -> torch.Tensor:
    return torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)[None].float() / 255


@torch.inference_mode()
def by_hand(m, frame, steps, images, scales, prompt="a fox", negative=None, guidance_scale=1.0):
    """The frame in `steps` LCM steps with the stream's seed-0 noise, diffusers' U-Net and
    MultiControlNetModel called as StableDiffusion(XL)ControlNetPipeline calls them.
    images: one (1, 3, H, W) per net; scales[i][k]: net i's scale at step k. With a
    `negative`, full CFG at `guidance_scale`: the negative rows see the same images
    (the pipelines without guess mode).
    Returns the output (1, 3, H, W) in [0, 1] and as uint8 (H, W, 3)."""
    engine = m["engine"]
    pipe = engine.pipe
    w, h = SIZE
    z0 = pipe.autoencoder.encode(as_image(frame))
    noise = torch.randn((steps,) + z0.shape[1:], generator=torch.Generator().manual_seed(0))
    s = lcm_schedule(lcm_timesteps(steps), alphas_cumprod())
    conditions = [engine.conditioning.positive("", prompt)]
    if negative is not None:
        conditions.append(engine.conditioning.negative(negative))
    nets = MultiControlNetModel(m["nets"][:len(images)])

    def eps_of(x, t, k, c):
        kwargs = {}
        if c.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": c.pooled,
                                           "time_ids": torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)}
        down, mid = nets(x, t, c.context, controlnet_cond=list(images), conditioning_scale=[sc[k] for sc in scales],
                         return_dict=False, **kwargs)
        return m["unet"](x, t, c.context, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                         **kwargs).sample

    x = s.sqrt_alpha[0] * z0 + s.sqrt_one_minus_alpha[0] * noise[:1]
    for k in range(steps):
        t = s.timesteps[k:k + 1]
        eps = eps_of(x, t, k, conditions[0])
        if negative is not None:
            uncond = eps_of(x, t, k, conditions[1])
            eps = uncond + guidance_scale * (eps - uncond)
        denoised = s.c_skip[k] * x + s.c_out[k] * (s.x0_from_x[k] * x + s.x0_from_out[k] * eps)
        if k < steps - 1:
            x = s.sqrt_alpha_next[k] * denoised + s.sqrt_one_minus_alpha_next[k] * noise[k + 1:k + 2]
    image = pipe.autoencoder.decode(denoised)
    return image, (image[0].permute(1, 2, 0) * 255).round().numpy()


def settings(m, *controls, **changes):
    """controls: (net index, input, scale[, start, end]) each."""
    made = tuple(Control(m["paths"][i], input, scale, *span) for i, input, scale, *span in controls)
    return StreamSettings(**{**dict(size=SIZE, prompt="a fox", steps=2, temporal=OFF, controls=made), **changes})


@pytest.mark.parametrize("family,controls,steps", [
    ("sd", [(0, "soft_edges", 0.8)], 2),
    ("sd", [(0, "canny", 1.2), (1, "soft_edges", 0.6)], 2),  # two ControlNets, residuals summed
    ("sd", [(0, "canny", 1.0, 0.5, 1.0)], 2),  # from the second step on: the first has none
    ("sd", [(0, "soft_edges", 1.0, 0.0, 0.5), (1, "canny", 0.7, 0.5, 1.0)], 2),
    ("sdxl", [(0, "soft_edges", 0.9)], 2),
], ids=["one", "two", "start", "start-end", "sdxl"])
def test_per_frame_path_equals_diffusers_by_hand(request, family, controls, steps):
    m = request.getfixturevalue(family)
    frames = clip(2)
    out = run(m["engine"], settings(m, *controls, steps=steps, stream_batch=False), frames)
    plain = run(m["engine"], settings(m, steps=steps, stream_batch=False), frames)
    for got, frame in zip(out, frames):
        image = as_image(frame)
        makers = {"canny": control_inputs.canny, "soft_edges": control_inputs.soft_edges}
        images = [makers[c[1]](image) for c in controls]
        scales = [[c[2] if (c[3:] or (0, 1))[0] <= k / steps and (k + 1) / steps <= (c[3:] or (0, 1))[1] else 0.0
                   for k in range(steps)] for c in controls]
        assert np.abs(got - by_hand(m, frame, steps, images, scales)[1]).max() <= 1
    assert np.abs(out - plain).mean() > 0.25  # the residuals matter (the tiny model's frames are dark: many 0s)


def test_full_guidance_with_controlnets_equals_diffusers_by_hand(sd):
    """CFG rows see their positive row's control image and scale."""
    frames = clip(2)
    controls = [(0, "canny", 1.0), (1, "soft_edges", 0.7)]
    out = run(sd["engine"], settings(sd, *controls, steps=2, stream_batch=False, guidance="full",
                                     guidance_scale=2.5, negative="blurry"), frames)
    for got, frame in zip(out, frames):
        image = as_image(frame)
        images = [control_inputs.canny(image), control_inputs.soft_edges(image)]
        want = by_hand(sd, frame, 2, images, [[1.0, 1.0], [0.7, 0.7]], negative="blurry", guidance_scale=2.5)[1]
        assert np.abs(got - want).max() <= 1


def test_two_streams_with_controlnets_share_a_bucket_and_equal_each_alone(sd):
    """Streams with the same ControlNets at different scales (and the stream batch, residual
    CFG on one) hold rows of one bucket; each gives what it gives alone."""
    engine = sd["engine"]
    streams = [(settings(sd, (0, "canny", 1.0), steps=2), "coffee"),
               (settings(sd, (0, "canny", 0.4), steps=2, seed=3, guidance="self", guidance_scale=1.5), "astronaut")]
    alone = [run_case(engine, [s])[0] for s in streams]
    together, buckets = run_watching_buckets(engine, streams)
    assert (2 in {held for _, held in buckets}) and len({b for b, _ in buckets}) == 1
    assert np.abs(together.astype(np.int16) - np.stack(alone).astype(np.int16)).max() <= 1


def test_stream_batch_equals_the_per_frame_path(sd):
    """Each slot's control image follows its frame through the slots (a moving clip: every
    frame's edges differ), temporal parts off."""
    frames = clip(6)
    controls = [(0, "canny", 1.0), (1, "soft_edges", 0.8, 0.0, 0.7)]
    per_frame = run(sd["engine"], settings(sd, *controls, steps=3, stream_batch=False), frames)
    batched = run(sd["engine"], settings(sd, *controls, steps=3), frames)
    assert np.abs(per_frame - batched).max() <= 1


def test_temporalnet_sees_the_current_frame_first_then_the_previous_output(sd):
    """Per-frame, flow off: frame 0's image is frame 0 itself (no output yet, as Daydream's
    fork does), frame 1's is frame 0's output."""
    frames = clip(2)
    out = run(sd["engine"], settings(sd, (0, "temporalnet", 1.0), steps=1, stream_batch=False), frames)
    first, expected = by_hand(sd, frames[0], 1, [as_image(frames[0])], [[1.0]])
    assert np.abs(out[0] - expected).max() <= 1
    assert np.abs(out[1] - by_hand(sd, frames[1], 1, [first], [[1.0]])[1]).max() <= 1


def test_a_live_scale_change_takes_effect_on_the_next_frame_without_a_rebuild(sd):
    """scale 1 for two frames, then 0 (off): frames 2 and 3 equal a stream without
    ControlNets; the stream keeps its bucket (a retune, not new buffers)."""
    engine, frames = sd["engine"], clip(4)
    on = run(engine, settings(sd, (0, "canny", 1.0), steps=1), frames)
    off = run(engine, settings(sd, steps=1), frames)
    outputs = []
    stream = engine.open_stream(settings(sd, (0, "canny", 1.0), steps=1), outputs.append, live=False)
    buckets = []
    for i, frame in enumerate(frames):
        if i == 2:
            stream.update(controls=(Control(sd["paths"][0], "canny", 0.0),))
        stream.submit(frame)
        assert stream.flush(timeout=60)
        buckets.append(stream.state.place[0])
    stream.close()
    got = np.stack([f.to_ndarray(format="rgb24") for f in outputs]).astype(np.int16)
    assert np.abs(got[:2] - on[:2]).max() == 0 and np.abs(got[2:] - off[2:]).max() == 0
    assert np.abs(on[2:] - off[2:]).mean() > 2
    assert all(b is buckets[0] for b in buckets)


def test_changing_the_nets_rebuilds_and_loses_no_frame(sd):
    engine, frames = sd["engine"], clip(5)
    outputs = []
    stream = engine.open_stream(settings(sd, (0, "canny", 1.0), steps=2, temporal=StreamSettings().temporal),
                                outputs.append, live=False)
    for i, frame in enumerate(frames):
        if i == 3:
            stream.update(controls=(Control(sd["paths"][1], "soft_edges", 1.0),))
        stream.submit(frame)
    assert stream.flush(timeout=60)
    stats = stream.stats()
    stream.close()
    assert len(outputs) == 5 and stats.errors == 0 and stats.failed_updates == 0


def test_bad_controls_are_refused_in_one_line(sd, sdxl, tmp_path):
    sdxl_net = Control(sdxl["paths"][0], "canny")  # an SDXL ControlNet on an SD 1.x U-Net
    cases = [
        ((sdxl_net,), r"control .*: the ControlNet is for an SDXL-like U-Net \(64-d context\), the U-Net is a 32-d"),
        ((Control(str(tmp_path / "missing"), "canny"),), "no such file or folder"),
        ((Control(sd["paths"][0], "depth:nobody"),), "no depth estimator named 'nobody'"),
    ]
    engine = sd["engine"]
    for controls, message in cases:
        with pytest.raises(LivestyleError, match=message) as raised:
            engine.open_stream(settings(sd, controls=controls), lambda f: None)
        assert "\n" not in str(raised.value)
    stream = engine.open_stream(settings(sd), lambda f: None)
    with pytest.raises(LivestyleError, match="the ControlNet is for an SDXL-like U-Net") as raised:
        stream.update(controls=(sdxl_net,))
    assert "\n" not in str(raised.value) and stream.settings.controls == ()
    stream.close()
    with pytest.raises(LivestyleError, match="the ControlNet is for a 32-d-context U-Net, the U-Net is an SDXL-like"):
        sdxl["engine"].check(settings(sd, (0, "canny", 1.0)))


def test_a_control_image_that_fails_fails_that_frame_only(sd):
    calls = []

    def flaky(frames):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("depth network ran out of memory")
        return frames.mean(1)

    control_inputs.register_depth_estimator("flaky", flaky, replace=True)
    try:
        frames = clip(5)
        outputs = []
        stream = sd["engine"].open_stream(settings(sd, (0, "depth:flaky", 1.0), steps=2), outputs.append, live=False)
        for frame in frames:
            stream.submit(frame)
        assert stream.flush(timeout=60)
        stats = stream.stats()
        stream.close()
    finally:
        control_inputs.unregister_depth_estimator("flaky")
    assert [f.pts for f in outputs] == [f.pts for f in frames]  # every frame out, in order
    assert stats.errors == 1 and len(calls) == 5
