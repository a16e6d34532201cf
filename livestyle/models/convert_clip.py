"""Text encoder weights from original single-file SD checkpoints -> our (transformers) layout.

The caller strips the `cond_stage_model.` prefix; what is left is one of:

SD 1.x (transformers CLIPTextModel, wrapped by ldm's FrozenCLIPEmbedder):
    transformer.text_model.embeddings.token_embedding.weight, ...
    (some files lack the `text_model.` level: transformer.embeddings..., transformer.encoder...)
SD 2.x (OpenCLIP ViT-H/14, wrapped by ldm's FrozenOpenCLIPEmbedder):
    model.token_embedding.weight                       (V, D)
    model.positional_embedding                         (77, D)
    model.transformer.resblocks.N.ln_1 / ln_2          LayerNorms
    model.transformer.resblocks.N.attn.in_proj_weight  (3D, D): q, k, v stacked
    model.transformer.resblocks.N.attn.in_proj_bias    (3D,)
    model.transformer.resblocks.N.attn.out_proj        Linear D -> D
    model.transformer.resblocks.N.mlp.c_fc / c_proj    Linear D -> 4D -> D
    model.ln_final                                     LayerNorm
    model.text_projection, model.logit_scale           (CLIP's contrastive head: unused)

SD 2.x conditions on the penultimate layer's output passed through ln_final, so
the last resblock is dropped and the model runs the rest with the final LayerNorm:
what diffusers' conversion does (its SD 2.x text encoder has 23 layers).

SDXL single files hold both of its encoders under `conditioner.embedders.`:
    0.transformer.text_model.*   CLIP ViT-L/14, the SD 1.x layout above
    1.model.*                    OpenCLIP ViT-bigG/14, the SD 2.x layout above
SDXL needs bigG's every layer (its pooled output is taken after the last one) and its
text_projection, stored as (width, proj) for `x @ text_projection`: transposed
against nn.Linear's (proj, width) weight. `keep_last=True` converts it that way.
"""

from __future__ import annotations

import re

import torch

from livestyle.errors import CheckpointError
from livestyle.models.clip import TextEncoder, TextEncoderConfig

HEAD_DIM = 64  # both ViT-L/14 (12 x 64) and ViT-H/14 (16 x 64); shapes do not store it

# OpenCLIP resblock names -> transformers encoder layer names.
_OPENCLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPENCLIP_UNUSED = ("model.logit_scale", "model.attn_mask")  # the contrastive head's scale; a constant mask
_RESBLOCK = re.compile(r"model\.transformer\.resblocks\.(\d+)\.(.+)")


