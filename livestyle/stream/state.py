"""One stream's state: everything about it the engine keeps between frames, in one object.

    tags       S x Tag|None  host-side facts of each slot's frame (pts, timing, grey copy):
                             the stream batch, slot k holding a frame at denoising step k (slot
                             0 filled by the frame entering on each call); the frames' latents,
                             references and control images wait in the stream's bucket rows
    noise      (S, C, h, w)  the stream's fixed noise, by seed: noise[0] starts a frame,
                             renoise[k] re-noises after step k
    table      (K, S) fp32   each slot's coefficients for the fixed-shape step (step.py),
                             ControlNet scales included
    cond, uncond             the prompt's and the negative's Condition (context, SDXL's pooled)
    time_ids   (1, 6) fp32   SDXL's size conditioning at the processing size, else None
    place      (bucket, first row): the stream's S rows in a step.Bucket (its slots' frames
                             and temporal rings live there), set by the engine
    previous   the last output frame's latent, image and tag (flow-guided propagation)

Device buffers are allocated once, from the settings, and replaced only when a live
update changes their shapes. Nothing here is shared with another stream but the
bucket's buffers, of which the stream's rows are its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import torch

from livestyle.config import StreamSettings
from livestyle.models.unet import UNet
from livestyle.stream import control
from livestyle.stream.conditioning import Condition
from livestyle.stream.flow import FlowEstimator, Motion
from livestyle.stream.guidance import NoGuidance
from livestyle.stream.plan import Plan
from livestyle.stream.samplers import guidance_scale_embedding
from livestyle.stream.similarity import SimilarityFilter
from livestyle.stream.step import CONTROL, Bucket, coefficients


@dataclass(eq=False)
class Tag:
    """A frame on its way through the engine (host side, but for `frame`).

    size: the input frame's (width, height), the output's size; grey: its small grey
    copy (flow, similarity). emit: False for the stand-in copies that prime or drain
    the stream batch. repeats: later frames that get this frame's output with their own
    timestamps, in order: frames the similarity filter skipped, and frames that failed
    while this one was in flight (`failed`: counted as errors, not outputs).
    motion: (the frame before, the motion from it, its warp inputs by (w, h): see
    flow.warp_inputs), computed once, by submit() or else the worker; dropped once this
    frame is output or dropped, or every frame would keep the one before it alive.
    edges: uint8 (H, W) Canny edges of the processing-size frame for a "canny" ControlNet,
    made by submit() (host work off the worker); dropped once its control images are made.
    frame: the processing-size frame on the device, (1, 3, H, W) in [0, 1], for an
    autoencoder whose decoder reads it (LiteAutoencoder.guided), from when the frame
    enters the stream batch until it is decoded (the one device tensor a tag holds).
    """

    pts: int | None
    time_base: Fraction | None
    size: tuple[int, int]
    submitted_at: float
    grey: np.ndarray
    emit: bool = True
    emitted: bool = False
    failed: bool = False
    repeats: list[Tag] = field(default_factory=list)
    motion: tuple[Tag, Motion, dict] | None = None
    edges: np.ndarray | None = None
    frame: torch.Tensor | None = None

    def echo(self) -> Tag:
        return Tag(self.pts, self.time_base, self.size, self.submitted_at, self.grey, emit=False)


def layout(settings: StreamSettings, steps: int) -> tuple:
    """The settings that fix the shapes of a stream's buffers: changing one means new buffers."""
    return (settings.size, steps, settings.stream_batch, settings.temporal.attention_frames,
            settings.temporal.fusion, settings.guidance, settings.seed)


