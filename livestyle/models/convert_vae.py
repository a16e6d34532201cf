"""KL autoencoder weights: the original single-file layout <-> diffusers' AutoencoderKL layout.

Single-file SD checkpoints (CompVis/Stability, A1111, Civitai) store the VAE under
`first_stage_model.`; standalone VAE files store the same keys without the prefix.
The functions here take keys WITHOUT the prefix (the caller strips it). The layout:

    original                                  diffusers (vae.py)
    encoder.down.{i}.block.{j}.*              encoder.down_blocks.{i}.resnets.{j}.*
    encoder.down.{i}.downsample.conv.*        encoder.down_blocks.{i}.downsamplers.0.conv.*
    decoder.up.{i}.block.{j}.*                decoder.up_blocks.{L-1-i}.resnets.{j}.*   (up.0 is the LAST level)
    decoder.up.{i}.upsample.conv.*            decoder.up_blocks.{L-1-i}.upsamplers.0.conv.*
    *.mid.block_1 / block_2                   *.mid_block.resnets.0 / 1
    *.mid.attn_1.norm / q / k / v / proj_out  *.mid_block.attentions.0.group_norm / to_q / to_k / to_v / to_out.0
    *.nin_shortcut, *.norm_out                *.conv_shortcut, *.conv_norm_out
    quant_conv, post_quant_conv, conv_in, conv_out: unchanged

The attention projections are 1x1 convs (C, C, 1, 1) in the original and linears
(C, C) in diffusers. L is the number of resolution levels.
"""

import dataclasses
import re

import torch
from torch import Tensor

from livestyle.errors import CheckpointError
from livestyle.models.vae import KLAutoencoder, KLAutoencoderConfig

_ATTN_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_TO_ORIGINAL = {v: k for k, v in _ATTN_TO_DIFFUSERS.items()}
_ATTN_LINEAR = re.compile(r"(en|de)coder\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight")

# Standalone VAE training checkpoints also carry the discriminator and LPIPS weights
# under `loss.`; they play no part in encoding or decoding.
_TRAINING_ONLY = ("loss.",)


def _diffusers_name(key: str, levels: int) -> str:
    """One original key -> its diffusers name; a key outside the layout comes back unchanged."""
    up = lambda m: str(levels - 1 - int(m[1]))  # noqa: E731  (original up.0 is diffusers' last up block)
    key = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", key)
    key = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.block\.", lambda m: f"decoder.up_blocks.{up(m)}.resnets.", key)
    key = re.sub(r"^decoder\.up\.(\d+)\.upsample\.", lambda m: f"decoder.up_blocks.{up(m)}.upsamplers.0.", key)
    key = re.sub(r"\.mid\.block_([12])\.", lambda m: f".mid_block.resnets.{int(m[1]) - 1}.", key)
    key = re.sub(
        r"\.mid\.attn_1\.(norm|q|k|v|proj_out)\.",
        lambda m: f".mid_block.attentions.0.{_ATTN_TO_DIFFUSERS[m[1]]}.",
        key,
    )
    return key.replace(".nin_shortcut.", ".conv_shortcut.").replace(".norm_out.", ".conv_norm_out.")


