"""Tiny random SD-class pipelines built from livestyle's own modules (no files), for engine tests."""

from pathlib import Path

import torch

from livestyle.models.clip import TextEncoder, TextEncoderConfig
from livestyle.models.loading import NoiseSchedule, Pipeline, TextModel
from livestyle.models.taesd import TinyAutoencoder
from livestyle.models.tokenizer import Tokenizer
from livestyle.models.unet import UNet, UNetConfig
from random_weights import perturb


def tiny_sd_pipeline(prediction_type: str = "epsilon", time_cond_proj_dim: int | None = None) -> Pipeline:
    """An SD 1.x-shaped pipeline: 2-level U-Net with self-attention, TAESD, a 1-layer CLIP."""
    torch.manual_seed(0)
    unet = perturb(UNet(UNetConfig(block_out_channels=(32, 64), layers_per_block=1, attention_levels=(True, True),
                                   num_heads=(2, 4), cross_attention_dim=32, norm_num_groups=8,
                                   time_cond_proj_dim=time_cond_proj_dim)), 1)
    autoencoder = perturb(TinyAutoencoder(4), 2, scale=0.02)
    text = perturb(TextEncoder(TextEncoderConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=4)), 3)
    for module in (unet, autoencoder, text):
        module.eval().requires_grad_(False)
    return Pipeline("sd1", unet, autoencoder, TextModel(text, Tokenizer.bundled()),
                    NoiseSchedule(prediction_type=prediction_type), Path("tiny-sd"))
