"""The fixed-shape step: one U-Net call over a bucket of streams, as a function of preallocated state.

gpt-fast's static caches and k-diffusion's "a step returns new state", for the stream
engine: every stream whose rows can share a U-Net call (same latent size, guidance rows,
context shape, time-cond input, temporal ring length and fusion, SDXL's added
conditioning, ControlNets: a `BucketKey`) has rows
in one `Bucket`, whose buffers have a fixed row count R. A stream holds S rows (one per
denoising slot) for as long as it keeps its settings' shapes; rows a call does not step
(another stream's with no frame now, unused rows) are padding: output ignored, nothing
stored in their rings, nothing moved. So the shapes the U-Net sees change only when a bucket
grows, and a compiled or captured step is reused frame after frame, through live
updates that keep shapes and streams that join or leave.

A stream's S rows are its denoising slots: row start + k holds the frame at step k (the
stream batch's slot k), and a frame in flight stays in the bucket between calls. A
call's inputs, in the bucket's buffers:

    x          (R, C, h, w)   each row's latent at its step
    reference  (R, C, h, w)   residual-CFG reference latents
    images     N x (R, c, H, W)  each ControlNet's image of the row's frame (H, W: 8x the
                              latent's, the processing size), for N nets
    noise      (R, C, h, w)   the noise that re-noises each row towards its next step (by seed)
    context    (G*R, L, D)    positive prompts, then (G = 2) the negative ones
    coeffs     (K, R) fp32    per row: model time, guidance weights, sampler coefficients,
                              each ControlNet's scale at the row's step (0: not acting)
    time_cond  (G*R, P)       full LCM checkpoints' guidance-scale embedding, else None
    rings      TemporalRings  R rows, or None (no temporal cache), with `active`, the rows stepped
    text_embeds (G*R, E)      SDXL's pooled prompt embeddings (positive, then negative), else None
    time_ids   (G*R, 6) fp32  SDXL's size conditioning (uncropped, the processing size), else None

`Bucket.load` writes only what is new: a frame entering slot 0, and per-row conditions.
After the call, `Bucket.advance` moves each stepped row's x_next, reference and images
to the row after it (coefficient MOVE), where its frame's next step is: the bucket, not
the engine, carries frames from slot to slot, for every stream in one masked copy.

`denoise(...)` -> (x_next, denoised, reference), each (R, C, h, w). Guidance is one linear
mix per row (guidance.py's kinds as weights: none wc = 1; full wc = s, wu = 1 - s;
residual wc = s and the virtual residual noise through wr, wx), the sampler one
`kernels.sampler_step` with per-row (a, b, c, d). ControlNets see the same rows as the
U-Net, guidance rows with the same image as their positive row (diffusers without guess
mode), and their residuals are scaled per row, so a scale change is a new table, not a
new shape. Nothing in it reads back to the host.

Bucket sizes (rows R): powers of two, at least the engine's `bucket_rows` (default 1):
a single stream of S steps runs at R = S with no padding (the common GPU case), a
joining stream fits in the free rows or doubles R (one new shape, at most log2 of them),
and padding never exceeds the rows in use. Eager (not compiled, not captured), a call
runs only the span of rows it steps: shapes may change there, and padding would cost
model time for nothing. With G = 2 (full guidance, or "initialize")
the call is 2R rows; "initialize" then computes negative rows for every slot, not only
the fresh one (R wasted rows, kept so that its shapes are fixed too).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from livestyle import kernels
from livestyle.config import MAX_CONTROLS
from livestyle.models.controlnet import MultiControlNet
from livestyle.models.temporal import TemporalRings
from livestyle.models.unet import UNet
from livestyle.stream.guidance import FullGuidance, InitializeGuidance, NoGuidance, SelfGuidance
from livestyle.stream.plan import BridgePlan, Plan

# Rows of the (K, R) coefficient table; MOVE: the row takes the state of the row before it
# after the call (its frame moves on a slot); CONTROL + i: ControlNet i's scale.
T, WC, WU, WR, WX, A, B, C, D, FX, FO, RENEW, MOVE, CONTROL = range(14)
K = CONTROL + MAX_CONTROLS


def coefficients(plan: Plan, guidance: NoGuidance) -> np.ndarray:
    """(K, S) fp32: each denoising slot's row of the coefficient table (RENEW and MOVE are set
    per call).

    Sampler (kernels.sampler_step): denoised = a x + b g, x_next = c denoised + d noise;
    LCM: a = c_skip + c_out x0_from_x, b = c_out x0_from_out, c, d the re-noising to the
    next timestep; the demo's bridge: a = 1, b = dt, c = 1, d = 0. Guidance:
    g = wc out + wu out_negative + wr reference + wx x, with residual CFG's virtual
    residual noise (reference - x0_from_x x) / x0_from_out folded into wr and wx."""
    table = torch.zeros(K, plan.steps, dtype=torch.float32)
    if isinstance(plan, BridgePlan):
        times = plan.times.cpu()
        table[T] = times[:-1] * 1000  # as BridgePlan.model_time
        table[A], table[B], table[C] = 1.0, times[1:] - times[:-1], 1.0
    else:
        s = plan.schedule.to("cpu")
        table[T] = s.timesteps.float()
        table[A] = s.c_skip + s.c_out * s.x0_from_x
        table[B] = s.c_out * s.x0_from_out
        table[C], table[D] = s.sqrt_alpha_next, s.sqrt_one_minus_alpha_next
        table[FX], table[FO] = s.x0_from_x, s.x0_from_out
    scale = guidance.scale
    if isinstance(guidance, FullGuidance):
        table[WC], table[WU] = scale, 1.0 - scale
    elif isinstance(guidance, (SelfGuidance, InitializeGuidance)):
        # s out + (1 - s) (reference - fx x) / fo
        table[WC], table[WR], table[WX] = scale, (1.0 - scale) / table[FO], -(1.0 - scale) * table[FX] / table[FO]
    else:
        table[WC] = 1.0
    return table.numpy()


def denoise(unet: UNet, x: Tensor, reference: Tensor, noise: Tensor, context: Tensor, coeffs: Tensor,
            time_cond: Tensor | None, rings: TemporalRings | None, groups: int, text_embeds: Tensor | None = None,
            time_ids: Tensor | None = None, controlnet: MultiControlNet | None = None,
            images: tuple[Tensor, ...] = ()) -> tuple[Tensor, Tensor, Tensor]:
    """One U-Net call and sampler step for R rows (see the module docstring); pure but for
    the rings, which store the stepped rows' keys/values and advance. -> (x_next, denoised,
    reference) (R, C, h, w) in x's dtype."""
    R = x.shape[0]
    t = coeffs[T].repeat(groups)  # (G*R,)
    x_in = x if groups == 1 else x.repeat(groups, 1, 1, 1)  # (G*R, C, h, w)
    added = {} if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
    residuals = {}
    if controlnet is not None:
        # (R, c, H, W) -> (G*R, c, H, W): a guidance row sees its positive row's image;
        # scales (G*R,) from the table, so 0 (off, or outside start..end) keeps the shapes.
        down, mid = controlnet(x_in, t, context, [image.repeat(groups, 1, 1, 1) for image in images],
                               [coeffs[CONTROL + i].repeat(groups) for i in range(len(images))], **added)
        residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    out = unet(x_in, t, context, temporal=rings, timestep_cond=time_cond, **added, **residuals)

    def w(i: int) -> Tensor:
        return coeffs[i][:, None, None, None]  # (R, 1, 1, 1)

    xf = x.float()
    g = w(WC) * out[:R].float()
    if groups == 2:
        negative = out[R:].float()
        g = g + w(WU) * negative
        # "initialize": a fresh row's negative-prompt clean estimate becomes its reference
        renewed = w(FX) * xf + w(FO) * negative
        reference = torch.where(w(RENEW) > 0, renewed.to(reference.dtype), reference)
    g = g + w(WR) * reference.float() + w(WX) * xf
    x_next, denoised = kernels.sampler_step(x, g, noise, coeffs[A:D + 1])
    if rings is not None:
        rings.advance()  # the device half; the bucket counts on the host
    return x_next, denoised, reference


