"""Classifier-free guidance for a stream, chosen once per settings change.

Each kind says which extra rows the U-Net call needs and how the outputs combine:

    none        no extra rows; the conditional output as is.
    full        one unconditional (negative prompt) row per row: the batch doubles
                (Ho & Salimans 2022): out = u + scale * (c - u).
    self        StreamDiffusion's residual CFG, self-negative (Kodaira et al. 2023,
                arXiv:2312.12491, sec. 3.3): no extra rows; the unconditional output is
                the "virtual residual noise" that would denoise each row back to its own
                input latent, so guidance pushes away from the input frame.
    initialize  StreamDiffusion's onetime-negative RCFG: one negative-prompt row for the
                frame entering at step 0; its clean estimate becomes the frame's
                reference, and later steps take their virtual residual noise from it.

The guidance mix is linear in the model output, so it works the same for epsilon, v
and the demo model's velocity. Residual kinds need a noise model (the LCM plan).
"""

from __future__ import annotations

from torch import Tensor

from livestyle.config import SettingsError
from livestyle.stream.plan import Plan


class NoGuidance:
    needs_negative = False  # whether rows conditioned on the negative prompt are added

    def __init__(self, scale: float):
        self.scale = scale

    def rows(self, x: Tensor, fresh: bool) -> int:
        """How many unconditional rows to add after the n conditional ones."""
        return 0

    def combine(self, plan: Plan, x: Tensor, out: Tensor, index: Tensor, reference: Tensor, fresh: bool) -> Tensor:
        """out: (n + extra, C, h, w) U-Net outputs -> (n, C, h, w) guided outputs.
        reference: (n, C, h, w) each row's reference latent, updated in place where set here."""
        return out


class FullGuidance(NoGuidance):
    needs_negative = True

    def rows(self, x: Tensor, fresh: bool) -> int:
        return x.shape[0]

    def combine(self, plan, x, out, index, reference, fresh):
        n = x.shape[0]
        cond, uncond = out[:n], out[n:]
        return uncond + self.scale * (cond - uncond)


class SelfGuidance(NoGuidance):
    def combine(self, plan, x, out, index, reference, fresh):
        uncond = plan.output_for_x0(x, reference, index)
        return uncond + self.scale * (out - uncond)


class InitializeGuidance(NoGuidance):
    needs_negative = True

    def rows(self, x: Tensor, fresh: bool) -> int:
        return 1 if fresh else 0

    def combine(self, plan, x, out, index, reference, fresh):
        n = x.shape[0]
        if fresh:  # row 0 entered at step 0: its negative-prompt estimate is its reference from now on
            reference[0] = plan.x0(x[:1], out[n:], index[:1])[0].to(reference.dtype)
        uncond = plan.output_for_x0(x, reference, index)
        return uncond + self.scale * (out[:n] - uncond)


def make_guidance(kind: str, scale: float, plan: Plan) -> NoGuidance:
    """The guidance object for StreamSettings.guidance / guidance_scale."""
    if kind in ("self", "initialize") and not plan.residual_guidance:
        raise SettingsError(f"guidance = {kind!r} (residual CFG) needs a noise-prediction model; "
                            "the demo model takes 'none' or 'full'")
    if kind == "none" or scale == 1.0:
        return NoGuidance(scale)
    return {"full": FullGuidance, "self": SelfGuidance, "initialize": InitializeGuidance}[kind](scale)
