"""livestyle's own model runtime: SD-compatible U-Net, autoencoders, CLIP text, LoRA, loading.

No diffusers or transformers at run time: they are the parity oracles in the tests.
"""

from livestyle.models.clip import TextEncoder, TextEncoderConfig
from livestyle.models.controlnet import ControlNet, ControlNetConfig, ControlSettings, MultiControlNet
from livestyle.models.demo import DEMO_MODEL, demo_unet_config, load_demo, save_demo_model
from livestyle.models.lite_autoencoder import LiteAutoencoder, LiteAutoencoderConfig
from livestyle.models.loading import (
    NoiseSchedule, Pipeline, TextModel, load_autoencoder, load_controlnet, load_pipeline, load_sdxl_text_encoders,
    load_text_encoder, load_unet,
)
from livestyle.models.lora import fuse_lora, fuse_loras
from livestyle.models.prompt import (
    PromptCache, SDXLPrompt, SDXLPromptCache, encode_prompt, encode_prompt_sdxl, parse_weights,
)
from livestyle.models.styles import StyleBank
from livestyle.models.taesd import TinyAutoencoder
from livestyle.models.temporal import TemporalCache
from livestyle.models.tokenizer import Tokenizer
from livestyle.models.unet import UNet, UNetConfig
from livestyle.models.vae import KLAutoencoder, KLAutoencoderConfig

__all__ = [
    "ControlNet", "ControlNetConfig", "ControlSettings", "DEMO_MODEL", "KLAutoencoder", "KLAutoencoderConfig",
    "LiteAutoencoder", "LiteAutoencoderConfig", "MultiControlNet", "NoiseSchedule", "Pipeline", "PromptCache",
    "SDXLPrompt", "SDXLPromptCache", "StyleBank", "TemporalCache", "TextEncoder", "TextEncoderConfig",
    "TextModel", "TinyAutoencoder", "Tokenizer", "UNet", "UNetConfig", "demo_unet_config", "encode_prompt",
    "encode_prompt_sdxl", "fuse_lora", "fuse_loras", "load_autoencoder", "load_controlnet", "load_demo",
    "load_pipeline", "load_sdxl_text_encoders", "load_text_encoder", "load_unet", "parse_weights",
    "save_demo_model",
]