@dataclass(frozen=True)
class BucketKey:
    """What rows must share to be stepped by one call."""

    latent: tuple[int, int, int]  # (C, h, w)
    groups: int  # 1, or 2 with negative-prompt rows
    context: tuple[int, int]  # (tokens, width)
    time_cond: int  # the guidance-scale embedding's width, 0 without
    frames: int  # temporal ring length, 0 without
    fusion: float
    added: int = 0  # SDXL's pooled text width (text_embeds), 0 without added conditioning
    controls: tuple[tuple[str, str], ...] = ()  # the ControlNets, (resolved path, input) each, in order


@dataclass
class Part:
    """One stream's rows in a call, for Bucket.load: rows start + k for k in `slots`, of
    the stream's S = `steps` rows from `start`.

    fresh: the frame entering slot slots.start, (x (1, C, h, w) its start latent,
    reference (1, C, h, w), images: one (1, c, H, W) per ControlNet), or None when every
    row stepped holds its frame already. positive, negative: contexts (1, L, D) (negative
    None without guidance rows); pooled, negative_pooled (1, E) SDXL's text_embeds or
    None; time_cond (1, P) or None; time_ids (1, 6) or None; table (K, len(slots)) the
    stepped rows' coefficients."""

    start: int
    slots: range
    steps: int
    positive: Tensor
    negative: Tensor | None
    table: np.ndarray
    time_cond: Tensor | None = None
    pooled: Tensor | None = None
    negative_pooled: Tensor | None = None
    time_ids: Tensor | None = None
    fresh: tuple[Tensor, Tensor, tuple[Tensor, ...]] | None = None


