"""Few-step samplers as plain functions: LCM, Euler ancestral (SD-Turbo), DDIM, and the
flow bridge of the embedded demo model (`sample_bridge`, at the end of this file).

In the spirit of k-diffusion's sampling.py: a sampler takes a model and a state
and returns the new state; nothing is mutated, nothing is hidden on an object.

Contract for the model, shared by every sampler here:

    eps_model(x, t) -> model_output

    x: (B, C, H, W) latents at the step's noise level (for Euler ancestral the
       sampler hands the model the unit-variance input, x / sqrt(sigma^2 + 1)).
    t: (B,) int64 training timesteps in [0, num_train_timesteps).
    model_output: (B, C, H, W), epsilon or v depending on the schedule's
       prediction_type ("epsilon" | "v_prediction").

Everything that depends only on the settings (timesteps, alphas, c_skip/c_out,
sigmas) is computed once, at the edge, into a frozen schedule dataclass of
(S,) tensors, S = number of steps. The per-step functions only index those
tensors and do elementwise math: no .item(), no branching on strings, no host
syncs. Step functions take `index`, an int (every row at the same step) or a
(B,) int64 tensor (StreamDiffusion's stream batch: row b is at step index[b]),
and work in at least fp32 whatever the latents' dtype.

Parity oracles (tests only): diffusers' LCMScheduler, EulerAncestralDiscreteScheduler
and DDIMScheduler with Stable Diffusion's configs.

The flow bridge has its own contract, `velocity_model(z, t * 1000) -> dz/dt` with t in
[0, 1]: its model predicts a velocity, not noise (see `sample_bridge`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

EpsModel = Callable[[Tensor, Tensor], Tensor]

PREDICTION_TYPES = ("epsilon", "v_prediction")


# --- the noise schedule -------------------------------------------------------------


def alphas_cumprod(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    schedule: str = "scaled_linear",
) -> Tensor:
    """Cumulative products of (1 - beta_t), Stable Diffusion's training noise schedule.

    Returns a (num_train_timesteps,) fp32 tensor, decreasing from ~1 to ~0.005 for SD.
    Computed in fp32 exactly as the reference implementation does, so that timestep
    lookups agree bit for bit. "scaled_linear" is linear in sqrt(beta) (SD 1.x/2.x);
    "linear" is linear in beta (DDPM).
    """
    if schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    else:
        raise ValueError(f"schedule must be 'scaled_linear' or 'linear', not {schedule!r}")
    return torch.cumprod(1.0 - betas, dim=0)


def add_noise(x0: Tensor, noise: Tensor, t: int | Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward diffusion q(x_t | x_0): sqrt(a_t) * x0 + sqrt(1 - a_t) * noise.

    The image-to-image start for LCM, DDIM and StreamDiffusion. x0, noise: (B, C, H, W);
    t: an int or a (B,) int64 tensor on alphas_cumprod's device. Returns x0's dtype.
    For Euler ancestral use `euler_add_noise` (its state lives in sigma space).
    """
    a = _rows(alphas_cumprod[t].float(), x0)
    x = a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()
    return x.to(x0.dtype)


# --- timesteps ---------------------------------------------------------------------


