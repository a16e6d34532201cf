"""How one frame is denoised in S steps: the sampler as the stream engine drives it.

A plan is built once per settings change (never per frame) and holds the per-step
coefficients as (S,) tensors on the device. Rows of one batched U-Net call may sit at
different steps (StreamDiffusion's stream batch), so every method takes `index`, a
(B,) int64 tensor of step indices, one per row.

    start(z0, noise)                 latents of the input frames -> the state at step 0
    model_time(index)                (B,) timesteps to hand the U-Net
    step(x, out, index, noise)       -> (x_next, denoised): the state for step index + 1,
                                        and the frame's result if this was its last step
    x0(x, out, index)                the model's clean estimate (guidance mixes here)
    output_for_x0(x, x0, index)      the model output that would give that estimate

Two kinds, chosen from the checkpoint's prediction type:
- LCMPlan: SD-Turbo and SD 1.5 + LCM-LoRA, img2img by multistep consistency sampling
  (Luo et al. 2023) with the stream's fixed noise, as StreamDiffusion runs both.
  The previous output joins before noising (`prior_at_start`): it is a clean latent,
  like the input's.
- BridgePlan: the embedded demo model's deterministic flow bridge (samplers.sample_bridge).
  Its states are part-way between the input's latent and the styled one, so the
  previous output (a styled latent) can only join at the end, where the new frame's
  state is styled too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from livestyle.config import SettingsError, StreamSettings
from livestyle.models.loading import Pipeline
from livestyle.stream.samplers import (LCMSchedule, _rows, alphas_cumprod, bridge_step, lcm_schedule, lcm_step,
                                       lcm_timesteps)


@dataclass(frozen=True)
class BridgePlan:
    """Euler steps of the demo model's bridge from t=0 to t=strength. times: (S + 1,) fp32."""

    times: Tensor
    prior_at_start = False
    residual_guidance = False  # no noise, so no virtual residual noise (RCFG needs a noise model)

    @property
    def steps(self) -> int:
        return self.times.shape[0] - 1

    def start(self, z0: Tensor, noise: Tensor) -> Tensor:
        return z0

    def model_time(self, index: Tensor) -> Tensor:
        return self.times[index] * 1000  # the U-Net's timestep units

    def step(self, x: Tensor, out: Tensor, index: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        x_next = bridge_step(x, out, self.times[index], self.times[index + 1])
        return x_next, x_next


@dataclass(frozen=True)
class LCMPlan:
    """Multistep LCM img2img on `schedule.timesteps` (S,), descending."""

    schedule: LCMSchedule
    prior_at_start = True
    residual_guidance = True

    @property
    def steps(self) -> int:
        return self.schedule.timesteps.shape[0]

    def start(self, z0: Tensor, noise: Tensor) -> Tensor:
        """Forward diffusion of the input latents to the first timestep."""
        s = self.schedule
        return (s.sqrt_alpha[0] * z0.float() + s.sqrt_one_minus_alpha[0] * noise.float()).to(z0.dtype)

    def model_time(self, index: Tensor) -> Tensor:
        return self.schedule.timesteps[index]

    def step(self, x: Tensor, out: Tensor, index: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        return lcm_step(x, out, self.schedule, index, noise)

    def x0(self, x: Tensor, out: Tensor, index: Tensor) -> Tensor:
        s = self.schedule
        return _rows(s.x0_from_x[index], x) * x.float() + _rows(s.x0_from_out[index], x) * out.float()

    def output_for_x0(self, x: Tensor, x0: Tensor, index: Tensor) -> Tensor:
        """The model output (epsilon or v) whose clean estimate at x is x0: the
        'virtual residual noise' of StreamDiffusion's RCFG, in the model's own units."""
        s = self.schedule
        return ((x0.float() - _rows(s.x0_from_x[index], x) * x.float()) / _rows(s.x0_from_out[index], x)).to(x.dtype)


Plan = BridgePlan | LCMPlan


def make_plan(pipe: Pipeline, settings: StreamSettings, device: torch.device | str) -> Plan:
    """The plan for a pipeline's prediction type and the settings' strength/steps/timesteps."""
    kind = pipe.schedule.prediction_type
    if kind == "flow_velocity":
        if settings.timesteps:
            raise SettingsError("timesteps: the demo model takes strength and steps, not a timestep list")
        times = torch.linspace(0.0, settings.strength, settings.steps + 1, dtype=torch.float32)
        return BridgePlan(times.to(device))
    if settings.timesteps:
        timesteps = list(settings.timesteps)
    else:
        if settings.strength * 50 < settings.steps:
            raise SettingsError(f"strength = {settings.strength} is too low for {settings.steps} steps "
                                f"(it keeps {int(settings.strength * 50)} of LCM's 50 timesteps)")
        timesteps = lcm_timesteps(settings.steps, strength=settings.strength)
    ac = alphas_cumprod(pipe.schedule.num_train_timesteps, pipe.schedule.beta_start, pipe.schedule.beta_end,
                        pipe.schedule.beta_schedule)
    return LCMPlan(lcm_schedule(timesteps, ac, kind).to(device))