class StreamState:
    def __init__(self, settings: StreamSettings, plan: Plan, guidance: NoGuidance, cond: Condition,
                 uncond: Condition | None, unet: UNet, latent_channels: int, device: torch.device,
                 dtype: torch.dtype, time_ids: torch.Tensor | None = None):
        w, h = settings.size
        S = plan.steps
        self.settings, self.plan, self.guidance = settings, plan, guidance
        self.cond, self.uncond, self.time_ids = cond, uncond, time_ids
        self.layout = layout(settings, S)
        shape = (S, latent_channels, h // 8, w // 8)
        self.tags: list[Tag | None] = [None] * S
        generator = torch.Generator().manual_seed(settings.seed)  # CPU draws: the same noise on every device
        self.noise = torch.randn(shape, generator=generator).to(device, dtype)
        self.renoise = torch.cat([self.noise[1:], self.noise[:1]])  # row k re-noises towards step k + 1
        self.table = _table(settings, plan, guidance)
        self.place: tuple[Bucket, int] | None = None
        self.timestep_cond = None
        if unet.config.time_cond_proj_dim:  # full LCM checkpoints take the guidance scale as an input
            w_embed = torch.tensor([settings.guidance_scale - 1.0])
            self.timestep_cond = guidance_scale_embedding(w_embed, unet.config.time_cond_proj_dim).to(device, dtype)
        self.flow = FlowEstimator()
        self.similar = self._similarity_filter(settings)
        # The last output frame: flow-guided propagation warps these along the motion.
        self.previous_latent: torch.Tensor | None = None  # (1, C, h, w)
        self.previous_image: torch.Tensor | None = None  # (1, 3, H, W) in [0, 1]
        self.previous_tag: Tag | None = None
        self.last_output: np.ndarray | None = None  # uint8 (H, W, 3) as emitted, for skipped frames
        self.newest: Tag | None = None  # the newest frame the model took
        self.last_z0: torch.Tensor | None = None  # its input latent, to drain the stream batch
        self.last_images: tuple[torch.Tensor, ...] = ()  # and its control images (1, 3, H, W) each

    @staticmethod
    def _similarity_filter(settings: StreamSettings) -> SimilarityFilter | None:
        threshold = settings.temporal.similarity
        return SimilarityFilter(threshold, settings.seed) if threshold > 0 else None

    @property
    def steps(self) -> int:
        return len(self.tags)

    @property
    def primed(self) -> bool:
        """Every stream-batch slot past 0 holds a frame: one batched call finishes a frame."""
        return all(t is not None for t in self.tags[1:])

    def owed(self) -> list[Tag]:
        """The frames in the stream batch still owed an output, oldest first."""
        return [t for t in reversed(self.tags[1:]) if t is not None and t.emit and not t.emitted]

    @property
    def in_flight(self) -> bool:
        return bool(self.owed())

    def retune(self, settings: StreamSettings, plan: Plan, guidance: NoGuidance, cond: Condition,
               uncond: Condition | None) -> None:
        """A live update that keeps the buffers' shapes: new coefficients, contexts, switches."""
        if settings.temporal.similarity != self.settings.temporal.similarity:
            self.similar = self._similarity_filter(settings)
        self.settings, self.plan, self.guidance, self.cond, self.uncond = settings, plan, guidance, cond, uncond
        self.table = _table(settings, plan, guidance)

    def carry_over(self, old: StreamState) -> None:
        """Keep the previous output across a rebuild of the same size, so the look does not jump."""
        if old.settings.size == self.settings.size:
            self.previous_latent, self.previous_image = old.previous_latent, old.previous_image
            self.previous_tag, self.last_output, self.newest = old.previous_tag, old.last_output, old.newest

    def reset(self) -> None:
        """Forget the past (a scene cut): temporal cache, propagation, similarity; in-flight
        frames stay and are finished."""
        if self.place is not None:
            bucket, start = self.place
            bucket.reset(start, start + self.steps)
        self.previous_latent = self.previous_image = self.previous_tag = None
        if self.similar is not None:
            self.similar.reset()


def _table(settings: StreamSettings, plan: Plan, guidance: NoGuidance) -> np.ndarray:
    """(K, S): the slots' coefficients, with each ControlNet's scale at the slot's step."""
    table = coefficients(plan, guidance)
    table[CONTROL:CONTROL + len(settings.controls)] = control.scales(settings.controls, plan.steps)
    return table
