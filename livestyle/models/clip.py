"""CLIP text encoder (the text tower of CLIP), as Stable Diffusion 1.x/2.x/XL use it.

token ids (B, L) -> token embedding + learned position embedding
  -> num_layers x pre-LN transformer block (causal self-attention, MLP)
  -> final LayerNorm -> (B, L, D) context for the U-Net's cross-attention.
  (with a projection) final state at the end-of-text token -> text_projection -> (B, P)

Parameter names equal `transformers.CLIPTextModel`'s (and, with `projection_dim`,
`CLIPTextModelWithProjection`'s), so a diffusers `text_encoder/` state dict loads with
strict=True. SD 1.x is OpenAI ViT-L/14 (768-d, 12 layers, quick_gelu); SD 2.x is
OpenCLIP ViT-H/14 run to its penultimate layer (1024-d, 23 of 24 layers, gelu;
convert_clip.py drops the last block). SDXL runs two: ViT-L/14 and OpenCLIP ViT-bigG/14
(1280-d, 32 layers, gelu, 1280-d projection), each to its penultimate layer without
the final LayerNorm, plus bigG's pooled projection (`encode_with_pooled`).
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
    projection_dim: int | None = None  # CLIPTextModelWithProjection's text_projection (SDXL's second encoder)

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise CheckpointError(f"text encoder hidden_act {self.hidden_act!r} is not one of {ACTIVATIONS}")
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(f"text encoder hidden_size {self.hidden_size} is not divisible by "
                                  f"num_attention_heads {self.num_attention_heads}")

    @classmethod
    def from_transformers(cls, cfg: dict, with_projection: bool = False) -> TextEncoderConfig:
        """From a transformers CLIPTextConfig dict (a diffusers `text_encoder/config.json`).

        Shape fields are required; hidden_act and layer_norm_eps default like transformers.
        with_projection: a CLIPTextModelWithProjection (its weights hold `text_projection`);
        its projection_dim is then required. CLIPTextConfig always lists a projection_dim,
        so the config alone cannot say whether the model has one.
        """
        if with_projection and "projection_dim" not in cfg:
            raise CheckpointError("text encoder config lacks projection_dim (its weights hold a text_projection)")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "max_position_embeddings")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise CheckpointError(f"text encoder config lacks {missing}")
        optional = {k: cfg[k] for k in ("hidden_act", "layer_norm_eps") if k in cfg}
        projection = {"projection_dim": cfg["projection_dim"]} if with_projection else {}
        return cls(**{k: cfg[k] for k in required}, **optional, **projection)


# The text encoders of SD 1.x, SD 2.x and SDXL checkpoints (SDXL's first is SD1_TEXT).
SD1_TEXT = TextEncoderConfig()
SD2_TEXT = TextEncoderConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                             num_attention_heads=16, hidden_act="gelu")
SDXL_TEXT_2 = TextEncoderConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                num_attention_heads=20, hidden_act="gelu", projection_dim=1280)


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
    """CLIP text encoder with transformers.CLIPTextModel's parameter names
    (CLIPTextModelWithProjection's when config.projection_dim is set).

    forward(input_ids, skip_layers, final_norm):
        input_ids: (B, L) long token ids, L <= max_position_embeddings (77 for SD).
        skip_layers: how many of the last layers to leave out. 0 = transformers'
            last_hidden_state; 1 = A1111's "CLIP skip 2" = diffusers' `clip_skip=1`
            (hidden_states[-2] + final LN).
        final_norm: apply the final LayerNorm (SD 1.x/2.x do); SDXL conditions on
            hidden_states[-2] as it is (final_norm=False, skip_layers=1).
        returns (B, L, hidden_size) float, in the parameters' dtype.
    """

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.text_model = TextTransformer(cfg)
        P = cfg.projection_dim
        self.text_projection = nn.Linear(cfg.hidden_size, P, bias=False) if P else None

    def forward(self, input_ids: torch.Tensor, skip_layers: int = 0, final_norm: bool = True) -> torch.Tensor:
        x = self._run(input_ids, len(self.text_model.encoder.layers) - skip_layers)
        return self.text_model.final_layer_norm(x) if final_norm else x

    def encode_with_pooled(self, input_ids: torch.Tensor, skip_layers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's use of its second encoder, in one pass: (hidden, pooled).

        hidden: (B, L, hidden_size), the state `skip_layers` before the end without the
            final LayerNorm (diffusers: hidden_states[-(skip_layers + 1)]).
        pooled: (B, projection_dim), the final LayerNorm's output at the end-of-text
            token through text_projection (CLIPTextModelWithProjection's text_embeds;
            (B, hidden_size) unprojected without a projection). The end-of-text token
            is found as the highest id: CLIP's is the last of its vocabulary, and
            open_clip and SDXL's configs (eos_token_id 2) pool there the same way.
        """
        layers = self.text_model.encoder.layers
        keep = len(layers) - skip_layers
        x = self._run(input_ids, keep)
        hidden = x
        for layer in layers[keep:]:
            x = layer(x)
        x = self.text_model.final_layer_norm(x)
        # (B, L, D) -> (B, D): each row's state at its end-of-text position
        pooled = x[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return hidden, pooled

    def _run(self, input_ids: torch.Tensor, num_layers: int) -> torch.Tensor:
        """Embeddings and the first num_layers blocks, no final LayerNorm: (B, L, hidden_size)."""
        layers = self.text_model.encoder.layers
        if not 0 < num_layers <= len(layers):
            raise ValueError(f"skip_layers must be in [0, {len(layers) - 1}], got {len(layers) - num_layers}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens, more than "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        x = self.text_model.embeddings(input_ids)
        for layer in layers[:num_layers]:
            x = layer(x)
        return x