def _original_name(key: str, levels: int) -> str:
    """Inverse of `_diffusers_name`."""
    up = lambda m: str(levels - 1 - int(m[1]))  # noqa: E731
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{up(m)}.block.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{up(m)}.upsample.", key)
    key = re.sub(r"\.mid_block\.resnets\.([01])\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
    key = re.sub(
        r"\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.",
        lambda m: f".mid.attn_1.{_ATTN_TO_ORIGINAL[m[1]]}.",
        key,
    )
    return key.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")


def _check_prefix(keys) -> None:
    prefixed = [k for k in keys if k.startswith("first_stage_model.")]
    if prefixed:
        raise CheckpointError(
            f"VAE keys still carry the 'first_stage_model.' prefix (e.g. {prefixed[0]!r}); strip it before converting"
        )


def _indices(shapes: dict, prefix: str) -> list[int]:
    """Sorted distinct integers N over keys `prefix + 'N.'...`."""
    found = {int(m[1]) for k in shapes if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return sorted(found)


def vae_config_from_original(
    shapes: dict[str, tuple],
    *,
    norm_num_groups: int = 32,
    scaling_factor: float = 0.18215,
    shift_factor: float | None = None,
) -> KLAutoencoderConfig:
    """Infer the VAE's shape from original-layout weight shapes ({key: shape}, no prefix).

    Channels, levels, layers per level, latent width and the quant convs are read from
    the shapes. Group count and latent scaling are not in the weights: every SD VAE
    uses 32 groups; pass the scaling of the model family (0.18215 for SD 1.x/2.x).
    """
    _check_prefix(shapes)

    def shape(key):
        if key not in shapes:
            raise CheckpointError(
                f"not an SD VAE in the original layout: no {key!r} among {len(shapes)} keys "
                f"(first few: {list(shapes)[:3]})"
            )
        return tuple(shapes[key])

    in_channels = shape("encoder.conv_in.weight")[1]  # first, so that a non-VAE file gets this message
    levels = _indices(shapes, "encoder.down.")
    if levels != list(range(len(levels))) or not levels:
        raise CheckpointError(f"VAE encoder levels are not numbered 0..N-1: found encoder.down.{levels}")
    return KLAutoencoderConfig(
        in_channels=in_channels,
        out_channels=shape("decoder.conv_out.weight")[0],
        latent_channels=shape("decoder.conv_in.weight")[1],
        block_out_channels=tuple(shape(f"encoder.down.{i}.block.0.conv2.weight")[0] for i in levels),
        layers_per_block=len(_indices(shapes, "encoder.down.0.block.")),
        norm_num_groups=norm_num_groups,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv="quant_conv.weight" in shapes,
        use_post_quant_conv="post_quant_conv.weight" in shapes,
    )


def vae_from_original(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Original-layout VAE state dict (no `first_stage_model.` prefix) -> diffusers AutoencoderKL keys.

    Checks the result against the architecture the shapes describe and raises
    CheckpointError naming a few missing, unexpected or misshapen keys (in the
    original naming). Tensors are not copied, only renamed (attention weights reshaped).
    """
    _check_prefix(sd)
    sd = {k: v for k, v in sd.items() if not k.startswith(_TRAINING_ONLY)}
    config = vae_config_from_original({k: tuple(v.shape) for k, v in sd.items()})
    levels = len(config.block_out_channels)

    out = {}
    for key, value in sd.items():
        name = _diffusers_name(key, levels)
        if _ATTN_LINEAR.fullmatch(name) and value.ndim == 4:
            value = value.reshape(value.shape[0], value.shape[1])  # 1x1 conv (C, C, 1, 1) -> linear (C, C)
        out[name] = value

    # The expected keys and shapes, from a weightless model. The group count does
    # not change any shape, and 1 divides every width.
    with torch.device("meta"):
        expected = KLAutoencoder(dataclasses.replace(config, norm_num_groups=1)).state_dict()
    missing = [_original_name(k, levels) for k in expected if k not in out]
    unexpected = [k for k in sd if _diffusers_name(k, levels) not in expected]
    wrong = [
        f"{_original_name(k, levels)} {tuple(out[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in out and out[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        found = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        raise CheckpointError(
            "VAE weights (original layout) do not fit: " + "; ".join(f"{n} {k[:3]}" for n, k in found if k)
        )
    return out


def vae_to_original(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers AutoencoderKL state dict -> original single-file layout (no prefix). Inverse of vae_from_original."""
    levels = 1 + max((int(m[1]) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))), default=-1)
    if levels == 0:
        raise CheckpointError(f"not a diffusers AutoencoderKL state dict: no decoder.up_blocks.* among {list(sd)[:3]}")
    out = {}
    for key, value in sd.items():
        if _ATTN_LINEAR.fullmatch(key) and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # linear (C, C) -> 1x1 conv (C, C, 1, 1)
        out[_original_name(key, levels)] = value
    return out
