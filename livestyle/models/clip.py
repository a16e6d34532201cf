"""CLIP text encoder (the text tower of CLIP), as Stable Diffusion 1.x/2.x use it.

token ids (B, L) -> token embedding + learned position embedding
  -> num_layers x pre-LN transformer block (causal self-attention, MLP)
  -> final LayerNorm -> (B, L, D) context for the U-Net's cross-attention.

Parameter names equal `transformers.CLIPTextModel`'s, so a diffusers `text_encoder/`
state dict loads with strict=True. SD 1.x is OpenAI ViT-L/14 (768-d, 12 layers,
quick_gelu); SD 2.x is OpenCLIP ViT-H/14 run to its penultimate layer (1024-d, 23 of
24 layers, gelu; convert_clip.py drops the last block). No pooled output or text
projection: SD 1.x/2.x condition on the per-token states only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from livestyle.errors import CheckpointError

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class TextEncoderConfig:
    """Shape of a CLIP text encoder; field names follow transformers' CLIPTextConfig."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP, SD 1.x) or "gelu" (OpenCLIP, SD 2.x)
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise CheckpointError(f"text encoder hidden_act {self.hidden_act!r} is not one of {ACTIVATIONS}")
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(f"text encoder hidden_size {self.hidden_size} is not divisible by "
                                  f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_transformers(cls, cfg: dict) -> TextEncoderConfig:
        """From a transformers CLIPTextConfig dict (a diffusers `text_encoder/config.json`).

        Shape fields are required; hidden_act and layer_norm_eps default like transformers.
        """
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "max_position_embeddings")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise CheckpointError(f"text encoder config lacks {missing}")
        optional = {k: cfg[k] for k in ("hidden_act", "layer_norm_eps") if k in cfg}
        return cls(**{k: cfg[k] for k in required}, **optional)


# The two text encoders of SD 1.x and SD 2.x checkpoints.
SD1_TEXT = TextEncoderConfig()
SD2_TEXT = TextEncoderConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                             num_attention_heads=16, hidden_act="gelu")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        # Some checkpoints (older transformers) store a `position_ids` buffer, a few of
        # them with corrupt float values. We keep no such buffer (positions are always
        # 0..L-1) and drop the key when loading, so strict loading works either way.
        # (The private name: the public register_load_state_dict_pre_hook is torch >= 2.5.)
        self._register_load_state_dict_pre_hook(_drop_position_ids, with_module=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:L]


def _drop_position_ids(module, state_dict, prefix, *args) -> None:
    state_dict.pop(prefix + "position_ids", None)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention: each token sees itself and earlier tokens."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        D = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out_proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        H = self.num_heads
        # (B, L, D) -> (B, H, L, D/H)
        q = self.q_proj(x).view(B, L, H, D // H).transpose(1, 2)
        k = self.k_proj(x).view(B, L, H, D // H).transpose(1, 2)
        v = self.v_proj(x).view(B, L, H, D // H).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # (B, H, L, D/H) -> (B, L, D)
        y = y.transpose(1, 2).reshape(B, L, D)
        return self.out_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class TextEncoder(nn.Module):
    """CLIP text encoder with transformers.CLIPTextModel's parameter names.

    forward(input_ids, skip_layers):
        input_ids: (B, L) long token ids, L <= max_position_embeddings (77 for SD).
        skip_layers: how many of the last layers to leave out; the final LayerNorm is
            applied either way. 0 = transformers' last_hidden_state; 1 = A1111's
            "CLIP skip 2" = diffusers' `clip_skip=1` (hidden_states[-2] + final LN).
        returns (B, L, hidden_size) float, in the parameters' dtype.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.text_model = TextTransformer(cfg)

    def forward(self, input_ids: torch.Tensor, skip_layers: int = 0) -> torch.Tensor:
        layers = self.text_model.encoder.layers
        if not 0 <= skip_layers < len(layers):
            raise ValueError(f"skip_layers must be in [0, {len(layers) - 1}], got {skip_layers}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens, more than "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        x = self.text_model.embeddings(input_ids)
        for layer in layers[: len(layers) - skip_layers]:
            x = layer(x)
        return self.text_model.final_layer_norm(x)