def lcm_timesteps(
    num_inference_steps: int | None = None,
    *,
    t_index_list: Sequence[int] | None = None,
    grid_steps: int = 50,
    original_inference_steps: int = 50,
    strength: float = 1.0,
    num_train_timesteps: int = 1000,
) -> list[int]:
    """Timesteps for a latent consistency model, descending.

    Give exactly one of:
      num_inference_steps: as diffusers' LCMScheduler.set_timesteps. LCM was distilled
        on a grid of `original_inference_steps` timesteps k-1, 2k-1, ..., with
        k = num_train_timesteps // original_inference_steps (Luo et al. 2023,
        arXiv:2310.04378); img2img `strength` keeps the lowest fraction of that grid;
        the steps are taken evenly spaced in index along the grid, from the top.
      t_index_list: StreamDiffusion's choice (Kodaira et al. 2023, arXiv:2312.12491):
        indices into the `grid_steps`-step LCM schedule, e.g. [32, 45] of the 50-step
        one is [359, 99].

    Returns a list of ints in [0, num_train_timesteps).
    """
    if (num_inference_steps is None) == (t_index_list is None):
        raise ValueError("give exactly one of num_inference_steps and t_index_list")
    if t_index_list is not None:
        grid = lcm_timesteps(
            grid_steps,
            original_inference_steps=original_inference_steps,
            strength=strength,
            num_train_timesteps=num_train_timesteps,
        )
        indices = list(t_index_list)
        if not indices or any(b <= a for a, b in zip(indices, indices[1:])):
            raise ValueError(f"t_index_list must be non-empty and increasing, got {indices}")
        if indices[0] < 0 or indices[-1] >= len(grid):
            raise ValueError(f"t_index_list {indices} has indices outside the {len(grid)}-step grid")
        return [grid[i] for i in indices]

    if original_inference_steps > num_train_timesteps:
        raise ValueError(f"original_inference_steps {original_inference_steps} > {num_train_timesteps}")
    k = num_train_timesteps // original_inference_steps
    # The distillation grid, cut by strength: k-1, 2k-1, ..., int(N*strength)*k - 1.
    grid = [i * k - 1 for i in range(1, int(original_inference_steps * strength) + 1)][::-1]
    if not 1 <= num_inference_steps <= min(len(grid), original_inference_steps):
        raise ValueError(
            f"num_inference_steps must be in [1, {len(grid)}] for original_inference_steps="
            f"{original_inference_steps} and strength={strength}, got {num_inference_steps}"
        )
    # floor(linspace(0, len, n, endpoint=False)) as diffusers does, in exact integers.
    return [grid[(i * len(grid)) // num_inference_steps] for i in range(num_inference_steps)]


def spaced_timesteps(
    num_inference_steps: int,
    spacing: str = "leading",
    steps_offset: int = 1,
    num_train_timesteps: int = 1000,
) -> list[int]:
    """Evenly spaced timesteps for DDIM and Euler ancestral, descending.

    The spacings of Lin et al. 2023 (arXiv:2305.08891, table 2), as diffusers computes them:
      "leading": 0, r, 2r, ... with r = T // n, plus steps_offset (SD 1.x/2.x configs: 1);
      "trailing": round(T, T - T/n, ..., T/n) - 1, so the first step is always T - 1
      (SD-Turbo's config; steps_offset is ignored).
    """
    n, T = num_inference_steps, num_train_timesteps
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be in [1, {T}], got {n}")
    if spacing == "leading":
        return [i * (T // n) + steps_offset for i in range(n)][::-1]
    if spacing == "trailing":
        # arange(T, 0, -T/n) in float64 like numpy, then round-half-to-even like np.round.
        points = torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1
        return [int(p) for p in points]
    raise ValueError(f"spacing must be 'leading' or 'trailing', not {spacing!r}")


def img2img_timesteps(timesteps: Sequence[int], strength: float) -> list[int]:
    """The tail of a DDIM / Euler schedule that image-to-image runs at `strength` in [0, 1].

    As diffusers' img2img pipelines: keep the last int(n * strength) of the n steps; the
    input image is noised to the first kept timestep. (For LCM, strength instead cuts
    the distillation grid: pass it to `lcm_timesteps`.)
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    n = len(timesteps)
    kept = min(int(n * strength), n)
    if kept == 0:
        raise ValueError(f"strength {strength} keeps none of the {n} steps")
    return list(timesteps)[n - kept :]


# --- shared helpers ----------------------------------------------------------------


def _rows(c: Tensor, x: Tensor) -> Tensor:
    """A 0-d coefficient as is, a (B,) one as (B, 1, ..., 1) to broadcast against x."""
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim)) if c.ndim else c


def _at(coeff: Tensor, index: int | Tensor, x: Tensor) -> Tensor:
    """coeff[index] shaped to broadcast against x (an indexing kernel, no host sync)."""
    return _rows(coeff[index], x)


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Half-precision latents are stepped in fp32, as diffusers' Euler step upcasts.
    return torch.promote_types(x.dtype, torch.float32)


def _x0_coefficients(a: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(from_x, from_out) with x0 = from_x * x_t + from_out * model_output, for VP latents
    x_t = sqrt(a) x0 + sqrt(1-a) eps. Folding the prediction type into two numbers keeps
    the per-step code free of branches."""
    if prediction_type == "epsilon":  # x0 = (x - sqrt(1-a) eps) / sqrt(a)
        return 1 / a.sqrt(), -(1 - a).sqrt() / a.sqrt()
    if prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022)
        return a.sqrt(), -(1 - a).sqrt()
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, not {prediction_type!r}")


def _check_timesteps(timesteps: Sequence[int], alphas_cumprod: Tensor) -> Tensor:
    ts = [int(t) for t in timesteps]
    if not ts or any(b >= a for a, b in zip(ts, ts[1:])) or ts[-1] < 0 or ts[0] >= len(alphas_cumprod):
        raise ValueError(f"timesteps must be non-empty, descending, in [0, {len(alphas_cumprod)}): {ts}")
    return torch.tensor(ts, dtype=torch.int64)


def _draw(noises: Sequence[Tensor] | None, i: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """The caller's noise for step i, or a draw from `generator` (on the generator's device,
    then moved, as diffusers does, so a CPU generator reproduces its draws)."""
    if noises is not None:
        return noises[i]
    if generator is None:
        raise ValueError("this sampler needs noises or a generator")
    z = torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype)
    return z.to(like.device)


def _moved_to(schedule, device: torch.device | str):
    moved = {f.name: getattr(schedule, f.name) for f in dataclasses.fields(schedule)}
    moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in moved.items()}
    return dataclasses.replace(schedule, **moved)


# --- LCM ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LCMSchedule:
    """Per-step coefficients of multistep latent consistency sampling, each (S,).

    x0 = x0_from_x * x + x0_from_out * model_output      (the model's clean estimate)
    denoised = c_skip * x + c_out * x0                   (consistency boundary condition)
    x_next = sqrt_alpha_next * denoised + sqrt_one_minus_alpha_next * noise
    sqrt_alpha_next is 1 and sqrt_one_minus_alpha_next 0 at the last step.
    """

    timesteps: Tensor  # (S,) int64
    sqrt_alpha: Tensor  # sqrt(a_t): the img2img / stream start is sqrt_alpha[0] x0 + ...
    sqrt_one_minus_alpha: Tensor
    x0_from_x: Tensor
    x0_from_out: Tensor
    c_skip: Tensor
    c_out: Tensor
    sqrt_alpha_next: Tensor
    sqrt_one_minus_alpha_next: Tensor

    def to(self, device: torch.device | str) -> LCMSchedule:
        return _moved_to(self, device)


def lcm_schedule(
    timesteps: Sequence[int],
    alphas_cumprod: Tensor,
    prediction_type: str = "epsilon",
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
) -> LCMSchedule:
    """Precompute LCM's coefficients for descending `timesteps` (from `lcm_timesteps`).

    c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2), c_out = s t / sqrt((s t)^2 + sigma_data^2)
    with s = timestep_scaling: the boundary-condition scalings of consistency models
    (Song et al. 2023) in LCM's discrete form (Luo et al. 2023, arXiv:2310.04378).
    Computed in fp64 from the fp32 schedule, stored fp32.
    """
    ts = _check_timesteps(timesteps, alphas_cumprod)
    ac = alphas_cumprod.double()
    a = ac[ts]
    a_next = torch.cat([ac[ts[1:]], torch.ones(1, dtype=torch.float64)])
    scaled = ts.double() * timestep_scaling
    from_x, from_out = _x0_coefficients(a, prediction_type)
    coeffs = dict(
        sqrt_alpha=a.sqrt(),
        sqrt_one_minus_alpha=(1 - a).sqrt(),
        x0_from_x=from_x,
        x0_from_out=from_out,
        c_skip=sigma_data**2 / (scaled**2 + sigma_data**2),
        c_out=scaled / (scaled**2 + sigma_data**2).sqrt(),
        sqrt_alpha_next=a_next.sqrt(),
        sqrt_one_minus_alpha_next=(1 - a_next).sqrt(),
    )
    return LCMSchedule(timesteps=ts, **{k: v.float() for k, v in coeffs.items()})


def lcm_denoise(x: Tensor, model_output: Tensor, schedule: LCMSchedule, index: int | Tensor) -> Tensor:
    """The consistency function f(x_t, t): (B, C, H, W) latents -> denoised latents (B, C, H, W)."""
    dtype = x.dtype
    x, out = x.to(_compute_dtype(x)), model_output.to(_compute_dtype(x))
    x0 = _at(schedule.x0_from_x, index, x) * x + _at(schedule.x0_from_out, index, x) * out
    return (_at(schedule.c_skip, index, x) * x + _at(schedule.c_out, index, x) * x0).to(dtype)


def lcm_renoise(denoised: Tensor, noise: Tensor, schedule: LCMSchedule, index: int | Tensor) -> Tensor:
    """Noise the denoised latents forward to the next step's timestep (identity at the last)."""
    dtype = denoised.dtype
    d, z = denoised.to(_compute_dtype(denoised)), noise.to(_compute_dtype(denoised))
    x = _at(schedule.sqrt_alpha_next, index, d) * d + _at(schedule.sqrt_one_minus_alpha_next, index, d) * z
    return x.to(dtype)


def lcm_step(
    x: Tensor, model_output: Tensor, schedule: LCMSchedule, index: int | Tensor, noise: Tensor
) -> tuple[Tensor, Tensor]:
    """One multistep-LCM step (Luo et al. 2023, algorithm 3). Returns (x_next, denoised).

    noise: (B, C, H, W) standard normal, given by the caller (StreamDiffusion reuses one
    fixed noise for every frame).
    """
    denoised = lcm_denoise(x, model_output, schedule, index)
    return lcm_renoise(denoised, noise, schedule, index), denoised


def sample_lcm(
    eps_model: EpsModel,
    x: Tensor,
    schedule: LCMSchedule,
    noises: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Multistep LCM sampling. x: (B, C, H, W) latents noised to timesteps[0]
    (pure noise for text-to-image, `add_noise` for image-to-image). noises: S-1 tensors
    like x for the re-noising between steps, or a generator to draw them.
    Returns the last step's denoised latents (B, C, H, W)."""
    steps = len(schedule.timesteps)
    for i in range(steps):
        t = schedule.timesteps[i].expand(x.shape[0])  # (B,)
        denoised = lcm_denoise(x, eps_model(x, t), schedule, i)
        if i < steps - 1:
            x = lcm_renoise(denoised, _draw(noises, i, denoised, generator), schedule, i)
    return denoised


def guidance_scale_embedding(w: Tensor, dim: int = 512) -> Tensor:
    """LCM's guidance-scale conditioning: w (B,) -> (B, dim) fp32, the U-Net's timestep_cond.

    Full LCM checkpoints (LCM_Dreamshaper_v7, time_cond_proj_dim = 256) were distilled
    with the CFG scale as an input: w = guidance_scale - 1 (diffusers' LCM pipeline),
    embedded like a timestep at 1000 * w (sin half first, then cos; VDM's embedding,
    Kingma et al. 2021), zero-padded to an odd dim. Computed in fp32 op for op as
    diffusers' get_guidance_scale_embedding, so the two agree bit for bit.
    """
    if w.ndim != 1:
        raise ValueError(f"w must be (B,), got shape {tuple(w.shape)}")
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(w.device)  # (half,)
    args = (w.float() * 1000.0)[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


# --- Euler ancestral (SD-Turbo) ----------------------------------------------------


@dataclass(frozen=True)
class EulerAncestralSchedule:
    """Per-step coefficients of Euler ancestral sampling in sigma space, each (S,).

    The state is x = x0 + sigma * eps (variance-exploding form); the model sees
    c_in * x = sqrt(a_t) x0 + sqrt(1 - a_t) eps, its training input.
    """

    timesteps: Tensor  # (S,) int64
    sigmas: Tensor  # (S + 1,) sqrt((1 - a_t) / a_t) at each timestep, then 0
    c_in: Tensor  # 1 / sqrt(sigma^2 + 1)
    x0_from_x: Tensor  # x0 = x0_from_x * x + x0_from_out * model_output
    x0_from_out: Tensor
    sigma_down: Tensor
    sigma_up: Tensor

    def to(self, device: torch.device | str) -> EulerAncestralSchedule:
        return _moved_to(self, device)


def euler_ancestral_schedule(
    timesteps: Sequence[int], alphas_cumprod: Tensor, prediction_type: str = "epsilon"
) -> EulerAncestralSchedule:
    """Precompute Euler ancestral's coefficients for descending `timesteps`.

    SD-Turbo (adversarial diffusion distillation, Sauer et al. 2023, arXiv:2311.17042) is
    sampled with this at 1-4 steps, timesteps from `spaced_timesteps(n, "trailing")`,
    as diffusers' EulerAncestralDiscreteScheduler does. The ancestral split of
    k-diffusion (Karras et al. 2022): sigma_up = sqrt(s_to^2 (s_from^2 - s_to^2) / s_from^2),
    sigma_down = sqrt(s_to^2 - sigma_up^2).
    """
    ts = _check_timesteps(timesteps, alphas_cumprod)
    # Sigmas in fp32, as the reference computes them; the rest in fp64 from those.
    sigma_all = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    sigmas = torch.cat([sigma_all[ts].double(), torch.zeros(1, dtype=torch.float64)])
    s_from, s_to = sigmas[:-1], sigmas[1:]
    sigma_up = (s_to**2 * (s_from**2 - s_to**2) / s_from**2).sqrt()
    if prediction_type == "epsilon":  # x0 = x - sigma eps
        from_x, from_out = torch.ones_like(s_from), -s_from
    elif prediction_type == "v_prediction":  # x0 = x / (sigma^2+1) - sigma / sqrt(sigma^2+1) v
        from_x, from_out = 1 / (s_from**2 + 1), -s_from / (s_from**2 + 1).sqrt()
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, not {prediction_type!r}")
    return EulerAncestralSchedule(
        timesteps=ts,
        sigmas=sigmas.float(),
        c_in=(1 / (s_from**2 + 1).sqrt()).float(),
        x0_from_x=from_x.float(),
        x0_from_out=from_out.float(),
        sigma_down=(s_to**2 - sigma_up**2).clamp(min=0).sqrt().float(),
        sigma_up=sigma_up.float(),
    )


def euler_add_noise(x0: Tensor, noise: Tensor, schedule: EulerAncestralSchedule) -> Tensor:
    """The Euler start at the first step: x0 + sigma_0 * noise (x0 = 0 for text-to-image)."""
    return (x0.float() + schedule.sigmas[0] * noise.float()).to(x0.dtype)


def euler_ancestral_step(
    x: Tensor,
    model_output: Tensor,
    schedule: EulerAncestralSchedule,
    index: int | Tensor,
    noise: Tensor | None,
) -> Tensor:
    """One Euler ancestral step from sigma to sigma_next: (B, C, H, W) -> (B, C, H, W).

    model_output: the model at (c_in * x, t). noise: standard normal like x; None drops
    the noise term, which is only right where sigma_up is 0 (the last step).
    """
    dtype = x.dtype
    x, out = x.to(_compute_dtype(x)), model_output.to(_compute_dtype(x))
    sigma = _at(schedule.sigmas, index, x)
    x0 = _at(schedule.x0_from_x, index, x) * x + _at(schedule.x0_from_out, index, x) * out
    d = (x - x0) / sigma  # dx/dsigma of the probability-flow ODE
    x = x + d * (_at(schedule.sigma_down, index, x) - sigma)
    if noise is not None:
        x = x + noise.to(x.dtype) * _at(schedule.sigma_up, index, x)
    return x.to(dtype)


def sample_euler_ancestral(
    eps_model: EpsModel,
    x: Tensor,
    schedule: EulerAncestralSchedule,
    noises: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Euler ancestral sampling (k-diffusion's sample_euler_ancestral).

    x: (B, C, H, W) in sigma space at sigmas[0] (`euler_add_noise`). noises: S-1 tensors
    like x (the last step adds none), or a generator to draw them.
    Returns denoised latents (B, C, H, W)."""
    steps = len(schedule.timesteps)
    for i in range(steps):
        t = schedule.timesteps[i].expand(x.shape[0])  # (B,)
        out = eps_model(x * schedule.c_in[i].to(x.dtype), t)
        noise = _draw(noises, i, x, generator) if i < steps - 1 else None
        x = euler_ancestral_step(x, out, schedule, i, noise)
    return x


# --- DDIM --------------------------------------------------------------------------


@dataclass(frozen=True)
class DDIMSchedule:
    """Per-step coefficients of DDIM, each (S,).

    x0 = x0_from_x * x + x0_from_out * out; eps = eps_from_x * x + eps_from_out * out;
    x_prev = sqrt_alpha_prev * x0 + direction * eps + std * noise.
    """

    timesteps: Tensor  # (S,) int64
    x0_from_x: Tensor
    x0_from_out: Tensor
    eps_from_x: Tensor
    eps_from_out: Tensor
    sqrt_alpha_prev: Tensor
    direction: Tensor  # sqrt(1 - a_prev - std^2)
    std: Tensor  # eta * sqrt(variance); all 0 when eta = 0
    eta: float

    def to(self, device: torch.device | str) -> DDIMSchedule:
        return _moved_to(self, device)


def ddim_schedule(
    timesteps: Sequence[int],
    alphas_cumprod: Tensor,
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    set_alpha_to_one: bool = True,
    stride: int | None = None,
) -> DDIMSchedule:
    """Precompute DDIM's coefficients (Song et al. 2020, arXiv:2010.02502, eq. 12) for
    descending `timesteps` (from `spaced_timesteps`).

    stride: None steps from each timestep to the next one in the list; an int steps from
    t to t - stride, as diffusers' DDIMScheduler does with stride = T // n for n
    inference steps (the two agree for "leading" spacing, and for "trailing" when n
    divides T). Below timestep 0 the target is a = 1 (set_alpha_to_one) or a_0 (SD
    1.x/2.x configs set it False). eta = 0 is deterministic; eta = 1 is DDPM-like.
    """
    ts = _check_timesteps(timesteps, alphas_cumprod)
    ac = alphas_cumprod.double()
    final = torch.ones(1, dtype=torch.float64) if set_alpha_to_one else ac[:1]
    a = ac[ts]
    prev = torch.cat([ts[1:], ts.new_full((1,), -1)]) if stride is None else ts - stride
    a_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], final)
    x0_from_x, x0_from_out = _x0_coefficients(a, prediction_type)
    if prediction_type == "epsilon":
        eps_from_x, eps_from_out = torch.zeros_like(a), torch.ones_like(a)
    else:  # v_prediction: eps = sqrt(a) v + sqrt(1-a) x
        eps_from_x, eps_from_out = (1 - a).sqrt(), a.sqrt()
    variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    std = eta * variance.sqrt()
    coeffs = dict(
        x0_from_x=x0_from_x,
        x0_from_out=x0_from_out,
        eps_from_x=eps_from_x,
        eps_from_out=eps_from_out,
        sqrt_alpha_prev=a_prev.sqrt(),
        direction=(1 - a_prev - std**2).sqrt(),
        std=std,
    )
    return DDIMSchedule(timesteps=ts, eta=float(eta), **{k: v.float() for k, v in coeffs.items()})


def ddim_step(
    x: Tensor,
    model_output: Tensor,
    schedule: DDIMSchedule,
    index: int | Tensor,
    noise: Tensor | None = None,
) -> Tensor:
    """One DDIM step: (B, C, H, W) latents at t -> latents at the previous timestep.
    noise (standard normal like x) is needed when the schedule's eta > 0."""
    if noise is None and schedule.eta > 0:
        raise ValueError("ddim_step with eta > 0 needs noise")
    dtype = x.dtype
    x, out = x.to(_compute_dtype(x)), model_output.to(_compute_dtype(x))
    x0 = _at(schedule.x0_from_x, index, x) * x + _at(schedule.x0_from_out, index, x) * out
    eps = _at(schedule.eps_from_x, index, x) * x + _at(schedule.eps_from_out, index, x) * out
    x_prev = _at(schedule.sqrt_alpha_prev, index, x) * x0 + _at(schedule.direction, index, x) * eps
    if noise is not None:
        x_prev = x_prev + _at(schedule.std, index, x) * noise.to(x.dtype)
    return x_prev.to(dtype)


def sample_ddim(
    eps_model: EpsModel,
    x: Tensor,
    schedule: DDIMSchedule,
    noises: Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DDIM sampling. x: (B, C, H, W) latents noised to timesteps[0]. noises (S tensors
    like x) or a generator only when eta > 0. Returns denoised latents (B, C, H, W)."""
    for i in range(len(schedule.timesteps)):
        t = schedule.timesteps[i].expand(x.shape[0])  # (B,)
        noise = _draw(noises, i, x, generator) if schedule.eta > 0 else None
        x = ddim_step(x, eps_model(x, t), schedule, i, noise)
    return x


# --- flow bridge (the demo model) ----------------------------------------------------


def bridge_step(z: Tensor, v: Tensor, t_from: float | Tensor, t_to: float | Tensor) -> Tensor:
    """One Euler step of dz/dt = v: z + (t_to - t_from) * v.

    z, v: (B, C, H, W); t_from, t_to: floats or (B,) tensors (one time per row, for a
    stream batch whose rows sit at different times). Stepped in at least fp32,
    returned in z's dtype."""
    dtype = z.dtype
    dt = torch.as_tensor(t_to, device=z.device) - torch.as_tensor(t_from, device=z.device)
    dt = dt.to(_compute_dtype(z))
    return (z.to(dt.dtype) + _rows(dt, z) * v.to(dt.dtype)).to(dtype)


def sample_bridge(
    velocity_model: Callable[[Tensor, Tensor], Tensor],
    z0: Tensor,
    strength: float | Tensor,
    steps: int,
) -> Tensor:
    """Carry latents z0 part of the way along a learned flow bridge, by Euler steps.

    The demo model is a rectified flow (Liu et al. 2022, "Flow Straight and Fast",
    arXiv:2209.03003) used as an image-to-image bridge rather than from noise: its
    velocity field moves the latent of a frame (t = 0) straight towards the latent of
    the stylised frame (t = 1), trained by flow matching (Lipman et al. 2022,
    arXiv:2210.02747) on pairs, as I2SB bridges two image distributions (Liu et al.
    2023, arXiv:2302.05872) but deterministic. Stopping at t = strength gives a
    partial restyle: 0 is the input, 1 the full style.

    velocity_model(z, t_model) -> v: z (B, C, H, W), t_model (B,) float = t * 1000
        (the U-Net's timestep units), v (B, C, H, W).
    z0: (B, C, H, W) latents of the input frames.
    strength: a float in [0, 1], or a (B,) tensor (one per row; not range-checked, to
        avoid a host sync).
    steps: number of equal Euler steps from 0 to strength (1 for the demo model).
    Returns (B, C, H, W) latents at t = strength, in z0's dtype; z0 itself for strength 0.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sample_bridge: steps must be an int >= 1, got {steps!r}")
    B = z0.shape[0]
    if isinstance(strength, Tensor):
        if strength.shape != (B,):
            raise ValueError(f"sample_bridge: a strength tensor must have shape ({B},), got {tuple(strength.shape)}")
        end = strength.to(device=z0.device, dtype=torch.float32)
    else:
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"sample_bridge: strength must be in [0, 1], got {strength}")
        if strength == 0:
            return z0
        end = torch.full((B,), float(strength), device=z0.device)
    dt = end / steps  # (B,)
    z = z0
    for i in range(steps):
        t = dt * i  # (B,)
        v = velocity_model(z, t * 1000)
        z = bridge_step(z, v, t, t + dt)
    return z
