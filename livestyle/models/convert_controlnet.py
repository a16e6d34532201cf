"""ControlNet weights in the original single-file layout (lllyasviel's cldm, A1111) <-> diffusers names.

The original ControlNet (keys under `control_model.`, or bare in the v1.1 files) is the
original U-Net's encoder half (time_embed, label_emb for SDXL, input_blocks, middle_block:
named as in convert_unet.py) plus:

    input_hint_block.0                    controlnet_cond_embedding.conv_in
    input_hint_block.{2 * (i + 1)}        controlnet_cond_embedding.blocks.i   (SiLUs between, no weights)
    input_hint_block.{2 * (blocks + 1)}   controlnet_cond_embedding.conv_out  (14 for SD's 4 widths)
    zero_convs.i.0                        controlnet_down_blocks.i
    middle_block_out.0                    controlnet_mid_block

as diffusers' `convert_controlnet_checkpoint` (single_file_utils.py) reads it; the tests
check the two agree. A diffusers-layout ControlNet saved as one file without its
config.json (common for SDXL ControlNets) has its config read from the shapes instead.
Head counts are not stored in the weights: 8 heads at a 768-d context (SD 1.x), 64-channel
heads at 1024 (SD 2.x) and 2048 (SDXL), as for the U-Net.
"""

from __future__ import annotations

import torch

from livestyle.errors import CheckpointError
from livestyle.models.controlnet import ControlNet, ControlNetConfig
from livestyle.models.convert_unet import (
    SDXL_TIME_EMBED_DIM, _expected_shapes, _few, _module_map, encoder_config_from_original, rename_keys, renamed,
)

PREFIX = "control_model."


def _modules(config: ControlNetConfig) -> dict[str, str]:
    """diffusers module path -> original module path, for every ControlNet module with weights."""
    modules = _module_map(config)
    blocks = 2 * (len(config.conditioning_embedding_out_channels) - 1)
    modules["controlnet_cond_embedding.conv_in"] = "input_hint_block.0"
    for i in range(blocks):
        modules[f"controlnet_cond_embedding.blocks.{i}"] = f"input_hint_block.{2 * (i + 1)}"
    modules["controlnet_cond_embedding.conv_out"] = f"input_hint_block.{2 * (blocks + 1)}"
    for i in range(len(_skip_widths(config))):
        modules[f"controlnet_down_blocks.{i}"] = f"zero_convs.{i}.0"
    modules["controlnet_mid_block"] = "middle_block_out.0"
    return modules


def _skip_widths(config: ControlNetConfig) -> list[int]:
    channels, n = config.block_out_channels, config.layers_per_block
    return [channels[0]] + [c for level, c in enumerate(channels) for _ in range(n + (level < len(channels) - 1))]


def _key_map(config: ControlNetConfig) -> dict[str, str]:
    """diffusers key -> original key, for every weight of a ControlNet with this config."""
    keys = [k for k in _expected_shapes(config, ControlNet) if not k.startswith("time_embedding.cond_proj.")]
    return rename_keys(keys, _modules(config))


def controlnet_config_from_original(shapes: dict[str, tuple[int, ...]],
                                   num_heads: tuple[int, ...] | None = None) -> ControlNetConfig:
    """The ControlNetConfig of an original-layout ControlNet (no `control_model.` prefix), from its shapes."""
    hint = sorted(int(k.split(".")[1]) for k in shapes if k.startswith("input_hint_block.") and k.endswith(".weight"))
    if not hint or hint != list(range(0, 2 * len(hint), 2)) or len(hint) % 2:
        raise CheckpointError(f"not a ControlNet in the original layout: input_hint_block convs {hint} are not "
                              "0, 2, 4, ... with a stride-2 conv between widths")
    fields = encoder_config_from_original(shapes, num_heads)
    widths = [shapes["input_hint_block.0.weight"][0]] + [shapes[f"input_hint_block.{i}.weight"][0]
                                                         for i in hint[2:-1:2]]
    try:
        return ControlNetConfig(conditioning_channels=shapes["input_hint_block.0.weight"][1],
                                conditioning_embedding_out_channels=tuple(widths), **fields)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def controlnet_from_original(state: dict[str, torch.Tensor], config: ControlNetConfig) -> dict[str, torch.Tensor]:
    """Rename an original-layout ControlNet state dict (no prefix) to diffusers keys;
    CheckpointError naming a few missing, unexpected or misshapen keys."""
    return renamed(state, {orig: diff for diff, orig in _key_map(config).items()},
                   _expected_shapes(config, ControlNet), "ControlNet")


def controlnet_to_original(state: dict[str, torch.Tensor], config: ControlNetConfig) -> dict[str, torch.Tensor]:
    """The inverse of controlnet_from_original: diffusers keys -> original keys (no prefix added)."""
    to_original = _key_map(config)
    unknown = [k for k in state if k not in to_original]
    if unknown:
        raise CheckpointError(f"not ControlNet weights of this config: {_few(unknown)}")
    return {to_original[k]: v for k, v in state.items()}


def controlnet_config_from_diffusers_shapes(shapes: dict[str, tuple[int, ...]],
                                           num_heads: tuple[int, ...] | None = None) -> ControlNetConfig:
    """The ControlNetConfig of diffusers-layout ControlNet weights without their config.json."""
    levels = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("down_blocks."))
    n = len({k.split(".")[3] for k in shapes if k.startswith("down_blocks.0.resnets.")})
    channels = tuple(shapes[f"down_blocks.{level}.resnets.0.conv2.weight"][0] for level in range(levels))
    attention = tuple(f"down_blocks.{level}.attentions.0.proj_in.weight" in shapes for level in range(levels))

    def depth(prefix: str) -> int:
        head = f"{prefix}.transformer_blocks."
        return len({k[len(head):].split(".")[0] for k in shapes if k.startswith(head)})

    depths = [depth(f"down_blocks.{level}.attentions.0") if a else 1 for level, a in enumerate(attention)]
    depths[-1] = depth("mid_block.attentions.0")
    context = next((shape[1] for k, shape in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    if context is None:
        raise CheckpointError("ControlNet without cross-attention layers: cannot tell its text context width "
                              "without its config.json")
    if num_heads is None:
        if context == 768:
            num_heads = (8,) * levels
        elif context in (1024, 2048, 1280):
            num_heads = tuple(max(c // 64, 1) for c in channels)
        else:
            raise CheckpointError(f"cannot tell the attention head count of a ControlNet with context dim {context}; "
                                  "keep its config.json beside it")
    added = {}
    if "add_embedding.linear_1.weight" in shapes:
        added = dict(addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
                     projection_class_embeddings_input_dim=shapes["add_embedding.linear_1.weight"][1])
    blocks = len({k.split(".")[2] for k in shapes if k.startswith("controlnet_cond_embedding.blocks.")})
    widths = [shapes["controlnet_cond_embedding.conv_in.weight"][0]] + [
        shapes[f"controlnet_cond_embedding.blocks.{i}.weight"][0] for i in range(1, blocks, 2)]
    try:
        return ControlNetConfig(
            in_channels=shapes["conv_in.weight"][1], block_out_channels=channels, layers_per_block=n,
            attention_levels=attention, num_heads=tuple(num_heads), cross_attention_dim=context,
            use_linear_projection=len(shapes["mid_block.attentions.0.proj_in.weight"]) == 2,
            transformer_layers_per_block=tuple(depths),
            conditioning_channels=shapes["controlnet_cond_embedding.conv_in.weight"][1],
            conditioning_embedding_out_channels=tuple(widths), **added)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