def text_encoder_from_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict (a diffusers `text_encoder/` folder) -> our keys.

    transformers 4 saves `text_model.embeddings...` (every SD checkpoint on the Hub);
    transformers 5 saves the same names without `text_model.`. Both are accepted, and
    the `position_ids` buffer some files hold is dropped (TextEncoder recomputes it).
    A CLIPTextModelWithProjection's `text_projection.weight` keeps its name.
    """
    out = {}
    for key, value in sd.items():
        name = key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key
        if name != "text_model.embeddings.position_ids":
            out[name] = value
    return out


def text_encoder_from_original(
    sd: dict[str, torch.Tensor], num_attention_heads: int | None = None, keep_last: bool = False
) -> tuple[dict[str, torch.Tensor], TextEncoderConfig]:
    """Convert an original-layout text encoder state dict (prefix `cond_stage_model.` or
    `conditioner.embedders.N.` already removed) to TextEncoder's keys, with the config
    read from the shapes.

    num_attention_heads: default hidden_size // 64, true for SD 1.x, 2.x and XL.
    keep_last: OpenCLIP only: keep every resblock and the text_projection (SDXL's
        second encoder) instead of dropping the last block and the head (SD 2.x).
    Raises CheckpointError naming keys when the layout is unknown or incomplete.
    """
    keys = list(sd)
    if any(k.startswith("transformer.") for k in keys):
        state, act = _from_sd1(sd), "quick_gelu"
    elif any(k.startswith("model.transformer.resblocks.") for k in keys):
        state, act = _from_openclip(sd, keep_last), "gelu"
    else:
        raise CheckpointError(
            "unknown text encoder layout: expected `transformer.text_model.*` (SD 1.x) or "
            f"`model.transformer.resblocks.*` (SD 2.x), got keys like {sorted(keys)[:3]} "
            "(strip the `cond_stage_model.` prefix first)"
        )
    config = _config_from_shapes(state, act, num_attention_heads)
    _check_keys(state, config)
    return state, config


def _from_sd1(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if not key.startswith("transformer."):
            raise CheckpointError(f"SD 1.x text encoder has an unexpected key {key!r}")
        out[key.removeprefix("transformer.")] = value
    return text_encoder_from_transformers(out)  # some files lack `text_model.`; drops position_ids


def _from_openclip(sd: dict[str, torch.Tensor], keep_last: bool) -> dict[str, torch.Tensor]:
    blocks = {int(m.group(1)) for k in sd if (m := _RESBLOCK.fullmatch(k))}
    # The layer SD 2.x skips (it conditions on the penultimate one); SDXL keeps it.
    last = None if keep_last else max(blocks)
    out = {}
    for key, value in sd.items():
        if key in _OPENCLIP_UNUSED:
            continue
        if key == "model.text_projection":
            if keep_last:  # (width, proj) for x @ W -> nn.Linear's (proj, width)
                out["text_projection.weight"] = value.T.contiguous()
        elif key == "model.token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = value
        elif key == "model.positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = value
        elif key.startswith("model.ln_final."):
            out["text_model.final_layer_norm." + key.removeprefix("model.ln_final.")] = value
        elif m := _RESBLOCK.fullmatch(key):
            n, rest = int(m.group(1)), m.group(2)
            if n == last:
                continue
            prefix = f"text_model.encoder.layers.{n}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = rest.removeprefix("attn.in_proj_")
                # (3D, ...) -> three (D, ...) slices in q, k, v order; cloned so the
                # result holds no shared storage (safetensors refuses to save that)
                q, k, v = value.chunk(3, dim=0)
                for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    out[f"{prefix}self_attn.{proj}.{kind}"] = part.clone()
            else:
                module, _, param = rest.rpartition(".")
                if module not in _OPENCLIP_LAYER:
                    raise CheckpointError(f"SD 2.x text encoder has an unexpected key {key!r}")
                out[f"{prefix}{_OPENCLIP_LAYER[module]}.{param}"] = value
        else:
            raise CheckpointError(f"SD 2.x text encoder has an unexpected key {key!r}")
    return out


def _config_from_shapes(state, act: str, num_attention_heads: int | None) -> TextEncoderConfig:
    need = ("text_model.embeddings.token_embedding.weight",
            "text_model.embeddings.position_embedding.weight",
            "text_model.encoder.layers.0.mlp.fc1.weight")
    missing = [k for k in need if k not in state]
    if missing:
        raise CheckpointError(f"text encoder lacks {missing}")
    vocab_size, hidden = state[need[0]].shape
    layers = {int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")}
    projection = state.get("text_projection.weight")
    return TextEncoderConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=state[need[2]].shape[0],
        num_hidden_layers=max(layers) + 1,
        num_attention_heads=num_attention_heads or max(hidden // HEAD_DIM, 1),
        max_position_embeddings=state[need[1]].shape[0],
        hidden_act=act,
        projection_dim=None if projection is None else projection.shape[0],
    )


def _check_keys(state: dict[str, torch.Tensor], config: TextEncoderConfig) -> None:
    with torch.device("meta"):  # names and shapes only, no memory
        expected = {k: v.shape for k, v in TextEncoder(config).state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"text encoder weights do not fit a {config.num_hidden_layers}-layer CLIP: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    wrong = [k for k, shape in expected.items() if state[k].shape != shape]
    if wrong:
        k = wrong[0]
        raise CheckpointError(f"text encoder weight {k} has shape {tuple(state[k].shape)}, "
                              f"expected {tuple(expected[k])}")
