"""Parity of livestyle's samplers with diffusers' LCM, Euler ancestral and DDIM schedulers."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, LCMScheduler
from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
    LatentConsistencyModelPipeline,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import StableDiffusionImg2ImgPipeline

from livestyle.stream import samplers as S

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 8, 8)


def lcm_scheduler(prediction_type="epsilon"):
    return LCMScheduler(**SD, prediction_type=prediction_type)


def euler_scheduler(prediction_type="epsilon", spacing="trailing"):
    # SD-Turbo's scheduler config.
    return EulerAncestralDiscreteScheduler(
        **SD, prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1
    )


def ddim_scheduler(spacing, prediction_type="epsilon"):
    # SD 1.5's scheduler config.
    return DDIMScheduler(
        **SD,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
    )


class ToyModel(torch.nn.Module):
    """A fixed random channel mix, modulated by t, with a nonlinearity: enough to make every
    coefficient of a sampler matter. Its output is mostly x * (0.5 + 0.5 t/T), roughly what a
    real noise predictor returns, so the clean estimates stay O(1) as with real latents."""

    def __init__(self, channels=4):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.w = torch.randn(channels, channels, generator=g) * 0.1
        self.b = torch.randn(channels, generator=g) * 0.05

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
        mix = torch.einsum("oc,bchw->bohw", self.w, x) + self.b[:, None, None]
        return x * (0.5 + 0.5 * t / 1000) + mix + 0.05 * torch.sin(3 * x)


def randn(seed, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def draws(seed, count, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(count)]


def close(a, b, atol=1e-6, rtol=0.0):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=atol, rtol=rtol), (a - b).abs().max().item()


# --- schedule and timesteps ---------------------------------------------------------


@pytest.mark.parametrize("schedule", ["scaled_linear", "linear"])
def test_alphas_cumprod_matches_diffusers(schedule):
    ref = DDIMScheduler(**{**SD, "beta_schedule": schedule}).alphas_cumprod
    assert torch.equal(S.alphas_cumprod(schedule=schedule), ref)


@pytest.mark.parametrize(
    "steps, strength, original",
    [(1, 1.0, 50), (2, 1.0, 50), (4, 1.0, 50), (8, 1.0, 50), (4, 0.5, 50), (3, 0.7, 50), (4, 1.0, 100), (50, 1.0, 50)],
)
def test_lcm_timesteps_match_diffusers(steps, strength, original):
    sched = lcm_scheduler()
    sched.set_timesteps(steps, original_inference_steps=original, strength=strength)
    ours = S.lcm_timesteps(steps, original_inference_steps=original, strength=strength)
    assert ours == sched.timesteps.tolist()


def test_lcm_timesteps_known_values():
    assert S.lcm_timesteps(4) == [999, 759, 499, 259]
    assert S.lcm_timesteps(1) == [999]


@pytest.mark.parametrize("t_index_list, expected", [([32, 45], [359, 99]), ([0, 16, 32, 45], [999, 679, 359, 99])])
def test_t_index_list_indexes_the_50_step_lcm_grid(t_index_list, expected):
    sched = lcm_scheduler()
    sched.set_timesteps(50)
    assert [sched.timesteps[i].item() for i in t_index_list] == expected
    assert S.lcm_timesteps(t_index_list=t_index_list) == expected


@pytest.mark.parametrize("bad", [[], [45, 32], [0, 50], [-1, 3]])
def test_t_index_list_rejects_bad_lists(bad):
    with pytest.raises(ValueError):
        S.lcm_timesteps(t_index_list=bad)


def test_lcm_timesteps_rejects_too_many_steps():
    with pytest.raises(ValueError):
        S.lcm_timesteps(30, strength=0.5)
    with pytest.raises(ValueError):
        S.lcm_timesteps(4, t_index_list=[0])


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_spaced_timesteps_match_diffusers(spacing):
    for n in list(range(1, 40)) + [50, 64, 100, 999, 1000]:
        sched = ddim_scheduler(spacing)
        sched.set_timesteps(n)
        assert S.spaced_timesteps(n, spacing, steps_offset=1) == sched.timesteps.tolist(), n
        euler = euler_scheduler(spacing=spacing)
        euler.set_timesteps(n)
        assert S.spaced_timesteps(n, spacing, steps_offset=1) == euler.timesteps.long().tolist(), n


def test_img2img_timesteps_match_diffusers_get_timesteps():
    for n in (4, 10, 50):
        for strength in (0.3, 0.5, 0.75, 1.0):
            sched = ddim_scheduler("leading")
            sched.set_timesteps(n)
            ref, _ = StableDiffusionImg2ImgPipeline.get_timesteps(
                SimpleNamespace(scheduler=sched), n, strength, "cpu"
            )
            ours = S.img2img_timesteps(S.spaced_timesteps(n, "leading"), strength)
            assert ours == ref.tolist()


# --- coefficients -------------------------------------------------------------------


@pytest.mark.parametrize(
    "timesteps",
    [S.lcm_timesteps(1), S.lcm_timesteps(4), S.lcm_timesteps(t_index_list=[32, 45]), [999, 499, 19, 1, 0]],
)
def test_lcm_coefficients_match_diffusers(timesteps):
    sched = lcm_scheduler()
    schedule = S.lcm_schedule(timesteps, S.alphas_cumprod())
    ac = sched.alphas_cumprod
    scalings = [sched.get_scalings_for_boundary_condition_discrete(torch.tensor(t)) for t in timesteps]
    close(schedule.c_skip, [c for c, _ in scalings], atol=0, rtol=1e-5)  # c_skip is ~1e-7 at t = 99
    close(schedule.c_out, [c for _, c in scalings])
    close(schedule.sqrt_alpha, ac[timesteps].sqrt())
    close(schedule.sqrt_one_minus_alpha, (1 - ac[timesteps]).sqrt())
    a_next = torch.cat([ac[timesteps[1:]], torch.ones(1)])
    close(schedule.sqrt_alpha_next, a_next.sqrt())
    close(schedule.sqrt_one_minus_alpha_next, (1 - a_next).sqrt())


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_euler_ancestral_coefficients_match_diffusers(steps):
    sched = euler_scheduler()
    sched.set_timesteps(steps)
    schedule = S.euler_ancestral_schedule(S.spaced_timesteps(steps, "trailing"), S.alphas_cumprod())
    assert schedule.timesteps.tolist() == sched.timesteps.long().tolist()
    close(schedule.sigmas, sched.sigmas)
    s_from, s_to = sched.sigmas[:-1], sched.sigmas[1:]
    sigma_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2) ** 0.5
    close(schedule.sigma_up, sigma_up)
    close(schedule.sigma_down, (s_to**2 - sigma_up**2) ** 0.5)
    close(schedule.c_in, 1 / (s_from**2 + 1) ** 0.5)
    assert schedule.sigmas[0] == sched.init_noise_sigma


@pytest.mark.parametrize("steps", [4, 10, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_coefficients_match_diffusers(steps, spacing):
    sched = ddim_scheduler(spacing)
    sched.set_timesteps(steps)
    timesteps = S.spaced_timesteps(steps, spacing)
    schedule = S.ddim_schedule(timesteps, S.alphas_cumprod(), set_alpha_to_one=False)
    assert schedule.timesteps.tolist() == sched.timesteps.tolist()
    ac = sched.alphas_cumprod
    prev = [t - 1000 // steps for t in timesteps]
    a_prev = torch.stack([ac[p] if p >= 0 else sched.final_alpha_cumprod for p in prev])
    close(schedule.sqrt_alpha_prev, a_prev.sqrt())
    close(schedule.direction, (1 - a_prev).sqrt())
    close(schedule.x0_from_x, 1 / ac[timesteps].sqrt(), atol=1e-5)  # ~15 at t = 999
    assert torch.all(schedule.std == 0)


# --- end to end against diffusers' step loops ---------------------------------------


def diffusers_lcm(sched, model, x, seed):
    g = torch.Generator().manual_seed(seed)
    for t in sched.timesteps:
        x, denoised = sched.step(model(x, t), t, x, generator=g, return_dict=False)
    return denoised


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sample_lcm_matches_diffusers(steps, prediction_type):
    model, x = ToyModel(), randn(0)
    sched = lcm_scheduler(prediction_type)
    sched.set_timesteps(steps)
    ref = diffusers_lcm(sched, model, x, seed=1)
    schedule = S.lcm_schedule(S.lcm_timesteps(steps), S.alphas_cumprod(), prediction_type)
    ours = S.sample_lcm(model, x, schedule, generator=torch.Generator().manual_seed(1))
    close(ours, ref, atol=1e-5)
    ours_given = S.sample_lcm(model, x, schedule, noises=draws(1, steps - 1))
    close(ours_given, ref, atol=1e-5)
    if steps > 1:  # the noise matters: other noise, other result
        other = S.sample_lcm(model, x, schedule, noises=draws(2, steps - 1))
        assert (other - ref).abs().max() > 1e-3


@pytest.mark.parametrize("t_index_list", [[32, 45], [0, 16, 32, 45]])
def test_stream_lcm_img2img_matches_diffusers(t_index_list):
    """StreamDiffusion's path: noise the input latent to the first chosen timestep, then
    LCM steps along the chosen timesteps."""
    model, x0, noise = ToyModel(), randn(3), randn(4)
    timesteps = S.lcm_timesteps(t_index_list=t_index_list)
    sched = lcm_scheduler()
    sched.set_timesteps(timesteps=timesteps)
    x = sched.add_noise(x0, noise, sched.timesteps[:1])
    ref = diffusers_lcm(sched, model, x, seed=5)

    ac = S.alphas_cumprod()
    schedule = S.lcm_schedule(timesteps, ac)
    ours_x = S.add_noise(x0, noise, schedule.timesteps[0], ac)
    close(ours_x, x, atol=1e-6)
    close(S.sample_lcm(model, ours_x, schedule, noises=draws(5, len(timesteps) - 1)), ref, atol=1e-5)


def test_lcm_img2img_strength_matches_diffusers():
    model, x0, noise = ToyModel(), randn(6), randn(7)
    sched = lcm_scheduler()
    sched.set_timesteps(4, strength=0.5)
    x = sched.add_noise(x0, noise, sched.timesteps[:1])
    ref = diffusers_lcm(sched, model, x, seed=8)
    ac = S.alphas_cumprod()
    schedule = S.lcm_schedule(S.lcm_timesteps(4, strength=0.5), ac)
    ours = S.sample_lcm(model, S.add_noise(x0, noise, schedule.timesteps[0], ac), schedule, noises=draws(8, 3))
    close(ours, ref, atol=1e-5)


def test_lcm_step_with_per_row_index_equals_per_step_calls():
    """The stream batch: row b at step index[b], one call for all rows."""
    schedule = S.lcm_schedule(S.lcm_timesteps(t_index_list=[0, 16, 32, 45]), S.alphas_cumprod())
    x, out, noise = randn(0, (4, 4, 8, 8)), randn(1, (4, 4, 8, 8)), randn(2, (4, 4, 8, 8))
    index = torch.tensor([0, 1, 2, 3])
    x_next, denoised = S.lcm_step(x, out, schedule, index, noise)
    for b in range(4):
        xb, db = S.lcm_step(x[b : b + 1], out[b : b + 1], schedule, b, noise[b : b + 1])
        close(x_next[b : b + 1], xb, atol=1e-6)
        close(denoised[b : b + 1], db, atol=1e-6)
    close(x_next[3], denoised[3], atol=0)  # the last step is not re-noised


def test_lcm_step_keeps_half_precision_dtype():
    schedule = S.lcm_schedule(S.lcm_timesteps(2), S.alphas_cumprod())
    x, out = randn(0).half(), randn(1).half()
    x_next, denoised = S.lcm_step(x, out, schedule, torch.tensor([0, 1]), randn(2).half())
    assert x_next.dtype == denoised.dtype == torch.float16
    full = S.lcm_denoise(x.float(), out.float(), schedule, torch.tensor([0, 1]))
    assert torch.allclose(denoised.float(), full, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_sample_euler_ancestral_matches_diffusers(steps, prediction_type):
    model, noise = ToyModel(), randn(0)
    sched = euler_scheduler(prediction_type)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(1)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        out = model(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, generator=g).prev_sample
    ref = x

    schedule = S.euler_ancestral_schedule(S.spaced_timesteps(steps, "trailing"), S.alphas_cumprod(), prediction_type)
    start = S.euler_add_noise(torch.zeros_like(noise), noise, schedule)
    ours = S.sample_euler_ancestral(model, start, schedule, generator=torch.Generator().manual_seed(1))
    close(ours, ref, atol=1e-5)
    close(S.sample_euler_ancestral(model, start, schedule, noises=draws(1, steps - 1)), ref, atol=1e-5)


def test_euler_ancestral_img2img_matches_diffusers():
    model, x0, noise = ToyModel(), randn(2), randn(3)
    sched = euler_scheduler()
    sched.set_timesteps(4)
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=sched), 4, 0.5, "cpu")
    g = torch.Generator().manual_seed(4)
    x = sched.add_noise(x0, noise, timesteps[:1])
    for t in timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x, generator=g).prev_sample

    schedule = S.euler_ancestral_schedule(
        S.img2img_timesteps(S.spaced_timesteps(4, "trailing"), 0.5), S.alphas_cumprod()
    )
    ours = S.sample_euler_ancestral(model, S.euler_add_noise(x0, noise, schedule), schedule, noises=draws(4, 1))
    close(ours, x, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [4, 10, 50])
def test_sample_ddim_matches_diffusers(steps, spacing, prediction_type):
    model, x = ToyModel(), randn(0)
    sched = ddim_scheduler(spacing, prediction_type)
    sched.set_timesteps(steps)
    ref = x
    for t in sched.timesteps:
        ref = sched.step(model(ref, t), t, ref).prev_sample
    schedule = S.ddim_schedule(
        S.spaced_timesteps(steps, spacing), S.alphas_cumprod(), prediction_type, set_alpha_to_one=False
    )
    close(S.sample_ddim(model, x, schedule), ref, atol=1e-5)


@pytest.mark.parametrize("steps", [3, 7])
def test_ddim_stride_matches_diffusers_when_steps_do_not_divide(steps):
    """Trailing spacing with n not dividing 1000: diffusers steps to t - 1000 // n."""
    model, x = ToyModel(), randn(0)
    sched = ddim_scheduler("trailing")
    sched.set_timesteps(steps)
    ref = x
    for t in sched.timesteps:
        ref = sched.step(model(ref, t), t, ref).prev_sample
    timesteps = S.spaced_timesteps(steps, "trailing")
    schedule = S.ddim_schedule(timesteps, S.alphas_cumprod(), set_alpha_to_one=False, stride=1000 // steps)
    close(S.sample_ddim(model, x, schedule), ref, atol=1e-5)
    by_list = S.ddim_schedule(timesteps, S.alphas_cumprod(), set_alpha_to_one=False)
    assert not torch.allclose(by_list.sqrt_alpha_prev, schedule.sqrt_alpha_prev)


def test_ddim_with_eta_matches_diffusers_variance_noise():
    model, x = ToyModel(), randn(0)
    sched = ddim_scheduler("leading")
    sched.set_timesteps(10)
    noises = draws(9, 10)
    ref = x
    for t, z in zip(sched.timesteps, noises):
        ref = sched.step(model(ref, t), t, ref, eta=0.7, variance_noise=z).prev_sample
    schedule = S.ddim_schedule(S.spaced_timesteps(10), S.alphas_cumprod(), eta=0.7, set_alpha_to_one=False)
    close(S.sample_ddim(model, x, schedule, noises=noises), ref, atol=1e-5)
    with pytest.raises(ValueError, match="noise"):
        S.ddim_step(x, x, schedule, 0)


@pytest.mark.parametrize("dim", [256, 512, 12, 7])
def test_guidance_scale_embedding_matches_diffusers(dim):
    # LCM's pipeline passes w = guidance_scale - 1.
    w = torch.tensor([7.5, 8.0, 1.0, 1.5, 0.3]) - 1
    # diffusers' method uses no state of the pipeline: call it unbound with a dummy self.
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    got = S.guidance_scale_embedding(w, dim)
    assert got.shape == (5, dim) and got.dtype == torch.float32
    assert torch.equal(got, expected)
    assert not torch.equal(got[0], got[1])  # different w, different embedding
    with pytest.raises(ValueError, match=r"\(B,\)"):
        S.guidance_scale_embedding(w[None], dim)


def test_bad_prediction_type_is_refused():
    for make in (S.lcm_schedule, S.euler_ancestral_schedule, S.ddim_schedule):
        with pytest.raises(ValueError, match="prediction_type"):
            make([999], S.alphas_cumprod(), "sample")


def test_schedule_moves_to_device_and_stays_frozen():
    schedule = S.lcm_schedule(S.lcm_timesteps(2), S.alphas_cumprod())
    moved = schedule.to("cpu")
    assert torch.equal(moved.c_out, schedule.c_out) and moved.timesteps.dtype == torch.int64
    with pytest.raises(Exception):
        schedule.c_out = schedule.c_skip
