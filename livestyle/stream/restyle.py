"""Restyling frames with a flow-bridge model (the embedded demo model), one call per frame.

The reference path of the demo model: encode, integrate the bridge from t=0 to
t=strength in `steps` Euler steps with the U-Net's velocity, decode (a guided decoder
reading the frames too: LiteAutoencoder.guided). The streaming
engine (stream batch, similarity filter, flow-guided latents, many streams) builds on
these same pieces.
"""

from __future__ import annotations

import torch

from livestyle.models.loading import Pipeline, decode_frames
from livestyle.models.temporal import TemporalCache
from livestyle.stream.samplers import sample_bridge


@torch.inference_mode()
def restyle(pipe: Pipeline, images: torch.Tensor, context: torch.Tensor, strength: float = 1.0,
            steps: int = 1, temporal: TemporalCache | None = None) -> torch.Tensor:
    """images (B,3,H,W) in [0,1], H and W multiples of 8; context (B,T,D) style tokens.

    strength: 0 returns the input's own reconstruction, 1 the full style.
    temporal: the stream's cache of past frames' self-attention keys/values; advanced
    once per frame here, so consecutive calls are consecutive frames. Every step writes
    the frame's keys/values to the same ring slot, so with steps > 1 the later steps
    also see the earlier steps' entry for this frame, and the bank keeps the last
    step's (per-step banks are the streaming engine's job).
    Returns restyled images (B,3,H,W) in [0,1].
    """
    z0 = pipe.autoencoder.encode(images)
    z = sample_bridge(lambda z, t: pipe.unet(z, t, context, temporal=temporal), z0, strength, steps)
    if temporal is not None:
        temporal.advance()
    return decode_frames(pipe.autoencoder, z, images)