class Bucket:
    """Preallocated buffers for R rows of one BucketKey, and which streams hold which rows.

    controlnet: the key's ControlNets as one MultiControlNet (None without)."""

    def __init__(self, key: BucketKey, rows: int, unet: UNet, device: torch.device, dtype: torch.dtype,
                 channels_last: bool = False, controlnet: MultiControlNet | None = None):
        self.key, self.unet, self.device, self.dtype = key, unet, device, dtype
        self.channels_last, self.controlnet = channels_last, controlnet
        self.held: dict[int, tuple[int, int]] = {}  # start -> (stop, owner id)
        self.rings: TemporalRings | None = None
        if key.frames:
            self.rings = TemporalRings(unet.self_attention_shapes(key.latent[1:]), rows, key.frames, device, dtype,
                                       key.fusion)
        self._allocate(rows)

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    def _allocate(self, rows: int) -> None:
        C, h, w = self.key.latent
        G = self.key.groups
        memory = torch.channels_last if self.channels_last else torch.contiguous_format
        zeros = lambda *shape, dtype=self.dtype: torch.zeros(*shape, device=self.device, dtype=dtype)  # noqa: E731
        self.x, self.reference, self.noise = (zeros(rows, C, h, w).to(memory_format=memory) for _ in range(3))
        self.context = zeros(G * rows, *self.key.context)
        self.time_cond = zeros(G * rows, self.key.time_cond) if self.key.time_cond else None
        self.text_embeds = zeros(G * rows, self.key.added) if self.key.added else None
        # fp32: sizes in pixels, which bf16 would round (1080 is not a bf16 number)
        self.time_ids = zeros(G * rows, 6, dtype=torch.float32) if self.key.added else None
        nets = self.controlnet.nets if self.controlnet is not None else []
        self.images = tuple(zeros(rows, net.config.conditioning_channels, h * net.config.image_scale,
                                  w * net.config.image_scale).to(memory_format=memory) for net in nets)
        self.coeffs = zeros(K, rows, dtype=torch.float32)
        # The host side of the coefficients, pinned on CUDA so its upload is asynchronous.
        self.staged = torch.zeros(K, rows, dtype=torch.float32, pin_memory=self.device.type == "cuda")
        self.graphs: dict = {}  # captured CUDA graphs of this bucket's buffers, by variant

    # -- rows -----------------------------------------------------------------------------

    def take(self, noise: Tensor, owner: int, smallest: int) -> int:
        """The start of n free contiguous rows for `owner`, whose re-noising noise (n, C, h, w)
        they keep; grows the bucket (a power of two, at least `smallest`) when none are free."""
        n = noise.shape[0]
        start = self._free(n)
        if start is None:
            used = max((stop for stop, _ in self.held.values()), default=0)
            rows = max(smallest, 1 << (used + n - 1).bit_length())
            self._grow(rows)
            start = self._free(n)
        self.held[start] = (start + n, owner)
        self.noise[start:start + n] = noise
        if self.rings is not None:
            self.rings.reset(start, start + n)
        return start

    def _free(self, n: int) -> int | None:
        start = 0
        for s in sorted(self.held):
            if s - start >= n:
                return start
            start = self.held[s][0]
        return start if self.rows - start >= n else None

    def _grow(self, rows: int) -> None:
        keep = self.rows
        if self.rings is not None:
            self.rings = self.rings.moved(rows, keep)
        held = (self.x, self.reference, self.noise, *self.images)  # the frames in flight go along
        self._allocate(rows)
        for new, old in zip((self.x, self.reference, self.noise, *self.images), held):
            new[:keep] = old

    def give_back(self, start: int) -> None:
        self.held.pop(start, None)

    def reset(self, start: int, stop: int) -> None:
        if self.rings is not None:
            self.rings.reset(start, stop)

    @property
    def empty(self) -> bool:
        return not self.held

    # -- one call --------------------------------------------------------------------------

    def load(self, parts: list[Part]) -> list[int]:
        """Write a call's new inputs (one Part per stream) into the buffers: fresh frames, the
        stepped rows' conditions and coefficients, and which rows take the state of the row
        before them after the call (MOVE). Returns the rows stepped (host side)."""
        R, G = self.rows, self.key.groups
        staged = self.staged.numpy()
        staged[:] = 0
        active = []
        for part in parts:
            first, n = part.start + part.slots.start, len(part.slots)
            rows, negative = slice(first, first + n), slice(R + first, R + first + n)
            if part.fresh is not None:
                x, reference, images = part.fresh
                self.x[first], self.reference[first] = x[0], reference[0]
                for buffer, image in zip(self.images, images, strict=True):
                    buffer[first] = image[0]
            self.context[rows] = part.positive
            if G == 2:
                self.context[negative] = part.negative
            # Conditions that are the same for a guidance row as for its positive row.
            for buffer, value in ((self.time_cond, part.time_cond), (self.time_ids, part.time_ids)):
                if buffer is not None:
                    buffer[rows] = value
                    if G == 2:
                        buffer[negative] = value
            if self.text_embeds is not None:
                self.text_embeds[rows] = part.pooled
                if G == 2:
                    self.text_embeds[negative] = part.negative_pooled
            staged[:, rows] = part.table
            # Each stepped slot but the last hands its frame to the next slot's row.
            staged[MOVE, part.start + part.slots.start + 1:part.start + min(part.slots.stop, part.steps - 1) + 1] = 1
            active += range(first, first + n)
        # From pinned memory: the copy is queued, the host goes on.
        self.coeffs.copy_(self.staged, non_blocking=True)
        if self.rings is not None:
            mask = torch.zeros(R, dtype=torch.bool)
            mask[active] = True
            self.rings.active.copy_(mask)
            self.rings.prepare(active)
        return active

    def advance(self, first: int, x_next: Tensor, reference: Tensor) -> None:
        """After a call over rows [first, first + n): each row marked MOVE takes the state of
        the row before it (x_next, reference, images), in one masked copy per buffer for
        every stream; the other rows keep theirs. No host sync."""
        n = x_next.shape[0]
        m = min(n, self.rows - first - 1)  # rows first + 1 .. first + m may take one
        if m <= 0:
            return
        move = self.coeffs[MOVE, first + 1:first + 1 + m][:, None, None, None] > 0  # (m, 1, 1, 1)
        images = tuple((buffer, buffer[first:first + m]) for buffer in self.images)
        for buffer, new in ((self.x, x_next[:m]), (self.reference, reference[:m]), *images):
            held = buffer[first + 1:first + 1 + m]
            held.copy_(torch.where(move, new, held))  # where() reads before the copy writes

    def inputs(self, rows: slice | None = None) -> tuple:
        """denoise's arguments: the whole bucket (fixed shapes: compiled, captured), or the
        rows [start, stop) an eager call steps (padding costs model time, and eager shapes
        are free to change)."""
        if rows is None or (rows.start, rows.stop) == (0, self.rows):
            return (self.unet, self.x, self.reference, self.noise, self.context, self.coeffs, self.time_cond,
                    self.rings, self.key.groups, self.text_embeds, self.time_ids, self.controlnet, self.images)
        R, (a, b) = self.rows, (rows.start, rows.stop)

        def grouped(t: Tensor | None) -> Tensor | None:  # (G*R, ...) -> (G*(b-a), ...)
            if t is None or self.key.groups == 1:
                return None if t is None else t[a:b]
            return torch.cat([t[a:b], t[R + a:R + b]])

        return (self.unet, self.x[a:b], self.reference[a:b], self.noise[a:b], grouped(self.context),
                self.coeffs[:, a:b], grouped(self.time_cond), self.rings.view(a, b) if self.rings else None,
                self.key.groups, grouped(self.text_embeds), grouped(self.time_ids), self.controlnet,
                tuple(image[a:b] for image in self.images))


class CapturedSteps:
    """CUDA graphs of a step, one per bucket buffers and attention variant (masked while a
    ring fills, unmasked once full), captured at first use and replayed after.

    Capture runs the step a few times on a side stream first (as torch.cuda.graphs asks):
    with no row active, so the rings store nothing and do not advance."""

    WARMUP = 3

    def __init__(self, step):
        self.step = step
        self.captures = 0

    def __call__(self, bucket: Bucket) -> tuple[Tensor, Tensor, Tensor]:
        variant = bucket.rings.masked if bucket.rings is not None else None
        if variant not in bucket.graphs:
            bucket.graphs[variant] = self._capture(bucket)
            self.captures += 1
        graph, outputs = bucket.graphs[variant]
        graph.replay()
        return outputs

    def _capture(self, bucket: Bucket):
        rings = bucket.rings
        active = rings.active.clone() if rings is not None else None
        if rings is not None:
            rings.active.zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                self.step(*bucket.inputs())
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.step(*bucket.inputs())
        if rings is not None:
            rings.active.copy_(active)
        return graph, outputs
